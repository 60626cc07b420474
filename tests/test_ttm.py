"""Tests of transformed teacher matching, TTM and WTTM (:mod:`lightning_kd.losses.ttm`), CPU.

Reference values come from hand computations with ``math`` only, and from plain KL via
:func:`lightning_kd.losses.kd.kd_loss` at τ = 1.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_kd.engine import build_terms
from lightning_kd.losses import DistillBatch, ModelOutputs, get_loss_class
from lightning_kd.losses.kd import kd_loss, standardize_logits
from lightning_kd.losses.ttm import TTMLoss, WTTMLoss, transformed_teacher, ttm_loss, ttm_per_sample, wttm_loss

TOL = {"atol": 1e-5, "rtol": 1e-5}


def batch_of(s: torch.Tensor, t: torch.Tensor) -> DistillBatch:
    return DistillBatch(ModelOutputs(s), ModelOutputs(t))


def logits(seed: int, n: int = 6, c: int = 7, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * scale


# ------------------------------------------------------------------------------------------------- hand-worked case
S3, T3 = [1.0, 2.0, 0.0], [3.0, 1.0, 0.5]


def _hand(s: list[float], t: list[float], tau: float) -> tuple[float, float]:
    """(TTM, WTTM) for one sample, ``math`` only, following the authors' code literally (power of softmax)."""
    es, et = [math.exp(v) for v in s], [math.exp(v) for v in t]
    ps, pt = [v / sum(es) for v in es], [v / sum(et) for v in et]
    powered = [p ** (1.0 / tau) for p in pt]
    u = sum(powered)
    q = [v / u for v in powered]
    kl = sum(qi * math.log(qi / pi) for qi, pi in zip(q, ps))
    return kl, u * kl


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_hand_worked_three_classes(tau: float) -> None:
    ttm, wttm = _hand(S3, T3, tau)
    assert ttm > 1e-2
    s, t = torch.tensor([S3]), torch.tensor([T3])
    assert ttm_loss(s, t, tau).item() == pytest.approx(ttm, rel=1e-5)
    assert wttm_loss(s, t, tau).item() == pytest.approx(wttm, rel=1e-5)
    assert TTMLoss(temperature=tau)(batch_of(s, t)).item() == pytest.approx(ttm, rel=1e-5)
    assert WTTMLoss(temperature=tau)(batch_of(s, t)).item() == pytest.approx(wttm, rel=1e-5)
    if tau > 1:
        assert wttm > ttm  # U > 1 when γ < 1


def test_batch_mean_of_hand_values() -> None:
    s, t = [S3, [0.0, -1.0, 2.0]], [T3, [1.0, 1.0, -2.0]]
    hands = [_hand(a, b, 3.0) for a, b in zip(s, t)]
    got = ttm_loss(torch.tensor(s), torch.tensor(t), 3.0).item()
    assert got == pytest.approx(sum(h[0] for h in hands) / 2, rel=1e-5)
    got = wttm_loss(torch.tensor(s), torch.tensor(t), 3.0).item()
    assert got == pytest.approx(sum(h[1] for h in hands) / 2, rel=1e-5)


# ---------------------------------------------------------------------------------------------------- properties
def test_gamma_one_is_plain_kl() -> None:
    s, t = logits(0), logits(1)
    ref = kd_loss(s, t, 1.0)
    torch.testing.assert_close(ttm_loss(s, t, 1.0), ref, **TOL)
    torch.testing.assert_close(wttm_loss(s, t, 1.0), ref, **TOL)  # U = 1 at γ = 1


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0, 10.0])
def test_zero_when_student_matches_transformed_teacher(tau: float) -> None:
    t = logits(2)
    s = t / tau  # softmax(γ z_T) = p_T^γ / Σ p_T^γ
    assert ttm_loss(s, t, tau).abs().item() < 1e-6
    assert wttm_loss(s, t, tau).abs().item() < 1e-5
    if tau != 1.0:
        assert ttm_loss(t, t, tau).item() > 1e-3  # the untransformed teacher is not the target


def test_u_at_least_one_below_gamma_one() -> None:
    t = logits(3, n=32, c=100, scale=6.0)
    for tau in (1.5, 4.0, 10.0):
        _, log_u = transformed_teacher(t, tau)
        assert (log_u.exp() >= 1.0 - 1e-6).all()
        assert (log_u.exp() <= 100 ** (1 - 1 / tau) + 1e-3).all()  # at most C^(1-γ)
    _, log_u = transformed_teacher(t, 1.0)
    torch.testing.assert_close(log_u.exp(), torch.ones(32), **TOL)


@pytest.mark.parametrize("tau", [2.0, 4.0])
def test_student_not_temperature_scaled(tau: float) -> None:
    s, t = logits(4), logits(5)
    # TTM(τ) is the plain KL from softmax(z_T/τ) to softmax(z_S): the student side is untouched.
    ref = kd_loss(s, t / tau, 1.0)
    torch.testing.assert_close(ttm_loss(s, t, tau), ref, **TOL)
    # and not Hinton KD without τ² (which would scale the student as well)
    assert not torch.allclose(ttm_loss(s, t, tau), kd_loss(s, t, tau) / tau**2, atol=1e-4)
    # changing τ changes only the teacher's side: the per-sample KL against fixed student log-probs
    kl, _ = ttm_per_sample(s, t, tau)
    log_ps = torch.log_softmax(s, dim=-1)
    q = torch.softmax(t / tau, dim=-1)
    torch.testing.assert_close(kl, (q * (q.log() - log_ps)).sum(-1), **TOL)


def test_gradients_reach_student_only() -> None:
    s = logits(6).requires_grad_()
    t = logits(7).requires_grad_()
    for fn in (ttm_loss, wttm_loss):
        s.grad = None
        t.grad = None
        fn(s, t, 4.0).backward()
        assert s.grad is not None and s.grad.abs().sum() > 0 and torch.isfinite(s.grad).all()
        assert t.grad is None


def test_bf16_logits_give_float32_finite() -> None:
    s, t = logits(8).bfloat16(), (logits(9) * 10).bfloat16()
    for term in (TTMLoss(), WTTMLoss(), TTMLoss(standardize=True)):
        out = term(batch_of(s, t))
        assert out.dtype == torch.float32 and torch.isfinite(out)
        ref = type(term)(temperature=term.temperature, standardize=term.standardize)(batch_of(s.float(), t.float()))
        torch.testing.assert_close(out, ref, **TOL)


def test_extreme_teacher_stays_finite() -> None:
    t = torch.tensor([[200.0, -200.0, 0.0]])  # p_T^γ would underflow outside log space
    s = torch.zeros(1, 3)
    for fn in (ttm_loss, wttm_loss):
        assert torch.isfinite(fn(s, t, 10.0))


@pytest.mark.parametrize("cls", [TTMLoss, WTTMLoss])
def test_standardize_equals_function_on_z_scored_logits(cls) -> None:
    s, t = logits(10) + 5.0, logits(11) * 4.0
    fn = ttm_loss if cls is TTMLoss else wttm_loss
    got = cls(temperature=3.0, standardize=True)(batch_of(s, t))
    torch.testing.assert_close(got, fn(standardize_logits(s), standardize_logits(t), 3.0), **TOL)
    assert not torch.allclose(got, fn(s, t, 3.0), atol=1e-4)


@pytest.mark.parametrize("cls", [TTMLoss, WTTMLoss])
@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_rejects_bad_temperature(cls, bad: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        cls(temperature=bad)


# ------------------------------------------------------------------------------------------------------- configs
def test_registry_and_yaml_configs() -> None:
    from lightning_kd.config import compose

    assert get_loss_class("ttm") is TTMLoss and get_loss_class("wttm") is WTTMLoss
    expect = {"ttm": (TTMLoss, 45.0, 10.0), "wttm": (WTTMLoss, 4.0, 5.0)}
    for name, (cls, weight, tau) in expect.items():
        cfg = compose([f"loss={name}"])
        assert cfg.loss.task_weight == 1.0
        terms = build_terms(cfg.loss.terms)
        assert list(terms) == [name]
        term = terms[name]
        assert type(term) is cls
        assert (term.weight, term.temperature, term.standardize) == (weight, tau, False)
        assert cfg.loss.terms[name].weight == weight and cfg.loss.terms[name].temperature == tau
        # defaults of the constructor match the YAML
        default = cls()
        assert (default.weight, default.temperature, default.standardize) == (weight, tau, False)
