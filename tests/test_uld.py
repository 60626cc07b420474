"""Tests of Universal Logit Distillation (:mod:`lightning_kd.losses.uld`), CPU.

Values are checked against numbers worked by hand (vocabularies of 3 and 4 entries), against a dense autograd
re-statement of the reference code's steps (Nicolas-BZRD/llm-recipes ``DistillationLoss``: answer start from the
leading ``-100`` run, per-sample softmax, descending sort, zero padding, truncation to the shorter answer, L1 sum,
mean per sample then over the batch), and against the properties the paper states: the distance ignores token
identity (zero for equal distributions up to a permutation and zero padding; invariant to permuting a vocabulary).
End to end, a student and a teacher with different BPE tokenizers train through :class:`LMDistillationModule`.
"""

from __future__ import annotations

import inspect
import math

import lightning as L
import pytest
import torch
from lm_helpers import TEXTS, tiny_lm, tiny_tokenizer
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from lightning_kd.config import CONF_DIR
from lightning_kd.engine import ClassCountMismatchError, DistillEngine
from lightning_kd.lm.data import TextExamples, pad_batch, split_prompt
from lightning_kd.lm.module import LMDistillationModule
from lightning_kd.losses import DistillBatch, ModelOutputs, get_loss_class
from lightning_kd.losses.uld import ULDLoss, align_answers, uld_loss

I = -100  # the ignore index, short for the label tables below


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_uld(s, t, s_labels, t_labels, ts=1.0, tt=1.0, skip_eos=False) -> torch.Tensor:
    """The reference code's steps, per sample, with autograd (contiguous answers after a non-empty prompt)."""

    def answer(labels: torch.Tensor) -> tuple[int, int]:
        ignored = labels.eq(I)
        start = int(ignored.long().argmin())  # the first answer label; the logit before it predicts it
        return start - 1, int((~ignored).sum()) - int(skip_eos)

    losses = []
    for i in range(len(s)):
        (a, ns), (b, nt) = answer(s_labels[i]), answer(t_labels[i])
        k = min(ns, nt)
        q = torch.softmax(s[i, a : a + k].float() / ts, -1).sort(-1, descending=True).values
        p = torch.softmax(t[i, b : b + k].float() / tt, -1).sort(-1, descending=True).values
        width = max(q.shape[-1], p.shape[-1])
        q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
        p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
        losses.append((q - p).abs().sum(-1).mean())
    return torch.stack(losses).mean()


def log_rows(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log().float()


# --------------------------------------------------------------------------------------------- hand-worked values
def hand_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student vocabulary 3, prompt of 2 tokens; teacher vocabulary 4, prompt of 3 tokens; two answer tokens each.
    The logits that predict the answers hold log-probabilities; every other position holds noise."""
    s = torch.randn(1, 4, 3, generator=gen(0)) * 3
    t = torch.randn(1, 6, 4, generator=gen(1)) * 3
    s[0, 1:3] = log_rows([0.2, 0.5, 0.3], [0.6, 0.3, 0.1])
    t[0, 2:4] = log_rows([0.1, 0.4, 0.4, 0.1], [0.25, 0.25, 0.25, 0.25])
    s_labels = torch.tensor([[I, I, 5, 6]])
    t_labels = torch.tensor([[I, I, I, 7, 8, I]])  # last position: right padding
    return s, t, s_labels, t_labels


def test_hand_worked_value_and_gradient_across_vocabularies_3_and_4() -> None:
    s, t, sl, tl = hand_case()
    s.requires_grad_(True)
    # position 1: q sorted (.5, .3, .2, 0) vs p sorted (.4, .4, .1, .1): .1 + .1 + .1 + .1 = .4
    # position 2: q sorted (.6, .3, .1, 0) vs p (.25, .25, .25, .25): .35 + .05 + .15 + .25 = .8
    loss = uld_loss(s, t, sl, tl)
    assert loss.item() == pytest.approx((0.4 + 0.8) / 2, abs=1e-6)
    loss.backward()
    # position 1: signs in vocabulary order g = (+1, +1, −1) (q_0 = .2 faces .1, q_1 = .5 faces .4, q_2 = .3 faces
    # .4); h = q·g = (.2, .5, −.3), Σh = .4; ∂/∂z = (h − q·Σh) / 2 positions = (.06, .15, −.21)
    assert s.grad[0, 1].tolist() == pytest.approx([0.06, 0.15, -0.21], abs=1e-6)
    # position 2: g = (+1, +1, −1) (.6/.25, .3/.25, .1/.25); h = (.6, .3, −.1), Σh = .8 -> ((.6−.48), (.3−.24), (−.1−.08))/2
    assert s.grad[0, 2].tolist() == pytest.approx([0.06, 0.03, -0.09], abs=1e-6)
    assert s.grad[0, [0, 3]].abs().max() == 0  # prompt and last positions are not scored


def _sorted_l1(q: list[float], p: list[float]) -> float:
    q, p = sorted(q, reverse=True), sorted(p, reverse=True)
    n = max(len(q), len(p))
    q, p = q + [0.0] * (n - len(q)), p + [0.0] * (n - len(p))
    return sum(abs(a - b) for a, b in zip(q, p))


def _softmax(z: list[float], tau: float) -> list[float]:
    e = [math.exp(v / tau) for v in z]
    return [v / sum(e) for v in e]


def test_separate_student_and_teacher_temperatures() -> None:
    s, t, sl, tl = hand_case()
    ts, tt = 2.0, 0.5
    want = sum(_sorted_l1(_softmax(s[0, i].tolist(), ts), _softmax(t[0, i + 1].tolist(), tt)) for i in (1, 2)) / 2
    got = uld_loss(s, t, sl, tl, student_temperature=ts, teacher_temperature=tt)
    assert got.item() == pytest.approx(want, abs=1e-6)
    assert got.item() != pytest.approx(uld_loss(s, t, sl, tl).item(), abs=1e-3)


def test_sample_and_token_reductions() -> None:
    """Sample 0 has one paired position, sample 1 two: "sample" averages per answer first (the reference)."""
    s = torch.randn(2, 4, 3, generator=gen(2))
    t = torch.randn(2, 4, 5, generator=gen(3))
    sl = torch.tensor([[I, 1, I, I], [I, 1, 2, I]])
    tl = torch.tensor([[I, 1, 2, 3], [I, 1, 2, I]])  # sample 0 truncated to the student's single answer token
    d = [
        [_sorted_l1(_softmax(s[b, i].tolist(), 1.0), _softmax(t[b, i].tolist(), 1.0)) for i in range(2)]
        for b in range(2)
    ]
    sample = uld_loss(s, t, sl, tl)
    token = uld_loss(s, t, sl, tl, reduction="token")
    assert sample.item() == pytest.approx((d[0][0] + (d[1][0] + d[1][1]) / 2) / 2, abs=1e-6)
    assert token.item() == pytest.approx((d[0][0] + d[1][0] + d[1][1]) / 3, abs=1e-6)
    # a third sample whose answer was cut off entirely (no label) is left out of the mean, not counted as 0
    s3, t3 = torch.cat([s, s[:1]]), torch.cat([t, t[:1]])
    sl3, tl3 = torch.cat([sl, torch.full((1, 4), I)]), torch.cat([tl, tl[:1]])
    assert uld_loss(s3, t3, sl3, tl3).item() == pytest.approx(sample.item(), abs=1e-6)
    assert uld_loss(s3, t3, sl3, tl3, reduction="token").item() == pytest.approx(token.item(), abs=1e-6)


# ------------------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("student_bigger", [False, True])
def test_zero_for_the_same_distribution_up_to_permutation_and_zero_padding(student_bigger: bool) -> None:
    z = torch.randn(2, 5, 4, generator=gen(4))
    perm = torch.tensor([2, 0, 3, 1])
    padded = torch.cat([z[..., perm], torch.full((2, 5, 3), -torch.inf)], -1)[..., [5, 0, 1, 4, 2, 6, 3]]
    s, t = (padded, z) if student_bigger else (z, padded)
    labels = torch.tensor([[I, I, 3, 4, 5], [I, 1, 2, I, I]])
    s = s.clone().requires_grad_(True)
    loss = uld_loss(s, t, labels, labels)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_invariant_to_permuting_either_vocabulary() -> None:
    s = torch.randn(2, 6, 5, generator=gen(5))
    t = torch.randn(2, 7, 8, generator=gen(6))
    sl = torch.tensor([[I, I, 1, 2, 3, 4], [I, 1, 2, 3, I, I]])
    tl = torch.tensor([[I, I, I, 1, 2, 3, 4], [I, I, 1, 2, 3, I, I]])
    ps, pt = torch.randperm(5, generator=gen(7)), torch.randperm(8, generator=gen(8))
    a = s.clone().requires_grad_(True)
    b = s[..., ps].clone().requires_grad_(True)
    value_a = uld_loss(a, t, sl, tl)
    value_b = uld_loss(b, t[..., pt], sl, tl)
    assert value_a.item() > 0.05
    assert value_b.item() == pytest.approx(value_a.item(), abs=1e-6)
    value_a.backward()
    value_b.backward()
    torch.testing.assert_close(b.grad, a.grad[..., ps], atol=1e-7, rtol=1e-5)


def test_answers_are_paired_from_their_first_token_when_prompts_differ() -> None:
    """The teacher's prompt is 3 tokens longer: the loss equals the one with the teacher's rows moved to the
    student's positions, and the teacher's prompt logits do not matter."""
    s = torch.randn(2, 7, 5, generator=gen(9))
    sl = torch.tensor([[I, I, 1, 2, 3, 4, I], [I, 1, 2, 3, I, I, I]])
    t_same = torch.randn(2, 7, 6, generator=gen(10))
    shifted = torch.cat([torch.randn(2, 3, 6, generator=gen(11)), t_same], 1)  # 3 extra prompt tokens in front
    tl = torch.cat([torch.full((2, 3), I), sl], 1)
    want = uld_loss(s, t_same, sl, sl)
    assert uld_loss(s, shifted, sl, tl).item() == pytest.approx(want.item(), abs=1e-6)
    noisy = shifted.clone()
    noisy[0, :4] += 5 * torch.randn(4, 6, generator=gen(12))  # up to the logit before the first answer token
    noisy[1, :3] += 5 * torch.randn(3, 6, generator=gen(13))
    assert uld_loss(s, noisy, sl, tl).item() == pytest.approx(want.item(), abs=1e-6)
    noisy[0, 4] += torch.randn(6, generator=gen(14))  # the logit that predicts the first answer token
    assert uld_loss(s, noisy, sl, tl).item() != pytest.approx(want.item(), abs=1e-4)
    assert torch.allclose(want, reference_uld(s, shifted, sl, tl))


def test_the_longer_answer_is_truncated_to_the_shorter() -> None:
    s = torch.randn(1, 6, 4, generator=gen(14))
    t = torch.randn(1, 9, 7, generator=gen(15))
    sl = torch.tensor([[I, I, 1, 2, 3, I]])  # student answer: 3 tokens, logits 1..3
    tl = torch.tensor([[I, 1, 2, 3, 4, 5, 6, I, I]])  # teacher answer: 6 tokens, logits 0..5
    value = uld_loss(s, t, sl, tl)
    moved = t.clone()
    moved[0, 3:] += 5 * torch.randn(6, 7, generator=gen(16))  # teacher answer tokens 4.. and padding
    assert uld_loss(s, moved, sl, tl).item() == pytest.approx(value.item(), abs=1e-6)
    trimmed = torch.tensor([[I, 1, 2, 3, I, I, I, I, I]])
    assert uld_loss(s, t, sl, trimmed).item() == pytest.approx(value.item(), abs=1e-6)
    # and the other way round: the teacher's answer shorter
    assert uld_loss(s, t, torch.tensor([[I, 1, 2, 3, 4, I]]), torch.tensor([[I, 1, 2, I, I, I, I, I, I]])).item() == (
        pytest.approx(uld_loss(s, t, torch.tensor([[I, 1, 2, I, I, I]]), torch.tensor([[I, 1, 2] + [I] * 6])).item())
    )
    mask, row, length = align_answers(sl, tl)
    assert length.tolist() == [3] and mask[0].nonzero().flatten().tolist() == [1, 2, 3]
    assert row[0, 1:4].tolist() == [0, 1, 2]


def test_skip_eos_drops_the_last_answer_token_of_each_side() -> None:
    s = torch.randn(2, 6, 4, generator=gen(17))
    t = torch.randn(2, 7, 6, generator=gen(18))
    sl = torch.tensor([[I, 1, 2, 3, 0, I], [I, I, 1, 0, I, I]])
    tl = torch.tensor([[I, I, 1, 2, 3, 4, 0], [I, 1, 2, 0, I, I, I]])
    no_eos_s = torch.tensor([[I, 1, 2, 3, I, I], [I, I, 1, I, I, I]])
    no_eos_t = torch.tensor([[I, I, 1, 2, 3, 4, I], [I, 1, 2, I, I, I, I]])
    got = uld_loss(s, t, sl, tl, skip_eos=True)
    assert got.item() == pytest.approx(uld_loss(s, t, no_eos_s, no_eos_t).item(), abs=1e-6)
    assert got.item() == pytest.approx(reference_uld(s, t, sl, tl, skip_eos=True).item(), abs=1e-6)


# ------------------------------------------------------------------------------------- reference parity, mechanics
def random_pair(seed: int, vs: int = 7, vt: int = 11):
    s = torch.randn(3, 9, vs, generator=gen(seed)) * 2
    t = torch.randn(3, 11, vt, generator=gen(seed + 1)) * 2
    sl = torch.tensor([[I, I, 1, 2, 3, 4, 5, I, I], [I, 1, 2, 3, 4, 5, 6, 7, 8], [I, I, I, I, 1, 2, I, I, I]])
    tl = torch.tensor([[I] * 4 + [1, 2, 3, 4, I, I, I], [I, I, 1, 2, 3, 4, 5, 6, 7, 8, 9], [I, 1, 2, 3, 4] + [I] * 6])
    return s, t, sl, tl


@pytest.mark.parametrize("vs, vt", [(7, 11), (11, 7)])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_matches_the_reference_steps_value_and_gradient(vs: int, vt: int, chunk_size: int | None) -> None:
    s, t, sl, tl = random_pair(19, vs, vt)
    a = s.clone().requires_grad_(True)
    b = s.clone().requires_grad_(True)
    got = uld_loss(a, t, sl, tl, student_temperature=1.5, teacher_temperature=0.7, chunk_size=chunk_size)
    want = reference_uld(b, t, sl, tl, 1.5, 0.7)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), abs=1e-6)
    got.backward()
    want.backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


def test_bfloat16_logits_give_a_float32_loss() -> None:
    s, t, sl, tl = random_pair(21)
    low = s.bfloat16().requires_grad_(True)
    got = uld_loss(low, t.bfloat16(), sl, tl)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(uld_loss(s.bfloat16().float(), t.bfloat16().float(), sl, tl).item(), abs=1e-6)
    got.backward()
    assert low.grad.dtype == torch.bfloat16 and torch.isfinite(low.grad).all()


def test_no_paired_position_gives_zero_with_a_zero_gradient() -> None:
    s = torch.randn(1, 4, 3, requires_grad=True)
    value = uld_loss(s, torch.randn(1, 5, 4), torch.tensor([[I, I, I, I]]), torch.tensor([[I, 1, 2, 3, I]]))
    value.backward()
    assert value.item() == 0 and s.grad.abs().max() == 0


# ------------------------------------------------------------------------------------------------- the loss term
def test_term_reads_teacher_targets_and_raises_without_them() -> None:
    s, t, sl, tl = random_pair(23)
    term = ULDLoss(student_temperature=1.5)
    batch = DistillBatch(ModelOutputs(s), ModelOutputs(t), targets=sl, teacher_targets=tl)
    assert term(batch).item() == pytest.approx(uld_loss(s, t, sl, tl, student_temperature=1.5).item())
    with pytest.raises(ValueError, match=r"teacher_tokenizer.*teacher_input_ids.*teacher_labels"):
        term(DistillBatch(ModelOutputs(s), ModelOutputs(t), targets=sl))
    with pytest.raises(ValueError, match="no labels"):
        term(DistillBatch(ModelOutputs(s), ModelOutputs(t), teacher_targets=tl))
    # a teacher that read the student's own tokens (same logit shape) is scored against the student's labels
    t_same = torch.randn(s.shape, generator=gen(24))
    same = term(DistillBatch(ModelOutputs(s), ModelOutputs(t_same), targets=sl))
    assert same.item() == pytest.approx(uld_loss(s, t_same, sl, sl, student_temperature=1.5).item())


def test_registry_flags_arguments_and_yaml() -> None:
    cls = get_loss_class("uld")
    assert cls is ULDLoss and cls.cross_vocabulary and not cls.replaces_task_loss
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / "uld.yaml"))
    assert cfg["task"] == "lm" and cfg["task_weight"] == 1.0  # the reference's crossentropy_weight
    params = inspect.signature(ULDLoss.__init__).parameters
    values = cfg["terms"]["uld"]
    assert set(values) == set(params) - {"self"}
    assert {p: params[p].default for p in values} == values  # the YAML repeats the constructor's defaults
    for bad in ({"student_temperature": 0}, {"teacher_temperature": -1.0}, {"reduction": "mean"}, {"chunk_size": 0}):
        with pytest.raises(ValueError, match="uld"):
            ULDLoss(**bad)


def test_vocabulary_mismatch_without_uld_raises_and_names_uld() -> None:
    student, teacher = tiny_lm(30), tiny_lm(40, seed=1)
    inputs = {"input_ids": torch.randint(0, 30, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    with pytest.raises(ClassCountMismatchError, match="uld"):
        DistillEngine("fkl", teacher).setup(student, inputs, student)
    engine = DistillEngine("uld", teacher)
    engine.setup(student, inputs, student)  # accepted: a cross-vocabulary term
    assert engine.is_setup


# --------------------------------------------------------------------------------------------------- end to end
def test_end_to_end_with_two_tokenizers() -> None:
    tok_s, tok_t = tiny_tokenizer(300), tiny_tokenizer(280)
    assert len(tok_s) != len(tok_t)
    pairs = [split_prompt(text, 0.4) for text in TEXTS[:6]]
    data = TextExamples(pairs, tok_s, 64, teacher_tokenizer=tok_t)

    def loader() -> DataLoader:
        return DataLoader(
            data, batch_size=3, collate_fn=lambda items: pad_batch(items, tok_s.pad_token_id, tok_t.pad_token_id)
        )

    batch = next(iter(loader()))
    # the prompts tokenize to different lengths, the answers are paired from their first token
    assert (batch["labels"] != I).long().argmax(1).tolist() != (batch["teacher_labels"] != I).long().argmax(1).tolist()
    student, teacher = tiny_lm(len(tok_s)), tiny_lm(len(tok_t), seed=1)
    before = [p.detach().clone() for p in student.parameters()]
    grads: list[float] = []

    class GradProbe(L.Callback):
        def on_after_backward(self, trainer, module) -> None:
            grads.append(sum(float(p.grad.abs().sum()) for p in module.model.parameters() if p.grad is not None))

    module = LMDistillationModule(student, teacher, loss="uld", task_weight=0.0)  # gradients from ULD alone
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, num_sanity_val_steps=0,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1, callbacks=[GradProbe()],
    )  # fmt: skip
    trainer.fit(module, loader(), loader())
    metrics = trainer.callback_metrics
    assert trainer.global_step == 2 and math.isfinite(float(metrics["train/uld"])) and float(metrics["train/uld"]) > 0
    assert len(grads) == 2 and all(g > 0 and math.isfinite(g) for g in grads)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert math.isfinite(float(metrics["val/loss"])) and "val/agreement" not in metrics  # no agreement across vocabs
