"""Tests of ATKD (:mod:`lightning_kd.losses.atkd`), CPU.

Reference values: a hand computation with ``math`` (binary KL on the gold / non-gold masses, KL of the renormalised
non-gold distributions); the decomposition identities of the forward and reverse KL; autograd through a dense version
written the way the authors' code computes it (softmax over the logits with the gold entry removed).
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_kd.lm.divergences import forward_kl, reverse_kl
from lightning_kd.losses import DistillBatch, ModelOutputs, create_loss
from lightning_kd.losses.atkd import ATKDLoss, atkd_divergence, hard_threshold


def batch_of(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> DistillBatch:
    return DistillBatch(ModelOutputs(s), ModelOutputs(t), targets=labels)


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _parts(p: list[float], q: list[float], g: int) -> tuple[float, float]:
    """(TKD, DKD) of the forward KL by hand."""
    tkd = _kl([p[g], 1 - p[g]], [q[g], 1 - q[g]])
    p_hat = [v / (1 - p[g]) for i, v in enumerate(p) if i != g]
    q_hat = [v / (1 - q[g]) for i, v in enumerate(q) if i != g]
    return tkd, _kl(p_hat, q_hat)


# ------------------------------------------------------------------------------------------------- hand-worked case
def test_hand_worked_easy_and_hard_tokens() -> None:
    # three scored positions, gold token 0, teacher uncertainty 1 − p(gold) = 0.1, 0.7, 0.4: the median is 0.4, so the
    # first token is easy (diversity part only) and the other two are hard (both parts)
    p1, q1 = [0.9, 0.06, 0.04], [0.5, 0.3, 0.2]
    p2, q2 = [0.3, 0.5, 0.2], [0.6, 0.1, 0.3]
    p3, q3 = [0.6, 0.1, 0.3], [0.2, 0.2, 0.6]
    s = torch.tensor([[q1, q2, q3]]).log()
    t = torch.tensor([[p1, p2, p3]]).log()
    labels = torch.tensor([[0, 0, 0]])
    lam = 0.2
    term = ATKDLoss(easy_weight=lam, shift_labels=False)
    got = term(batch_of(s, t, labels))
    _, dkd1 = _parts(p1, q1, 0)
    hard = (sum(_parts(p2, q2, 0)) + sum(_parts(p3, q3, 0))) / 2
    assert got.item() == pytest.approx(lam * dkd1 + (1 - lam) * hard, rel=1e-5)
    assert term.diagnostics["hard_fraction"].item() == pytest.approx(2 / 3)
    assert term.diagnostics["threshold"].item() == pytest.approx(0.4, rel=1e-5)
    assert term.diagnostics["easy"].item() == pytest.approx(dkd1, rel=1e-5)
    assert term.diagnostics["hard"].item() == pytest.approx(hard, rel=1e-5)
    # with two tokens the lower median is the smaller uncertainty: both are hard, as in the authors' code
    two = ATKDLoss(easy_weight=lam, shift_labels=False)(batch_of(s[:, :2], t[:, :2], labels[:, :2]))
    assert two.item() == pytest.approx((1 - lam) * (sum(_parts(p1, q1, 0)) + sum(_parts(p2, q2, 0))) / 2, rel=1e-5)


def test_split_follows_torch_median() -> None:
    u = torch.tensor([0.4, 0.1, 0.9, 0.3])
    assert hard_threshold(u, 0.5) == torch.median(u)  # the lower middle value: 3 of 4 tokens are hard, as the authors'
    assert int((u >= hard_threshold(u, 0.5)).sum()) == 3
    assert hard_threshold(u, 1.0) == u.min()
    odd = torch.tensor([0.5, 0.2, 0.8, 0.1, 0.9])
    assert hard_threshold(odd, 0.5) == torch.median(odd)


def test_all_hard_is_the_weighted_kl_without_the_uncertainty_factor() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    term = ATKDLoss(easy_weight=0.3, hard_fraction=1.0, shift_labels=False)
    got = term(batch_of(s, t, labels))
    log_q, log_p = s.log_softmax(-1).reshape(-1, 7), t.log_softmax(-1).reshape(-1, 7)
    full, _ = atkd_divergence(True)(log_q, log_p, {"gold": labels.reshape(-1)})
    assert got.item() == pytest.approx(0.7 * full.mean().item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------- the decomposition
@pytest.mark.parametrize("reverse", [False, True])
def test_parts_recompose_the_kl(reverse: bool) -> None:
    """KL(p‖q) = TKD + (1 − p_g)·DKD; KL(q‖p) = TKD_r + (1 − q_g)·DKD_r."""
    torch.manual_seed(1)
    log_q, log_p = (torch.randn(6, 9) * 2).log_softmax(-1), (torch.randn(6, 9) * 2).log_softmax(-1)
    gold = torch.randint(0, 9, (6,))
    rows = {"gold": gold}
    both, _ = atkd_divergence(True, reverse)(log_q, log_p, rows)
    dkd, _ = atkd_divergence(False, reverse)(log_q, log_p, rows)
    tkd = both - dkd
    if reverse:
        kl, _ = reverse_kl(log_q, log_p, {})
        rest = 1 - log_q.exp().gather(-1, gold[:, None]).squeeze(-1)
    else:
        kl, _ = forward_kl(log_q, log_p, {})
        rest = 1 - log_p.exp().gather(-1, gold[:, None]).squeeze(-1)
    torch.testing.assert_close(tkd + rest * dkd, kl, atol=1e-6, rtol=1e-5)
    assert bool((tkd >= -1e-7).all()) and bool((dkd >= -1e-7).all())


# ------------------------------------------------------------------------------------------------------- the gradient
def dense_atkd(s, t, labels, lam, tau, reverse):
    """The authors' computation (shift, median split of 1 − p_T(gold), KLDivLoss parts), with autograd."""
    s, t = s[:, :-1].float() / tau, t[:, :-1].float() / tau
    gold, mask = labels[:, 1:], labels[:, 1:] != -100
    s, t, gold = s[mask], t[mask], gold[mask]
    p_gold = t.softmax(-1).gather(-1, gold[:, None]).squeeze(-1)
    hard = (1 - p_gold) >= torch.median(1 - p_gold)
    one_hot = torch.nn.functional.one_hot(gold, s.shape[-1]).bool()
    if reverse:
        s, t = t, s  # the authors' "reverse" setting swaps the two models' roles in the KL

    def binary(z):
        prob = z.softmax(-1)
        g = prob.gather(-1, gold[:, None])
        return torch.cat([g, 1 - g], -1)

    def kl(target, log_input):  # Σ target (log target − log input)
        return (target * (target.log() - log_input)).sum(-1)

    tkd = kl(binary(t), binary(s).log())
    dkd = kl(
        t.masked_fill(one_hot, -torch.inf).softmax(-1).clamp_min(1e-30), s.masked_fill(one_hot, -1e9).log_softmax(-1)
    )
    return lam * dkd[~hard].mean() + (1 - lam) * (tkd + dkd)[hard].mean()


@pytest.mark.parametrize("reverse", [False, True])
def test_gradient_equals_autograd_of_the_dense_version(reverse: bool) -> None:
    torch.manual_seed(2)
    s = (torch.randn(3, 7, 10) * 2).requires_grad_()
    t = torch.randn(3, 7, 10) * 2
    labels = torch.randint(0, 10, (3, 7))
    labels[0, :3] = -100
    labels[2, 5:] = -100
    term = ATKDLoss(easy_weight=0.25, reverse=reverse, temperature=1.5, chunk_size=3)
    ours = term(batch_of(s, t, labels))
    ours.backward()
    grad = s.grad.clone()
    s.grad = None
    dense = dense_atkd(s, t, labels, 0.25, 1.5, reverse)
    dense.backward()
    assert ours.item() == pytest.approx(dense.item(), rel=1e-5)
    torch.testing.assert_close(grad, s.grad, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------- masking
def test_ignored_positions_do_not_count_and_padded_vocabulary_is_ignored() -> None:
    torch.manual_seed(3)
    s, t = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    labels = torch.randint(0, 8, (2, 6))
    labels[1, 2:4] = -100  # logits 1 and 2 of row 1 predict ignored labels
    term = ATKDLoss()
    base = term(batch_of(s, t, labels)).item()
    threshold = term.diagnostics["threshold"].item()
    s2, t2 = s.clone(), t.clone()
    s2[1, 1:3], t2[1, 1:3] = 30 * torch.randn(2, 8), -30 * torch.randn(2, 8)  # changes their uncertainty too
    assert term(batch_of(s2, t2, labels)).item() == pytest.approx(base, rel=1e-6)
    assert term.diagnostics["threshold"].item() == pytest.approx(threshold, rel=1e-6)
    pad = torch.full((2, 6, 3), -torch.inf)
    padded = term(batch_of(torch.cat([s, pad], -1), torch.cat([t, pad], -1), labels)).item()
    assert padded == pytest.approx(base, rel=1e-6)
    all_ignored = torch.full_like(labels, -100)
    zero = term(batch_of(s.requires_grad_(), t, all_ignored))
    zero.backward()
    assert zero.item() == 0 and not s.grad.any()


def test_errors_and_registry() -> None:
    with pytest.raises(ValueError, match="labels"):
        ATKDLoss()(batch_of(torch.randn(1, 3, 4), torch.randn(1, 3, 4), None))
    with pytest.raises(ValueError, match="easy_weight"):
        ATKDLoss(easy_weight=1.5)
    with pytest.raises(ValueError, match="hard_fraction"):
        ATKDLoss(hard_fraction=0.0)
    assert isinstance(create_loss("atkd", reverse=True), ATKDLoss)
