"""SKT (:mod:`lightning_kd.losses.skt`): hand-worked cosine and FSP values, the authors' code re-typed (batch 1),
invariances, torchdistill FSP parity (and its different reduction), errors, gradients, dtype, state_dict round trip,
the YAML and a timm pair through Lightning (CPU)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import fit_pair, gen, layer_batch, total
from omegaconf import OmegaConf
from torch import nn
from torchdistill.losses.mid_level import FSPLoss as TDFSPLoss

from lightning_kd.config import CONF_DIR, compose
from lightning_kd.engine import build_terms
from lightning_kd.losses import ModelOutputs, SetupContext, create_loss
from lightning_kd.losses.connectors import ShapeMismatchError
from lightning_kd.losses.skt import (
    SKTLoss,
    fsp_matrix,
    instance_normalize,
    inter_layer_loss,
    intra_layer_loss,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}
EPS = 1e-5  # InstanceNorm2d's


def _ctx(term: SKTLoss, s_shapes: list[tuple[int, ...]], t_shapes: list[tuple[int, ...]]) -> SetupContext:
    return SetupContext(
        student=ModelOutputs(torch.zeros(2, 3), {k: torch.zeros(sh) for k, sh in zip(term.student_taps, s_shapes)}),
        teacher=ModelOutputs(torch.zeros(2, 3), {k: torch.zeros(sh) for k, sh in zip(term.teacher_taps, t_shapes)}),
        student_model=nn.Identity(),
        teacher_model=nn.Identity(),
        num_classes=3,
    )


def _identity_term(maps: list[torch.Tensor], **kwargs) -> SKTLoss:
    """A term without connectors (student maps already have the teacher's shapes)."""
    names = [f"layer{i + 1}" for i in range(len(maps))]
    term = SKTLoss(student_layers=names, teacher_layers=names, connector="none", **kwargs)
    shapes = [tuple(m.shape) for m in maps]
    term.setup(_ctx(term, shapes, shapes))
    return term


# --------------------------------------------------------------------------------------------------- hand-worked
def test_hand_worked_cosine_part() -> None:
    # 2 channels, 1x2 positions: position 0 s = (1, 0), t = (1, 1) -> cos = 1/sqrt 2; position 1 s = (0, 2),
    # t = (0, 3) -> cos = 1
    s = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])
    t = torch.tensor([[[[1.0, 0.0]], [[1.0, 3.0]]]])
    d0 = 1 - 1 / math.sqrt(2)
    assert float(intra_layer_loss(s, t, "sum")) == pytest.approx(d0, rel=1e-6)
    assert float(intra_layer_loss(s, t, "mean")) == pytest.approx(d0 / 2, rel=1e-6)
    # batch of two (second sample: identical maps, loss 0): the batch is averaged
    s2, t2 = torch.cat([s, t]), torch.cat([t, t])
    assert float(intra_layer_loss(s2, t2, "sum")) == pytest.approx(d0 / 2, rel=1e-6)


def _hand_maps() -> tuple[torch.Tensor, torch.Tensor]:
    a = [[1.0, 0.0], [0.0, 1.0]]
    b = [[2.0, 2.0], [0.0, 0.0]]
    c = [[1.0, 2.0], [3.0, 4.0]]
    return torch.tensor([[a, b]]), torch.tensor([[c]])  # [1, 2, 2, 2] and [1, 1, 2, 2]


def test_hand_worked_fsp_matrices() -> None:
    f1, f2 = _hand_maps()
    # plain: G = [sum(a*c)/4, sum(b*c)/4] = [(1 + 4)/4, (2 + 4)/4]
    torch.testing.assert_close(fsp_matrix(f1, f2, instance_norm=False), torch.tensor([[[1.25], [1.5]]]))
    # instance-normalised: a -> ±0.5/sqrt(0.25 + eps) (checkerboard), b -> ±1/sqrt(1 + eps) (rows),
    # c -> (c - 2.5)/sqrt(1.25 + eps); a is uncorrelated with c, b anti-correlated: -1/(sqrt(1 + eps) sqrt(1.25 + eps))
    g_b = -1 / (math.sqrt(1 + EPS) * math.sqrt(1.25 + EPS))
    assert g_b == pytest.approx(-2 / math.sqrt(5), abs=1e-4)
    torch.testing.assert_close(fsp_matrix(f1, f2), torch.tensor([[[0.0], [g_b]]]), **TOL)
    # the same G with the 2x2 map f2 against a 4x4 map that max-pools to f1
    f1_big = f1.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    f1_big[..., 0, 0] -= 5.0  # not the max of its 2x2 window: pooling ignores it
    torch.testing.assert_close(fsp_matrix(f1_big, f2), fsp_matrix(f1, f2))


def test_hand_worked_inter_part_and_term() -> None:
    f1, f2 = _hand_maps()
    g_b = -1 / (math.sqrt(1 + EPS) * math.sqrt(1.25 + EPS))
    swapped = f1.flip(1)  # student's layer 1 has the channels in the other order: G_S = [g_b, 0], G_T = [0, g_b]
    assert float(inter_layer_loss([swapped, f2], [f1, f2], reduction="sum")) == pytest.approx(2 * g_b**2, rel=1e-5)
    assert float(inter_layer_loss([swapped, f2], [f1, f2], reduction="mean")) == pytest.approx(g_b**2, rel=1e-5)
    term = _identity_term([f1, f2], reduction="sum")
    parts = term(layer_batch(term, [swapped, f2], [f1, f2]))
    assert set(parts) == {"intra/layer1", "intra/layer2", "inter"}
    assert float(parts["inter"]) == pytest.approx(0.5 * 2 * g_b**2, rel=1e-5)
    assert float(parts["intra/layer2"]) == pytest.approx(0.0, abs=1e-6)
    # layer 1: at each position s = (b, a) and t = (a, b), cos = 2ab / (a² + b²) (0 for two zero vectors):
    # (a, b) = (1, 2), (0, 2), (0, 0), (1, 0) -> cos = 4/5, 0, 0, 0 -> sum of 1 - cos = 3.2
    assert float(parts["intra/layer1"]) == pytest.approx(0.5 * 3.2, rel=1e-5)


def test_instance_normalize_is_instancenorm2d_and_handles_one_by_one() -> None:
    f = torch.randn(3, 4, 5, 6, generator=gen(1)) * 3 + 1
    torch.testing.assert_close(instance_normalize(f), nn.InstanceNorm2d(4)(f), **TOL)
    assert torch.equal(instance_normalize(torch.randn(2, 3, 1, 1)), torch.zeros(2, 3, 1, 1))


# ------------------------------------------------------------------------------------ the authors' code, re-typed
def _authors_skt(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """HCPLab-SYSU/SKT models/distillation.py + SKT_distill.py (batch size 1), re-typed: max-pool every map to the
    smallest resolution (kernel = stride = ratio, ceil_mode), InstanceNorm2d, gram of sample 0 / (h w), MSE sum per
    pair; cosine loss summed; both weighted 0.5."""

    def dense_fsp(feats: list[torch.Tensor]) -> list[torch.Tensor]:
        h_min = min(f.shape[2] for f in feats)
        pooled = []
        for f in feats:
            r = f.shape[2] // h_min
            pooled.append(nn.MaxPool2d(kernel_size=r, stride=r, ceil_mode=True)(f) if r > 1 else f)
        out = []
        for i in range(len(pooled)):
            for j in range(i + 1, len(pooled)):
                x = nn.InstanceNorm2d(pooled[i].shape[1])(pooled[i])
                y = nn.InstanceNorm2d(pooled[j].shape[1])(pooled[j])
                n, c1, c2 = x.shape[0], x.shape[1], y.shape[1]
                hw = x.shape[2] * x.shape[3]
                out.append(torch.mm(x.view(n, c1, -1)[0], y.view(n, c2, -1)[0].transpose(0, 1)) / hw)
        return out

    mse = nn.MSELoss(reduction="sum")
    fsp = sum(mse(t, s) for t, s in zip(dense_fsp(teacher), dense_fsp(student)))
    cos = sum((1 - F.cosine_similarity(s, t, dim=1)).sum() for s, t in zip(student, teacher))
    return 0.5 * fsp + 0.5 * cos


def test_matches_the_authors_code_at_batch_size_one() -> None:
    shapes = [(1, 4, 8, 8), (1, 6, 4, 4), (1, 8, 2, 2)]
    t = [torch.relu(torch.randn(*sh, generator=gen(10 + i))) for i, sh in enumerate(shapes)]
    s0 = [torch.relu(torch.randn(*sh, generator=gen(20 + i))) for i, sh in enumerate(shapes)]
    s_ref = [x.clone().requires_grad_() for x in s0]
    expected = _authors_skt(s_ref, t)
    expected.backward()
    s_ours = [x.clone().requires_grad_() for x in s0]
    term = _identity_term(t, reduction="sum")
    got = total(term(layer_batch(term, s_ours, t)))
    got.backward()
    torch.testing.assert_close(got, expected, **TOL)
    for a, b in zip(s_ours, s_ref):
        torch.testing.assert_close(a.grad, b.grad, **TOL)
    # and the 'mean' default divides each pair / layer by its number of entries / positions
    mean_term = _identity_term(t)
    parts = mean_term(layer_batch(mean_term, s0, t))
    for i in range(3):
        ref = 0.5 * (1 - F.cosine_similarity(s0[i], t[i], dim=1)).mean()
        torch.testing.assert_close(parts[f"intra/layer{i + 1}"], ref, **TOL)


# --------------------------------------------------------------------------------------------------- properties
def test_zero_when_the_student_equals_the_teacher() -> None:
    # (no all-zero channel vector: cos(0, 0) = 0, so a zero position costs 1 even when both sides agree)
    maps = [torch.randn(3, c, h, h, generator=gen(30 + c)) for c, h in [(4, 8), (6, 4), (8, 2)]]
    term = _identity_term(maps)
    parts = term(layer_batch(term, maps, maps))
    assert all(abs(float(v)) < 1e-6 for v in parts.values())
    assert float(total(term(layer_batch(term, [m.flip(1) for m in maps], maps)))) > 1e-2


def test_invariances() -> None:
    f1 = torch.randn(2, 3, 4, 4, generator=gen(40))
    f2 = torch.randn(2, 5, 4, 4, generator=gen(41))
    g1, g2 = torch.randn(2, 3, 4, 4, generator=gen(42)), torch.randn(2, 5, 4, 4, generator=gen(43))
    # cosine: invariant to a positive rescaling of each position's channel vector
    scale = torch.rand(2, 1, 4, 4, generator=gen(44)) + 0.1
    torch.testing.assert_close(intra_layer_loss(f1 * scale, g1), intra_layer_loss(f1, g1), **TOL)
    # FSP after instance normalisation: invariant to a positive affine map of each channel
    a = torch.rand(1, 3, 1, 1, generator=gen(45)) * 3 + 0.5
    shift = torch.randn(1, 3, 1, 1, generator=gen(46)) * 4
    ref = inter_layer_loss([f1, f2], [g1, g2])
    assert float(ref) > 1e-3
    torch.testing.assert_close(inter_layer_loss([a * f1 + shift, f2], [g1, g2]), ref, atol=1e-4, rtol=1e-4)
    # ... which the plain FSP matrix is not
    plain = inter_layer_loss([f1, f2], [g1, g2], instance_norm=False)
    assert abs(float(inter_layer_loss([a * f1 + shift, f2], [g1, g2], instance_norm=False)) - float(plain)) > 1e-2


def test_all_maps_are_pooled_to_the_smallest_size_of_the_set() -> None:
    # the pair (8x8, 4x4) is compared at 2x2 because a third map is 2x2 (the authors' scale_process)
    f = [torch.randn(2, 3, h, h, generator=gen(50 + h)) for h in (8, 4, 2)]
    g = [torch.randn(2, 3, h, h, generator=gen(60 + h)) for h in (8, 4, 2)]
    at2 = [F.adaptive_max_pool2d(x, 2) for x in f], [F.adaptive_max_pool2d(x, 2) for x in g]
    by_hand = sum(
        (fsp_matrix(at2[0][i], at2[0][j]) - fsp_matrix(at2[1][i], at2[1][j])).pow(2).flatten(1).mean(1).mean()
        for i, j in [(0, 1), (0, 2), (1, 2)]
    )
    torch.testing.assert_close(inter_layer_loss(f, g), by_hand, **TOL)
    pairwise = (fsp_matrix(f[0], f[1]) - fsp_matrix(g[0], g[1])).pow(2).mean()  # torchdistill-style pooling
    assert abs(float(pairwise) - float(inter_layer_loss(f[:2], g[:2]))) < 1e-6  # the same for two layers ...
    own = (fsp_matrix(at2[0][0], at2[0][1]) - fsp_matrix(at2[1][0], at2[1][1])).pow(2).mean()
    assert abs(float(pairwise) - float(own)) > 1e-3  # ... but not inside a set that holds a smaller map


# ----------------------------------------------------------------------------------------------- torchdistill
@pytest.mark.parametrize("sizes", [(8, 4), (4, 8), (4, 4), (6, 3)])
def test_fsp_matrix_matches_torchdistill(sizes: tuple[int, int]) -> None:
    f1 = torch.randn(3, 4, sizes[0], sizes[0], generator=gen(70))
    f2 = torch.randn(3, 6, sizes[1], sizes[1], generator=gen(71))
    torch.testing.assert_close(fsp_matrix(f1, f2, instance_norm=False), TDFSPLoss.compute_fsp_matrix(f1, f2), **TOL)


def test_torchdistill_fsp_loss_reduction_differs_from_yim_and_skt() -> None:
    s1, s2 = torch.randn(4, 3, 8, 8, generator=gen(72)), torch.randn(4, 5, 4, 4, generator=gen(73))
    t1, t2 = torch.randn(4, 3, 8, 8, generator=gen(74)), torch.randn(4, 5, 4, 4, generator=gen(75))
    pair = {
        "p": {
            "student_first": {"io": "output", "path": "s1"},
            "student_second": {"io": "output", "path": "s2"},
            "teacher_first": {"io": "output", "path": "t1"},
            "teacher_second": {"io": "output", "path": "t2"},
            "weight": 1,
        }
    }
    td = TDFSPLoss(pair)({"s1": {"output": s1}, "s2": {"output": s2}}, {"t1": {"output": t1}, "t2": {"output": t2}})
    diff = fsp_matrix(s1, s2, False) - fsp_matrix(t1, t2, False)  # [B, 3, 5]
    # torchdistill: un-squared L2 norms over the first index, summed, / batch
    torch.testing.assert_close(td, diff.norm(dim=1).sum() / 4, **TOL)
    # Yim et al. (and SKT): squared Frobenius norm, batch mean = ours with instance_norm=False, reduction='sum'
    ours = inter_layer_loss([s1, s2], [t1, t2], instance_norm=False, reduction="sum")
    torch.testing.assert_close(ours, diff.pow(2).sum() / 4, **TOL)
    assert abs(float(ours) - float(td)) > 1e-2


# ----------------------------------------------------------------------------------------------- errors and gradients
def test_errors_name_the_taps_and_shapes() -> None:
    term = SKTLoss(student_layers=["layer1", "layer2"], teacher_layers=["layer1", "layer3"])
    with pytest.raises(ValueError) as err:
        term.setup(_ctx(term, [(2, 4, 8, 8), (2, 8, 4, 4)], [(2, 16, 8, 8), (2, 32, 2, 2)]))
    for piece in ("skt", "layer2", "layer3", "(2, 8, 4, 4)", "(2, 32, 2, 2)", "equal resolution"):
        assert piece in str(err.value), str(err.value)
    emb = SKTLoss(student_layers=["embedding", "layer1"], teacher_layers=["embedding", "layer1"])
    with pytest.raises(ValueError, match=r"'embedding' \(2, 8\).*feature maps"):
        emb.setup(_ctx(emb, [(2, 8), (2, 4, 4, 4)], [(2, 8), (2, 4, 4, 4)]))
    with pytest.raises(ValueError, match="at least 2 layers"):
        SKTLoss(student_layers=["layer1"], teacher_layers=["layer1"])
    SKTLoss(student_layers=["layer1"], teacher_layers=["layer1"], inter_weight=0)  # fine without the FSP part
    with pytest.raises(ValueError, match="both 0"):
        SKTLoss(intra_weight=0, inter_weight=0)
    with pytest.raises(ValueError, match="intra_weight must be"):
        SKTLoss(intra_weight=-1)
    with pytest.raises(ValueError, match="reduction must be"):
        SKTLoss(reduction="batchmean")
    with pytest.raises(ValueError, match="connector must be"):
        SKTLoss(connector="linear")
    with pytest.raises(ValueError, match="equal length"):
        SKTLoss(student_layers=["layer1", "layer2"], teacher_layers=["layer1"])
    none = SKTLoss(student_layers=["a", "b"], teacher_layers=["a", "b"], connector="none")
    with pytest.raises(ShapeMismatchError, match=r"\[4, 8, 8\].*\[16, 8, 8\]"):
        none.setup(_ctx(none, [(2, 4, 8, 8), (2, 4, 4, 4)], [(2, 16, 8, 8), (2, 4, 4, 4)]))
    with pytest.raises(RuntimeError, match="setup"):
        SKTLoss()(layer_batch(SKTLoss(), [torch.zeros(1, 1, 1, 1)] * 3, [torch.zeros(1, 1, 1, 1)] * 3))


def test_one_by_one_fsp_resolution_warns() -> None:
    term = SKTLoss()
    with pytest.warns(UserWarning, match="1×1"):
        term.setup(
            _ctx(term, [(2, 64, 4, 4), (2, 128, 2, 2), (2, 256, 1, 1)], [(2, 64, 4, 4), (2, 128, 2, 2), (2, 256, 1, 1)])
        )
    parts = term(
        layer_batch(
            term,
            [torch.randn(2, 64, 4, 4), torch.randn(2, 128, 2, 2), torch.randn(2, 256, 1, 1)],
            [torch.rand(2, 64, 4, 4), torch.rand(2, 128, 2, 2), torch.rand(2, 256, 1, 1)],
        )
    )
    assert float(parts["inter"]) == 0.0 and float(parts["intra/stage:-4"]) > 0


def test_gradients_reach_the_student_and_the_connectors_never_the_teacher() -> None:
    term = SKTLoss(student_layers=["a", "b"], teacher_layers=["a", "b"])
    term.setup(_ctx(term, [(2, 3, 8, 8), (2, 5, 4, 4)], [(2, 6, 8, 8), (2, 10, 4, 4)]))
    conv = term.connectors[0][0]
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is not None
    assert isinstance(term.connectors[0][1], nn.ReLU)
    s = [
        torch.randn(2, 3, 8, 8, generator=gen(80), requires_grad=True),
        torch.randn(2, 5, 4, 4, generator=gen(81), requires_grad=True),
    ]
    t = [
        torch.rand(2, 6, 8, 8, generator=gen(82), requires_grad=True),
        torch.rand(2, 10, 4, 4, generator=gen(83), requires_grad=True),
    ]
    parts = term(layer_batch(term, s, t))
    assert set(parts) == {"intra/a", "intra/b", "inter"} and all(v.dtype == torch.float32 for v in parts.values())
    total(parts).backward()
    for x in s:
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for p in term.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert term.connectors[1][0].weight.grad.abs().sum() > 0
    assert all(x.grad is None for x in t)
    # an all-zero student position (dead ReLU) keeps the gradient finite
    z = torch.zeros(2, 6, 8, 8, requires_grad=True)
    intra_layer_loss(z, t[0].detach()).backward()
    assert torch.isfinite(z.grad).all()


def test_bf16_inputs_give_float32() -> None:
    s = [torch.randn(2, 4, 4, 4, generator=gen(90)).bfloat16(), torch.randn(2, 6, 2, 2, generator=gen(91)).bfloat16()]
    t = [torch.randn(2, 4, 4, 4, generator=gen(92)).bfloat16(), torch.randn(2, 6, 2, 2, generator=gen(93)).bfloat16()]
    term = _identity_term(t)
    out = total(term(layer_batch(term, s, t)))
    assert out.dtype == torch.float32
    ref = total(term(layer_batch(term, [x.float() for x in s], [x.float() for x in t])))
    torch.testing.assert_close(out, ref, **TOL)


def test_state_dict_round_trip() -> None:
    shapes_s, shapes_t = [(2, 3, 8, 8), (2, 5, 4, 4)], [(2, 6, 8, 8), (2, 10, 4, 4)]
    term = SKTLoss(student_layers=["a", "b"], teacher_layers=["a", "b"])
    term.setup(_ctx(term, shapes_s, shapes_t))
    state = term.state_dict()
    assert sorted(state) == [
        "connectors.0.0.bias",
        "connectors.0.0.weight",
        "connectors.1.0.bias",
        "connectors.1.0.weight",
    ]
    torch.manual_seed(123)
    fresh = SKTLoss(student_layers=["a", "b"], teacher_layers=["a", "b"])
    fresh.setup(_ctx(fresh, shapes_s, shapes_t))
    s = [torch.randn(*sh, generator=gen(100 + i)) for i, sh in enumerate(shapes_s)]
    t = [torch.rand(*sh, generator=gen(110 + i)) for i, sh in enumerate(shapes_t)]
    before = total(fresh(layer_batch(fresh, s, t)))
    fresh.load_state_dict(state)
    after = total(fresh(layer_batch(fresh, s, t)))
    torch.testing.assert_close(after, total(term(layer_batch(term, s, t))))
    assert abs(float(before) - float(after)) > 1e-6


# ----------------------------------------------------------------------------------------------- config and Lightning
def test_yaml_builds_the_term_with_its_values() -> None:
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / "skt.yaml"))
    values = yaml["terms"]["skt"]
    assert sorted(values) == sorted(p for p in inspect.signature(SKTLoss.__init__).parameters if p != "self")
    term = build_terms(compose(["loss=skt"]).loss.terms)["skt"]
    assert isinstance(term, SKTLoss)
    assert term.weight == values["weight"] == 1.0
    assert term.intra_weight == values["intra_weight"] == 0.5 and term.inter_weight == values["inter_weight"] == 0.5
    assert term.instance_norm is values["instance_norm"] is True
    assert term.reduction == values["reduction"] == "mean"
    assert term.connector_kind == values["connector"] == "auto" and term.relu is values["relu"] is True
    assert [str(s) for s in term.student_taps] == values["student_layers"] == ["stage:-4", "stage:-3", "stage:-2"]
    assert [str(t) for t in term.teacher_taps] == values["teacher_layers"]
    assert isinstance(create_loss("skt"), SKTLoss)


def test_timm_resnet_pair_through_lightning() -> None:
    module, trainer = fit_pair("skt")
    metrics = trainer.callback_metrics
    assert "train/skt" in metrics and math.isfinite(float(metrics["train/skt"])) and float(metrics["train/skt"]) > 0
    parts = sorted(k for k in metrics if k.startswith("train/skt/"))
    assert parts == [
        "train/skt/inter",
        "train/skt/intra/stage:-2",
        "train/skt/intra/stage:-3",
        "train/skt/intra/stage:-4",
    ]
    assert float(metrics["train/skt/inter"]) > 0  # 2x2 FSP resolution at 32x32 input
    torch.testing.assert_close(sum(metrics[k] for k in parts), metrics["train/skt"], **TOL)
    assert any(k.startswith("engine.terms.skt.connectors.") for k in module.state_dict())
