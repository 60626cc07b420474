"""FitNets with layer maps (:mod:`lightning_kd.losses.fitnet`): the maps of every preset (hand-written and the
authors' tables), random-map determinism, explicit lists, hand-worked losses, resolution matching, torchdistill
``ConvReg`` parity, gradients, checkpoints, the YAML config and timm pairs through Lightning (CPU)."""

from __future__ import annotations

import inspect
import math
import random

import numpy as np
import pytest
import timm
import torch
from conftest import fast_trainer, gen, random_data
from omegaconf import OmegaConf
from torch import nn
from torchdistill.models.adaptation import ConvReg

import lightning_kd
from lightning_kd.config import CONF_DIR, compose
from lightning_kd.engine import DistillEngine, build_terms
from lightning_kd.losses import DistillBatch, ModelOutputs, SetupContext, create_loss
from lightning_kd.losses.connectors import ShapeMismatchError, common_resolution, make_connector, pool_to
from lightning_kd.losses.fitnet import (
    LAYER_MAPS,
    FitNetLoss,
    forward_layer_map,
    hint_loss,
    random_layer_map,
    resolve_layer_map,
)
from lightning_kd.taps import TapSpec

TOL = {"atol": 1e-5, "rtol": 1e-5}


# ---------------------------------------------------------------------------------------------------------- helpers
def setup_term(term: FitNetLoss, student: list[torch.Tensor], teacher: dict[str, torch.Tensor]) -> DistillBatch:
    """Build the term's connectors from ``student`` (one tensor per student tap) and ``teacher`` (tap -> tensor, any
    superset of the mapped taps) and return a batch carrying the same tensors."""
    s = dict(zip(term.student_taps, student))
    t = {TapSpec.parse(k): v for k, v in teacher.items()}
    b = len(student[0])
    term.setup(
        SetupContext(
            student=ModelOutputs(torch.zeros(b, 3), {k: v.detach() for k, v in s.items()}),
            teacher=ModelOutputs(torch.zeros(b, 3), {k: v.detach() for k, v in t.items()}),
            student_model=nn.Identity(),
            teacher_model=nn.Identity(),
            num_classes=3,
        )
    )
    return DistillBatch(ModelOutputs(torch.zeros(b, 3), s), ModelOutputs(torch.zeros(b, 3), t))


def total(value: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(value.values()) if isinstance(value, dict) else value


def _copy_conv(src: nn.Conv2d, dst: nn.Conv2d) -> None:
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if dst.bias is not None and src.bias is not None:
            dst.bias.copy_(src.bias)


S3, T4 = ["s0", "s1", "s2"], ["t0", "t1", "t2", "t3"]
S4, T2 = ["s0", "s1", "s2", "s3"], ["t0", "t1"]


# ---------------------------------------------------------------------------------------------------------- layer maps
@pytest.mark.parametrize(
    ("students", "teachers", "layer_map", "expected"),
    [
        # L_S = 3, L_T = 4: forward ceil((i+1)·4/3) − 1
        (S3, T4, "forward", [1, 2, 3]),
        (S3, T4, "reverse", [3, 2, 1]),
        (S3, T4, "all_to_one", [1, 1, 1]),
        # L_S = 4, L_T = 2: two student layers per teacher layer
        (S4, T2, "forward", [0, 0, 1, 1]),
        (S4, T2, "reverse", [1, 1, 0, 0]),
        (S4, T2, "all_to_one", [0, 0, 0, 0]),
        # equal depths: forward pairs the lists in order
        (S3, ["t0", "t1", "t2"], "forward", [0, 1, 2]),
        (S3, ["t0", "t1", "t2"], "reverse", [2, 1, 0]),
        (S3, ["t0", "t1", "t2"], "all_to_one", [1, 1, 1]),
        # one student layer: the last teacher layer
        (["s0"], T4, "forward", [3]),
        (["s0"], T4, "reverse", [3]),
    ],
)
def test_preset_maps_hand_written(students, teachers, layer_map, expected) -> None:
    term = FitNetLoss(student_layers=students, teacher_layers=teachers, layer_map=layer_map)
    assert term.mapping == expected
    assert term.layer_map_index.tolist() == expected
    assert [str(t) for t in term.pairs.teacher] == [teachers[i] for i in expected]
    assert [str(s) for s in term.student_taps] == students
    # each mapped teacher layer is tapped once, unmapped ones not at all
    assert [str(t) for t in term.teacher_taps] == [teachers[i] for i in dict.fromkeys(expected)]


def test_forward_map_equals_the_authors_tables() -> None:
    # MANGA-UOFA/Layer-Selection classification/trainer.py LAYER_MAP (12-layer BERT teacher) ...
    bert = {
        1: [11],
        2: [5, 11],
        3: [3, 7, 11],
        4: [2, 5, 8, 11],
        6: [1, 3, 5, 7, 9, 11],
        9: [1, 2, 3, 5, 6, 7, 9, 10, 11],
        12: list(range(12)),
    }
    for n, expected in bert.items():
        assert forward_layer_map(n, 12) == expected, n
    # ... and llm/sft_trainer.py LAYER_SELECTION (every 4th layer of a 28..40-layer teacher)
    llm = {28: [3, 7, 11, 15, 19, 23, 27], 36: [3, 7, 11, 15, 19, 23, 27, 31, 35]}
    for n_t, expected in llm.items():
        assert forward_layer_map(len(expected), n_t) == expected
    # all-to-one: hidden_states[6] of a 12-layer teacher (output of layer 6 = index 5); hidden_states[L/2] for LLMs
    assert resolve_layer_map("all_to_one", 3, 12) == [5, 5, 5]
    assert resolve_layer_map("all_to_one", 9, 36) == [17] * 9
    assert resolve_layer_map("all_to_one", 2, 5) == [2, 2]  # odd depth: the exact middle
    assert resolve_layer_map("reverse", 3, 12) == [11, 7, 3]


def test_random_map_is_a_seeded_permutation_of_forward() -> None:
    maps = {seed: random_layer_map(6, 12, seed) for seed in range(10)}
    for seed, m in maps.items():
        assert sorted(m) == forward_layer_map(6, 12), seed
    assert len({tuple(m) for m in maps.values()}) > 3  # the seed matters
    assert any(m != forward_layer_map(6, 12) for m in maps.values())
    # pinned: the map is drawn from Python's random() sequence, which Python keeps stable across versions, so a run
    # resumed (or another DDP rank started) anywhere gets the same pairs
    assert random_layer_map(4, 4, 1) == [3, 1, 2, 0]
    assert random_layer_map(4, 2, 1) == [1, 0, 1, 0]
    assert random_layer_map(1, 4, 7) == [3]


def test_random_map_ignores_the_global_rngs() -> None:
    def build() -> list[int]:
        return FitNetLoss(student_layers=S4, teacher_layers=T4, layer_map="random", seed=3).mapping

    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    first = build()
    torch.manual_seed(123)
    random.seed(456)
    np.random.seed(789)
    torch.rand(5)  # consume some global randomness
    random.random()
    assert build() == first == random_layer_map(4, 4, 3)
    assert FitNetLoss(student_layers=S4, teacher_layers=T4, layer_map="random", seed=4).mapping != first


def test_explicit_list_maps() -> None:
    term = FitNetLoss(student_layers=S3, teacher_layers=["t0", "t1", "t2"], layer_map=[0, 0, 2])
    assert term.mapping == [0, 0, 2]
    assert [str(t) for t in term.pairs.teacher] == ["t0", "t0", "t2"]
    assert [str(t) for t in term.teacher_taps] == ["t0", "t2"]
    # any integer type (tuples, numpy, OmegaConf lists) is accepted
    assert FitNetLoss(student_layers=S3, teacher_layers=T4, layer_map=(3, 0, 1)).mapping == [3, 0, 1]
    assert FitNetLoss(student_layers=S3, teacher_layers=T4, layer_map=np.array([2, 2, 0])).mapping == [2, 2, 0]
    assert FitNetLoss(student_layers=S3, teacher_layers=T4, layer_map=OmegaConf.create([1, 1, 1])).mapping == [1, 1, 1]
    assert "layer_map_index=[0, 0, 2]" in repr(term) and "s2->t2" in repr(term)


@pytest.mark.parametrize(
    ("layer_map", "match"),
    [
        ([0, 1], r"2 entries but there are 3 student layers"),
        ([0, 1, 2, 3], r"4 entries but there are 3 student layers"),
        ([0, 1, 4], r"entries \[4\] out of range.*0\.\.3 \(there are 4 teacher layers\)"),
        ([0, -1, 2], r"entries \[-1\] out of range.*0\.\.3"),
        ([0, 1.5, 2], r"entries \[1\.5\] out of range"),
        ([0, True, 2], r"entries \[True\] out of range"),
        ("middle", r"unknown layer_map 'middle'; use one of forward, reverse, random, all_to_one"),
        ("Forward", r"unknown layer_map"),
    ],
)
def test_bad_layer_maps_raise(layer_map, match) -> None:
    with pytest.raises(ValueError, match=match):
        FitNetLoss(student_layers=S3, teacher_layers=T4, layer_map=layer_map)


def test_other_bad_arguments_raise() -> None:
    with pytest.raises(TypeError, match="layer_map must be one of forward, reverse, random, all_to_one"):
        FitNetLoss(student_layers=S3, teacher_layers=T4, layer_map=2)
    with pytest.raises(TypeError, match="seed must be an integer"):
        FitNetLoss(student_layers=S3, teacher_layers=T4, layer_map="random", seed=1.5)
    with pytest.raises(ValueError, match="at least one tap"):
        FitNetLoss(student_layers=[], teacher_layers=T4)
    with pytest.raises(ValueError, match="at least one tap"):
        FitNetLoss(student_layers=S3, teacher_layers=[])
    with pytest.raises(ValueError, match="connector must be one of auto, conv, linear, none, got 'mlp'"):
        FitNetLoss(connector="mlp")
    assert LAYER_MAPS == ("forward", "reverse", "random", "all_to_one")


# ---------------------------------------------------------------------------------------------------------- hand-worked
def test_hand_worked_reverse_map_without_connector() -> None:
    # L_S = 2, L_T = 3: forward [ceil(1.5) − 1, ceil(3) − 1] = [1, 2], reverse [2, 1]: a -> z, b -> y
    a = [[1.0, 2.0], [3.0, 4.0]]
    b = [[0.0, -1.0], [2.0, 0.5]]
    x = [[9.0, 9.0], [9.0, 9.0]]
    y = [[1.0, 1.0], [1.0, 1.0]]
    z = [[0.0, 2.0], [4.0, 2.0]]
    term = FitNetLoss(student_layers=["a", "b"], teacher_layers=["x", "y", "z"], layer_map="reverse", connector="none")
    assert term.mapping == [2, 1]
    t = {k: torch.tensor(v) for k, v in (("x", x), ("y", y), ("z", z))}
    parts = term(setup_term(term, [torch.tensor(a), torch.tensor(b)], t))
    assert set(parts) == {"a", "b"}

    def mse(p: list[list[float]], q: list[list[float]]) -> float:
        sq = [(u - v) ** 2 for rp, rq in zip(p, q) for u, v in zip(rp, rq)]
        return sum(sq) / len(sq)

    assert mse(a, z) == pytest.approx((1 + 0 + 1 + 4) / 4) and mse(b, y) == pytest.approx((1 + 4 + 1 + 0.25) / 4)
    assert float(parts["a"]) == pytest.approx(mse(a, z), rel=1e-6)
    assert float(parts["b"]) == pytest.approx(mse(b, y), rel=1e-6)
    # the forward map pairs differently and gives another value
    fwd = FitNetLoss(student_layers=["a", "b"], teacher_layers=["x", "y", "z"], connector="none")
    parts_fwd = fwd(setup_term(fwd, [torch.tensor(a), torch.tensor(b)], t))
    assert float(parts_fwd["a"]) == pytest.approx(mse(a, y), rel=1e-6) and abs(mse(a, y) - mse(a, z)) > 0.1


def test_hand_worked_conv_connector() -> None:
    # one student channel -> two teacher channels with r(f) = (2f + 0.5, −f) on a 1×2 map
    s = torch.tensor([[[[1.0, -2.0]]]])
    t = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])
    term = FitNetLoss(student_layers="s", teacher_layers="t", connector="conv")
    batch = setup_term(term, [s], {"t": t})
    with torch.no_grad():
        term.connector.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1, 1))
        term.connector.bias.copy_(torch.tensor([0.5, 0.0]))
    # r(s) = [[2.5, −3.5], [−1, 2]] against [[2, 0], [0, 1]]
    expected = ((2.5 - 2) ** 2 + (-3.5 - 0) ** 2 + (-1 - 0) ** 2 + (2 - 1) ** 2) / 4
    value = term(batch)
    assert isinstance(value, torch.Tensor) and value.dim() == 0  # one string: a scalar, as FitNets always was
    assert float(value) == pytest.approx(expected, rel=1e-6)


def test_zero_when_the_student_reproduces_the_teacher() -> None:
    feats = [torch.randn(3, 4, 2, 2, generator=gen(i)) for i in range(3)]
    term = FitNetLoss(student_layers=S3, teacher_layers=["t0", "t1", "t2"], connector="none")
    parts = term(setup_term(term, feats, {f"t{i}": f for i, f in enumerate(feats)}))
    assert all(float(v) == 0.0 for v in parts.values())
    # all_to_one with identity 1×1 convs: zero when every student layer equals the middle teacher layer
    mid = torch.randn(3, 4, 2, 2, generator=gen(9))
    term = FitNetLoss(student_layers=S3, teacher_layers=T4, layer_map="all_to_one")
    batch = setup_term(term, [mid, mid.clone(), mid.clone()], {t: torch.randn(3, 4, 2, 2) for t in T4} | {"t1": mid})
    with torch.no_grad():
        for conv in term.connectors:
            conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
            conv.bias.zero_()
        assert float(total(term(batch))) < 1e-12
        term.connectors[2].bias.fill_(0.5)
        parts = term(batch)
    assert float(parts["s2"]) == pytest.approx(0.25, rel=1e-6) and float(parts["s0"]) < 1e-12


def test_single_string_gives_a_scalar_and_lists_a_dict() -> None:
    s, t = torch.randn(2, 5, generator=gen(1)), torch.randn(2, 5, generator=gen(2))
    single = FitNetLoss(student_layers="embedding", teacher_layers="embedding", connector="none")
    listed = FitNetLoss(student_layers=["embedding"], teacher_layers=["embedding"], connector="none")
    value = single(setup_term(single, [s], {"embedding": t}))
    parts = listed(setup_term(listed, [s], {"embedding": t}))
    assert isinstance(value, torch.Tensor) and list(parts) == ["embedding"]
    torch.testing.assert_close(value, parts["embedding"])
    # a repeated student tap gets distinct log names and its own connector
    twice = FitNetLoss(student_layers=["a", "a"], teacher_layers=["x", "y"])
    parts = twice(setup_term(twice, [s, s], {"x": t, "y": torch.randn(2, 7)}))
    assert list(parts) == ["a#0", "a#1"]
    assert twice.connectors[0].out_features == 5 and twice.connectors[1].out_features == 7


# ---------------------------------------------------------------------------------------------------------- resolution
def test_pool_to_hand_worked() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # 2×2 block means of [[0..3], [4..7], [8..11], [12..15]]
    torch.testing.assert_close(pool_to(x, (2, 2)), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    # 3 -> 2 (adaptive windows [0, 2) and [1, 3) in each dimension) on [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    y = torch.arange(9.0).view(1, 1, 3, 3)
    torch.testing.assert_close(pool_to(y, (2, 2)), torch.tensor([[[[2.0, 3.0], [5.0, 6.0]]]]))
    assert pool_to(x, (4, 4)) is x
    assert common_resolution((8, 4, 2), (3, 2, 4)) == (2, 2)
    with pytest.raises(ShapeMismatchError, match="smaller"):
        pool_to(y, (4, 4))


@pytest.mark.parametrize("student_is_larger", [True, False])
def test_resize_pools_the_larger_map(student_is_larger: bool) -> None:
    big = torch.arange(16.0).view(1, 1, 4, 4)
    small = torch.zeros(1, 1, 2, 2)
    s, t = (big, small) if student_is_larger else (small, big)
    term = FitNetLoss(student_layers="s", teacher_layers="t", connector="none", resize=True)
    value = term(setup_term(term, [s], {"t": t}))
    assert float(value) == pytest.approx((2.5**2 + 4.5**2 + 10.5**2 + 12.5**2) / 4, rel=1e-6)
    assert isinstance(term.connector, nn.AdaptiveAvgPool2d if student_is_larger else nn.Identity)


def test_resize_connector_shapes_and_commutation() -> None:
    conn = make_connector((4, 8, 8), (6, 4, 4), resize=True)
    assert isinstance(conn, nn.Sequential) and isinstance(conn[0], nn.AdaptiveAvgPool2d)
    assert isinstance(conn[1], nn.Conv2d) and (conn[1].in_channels, conn[1].out_channels) == (4, 6)
    x = torch.randn(2, 4, 8, 8, generator=gen(3))
    out = conn(x)
    assert out.shape == (2, 6, 4, 4)
    # pooling before or after a 1×1 conv is the same (both linear; the pool averages, the conv is per position)
    torch.testing.assert_close(out, pool_to(conn[1](x), (4, 4)), **TOL)
    # teacher larger: the connector keeps the student's resolution, the loss pools the teacher
    assert isinstance(make_connector((4, 2, 2), (6, 4, 4), resize=True), nn.Conv2d)
    # non-square: both sides pooled to (2, 2)
    assert make_connector((4, 4, 2), (6, 2, 4), resize=True)(torch.randn(1, 4, 4, 2)).shape == (1, 6, 2, 2)
    # unchanged without resize, and for vectors / token sequences
    with pytest.raises(ShapeMismatchError, match="spatial size.*resize=True"):
        make_connector((4, 8, 8), (6, 4, 4))
    assert isinstance(make_connector((8,), (12,), resize=True), nn.Linear)
    with pytest.raises(ShapeMismatchError, match="last dimension only"):
        make_connector((5, 8), (7, 8), resize=True)


def test_spatial_mismatch_without_resize_names_the_pair() -> None:
    term = FitNetLoss(student_layers=["layer1", "layer2"], teacher_layers=["layer1", "layer2"], layer_map="all_to_one")
    with pytest.raises(ShapeMismatchError) as info:
        setup_term(term, [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)], {"layer1": torch.randn(2, 6, 8, 8)})
    msg = str(info.value)
    for piece in ("fitnet (layer2 -> layer1)", "[8, 4, 4]", "[6, 8, 8]", "spatial size", "resize=True"):
        assert piece in msg, msg


# ---------------------------------------------------------------------------------------------------------- ported FitNet
def test_conv_connector_receives_gradients() -> None:
    s = torch.randn(4, 3, 4, 4, generator=gen(50))
    t = torch.randn(4, 6, 4, 4, generator=gen(51))
    term = FitNetLoss(student_layers="layer1", teacher_layers="layer2")  # auto -> 1×1 conv
    batch = setup_term(term, [s], {"layer2": t})
    assert isinstance(term.connector, nn.Conv2d) and term.connector.out_channels == 6
    term(batch).backward()
    assert term.connector.weight.grad is not None and term.connector.weight.grad.abs().sum() > 0


def test_linear_connector_for_vectors() -> None:
    s = torch.randn(5, 8, generator=gen(52)).requires_grad_(True)
    t = torch.randn(5, 12, generator=gen(53))
    term = FitNetLoss(student_layers="embedding", teacher_layers="embedding")
    batch = setup_term(term, [s], {"embedding": t})
    assert isinstance(term.connector, nn.Linear)
    assert (term.connector.in_features, term.connector.out_features) == (8, 12)
    value = term(batch)
    expected = ((s @ term.connector.weight.t() + term.connector.bias - t) ** 2).mean()
    torch.testing.assert_close(value, expected, **TOL)
    value.backward()
    assert term.connector.weight.grad.abs().sum() > 0 and s.grad.abs().sum() > 0


def test_no_connector_equal_shapes_is_plain_mse() -> None:
    s = torch.randn(3, 4, 2, 2, generator=gen(54))
    t = torch.randn(3, 4, 2, 2, generator=gen(55))
    term = FitNetLoss(student_layers="a", teacher_layers="b", connector="none")
    batch = setup_term(term, [s], {"b": t})
    assert not list(term.parameters())
    assert float(term(batch)) == pytest.approx(float(((s - t) ** 2).mean()), rel=1e-6)


def test_no_connector_mismatch_is_explained() -> None:
    term = FitNetLoss(student_layers="layer2", teacher_layers="layer3", connector="none")
    with pytest.raises(ShapeMismatchError) as info:
        setup_term(term, [torch.randn(2, 4, 8, 8)], {"layer3": torch.randn(2, 16, 8, 8)})
    msg = str(info.value)
    assert str([4, 8, 8]) in msg and str([16, 8, 8]) in msg and "connector" in msg
    assert isinstance(info.value, ValueError)


def test_forward_before_setup_is_an_error() -> None:
    term = FitNetLoss(student_layers="layer2", teacher_layers="layer3")
    batch = DistillBatch(
        ModelOutputs(torch.zeros(2, 3), {TapSpec.parse("layer2"): torch.randn(2, 4, 2, 2)}),
        ModelOutputs(torch.zeros(2, 3), {TapSpec.parse("layer3"): torch.randn(2, 4, 2, 2)}),
    )
    with pytest.raises(RuntimeError, match="setup"):
        term(batch)


def test_hint_loss_shape_check() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        hint_loss(torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------------------------------------------------- torchdistill
def test_convreg_matches_torchdistill() -> None:
    torch.manual_seed(0)
    s = torch.randn(6, 4, 5, 5, generator=gen(30))
    t = torch.randn(6, 8, 5, 5, generator=gen(31))
    term = FitNetLoss(student_layers="layer2", teacher_layers="layer3", connector="conv", batchnorm=True, relu=True)
    setup_term(term, [s], {"layer3": t})
    reg = ConvReg(4, 8, kernel_size=1, stride=1, padding=0, uses_relu=True)
    ours_conv, ours_bn = term.connector[0], term.connector[1]
    assert isinstance(ours_conv, nn.Conv2d) and isinstance(ours_bn, nn.BatchNorm2d)
    assert isinstance(term.connector[-1], nn.ReLU)
    with torch.no_grad():  # non-trivial BN affine parameters, copied to both
        reg.bn.weight.uniform_(0.5, 1.5)
        reg.bn.bias.uniform_(-0.5, 0.5)
        ours_bn.weight.copy_(reg.bn.weight)
        ours_bn.bias.copy_(reg.bn.bias)
    _copy_conv(reg.conv, ours_conv)
    # our conv has no bias before BatchNorm (it is cancelled by the batch mean in train mode); ConvReg's has one
    assert ours_conv.bias is None and reg.conv.bias is not None and reg.conv.bias.abs().sum() > 0
    term.train()
    reg.train()

    s_td = s.clone().requires_grad_(True)
    expected = nn.MSELoss()(reg(s_td), t)
    expected.backward()
    s_ours = s.clone().requires_grad_(True)
    value = term(setup_term(term, [s_ours], {"layer3": t}))
    value.backward()
    torch.testing.assert_close(value, expected, **TOL)
    torch.testing.assert_close(s_ours.grad, s_td.grad, **TOL)
    torch.testing.assert_close(ours_conv.weight.grad, reg.conv.weight.grad, **TOL)


def test_plain_conv_matches_bare_conv_mse() -> None:
    s = torch.randn(3, 4, 6, 6, generator=gen(32))
    t = torch.randn(3, 7, 6, 6, generator=gen(33))
    term = FitNetLoss(student_layers="layer2", teacher_layers="layer2", connector="conv")
    setup_term(term, [s], {"layer2": t})
    assert isinstance(term.connector, nn.Conv2d) and term.connector.kernel_size == (1, 1)
    ref = nn.Conv2d(4, 7, kernel_size=1)
    _copy_conv(term.connector, ref)
    assert term.connector.bias is not None

    s_ref = s.clone().requires_grad_(True)
    expected = nn.MSELoss()(ref(s_ref), t)
    expected.backward()
    s_ours = s.clone().requires_grad_(True)
    value = term(setup_term(term, [s_ours], {"layer2": t}))
    value.backward()
    torch.testing.assert_close(value, expected, **TOL)
    torch.testing.assert_close(s_ours.grad, s_ref.grad, **TOL)


def test_layer_map_pairs_match_torchdistill_convregs() -> None:
    # reverse map over two student / two teacher stages: s0 -> t1, s1 -> t0, one torchdistill ConvReg + MSE per pair
    s = [torch.randn(4, 3, 4, 4, generator=gen(40)), torch.randn(4, 5, 2, 2, generator=gen(41))]
    t = {"t0": torch.randn(4, 6, 2, 2, generator=gen(42)), "t1": torch.randn(4, 8, 4, 4, generator=gen(43))}
    term = FitNetLoss(
        student_layers=["s0", "s1"], teacher_layers=["t0", "t1"], layer_map="reverse", connector="conv", batchnorm=True
    )
    setup_term(term, s, t)
    regs = [ConvReg(3, 8, 1, 1, 0, uses_relu=False), ConvReg(5, 6, 1, 1, 0, uses_relu=False)]
    for reg, ours in zip(regs, term.connectors):
        _copy_conv(reg.conv, ours[0])
    s_td = [x.clone().requires_grad_(True) for x in s]
    expected = nn.MSELoss()(regs[0](s_td[0]), t["t1"]) + nn.MSELoss()(regs[1](s_td[1]), t["t0"])
    expected.backward()
    s_ours = [x.clone().requires_grad_(True) for x in s]
    parts = term(setup_term(term, s_ours, t))
    torch.testing.assert_close(total(parts), expected, **TOL)
    total(parts).backward()
    for a, b in zip(s_ours, s_td):
        torch.testing.assert_close(a.grad, b.grad, **TOL)


# ---------------------------------------------------------------------------------------------------------- gradients
def test_gradients_reach_every_connector_and_student_never_the_teacher() -> None:
    s = [torch.randn(3, c, 4, 4, generator=gen(60 + c)).requires_grad_(True) for c in (2, 3, 4)]
    t = {name: torch.randn(3, 5 + i, 4, 4, generator=gen(70 + i)).requires_grad_(True) for i, name in enumerate(T4)}
    term = FitNetLoss(student_layers=S3, teacher_layers=T4)  # forward: s0 -> t1, s1 -> t2, s2 -> t3
    batch = setup_term(term, s, t)
    assert [(c.in_channels, c.out_channels) for c in term.connectors] == [(2, 6), (3, 7), (4, 8)]
    parts = term(batch)
    assert list(parts) == S3 and all(v.dtype == torch.float32 for v in parts.values())
    total(parts).backward()
    for conv in term.connectors:
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in t.values())
    # inside an engine every connector is among the optimised parameters
    engine = DistillEngine(loss={"hint": term}, teacher=nn.Linear(2, 2))
    engine_params = {id(p) for p in engine.parameters()}
    assert all(id(p) in engine_params for c in term.connectors for p in c.parameters())


def test_bfloat16_inputs_give_float32() -> None:
    s = torch.randn(4, 6, generator=gen(80)).bfloat16()
    t = torch.randn(4, 6, generator=gen(81)).bfloat16()
    term = FitNetLoss(student_layers="a", teacher_layers="b", connector="none")
    value = term(setup_term(term, [s], {"b": t}))
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, ((s.float() - t.float()) ** 2).mean(), **TOL)
    # a conv connector under bf16 autocast (the Lightning bf16-mixed path)
    maps_s, maps_t = torch.randn(2, 3, 4, 4, generator=gen(82)), torch.randn(2, 5, 4, 4, generator=gen(83))
    conv = FitNetLoss(student_layers="a", teacher_layers="b")
    batch = setup_term(conv, [maps_s], {"b": maps_t})
    ref = conv(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = conv(batch)
    assert low.dtype == torch.float32 and ref.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=3e-2, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------- checkpoints
def _multi_term(**kwargs) -> tuple[FitNetLoss, DistillBatch]:
    s = [torch.randn(4, 3, 4, 4, generator=gen(90)), torch.randn(4, 5, 2, 2, generator=gen(91))]
    t = {"t0": torch.randn(4, 6, 4, 4, generator=gen(92)), "t1": torch.randn(4, 7, 2, 2, generator=gen(93))}
    args = {"student_layers": ["s0", "s1"], "teacher_layers": ["t0", "t1"], "batchnorm": True, "resize": True}
    term = FitNetLoss(**(args | kwargs))
    return term, setup_term(term, s, t)


def test_state_dict_round_trip() -> None:
    term, batch = _multi_term(layer_map="random", seed=1)
    assert term.mapping == [1, 0]
    # pair 0 (s0 4×4 -> t1 2×2): pool, conv, BN; pair 1 (s1 2×2 -> t0 4×4, the teacher is pooled): conv, BN
    assert [type(m).__name__ for m in term.connectors[0]] == ["AdaptiveAvgPool2d", "Conv2d", "BatchNorm2d"]
    assert [type(m).__name__ for m in term.connectors[1]] == ["Conv2d", "BatchNorm2d"]
    with torch.no_grad():
        for c in term.connectors:
            c[-2].weight.normal_()  # trained-looking weights
    term.eval()
    state = term.state_dict()
    assert {"layer_map_index", "connector.1.weight", "connector.2.running_mean", "connector_1.0.weight"} <= set(state)
    assert state["layer_map_index"].tolist() == [1, 0]
    fresh, _ = _multi_term(layer_map="random", seed=1)
    fresh.eval()
    assert not torch.equal(fresh.connectors[0][1].weight, term.connectors[0][1].weight)
    assert float(total(fresh(batch))) != pytest.approx(float(total(term(batch))))
    fresh.load_state_dict(state)
    torch.testing.assert_close(total(fresh(batch)), total(term(batch)))
    # a state from before layer maps (no layer_map_index) still loads; the map is re-derived from the config
    legacy = {k: v for k, v in state.items() if k != "layer_map_index"}
    again, _ = _multi_term(layer_map="random", seed=1)
    again.load_state_dict(legacy)
    assert again.layer_map_index.tolist() == [1, 0]


def test_resuming_under_another_map_is_refused() -> None:
    term, _ = _multi_term(layer_map="random", seed=1)  # [1, 0]
    other, _ = _multi_term(layer_map="forward")  # [0, 1]
    with pytest.raises(RuntimeError, match=r"layer map \[1, 0\].*teacher indices \[0, 1\].*layer_map='forward'"):
        other.load_state_dict(term.state_dict())


def test_engine_logs_one_part_per_pair() -> None:
    term, batch = _multi_term()
    engine = DistillEngine(loss={"fitnet": term}, teacher=nn.Linear(2, 2))
    value, logs = engine(batch)
    assert set(logs) == {"train/fitnet", "train/fitnet/s0", "train/fitnet/s1", "train/agreement"}
    torch.testing.assert_close(logs["train/fitnet"], logs["train/fitnet/s0"] + logs["train/fitnet/s1"])
    torch.testing.assert_close(value.detach(), 100.0 * logs["train/fitnet"])


# ---------------------------------------------------------------------------------------------------------- config
def test_yaml_builds_the_term_with_its_values() -> None:
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / "fitnet.yaml"))
    values = yaml["terms"]["fitnet"]
    assert sorted(values) == sorted(p for p in inspect.signature(FitNetLoss.__init__).parameters if p != "self")
    defaults = {k: p.default for k, p in inspect.signature(FitNetLoss.__init__).parameters.items() if k != "self"}
    assert values == defaults
    term = build_terms(compose(["loss=fitnet"]).loss.terms)["fitnet"]
    assert isinstance(term, FitNetLoss) and term.single
    assert term.weight == values["weight"] == 100.0 and term.layer_map == values["layer_map"] == "forward"
    assert [str(s) for s in term.student_taps] == [values["student_layers"]] == ["stage:-2"]
    assert [str(t) for t in term.teacher_taps] == [values["teacher_layers"]] == ["stage:-2"]
    assert (term.connector_kind, term.batchnorm, term.relu, term.resize, term.seed) == ("auto", False, False, False, 0)
    assert isinstance(create_loss("fitnet"), FitNetLoss)
    # an explicit map from the command line
    cfg = compose(
        [
            "loss=fitnet",
            "loss.terms.fitnet.student_layers=[layer1,layer2,layer3]",
            "loss.terms.fitnet.teacher_layers=[layer1,layer2,layer3]",
            "loss.terms.fitnet.layer_map=[0,0,2]",
        ]
    )
    term = build_terms(cfg.loss.terms)["fitnet"]
    assert term.mapping == [0, 0, 2] and not term.single
    assert [str(t) for t in term.pairs.teacher] == ["layer1", "layer1", "layer3"]


# ---------------------------------------------------------------------------------------------------------- Lightning
def test_timm_resnets_all_to_one_over_four_stages_through_lightning() -> None:
    torch.manual_seed(0)
    student = timm.create_model("resnet18", num_classes=10)
    teacher = timm.create_model("resnet34", num_classes=10)
    stages = ["stage:-4", "stage:-3", "stage:-2", "stage:-1"]
    loss = {"fitnet": {"student_layers": stages, "teacher_layers": stages, "layer_map": "all_to_one", "resize": True}}
    module = lightning_kd.DistillationModule(student, teacher, loss=loss)
    data = random_data(n=8, size=32)
    trainer = fast_trainer(max_steps=1)
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/fitnet"])) and float(metrics["train/fitnet"]) > 0
    parts = sorted(k for k in metrics if k.startswith("train/fitnet/"))
    assert parts == [f"train/fitnet/{s}" for s in sorted(stages)]
    torch.testing.assert_close(sum(metrics[k] for k in parts), metrics["train/fitnet"], **TOL)

    term = module.engine.terms["fitnet"]
    assert term.mapping == [1, 1, 1, 1] and [str(t) for t in term.teacher_taps] == ["stage:-3"]  # layer2, 128 ch
    # 32×32 input: student stages 64@8×8, 128@4×4, 256@2×2, 512@1×1, all matched to the teacher's 128@4×4
    convs = [c[-1] if isinstance(c, nn.Sequential) else c for c in term.connectors]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(64, 128), (128, 128), (256, 128), (512, 128)]
    assert isinstance(term.connectors[0][0], nn.AdaptiveAvgPool2d)  # 8×8 student pooled to 4×4
    assert all(isinstance(c, nn.Conv2d) for c in term.connectors[1:])  # teacher pooled by the loss
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) in opt_params for c in term.connectors for p in c.parameters())

    # the trained connectors and the map round-trip through a fresh module's state_dict
    fresh = lightning_kd.DistillationModule(timm.create_model("resnet18", num_classes=10), teacher, loss=loss)
    fresh.engine.setup(fresh.model, torch.randn(2, 3, 32, 32), fresh.model)
    fresh.engine.detach()
    restored = fresh.engine.terms["fitnet"]
    assert not torch.equal(restored.connectors[1].weight, term.connectors[1].weight)
    fresh.load_state_dict(module.state_dict())
    for ours, theirs in zip(term.connectors, restored.connectors):
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    assert restored.layer_map_index.tolist() == [1, 1, 1, 1]
