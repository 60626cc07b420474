"""Language-model teacher logits computed once (PD's offline top-k / top-p logits) through the teacher-output cache."""

from __future__ import annotations

import inspect
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SmallCNN, UserModule, fast_trainer
from lightning.pytorch.callbacks import Callback
from lm_helpers import TEXTS, tiny_lm, tiny_tokenizer
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd import DistillCallback
from lightning_kd.config import CONF_DIR
from lightning_kd.lm.data import TextDataModule, pad_batch
from lightning_kd.lm.divergences import ChunkedStats, next_token_mask, token_divergence
from lightning_kd.lm.logit_cache import (
    LMTeacherOutputCache,
    kept_counts,
    pack_token_logits,
    reconstruct_token_logits,
    token_layout,
)
from lightning_kd.lm.module import CausalLMModule, LMDistillationModule
from lightning_kd.lm.tokenizer import train_bpe_tokenizer
from lightning_kd.strategies.teacher_cache import CacheMismatchError, StaleCacheError, TeacherOutputCache

V = 300
TOP_K, TOP_P = 8, 0.9
BATCH = 4


class SharpTeacher(torch.nn.Module):
    """A tiny GPT-2 whose logits are scaled up (a random one is nearly uniform over the vocabulary; a trained one
    is confident), counting the samples of every forward."""

    def __init__(self, scale: float = 30.0) -> None:
        super().__init__()
        self.lm = tiny_lm(V, seed=1)
        self.scale = scale
        self.samples = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.samples += len(input_ids)
        return self.scale * self.lm(input_ids=input_ids, attention_mask=attention_mask).logits


class KeywordLM(CausalLMModule):
    """A plain causal-LM module that DistillCallback can probe with keyword inputs (as the LM app's)."""

    def forward(self, x=None, **inputs):
        return super().forward(inputs if x is None else x)


class PerEpoch(Callback):
    """First in the callback list: the teacher's forward samples in each epoch (prefill + steps + checks)."""

    def __init__(self, teacher: SharpTeacher) -> None:
        self.teacher, self.counts, self._start = teacher, [], 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = self.teacher.samples

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.counts.append(self.teacher.samples - self._start)


class SpyCache(LMTeacherOutputCache):
    """Keeps what lookup served: (epoch, indices, logits)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.served: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def lookup(self, indices, epoch, device):
        out = super().lookup(indices, epoch, device)
        if out is not None:
            self.served.append((epoch, indices.clone(), out.logits.clone()))
        return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two corpora of the same size (the second upper-cased) and two tokenizers of the same vocabulary size."""
    root = tmp_path_factory.mktemp("lm-cache-data")
    text = "\n\n".join(dict.fromkeys(TEXTS))
    (root / "corpus.txt").write_text(text)
    (root / "upper.txt").write_text(text.upper())
    tiny_tokenizer(V).backend_tokenizer.save(str(root / "tok.json"))
    other = train_bpe_tokenizer([t.upper() for t in TEXTS], V, min_frequency=1)
    other.backend_tokenizer.save(str(root / "other_tok.json"))
    return {"corpus": root / "corpus.txt", "upper": root / "upper.txt", "tok": root / "tok.json",
            "other_tok": root / "other_tok.json"}  # fmt: skip


def datamodule(files: dict[str, Path], corpus: str = "corpus", tok: str = "tok") -> TextDataModule:
    """Segments of about 50 characters, a 30 % prompt (labels -100), right-padded batches of 4."""
    dm = TextDataModule(
        paths=[files[corpus]], tokenizer=str(files[tok]), segment_chars=50, max_length=64, prompt_fraction=0.3,
        batch_size=BATCH,
    )  # fmt: skip
    dm.setup()
    assert dm.vocab_size == V
    return dm


def fit(cache, teacher: SharpTeacher, dm: TextDataModule, epochs: int = 1, extra=()) -> object:
    module = LMDistillationModule(tiny_lm(V, seed=0), teacher, loss="fkl")
    trainer = fast_trainer(max_epochs=epochs, limit_val_batches=0, callbacks=[*extra, cache])
    trainer.fit(module, datamodule=dm)
    return trainer


def live_batch(dm: TextDataModule, indices: torch.Tensor) -> dict[str, torch.Tensor]:
    data = dm.dataset("train")
    return dm.collate([data[int(i)] for i in indices])


@pytest.fixture(scope="module")
def replayed(files, tmp_path_factory: pytest.TempPathFactory):
    """Two epochs with top_k=8, top_p=0.9: epoch 0 fills the cache (prefill), epoch 1 reads it."""
    teacher = SharpTeacher()
    per_epoch = PerEpoch(teacher)
    cache = SpyCache(tmp_path_factory.mktemp("lm-cache") / "cache", top_k=TOP_K, top_p=TOP_P)
    dm = datamodule(files)
    trainer = fit(cache, teacher, dm, epochs=2, extra=(per_epoch,))
    return {"cache": cache, "trainer": trainer, "teacher": teacher, "dm": dm, "counts": per_epoch.counts}


# --------------------------------------------------------------------------------------------------------------------
# Truncation and reconstruction
# --------------------------------------------------------------------------------------------------------------------
def test_top_p_keeps_the_minimal_prefix_reaching_p_hand_worked() -> None:
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    log_p = p.log()
    cases = {0.4: 1, 0.5: 1, 0.79: 2, 0.8: 2, 0.81: 3, 0.95: 3, 0.951: 4, None: 4, 1.0: 4}
    for top_p, n in cases.items():
        assert kept_counts(log_p, top_p).tolist() == [n], top_p
        out = pack_token_logits(log_p[:, [2, 0, 3, 1]], None, top_p)  # order in the vocabulary does not matter
        assert out["counts"].tolist() == [n]
        assert out["indices"].tolist() == [1, 3, 0, 2][:n]
        torch.testing.assert_close(out["tail_lse"].exp(), torch.tensor([1 - float(p[0, :n].sum())]), atol=1e-6, rtol=0)
    assert kept_counts(log_p, 0.951).tolist() == [4] and pack_token_logits(log_p, 3, 0.951)["counts"].tolist() == [3]

    # k = 1: the other three tokens share 0.5 uniformly -> p~ = (0.5, 1/6, 1/6, 1/6)
    out = pack_token_logits(log_p, 1, None)
    rec = reconstruct_token_logits(out["counts"], out["values"], out["indices"], out["tail_lse"], 4)
    torch.testing.assert_close(rec.softmax(-1), torch.tensor([[0.5, 1 / 6, 1 / 6, 1 / 6]]), rtol=1e-3, atol=1e-4)
    kl = 0.5 * math.log(0.5 / 0.5) + 0.3 * math.log(0.3 * 6) + 0.15 * math.log(0.15 * 6) + 0.05 * math.log(0.05 * 6)
    tv = 0.5 * (abs(0.3 - 1 / 6) + abs(0.15 - 1 / 6) + abs(0.05 - 1 / 6))
    assert math.isclose(float(out["truncation_kl"]), kl, rel_tol=1e-3)  # 0.10034 (log 0.5 is stored in float16)
    assert math.isclose(float(out["truncation_tv"]), tv, rel_tol=1e-3)  # 0.13333
    assert math.isclose(float(out["tail_mass"]), 0.5, rel_tol=1e-6)
    # every entry kept: nothing to report
    out = pack_token_logits(log_p, None, None)
    assert float(out["tail_mass"]) == 0.0 and float(out["truncation_kl"]) < 1e-6


def test_reconstruction_keeps_kept_probabilities_and_the_truncated_mass() -> None:
    z = 4 * torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    p = z.softmax(-1)
    previous = None
    for top_k, top_p in ((1, None), (5, 0.9), (5, None), (20, None), (None, None)):
        out = pack_token_logits(z, top_k, top_p)
        n = out["counts"]
        rec = reconstruct_token_logits(n, out["values"], out["indices"], out["tail_lse"], 50)
        rows = torch.repeat_interleave(torch.arange(64), n)
        idx = out["indices"]
        # the kept entries are the log-probabilities, rounded to float16 (half an ulp: 2^-11 relative)
        torch.testing.assert_close(rec[rows, idx], z.log_softmax(-1)[rows, idx], rtol=2**-11, atol=1e-7)
        kept = torch.zeros_like(p, dtype=torch.bool)
        kept[rows, idx] = True
        # the other entries carry the truncated mass exactly, so the reconstruction is normalised up to that rounding
        torch.testing.assert_close(rec.exp().masked_fill(kept, 0).sum(-1), out["tail_mass"].float())
        torch.testing.assert_close(rec.exp().sum(-1), torch.ones(64), rtol=0, atol=2e-3)
        q = rec.softmax(-1)
        tail = q.masked_fill(kept, float("nan"))  # uniform over the tokens not kept
        torch.testing.assert_close(tail.nan_to_num(0).amax(-1), torch.nan_to_num(tail, 1.0).amin(-1).where(n < 50, 0))
        if top_p is not None:  # the smallest prefix reaching p, capped at k
            sorted_p = p.sort(-1, descending=True).values
            mass = sorted_p.cumsum(-1)
            assert bool((mass.gather(-1, (n - 2).clamp_min(0)[:, None])[:, 0] < top_p)[n > 1].all())  # minimal
            assert bool(((mass.gather(-1, (n - 1)[:, None])[:, 0] >= top_p - 1e-6) | (n == 5)).all())  # reaches p
            assert bool((n < 5).any() and (n == 5).any())  # both cases occur
        assert bool((out["truncation_tv"] <= out["tail_mass"] + 1e-3).all())  # + float16 rounding of the kept
        mean_kl = float(out["truncation_kl"].mean())
        if previous is not None and top_p is None:
            assert mean_kl < previous  # more entries, less truncation
        previous = mean_kl if top_p is None else previous
    assert previous < 1e-5  # every entry kept: float16 rounding only


# --------------------------------------------------------------------------------------------------------------------
# Record, replay, report
# --------------------------------------------------------------------------------------------------------------------
def test_first_epoch_records_and_the_second_replays_without_the_teacher(replayed) -> None:
    cache, n = replayed["cache"], len(replayed["dm"].dataset("train"))
    # epoch 0: prefill (every sample once) + the one verified batch; epoch 1: no teacher at all
    assert replayed["counts"] == [n + BATCH, 0]
    assert cache.stats["computed"] == n and cache.stats["miss_batches"] == 0
    assert cache.stats["hit_batches"] == 2 * math.ceil(n / BATCH) and cache.stats["verified_batches"] == 1
    assert [epoch for epoch, _, _ in cache.served] == [e for e in (0, 1) for _ in range(math.ceil(n / BATCH))]


def test_replayed_logits_reproduce_the_teachers_top_entries(replayed) -> None:
    cache, dm, teacher = replayed["cache"], replayed["dm"], replayed["teacher"]
    lengths_seen = set()
    for _, indices, logits in cache.served:
        batch = live_batch(dm, indices)
        assert logits.shape == (*batch["input_ids"].shape, V)
        with torch.no_grad():
            log_p = torch.log_softmax(teacher.eval()(batch["input_ids"], batch["attention_mask"]), -1)
        lengths = batch["attention_mask"].sum(-1)
        lengths_seen |= set(lengths.tolist())
        for b, length in enumerate(lengths.tolist()):
            ref, got = log_p[b, :length], logits[b, :length]
            n = kept_counts(ref.sort(-1, descending=True).values[:, :TOP_K], TOP_P)
            for t in range(length):
                top = ref[t].topk(int(n[t]))
                assert set(got[t].topk(int(n[t])).indices.tolist()) == set(top.indices.tolist())  # the same tokens
                torch.testing.assert_close(got[t, top.indices], top.values.half().float(), rtol=1e-3, atol=1e-4)
                others = got[t].scatter(0, top.indices, float("nan"))
                tail = torch.logsumexp(ref[t].scatter(0, top.indices, -math.inf), 0) - math.log(V - int(n[t]))
                torch.testing.assert_close(others[~others.isnan()], tail.expand(V - int(n[t])), rtol=1e-4, atol=1e-4)
            assert bool((logits[b, length:] == 0).all())  # padding positions: zeros (never scored)
    assert len(lengths_seen) > 3  # variable-length samples


def test_replayed_loss_is_within_the_reported_truncation_effect(replayed, capsys) -> None:
    """For the forward KL, the live and replayed losses differ per position by KL(p ‖ p~) + Σ (p~ − p) log q, whose
    second part is at most TV(p, p~) times the range of the student's log-probabilities on the tokens not kept; the
    gradient with respect to the student's logits moves by exactly p~ − p (L1 norm 2·TV)."""
    cache, dm, teacher, trainer = replayed["cache"], replayed["dm"], replayed["teacher"], replayed["trainer"]
    student = tiny_lm(V, seed=0).eval()
    gaps, bounds, kls, live_losses, all_kls = [], [], [], [], []
    for epoch, indices, replay in cache.served:
        if epoch != 1:
            continue
        batch = live_batch(dm, indices)
        with torch.no_grad():
            full = teacher.eval()(batch["input_ids"], batch["attention_mask"])
            q_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        real = batch["attention_mask"].bool()
        report = pack_token_logits(full[real], TOP_K, TOP_P)  # what the cache computed when it stored these samples
        all_kls.append(report["truncation_kl"])
        mask = next_token_mask(batch["labels"])  # prompt (-100) and padding positions are not scored
        assert bool((mask <= real).all()) and bool((~mask & real).any())
        per_position = {}
        for name, teacher_logits in (("live", full), ("replay", replay)):
            stats = ChunkedStats(rows=torch.zeros(0))
            s = q_logits.clone().requires_grad_()
            token_divergence(s, teacher_logits, mask, "forward_kl", stats=stats).backward()
            per_position[name] = (stats.rows, s.grad[mask] * mask.sum())
        scored = mask[real]  # the scored positions among the stored (real) ones
        kl, tv = report["truncation_kl"][scored].float(), report["truncation_tv"][scored].float()
        gap = per_position["live"][0] - per_position["replay"][0]
        # the student's log-probabilities on the tokens each position did not keep
        log_q = torch.log_softmax(q_logits[real], -1)
        kept = torch.zeros_like(log_q, dtype=torch.bool)
        kept[torch.repeat_interleave(torch.arange(len(log_q)), report["counts"]), report["indices"]] = True
        log_q, kept = log_q[scored], kept[scored]
        spread = log_q.masked_fill(kept, -math.inf).amax(-1) - log_q.masked_fill(kept, math.inf).amin(-1)
        assert bool(((gap - kl).abs() <= tv * spread + 2e-3).all())
        # the gradient moves by p~ - p
        grad_gap = (per_position["live"][1] - per_position["replay"][1]).abs().sum(-1)
        torch.testing.assert_close(grad_gap, 2 * tv, rtol=2e-3, atol=2e-4)
        gaps.append(gap), bounds.append(kl + tv * spread), kls.append(kl), live_losses.append(per_position["live"][0])
    gap, bound, kl, live = (torch.cat(x) for x in (gaps, bounds, kls, live_losses))
    assert abs(float(gap.mean())) <= float(bound.mean())
    # the logged report (means over the positions served in epoch 1) is the cache's own per-position computation
    logged = {k: float(trainer.callback_metrics[f"train/teacher_cache/{k}"]) for k in ("truncation_kl", "tail_mass")}
    assert math.isclose(logged["truncation_kl"], float(torch.cat(all_kls).mean()), rel_tol=1e-3)
    assert 1e-3 < logged["truncation_kl"] and 0 < logged["tail_mass"] < 1  # the approximation is not free
    with capsys.disabled():
        print(
            f"\nLM cache top_k={TOP_K} top_p={TOP_P}: live fkl {float(live.mean()):.4f}, replayed gap "
            f"{float(gap.mean()):+.4f} (|gap| per position mean {float(gap.abs().mean()):.4f}), reported "
            f"truncation_kl {logged['truncation_kl']:.4f}, tail_mass {logged['tail_mass']:.3f}"
        )


def test_shards_hold_real_positions_only_in_compact_dtypes(replayed) -> None:
    cache, dm = replayed["cache"], replayed["dm"]
    data = dm.dataset("train")
    (path,) = sorted(cache.dir.glob("slot0-rank0-*.pt"))
    shard = torch.load(path, weights_only=True)
    lengths = torch.tensor([len(data[int(i)]["input_ids"]) for i in shard["samples"]])
    assert torch.equal(shard["lengths"].long(), lengths)  # attention-mask lengths, padding never stored
    assert shard["counts"].numel() == int(lengths.sum()) == shard["tail_lse"].numel()
    assert shard["values"].numel() == int(shard["counts"].long().sum()) == shard["indices"].numel()
    assert shard["values"].dtype == torch.float16 and shard["tail_lse"].dtype == torch.float32
    assert shard["indices"].dtype == torch.int16 and shard["counts"].dtype == torch.int16  # V = 300 fits int16
    assert 1 <= int(shard["counts"].min()) and int(shard["counts"].max()) <= TOP_K
    assert int(shard["counts"].min()) < TOP_K  # top-p cut some positions below k
    manifest = json.loads((cache.dir / "manifest.json").read_text())
    assert manifest["format"] == "lightning_kd.teacher_cache.tokens"
    assert (manifest["top_k"], manifest["top_p"], manifest["num_classes"]) == (TOP_K, TOP_P, V)
    assert manifest["data"]["tokenizer"] == dm.signature()["tokenizer"]
    info = manifest["info"]["truncation"]["0"]
    assert info["samples"] == len(data) and info["positions"] == int(lengths.sum())
    logged = float(replayed["trainer"].callback_metrics["train/teacher_cache/truncation_kl"])
    assert math.isclose(info["truncation_kl"], logged, rel_tol=1e-4)  # every sample served once per epoch


def test_online_filling_with_the_callback_face(files, tmp_path: Path) -> None:
    """prefill=False: the training steps of epoch 0 run the live teacher and record; epoch 1 replays. The student is
    a plain CausalLMModule distilled by DistillCallback (the LM app's face)."""
    teacher = SharpTeacher()
    per_epoch = PerEpoch(teacher)
    cache = LMTeacherOutputCache(tmp_path, top_k=TOP_K, top_p=TOP_P, prefill=False, verify_batches=0)
    dm = datamodule(files)
    callbacks = [per_epoch, cache, DistillCallback(teacher, loss="fkl")]
    trainer = fast_trainer(max_epochs=2, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(KeywordLM(tiny_lm(V, seed=0)), datamodule=dm)
    n = len(dm.dataset("train"))
    assert per_epoch.counts == [n, 0]
    assert cache.stats["miss_batches"] == cache.stats["hit_batches"] == math.ceil(n / BATCH)
    assert float(trainer.callback_metrics["train/teacher_cache/truncation_kl"]) > 0


# --------------------------------------------------------------------------------------------------------------------
# Stale caches and mismatches
# --------------------------------------------------------------------------------------------------------------------
def test_a_later_run_reads_and_another_tokenizer_or_corpus_is_refused(replayed, files, tmp_path: Path) -> None:
    shutil.copytree(replayed["cache"].dir, tmp_path / "cache")
    teacher = SharpTeacher()
    per_epoch = PerEpoch(teacher)
    cache = LMTeacherOutputCache(tmp_path / "cache", top_k=TOP_K, top_p=TOP_P, verify_batches=0)
    fit(cache, teacher, datamodule(files), extra=(per_epoch,))
    assert per_epoch.counts == [0] and cache.stats["computed"] == 0  # same setting: read, no teacher
    for changed in ({"tok": "other_tok"}, {"corpus": "upper"}):
        cache = LMTeacherOutputCache(tmp_path / "cache", top_k=TOP_K, top_p=TOP_P)
        with pytest.raises(StaleCacheError, match=r"differing fields:\n  data: [^\n]*\nDelete"):  # only the data
            fit(cache, SharpTeacher(), datamodule(files, **changed))
    with pytest.raises(StaleCacheError, match=r"(?s)top_p:"):
        fit(LMTeacherOutputCache(tmp_path / "cache", top_k=TOP_K, top_p=0.5), SharpTeacher(), datamodule(files))


def test_other_tokens_under_a_fixed_data_id_are_caught(files, tmp_path: Path) -> None:
    fit(LMTeacherOutputCache(tmp_path, top_k=TOP_K, data_id="my-corpus"), SharpTeacher(), datamodule(files))
    cache = LMTeacherOutputCache(tmp_path, top_k=TOP_K, data_id="my-corpus")
    with pytest.raises(CacheMismatchError, match="computed on other tokens"):
        fit(cache, SharpTeacher(), datamodule(files, corpus="upper"))  # same number of samples, other tokens


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="top_p must be"):
        LMTeacherOutputCache(tmp_path, top_p=0.0)
    with pytest.raises(ValueError, match="top_k must be"):
        LMTeacherOutputCache(tmp_path, top_k=0)
    left_padded = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[0, 1, 1]] * 2)}
    with pytest.raises(ValueError, match="right-padded"):
        token_layout(left_padded)
    with pytest.raises(TypeError, match="token batches"):
        token_layout(torch.zeros(2, 3))
    # a classifier teacher with the LM cache, an LM teacher with the classifier cache
    images = TensorDataset(torch.randn(8, 3, 16, 16), torch.arange(8) % 10, torch.arange(8))
    trainer = fast_trainer(callbacks=[LMTeacherOutputCache(tmp_path / "a"), DistillCallback(SmallCNN(seed=1))])
    with pytest.raises(ValueError, match=r"token logits \[batch, sequence, vocabulary\].*TeacherOutputCache"):
        trainer.fit(UserModule(SmallCNN(seed=0)), DataLoader(images, batch_size=4))
    tokens = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "prompt_length": 0, "index": i} for i in range(4)]
    loader = DataLoader(tokens, batch_size=2, collate_fn=lambda items: pad_batch(items, 0))
    cache = TeacherOutputCache(tmp_path / "b")
    with pytest.raises(ValueError, match="LMTeacherOutputCache"):
        fast_trainer(callbacks=[cache]).fit(LMDistillationModule(tiny_lm(V), SharpTeacher()), loader)


def test_config_lists_every_argument_and_instantiates(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    cfg = OmegaConf.load(CONF_DIR / "teacher_cache" / "lm_topk.yaml")
    params = set(inspect.signature(LMTeacherOutputCache.__init__).parameters) - {"self"}
    assert set(cfg) - {"_target_"} == params
    cfg.dir = str(tmp_path / "{key}")
    cache = instantiate(cfg)
    assert isinstance(cache, LMTeacherOutputCache) and (cache.top_k, cache.top_p) == (100, 0.95)
    defaults = {k: p.default for k, p in inspect.signature(LMTeacherOutputCache.__init__).parameters.items()}
    assert all(cfg[k] == defaults[k] for k in params - {"dir"})  # the YAML states the defaults (PD's recipe)
