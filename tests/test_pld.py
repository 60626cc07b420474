"""Plackett–Luce distillation (:mod:`lightning_kd.losses.pld`): hand-worked values with ``math`` only, the special cases
the paper states (cross-entropy, ListMLE), translation invariance, convexity, the closed-form gradient of Appendix A,
errors, dtype, a real timm pair through Lightning and the YAML config (CPU).

torchdistill 1.1.5 has no PLD: there is no parity test."""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import timm
import torch
from conftest import fast_trainer, gen, random_data
from omegaconf import OmegaConf

import lightning_kd
from lightning_kd.config import CONF_DIR, compose
from lightning_kd.engine import build_terms
from lightning_kd.losses import DistillBatch, ModelOutputs, create_loss
from lightning_kd.losses.pld import PLDLoss, plackett_luce_nll, pld_loss, teacher_optimal_permutation

TOL = {"atol": 1e-5, "rtol": 1e-5}


def batch_of(s: torch.Tensor, t: torch.Tensor, targets: torch.Tensor | None) -> DistillBatch:
    return DistillBatch(ModelOutputs(s), ModelOutputs(t), targets=targets)


# ------------------------------------------------------------------------------------------------ plain-math reference
def _softmax(z: list[float], tau: float = 1.0) -> list[float]:
    e = [math.exp(v / tau) for v in z]
    return [v / sum(e) for v in e]


def _pl_steps(s: list[float], perm: list[int]) -> list[float]:
    """−log P(choose perm[k] among perm[k:]) for every step k."""
    return [-s[perm[k]] + math.log(sum(math.exp(s[j]) for j in perm[k:])) for k in range(len(perm))]


def _hand_pld(s: list[float], t: list[float], y: int, tau: float = 1.0) -> float:
    others = sorted((i for i in range(len(t)) if i != y), key=lambda i: -t[i])
    perm = [y, *others]
    q = _softmax(t, tau)
    return sum(q[c] * step for c, step in zip(perm, _pl_steps(s, perm)))


# --------------------------------------------------------------------------------------------------- hand-worked
def test_hand_worked_three_classes() -> None:
    # label 1; teacher order of the rest: class 0 (t = 3) then class 2 (t = 0.5)  ->  π* = (1, 0, 2)
    s, t, y = [1.0, 2.0, 0.0], [3.0, 1.0, 0.5], 1
    q = _softmax(t)
    e = [math.exp(v) for v in s]
    step1 = -s[1] + math.log(e[0] + e[1] + e[2])  # label chosen among all three
    step2 = -s[0] + math.log(e[0] + e[2])  # then class 0 among {0, 2}
    expected = q[1] * step1 + q[0] * step2 + q[2] * 0.0  # the last choice is forced: log 1 = 0
    assert expected == pytest.approx(_hand_pld(s, t, y), rel=1e-12)
    st, tt, yt = torch.tensor([s]), torch.tensor([t]), torch.tensor([y])
    assert teacher_optimal_permutation(tt, yt).tolist() == [[1, 0, 2]]
    assert float(pld_loss(st, tt, yt)) == pytest.approx(expected, rel=1e-6)
    assert float(PLDLoss()(batch_of(st, tt, yt))) == pytest.approx(expected, rel=1e-6)
    # teacher temperature changes only the weights α_k = softmax(t/τ)[π*_k]
    q4 = _softmax(t, 4.0)
    expected4 = q4[1] * step1 + q4[0] * step2
    assert float(pld_loss(st, tt, yt, temperature=4.0)) == pytest.approx(expected4, rel=1e-6)
    assert abs(expected4 - expected) > 1e-2


def test_batch_mean_of_per_sample_losses_five_classes() -> None:
    s = torch.randn(6, 5, generator=gen(1)) * 2
    t = torch.randn(6, 5, generator=gen(2)) * 2
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    per = [_hand_pld(s[i].tolist(), t[i].tolist(), int(y[i]), 2.0) for i in range(6)]
    assert float(pld_loss(s, t, y, temperature=2.0)) == pytest.approx(sum(per) / 6, rel=1e-5)


def test_permutation_puts_label_first_then_teacher_order() -> None:
    t = torch.tensor([[0.1, 5.0, -1.0, 2.0], [3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    y = torch.tensor([2, 0, 3])
    perm = teacher_optimal_permutation(t, y)
    # the label is first even when the teacher ranks it last; ties keep class-index order (stable sort)
    assert perm.tolist() == [[2, 1, 3, 0], [0, 1, 2, 3], [3, 0, 1, 2]]
    assert perm.dtype == torch.long
    for row in perm.tolist():
        assert sorted(row) == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------------------ special cases
def test_one_hot_weights_give_cross_entropy() -> None:
    s = torch.randn(5, 7, generator=gen(3)) * 3
    t = torch.randn(5, 7, generator=gen(4))
    y = torch.tensor([0, 6, 3, 3, 1])
    perm = teacher_optimal_permutation(t, y)
    w = torch.zeros(7)
    w[0] = 1.0
    # CE by hand: −s_y + log Σ exp s
    ce = [-float(s[i, y[i]]) + math.log(sum(math.exp(v) for v in s[i].tolist())) for i in range(5)]
    torch.testing.assert_close(plackett_luce_nll(s, perm, w), torch.tensor(ce), **TOL)


def test_confident_teacher_reduces_pld_to_cross_entropy() -> None:
    # a teacher that puts (almost) all its mass on the label gives α ≈ (1, 0, ..., 0): PLD ≈ CE on the label
    s = torch.randn(4, 6, generator=gen(5))
    y = torch.tensor([1, 0, 5, 2])
    t = torch.randn(4, 6, generator=gen(6))
    t[torch.arange(4), y] = 40.0
    ce = [-float(s[i, y[i]]) + math.log(sum(math.exp(v) for v in s[i].tolist())) for i in range(4)]
    assert float(pld_loss(s, t, y)) == pytest.approx(sum(ce) / 4, rel=1e-5)


def test_uniform_weights_give_listmle() -> None:
    s = torch.randn(3, 5, generator=gen(7))
    t = torch.randn(3, 5, generator=gen(8))
    y = torch.tensor([4, 0, 2])
    perm = teacher_optimal_permutation(t, y)
    # ListMLE: −log P_PL(π* | s) = Σ_k (−s_{π_k} + log Σ_{j≥k} exp s_{π_j})
    listmle = [sum(_pl_steps(s[i].tolist(), perm[i].tolist())) for i in range(3)]
    # and −log of the product of the sequential choice probabilities, written as a product
    for i in range(3):
        p, rest = 1.0, perm[i].tolist()
        while rest:
            p *= math.exp(s[i, rest[0]]) / sum(math.exp(s[i, j]) for j in rest)
            rest = rest[1:]
        assert -math.log(p) == pytest.approx(listmle[i], rel=1e-9)
    torch.testing.assert_close(plackett_luce_nll(s, perm, torch.full((5,), 1 / 5)), torch.tensor(listmle) / 5, **TOL)


# ------------------------------------------------------------------------------------------------ properties
def test_translation_invariance_and_not_scale_invariance() -> None:
    s = torch.randn(5, 8, generator=gen(9))
    t = torch.randn(5, 8, generator=gen(10))
    y = torch.randint(0, 8, (5,), generator=gen(11))
    ref = pld_loss(s, t, y)
    shift = torch.randn(5, 1, generator=gen(12)) * 10  # a different constant per sample
    torch.testing.assert_close(pld_loss(s + shift, t, y), ref, **TOL)
    torch.testing.assert_close(pld_loss(s, t + shift, y), ref, **TOL)  # neither the order nor softmax(t) changes
    assert abs(float(pld_loss(3 * s, t, y)) - float(ref)) > 1e-2


def test_convex_along_lines_in_student_logits() -> None:
    t = torch.randn(4, 6, generator=gen(13))
    y = torch.tensor([0, 1, 2, 5])
    for seed in range(5):
        a = torch.randn(4, 6, generator=gen(100 + seed)) * 3
        b = torch.randn(4, 6, generator=gen(200 + seed)) * 3
        fa, fb = float(pld_loss(a, t, y)), float(pld_loss(b, t, y))
        for lam in (0.1, 0.25, 0.5, 0.75, 0.9):
            mid = float(pld_loss(lam * a + (1 - lam) * b, t, y))
            assert mid <= lam * fa + (1 - lam) * fb + 1e-5
        # and discrete second differences along the line are non-negative
        xs = [float(pld_loss(a + h * (b - a), t, y)) for h in torch.linspace(-1, 2, 31).tolist()]
        assert all(xs[i - 1] - 2 * xs[i] + xs[i + 1] >= -1e-5 for i in range(1, 30))


def test_gradient_matches_closed_form_of_appendix_a() -> None:
    # ∇_s L = Σ_k α_k (σ_k − e_{π_k}), σ_k = softmax over the classes not yet chosen at step k; batch mean
    s = torch.randn(3, 5, generator=gen(14)).requires_grad_()
    t = torch.randn(3, 5, generator=gen(15))
    y = torch.tensor([3, 3, 0])
    pld_loss(s, t, y, temperature=1.5).backward()
    sv = s.detach()
    expected = torch.zeros(3, 5)
    for i in range(3):
        q = _softmax(t[i].tolist(), 1.5)
        others = sorted((c for c in range(5) if c != int(y[i])), key=lambda c: -float(t[i, c]))
        perm = [int(y[i]), *others]
        for k in range(5):
            rest = perm[k:]
            z = sum(math.exp(float(sv[i, j])) for j in rest)
            for j in rest:
                expected[i, j] += q[perm[k]] * math.exp(float(sv[i, j])) / z
            expected[i, perm[k]] -= q[perm[k]]
    torch.testing.assert_close(s.grad, expected / 3, **TOL)
    torch.testing.assert_close(s.grad.sum(1), torch.zeros(3), **TOL)  # translation invariance


def test_tied_teacher_logits_are_deterministic() -> None:
    s = torch.randn(2, 4, generator=gen(16))
    t = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 2.0, 0.0]])
    y = torch.tensor([2, 1])
    values = {float(pld_loss(s, t, y)) for _ in range(3)}
    assert len(values) == 1
    assert teacher_optimal_permutation(t, y).tolist() == [[2, 0, 1, 3], [1, 0, 2, 3]]


# ------------------------------------------------------------------------------------------------ errors and dtypes
def test_needs_labels() -> None:
    s, t = torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="pld: the batch has no targets"):
        PLDLoss()(batch_of(s, t, None))
    with pytest.raises(ValueError, match="hard class labels"):
        pld_loss(s, t, torch.full((2, 3), 1 / 3))  # soft labels
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        pld_loss(s, torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="3 targets"):
        pld_loss(s, t, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="at least 2 classes"):
        pld_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="temperature"):
        PLDLoss(temperature=0.0)
    # labels given as (B, 1) are accepted
    assert float(pld_loss(s, t, torch.tensor([[0], [2]]))) == pytest.approx(float(pld_loss(s, t, torch.tensor([0, 2]))))


def test_gradients_reach_student_only() -> None:
    s = torch.randn(4, 6, generator=gen(17)).requires_grad_()
    t = torch.randn(4, 6, generator=gen(18)).requires_grad_()  # even a teacher tensor with grad is detached
    y = torch.tensor([0, 1, 2, 3])
    out = PLDLoss()(batch_of(s, t, y))
    assert out.dtype == torch.float32 and out.dim() == 0
    out.backward()
    assert t.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_give_float32(dtype: torch.dtype) -> None:
    s = (torch.randn(4, 10, generator=gen(19)) * 3).to(dtype)
    t = (torch.randn(4, 10, generator=gen(20)) * 3).to(dtype)
    y = torch.tensor([9, 0, 4, 4])
    out = pld_loss(s, t, y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, pld_loss(s.float(), t.float(), y), **TOL)


def test_extreme_logits_stay_finite() -> None:
    s = torch.tensor([[1000.0, -1000.0, 0.0], [-500.0, 500.0, 80.0]], requires_grad=True)
    t = torch.tensor([[-1000.0, 1000.0, 0.0], [300.0, -300.0, 0.0]])
    out = pld_loss(s, t, torch.tensor([0, 2]))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


# ----------------------------------------------------------------------------------------------- config and Lightning
def test_yaml_builds_the_term_with_its_values() -> None:
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / "pld.yaml"))
    values = yaml["terms"]["pld"]
    assert sorted(values) == sorted(p for p in inspect.signature(PLDLoss.__init__).parameters if p != "self")
    assert yaml["task_weight"] == 0.0  # PLD replaces the cross-entropy
    cfg = compose(["loss=pld"])
    assert cfg.loss.task_weight == 0.0
    term = build_terms(cfg.loss.terms)["pld"]
    assert isinstance(term, PLDLoss)
    assert term.weight == values["weight"] == 1.0
    assert term.temperature == values["temperature"] == 1.0
    assert isinstance(create_loss("pld"), PLDLoss)


def test_timm_resnet_pair_through_lightning() -> None:
    torch.manual_seed(0)
    student = timm.create_model("resnet18", num_classes=10)
    teacher = timm.create_model("resnet34", num_classes=10)
    module = lightning_kd.DistillationModule(student, teacher, loss="pld", task_weight=0.0)
    data = random_data(n=8, size=32)
    trainer = fast_trainer(max_steps=1)
    before = [p.detach().clone() for p in student.parameters()]
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    assert "train/pld" in metrics
    assert math.isfinite(float(metrics["train/pld"])) and float(metrics["train/pld"]) > 0
    # with task_weight 0 the total loss is the PLD term alone
    torch.testing.assert_close(metrics["train/loss"], metrics["train/pld"], **TOL)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_all_permutations_likelihoods_sum_to_one() -> None:
    # sanity of the Plackett–Luce factorisation used by plackett_luce_nll: Σ_π P(π | s) = 1 over the C! rankings
    s = torch.randn(1, 4, generator=gen(21))
    perms = torch.tensor(list(itertools.permutations(range(4))))
    nll = plackett_luce_nll(s.expand(len(perms), -1), perms, torch.ones(4))
    assert float(torch.exp(-nll).sum()) == pytest.approx(1.0, rel=1e-5)
