"""Tests of DIST (Huang et al., NeurIPS 2022), :mod:`lightning_kd.losses.dist` (CPU).

References: a hand-worked case (``math`` only), an independent float64 formula (``torch.corrcoef``), and
torchdistill's ``DISTLoss`` (parity, plus the one place where its cosine's ``eps`` convention differs).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from omegaconf import OmegaConf
from torchdistill.losses.mid_level import DISTLoss as TDDISTLoss

from lightning_kd.config import CONF_DIR, compose
from lightning_kd.engine import build_terms
from lightning_kd.losses import DistillBatch, ModelOutputs
from lightning_kd.losses.dist import DISTLoss, dist_loss, pearson_correlation

TOL = {"atol": 1e-5, "rtol": 1e-5}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch_of(s_logits: torch.Tensor, t_logits: torch.Tensor) -> DistillBatch:
    return DistillBatch(ModelOutputs(s_logits, {}), ModelOutputs(t_logits, {}))


def logits(b: int, c: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(b, c, generator=gen(seed)) * scale


def pearson_math(u: list[float], v: list[float]) -> float:
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    du, dv = [x - mu for x in u], [x - mv for x in v]
    return sum(a * b for a, b in zip(du, dv)) / math.sqrt(sum(a * a for a in du) * sum(b * b for b in dv))


def relations_float64(s: torch.Tensor, t: torch.Tensor, temperature: float) -> tuple[float, float]:
    """(inter, intra) at τ, unscaled, in float64 with torch.corrcoef (independent of the module's helpers)."""
    ps = torch.softmax(s.double() / temperature, dim=1)
    pt = torch.softmax(t.double() / temperature, dim=1)
    inter = 1 - torch.stack([torch.corrcoef(torch.stack([a, b]))[0, 1] for a, b in zip(ps, pt)]).mean()
    intra = 1 - torch.stack([torch.corrcoef(torch.stack([a, b]))[0, 1] for a, b in zip(ps.T, pt.T)]).mean()
    return float(inter), float(intra)


# ------------------------------------------------------------------------------------------- 1. hand-worked case
def test_hand_worked_two_samples_three_classes() -> None:
    # logits = log p, so at τ = 1 the softmax gives back exactly these probabilities
    p_s = [[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]
    p_t = [[0.6, 0.3, 0.1], [0.1, 0.4, 0.5]]
    # rows (inter-class), centred ×30: S1 = (5, -1, -4), T1 = (8, -1, -7): ρ1 = 69 / √(42·114)
    #                                  S2 = (-4, -4, 8), T2 = (-7, 2, 5): ρ2 = 60 / √(96·78)
    rho_rows = [69 / math.sqrt(42 * 114), 60 / math.sqrt(96 * 78)]
    assert rho_rows == pytest.approx([pearson_math(a, b) for a, b in zip(p_s, p_t)], rel=1e-12)
    # columns (intra-class) of two samples: ρ = ±1 by the sign of the differences
    # c0: S (0.5, 0.2), T (0.6, 0.1) → +1;  c1: S (0.3, 0.2), T (0.3, 0.4) → −1;  c2: S (0.2, 0.6), T (0.1, 0.5) → +1
    rho_cols = [1.0, -1.0, 1.0]
    cols = lambda m: [list(c) for c in zip(*m)]
    assert rho_cols == pytest.approx([pearson_math(a, b) for a, b in zip(cols(p_s), cols(p_t))], rel=1e-12)
    inter = 1 - sum(rho_rows) / 2
    intra = 1 - sum(rho_cols) / 3  # = 2/3
    assert intra == pytest.approx(2 / 3)

    s = torch.tensor(p_s).log()
    t = torch.tensor(p_t).log()
    assert float(dist_loss(s, t, beta=1.0, gamma=0.0)) == pytest.approx(inter, abs=1e-5)
    assert float(dist_loss(s, t, beta=0.0, gamma=1.0)) == pytest.approx(intra, abs=1e-5)
    assert float(dist_loss(s, t)) == pytest.approx(inter + intra, abs=1e-5)
    assert float(dist_loss(s, t, beta=0.5, gamma=2.0)) == pytest.approx(0.5 * inter + 2.0 * intra, abs=1e-5)
    term = DISTLoss(weight=0.3, beta=0.5, gamma=2.0)
    assert float(term(batch_of(s, t))) == pytest.approx(0.5 * inter + 2.0 * intra, abs=1e-5)


def test_constant_vector_has_zero_correlation() -> None:
    # the authors' eps convention: a centred zero vector gives ρ = 0 (d = 1), not NaN
    a = torch.full((1, 4), 0.25)
    b = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    assert float(pearson_correlation(a, b)) == 0.0
    # a batch of one sample: every class column is constant, so intra = 1 exactly
    s, t = logits(1, 5, 0), logits(1, 5, 1)
    assert float(dist_loss(s, t, beta=0.0, gamma=1.0)) == pytest.approx(1.0, abs=1e-7)


# ------------------------------------------------------------------------------------------------ 2. zero at match
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_zero_when_student_equals_teacher(temperature: float) -> None:
    z = logits(16, 10, 3)
    assert float(dist_loss(z, z.clone(), temperature=temperature)) == pytest.approx(0.0, abs=1e-5)
    other = float(dist_loss(logits(16, 10, 4), z, temperature=temperature))
    assert other > 0.05


# ------------------------------------------------------------------------------------------------- 3. invariances
@pytest.mark.parametrize("a, b", [(2.0, 0.0), (0.3, 0.5), (5.0, -0.1), (1.0, 3.0)])
def test_correlation_invariant_to_positive_scale_and_shift_of_probabilities(a: float, b: float) -> None:
    p = torch.softmax(logits(8, 10, 5), dim=1)
    q = torch.softmax(logits(8, 10, 6), dim=1)
    base = pearson_correlation(p, q)
    assert torch.allclose(pearson_correlation(a * p + b, q), base, **TOL)
    assert torch.allclose(pearson_correlation(p, a * q + b), base, **TOL)
    assert torch.allclose(pearson_correlation(p, a * p + b), torch.ones(8), **TOL)
    # a negative scale flips the sign: the invariance is for a > 0 only
    assert torch.allclose(pearson_correlation(-a * p + b, q), -base, **TOL)


def test_loss_is_on_softmax_outputs_shift_of_logits_only() -> None:
    # the loss sees softmax(z/τ): a per-sample shift of the logits leaves it unchanged, a scaling does not
    s, t = logits(8, 10, 7), logits(8, 10, 8)
    base = dist_loss(s, t)
    shift = torch.randn(8, 1, generator=gen(9)) * 5
    assert torch.allclose(dist_loss(s + shift, t - shift), base, **TOL)
    assert abs(float(dist_loss(2.0 * s, t)) - float(base)) > 1e-3


# ---------------------------------------------------------------------------------------------------- 4. τ² scaling
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("beta, gamma", [(1.0, 1.0), (2.0, 0.5)])
def test_temperature_squared_scaling(temperature: float, beta: float, gamma: float) -> None:
    s, t = logits(12, 7, 10), logits(12, 7, 11)
    inter, intra = relations_float64(s, t, temperature)
    got = float(dist_loss(s, t, beta=beta, gamma=gamma, temperature=temperature)) / temperature**2
    assert got == pytest.approx(beta * inter + gamma * intra, rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------------------------ 5. torchdistill parity
@pytest.mark.parametrize("b, c", [(16, 10), (64, 100)])
@pytest.mark.parametrize("beta, gamma, tau", [(1.0, 1.0, 1.0), (2.0, 2.0, 1.0), (1.0, 1.0, 4.0), (0.5, 3.0, 2.0)])
def test_parity_with_torchdistill(b: int, c: int, beta: float, gamma: float, tau: float) -> None:
    s, t = logits(b, c, 12), logits(b, c, 13)
    ref = TDDISTLoss("fc", "output", "fc", "output", beta=beta, gamma=gamma, tau=tau)
    expected = ref({"fc": {"output": s}}, {"fc": {"output": t}})
    got = dist_loss(s, t, beta=beta, gamma=gamma, temperature=tau)
    assert torch.allclose(got, expected, **TOL)
    term = DISTLoss(beta=beta, gamma=gamma, temperature=tau)
    assert torch.allclose(term(batch_of(s, t)), expected, **TOL)


def test_eps_convention_differs_from_torchdistill_on_near_constant_vectors() -> None:
    # authors: ⟨ā,b̄⟩ / (‖ā‖‖b̄‖ + eps); torchdistill (F.cosine_similarity): ⟨ā,b̄⟩ / (max(‖ā‖,eps)·max(‖b̄‖,eps))
    a = torch.tensor([[1e-6, -1e-6, 0.0]])
    b = torch.tensor([[0.5, -0.5, 0.0]])
    ours = float(pearson_correlation(a, b, 1e-8))
    theirs = float(TDDISTLoss.pearson_correlation(a, b, 1e-8))
    norm_product = math.sqrt(2) * 1e-6 * math.sqrt(0.5)
    assert ours == pytest.approx(norm_product / (norm_product + 1e-8), rel=1e-4)  # ≈ 0.990
    assert theirs == pytest.approx(1.0, rel=1e-5)
    assert theirs - ours > 5e-3
    # on ordinary probability vectors the two agree
    p, q = torch.softmax(logits(8, 10, 14), 1), torch.softmax(logits(8, 10, 15), 1)
    assert torch.allclose(pearson_correlation(p, q), TDDISTLoss.pearson_correlation(p, q, 1e-8), atol=1e-6)


# ---------------------------------------------------------------------------------------------------- 6. gradients
def test_gradients_reach_student_only() -> None:
    s = logits(8, 10, 16).requires_grad_()
    t = logits(8, 10, 17).requires_grad_()
    DISTLoss()(batch_of(s, t)).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


# ------------------------------------------------------------------------------------------------------ 7. bf16
def test_bf16_logits_give_finite_float32() -> None:
    s, t = logits(16, 10, 18).bfloat16(), logits(16, 10, 19).bfloat16()
    out = DISTLoss(temperature=2.0)(batch_of(s, t))
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert torch.allclose(out, dist_loss(s.float(), t.float(), temperature=2.0), atol=1e-6)


# --------------------------------------------------------------------------------------------- 8. config building
def test_build_from_yaml() -> None:
    cfg = compose(["loss=dist"])
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / "dist.yaml"))
    values = yaml["terms"]["dist"]
    params = [p for p in inspect.signature(DISTLoss.__init__).parameters if p != "self"]
    assert sorted(values) == sorted(params)
    assert cfg.loss.task_weight == 1.0
    terms = build_terms(cfg.loss.terms)
    assert list(terms) == ["dist"]
    term = terms["dist"]
    assert isinstance(term, DISTLoss)
    assert (term.weight, term.beta, term.gamma, term.temperature, term.eps) == (2.0, 1.0, 1.0, 1.0, 1e-8)
    assert all(getattr(term, k) == pytest.approx(v) for k, v in values.items())


@pytest.mark.parametrize(
    "kwargs", [{"temperature": 0.0}, {"temperature": float("nan")}, {"beta": -1.0}, {"eps": -1e-8}]
)
def test_invalid_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        DISTLoss(**kwargs)
