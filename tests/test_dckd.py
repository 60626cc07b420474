"""Tests of DCKD (:mod:`lightning_kd.losses.dckd`), CPU.

Reference values: a hand computation with ``math`` for one preference pair; the authors' objective written densely
with ``F.cross_entropy`` and ``F.kl_div`` (value and autograd gradient); the batch-layout checks.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_kd.losses import DistillBatch, ModelOutputs, create_loss
from lightning_kd.losses.dckd import DCKDLoss, concat_preference_pairs


def batch_of(s, t, labels, inputs=None) -> DistillBatch:
    return DistillBatch(ModelOutputs(s), ModelOutputs(t), targets=labels, inputs=inputs)


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_hand_worked_one_pair() -> None:
    # labels aligned with the logits (shift_labels=False); position 0 of each row is the prompt
    s = [[[0.0, 0.0, 0.0], [1.0, 0.0, 2.0]], [[0.0, 0.0, 0.0], [0.5, 1.5, 0.0]]]
    t = [[[5.0, 0.0, 0.0], [2.0, 1.0, 0.0]], [[0.0, 5.0, 0.0], [0.0, 0.0, 1.0]]]
    labels = torch.tensor([[-100, 0], [-100, 1]])  # chosen answers token 0, rejected token 1
    term = DCKDLoss(sft_weight=0.5, chosen_weight=2.0, rejected_weight=0.25, shift_labels=False)
    got = term(batch_of(torch.tensor(s), torch.tensor(t), labels))
    nll = -math.log(_softmax(s[0][1])[0])
    kl_c = _kl(_softmax(t[0][1]), _softmax(s[0][1]))
    kl_r = _kl(_softmax(t[1][1]), _softmax(s[1][1]))
    assert got.item() == pytest.approx(0.5 * nll + 2.0 * kl_c + 0.25 * kl_r, rel=1e-6)
    assert term.diagnostics["nll_chosen"].item() == pytest.approx(nll, rel=1e-6)
    assert term.diagnostics["kl_rejected"].item() == pytest.approx(kl_r, rel=1e-6)


def dense_dckd(s, t, labels, w_sft, w_c, w_r, tau):
    """The authors' ``get_batch_loss_metrics`` DCKD part: shifted labels, rows [0, B) chosen, [B, 2B) rejected."""
    half = s.shape[0] // 2
    logits, teacher, gold = s[:, :-1].float(), t[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(logits[:half].flatten(0, 1), gold[:half].flatten(), ignore_index=-100)

    def fkl(rows):
        mask = gold[rows] != -100
        log_q = (logits[rows][mask] / tau).log_softmax(-1)
        p = (teacher[rows][mask] / tau).softmax(-1)
        return F.kl_div(log_q, p, reduction="none").sum(-1).mean()

    return w_sft * nll + w_c * fkl(slice(0, half)) + w_r * fkl(slice(half, None))


def test_value_and_gradient_equal_the_dense_objective() -> None:
    torch.manual_seed(0)
    prompt = torch.randint(0, 9, (2, 3))
    ids = torch.cat([prompt.repeat(2, 1), torch.randint(0, 9, (4, 4))], 1)  # rows i and i + 2 share the prompt
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 6] = -100  # padding at the end of one chosen row
    s = torch.randn(4, 7, 9).requires_grad_()
    t = torch.randn(4, 7, 9) * 2
    term = DCKDLoss(sft_weight=0.7, chosen_weight=1.3, rejected_weight=0.4, temperature=1.5, chunk_size=3)
    ours = term(batch_of(s, t, labels, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
    ours.backward()
    grad = s.grad.clone()
    s.grad = None
    dense = dense_dckd(s, t, labels, 0.7, 1.3, 0.4, 1.5)
    dense.backward()
    assert ours.item() == pytest.approx(dense.item(), rel=1e-5)
    torch.testing.assert_close(grad, s.grad, atol=1e-6, rtol=1e-5)


def test_rejected_rows_get_no_nll_and_ignored_labels_do_not_count() -> None:
    torch.manual_seed(1)
    s, t = torch.randn(2, 5, 6).requires_grad_(), torch.randn(2, 5, 6)
    labels = torch.randint(0, 6, (2, 5))
    labels[:, :2] = -100
    term = DCKDLoss(chosen_weight=0.0, rejected_weight=0.0)  # the NLL on the chosen row only
    term(batch_of(s, t, labels)).backward()
    assert s.grad[0].abs().sum() > 0 and not s.grad[1].any()
    base = DCKDLoss()(batch_of(s.detach(), t, labels)).item()
    s2 = s.detach().clone()
    s2[:, 0] = 40.0  # the logit at 0 predicts the ignored label at 1
    assert DCKDLoss()(batch_of(s2, t, labels)).item() == pytest.approx(base, rel=1e-6)


def test_batch_layout_is_checked() -> None:
    s, t = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    labels = torch.randint(0, 5, (3, 4))
    with pytest.raises(ValueError, match="even number"):
        DCKDLoss()(batch_of(s, t, labels))
    with pytest.raises(ValueError, match="labels"):
        DCKDLoss()(batch_of(s[:2], t[:2], None))
    ids = torch.tensor([[1, 2, 3, 4], [1, 7, 3, 4]])
    pair_labels = torch.tensor([[-100, -100, 3, 4], [-100, -100, 3, 4]])
    with pytest.raises(ValueError, match="different prompts"):
        DCKDLoss()(batch_of(s[:2], t[:2], pair_labels, {"input_ids": ids}))
    # left padding: the same prompt at different positions is a valid pair
    ids = torch.tensor([[0, 1, 2, 3, 4], [1, 2, 5, 6, 7]])
    attention = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    left = torch.tensor([[-100, -100, -100, 3, 4], [-100, -100, 5, 6, 7]])
    value = DCKDLoss()(
        batch_of(torch.randn(2, 5, 8), torch.randn(2, 5, 8), left, {"input_ids": ids, "attention_mask": attention})
    )
    assert torch.isfinite(value)


def test_registry_and_task_loss() -> None:
    term = create_loss("dckd", rejected_weight=0.5)
    assert isinstance(term, DCKDLoss) and DCKDLoss.replaces_task_loss
    with pytest.raises(ValueError, match="sft_weight"):
        DCKDLoss(sft_weight=-1.0)


def test_concat_preference_pairs_makes_a_valid_batch() -> None:
    prompt = [5, 6, 7]
    chosen = {
        "input_ids": torch.tensor([prompt + [1, 2]]),
        "attention_mask": torch.ones(1, 5, dtype=torch.long),
        "labels": torch.tensor([[-100] * 3 + [1, 2]]),
        "index": torch.tensor([4]),
    }
    rejected = {
        "input_ids": torch.tensor([prompt + [3, 3, 3]]),
        "attention_mask": torch.ones(1, 6, dtype=torch.long),
        "labels": torch.tensor([[-100] * 3 + [3, 3, 3]]),
        "index": torch.tensor([4]),
    }
    batch = concat_preference_pairs(chosen, rejected, pad_id=9)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # the shared sample index is dropped
    assert batch["input_ids"].tolist() == [prompt + [1, 2, 9], prompt + [3, 3, 3]]
    assert batch["labels"][0, -1] == -100 and batch["attention_mask"][0, -1] == 0
    s, t = torch.randn(2, 6, 10), torch.randn(2, 6, 10)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    assert torch.isfinite(DCKDLoss()(batch_of(s, t, batch["labels"], inputs)))
    with pytest.raises(ValueError, match="pairs need one of each"):
        concat_preference_pairs(chosen, {k: torch.cat([v, v]) for k, v in rejected.items()})
