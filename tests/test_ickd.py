"""Inter-channel correlation (:mod:`lightning_kd.losses.ickd`): hand-worked values, the authors' CIFAR formula written
out independently, invariances, grid cells, torchdistill ``ChSimLoss`` parity (and its batch factor), errors,
gradients, dtype, checkpointing, the YAML config and a real timm pair through Lightning (CPU)."""

from __future__ import annotations

import inspect
import math

import pytest
import timm
import torch
from conftest import fast_trainer, gen, random_data
from omegaconf import OmegaConf
from torch import nn
from torchdistill.losses.mid_level import ChSimLoss
from torchdistill.models.wrapper import ChannelSimilarityEmbed

import lightning_kd
from lightning_kd.config import CONF_DIR, compose
from lightning_kd.engine import build_terms
from lightning_kd.losses import DistillBatch, ModelOutputs, SetupContext, create_loss
from lightning_kd.losses.connectors import ShapeMismatchError
from lightning_kd.losses.ickd import ICKDLoss, channel_correlation, grid_cells, ickd_loss

TOL = {"atol": 1e-5, "rtol": 1e-5}
PAIRS = {"p": {"student": {"io": "output", "path": "s"}, "teacher": {"io": "output", "path": "t"}, "weight": 1}}


def batch(term: ICKDLoss, s: torch.Tensor, t: torch.Tensor) -> DistillBatch:
    b = len(s)
    return DistillBatch(
        ModelOutputs(torch.zeros(b, 3), {term.student_tap: s}), ModelOutputs(torch.zeros(b, 3), {term.teacher_tap: t})
    )


def set_up(term: ICKDLoss, s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> ICKDLoss:
    term.setup(
        SetupContext(
            student=ModelOutputs(torch.zeros(2, 3), {term.student_tap: torch.zeros(s_shape)}),
            teacher=ModelOutputs(torch.zeros(2, 3), {term.teacher_tap: torch.zeros(t_shape)}),
            student_model=nn.Identity(),
            teacher_model=nn.Identity(),
            num_classes=3,
        )
    )
    return term


def _cifar_reference(f_s: torch.Tensor, f_t: torch.Tensor) -> float:
    """ADLab-AutoDrive/ICKD Cifar100/distiller_zoo/ICKD.py ``batch_loss`` (after the embed), written out per sample and
    per channel row in float64: Σ_b Σ_m ‖ĝ_S,bm − ĝ_T,bm‖² / (C · B)."""
    b, c = f_s.shape[:2]
    total = 0.0
    for i in range(b):
        fs, ft = f_s[i].double().reshape(c, -1), f_t[i].double().reshape(c, -1)
        for m in range(c):
            gs = [float(fs[m] @ fs[n]) for n in range(c)]
            gt = [float(ft[m] @ ft[n]) for n in range(c)]
            ns, nt = math.sqrt(sum(v * v for v in gs)), math.sqrt(sum(v * v for v in gt))
            total += sum((a / ns - b_ / nt) ** 2 for a, b_ in zip(gs, gt))
    return total / (c * b)


# --------------------------------------------------------------------------------------------------- hand-worked
def test_hand_worked_two_channels_two_positions() -> None:
    # student (no adapter) F = [[1, 2], [0, 1]] -> G = [[5, 2], [2, 1]], unit rows (5, 2)/√29 and (2, 1)/√5
    s = torch.tensor([[[[1.0, 2.0]], [[0.0, 1.0]]]])
    # teacher F = I -> G = I, unit rows e1, e2
    t = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    row0 = (5 / math.sqrt(29) - 1) ** 2 + (2 / math.sqrt(29)) ** 2
    row1 = (2 / math.sqrt(5)) ** 2 + (1 / math.sqrt(5) - 1) ** 2
    expected = (row0 + row1) / 2  # / (C · B) with C = 2, B = 1
    assert expected > 1e-2
    torch.testing.assert_close(channel_correlation(s)[0, 0], torch.tensor([5.0, 2.0]) / math.sqrt(29), **TOL)
    assert float(ickd_loss(s, t)) == pytest.approx(expected, rel=1e-5)
    term = set_up(ICKDLoss(student_layer="a", teacher_layer="b", connector="none"), (1, 2, 1, 2), (1, 2, 1, 2))
    assert float(term(batch(term, s, t))) == pytest.approx(expected, rel=1e-5)
    # a second sample on which student and teacher agree halves the mean
    s2, t2 = torch.cat([s, t]), torch.cat([t, t])
    assert float(ickd_loss(s2, t2)) == pytest.approx(expected / 2, rel=1e-5)


def test_matches_the_authors_cifar_formula_written_out() -> None:
    s = torch.randn(3, 5, 4, 3, generator=gen(1))
    t = torch.relu(torch.randn(3, 5, 4, 3, generator=gen(2)))
    assert float(ickd_loss(s, t)) == pytest.approx(_cifar_reference(s, t), rel=1e-5)


def test_grid_cells_average_the_per_cell_losses() -> None:
    s, t = torch.randn(2, 3, 4, 6, generator=gen(3)), torch.randn(2, 3, 4, 6, generator=gen(4))
    cells = [
        (slice(0, 2), slice(0, 3)),
        (slice(0, 2), slice(3, 6)),
        (slice(2, 4), slice(0, 3)),
        (slice(2, 4), slice(3, 6)),
    ]
    expected = sum(_cifar_reference(s[:, :, h, w], t[:, :, h, w]) for h, w in cells) / 4
    assert float(ickd_loss(s, t, grid=2)) == pytest.approx(expected, rel=1e-5)
    assert abs(float(ickd_loss(s, t, grid=1)) - expected) > 1e-3  # the whole-map loss is a different quantity
    # the cells are laid out as extra samples: cell (0, 1) of sample 1 is s[1, :, 0:2, 3:6]
    torch.testing.assert_close(grid_cells(s, 2)[4 + 1], s[1, :, 0:2, 3:6], atol=0, rtol=0)
    with pytest.raises(ValueError, match="equal cells"):
        ickd_loss(s, t, grid=4)


# --------------------------------------------------------------------------------------------------- invariances
def test_zero_for_equal_maps_and_invariances() -> None:
    s = torch.randn(4, 6, 3, 3, generator=gen(5))
    t = torch.randn(4, 6, 3, 3, generator=gen(6))
    assert float(ickd_loss(s, s)) < 1e-10
    ref = ickd_loss(s, t)
    assert 1e-2 < float(ref) <= 4.0  # mean squared distance of unit rows
    # positive rescaling of either map
    torch.testing.assert_close(ickd_loss(7.0 * s, 0.01 * t), ref, **TOL)
    # any permutation of the positions of either map (the Gram sums over positions)
    perm_s, perm_t = torch.randperm(9, generator=gen(7)), torch.randperm(9, generator=gen(8))
    s_p = s.flatten(2)[:, :, perm_s].view_as(s)
    t_p = t.flatten(2)[:, :, perm_t].view_as(t)
    torch.testing.assert_close(ickd_loss(s_p, t_p), ref, **TOL)
    # the same channel permutation on both sides: unchanged; on the student only: changed
    ch = torch.randperm(6, generator=gen(9))
    torch.testing.assert_close(ickd_loss(s[:, ch], t[:, ch]), ref, **TOL)
    assert abs(float(ickd_loss(s[:, ch], t)) - float(ref)) > 1e-3
    # a per-position rescaling is not a symmetry
    assert abs(float(ickd_loss(s * torch.linspace(0.1, 3, 3), t)) - float(ref)) > 1e-4


# ----------------------------------------------------------------------------------------------- torchdistill parity
def test_matches_torchdistill_chsimloss_up_to_its_batch_factor() -> None:
    b = 5
    s, t = torch.randn(b, 6, 3, 3, generator=gen(10)), torch.randn(b, 6, 3, 3, generator=gen(11))
    s_td, s_ours = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    ref = ChSimLoss(PAIRS)({"s": {"output": s_td}}, {"t": {"output": t}})
    ref.backward()
    ours = ickd_loss(s_ours, t)
    ours.backward()
    # torchdistill (= the authors' ImageNet ChSimLoss) divides by C·B², the authors' CIFAR code and we by C·B
    torch.testing.assert_close(ours, b * ref.detach(), **TOL)
    torch.testing.assert_close(s_ours.grad, b * s_td.grad, **TOL)
    assert abs(float(ours.detach()) - float(ref.detach())) > 1e-3


def test_end_to_end_with_torchdistills_embed_carrying_our_adapter_weights() -> None:
    b = 4
    s, t = torch.randn(b, 4, 3, 3, generator=gen(12)), torch.randn(b, 8, 3, 3, generator=gen(13))
    torch.manual_seed(0)
    term = set_up(ICKDLoss(student_layer="layer3", teacher_layer="layer4"), s.shape, t.shape)
    conv, bn = term.connector[0], term.connector[1]
    assert conv.kernel_size == (1, 1) and conv.bias is None and isinstance(bn, nn.BatchNorm2d)
    with torch.no_grad():  # a non-trivial BatchNorm affine part
        bn.weight.uniform_(0.5, 1.5, generator=gen(14))
        bn.bias.uniform_(-0.5, 0.5, generator=gen(15))
    # torchdistill's 3×3 embed; zero off-centre, our 1×1 weights in the centre: the same map (padding 1)
    embed = ChannelSimilarityEmbed(in_channels=4, out_channels=8)
    with torch.no_grad():
        embed.conv2d.weight.zero_()
        embed.conv2d.weight[:, :, 1, 1] = conv.weight[:, :, 0, 0]
    embed.l2norm.load_state_dict(bn.state_dict())
    term.train()
    embed.train()
    ref = ChSimLoss(PAIRS)({"s": {"output": embed(s)}}, {"t": {"output": t}})
    ours = term(batch(term, s, t))
    torch.testing.assert_close(ours, b * ref, **TOL)


# ----------------------------------------------------------------------------------------------- errors
def test_bad_shapes_and_arguments_raise_clear_errors() -> None:
    term = ICKDLoss(student_layer="layer3", teacher_layer="layer4")
    with pytest.raises(ValueError) as err:
        set_up(term, (2, 8, 4, 4), (2, 16, 2, 2))
    for piece in ("ickd", "layer3", "layer4", "(2, 8, 4, 4)", "(2, 16, 2, 2)", "equal resolution"):
        assert piece in str(err.value), str(err.value)
    with pytest.raises(ValueError, match=r"feature maps \[B, C, H, W\]"):
        set_up(ICKDLoss(student_layer="embedding", teacher_layer="embedding"), (2, 8), (2, 8))
    with pytest.raises(ValueError, match="grid 3 does not divide the 4×4"):
        set_up(ICKDLoss(grid=3), (2, 8, 4, 4), (2, 8, 4, 4))
    with pytest.raises(ShapeMismatchError, match="no connector"):
        set_up(ICKDLoss(connector="none"), (2, 8, 4, 4), (2, 16, 4, 4))
    with pytest.raises(ValueError, match="connector must be one of"):
        ICKDLoss(connector="linear")
    with pytest.raises(ValueError, match="grid must be"):
        ICKDLoss(grid=0)
    with pytest.raises(RuntimeError, match="setup"):
        ICKDLoss()(batch(ICKDLoss(), torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)))
    with pytest.raises(ValueError, match="same shape"):
        ickd_loss(torch.randn(2, 4, 2, 2), torch.randn(2, 8, 2, 2))


# ----------------------------------------------------------------------------------------------- gradients and dtype
def test_gradients_reach_the_student_and_the_adapter_never_the_teacher() -> None:
    s = torch.randn(4, 4, 3, 3, generator=gen(16)).requires_grad_(True)
    t = torch.randn(4, 8, 3, 3, generator=gen(17)).requires_grad_(True)
    term = set_up(ICKDLoss(), s.shape, t.shape)
    out = term(batch(term, s, t))
    assert out.dtype == torch.float32 and out.shape == ()
    out.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    names = sorted(n for n, _ in term.named_parameters())
    assert names == ["connector.0.weight", "connector.1.bias", "connector.1.weight"]
    for name, p in term.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert t.grad is None


def test_bf16_inputs_give_a_float32_loss() -> None:
    s, t = torch.randn(4, 6, 3, 3, generator=gen(18)), torch.randn(4, 6, 3, 3, generator=gen(19))
    s16, t16 = s.bfloat16(), t.bfloat16()
    out = ickd_loss(s16, t16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ickd_loss(s16.float(), t16.float()), **TOL)
    # the term under bf16 autocast: the adapter runs in bf16, the Grams in float32
    term = set_up(ICKDLoss(), s.shape, (4, 8, 3, 3))
    t8 = torch.randn(4, 8, 3, 3, generator=gen(20))
    term.eval()  # fixed BatchNorm statistics, so both calls see the same adapter
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = term(batch(term, s, t8))
    ref = term(batch(term, s, t8))
    assert auto.dtype == torch.float32 and float(ref.detach()) > 1e-3
    torch.testing.assert_close(auto, ref, rtol=0.05, atol=1e-4)


def test_adapter_and_its_batchnorm_statistics_are_checkpointed() -> None:
    s, t = torch.randn(4, 4, 3, 3, generator=gen(21)), torch.randn(4, 8, 3, 3, generator=gen(22))
    torch.manual_seed(0)
    term = set_up(ICKDLoss(), s.shape, t.shape)
    term(batch(term, s, t))  # a training-mode step updates the running statistics
    state = term.state_dict()
    assert {"connector.0.weight", "connector.1.running_mean", "connector.1.running_var"} <= set(state)
    assert not torch.equal(state["connector.1.running_mean"], torch.zeros(8))
    torch.manual_seed(1)
    fresh = set_up(ICKDLoss(), s.shape, t.shape)
    term.eval()
    fresh.eval()
    assert abs(float(fresh(batch(fresh, s, t))) - float(term(batch(term, s, t)))) > 1e-6
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(batch(fresh, s, t)), term(batch(term, s, t)), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------- config and Lightning
def test_yaml_builds_the_term_with_its_values() -> None:
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / "ickd.yaml"))
    values = yaml["terms"]["ickd"]
    params = inspect.signature(ICKDLoss.__init__).parameters
    assert sorted(values) == sorted(p for p in params if p != "self")
    assert values == {k: p.default for k, p in params.items() if k != "self"}
    term = build_terms(compose(["loss=ickd"]).loss.terms)["ickd"]
    assert isinstance(term, ICKDLoss)
    assert term.weight == values["weight"] == 2.5 and term.grid == values["grid"] == 1
    assert term.connector_kind == values["connector"] == "conv" and term.batchnorm is True
    assert str(term.student_tap) == values["student_layer"] == "stage:-1"
    assert str(term.teacher_tap) == values["teacher_layer"] == "stage:-1"
    assert isinstance(create_loss("ickd"), ICKDLoss)


def test_timm_resnet_pair_through_lightning() -> None:
    torch.manual_seed(0)
    student = timm.create_model("resnet18", num_classes=10)
    teacher = timm.create_model("resnet34", num_classes=10)
    module = lightning_kd.DistillationModule(student, teacher, loss={"ickd": {"student_layer": "stage:-2"}})
    data = random_data(n=8, size=32)
    trainer = fast_trainer(max_steps=1)
    with pytest.raises(ValueError, match="spatial sizes differ"):  # layer3 (2×2) against layer4 (1×1)
        trainer.fit(module, data)

    torch.manual_seed(0)
    student = timm.create_model("resnet18", num_classes=10)  # fresh: the failed setup left its taps on the first
    module = lightning_kd.DistillationModule(student, teacher, loss="ickd")
    trainer = fast_trainer(max_steps=1)
    trainer.fit(module, data)
    value = trainer.callback_metrics["train/ickd"]
    assert math.isfinite(float(value)) and 0 < float(value) <= 4
    conv = module.engine.terms["ickd"].connector[0]
    assert (conv.in_channels, conv.out_channels) == (512, 512)
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in module.engine.terms["ickd"].parameters()} <= optimised
