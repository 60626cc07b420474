"""Tests of the distillation loss terms (:mod:`lightning_kd.losses`) and of the engine's weighted sum (CPU).

Reference values come from hand computations (``math`` only), from independent float64 formulas, and from
torchdistill's implementations of the same losses (KD, RKD); FitNets is tested in ``test_fitnet.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torchdistill.losses.mid_level import KDLoss as TDKDLoss
from torchdistill.losses.mid_level import RKDLoss as TDRKDLoss

from lightning_kd.engine import DistillEngine, NonFiniteLossError, build_terms
from lightning_kd.losses import (
    DistillBatch,
    LossTerm,
    ModelOutputs,
    SetupContext,
    create_loss,
    get_loss_class,
    registered_losses,
)
from lightning_kd.losses.fitnet import FitNetLoss
from lightning_kd.losses.kd import KDLoss, kd_loss
from lightning_kd.losses.rkd import RKDLoss, rkd_angle_loss, rkd_distance_loss
from lightning_kd.taps import TapSpec

TOL = {"atol": 1e-5, "rtol": 1e-5}


# ---------------------------------------------------------------------------------------------------------- helpers
def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch_of(
    s_logits: torch.Tensor,
    t_logits: torch.Tensor,
    s_feats: dict[TapSpec, torch.Tensor] | None = None,
    t_feats: dict[TapSpec, torch.Tensor] | None = None,
    *,
    targets: torch.Tensor | None = None,
    step: int = 0,
    epoch: int = 0,
) -> DistillBatch:
    return DistillBatch(
        ModelOutputs(s_logits, dict(s_feats or {})),
        ModelOutputs(t_logits, dict(t_feats or {})),
        targets=targets,
        step=step,
        epoch=epoch,
    )


def feature_batch(term: LossTerm, s: torch.Tensor, t: torch.Tensor, num_classes: int = 3) -> DistillBatch:
    """A DistillBatch carrying ``s``/``t`` under the term's own taps (logits are unused dummies)."""
    b = len(s)
    return batch_of(
        torch.zeros(b, num_classes),
        torch.zeros(b, num_classes),
        {term.student_tap: s},
        {term.teacher_tap: t},
    )


def setup_fitnet(term: FitNetLoss, s: torch.Tensor, t: torch.Tensor) -> FitNetLoss:
    """Build the term's connector from probe tensors shaped like ``s`` and ``t``."""
    b = len(s)
    ctx = SetupContext(
        student=ModelOutputs(torch.zeros(b, 3), {term.student_taps[0]: s.detach()}),
        teacher=ModelOutputs(torch.zeros(b, 3), {term.teacher_taps[0]: t.detach()}),
        student_model=nn.Identity(),
        teacher_model=nn.Identity(),
        num_classes=3,
    )
    term.setup(ctx)
    return term


def softmax_math(z: list[float], temperature: float) -> list[float]:
    m = max(z)
    e = [math.exp((v - m) / temperature) for v in z]
    total = sum(e)
    return [v / total for v in e]


def kd_math(s: list[list[float]], t: list[list[float]], temperature: float) -> float:
    """τ² · batch-mean KL(softmax(t/τ) ‖ softmax(s/τ)), with ``math`` only."""
    kls = []
    for zs, zt in zip(s, t):
        ps, pt = softmax_math(zs, temperature), softmax_math(zt, temperature)
        kls.append(sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps)))
    return temperature**2 * sum(kls) / len(kls)


def kl_float64(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Raw (unscaled) batch-mean KL(p_T ‖ p_S) at temperature τ, in float64, written out explicitly."""
    s, t = s.double() / temperature, t.double() / temperature
    log_ps = s - torch.logsumexp(s, dim=-1, keepdim=True)
    log_pt = t - torch.logsumexp(t, dim=-1, keepdim=True)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()


def huber(x: float) -> float:
    """Smooth-L1 with β = 1."""
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


# ======================================================================================================= 1. KD
def test_kd_closed_form_two_classes() -> None:
    # teacher logits (2 ln 3, 0) at τ = 2 give p_T = (3/4, 1/4); equal student logits give p_S = (1/2, 1/2)
    t = torch.tensor([[2 * math.log(3.0), 0.0]])
    s = torch.zeros(1, 2)
    expected = 4.0 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert float(kd_loss(s, t, 2.0)) == pytest.approx(expected, rel=1e-5)
    assert float(KDLoss(temperature=2.0)(batch_of(s, t))) == pytest.approx(expected, rel=1e-5)


def test_kd_hand_worked_three_classes() -> None:
    s = [[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]]
    t = [[2.0, 0.0, 1.0], [0.0, 0.0, 3.0]]
    for temperature in (1.0, 2.0, 4.0):
        expected = kd_math(s, t, temperature)
        assert expected > 0
        got = kd_loss(torch.tensor(s), torch.tensor(t), temperature)
        assert float(got) == pytest.approx(expected, rel=1e-5)
        term = KDLoss(weight=0.3, temperature=temperature)
        assert float(term(batch_of(torch.tensor(s), torch.tensor(t)))) == pytest.approx(expected, rel=1e-5)


def test_kd_direction_is_teacher_to_student() -> None:
    # KL is asymmetric: the loss must be KL(p_T ‖ p_S), not KL(p_S ‖ p_T)
    s = [[3.0, 0.0, 0.0]]
    t = [[0.0, 1.0, 0.5]]
    forward = kd_math(s, t, 1.0)
    reverse = kd_math(t, s, 1.0)
    assert abs(forward - reverse) > 1e-2
    assert float(kd_loss(torch.tensor(s), torch.tensor(t), 1.0)) == pytest.approx(forward, rel=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_kd_zero_for_equal_logits(temperature: float) -> None:
    z = torch.randn(5, 7, generator=gen(1)) * 10
    assert abs(float(kd_loss(z, z.clone(), temperature))) < 1e-6
    assert abs(float(KDLoss(temperature=temperature)(batch_of(z, z.clone())))) < 1e-6
    # and strictly positive once they differ
    assert float(kd_loss(z, z.flip(-1), temperature)) > 1e-4


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
def test_kd_is_tau_squared_times_kl(temperature: float) -> None:
    s = torch.randn(8, 10, generator=gen(2)) * 3
    t = torch.randn(8, 10, generator=gen(3)) * 3
    raw = kl_float64(s, t, temperature)
    got = kd_loss(s, t, temperature)
    torch.testing.assert_close(got.double() / temperature**2, raw, atol=1e-7, rtol=1e-5)


def test_kd_hinton_high_temperature_limit() -> None:
    """Hinton et al. §2.1: for τ ≫ |z|, τ²·KL → (1/(2C)) ‖(z_S − z̄_S) − (z_T − z̄_T)‖² (batch mean).

    The gap shrinks like O(|z|/τ); we require < 0.5 % at τ = 100 for unit-scale logits, and that it is smaller than at
    τ = 5 (in float32 rounding dominates beyond τ ≈ 100, so larger τ is not tested).
    """
    c = 5
    s = torch.randn(16, c, generator=gen(4))
    t = torch.randn(16, c, generator=gen(5))
    d = (s - s.mean(-1, keepdim=True)) - (t - t.mean(-1, keepdim=True))
    limit = float((d.double().pow(2).sum(-1) / (2 * c)).mean())
    gap = {tau: abs(float(kd_loss(s, t, tau)) / limit - 1) for tau in (5.0, 100.0)}
    assert gap[100.0] < 5e-3
    assert gap[100.0] < gap[5.0]
    # without the τ² factor the loss would vanish at high temperature
    assert float(kd_loss(s, t, 100.0)) / 100.0**2 < 1e-3 * limit


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kd_low_precision_inputs_computed_in_float32(dtype: torch.dtype) -> None:
    s = (torch.randn(4, 6, generator=gen(6)) * 4).to(dtype)
    t = (torch.randn(4, 6, generator=gen(7)) * 4).to(dtype)
    out = kd_loss(s, t, 4.0)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    torch.testing.assert_close(out, kd_loss(s.float(), t.float(), 4.0), atol=1e-6, rtol=1e-6)
    term_out = KDLoss(temperature=4.0)(batch_of(s, t))
    assert term_out.dtype == torch.float32


def test_kd_float16_extreme_logits_do_not_overflow() -> None:
    # the loss here is ≈ 1.2e5, beyond float16's range (65504): only a float32 computation stays finite
    s = torch.tensor([[60000.0, -60000.0]], dtype=torch.float16)
    t = torch.tensor([[-60000.0, 60000.0]], dtype=torch.float16)
    out = kd_loss(s, t, 1.0)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert float(out) == pytest.approx(120000.0, rel=1e-3)


@pytest.mark.parametrize("temperature", [0.0, -1.0, -0.5, float("nan"), float("inf")])
def test_kd_invalid_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        create_loss("kd", temperature=temperature)


# ======================================================================================= 2. torchdistill parity
@pytest.mark.parametrize("temperature", [1.0, 4.0, 8.0])
def test_kd_matches_torchdistill(temperature: float) -> None:
    s = torch.randn(16, 10, generator=gen(10)) * 3
    t = torch.randn(16, 10, generator=gen(11)) * 3
    y = torch.randint(0, 10, (16,), generator=gen(12))
    s_io, t_io = {"fc": {"output": s}}, {"fc": {"output": t}}

    # alpha=None: torchdistill returns the un-scaled soft loss (beta is unused then, but None would crash its __init__)
    td_soft = TDKDLoss("fc", "output", "fc", "output", temperature=temperature, alpha=None, beta=1.0)
    torch.testing.assert_close(kd_loss(s, t, temperature), td_soft(s_io, t_io) * temperature**2, **TOL)
    term = KDLoss(temperature=temperature)
    torch.testing.assert_close(term(batch_of(s, t)), td_soft(s_io, t_io) * temperature**2, **TOL)

    alpha, beta = 0.1, 0.9
    td_full = TDKDLoss("fc", "output", "fc", "output", temperature=temperature, alpha=alpha, beta=beta)
    expected = td_full(s_io, t_io, targets=y)
    engine = DistillEngine(loss={"kd": {"weight": beta, "temperature": temperature}}, teacher=nn.Linear(2, 2))
    total, logs = engine(batch_of(s, t, targets=y))
    ours = alpha * F.cross_entropy(s, y) + total
    torch.testing.assert_close(ours, expected, **TOL)
    torch.testing.assert_close(logs["train/kd"], td_soft(s_io, t_io) * temperature**2, **TOL)


@pytest.mark.parametrize(
    ("dist", "angle"),
    [(25.0, 50.0), (25.0, 0.0), (0.0, 50.0)],
    ids=["both", "distance-only", "angle-only"],
)
def test_rkd_matches_torchdistill(dist: float, angle: float) -> None:
    # student feature maps (flattened to 16-d) against 12-d teacher embeddings
    s = torch.randn(10, 4, 2, 2, generator=gen(20))
    t = torch.randn(10, 12, generator=gen(21))
    td = TDRKDLoss(
        student_output_path="s", teacher_output_path="t", dist_factor=dist, angle_factor=angle, reduction="mean"
    )
    s_td = s.clone().requires_grad_(True)
    expected = td({"s": {"output": s_td}}, {"t": {"output": t}})
    expected.backward()

    term = RKDLoss(distance_weight=dist, angle_weight=angle)
    s_ours = s.clone().requires_grad_(True)
    parts = term(feature_batch(term, s_ours, t))
    assert set(parts) == {name for name, w in (("distance", dist), ("angle", angle)) if w}
    value = sum(parts.values())
    torch.testing.assert_close(value, expected, **TOL)
    value.backward()
    torch.testing.assert_close(s_ours.grad, s_td.grad, **TOL)


# ======================================================================================================= 3. RKD
def test_rkd_hand_worked_triangles() -> None:
    # student A=(0,0) B=(1,0) C=(0,1); teacher A=(0,0) B=(2,0) C=(0,1)
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    # distances AB, AC, BC divided by the mean of the 6 off-diagonal entries
    mu_s = (1 + 1 + math.sqrt(2)) / 3
    mu_t = (2 + 1 + math.sqrt(5)) / 3
    ds = [1 / mu_s, 1 / mu_s, math.sqrt(2) / mu_s]
    dt = [2 / mu_t, 1 / mu_t, math.sqrt(5) / mu_t]
    # 9 entries: diagonal zeros on both sides, each pair twice
    dist_expected = 2 * sum(huber(a - b) for a, b in zip(ds, dt)) / 9
    # angle cosines at A, B, C: student 90°, 45°, 45°; teacher 90°, cos = 2/√5, cos = 1/√5
    cs = [0.0, 1 / math.sqrt(2), 1 / math.sqrt(2)]
    ct = [0.0, 2 / math.sqrt(5), 1 / math.sqrt(5)]
    # 27 triplets: per vertex, (i, k) = the two other points in both orders carry the cosine; i = k ≠ j gives 1 on
    # both sides and any degenerate pair (i = j or k = j) gives 0 on both sides
    angle_expected = 2 * sum(huber(a - b) for a, b in zip(cs, ct)) / 27

    assert float(rkd_distance_loss(s, t)) == pytest.approx(dist_expected, rel=1e-5)
    assert float(rkd_angle_loss(s, t)) == pytest.approx(angle_expected, rel=1e-5)
    term = RKDLoss(distance_weight=25.0, angle_weight=50.0)
    parts = term(feature_batch(term, s, t))
    assert float(parts["distance"]) == pytest.approx(25 * dist_expected, rel=1e-5)
    assert float(parts["angle"]) == pytest.approx(50 * angle_expected, rel=1e-5)


def test_rkd_hand_worked_linear_branch_of_smooth_l1() -> None:
    # collinear student A=(0,0) B=(1,0) C=(2,0) vs right-angled teacher: the cosine gap at B is 1 + 1/√2 > 1
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ds = [0.75, 1.5, 0.75]  # AB, AC, BC over the mean 4/3
    mu_t = (2 + math.sqrt(2)) / 3
    dt = [1 / mu_t, 1 / mu_t, math.sqrt(2) / mu_t]
    cs = [1.0, -1.0, 1.0]
    ct = [0.0, 1 / math.sqrt(2), 1 / math.sqrt(2)]
    assert abs(cs[1] - ct[1]) > 1  # exercises |x| - 0.5
    assert float(rkd_distance_loss(s, t)) == pytest.approx(2 * sum(huber(a - b) for a, b in zip(ds, dt)) / 9, rel=1e-5)
    assert float(rkd_angle_loss(s, t)) == pytest.approx(2 * sum(huber(a - b) for a, b in zip(cs, ct)) / 27, rel=1e-5)


def _rkd_total(term: RKDLoss, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return sum(term(feature_batch(term, s, t)).values())


def test_rkd_zero_for_identical_embeddings() -> None:
    x = torch.randn(8, 16, generator=gen(40))
    term = RKDLoss()
    parts = term(feature_batch(term, x, x.clone()))
    assert float(parts["distance"]) < 1e-6 and float(parts["angle"]) < 1e-6
    assert float(_rkd_total(term, x, torch.randn(8, 16, generator=gen(41)))) > 1e-2


def test_rkd_scale_and_translation_invariance() -> None:
    s = torch.randn(8, 8, generator=gen(42))
    t = torch.randn(8, 16, generator=gen(43))
    term = RKDLoss(distance_weight=25.0, angle_weight=50.0)
    ref = _rkd_total(term, s, t)
    assert float(ref) > 1e-2
    for sc_s, sc_t in [(3.7, 1.0), (1.0, 0.2), (0.05, 40.0)]:
        torch.testing.assert_close(_rkd_total(term, s * sc_s, t * sc_t), ref, **TOL)
    # a common translation (moderate offsets: the distance matrix is computed from squared norms, as in the
    # authors' code, so very large offsets lose float32 precision)
    shift_s, shift_t = torch.full((8,), 3.0), torch.linspace(-2.0, 2.0, 16)
    torch.testing.assert_close(_rkd_total(term, s + shift_s, t + shift_t), ref, **TOL)
    # a non-uniform change is not invariant
    assert abs(float(_rkd_total(term, s * torch.linspace(0.1, 3.0, 8), t)) - float(ref)) > 1e-3


def test_rkd_different_widths() -> None:
    term = RKDLoss()
    s = torch.randn(6, 8, generator=gen(44))
    t = torch.randn(6, 16, generator=gen(45))
    parts = term(feature_batch(term, s, t))
    assert set(parts) == {"distance", "angle"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in parts.values())


def test_rkd_batch_of_one_is_an_error() -> None:
    term = RKDLoss()
    with pytest.raises(ValueError, match="at least 2"):
        term(feature_batch(term, torch.randn(1, 8), torch.randn(1, 16)))


def test_rkd_gradients_reach_the_student_only() -> None:
    s = torch.randn(6, 8, generator=gen(46)).requires_grad_(True)
    t = torch.randn(6, 16, generator=gen(47)).requires_grad_(True)
    term = RKDLoss()
    _rkd_total(term, s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_rkd_gradient_finite_with_duplicate_samples() -> None:
    # two identical student samples: zero distances must not give NaN gradients
    s = torch.randn(5, 8, generator=gen(48))
    s[1] = s[0]
    s.requires_grad_(True)
    t = torch.randn(5, 16, generator=gen(49))
    term = RKDLoss()
    total = _rkd_total(term, s, t)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(s.grad).all()


# =================================================================================================== 5. registry
def test_registry_contents_and_create() -> None:
    names = registered_losses()
    assert {"kd", "fitnet", "rkd"} <= set(names)
    assert get_loss_class("kd") is KDLoss and get_loss_class("rkd") is RKDLoss
    term = create_loss("kd", temperature=2)
    assert isinstance(term, KDLoss) and term.temperature == 2.0 and term.weight == 1.0


def test_registry_unknown_name_lists_valid_names() -> None:
    with pytest.raises(KeyError) as info:
        create_loss("no_such_loss")
    msg = str(info.value)
    assert "no_such_loss" in msg and all(name in msg for name in ("kd", "fitnet", "rkd"))


def test_registry_unknown_kwarg_lists_accepted_args() -> None:
    with pytest.raises(TypeError) as info:
        create_loss("kd", temprature=2.0)
    msg = str(info.value)
    assert "temprature" in msg and "temperature" in msg.split("accepts")[-1] and "weight" in msg


def test_build_terms_from_a_name_and_a_list() -> None:
    terms = build_terms("kd")
    assert list(terms) == ["kd"] and isinstance(terms["kd"], KDLoss)
    terms = build_terms(["kd", "rkd"])
    assert list(terms) == ["kd", "rkd"] and isinstance(terms["rkd"], RKDLoss)
    terms = build_terms([{"kd": {"weight": 0.5}}, "rkd"])
    assert terms["kd"].weight == 0.5
    assert build_terms(None) == {}


def test_build_terms_alias_two_fitnets() -> None:
    spec = {
        "hint_mid": {"name": "fitnet", "weight": 10.0, "student_layers": "layer2", "teacher_layers": "layer2"},
        "hint_last": {"name": "fitnet", "student_layers": "layer3", "teacher_layers": "layer4", "connector": "linear"},
    }
    terms = build_terms(spec)
    assert list(terms) == ["hint_mid", "hint_last"]
    assert all(isinstance(term, FitNetLoss) for term in terms.values())
    assert terms["hint_mid"].weight == 10.0 and terms["hint_mid"].student_taps == [TapSpec.parse("layer2")]
    assert terms["hint_last"].teacher_taps == [TapSpec.parse("layer4")]
    assert terms["hint_last"].connector_kind == "linear"
    assert spec["hint_mid"]["name"] == "fitnet"  # the caller's config is not consumed
    # the same from an OmegaConf config (what Hydra passes)
    assert list(build_terms(OmegaConf.create(spec))) == ["hint_mid", "hint_last"]


def test_build_terms_hydra_target() -> None:
    terms = build_terms({"mykd": {"_target_": "lightning_kd.losses.kd.KDLoss", "temperature": 2.0}})
    assert list(terms) == ["mykd"] and isinstance(terms["mykd"], KDLoss) and terms["mykd"].temperature == 2.0
    with pytest.raises(TypeError, match="not a LossTerm"):
        build_terms({"bad": {"_target_": "torch.nn.Identity"}})


def test_build_terms_instances() -> None:
    kd = KDLoss(temperature=3.0)
    terms = build_terms(kd)
    assert list(terms) == ["kd"] and terms["kd"] is kd
    rkd = RKDLoss()
    terms = build_terms([kd, {"relations": rkd}])
    assert terms["kd"] is kd and terms["relations"] is rkd


def test_build_terms_duplicate_names() -> None:
    with pytest.raises(ValueError, match="'kd'"):
        build_terms(["kd", "kd"])
    with pytest.raises(ValueError, match="'kd'"):
        build_terms([KDLoss(), {"kd": {"temperature": 2.0}}])


# ===================================================================================================== 6. engine
class ConstantTerm(LossTerm):
    def __init__(self, value: float, weight: float = 1.0) -> None:
        super().__init__(weight)
        self.value = value

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        return batch.student.logits.sum() * 0 + self.value


class BrokenPartsTerm(LossTerm):
    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        return {"ok": torch.tensor(1.0), "bad": torch.tensor(float("inf"))}


def test_engine_weighted_sum_and_logs() -> None:
    emb, l2 = TapSpec.parse("embedding"), TapSpec.parse("layer2")
    s_logits = torch.randn(6, 5, generator=gen(60)).requires_grad_(True)
    t_logits = torch.randn(6, 5, generator=gen(61))
    s_emb = torch.randn(6, 8, generator=gen(62))
    t_emb = torch.randn(6, 16, generator=gen(63))
    s_map = torch.randn(6, 3, 4, 4, generator=gen(64))
    t_map = torch.randn(6, 5, 4, 4, generator=gen(65))
    weights = {"kd": 0.7, "rkd": 0.3, "hint": 2.0}
    engine = DistillEngine(
        loss={
            "kd": {"weight": weights["kd"], "temperature": 3.0},
            "rkd": {"weight": weights["rkd"], "distance_weight": 25.0, "angle_weight": 50.0},
            "hint": {
                "name": "fitnet",
                "weight": weights["hint"],
                "student_layers": "layer2",
                "teacher_layers": "layer2",
            },
        },
        teacher=nn.Linear(2, 2),
    )
    setup_fitnet(engine.terms["hint"], s_map, t_map)
    batch = batch_of(s_logits, t_logits, {emb: s_emb, l2: s_map}, {emb: t_emb, l2: t_map}, step=3)
    total, logs = engine(batch)

    assert set(logs) == {
        "train/kd",
        "train/rkd",
        "train/rkd/distance",
        "train/rkd/angle",
        "train/hint",
        "train/agreement",
    }
    expected_agreement = (batch.student.logits.argmax(-1) == batch.teacher.logits.argmax(-1)).float().mean()
    assert float(logs.pop("train/agreement")) == float(expected_agreement)
    assert all(not v.requires_grad for v in logs.values())
    by_hand = sum(w * float(logs[f"train/{name}"]) for name, w in weights.items())
    assert float(total.detach()) == pytest.approx(by_hand, rel=1e-6)
    assert float(logs["train/rkd"]) == pytest.approx(
        float(logs["train/rkd/distance"]) + float(logs["train/rkd/angle"]), rel=1e-6
    )
    # the logged values are the terms' own values, computed independently here
    assert float(logs["train/kd"]) == pytest.approx(kd_math(s_logits.tolist(), t_logits.tolist(), 3.0), rel=1e-5)
    assert float(logs["train/rkd/distance"]) == pytest.approx(25 * float(rkd_distance_loss(s_emb, t_emb)), rel=1e-6)
    assert float(logs["train/rkd/angle"]) == pytest.approx(50 * float(rkd_angle_loss(s_emb, t_emb)), rel=1e-6)
    conv = engine.terms["hint"].connector
    with torch.no_grad():
        assert float(logs["train/hint"]) == pytest.approx(float(F.mse_loss(conv(s_map), t_map)), rel=1e-5)
    # the total is differentiable w.r.t. the student and the connector
    total.backward()
    assert s_logits.grad is not None and s_logits.grad.abs().sum() > 0
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_engine_log_prefix_and_custom_term() -> None:
    engine = DistillEngine(loss={"const": ConstantTerm(2.5, weight=4.0)}, teacher=nn.Linear(2, 2), log_prefix="val/")
    total, logs = engine(batch_of(torch.zeros(2, 3), torch.zeros(2, 3)))
    assert set(logs) == {"val/const", "val/agreement"} and float(logs["val/const"]) == 2.5
    assert float(total) == pytest.approx(10.0) and total.dtype == torch.float32


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_engine_non_finite_term_names_term_and_step(bad: float) -> None:
    engine = DistillEngine(loss={"kd": {}, "broken": ConstantTerm(bad)}, teacher=nn.Linear(2, 2))
    batch = batch_of(torch.randn(2, 3), torch.randn(2, 3), step=7, epoch=2)
    with pytest.raises(NonFiniteLossError) as info:
        engine(batch)
    msg = str(info.value)
    assert "'broken'" in msg and "step 7" in msg and "epoch 2" in msg
    assert isinstance(info.value, FloatingPointError)
    # with the check off the value propagates instead
    engine.check_finite = False
    total, _ = engine(batch)
    assert not torch.isfinite(total)


def test_engine_non_finite_part_of_dict_term() -> None:
    engine = DistillEngine(loss={"parts": BrokenPartsTerm()}, teacher=nn.Linear(2, 2))
    with pytest.raises(NonFiniteLossError, match=r"'parts'.*step 11"):
        engine(batch_of(torch.zeros(2, 3), torch.zeros(2, 3), step=11))


def test_rkd_gradients_stay_bounded_for_coincident_student_samples() -> None:
    """Regression: two samples with the same student embedding but different teacher embeddings made the angle
    term back-propagate ~1e12 through F.normalize's eps (NaN at step 4 of `loss=rkd` on digits)."""
    torch.manual_seed(0)
    base = torch.randn(8, 16)
    student = torch.cat([base[:7], base[:1]]).requires_grad_(True)  # rows 0 and 7 coincide
    teacher = torch.randn(8, 32)
    _rkd_total(RKDLoss(), student, teacher).backward()
    assert torch.isfinite(student.grad).all()
    assert student.grad.norm() < 100, float(student.grad.norm())
