"""Tests of TopKD (:mod:`lightning_kd.losses.topkd`), CPU.

The paper's method section could not be read (see the module notes): these tests pin down *our* reading of it — a
hand computation with ``math`` only of every step (Top-K scaling, the three groups, the group cosines and the logit
contrastive loss) and the properties that reading implies. torchdistill has no TopKD, so there is no parity test.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from conftest import fit_pair
from omegaconf import OmegaConf
from torch import nn

from lightning_kd.config import CONF_DIR, compose
from lightning_kd.engine import build_terms
from lightning_kd.losses import DistillBatch, ModelOutputs, SetupContext, create_loss
from lightning_kd.losses.topkd import (
    TopKDLoss,
    logit_contrastive_loss,
    top_k_decoupled_loss,
    top_k_groups,
    top_k_scaling,
    topkd_parts,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch_of(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> DistillBatch:
    return DistillBatch(ModelOutputs(s), ModelOutputs(t), targets=y)


def total(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(parts.values())


# --------------------------------------------------------------------------------------------------- hand-worked
# sample 0: the teacher is right (label 0 is its top-1); sample 1: the teacher is wrong and the label (2) is outside
# its top-2, with a negative logit
T = [[3.0, 1.0, -1.0, 0.5, -2.0, 2.0, -0.5, -3.0], [0.5, 2.0, -1.0, 1.5, -2.5, 0.0, 1.0, -0.5]]
S = [[1.0, 0.5, 0.0, -1.0, 2.0, 0.3, -0.2, 0.1], [-0.5, 1.0, 0.2, 0.8, -1.0, 0.4, 0.0, 1.2]]
Y = [0, 2]
K, SCALE, SHIFT, ALPHA, BETA, TAU = 2, 1.0, 0.5, 2.0, 0.5, 2.0


def _hand_scaling(z: list[float], label: int) -> tuple[list[float], set[int], set[int], set[int]]:
    order = sorted(range(len(z)), key=lambda i: -z[i])
    top = order[:K]
    others = [z[i] for i in range(len(z)) if i not in top]
    delta = SHIFT * (sum(z[i] for i in top) / K - sum(others) / len(others))
    factor = {i: 1 + SCALE * (K - r) / K for r, i in enumerate(top)}  # rank r + 1: 1 + s·(K − r)/K
    factor[label] = 1 + SCALE
    scaled = [v + (factor[i] - 1) * abs(v) + delta if i in factor else v for i, v in enumerate(z)]
    pos = set(factor)
    rest = sorted((i for i in range(len(z)) if i not in pos), key=lambda i: z[i])
    neg = set(rest[:K])
    non = set(range(len(z))) - pos - neg
    return scaled, pos, neg, non


def _cos(a: list[float], b: list[float], idx: set[int]) -> float:
    dot = sum(a[i] * b[i] for i in idx)
    return dot / (math.sqrt(sum(a[i] ** 2 for i in idx)) * math.sqrt(sum(b[i] ** 2 for i in idx)))


def _hand_contrastive(s: list[list[float]], t: list[list[float]]) -> float:
    n = len(s)
    sim = [[sum(a * b for a, b in zip(s[i], t[j])) / TAU for j in range(n)] for i in range(n)]

    def ce_rows(m: list[list[float]]) -> float:
        return sum(math.log(sum(math.exp(v) for v in m[i])) - m[i][i] for i in range(n)) / n

    return 0.5 * (ce_rows(sim) + ce_rows([list(col) for col in zip(*sim)]))


def test_hand_worked_scaling_groups_and_losses() -> None:
    tdl_terms = []
    for z_t, z_s, label in zip(T, S, Y):
        scaled, pos, neg, non = _hand_scaling(z_t, label)
        tdl_terms.append(
            ALPHA * (1 - _cos(z_s, scaled, pos)) + BETA * (1 - _cos(z_s, scaled, neg)) + (1 - _cos(z_s, scaled, non))
        )
    expected_tdl = sum(tdl_terms) / 2
    expected_con = _hand_contrastive(S, T)
    assert expected_tdl > 0.1 and expected_con > 0.1

    t, s, y = torch.tensor(T), torch.tensor(S), torch.tensor(Y)
    scaled, positive = top_k_scaling(t, y, K, SCALE, SHIFT)
    for b in range(2):
        hand_scaled, pos, neg, non = _hand_scaling(T[b], Y[b])
        torch.testing.assert_close(scaled[b], torch.tensor(hand_scaled), **TOL)
        groups = top_k_groups(t, positive, K)
        assert [set(torch.nonzero(g[b]).flatten().tolist()) for g in groups] == [pos, neg, non]
    assert set(torch.nonzero(positive[1]).flatten().tolist()) == {1, 3, 2}  # the label joined the top-2
    tdl, con = topkd_parts(s, t, y, K, SCALE, SHIFT, ALPHA, BETA, TAU)
    assert float(tdl) == pytest.approx(expected_tdl, rel=1e-5)
    assert float(con) == pytest.approx(expected_con, rel=1e-5)
    term = TopKDLoss(k=K, scale=SCALE, shift=SHIFT, alpha=ALPHA, beta=BETA, temperature=TAU, contrast_weight=0.3)
    parts = term(batch_of(s, t, y))
    assert set(parts) == {"tdl", "contrast"}
    assert float(parts["tdl"]) == pytest.approx(expected_tdl, rel=1e-5)
    assert float(parts["contrast"]) == pytest.approx(0.3 * expected_con, rel=1e-5)


# ------------------------------------------------------------------------------------------------------ properties
def test_scaling_amplifies_the_selected_logits_only() -> None:
    t = torch.randn(16, 12, generator=gen(0)) * 3
    y = torch.randint(0, 12, (16,), generator=gen(1))
    scaled, positive = top_k_scaling(t, y, 3, scale=1.0, shift=1.0)
    assert (positive.sum(1) >= 3).all() and (positive.sum(1) <= 4).all()
    assert positive.gather(1, y[:, None]).all()  # the label is always selected
    torch.testing.assert_close(scaled[~positive], t[~positive])  # the rest is untouched
    assert (scaled[positive] > t[positive]).all()  # selected logits go up, whatever their sign
    # when the teacher is right, its ranking among its top-k is kept (a misclassified label may overtake: below)
    scaled, _ = top_k_scaling(t, t.argmax(1), 3, scale=1.0, shift=1.0)
    top_idx = t.topk(3, dim=1).indices
    s_top = scaled.gather(1, top_idx)
    assert (s_top[:, :-1] >= s_top[:, 1:]).all()
    # for non-negative logits the scaling is the summary's w·z + Δ
    tp = t.abs() + 0.1
    scaled_p, _ = top_k_scaling(tp, tp.argmax(1), 3, scale=1.0, shift=0.5)
    top_vals, top_idx = tp.topk(3, dim=1)
    rest = tp.scatter(1, top_idx, 0.0).sum(1) / 9
    delta = 0.5 * (top_vals.mean(1) - rest)
    w = torch.tensor([2.0, 5 / 3, 4 / 3])
    torch.testing.assert_close(scaled_p.gather(1, top_idx), top_vals * w + delta[:, None], **TOL)
    # no scale and no shift: the identity
    torch.testing.assert_close(top_k_scaling(t, y, 3, scale=0.0, shift=0.0)[0], t)


def test_misclassified_label_gets_the_top_factor() -> None:
    # a positive label logit ranked 2nd gets the rank-1 factor 1 + s, not its rank's 1 + s/2
    t = torch.tensor([[4.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0]])
    scaled, _ = top_k_scaling(t, torch.tensor([1]), 2, scale=1.0, shift=0.0)
    assert float(scaled[0, 1]) == pytest.approx(4.0)  # 2 · 2, not 1.5 · 2
    scaled, _ = top_k_scaling(t, torch.tensor([0]), 2, scale=1.0, shift=0.0)
    assert float(scaled[0, 1]) == pytest.approx(3.0)  # correct teacher: the 2nd class keeps 1.5


def test_decoupled_loss_zero_at_groupwise_alignment_and_scale_invariant() -> None:
    t = torch.randn(8, 10, generator=gen(2)) * 3
    y = torch.randint(0, 10, (8,), generator=gen(3))
    scaled, positive = top_k_scaling(t, y, 3)
    groups = top_k_groups(t, positive, 3)
    # the student equals the scaled teacher up to a different positive factor per group: every cosine is 1
    s = sum(f * scaled * g for f, g in zip((0.5, 3.0, 1.7), groups))
    assert float(top_k_decoupled_loss(s, scaled, groups, 2.0, 0.5).abs().max()) < 1e-6
    # the groups partition the classes; a positive rescaling of the student changes nothing
    assert (sum(g.long() for g in groups) == 1).all()
    s = torch.randn(8, 10, generator=gen(4))
    ref = top_k_decoupled_loss(s, scaled, groups, 2.0, 0.5)
    assert float(ref.min()) > 1e-3
    torch.testing.assert_close(top_k_decoupled_loss(7.0 * s, scaled, groups, 2.0, 0.5), ref, **TOL)
    # α and β weigh the positive and negative group terms
    pos_only = top_k_decoupled_loss(s, scaled, groups, 1.0, 0.0) - top_k_decoupled_loss(s, scaled, groups, 0.0, 0.0)
    torch.testing.assert_close(
        top_k_decoupled_loss(s, scaled, groups, 3.0, 0.0) - top_k_decoupled_loss(s, scaled, groups, 0.0, 0.0),
        3 * pos_only,
        **TOL,
    )


def test_contrastive_loss_properties() -> None:
    t = torch.randn(6, 10, generator=gen(5)) * 3
    s = torch.randn(6, 10, generator=gen(6)) * 3
    ref = logit_contrastive_loss(s, t, 4.0)
    # symmetric in the two models, invariant to the same re-ordering of both batches
    torch.testing.assert_close(logit_contrastive_loss(t, s, 4.0), ref, **TOL)
    order = torch.randperm(6, generator=gen(7))
    torch.testing.assert_close(logit_contrastive_loss(s[order], t[order], 4.0), ref, **TOL)
    # ... but not to re-ordering one of them: the positives are the same-sample pairs
    assert float(logit_contrastive_loss(t[order], t, 4.0)) > float(logit_contrastive_loss(t, t, 4.0)) + 0.1
    # a single sample has nothing to contrast with
    assert float(logit_contrastive_loss(s[:1], t[:1], 4.0)) == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------------------------- gradients, dtypes
def test_gradients_reach_student_only() -> None:
    s = (torch.randn(5, 10, generator=gen(8)) * 2).requires_grad_()
    t = (torch.randn(5, 10, generator=gen(9)) * 2).requires_grad_()
    y = torch.tensor([0, 9, 3, 3, 1])
    parts = TopKDLoss()(batch_of(s, t, y))
    for name in ("tdl", "contrast"):
        (grad,) = torch.autograd.grad(parts[name], s, retain_graph=True)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    total(parts).backward()
    assert t.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_zero_student_logits_have_finite_gradients() -> None:
    s = torch.zeros(4, 10, requires_grad=True)
    t = torch.randn(4, 10, generator=gen(10))
    total(TopKDLoss()(batch_of(s, t, torch.tensor([0, 1, 2, 3])))).backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_give_float32(dtype: torch.dtype) -> None:
    s = (torch.randn(8, 12, generator=gen(11)) * 3).to(dtype)
    t = (torch.randn(8, 12, generator=gen(12)) * 3).to(dtype)
    y = torch.randint(0, 12, (8,), generator=gen(13))
    parts = TopKDLoss()(batch_of(s, t, y))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in parts.values())
    ref = TopKDLoss()(batch_of(s.float(), t.float(), y))
    for name in parts:
        torch.testing.assert_close(parts[name], ref[name], **TOL)


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
    term = TopKDLoss(k=3)
    term.setup(_ctx((4, 8), (4, 8)))  # 2k + 2 = 8 classes: enough
    with pytest.raises(ValueError) as err:
        TopKDLoss(k=5).setup(_ctx((4, 10), (4, 10)))
    msg = str(err.value)
    for piece in ("topkd", "k=5", "12 classes", "(4, 10)", "lower k"):
        assert piece in msg, msg
    with pytest.raises(ValueError, match="same classes"):
        term.setup(_ctx((4, 10), (4, 100)))
    z = torch.randn(4, 10)
    with pytest.raises(ValueError, match="needs class labels"):
        term(batch_of(z, z, None))
    with pytest.raises(ValueError, match="2 targets"):
        term(batch_of(z, z, torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="at least"):
        TopKDLoss(k=5)(batch_of(z, z, torch.arange(4)))
    for kwargs, match in [
        ({"k": 0}, "k must"),
        ({"k": 1.5}, "k must"),
        ({"alpha": -1.0}, "alpha"),
        ({"beta": float("nan")}, "beta"),
        ({"scale": -0.1}, "scale"),
        ({"temperature": 0.0}, "temperature"),
        ({"contrast_weight": -1.0}, "contrast_weight"),
    ]:
        with pytest.raises(ValueError, match=match):
            TopKDLoss(**kwargs)


# ----------------------------------------------------------------------------------------------- config and Lightning
def test_yaml_builds_the_term_with_its_values() -> None:
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / "topkd.yaml"))
    values = yaml["terms"]["topkd"]
    params = [p for p in inspect.signature(TopKDLoss.__init__).parameters if p != "self"]
    assert sorted(values) == sorted(params)
    cfg = compose(["loss=topkd"])
    assert cfg.loss.task_weight == 1.0
    term = build_terms(cfg.loss.terms)["topkd"]
    assert isinstance(term, TopKDLoss)
    assert {p: getattr(term, p) for p in params} == values
    default = create_loss("topkd")
    assert {p: getattr(default, p) for p in params} == values  # the YAML repeats the constructor's defaults


def test_timm_resnet_pair_through_lightning() -> None:
    _, trainer = fit_pair("topkd", teacher="resnet18", size=16, steps=2)
    metrics = trainer.callback_metrics
    assert "train/topkd" in metrics
    assert math.isfinite(float(metrics["train/topkd"])) and float(metrics["train/topkd"]) > 0
    parts = sorted(k for k in metrics if k.startswith("train/topkd/"))
    assert parts == ["train/topkd/contrast", "train/topkd/tdl"]
    torch.testing.assert_close(sum(metrics[k] for k in parts), metrics["train/topkd"], **TOL)
