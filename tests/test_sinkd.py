"""Tests of SinKD (:mod:`lightning_kd.losses.sinkd`), CPU.

References: hand computations with ``math`` only (one Sinkhorn step on B = 2, and the closed form of the converged
2×2 plan), the authors' plain (non-log-domain) iteration re-written here from ``2018cx/SinKD`` ``loss.py``, and the
properties of entropic optimal transport. torchdistill has no Sinkhorn / SinKD loss, so there is no parity test.
"""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import fit_pair
from omegaconf import OmegaConf
from torch import nn

from lightning_kd.config import CONF_DIR, compose
from lightning_kd.engine import build_terms
from lightning_kd.losses import DistillBatch, ModelOutputs, SetupContext, create_loss
from lightning_kd.losses.sinkd import SinKDLoss, sinkd_loss, sinkhorn_cost, sinkhorn_plan

TOL = {"atol": 1e-5, "rtol": 1e-5}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch_of(s: torch.Tensor, t: torch.Tensor) -> DistillBatch:
    return DistillBatch(ModelOutputs(s), ModelOutputs(t))


def plain_sinkhorn_loss(
    y_s: torch.Tensor, y_t: torch.Tensor, tau: float, eps: float, iters: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The authors' algorithm as written in ``loss.py`` (division by the sums, not log domain), float64 by default."""
    p_s = torch.softmax(y_s.to(dtype) / tau, dim=1)
    p_t = torch.softmax(y_t.to(dtype) / tau, dim=1)
    w = torch.cdist(p_s, p_t, p=1)
    x = torch.exp(-w / eps)
    for _ in range(iters):
        x = x / torch.sum(x, dim=1, keepdim=True)
        x = x / torch.sum(x, dim=0, keepdim=True)
    return torch.sum(x * w)


# --------------------------------------------------------------------------------------------------- hand-worked
def _softmax(z: list[float], tau: float) -> list[float]:
    e = [math.exp(v / tau) for v in z]
    return [v / sum(e) for v in e]


S2 = [[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]]
T2 = [[1.0, 1.0, -2.0], [-1.0, 2.0, 0.0]]


def _hand_cost(tau: float) -> list[list[float]]:
    ps = [_softmax(z, tau) for z in S2]
    pt = [_softmax(z, tau) for z in T2]
    return [[sum(abs(a - b) for a, b in zip(ps[i], pt[j])) for j in range(2)] for i in range(2)]


def test_hand_worked_two_samples_one_iteration() -> None:
    tau, eps = 2.0, 0.1
    w = _hand_cost(tau)
    k = [[math.exp(-w[i][j] / eps) for j in range(2)] for i in range(2)]
    r = [[k[i][j] / (k[i][0] + k[i][1]) for j in range(2)] for i in range(2)]  # rows sum to 1
    p = [[r[i][j] / (r[0][j] + r[1][j]) for j in range(2)] for i in range(2)]  # then columns sum to 1
    expected = sum(p[i][j] * w[i][j] for i in range(2) for j in range(2))
    assert expected > 1e-2
    got = sinkd_loss(torch.tensor(S2), torch.tensor(T2), tau, eps, iterations=1)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # the cost matrix itself
    torch.testing.assert_close(
        sinkhorn_cost(torch.softmax(torch.tensor(S2) / tau, 1), torch.softmax(torch.tensor(T2) / tau, 1)),
        torch.tensor(w),
        **TOL,
    )


@pytest.mark.parametrize("eps", [0.1, 0.05, 0.5])
def test_hand_worked_two_samples_converged_closed_form(eps: float) -> None:
    # a 2×2 matrix with unit row and column sums is [[a, 1 − a], [1 − a, a]]; Sinkhorn keeps the cross ratio
    # P11·P22 / (P12·P21) = K11·K22 / (K12·K21) = exp(−(w11 + w22 − w12 − w21) / ε), which fixes a
    tau = 2.0
    w = _hand_cost(tau)
    a = 1.0 / (1.0 + math.exp((w[0][0] + w[1][1] - w[0][1] - w[1][0]) / (2 * eps)))
    expected = a * (w[0][0] + w[1][1]) + (1 - a) * (w[0][1] + w[1][0])
    # small ε converges slowly (here K12 = e^(−0.98/ε)): run the iteration to convergence
    got = sinkd_loss(torch.tensor(S2), torch.tensor(T2), tau, eps, iterations=2000)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    term = SinKDLoss(temperature=tau, epsilon=eps, iterations=2000)
    assert float(term(batch_of(torch.tensor(S2), torch.tensor(T2)))) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------- log domain == authors' iteration
@pytest.mark.parametrize(("eps", "iters"), [(0.1, 20), (0.1, 1), (0.3, 5), (0.05, 50)])
def test_log_domain_equals_the_plain_iteration(eps: float, iters: int) -> None:
    s = (torch.randn(6, 8, generator=gen(0)) * 3).double()
    t = (torch.randn(6, 8, generator=gen(1)) * 3).double()
    s_ours, s_plain = s.clone().float().requires_grad_(), s.clone().requires_grad_()
    ours = sinkd_loss(s_ours, t.float(), 2.0, eps, iters)
    plain = plain_sinkhorn_loss(s_plain, t, 2.0, eps, iters)
    assert float(plain.detach()) > 1e-2
    assert float(ours.detach()) == pytest.approx(float(plain.detach()), rel=1e-5)
    ours.backward()
    plain.backward()  # gradients through the plan as well as through W, as in the authors' code
    torch.testing.assert_close(s_ours.grad, s_plain.grad.float(), atol=1e-5, rtol=1e-4)


def test_small_epsilon_stays_finite_where_the_plain_iteration_fails() -> None:
    # students confident on classes 0-2, every teacher confident on class 3: all costs ≈ 2, and in float32
    # e^(−2/0.01) = e^(−200) underflows to 0, so the plain iteration divides 0 by 0
    s = torch.eye(3, 4) * 12.0
    t = torch.zeros(3, 4)
    t[:, 3] = 12.0
    t[0, 0] = 1.0
    plain = plain_sinkhorn_loss(s, t, 1.0, 0.01, 20, dtype=torch.float32)
    assert not torch.isfinite(plain)
    ours = sinkd_loss(s.requires_grad_(), t, 1.0, 0.01, 20)
    ours.backward()
    assert torch.isfinite(ours) and torch.isfinite(s.grad).all()
    # and it agrees with the plain iteration in float64, where nothing underflows yet
    assert float(ours.detach()) == pytest.approx(float(plain_sinkhorn_loss(s.detach(), t, 1.0, 0.01, 20)), rel=1e-5)


# ------------------------------------------------------------------------------------------------------ properties
def test_plan_has_unit_marginals() -> None:
    p_s = torch.softmax(torch.randn(7, 5, generator=gen(2)) * 2, 1)
    p_t = torch.softmax(torch.randn(7, 5, generator=gen(3)) * 2, 1)
    cost = sinkhorn_cost(p_s, p_t)
    plan = sinkhorn_plan(cost, 0.1, 2000)
    assert (plan > 0).all()
    torch.testing.assert_close(plan.sum(0), torch.ones(7), atol=1e-6, rtol=0)  # last step: columns exactly
    torch.testing.assert_close(plan.sum(1), torch.ones(7), atol=1e-4, rtol=0)  # rows: converged
    # with the default 20 iterations the columns are exact and the rows close
    plan20 = sinkhorn_plan(cost, 0.1, 20)
    torch.testing.assert_close(plan20.sum(0), torch.ones(7), atol=1e-6, rtol=0)
    assert (plan20.sum(1) - 1).abs().max() < 0.05
    # the loss is the plan-weighted cost: B times the cost of the uniform-marginal plan plan/B
    assert float((plan * cost).sum()) == pytest.approx(7 * float((plan / 7 * cost).sum()), rel=1e-6)


def test_equal_distributions_give_a_small_positive_loss_that_vanishes_with_epsilon() -> None:
    # the diagonal coupling costs 0, but the entropic plan spreads mass off the diagonal: the loss at p_S == p_T is
    # > 0 and tends to 0 as ε → 0 (the plan tends to the identity); the plan is symmetric since W and K are
    z = torch.randn(6, 10, generator=gen(4)) * 3
    values = [float(sinkd_loss(z, z.clone(), 2.0, eps, 300)) for eps in (0.2, 0.1, 0.05, 0.02)]
    assert values[0] > 1e-3
    assert all(a > b for a, b in itertools.pairwise(values))
    assert values[-1] < 1e-6
    p = torch.softmax(z / 2, 1)
    plan = sinkhorn_plan(sinkhorn_cost(p, p), 0.02, 300)
    torch.testing.assert_close(plan, torch.eye(6), atol=1e-4, rtol=0)
    plan = sinkhorn_plan(sinkhorn_cost(p, p), 0.1, 300)
    torch.testing.assert_close(plan, plan.t(), atol=1e-5, rtol=0)


def test_matching_the_teacher_is_near_minimal() -> None:
    t = torch.randn(8, 10, generator=gen(5)) * 3
    at_teacher = float(sinkd_loss(t, t))
    for seed in range(5):
        s = t + torch.randn(8, 10, generator=gen(10 + seed))
        assert float(sinkd_loss(s, t)) > at_teacher
    # a collapsed student (every sample the same distribution) is far worse
    assert float(sinkd_loss(t.mean(0, keepdim=True).expand(8, 10), t)) > 10 * at_teacher


def test_invariances() -> None:
    s = torch.randn(6, 7, generator=gen(6)) * 2
    t = torch.randn(6, 7, generator=gen(7)) * 2
    ref = sinkd_loss(s, t)
    # a constant shift of each row of logits changes no softmax
    torch.testing.assert_close(sinkd_loss(s + torch.randn(6, 1, generator=gen(8)) * 5, t), ref, **TOL)
    # the same permutation of the classes on both sides
    perm = torch.randperm(7, generator=gen(9))
    torch.testing.assert_close(sinkd_loss(s[:, perm], t[:, perm]), ref, **TOL)
    # batch-wise transport compares sets: re-ordering the teacher's samples alone changes nothing
    order = torch.randperm(6, generator=gen(10))
    torch.testing.assert_close(sinkd_loss(s, t[order]), ref, **TOL)
    torch.testing.assert_close(sinkd_loss(s[order], t[order]), ref, **TOL)
    # ... whereas a per-sample divergence (KD) does change
    kl = F.kl_div(F.log_softmax(s / 2, 1), F.log_softmax(t / 2, 1), reduction="batchmean", log_target=True)
    kl_perm = F.kl_div(F.log_softmax(s / 2, 1), F.log_softmax(t[order] / 2, 1), reduction="batchmean", log_target=True)
    assert abs(float(kl) - float(kl_perm)) > 1e-3
    # a temperature change does change the loss
    assert abs(float(sinkd_loss(s, t, temperature=4.0)) - float(ref)) > 1e-3


def test_loss_grows_with_the_batch() -> None:
    # a sum over the B×B plan: duplicating the batch doubles the loss (each copy carries half of each row/column)
    s = torch.randn(4, 6, generator=gen(11)) * 2
    t = torch.randn(4, 6, generator=gen(12)) * 2
    one = sinkd_loss(s, t, iterations=300)
    two = sinkd_loss(torch.cat([s, s]), torch.cat([t, t]), iterations=300)
    assert float(two) == pytest.approx(2 * float(one), rel=1e-4)


# ----------------------------------------------------------------------------------------------- gradients, dtypes
def test_gradients_reach_student_only() -> None:
    s = (torch.randn(5, 6, generator=gen(13)) * 2).requires_grad_()
    t = (torch.randn(5, 6, generator=gen(14)) * 2).requires_grad_()
    out = SinKDLoss()(batch_of(s, t))
    assert out.dtype == torch.float32 and out.dim() == 0
    out.backward()
    assert t.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # softmax inputs: shifting a student row changes nothing, so each row's gradient sums to 0
    torch.testing.assert_close(s.grad.sum(1), torch.zeros(5), atol=1e-6, rtol=0)


def test_plan_is_not_detached() -> None:
    # the authors differentiate through the 20 normalisations: the gradient differs from the one with P held fixed
    s = (torch.randn(6, 5, generator=gen(15)) * 2).requires_grad_()
    t = torch.randn(6, 5, generator=gen(16)) * 2
    sinkd_loss(s, t).backward()
    p_s, p_t = torch.softmax(s / 2, 1), torch.softmax(t / 2, 1)
    cost = sinkhorn_cost(p_s, p_t)
    (grad_fixed,) = torch.autograd.grad((sinkhorn_plan(cost, 0.1, 20).detach() * cost).sum(), s)
    assert (s.grad - grad_fixed).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_give_float32(dtype: torch.dtype) -> None:
    s = (torch.randn(8, 10, generator=gen(17)) * 3).to(dtype)
    t = (torch.randn(8, 10, generator=gen(18)) * 3).to(dtype)
    out = sinkd_loss(s, t)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    torch.testing.assert_close(out, sinkd_loss(s.float(), t.float()), **TOL)
    assert SinKDLoss()(batch_of(s, t)).dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------- errors
def _ctx(s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> SetupContext:
    return SetupContext(
        student=ModelOutputs(torch.zeros(s_shape)),
        teacher=ModelOutputs(torch.zeros(t_shape)),
        student_model=nn.Identity(),
        teacher_model=nn.Identity(),
        num_classes=s_shape[-1],
    )


def test_bad_inputs_raise() -> None:
    term = SinKDLoss()
    term.setup(_ctx((4, 10), (4, 10)))
    with pytest.raises(ValueError) as err:
        term.setup(_ctx((4, 10), (4, 100)))
    msg = str(err.value)
    for piece in ("sinkd", "(4, 10)", "(4, 100)", "same classes"):
        assert piece in msg, msg
    with pytest.raises(ValueError, match="batch, classes"):
        sinkd_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="square"):
        sinkhorn_plan(torch.zeros(2, 3), 0.1, 5)
    with pytest.raises(ValueError, match="temperature"):
        SinKDLoss(temperature=0)
    with pytest.raises(ValueError, match="epsilon"):
        SinKDLoss(epsilon=-0.1)
    with pytest.raises(ValueError, match="iterations"):
        SinKDLoss(iterations=0)
    with pytest.raises(ValueError, match="iterations"):
        SinKDLoss(iterations=2.5)


# ----------------------------------------------------------------------------------------------- config and Lightning
def test_yaml_builds_the_term_with_its_values() -> None:
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / "sinkd.yaml"))
    values = yaml["terms"]["sinkd"]
    assert sorted(values) == sorted(p for p in inspect.signature(SinKDLoss.__init__).parameters if p != "self")
    cfg = compose(["loss=sinkd"])
    assert cfg.loss.task_weight == 1.0
    term = build_terms(cfg.loss.terms)["sinkd"]
    assert isinstance(term, SinKDLoss)
    assert (term.weight, term.temperature, term.epsilon, term.iterations) == (
        values["weight"],
        values["temperature"],
        values["epsilon"],
        values["iterations"],
    )
    assert (term.weight, term.temperature, term.epsilon, term.iterations) == (0.001, 2.0, 0.1, 20)
    default = create_loss("sinkd")
    assert (default.weight, default.temperature, default.epsilon, default.iterations) == (0.001, 2.0, 0.1, 20)


def test_timm_resnet_pair_through_lightning() -> None:
    _, trainer = fit_pair("sinkd", teacher="resnet18", size=16, steps=2)
    metrics = trainer.callback_metrics
    assert "train/sinkd" in metrics
    assert math.isfinite(float(metrics["train/sinkd"])) and float(metrics["train/sinkd"]) > 0
