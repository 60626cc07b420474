"""Logit standardisation (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024) on kd."""

from __future__ import annotations

import math

import pytest
import torch
from torchdistill.losses.mid_level import LogitStdKDLoss

from lightning_kd.config import compose
from lightning_kd.engine import build_terms
from lightning_kd.losses.base import DistillBatch, ModelOutputs
from lightning_kd.losses.kd import KDLoss, kd_loss, standardize_logits


def _batch(s: torch.Tensor, t: torch.Tensor) -> DistillBatch:
    return DistillBatch(ModelOutputs(s), ModelOutputs(t))


def test_zscore_by_hand() -> None:
    z = [1.0, 2.0, 6.0]
    mean = sum(z) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in z) / 2)  # unbiased, as the authors' code
    expected = [(v - mean) / (std + 1e-7) for v in z]
    torch.testing.assert_close(standardize_logits(torch.tensor([z])), torch.tensor([expected]))


def test_hand_worked_standardized_kd() -> None:
    s, t, tau = [0.0, 1.0, 5.0], [2.0, 0.0, 1.0], 2.0

    def z(v):
        m = sum(v) / len(v)
        sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
        return [(x - m) / (sd + 1e-7) for x in v]

    def softmax(v):
        e = [math.exp(x / tau) for x in v]
        return [x / sum(e) for x in e]

    ps, pt = softmax(z(s)), softmax(z(t))
    expected = tau**2 * sum(q * math.log(q / p) for p, q in zip(ps, pt))
    got = kd_loss(torch.tensor([s]), torch.tensor([t]), tau, standardize=True)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_invariant_to_logit_shift_and_scale() -> None:
    """The paper's point: a student need not match the teacher's logit range, only its relations."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    base = kd_loss(s, t, 2.0, standardize=True)
    torch.testing.assert_close(kd_loss(3.0 * s + 7.0, 0.5 * t - 2.0, 2.0, standardize=True), base, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(kd_loss(3.0 * s + 7.0, t, 2.0), kd_loss(s, t, 2.0))  # plain KD is not invariant
    assert kd_loss(5.0 * t + 1.0, t, 2.0, standardize=True).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_parity_with_torchdistill(tau: float) -> None:
    g = torch.Generator().manual_seed(int(tau))
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    io_s, io_t = {"fc": {"output": s}}, {"fc": {"output": t}}
    ours = KDLoss(temperature=tau, standardize=True)(_batch(s, t))
    # torchdistill with alpha unset returns the KL without the τ² factor (its docstring's formula has it) ...
    theirs_soft = LogitStdKDLoss("fc", "output", "fc", "output", temperature=tau, beta=1.0)(io_s, io_t)
    torch.testing.assert_close(ours, tau**2 * theirs_soft, rtol=1e-5, atol=1e-6)
    if tau != 1.0:
        assert not torch.allclose(ours, theirs_soft)  # ... which is the difference this test documents
    # ... and with alpha/beta it matches task_weight·CE + weight·τ²·KL exactly
    theirs = LogitStdKDLoss("fc", "output", "fc", "output", temperature=tau, alpha=0.1, beta=0.9)(io_s, io_t, y)
    expected = 0.1 * torch.nn.functional.cross_entropy(s, y) + 0.9 * ours
    torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=1e-6)


def test_float32_under_low_precision() -> None:
    s = torch.randn(4, 10).to(torch.bfloat16)
    t = torch.randn(4, 10).to(torch.bfloat16)
    out = kd_loss(s, t, 4.0, standardize=True)
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_yaml_option() -> None:
    cfg = compose(["loss=kd", "loss.terms.kd.standardize=true", "loss.terms.kd.temperature=2"])
    term = build_terms(cfg.loss.terms)["kd"]
    assert isinstance(term, KDLoss) and term.standardize and term.temperature == 2.0


def test_dkd_standardize_equals_dkd_on_zscored_logits_and_is_invariant() -> None:
    from lightning_kd.losses.dkd import DKDLoss, dkd_loss

    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    expected = dkd_loss(standardize_logits(s), standardize_logits(t), y, 1.0, 8.0, 2.0)
    torch.testing.assert_close(dkd_loss(s, t, y, 1.0, 8.0, 2.0, standardize=True), expected)
    shifted = dkd_loss(4.0 * s - 3.0, 0.25 * t + 1.0, y, 1.0, 8.0, 2.0, standardize=True)
    torch.testing.assert_close(shifted, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(dkd_loss(4.0 * s, t, y, 1.0, 8.0, 2.0), dkd_loss(s, t, y, 1.0, 8.0, 2.0))
    term = DKDLoss(temperature=2.0, warmup=0, standardize=True)
    parts = term(DistillBatch(ModelOutputs(s), ModelOutputs(t), targets=y))
    torch.testing.assert_close(sum(parts.values()), expected)
