"""Tests of decoupled knowledge distillation (:mod:`lightning_kd.losses.dkd`), CPU.

Reference values come from hand computations with ``math`` only and from the paper's decomposition
``KD = TCKD + (1 - p_t^T) · NCKD`` checked against :func:`lightning_kd.losses.kd.kd_loss`.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from lightning_kd.engine import build_terms
from lightning_kd.losses import DistillBatch, ModelOutputs, get_loss_class
from lightning_kd.losses.dkd import DKDLoss, dkd_loss, dkd_parts
from lightning_kd.losses.kd import kd_loss

TOL = {"atol": 1e-5, "rtol": 1e-5}


def batch_of(s: torch.Tensor, t: torch.Tensor, targets: torch.Tensor | None, *, step: int = 0, epoch: int = 0):
    return DistillBatch(ModelOutputs(s), ModelOutputs(t), targets=targets, step=step, epoch=epoch)


def total(value) -> torch.Tensor:
    return sum(value.values()) if isinstance(value, dict) else value


# ------------------------------------------------------------------------------------------------- hand-worked case
def _softmax(z: list[float], tau: float) -> list[float]:
    e = [math.exp(v / tau) for v in z]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _hand_dkd(s: list[float], t: list[float], y: int, tau: float) -> tuple[float, float]:
    ps, pt = _softmax(s, tau), _softmax(t, tau)
    tckd = _kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
    others = [i for i in range(len(s)) if i != y]
    qs = [ps[i] / (1 - ps[y]) for i in others]  # softmax over the non-target classes = renormalised p
    qt = [pt[i] / (1 - pt[y]) for i in others]
    return tckd, _kl(qt, qs)


S3, T3, Y3 = [1.0, 2.0, 0.0], [3.0, 1.0, 0.5], 0


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_hand_worked_three_classes(tau: float) -> None:
    tckd, nckd = _hand_dkd(S3, T3, Y3, tau)
    assert tckd > 1e-3 and nckd > 1e-3  # a case where both parts matter
    s, t, y = torch.tensor([S3]), torch.tensor([T3]), torch.tensor([Y3])
    got_t, got_n = dkd_parts(s, t, y, tau)
    assert got_t.item() == pytest.approx(tckd, rel=1e-5)
    assert got_n.item() == pytest.approx(nckd, rel=1e-5)
    assert dkd_loss(s, t, y, 1.0, 0.0, tau).item() == pytest.approx(tau**2 * tckd, rel=1e-5)
    assert dkd_loss(s, t, y, 0.0, 1.0, tau).item() == pytest.approx(tau**2 * nckd, rel=1e-5)
    expected = tau**2 * (1.0 * tckd + 8.0 * nckd)
    assert dkd_loss(s, t, y, 1.0, 8.0, tau).item() == pytest.approx(expected, rel=1e-5)
    term = DKDLoss(alpha=1.0, beta=8.0, temperature=tau, warmup=0)
    assert total(term(batch_of(s, t, y))).item() == pytest.approx(expected, rel=1e-5)


def test_batch_mean_and_target_per_sample() -> None:
    s = torch.tensor([S3, S3[::-1]])
    t = torch.tensor([T3, T3[::-1]])
    y = torch.tensor([0, 1])
    per = [_hand_dkd(S3, T3, 0, 2.0), _hand_dkd(S3[::-1], T3[::-1], 1, 2.0)]
    expected = 4.0 * sum(a * 1.0 + b * 3.0 for a, b in per) / 2
    assert dkd_loss(s, t, y, 1.0, 3.0, 2.0).item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------- properties
def test_zero_when_student_equals_teacher() -> None:
    z = torch.randn(6, 10, generator=torch.Generator().manual_seed(0)) * 3
    y = torch.arange(6)
    assert dkd_loss(z, z.clone(), y, 1.0, 8.0, 4.0).abs().item() < 1e-6
    tckd, nckd = dkd_parts(z, z.clone(), y, 1.0)
    assert tckd.abs().max().item() < 1e-6 and nckd.abs().max().item() < 1e-6
    # a shift of all logits changes no softmax (still zero); a rescale does (not trivially zero)
    assert dkd_loss(z + 0.5, z, y, 1.0, 8.0, 4.0).abs().item() < 1e-6
    assert dkd_loss(z * 1.5, z, y, 1.0, 8.0, 4.0).item() > 1e-3


@pytest.mark.parametrize("seed", range(6))
def test_decomposition_kd_equals_tckd_plus_weighted_nckd(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    classes = int(torch.randint(2, 12, (1,), generator=g))
    tau = [1.0, 2.0, 4.0][seed % 3]
    s, t = torch.randn(1, classes, generator=g) * 3, torch.randn(1, classes, generator=g) * 3
    y = torch.randint(0, classes, (1,), generator=g)
    tckd = dkd_loss(s, t, y, 1.0, 0.0, tau) / tau**2
    nckd = dkd_loss(s, t, y, 0.0, 1.0, tau) / tau**2
    pt_teacher = torch.softmax(t / tau, dim=1)[0, y[0]]
    kl = kd_loss(s, t, tau) / tau**2
    torch.testing.assert_close(tckd + (1 - pt_teacher) * nckd, kl, **TOL)
    # α = β = 1 is *not* KD (NCKD is not down-weighted by 1 - p_t^T) unless NCKD vanishes
    if nckd.item() > 1e-4:
        assert (dkd_loss(s, t, y, 1.0, 1.0, tau) / tau**2 - kl).item() > 1e-6


# ------------------------------------------------------------------------------------------------------------- warm-up
@pytest.mark.parametrize(("epoch", "factor"), [(0, 1 / 20), (9, 0.5), (19, 1.0), (25, 1.0)])
def test_warmup_factor_matches_authors_one_based_epochs(epoch: int, factor: float) -> None:
    g = torch.Generator().manual_seed(1)
    s, t, y = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g), torch.tensor([0, 1, 2, 4])
    full = dkd_loss(s, t, y, 1.0, 8.0, 4.0)
    term = DKDLoss(alpha=1.0, beta=8.0, temperature=4.0, warmup=20)
    out = term(batch_of(s, t, y, step=epoch * 100 + 7, epoch=epoch))
    assert set(out) == {"tckd", "nckd"}
    torch.testing.assert_close(total(out), full * factor, **TOL)
    # mdistiller: min(epoch_1based / warmup, 1) with epoch_1based = epoch + 1
    assert term.warmup_factor(epoch) == pytest.approx(min((epoch + 1) / 20, 1.0))


def test_warmup_zero_disables_it() -> None:
    g = torch.Generator().manual_seed(2)
    s, t, y = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g), torch.tensor([0, 1, 2, 4])
    term = DKDLoss(warmup=0)
    torch.testing.assert_close(total(term(batch_of(s, t, y, epoch=0))), dkd_loss(s, t, y, 1.0, 8.0, 4.0), **TOL)
    with pytest.raises(ValueError, match="warmup"):
        DKDLoss(warmup=-1)


# ----------------------------------------------------------------------------------------------- gradients and dtypes
def test_gradients_reach_student_only() -> None:
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(5, 7, generator=g) * 2).requires_grad_()
    t = (torch.randn(5, 7, generator=g) * 2).requires_grad_()
    y = torch.tensor([0, 6, 3, 3, 1])
    total(DKDLoss(warmup=0)(batch_of(s, t, y))).backward()
    assert t.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # softmax-based: shifting a row of student logits changes nothing, so each row's gradient sums to zero
    torch.testing.assert_close(s.grad.sum(dim=1), torch.zeros(5), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_give_float32(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(4)
    s, t = (torch.randn(8, 10, generator=g) * 4).to(dtype), (torch.randn(8, 10, generator=g) * 4).to(dtype)
    y = torch.randint(0, 10, (8,), generator=g)
    out = dkd_loss(s, t, y, 1.0, 8.0, 4.0)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    torch.testing.assert_close(out, dkd_loss(s.float(), t.float(), y, 1.0, 8.0, 4.0), **TOL)
    term_out = DKDLoss(warmup=0)(batch_of(s, t, y))
    assert all(v.dtype == torch.float32 for v in term_out.values())


def test_extreme_logits_stay_finite() -> None:
    s = torch.tensor([[200.0, -200.0, 0.0], [-300.0, 300.0, 1.0]], requires_grad=True)
    t = torch.tensor([[-250.0, 250.0, 0.0], [300.0, -300.0, 2.0]])
    out = dkd_loss(s, t, torch.tensor([0, 1]), 1.0, 8.0, 1.0)
    out.backward()
    assert torch.isfinite(out) and out.item() > 0 and torch.isfinite(s.grad).all()


# ------------------------------------------------------------------------------------------------------ errors, config
def test_missing_targets_raise() -> None:
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match="needs class labels"):
        dkd_loss(z, z, None, 1.0, 8.0, 4.0)
    with pytest.raises(ValueError, match="no targets"):
        DKDLoss()(batch_of(z, z, None))


def test_registry_builds_it_from_yaml() -> None:
    from lightning_kd.config import compose

    cfg = compose(["loss=dkd"])
    assert cfg.loss.task_weight == 1.0
    params = {p for p in inspect.signature(get_loss_class("dkd").__init__).parameters if p != "self"}
    assert set(cfg.loss.terms.dkd) == params
    terms = build_terms(cfg.loss.terms)
    term = terms["dkd"]
    assert isinstance(term, DKDLoss) and get_loss_class("dkd") is DKDLoss
    values = cfg.loss.terms.dkd
    assert (term.weight, term.alpha, term.beta, term.temperature, term.warmup) == (
        values.weight,
        values.alpha,
        values.beta,
        values.temperature,
        values.warmup,
    )
    assert (term.weight, term.alpha, term.beta, term.temperature, term.warmup) == (1.0, 1.0, 8.0, 4.0, 20)
