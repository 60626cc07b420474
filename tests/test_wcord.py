"""WCoRD (:mod:`lightning_kd.losses.wcord`): hand-worked InfoNCE on a tiny bank, Sinkhorn OT against closed forms
and brute-force assignment, the critic's gradient penalty by hand, invariances, gradient routing, bf16, errors,
checkpoint round trip, the YAML and a timm pair through Lightning (CPU). The memory banks are shared with CRD and
tested in ``tests/test_crd.py`` (update math, sampling, DDP gather)."""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import warnings

import pytest
import timm
import torch
from conftest import fast_trainer, gen, random_data, total
from omegaconf import OmegaConf
from test_crd import batch_for, dot, identity_heads, unit
from torch import nn

import lightning_kd
from lightning_kd.config import CONF_DIR, compose
from lightning_kd.engine import build_terms
from lightning_kd.losses import ModelOutputs, SetupContext, create_loss
from lightning_kd.losses.memory import Embed
from lightning_kd.losses.wcord import WCoRDLoss, coupling, critic_gradient_penalty, ot_loss

TOL = {"atol": 1e-5, "rtol": 1e-5}


def ctx_for(term, s_shape: tuple[int, ...], t_shape: tuple[int, ...], n: int | None) -> SetupContext:
    return SetupContext(
        student=ModelOutputs(torch.zeros(s_shape[0], 3), {term.student_tap: torch.zeros(s_shape)}),
        teacher=ModelOutputs(torch.zeros(t_shape[0], 3), {term.teacher_tap: torch.zeros(t_shape)}),
        student_model=nn.Identity(),
        teacher_model=nn.Identity(),
        num_classes=3,
        num_samples=n,
    )


def make_term(s_dim: int = 6, t_dim: int = 10, n: int = 40, seed: int = 0, **kwargs) -> WCoRDLoss:
    kwargs.setdefault("nce_k", 7)
    kwargs.setdefault("feat_dim", 8)
    term = WCoRDLoss(**kwargs)
    torch.manual_seed(seed)
    term.setup(ctx_for(term, (2, s_dim), (2, t_dim), n))
    return term


# --------------------------------------------------------------------------------------------------- hand-worked
def test_hand_worked_global_infonce_on_a_tiny_bank() -> None:
    n, tau = 4, 0.5
    term = make_term(s_dim=2, t_dim=2, n=n, nce_k=2, feat_dim=2, nce_t=tau, negatives="instance", local_weight=0.0)
    identity_heads(term)
    angles = [0.0, 0.7, 2.0, -1.2]
    bank_t = [[math.cos(a), math.sin(a)] for a in angles]
    bank_s = [[math.cos(a + 0.3), math.sin(a + 0.3)] for a in angles]
    term.memory.teacher_bank.copy_(torch.tensor(bank_t))
    term.memory.student_bank.copy_(torch.tensor(bank_s))
    f_s, f_t = [[2.0, 1.0], [-1.0, 3.0]], [[0.0, 1.0], [1.0, -1.0]]
    idx = [[0, 2, 3], [1, 0, 2]]

    def infonce(bank: list[list[float]], anchors: list[list[float]]) -> float:
        out = 0.0
        for row, a in zip(idx, anchors):
            logits = [dot(bank[j], unit(a)) / tau for j in row]
            out += -(logits[0] - math.log(sum(math.exp(x) for x in logits)))
        return out / len(idx)

    expected = 0.8 * (infonce(bank_t, f_s) + infonce(bank_s, f_t))
    parts = term.contrast(torch.tensor(f_s), torch.tensor(f_t), torch.tensor([0, 1]), contrast_idx=torch.tensor(idx))
    assert set(parts) == {"global", "local"}
    assert parts["global"].item() == pytest.approx(expected, rel=1e-5)
    assert parts["local"].item() == 0.0
    # the banks were updated as in CRD (momentum 0.5, renormalised)
    mixed = unit([0.5 * a + 0.5 * b for a, b in zip(bank_t[1], unit(f_t[1]))])
    torch.testing.assert_close(term.memory.teacher_bank[1], torch.tensor(mixed), **TOL)


@pytest.mark.parametrize("eps", [0.5, 0.2])
def test_sinkhorn_two_points_closed_form(eps: float) -> None:
    # C = [[0, 1], [1, 0]]: the entropic plan is [[a, 1/2 − a], [1/2 − a, a]], a = 1/(2(1 + k)), k = exp(−1/ε),
    # so the transport cost <π, C> = k / (1 + k)
    cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    k = math.exp(-1 / eps)
    plan = coupling(cost, eps, 200)
    a = 1 / (2 * (1 + k))
    torch.testing.assert_close(plan, torch.tensor([[a, 0.5 - a], [0.5 - a, a]]), **TOL)
    assert float((plan * cost).sum()) == pytest.approx(k / (1 + k), rel=1e-5)


def test_sinkhorn_marginals_and_brute_force_assignment() -> None:
    # uniform weights on 4 + 4 points: exact OT is the best assignment (Birkhoff); small ε approaches it
    s = torch.randn(4, 5, generator=gen(1))
    t = torch.randn(4, 5, generator=gen(2))
    cost = 1 - nn.functional.normalize(s, dim=1) @ nn.functional.normalize(t, dim=1).t()
    best = min(sum(float(cost[i, p[i]]) for i in range(4)) / 4 for p in itertools.permutations(range(4)))
    plan = coupling(cost, 0.01, 2000)
    torch.testing.assert_close(plan.sum(1), torch.full((4,), 0.25), atol=1e-4, rtol=0)  # slow at small ε
    torch.testing.assert_close(plan.sum(0), torch.full((4,), 0.25), **TOL)  # exact after the column update
    # at the defaults (ε = 0.05, 100 iterations) a 64-sample batch is converged
    s64, t64 = torch.randn(64, 16, generator=gen(3)), torch.randn(64, 16, generator=gen(4))
    c64 = 1 - nn.functional.normalize(s64, dim=1) @ nn.functional.normalize(t64, dim=1).t()
    torch.testing.assert_close(coupling(c64, 0.05, 100).sum(1), torch.full((64,), 1 / 64), atol=1e-6, rtol=0)
    value = float(ot_loss(s, t, 0.01, 2000))
    assert value == pytest.approx(best, abs=1e-2)
    # larger ε: the plan spreads out and the cost rises above the optimum
    assert float(ot_loss(s, t, 1.0, 200)) > best + 0.05


def test_gradient_penalty_by_hand() -> None:
    # identity heads, no bias: e_s = f_s/‖f_s‖, e_t = f_t/‖f_t‖, g = ⟨e_t, e_s⟩/τ.
    # f_s = (3, 0), f_t = (0, 2): ∇_fs g = (I − e_s e_sᵀ) e_t / (τ‖f_s‖) = (0, 1)/(3τ), ∇_ft g = (1, 0)/(2τ)
    tau = 0.5
    embed_s, embed_t = Embed(2, 2), Embed(2, 2)
    with torch.no_grad():
        for head in (embed_s, embed_t):
            head.linear.weight.copy_(torch.eye(2))
            head.linear.bias.zero_()
    f_s, f_t = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    norm = math.sqrt((1 / (3 * tau)) ** 2 + (1 / (2 * tau)) ** 2)
    expected = (norm - 1) ** 2
    assert norm > 1
    assert critic_gradient_penalty(embed_s, embed_t, f_s, f_t, tau).item() == pytest.approx(expected, rel=1e-5)
    # a smoother critic (larger τ) is within the constraint: zero penalty
    assert critic_gradient_penalty(embed_s, embed_t, f_s, f_t, 5.0).item() == 0.0


# --------------------------------------------------------------------------------------------------- properties
def test_local_term_compares_distributions_not_pairs() -> None:
    s = torch.randn(6, 8, generator=gen(3))
    t = torch.randn(6, 8, generator=gen(4))
    ref = ot_loss(s, t)
    perm = torch.randperm(6, generator=gen(5))
    torch.testing.assert_close(ot_loss(s[perm], t), ref, **TOL)  # invariant to shuffling either batch
    torch.testing.assert_close(ot_loss(s, t[perm]), ref, **TOL)
    # (near) zero when the student embeddings are the teacher's, in any order and at any scale
    assert float(ot_loss(3 * t[perm], t)) < 1e-4
    assert float(ref) > 0.1
    # a per-sample pairing loss is not permutation invariant
    pairwise = lambda a, b: (1 - nn.functional.cosine_similarity(a, b)).mean()
    assert abs(float(pairwise(s[perm], t)) - float(pairwise(s, t))) > 1e-3


def test_global_term_rewards_aligned_positives() -> None:
    term = make_term(s_dim=4, t_dim=4, n=20, nce_k=10, feat_dim=4, negatives="instance", local_weight=0.0)
    identity_heads(term)
    f = torch.randn(5, 4, generator=gen(6))
    idx = torch.arange(5)
    contrast_idx = term.memory.draw(idx)
    aligned, random = copy.deepcopy(term), copy.deepcopy(term)
    aligned.memory.teacher_bank[:5] = nn.functional.normalize(f, dim=1)  # positives = the anchors themselves
    aligned.memory.student_bank[:5] = nn.functional.normalize(f, dim=1)
    good = aligned.contrast(f, f, idx, contrast_idx=contrast_idx)["global"]
    bad = random.contrast(f, f, idx, contrast_idx=contrast_idx)["global"]
    assert good.item() < bad.item()


# ----------------------------------------------------------------------------------------------- gradients and dtype
def test_gradients_reach_student_and_heads_never_the_teacher() -> None:
    term = make_term(s_dim=6, t_dim=10, n=30, seed=7, lipschitz_weight=0.1)
    f_s = torch.randn(5, 6, generator=gen(8), requires_grad=True)
    f_t = torch.randn(5, 10, generator=gen(9), requires_grad=True)
    batch = batch_for(term, f_s, f_t, torch.arange(5), torch.arange(5) % 3)
    parts = term(batch)
    assert set(parts) == {"global", "local", "lipschitz"} and parts["lipschitz"].item() > 0
    total(parts).backward()
    assert f_t.grad is None
    assert f_s.grad is not None and torch.isfinite(f_s.grad).all() and f_s.grad.abs().sum() > 0
    for p in term.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    # the local term pulls the student (and its head) only; the penalty trains the heads only
    for part, student_grad, heads in (("local", True, {"embed_s"}), ("lipschitz", False, {"embed_s", "embed_t"})):
        term.zero_grad()
        f_s.grad = None
        term(batch)[part].backward()
        assert (f_s.grad is not None and f_s.grad.abs().sum() > 0) == student_grad, part
        got = {name.split(".")[0] for name, p in term.named_parameters() if p.grad is not None and p.grad.any()}
        assert got == heads, part


def test_bf16_inputs_give_a_float32_loss() -> None:
    term = make_term(s_dim=6, t_dim=10, n=30, seed=10, lipschitz_weight=0.1)
    twin = copy.deepcopy(term)
    f_s = torch.randn(4, 6, generator=gen(11)).bfloat16()
    f_t = torch.randn(4, 10, generator=gen(12)).bfloat16()
    idx = term.memory.draw(torch.arange(4), torch.arange(4))
    out = term.contrast(f_s, f_t, torch.arange(4), torch.arange(4), contrast_idx=idx)
    ref = twin.contrast(f_s.float(), f_t.float(), torch.arange(4), torch.arange(4), contrast_idx=idx)
    assert set(out) == {"global", "local", "lipschitz"}
    for name in ref:
        assert out[name].dtype == torch.float32
        torch.testing.assert_close(out[name], ref[name], **TOL)


def test_no_grad_evaluation_skips_the_penalty() -> None:
    term = make_term(lipschitz_weight=0.1)
    with torch.no_grad():
        parts = term(batch_for(term, torch.randn(3, 6), torch.randn(3, 10), torch.arange(3), torch.arange(3)))
    assert float(parts["lipschitz"]) == 0.0 and torch.isfinite(parts["global"])


# ----------------------------------------------------------------------------------------------- errors
def test_bad_inputs_and_arguments_raise() -> None:
    term = make_term(n=20)
    s, t = torch.randn(3, 6), torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"wcord: the batch carries no sample indices.*\(input, target, index\)"):
        term(batch_for(term, s, t, None, torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"wcord: sample indices must lie in \[0, 20\)"):
        term(batch_for(term, s, t, torch.tensor([-1, 0, 1]), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        term(batch_for(term, s[:1], t[:1], torch.tensor([0]), torch.zeros(1, dtype=torch.long)))
    fresh = WCoRDLoss()
    with pytest.raises(ValueError, match="wcord: the memory banks need the training-set size"):
        fresh.setup(ctx_for(fresh, (2, 6), (2, 8), None))
    with pytest.raises(ValueError, match="local_weight"):
        WCoRDLoss(local_weight=-1.0)
    with pytest.raises(ValueError, match="sinkhorn_eps"):
        WCoRDLoss(sinkhorn_eps=0.0)
    with pytest.raises(ValueError, match="sinkhorn_iters"):
        WCoRDLoss(sinkhorn_iters=0)
    with pytest.raises(ValueError, match="negatives must be one of"):
        WCoRDLoss(negatives="hard")


# ----------------------------------------------------------------------------------------------- checkpoints
def test_state_dict_round_trip() -> None:
    term = make_term(s_dim=6, t_dim=10, n=30, seed=13)
    g = gen(14)
    for _ in range(2):
        s, t = torch.randn(4, 6, generator=g), torch.randn(4, 10, generator=g)
        term(batch_for(term, s, t, torch.randperm(30, generator=g)[:4], torch.randint(0, 3, (4,), generator=g)))
    state = copy.deepcopy(term.state_dict())
    assert {
        "memory.student_bank",
        "memory.teacher_bank",
        "memory.labels",
        "memory.sample_seed",
        "memory.sample_count",
        "embed_s.linear.weight",
        "embed_t.linear.weight",
    } <= set(state)
    fresh = make_term(s_dim=6, t_dim=10, n=30, seed=88)
    fresh.load_state_dict(state)
    s, t, idx, y = torch.randn(4, 6, generator=g), torch.randn(4, 10, generator=g), torch.arange(4), torch.arange(4)
    a, b = term(batch_for(term, s, t, idx, y)), fresh(batch_for(fresh, s, t, idx, y))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)
    torch.testing.assert_close(term.memory.teacher_bank, fresh.memory.teacher_bank, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------- config and Lightning
def test_yaml_builds_the_term_with_its_values() -> None:
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / "wcord.yaml"))
    values = yaml["terms"]["wcord"]
    params = {k: p.default for k, p in inspect.signature(WCoRDLoss.__init__).parameters.items() if k != "self"}
    assert sorted(values) == sorted(params)
    assert values == params
    cfg = compose(["loss=wcord"])
    term = build_terms(cfg.loss.terms)["wcord"]
    assert isinstance(term, WCoRDLoss)
    assert (term.weight, term.global_weight, term.local_weight, term.lipschitz_weight) == (1.0, 0.8, 1.0, 0.0)
    assert (term.feat_dim, term.nce_k, term.nce_t, term.nce_m) == (128, 16384, 0.07, 0.5)
    assert (term.sinkhorn_eps, term.sinkhorn_iters, term.negatives) == (0.05, 100, "other_class")
    assert isinstance(create_loss("wcord"), WCoRDLoss)


def test_timm_resnet_pair_through_lightning() -> None:
    torch.manual_seed(0)
    student = timm.create_model("resnet18", num_classes=10)
    teacher = timm.create_model("resnet18", num_classes=10)
    module = lightning_kd.DistillationModule(student, teacher, loss="wcord")
    n = 16
    data = random_data(n=n, size=16)
    trainer = fast_trainer(max_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data)
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/wcord"])) and float(metrics["train/wcord"]) > 0
    parts = sorted(k for k in metrics if k.startswith("train/wcord/"))
    assert parts == ["train/wcord/global", "train/wcord/local"]
    torch.testing.assert_close(sum(metrics[k] for k in parts), metrics["train/wcord"], **TOL)
    term = module.engine.terms["wcord"]
    assert term.memory.num_negatives == n - 1 and int(term.memory.sample_count) == 2
    assert "engine.terms.wcord.memory.teacher_bank" in module.state_dict()
