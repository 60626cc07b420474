"""Tests of PKT (:mod:`lightning_kd.losses.pkt`): hand computations with ``math`` only, invariances, gradients,
dtype, parity with torchdistill's ``PKTLoss`` (a copy of the authors' ``cosine_similarity_loss``) and the YAML."""

from __future__ import annotations

import math

import pytest
import torch
from torchdistill.losses.mid_level import PKTLoss as TDPKTLoss

from lightning_kd.engine import build_terms
from lightning_kd.losses import DistillBatch, ModelOutputs, get_loss_class
from lightning_kd.losses.pkt import PKTLoss, pkt_loss

TOL = {"atol": 1e-6, "rtol": 1e-5}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(term: PKTLoss, s: torch.Tensor, t: torch.Tensor) -> DistillBatch:
    b = len(s)
    return DistillBatch(
        ModelOutputs(torch.zeros(b, 3), {term.student_tap: s}),
        ModelOutputs(torch.zeros(b, 3), {term.teacher_tap: t}),
    )


def _hand_pkt(s: list[list[float]], t: list[list[float]]) -> float:
    """The formula, written out with ``math`` (eps = 0)."""

    def probs(x: list[list[float]]) -> list[list[float]]:
        norms = [math.sqrt(sum(v * v for v in row)) for row in x]
        k = [
            [(sum(a * b for a, b in zip(xi, xj)) / (ni * nj) + 1) / 2 for xj, nj in zip(x, norms)]
            for xi, ni in zip(x, norms)
        ]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = probs(s), probs(t)
    n = len(s)
    return sum(pt[i][j] * math.log(pt[i][j] / ps[i][j]) for i in range(n) for j in range(n)) / (n * n)


def test_hand_worked_two_samples() -> None:
    # student: orthogonal (cos 0) -> K = [[1, .5], [.5, 1]], P = [[2/3, 1/3], [1/3, 2/3]]
    # teacher: parallel (cos 1)  -> K = 1, P = 1/2 everywhere
    # loss = (2 * .5 log(.5 / (2/3)) + 2 * .5 log(.5 / (1/3))) / 4 = log(9/8) / 4
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[3.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(pkt_loss(s, t)) == pytest.approx(math.log(9 / 8) / 4, rel=1e-5)
    assert float(PKTLoss()(batch(PKTLoss(), s, t))) == pytest.approx(math.log(9 / 8) / 4, rel=1e-5)


def test_hand_worked_three_samples() -> None:
    s = [[1.0, 0.0], [0.5, 2.0], [-1.0, -0.3]]
    t = [[0.2, 1.0, -1.0], [2.0, 0.0, 1.0], [-0.5, 0.5, 0.5]]
    expected = _hand_pkt(s, t)
    assert expected > 1e-3
    assert float(pkt_loss(torch.tensor(s), torch.tensor(t))) == pytest.approx(expected, rel=1e-5)
    # KL is asymmetric: swapping roles changes the value
    assert float(pkt_loss(torch.tensor(t)[:, :2], torch.tensor(s))) != pytest.approx(expected, rel=1e-3)


def test_zero_for_equal_scaled_and_rotated_embeddings() -> None:
    x = torch.randn(8, 16, generator=gen(1))
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen(2), dtype=torch.float64))
    term = PKTLoss()
    for s in (x, 3.7 * x, 0.05 * x, x @ q.float()):
        assert abs(float(term(batch(term, s, x)))) < 1e-6
    # a 32-wide teacher isometric to x (x embedded then rotated) also gives zero
    q32, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen(3), dtype=torch.float64))
    t32 = torch.cat([x, torch.zeros(8, 16)], dim=1) @ q32.float()
    assert abs(float(term(batch(term, 2.0 * x, t32)))) < 1e-6
    # ... and a non-isometric student does not
    assert float(term(batch(term, x * torch.linspace(0.1, 3.0, 16), x))) > 1e-5
    assert float(term(batch(term, torch.randn(8, 16, generator=gen(4)), x))) > 1e-4


def test_different_widths() -> None:
    term = PKTLoss()
    s, t = torch.randn(6, 8, generator=gen(5)), torch.randn(6, 16, generator=gen(6))
    out = term(batch(term, s, t))
    assert out.shape == () and torch.isfinite(out) and float(out) > 0
    # 4-D features are flattened per sample
    out4 = term(batch(term, s.view(6, 2, 2, 2), t.view(6, 4, 2, 2)))
    torch.testing.assert_close(out4, out)


def test_gradients_reach_the_student_only() -> None:
    s = torch.randn(8, 8, generator=gen(7), requires_grad=True)
    t = torch.randn(8, 16, generator=gen(8), requires_grad=True)
    term = PKTLoss()
    term(batch(term, s, t)).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_zero_vector_and_batch_of_one() -> None:
    s = torch.randn(4, 8, generator=gen(9))
    s[1] = 0.0
    s.requires_grad_(True)
    t = torch.randn(4, 8, generator=gen(10))
    term = PKTLoss()
    loss = term(batch(term, s, t))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match="at least 2"):
        term(batch(term, torch.randn(1, 8), torch.randn(1, 8)))


@pytest.mark.parametrize("eps", [1e-7, 1e-3])
def test_matches_torchdistill(eps: float) -> None:
    s, t = torch.randn(16, 8, generator=gen(11)), torch.randn(16, 16, generator=gen(12))
    td = TDPKTLoss("fc", "input", "fc", "input", eps=eps)
    ref = td({"fc": {"input": s.clone()}}, {"fc": {"input": t.clone()}})
    term = PKTLoss(eps=eps)
    torch.testing.assert_close(term(batch(term, s, t)), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pkt_loss(s, t, eps), ref, atol=1e-5, rtol=1e-5)


def test_bf16_inputs_give_float32() -> None:
    s, t = torch.randn(8, 8, generator=gen(13)), torch.randn(8, 16, generator=gen(14))
    term = PKTLoss()
    out = term(batch(term, s.bfloat16(), t.bfloat16()))
    assert out.dtype == torch.float32
    ref = pkt_loss(s.bfloat16().float(), t.bfloat16().float())
    torch.testing.assert_close(out, ref, **TOL)


def test_yaml_builds_the_term() -> None:
    from lightning_kd.config import compose

    cfg = compose(["loss=pkt"])
    assert cfg.loss.task_weight == 1.0
    terms = build_terms(cfg.loss.terms)
    assert list(terms) == ["pkt"] and isinstance(terms["pkt"], PKTLoss)
    assert get_loss_class("pkt") is PKTLoss
    assert PKTLoss().weight == 30000.0 and PKTLoss().eps == 1e-7
    term = terms["pkt"]
    assert term.weight == 30000.0 and term.eps == 1e-7
    assert [str(x) for x in term.taps()["student"]] == [str(x) for x in PKTLoss().taps()["student"]]
    assert term.student_taps == [term.student_tap] and term.teacher_taps == [term.teacher_tap]
