"""Attention transfer (:mod:`lightning_kd.losses.at`): hand-worked values, invariances, torchdistill parity, shape
errors, gradients, a real timm pair through Lightning and the YAML config (CPU)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from conftest import fit_pair, gen, layer_batch, total
from omegaconf import OmegaConf
from torch import nn
from torchdistill.losses.mid_level import ATLoss as TDATLoss

from lightning_kd.config import CONF_DIR, compose
from lightning_kd.engine import build_terms
from lightning_kd.losses import ModelOutputs, SetupContext, create_loss
from lightning_kd.losses.at import ATLoss, at_loss, attention_map

TOL = {"atol": 1e-5, "rtol": 1e-5}


# --------------------------------------------------------------------------------------------------- hand-worked
def test_hand_worked_two_channels_two_by_two() -> None:
    # student B=1, C=2, 2x2: channel 0 = [[1, 0], [0, 1]], channel 1 = [[1, 2], [0, 0]]
    s = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [0.0, 0.0]]]])
    # teacher C=1, constant 1: uniform attention (1/2 at each of the 4 positions)
    t = torch.ones(1, 1, 2, 2)
    a_s = [(1 + 1) / 2, (0 + 4) / 2, (0 + 0) / 2, (1 + 0) / 2]  # mean_c f², positions row-major
    norm = math.sqrt(sum(v * v for v in a_s))
    q_s = [v / norm for v in a_s]
    q_t = [0.5] * 4
    expected = sum((a - b) ** 2 for a, b in zip(q_s, q_t)) / 4
    assert expected > 1e-3
    torch.testing.assert_close(attention_map(s)[0], torch.tensor(q_s), **TOL)
    assert float(at_loss(s, t)) == pytest.approx(expected, rel=1e-5)
    term = ATLoss(student_layers=["layer1"], teacher_layers=["layer2"])
    parts = term(layer_batch(term, [s], [t]))
    assert set(parts) == {"layer1"}
    assert float(parts["layer1"]) == pytest.approx(expected, rel=1e-5)
    # p = 1: mean_c |f| = [1, 1, 0, 0.5]
    a1 = [1.0, 1.0, 0.0, 0.5]
    n1 = math.sqrt(sum(v * v for v in a1))
    expected_p1 = sum((v / n1 - 0.5) ** 2 for v in a1) / 4
    assert float(at_loss(s, t, p=1)) == pytest.approx(expected_p1, rel=1e-5)
    assert abs(expected_p1 - expected) > 1e-4


def test_channel_sum_and_mean_give_the_same_map() -> None:
    # the paper sums over channels, the code averages: the L2 normalisation removes the factor C
    f = torch.randn(3, 5, 4, 4, generator=gen(1))
    paper = nn.functional.normalize(f.pow(2).sum(1).flatten(1), dim=1)
    torch.testing.assert_close(attention_map(f), paper, **TOL)


# --------------------------------------------------------------------------------------------------- invariances
def test_zero_for_proportional_maps() -> None:
    s = torch.randn(4, 6, 5, 5, generator=gen(2))
    assert float(at_loss(s, 3 * s)) < 1e-10
    assert float(at_loss(s, -0.5 * s)) < 1e-10
    # different channel counts, same per-position energy mean_c f²
    t = torch.cat([s, -s, 2 * s], dim=1)  # 18 channels: mean_c f² = 2·(student's), a positive multiple
    assert float(at_loss(s, t)) < 1e-10
    # and clearly positive otherwise
    assert float(at_loss(s, torch.randn(4, 9, 5, 5, generator=gen(3)))) > 1e-3


def test_invariant_to_positive_scaling_of_either_map() -> None:
    s = torch.randn(4, 6, 5, 5, generator=gen(4))
    t = torch.randn(4, 10, 5, 5, generator=gen(5))
    ref = at_loss(s, t)
    assert float(ref) > 1e-3
    for a, b in [(7.0, 1.0), (1.0, 0.01), (0.1, 30.0)]:
        torch.testing.assert_close(at_loss(a * s, b * t), ref, **TOL)
    # a position-dependent rescaling is not invariant
    assert abs(float(at_loss(s * torch.linspace(0.2, 3, 5), t)) - float(ref)) > 1e-4


# ----------------------------------------------------------------------------------------------- torchdistill parity
def test_matches_torchdistill_code_mode_two_pairs() -> None:
    s1, t1 = torch.randn(6, 4, 8, 8, generator=gen(10)), torch.randn(6, 16, 8, 8, generator=gen(11))
    s2, t2 = torch.randn(6, 8, 4, 4, generator=gen(12)), torch.randn(6, 32, 4, 4, generator=gen(13))
    pairs = {
        "pair1": {"student": {"io": "output", "path": "s1"}, "teacher": {"io": "output", "path": "t1"}, "weight": 1},
        "pair2": {"student": {"io": "output", "path": "s2"}, "teacher": {"io": "output", "path": "t2"}, "weight": 1},
    }
    s1_td, s2_td = s1.clone().requires_grad_(True), s2.clone().requires_grad_(True)
    td = TDATLoss(at_pairs=pairs, mode="code")
    t_io = {"t1": {"output": t1}, "t2": {"output": t2}}
    expected = td({"s1": {"output": s1_td}, "s2": {"output": s2_td}}, t_io)
    expected.backward()

    term = ATLoss(student_layers=["layer1", "layer2"], teacher_layers=["layer2", "layer3"])
    s1_o, s2_o = s1.clone().requires_grad_(True), s2.clone().requires_grad_(True)
    parts = term(layer_batch(term, [s1_o, s2_o], [t1, t2]))
    assert set(parts) == {"layer1", "layer2"}
    value = total(parts)
    torch.testing.assert_close(value, expected, **TOL)
    value.backward()
    torch.testing.assert_close(s1_o.grad, s1_td.grad, **TOL)
    torch.testing.assert_close(s2_o.grad, s2_td.grad, **TOL)

    # torchdistill's mode='paper' (Eq. 2: un-squared L2 norm per sample, summed over pairs, / batch) is different
    paper = TDATLoss(at_pairs=pairs, mode="paper")({"s1": {"output": s1}, "s2": {"output": s2}}, t_io)
    ours_paper = sum((attention_map(s) - attention_map(t)).norm(dim=1).sum() for s, t in [(s1, t1), (s2, t2)]) / 6
    torch.testing.assert_close(paper, ours_paper, **TOL)
    assert abs(float(paper) - float(expected)) > 1e-2


# ----------------------------------------------------------------------------------------------- errors and gradients
def _ctx(term: ATLoss, s_shapes: list[tuple[int, ...]], t_shapes: list[tuple[int, ...]]) -> SetupContext:
    return SetupContext(
        student=ModelOutputs(torch.zeros(2, 3), {k: torch.zeros(sh) for k, sh in zip(term.student_taps, s_shapes)}),
        teacher=ModelOutputs(torch.zeros(2, 3), {k: torch.zeros(sh) for k, sh in zip(term.teacher_taps, t_shapes)}),
        student_model=nn.Identity(),
        teacher_model=nn.Identity(),
        num_classes=3,
    )


def test_spatial_mismatch_raises_with_taps_and_shapes() -> None:
    term = ATLoss(student_layers=["layer1", "layer2"], teacher_layers=["layer1", "layer3"])
    term.setup(_ctx(term, [(2, 4, 8, 8), (2, 8, 4, 4)], [(2, 16, 8, 8), (2, 32, 4, 4)]))  # fine: channels differ
    with pytest.raises(ValueError) as err:
        term.setup(_ctx(term, [(2, 4, 8, 8), (2, 8, 4, 4)], [(2, 16, 8, 8), (2, 32, 2, 2)]))
    msg = str(err.value)
    for piece in ("layer2", "layer3", "(2, 8, 4, 4)", "(2, 32, 2, 2)", "equal resolution"):
        assert piece in msg, msg
    with pytest.raises(ValueError, match="spatial"):
        at_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2))


def test_resize_pools_the_larger_map_as_repdistiller() -> None:
    """resize=True: a 4x4 map against a 2x2 map is compared after 2x2 average pooling of the larger one, whichever
    side it is on (RepDistiller / mdistiller ``at_loss``); hand-worked for one sample."""
    big = torch.tensor([[1.0, 1, 3, 3], [1, 1, 3, 3], [0, 0, 2, 2], [0, 0, 2, 2]]).view(1, 1, 4, 4)
    small = torch.tensor([[1.0, 0], [0, 1]]).view(1, 1, 2, 2)
    # pooled big = [[1, 3], [0, 2]]; A = squares [1, 9, 0, 4] / norm sqrt(98); small: [1, 0, 0, 1] / sqrt(2)
    q_big = torch.tensor([1.0, 9, 0, 4]) / math.sqrt(98)
    q_small = torch.tensor([1.0, 0, 0, 1]) / math.sqrt(2)
    expected = (q_big - q_small).pow(2).mean()
    assert at_loss(big, small, resize=True) == pytest.approx(float(expected), rel=1e-6)
    assert at_loss(small, big, resize=True) == pytest.approx(float(expected), rel=1e-6)
    term = ATLoss(student_layers=["a"], teacher_layers=["b"], resize=True)
    term.setup(_ctx(term, [(2, 4, 8, 8)], [(2, 16, 4, 4)]))  # accepted with resize


def test_one_by_one_pair_warns_it_is_constant() -> None:
    term = ATLoss(student_layers=["layer4"], teacher_layers=["layer4"])
    with pytest.warns(UserWarning, match="1×1"):
        term.setup(_ctx(term, [(2, 512, 1, 1)], [(2, 512, 1, 1)]))
    s, t = torch.randn(2, 4, 1, 1, generator=gen(24)), torch.randn(2, 8, 1, 1, generator=gen(25))
    assert float(at_loss(s, t)) == 0.0


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="equal length"):
        ATLoss(student_layers=["layer1", "layer2"], teacher_layers=["layer1"])
    with pytest.raises(ValueError, match="p must"):
        ATLoss(p=0)
    with pytest.raises(ValueError, match="feature maps"):
        term = ATLoss(student_layers=["embedding"], teacher_layers=["embedding"])
        term.setup(_ctx(term, [(2, 8)], [(2, 8)]))


def test_gradients_reach_student_only() -> None:
    s = torch.randn(3, 4, 4, 4, generator=gen(20)).requires_grad_()
    t = torch.randn(3, 8, 4, 4, generator=gen(21))
    term = ATLoss(student_layers=["a"], teacher_layers=["b"])
    batch = layer_batch(term, [s], [t])
    total(term(batch)).backward()
    assert not t.requires_grad and t.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert total(term(batch)).dtype == torch.float32


def test_half_precision_inputs_give_float32() -> None:
    s = torch.randn(2, 4, 4, 4, generator=gen(22)).bfloat16()
    t = torch.randn(2, 4, 4, 4, generator=gen(23)).bfloat16()
    out = at_loss(s, t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, at_loss(s.float(), t.float()), **TOL)


# ----------------------------------------------------------------------------------------------- config and Lightning
def test_yaml_builds_the_term_with_its_values() -> None:
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / "at.yaml"))
    values = yaml["terms"]["at"]
    assert sorted(values) == sorted(p for p in inspect.signature(ATLoss.__init__).parameters if p != "self")
    cfg = compose(["loss=at"])
    terms = build_terms(cfg.loss.terms)
    term = terms["at"]
    assert isinstance(term, ATLoss)
    assert term.weight == values["weight"] == 1000.0 and term.p == values["p"] == 2.0
    assert [str(s) for s in term.student_taps] == values["student_layers"] == ["stage:-4", "stage:-3", "stage:-2"]
    assert [str(t) for t in term.teacher_taps] == values["teacher_layers"]
    assert isinstance(create_loss("at"), ATLoss)


def test_timm_resnet_pair_through_lightning() -> None:
    _, trainer = fit_pair("at")
    metrics = trainer.callback_metrics
    assert "train/at" in metrics
    assert math.isfinite(float(metrics["train/at"])) and float(metrics["train/at"]) > 0
    parts = [k for k in metrics if k.startswith("train/at/")]
    assert sorted(parts) == ["train/at/stage:-2", "train/at/stage:-3", "train/at/stage:-4"]
    torch.testing.assert_close(sum(metrics[k] for k in parts), metrics["train/at"], **TOL)
