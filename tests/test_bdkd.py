"""Tests of the BD-KD term (:mod:`lightning_kd.losses.bdkd`), CPU.

Reference values are hand computations with ``math`` only; the pure-divergence modes are checked against
:func:`lightning_kd.losses.kd.kd_loss`.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SmallCNN, fast_trainer, make_loader
from omegaconf import OmegaConf

from lightning_kd import DistillationModule
from lightning_kd.config import CONF_DIR
from lightning_kd.engine import build_terms
from lightning_kd.losses import DistillBatch, ModelOutputs
from lightning_kd.losses.bdkd import BDKDLoss, bdkd_loss, bdkd_parts, bdkd_weights, softmax_entropy
from lightning_kd.losses.kd import kd_loss


def _softmax(z: list[float], tau: float) -> list[float]:
    e = [math.exp(v / tau) for v in z]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _entropy(p: list[float]) -> float:
    return -sum(pi * math.log(pi) for pi in p)


# sample 0: the student is flatter than the teacher; sample 1: the student is sharper
S = [[0.5, 0.2, 0.0], [4.0, 0.0, -1.0]]
T = [[3.0, 0.5, -1.0], [1.0, 0.8, 0.0]]


def _hand(tau: float, delta: float, base: float) -> tuple[float, float]:
    fwd = rev = 0.0
    for s, t in zip(S, T):
        ps, pt = _softmax(s, tau), _softmax(t, tau)
        w_f, w_r = (base, delta) if _entropy(ps) > _entropy(pt) else (delta, base)
        fwd += w_f * _kl(pt, ps)
        rev += w_r * _kl(ps, pt)
    return tau**2 * fwd / len(S), tau**2 * rev / len(S)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_hand_worked_two_samples_one_on_each_side(tau: float) -> None:
    s, t = torch.tensor(S), torch.tensor(T)
    h_s, h_t = softmax_entropy(s, tau), softmax_entropy(t, tau)
    assert h_s[0] > h_t[0] and h_s[1] < h_t[1]  # the case really covers both branches of the rule
    w_f, w_r = bdkd_weights(s, t, tau, delta=3.0, base=0.5)
    assert w_f.tolist() == [0.5, 3.0] and w_r.tolist() == [3.0, 0.5]
    fwd, rev = _hand(tau, 3.0, 0.5)
    parts = bdkd_parts(s, t, tau, delta=3.0, base=0.5)
    assert parts["forward"].item() == pytest.approx(fwd, rel=1e-5)
    assert parts["reverse"].item() == pytest.approx(rev, rel=1e-5)
    assert bdkd_loss(s, t, tau, delta=3.0, base=0.5).item() == pytest.approx(fwd + rev, rel=1e-5)
    term = BDKDLoss(temperature=tau, delta=3.0, base=0.5)
    value = term(DistillBatch(ModelOutputs(s), ModelOutputs(t)))
    assert sum(value.values()).item() == pytest.approx(fwd + rev, rel=1e-5)


def test_modes_are_the_pure_divergences() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 7, generator=g) * 2, torch.randn(6, 7, generator=g) * 2
    torch.testing.assert_close(bdkd_loss(s, t, 3.0, mode="forward"), kd_loss(s, t, 3.0))
    # kd_loss with the roles swapped is τ²·KL(p_S‖p_T), the reverse KL
    torch.testing.assert_close(bdkd_loss(s, t, 3.0, mode="reverse"), kd_loss(t, s, 3.0))
    hand_reverse = 9.0 * sum(_kl(_softmax(a, 3.0), _softmax(b, 3.0)) for a, b in zip(s.tolist(), t.tolist())) / 6
    assert bdkd_loss(s, t, 3.0, mode="reverse").item() == pytest.approx(hand_reverse, rel=1e-5)


def test_balanced_rule_at_the_weight_extremes_switches_per_sample() -> None:
    """delta=1, base=0: only the reverse KL for samples where the student is flatter, only the forward KL where it is
    sharper."""
    g = torch.Generator().manual_seed(1)
    t = torch.randn(5, 6, generator=g) * 3
    flat_s, sharp_s = t * 0.3, t * 2.5  # the same ranking, lower / higher confidence
    assert (softmax_entropy(flat_s) > softmax_entropy(t)).all() and (
        softmax_entropy(sharp_s) < softmax_entropy(t)
    ).all()
    torch.testing.assert_close(bdkd_loss(flat_s, t, 1.0, delta=1.0, base=0.0), kd_loss(t, flat_s, 1.0))
    torch.testing.assert_close(bdkd_loss(sharp_s, t, 1.0, delta=1.0, base=0.0), kd_loss(sharp_s, t, 1.0))
    # a mixed batch: the per-sample mixture, not a batch-level choice
    mixed_s = torch.cat([flat_s[:2], sharp_s[2:]])
    expected = (2 * kd_loss(t[:2], flat_s[:2], 1.0) + 3 * kd_loss(sharp_s[2:], t[2:], 1.0)) / 5
    torch.testing.assert_close(bdkd_loss(mixed_s, t, 1.0, delta=1.0, base=0.0), expected)


def test_zero_when_student_equals_teacher() -> None:
    z = torch.randn(4, 10, generator=torch.Generator().manual_seed(2)) * 3
    for mode in ("balanced", "forward", "reverse"):
        assert bdkd_loss(z, z.clone(), 2.0, mode=mode, delta=5.0).abs().item() < 1e-6
    w_f, w_r = bdkd_weights(z, z.clone(), 2.0, delta=5.0, base=1.0)  # a tie counts as "not flatter": forward boosted
    assert w_f.tolist() == [5.0] * 4 and w_r.tolist() == [1.0] * 4


def test_float32_under_bf16_with_gradient_to_the_student_only() -> None:
    g = torch.Generator().manual_seed(3)
    s = torch.randn(8, 10, generator=g).requires_grad_(True)
    t = torch.randn(8, 10, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s16, t16 = s.to(torch.bfloat16), t.to(torch.bfloat16)
        value = BDKDLoss()(DistillBatch(ModelOutputs(s16), ModelOutputs(t16)))
    assert all(v.dtype == torch.float32 for v in value.values())
    sum(value.values()).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    w_f, w_r = bdkd_weights(s, t, 4.0)
    assert not w_f.requires_grad and not w_r.requires_grad


def test_invalid_arguments_name_the_problem() -> None:
    with pytest.raises(ValueError, match="bdkd: temperature"):
        BDKDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="bdkd: mode must be one of"):
        BDKDLoss(mode="symmetric")
    with pytest.raises(ValueError, match="bdkd: delta"):
        BDKDLoss(delta=-1.0)
    with pytest.raises(ValueError, match="same shape"):
        bdkd_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)


def test_yaml_builds_the_term() -> None:
    cfg = OmegaConf.load(CONF_DIR / "loss" / "bdkd.yaml")
    (name, term), *_ = build_terms(cfg.terms).items()
    assert name == "bdkd" and isinstance(term, BDKDLoss)
    assert (term.mode, term.delta, term.base, term.temperature) == ("balanced", 2.0, 1.0, 4.0)


def test_one_way_with_a_frozen_teacher() -> None:
    teacher = SmallCNN(seed=1)
    before = [p.clone() for p in teacher.parameters()]
    module = DistillationModule(SmallCNN(seed=0), teacher, loss="bdkd")
    trainer = fast_trainer(max_steps=2)
    trainer.fit(module, make_loader())
    metrics = trainer.callback_metrics
    assert {"train/bdkd", "train/bdkd/forward", "train/bdkd/reverse"} <= set(metrics)
    assert torch.isclose(metrics["train/bdkd"], metrics["train/bdkd/forward"] + metrics["train/bdkd/reverse"])
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
