"""On-policy (GKD), sequence-level, speculative (SKD) and DistiLLM adaptive off-policy generation callbacks
(lightning_kd.lm.generation): tiny GPT-2s, a few tokens, a few steps."""

from __future__ import annotations

import io
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import fast_trainer
from lm_helpers import tiny_lm, token_batch
from torch import nn
from torch.utils.data import DataLoader

from lightning_kd.callback import DistillCallback
from lightning_kd.lm.generation import (
    AdaptiveOffPolicy,
    OnPolicyDistillation,
    SpeculativeDistillation,
    cut_at_eos,
    left_pad,
    nucleus_probabilities,
    pack_sequences,
    prompt_lengths_of,
    sampling_seed,
    speculative_sample,
)
from lightning_kd.lm.generation.batch import check_token_batch, rewrite_batch
from lightning_kd.lm.generation.speculative import _Decoder
from lightning_kd.lm.module import LMDistillationModule

VOCAB, EOS, PAD = 50, 2, 1
IDS = {"eos_token_id": EOS, "pad_token_id": PAD}


def batches(n: int = 2, batch: int = 3, length: int = 8) -> list[dict[str, torch.Tensor]]:
    return [token_batch(batch=batch, length=length, vocab_size=VOCAB, prompt=3, seed=i) for i in range(n)]


def loader(items: list[dict[str, torch.Tensor]]) -> DataLoader:
    return DataLoader([{k: v.clone() for k, v in b.items()} for b in items], batch_size=None)


def hf_completions(model: nn.Module, prompts: list[torch.Tensor], seed: int, n: int, **sampling) -> list[torch.Tensor]:
    """What ``model.generate`` samples from the left-padded prompts with the global RNG seeded with ``seed``."""
    ids, mask = left_pad(prompts, PAD)
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=n, pad_token_id=PAD, eos_token_id=EOS,
            **sampling,
        )  # fmt: skip
    model.train(was_training)
    return cut_at_eos(out[:, ids.shape[1] :], [EOS])


def prompts_and_completions(batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Split a packed batch by its prompt lengths and labels (the completion = the labelled tokens)."""
    prompts, completions = [], []
    for ids, labels, n in zip(batch["input_ids"], batch["labels"], batch["prompt_lengths"].tolist()):
        prompts.append(ids[:n])
        completions.append(labels[labels != -100])
    return prompts, completions


class SpyLMDistillation(LMDistillationModule):
    """Records the batch training_step sees, and what the student's generate samples from its prompts right then."""

    def __init__(self, *args, sampling: dict | None = None, **kw) -> None:
        super().__init__(*args, **kw)
        self.seen: list[dict[str, torch.Tensor]] = []
        self.expected: list[list[torch.Tensor]] = []
        self.sampling = sampling
        self.modes: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.seen.append({k: v.clone() for k, v in batch.items()})
        self.modes.append(self.model.training)
        if self.sampling is not None:
            seed = sampling_seed(self.sampling["seed"], self.global_step, batch_idx)
            kw = {k: v for k, v in self.sampling.items() if k not in ("seed", "n")}
            prompts = prompts_and_completions(batch)[0]
            self.expected.append(hf_completions(self.model, prompts, seed, self.sampling["n"], **kw))
        return super().training_step(batch, batch_idx)


def fit_lm(callback: L.Callback, steps: int, items: list, sampling: dict | None = None) -> tuple:
    module = SpyLMDistillation(tiny_lm(VOCAB, seed=0), tiny_lm(VOCAB, seed=1), loss="fkl", sampling=sampling)
    trainer = fast_trainer(max_steps=steps, callbacks=[callback], limit_val_batches=0)
    trainer.fit(module, loader(items))
    return module, trainer


# --------------------------------------------------------------------------------------------------------------------
# Batch plumbing
# --------------------------------------------------------------------------------------------------------------------
def test_cut_pack_and_rewrite_by_hand() -> None:
    completions = cut_at_eos(torch.tensor([[5, EOS, 7], [4, 6, 8]]), [EOS])
    assert [c.tolist() for c in completions] == [[5, EOS], [4, 6, 8]]
    packed = pack_sequences([torch.tensor([9]), torch.tensor([9, 3])], completions, PAD)
    assert packed["input_ids"].tolist() == [[9, 5, EOS, PAD, PAD], [9, 3, 4, 6, 8]]
    assert packed["labels"].tolist() == [[-100, 5, EOS, -100, -100], [-100, -100, 4, 6, 8]]
    assert packed["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert packed["prompt_lengths"].tolist() == [1, 2]
    batch = token_batch(batch=2, length=6, vocab_size=VOCAB)
    index = batch["index"].clone()
    rewrite_batch(batch, packed)
    assert batch["input_ids"] is packed["input_ids"] and torch.equal(batch["index"], index)


def test_prompts_left_padding_and_prompt_lengths_from_labels() -> None:
    batch = token_batch(batch=3, length=8, vocab_size=VOCAB, prompt=3)
    assert prompt_lengths_of(batch).tolist() == [3, 3, 3]
    del batch["prompt_lengths"]
    assert prompt_lengths_of(batch).tolist() == [3, 3, 3]  # first labelled position
    ids, mask = left_pad([torch.tensor([4, 5, 6]), torch.tensor([7])], PAD)
    assert ids.tolist() == [[4, 5, 6], [PAD, PAD, 7]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    batch["labels"][0] = batch["input_ids"][0]  # a row labelled from its first token: no prompt to generate from
    with pytest.raises(ValueError, match="empty prompt"):
        prompt_lengths_of(batch)


def test_batches_that_cannot_be_rewritten_fail_clearly() -> None:
    batch = token_batch(batch=2, length=6, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="teacher's own tokenization"):
        check_token_batch({**batch, "teacher_input_ids": batch["input_ids"]}, "X")
    with pytest.raises(ValueError, match="position_ids"):
        check_token_batch({**batch, "position_ids": batch["input_ids"]}, "X")
    with pytest.raises(TypeError, match="token batches"):
        check_token_batch((batch["input_ids"],), "X")


def test_token_ids_outside_the_vocabulary_and_missing_models_fail_clearly() -> None:
    with pytest.raises(ValueError, match="eos_token_id=tokenizer.eos_token_id"):
        OnPolicyDistillation().token_ids(tiny_lm(VOCAB))  # the gpt2 config's eos 50256 is not in a 50-token vocab
    assert OnPolicyDistillation(**IDS).token_ids(tiny_lm(VOCAB)) == ([EOS], PAD)
    with pytest.raises(RuntimeError, match="student="):
        OnPolicyDistillation().student_model(L.LightningModule())
    with pytest.raises(RuntimeError, match="DistillCallback"):
        OnPolicyDistillation(seq_kd=True).engine(SimpleNamespace(callbacks=[]), L.LightningModule())


# --------------------------------------------------------------------------------------------------------------------
# GKD / sequence-level KD
# --------------------------------------------------------------------------------------------------------------------
def test_lambda_one_trains_every_batch_on_the_students_samples() -> None:
    items = batches()
    sampling = {"seed": 5, "n": 4, "temperature": 0.9, "top_k": 0, "top_p": 1.0}
    callback = OnPolicyDistillation(lmbda=1.0, max_new_tokens=4, seed=5, **IDS)
    module, trainer = fit_lm(callback, 2, items, sampling)
    assert len(module.seen) == 2
    for original, seen, expected in zip(items, module.seen, module.expected):
        prompts, completions = prompts_and_completions(seen)
        assert [p.tolist() for p in prompts] == [ids[:3].tolist() for ids in original["input_ids"]]
        assert [c.tolist() for c in completions] == [e.tolist() for e in expected]
        lengths = seen["prompt_lengths"] + torch.tensor([len(c) for c in completions])
        assert torch.equal(seen["attention_mask"].sum(-1), lengths)
        assert torch.equal(seen["index"], original["index"])
        assert not torch.equal(seen["input_ids"][:, 3:7], original["input_ids"][:, 3:7])  # new completions
    assert float(trainer.callback_metrics["train/on_policy"]) == 1.0
    assert module.modes == [True, True]  # generation ran in eval mode; training mode restored


def test_sampling_neither_reads_nor_moves_the_global_rng() -> None:
    callback = OnPolicyDistillation(max_new_tokens=4, **IDS)
    model = tiny_lm(VOCAB)
    prompts = [torch.tensor([4, 5, 6]), torch.tensor([7])]
    outputs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        outputs.append([c.tolist() for c in callback.sample(model, prompts, seed=11, temperature=0.9)])
        assert torch.equal(torch.get_rng_state(), state)
    assert outputs[0] == outputs[1]
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="lower max_new_tokens"):
        OnPolicyDistillation(max_new_tokens=126, **IDS).sample(model, prompts, seed=0, temperature=1.0)  # 3 + 126 > 128


def test_lambda_zero_leaves_batches_untouched() -> None:
    items = batches()
    module, trainer = fit_lm(OnPolicyDistillation(lmbda=0.0, max_new_tokens=4, **IDS), 2, items)
    for original, seen in zip(items, module.seen):
        assert all(torch.equal(original[k], seen[k]) for k in original)
    assert float(trainer.callback_metrics["train/on_policy"]) == 0.0


def test_lambda_half_flips_half_the_batches_identically_on_every_rank() -> None:
    def sources(seed: int, rank_rng: int) -> list[str | None]:
        torch.manual_seed(rank_rng)  # rank-local RNG state must not matter
        callback = OnPolicyDistillation(lmbda=0.5, seq_kd=True, seed=seed)
        return [callback.source(step, step % 3) for step in range(400)]

    rank0, rank1 = sources(7, rank_rng=0), sources(7, rank_rng=1)
    assert rank0 == rank1
    assert set(rank0) == {"student", "teacher"}
    assert 0.42 < rank0.count("student") / 400 < 0.58
    assert sources(8, rank_rng=0) != rank0


class UserLM(L.LightningModule):
    """A user's own LM module: forward(input_ids, attention_mask, labels) returns the HF output; its loss is trained."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.seen: list[dict[str, torch.Tensor]] = []

    def forward(self, input_ids, attention_mask, labels=None):
        return self.net(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch, batch_idx):
        self.seen.append({k: v.clone() for k, v in batch.items()})
        return self(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_seq_kd_trains_a_users_module_on_the_teachers_samples_through_distill_callback() -> None:
    items = batches()
    teacher = tiny_lm(VOCAB, seed=1)
    module = UserLM(tiny_lm(VOCAB, seed=0))
    callback = OnPolicyDistillation(lmbda=0.0, seq_kd=True, max_new_tokens=4, seed=3, **IDS)
    trainer = fast_trainer(max_steps=2, callbacks=[DistillCallback(teacher, loss="fkl"), callback], limit_val_batches=0)
    trainer.fit(module, loader(items))
    assert len(module.seen) == 2
    for step, (original, seen) in enumerate(zip(items, module.seen)):
        prompts, completions = prompts_and_completions(seen)
        assert [p.tolist() for p in prompts] == [ids[:3].tolist() for ids in original["input_ids"]]
        expected = hf_completions(teacher, prompts, sampling_seed(3, step, step), 4, temperature=0.9, top_k=0)
        assert [c.tolist() for c in completions] == [e.tolist() for e in expected]
    assert float(trainer.callback_metrics["train/on_policy"]) == 0.0
    assert "train/fkl" in trainer.callback_metrics


# --------------------------------------------------------------------------------------------------------------------
# Speculative KD
# --------------------------------------------------------------------------------------------------------------------
class NextTokenStudent(nn.Module):
    """Always proposes ``previous token + 1`` (mod V): its distribution is one token."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None, **kw):
        return SimpleNamespace(logits=F.one_hot((input_ids + 1) % self.vocab, self.vocab).float() * 1e4 - 1e4)


class RankedTeacher(nn.Module):
    """Logits ``-1e4·v``: its top-K is ``{0, ..., K-1}`` at every prefix and all its probability is on token 0."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.register_buffer("scores", -1e4 * torch.arange(vocab, dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None, **kw):
        return SimpleNamespace(logits=self.scores.expand(*input_ids.shape, -1))


def test_speculative_sample_replaces_exactly_the_proposals_outside_the_teachers_top_k_by_hand() -> None:
    ids, mask = left_pad([torch.tensor([5, 6]), torch.tensor([1])], PAD)
    kw = {"max_new_tokens": 6, "top_k": 4, "student_top_p": 1.0, "teacher_top_p": 1.0}
    out = speculative_sample(NextTokenStudent(10), RankedTeacher(10), ids, mask, **kw)
    # row 0: 6 -> proposes 7 (not in {0..3}: teacher's 0), 1, 2, 3, 4 (replaced: 0), 1
    assert out.proposals.tolist()[0] == [7, 1, 2, 3, 4, 1]
    assert out.tokens.tolist()[0] == [0, 1, 2, 3, 0, 1]
    assert out.replaced.tolist()[0] == [True, False, False, False, True, False]
    # row 1: 1 -> 2, 3, 4 (replaced), 1, 2, 3
    assert out.tokens.tolist()[1] == [2, 3, 0, 1, 2, 3]
    assert out.replaced.tolist()[1] == [False, False, True, False, False, False]
    # with eos 3 each row stops after its first 3 (the loop ends when all rows have); later positions hold the pad
    out = speculative_sample(
        NextTokenStudent(10), RankedTeacher(10), ids, mask, eos_token_ids=[3], pad_token_id=PAD, **kw
    )
    assert out.tokens.tolist() == [[0, 1, 2, 3], [2, 3, PAD, PAD]]
    assert out.replaced.tolist() == [[True, False, False, False], [False] * 4]


def test_speculative_sample_with_a_real_student_keeps_exactly_the_proposals_in_the_top_k() -> None:
    ids, mask = left_pad([torch.tensor([5, 6, 7]), torch.tensor([9])], PAD)
    k = 20
    out = speculative_sample(
        tiny_lm(VOCAB), RankedTeacher(VOCAB), ids, mask, max_new_tokens=6, top_k=k, student_temperature=1.0,
        student_top_p=1.0, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    outside = out.proposals >= k  # the teacher's top-K is {0, ..., K-1}
    assert torch.equal(out.replaced, outside)
    assert torch.equal(out.tokens[~outside], out.proposals[~outside])
    assert bool((out.tokens[outside] == 0).all())  # the teacher's sample
    assert 0 < int(outside.sum()) < outside.numel()


def test_decoder_cache_with_left_padding_matches_the_unpadded_forward() -> None:
    model = tiny_lm(VOCAB).eval()
    ids, mask = left_pad([torch.tensor([5, 6, 7]), torch.tensor([9])], PAD)
    with torch.no_grad():
        decoder = _Decoder(model, ids, mask)
        assert decoder.cache_arg is not None
        first = decoder.start()
        second = decoder.step(torch.tensor([11, 12]))
        for row, prompt, token in ((0, [5, 6, 7], 11), (1, [9], 12)):
            alone = model(input_ids=torch.tensor([prompt + [token]])).logits[0]
            torch.testing.assert_close(first[row], alone[-2], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(second[row], alone[-1], atol=1e-5, rtol=1e-5)


def test_nucleus_probabilities_by_hand_and_as_transformers_top_p() -> None:
    from transformers.generation.logits_process import TopPLogitsWarper

    probs = nucleus_probabilities(torch.tensor([0.5, 0.3, 0.2]).log(), 1.0, 0.6)
    torch.testing.assert_close(probs, torch.tensor([0.625, 0.375, 0.0]))
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    for top_p in (0.3, 0.9):
        expected = TopPLogitsWarper(top_p)(None, logits / 0.7).softmax(-1)
        torch.testing.assert_close(nucleus_probabilities(logits, 0.7, top_p), expected)


def test_speculative_distillation_trains_on_interleaved_samples() -> None:
    callback = SpeculativeDistillation(top_k=10, max_new_tokens=4, student_temperature=1.0, student_top_p=1.0, **IDS)
    module, trainer = fit_lm(callback, 1, batches(1))
    seen = module.seen[0]
    replaced = callback.last_replaced
    completion = seen["labels"] != -100
    assert replaced.shape == seen["input_ids"].shape and not bool((replaced & ~completion).any())
    logged = float(trainer.callback_metrics["train/skd_replaced"])
    assert logged == pytest.approx(replaced.sum().item() / completion.sum().item())


# --------------------------------------------------------------------------------------------------------------------
# DistiLLM adaptive off-policy
# --------------------------------------------------------------------------------------------------------------------
def test_distillm_threshold_rises_only_when_validation_loss_worsens_by_loss_eps() -> None:
    callback = AdaptiveOffPolicy(init_threshold=0.0, loss_eps=0.1)
    trace = []
    for loss in (3.0, 3.05, 3.1, 3.15, 3.19, 2.0, 3.3, 3.4):
        callback.update(loss)
        trace.append((round(callback.threshold, 6), callback.prev_loss))
    assert trace == [
        (0.0, 3.0),  # the first validation only sets the reference
        (0.0, 3.0),  # +0.05 < loss_eps
        (0.1, 3.1),  # +0.1: raised, the reference moves
        (0.1, 3.1),
        (0.1, 3.1),  # 3.19 - 3.1 < 0.1
        (0.1, 3.1),  # improving never lowers it
        (0.2, 3.3),
        (0.3, 3.4),
    ]
    for i in range(20):
        callback.update(4.0 + i)
    assert callback.threshold == 1.0


def test_distillm_validation_hook_reads_and_reduces_the_monitored_loss() -> None:
    callback = AdaptiveOffPolicy(init_threshold=0.2)
    reduced = []

    def trainer(loss: float, **kw) -> SimpleNamespace:
        strategy = SimpleNamespace(reduce=lambda v, reduce_op: reduced.append(reduce_op) or v)
        fields = {"sanity_checking": False, "state": SimpleNamespace(fn="fit"), "strategy": strategy}
        return SimpleNamespace(callback_metrics={"val/loss": torch.tensor(loss)}, **{**fields, **kw})

    module = SimpleNamespace(device=torch.device("cpu"))
    callback.on_validation_end(trainer(9.0, sanity_checking=True), module)  # sanity check: ignored
    assert callback.prev_loss is None
    callback.on_validation_end(trainer(1.0), module)
    callback.on_validation_end(trainer(1.5), module)
    assert callback.threshold == pytest.approx(0.3) and reduced == ["mean", "mean"]
    with pytest.raises(KeyError, match="monitor="):
        AdaptiveOffPolicy(monitor="val/nll").on_validation_end(trainer(1.0), module)


def test_distillm_fresh_share_schedules() -> None:
    values = {}
    for ratio in ("decreasing", "constant", "increasing"):
        callback = AdaptiveOffPolicy(init_threshold=0.5, replay_ratio=ratio)
        callback._total_steps = 10
        values[ratio] = callback.fresh_threshold(0)  # the first step is step 1 of 10 in DistiLLM
    assert values == pytest.approx({"decreasing": 0.45, "constant": 0.25, "increasing": 0.05})
    callback = AdaptiveOffPolicy(init_threshold=0.0)
    callback._total_steps = 10
    assert {callback.choose(s, 0) for s in range(50)} == {None}


class RecordingAdaptiveOffPolicy(AdaptiveOffPolicy):
    """Records each choice with the buffer's content at that moment."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.trace: list[tuple[str | None, list[list[int]]]] = []

    def choose(self, step: int, batch_idx: int) -> str | None:
        choice = super().choose(step, batch_idx)
        self.trace.append((choice, [s["input_ids"].tolist() for s in self.buffer.samples]))
        return choice


def test_distillm_buffer_fills_respects_capacity_replays_and_round_trips() -> None:
    items = batches(4)
    callback = RecordingAdaptiveOffPolicy(capacity=5, init_threshold=1.0, max_new_tokens=3, seed=1, **IDS)
    module, trainer = fit_lm(callback, 4, items)
    kinds = [kind for kind, _ in callback.trace]
    assert kinds[:2] == ["fresh", "fresh"]  # p = 1 and the buffer is not full yet
    assert set(kinds) == {"fresh", "replayed"}  # seed chosen so that the last two steps include a replay
    assert len(callback.buffer) == 5  # capacity respected
    assert callback.counts == {"batches": 4, "fresh": kinds.count("fresh"), "replayed": kinds.count("replayed")}
    for (kind, before), seen, original in zip(callback.trace, module.seen, items):
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(seen["input_ids"], seen["attention_mask"])]
        if kind == "fresh":  # this batch's prompts with new completions, now stored
            prompts = prompts_and_completions(seen)[0]
            assert [p.tolist() for p in prompts] == [ids[:3].tolist() for ids in original["input_ids"]]
        else:  # drawn from the buffer, without replacement
            assert all(row in before for row in rows) and len(before) == 5
    assert float(trainer.callback_metrics["train/sgo/threshold"]) == 1.0
    assert float(trainer.callback_metrics["train/sgo/buffer"]) == 5.0

    stored = [s["input_ids"].tolist() for s in callback.buffer.samples]
    buffer = io.BytesIO()
    torch.save(callback.state_dict(), buffer)
    buffer.seek(0)
    restored = AdaptiveOffPolicy(capacity=5)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.threshold == 1.0 and restored.prev_loss == callback.prev_loss
    assert [s["input_ids"].tolist() for s in restored.buffer.samples] == stored
    assert [s["index"] for s in restored.buffer.samples] == [s["index"] for s in callback.buffer.samples]
    assert restored.counts == callback.counts
