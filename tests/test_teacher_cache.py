"""Teacher-output cache (CED): stored top-k outputs under replayed augmentation, manifests, atomic shards, DDP."""

from __future__ import annotations

import csv
import math
import multiprocessing
import shutil
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import SmallCNN, UserModule, fast_trainer
from lightning.pytorch.callbacks import Callback
from torch import distributed as dist
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_kd import DistillCallback
from lightning_kd.losses.dkd import dkd_loss
from lightning_kd.losses.kd import kd_loss
from lightning_kd.module import ClassifierModule, DistillationModule
from lightning_kd.strategies.replay import RandomCropFlip, RandomShift, ReplayAugment
from lightning_kd.strategies.teacher_cache import (
    CacheMismatchError,
    StaleCacheError,
    TeacherOutputCache,
    index_dtype,
    pack_topk,
    reconstruct_logits,
)

N, BATCH = 32, 8
FITNET = {"fitnet": {"student_layers": "net.features.2", "teacher_layers": "features.2"}}
LOSS = ["kd", FITNET]  # a logit term and a term that reads a teacher tap
TAP = "features.2"


class CountingTeacher(SmallCNN):
    """SmallCNN that counts the samples of every forward (and dies past ``limit`` samples: an interrupted fill)."""

    def __init__(self, seed: int = 1, limit: int | None = None) -> None:
        super().__init__(seed=seed)
        self.samples = 0
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.limit is not None and self.samples + len(x) > self.limit:
            raise RuntimeError("teacher process killed")
        self.samples += len(x)
        return super().forward(x)


class PerEpoch(Callback):
    """First in the callback list: the teacher's forward samples in each epoch (prefill + steps + checks)."""

    def __init__(self, teacher: CountingTeacher) -> None:
        self.teacher = teacher
        self.counts: list[int] = []
        self._start = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = self.teacher.samples

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.counts.append(self.teacher.samples - self._start)


class Recording(UserModule):
    """A user module that keeps the inputs its training_step received."""

    def __init__(self) -> None:
        super().__init__(SmallCNN(seed=0))
        self.seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch[0].clone(), batch[2].clone()))
        return super().training_step(batch, batch_idx)


class SpyCache(TeacherOutputCache):
    """Keeps what lookup served."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.served: list[tuple[int, torch.Tensor, torch.Tensor, dict]] = []

    def lookup(self, indices, epoch, device):
        out = super().lookup(indices, epoch, device)
        if out is not None:
            features = {str(k): v.clone() for k, v in out.features.items()}
            self.served.append((epoch, indices.clone(), out.logits.clone(), features))
        return out


def images(n: int = N) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def loader(x: torch.Tensor | None = None, shuffle: bool = True, drop_last: bool = False) -> DataLoader:
    x = images() if x is None else x
    data = TensorDataset(x, torch.arange(len(x)) % 10, torch.arange(len(x)))
    return DataLoader(data, batch_size=BATCH, shuffle=shuffle, drop_last=drop_last, generator=torch.Generator())


def fit(cache, teacher, epochs=1, aug=None, module=None, data=None, loss=LOSS, extra=()) -> L.Trainer:
    callbacks = [*extra, *([aug] if aug is not None else []), cache, DistillCallback(teacher, loss=loss)]
    trainer = fast_trainer(max_epochs=epochs, callbacks=callbacks)
    trainer.fit(module if module is not None else UserModule(SmallCNN(seed=0)), data or loader())
    return trainer


def live(teacher: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's logits and its tapped features.2 output on ``x``."""
    grabbed = {}
    handle = teacher.features[2].register_forward_hook(lambda m, a, o: grabbed.setdefault("f", o))
    with torch.no_grad():
        logits = SmallCNN.forward(teacher.eval(), x)
    handle.remove()
    return logits, grabbed["f"]


def shards(path: Path, slot: int | None = None) -> list[Path]:
    return sorted(path.glob(f"slot{'*' if slot is None else slot}-rank*-*.pt"))


# --------------------------------------------------------------------------------------------------------------------
# Reconstruction from top-k
# --------------------------------------------------------------------------------------------------------------------
def test_reconstruction_hand_worked() -> None:
    z = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    values, idx, tail = pack_topk(z, 1)
    assert idx.tolist() == [[0]] and idx.dtype == torch.int16 and values.dtype == torch.float16
    assert math.isclose(float(tail), math.log(math.e + 2), rel_tol=1e-6)
    # k = 1: the three other classes share e^1 + e^0 + e^0 uniformly: each log((e + 2) / 3) = 0.452832
    rec = reconstruct_logits(values, idx, tail, 4)
    torch.testing.assert_close(rec, torch.tensor([[2.0, 0.452832, 0.452832, 0.452832]]), atol=1e-5, rtol=0)
    # k = 2: the tail (0, 0) is already uniform, so the reconstruction is exact
    torch.testing.assert_close(reconstruct_logits(*pack_topk(z, 2), 4), z)
    # k = C: the stored logits themselves; no tail
    values, idx, tail = pack_topk(z, 4)
    assert float(tail) == float("-inf")
    torch.testing.assert_close(reconstruct_logits(values, idx, tail, 4), z)
    assert index_dtype(32767) == torch.int16 and index_dtype(32768) == torch.int32


def test_reconstruction_keeps_topk_probabilities_and_tail_mass_at_unit_temperature() -> None:
    z = (3 * torch.randn(64, 100, generator=torch.Generator().manual_seed(0))).half().float()  # fp16-exact logits
    p = z.softmax(-1)
    for k in (1, 5, 20):
        values, idx, tail = pack_topk(z, k)
        q = reconstruct_logits(values, idx, tail, 100).softmax(-1)
        top = idx.long()
        torch.testing.assert_close(q.gather(-1, top), p.gather(-1, top), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(1 - q.gather(-1, top).sum(-1), 1 - p.gather(-1, top).sum(-1), atol=1e-6, rtol=1e-4)
        # the tail is uniform
        rest = q.scatter(-1, top, float("nan"))
        assert torch.allclose(rest.nanmean(-1, keepdim=True).expand_as(rest)[~rest.isnan()], rest[~rest.isnan()])


def test_kd_and_dkd_difference_to_full_logits_at_tau_4(capsys) -> None:
    """Report: relative difference of KD and DKD (τ = 4), and of their gradients with respect to the student's logits,
    computed from the reconstruction vs from the full logits, for flat teachers (logits 3·N(0, 1)) and confident ones
    (+10 on one class, like a trained teacher's)."""
    g = torch.Generator().manual_seed(0)
    C, B = 100, 256
    student = (3 * torch.randn(B, C, generator=g)).requires_grad_()
    flat = 3 * torch.randn(B, C, generator=g)
    confident = 2 * torch.randn(B, C, generator=g) + 10 * F.one_hot(torch.arange(B) % C, C)
    rows = {}
    for kind, teacher in (("flat", flat), ("confident", confident)):
        targets = teacher.argmax(-1)

        def losses(t: torch.Tensor, targets: torch.Tensor = targets) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
            out = {"kd": kd_loss(student, t, 4.0), "dkd": dkd_loss(student, t, targets, 1.0, 8.0, 4.0)}
            return {name: (v.detach(), torch.autograd.grad(v, student)[0]) for name, v in out.items()}

        full = losses(teacher)
        for k in (1, 5, 20, C):
            cached = losses(reconstruct_logits(*pack_topk(teacher, k), C))
            rows[kind, k] = {
                name: (
                    float((cached[name][0] - full[name][0]).abs() / full[name][0]),
                    float((cached[name][1] - full[name][1]).norm() / full[name][1].norm()),
                )
                for name in full
            }
    with capsys.disabled():
        print(f"\nrelative difference to the full-logit loss (and its gradient), tau=4, C={C}")
        print("         teacher logits: flat 3*N(0,1)          | confident (+10 on one class)")
        for k in (1, 5, 20, C):
            cells = [
                f"{name.upper():>3} {rows[kind, k][name][0]:6.1%} ({rows[kind, k][name][1]:5.1%})"
                for kind in ("flat", "confident")
                for name in ("kd", "dkd")
            ]
            print(f"  k={k:<4} {cells[0]}  {cells[1]} | {cells[2]}  {cells[3]}")
    for kind in ("flat", "confident"):
        # k = C is exact up to float16 rounding; smaller k approximates, better with more stored logits
        for name in ("kd", "dkd"):
            assert max(rows[kind, C][name]) < 1e-3
            for j in (0, 1):
                assert (
                    rows[kind, 1][name][j] > rows[kind, 5][name][j] > rows[kind, 20][name][j] > rows[kind, C][name][j]
                )
    assert rows["flat", 1]["kd"][0] > 0.01  # the approximation is not free: the report is not vacuous


# --------------------------------------------------------------------------------------------------------------------
# Fill, replay, read
# --------------------------------------------------------------------------------------------------------------------
def test_replayed_slots_are_read_and_equal_the_live_teacher(tmp_path: Path) -> None:
    teacher = CountingTeacher()
    per_epoch = PerEpoch(teacher)
    cache = SpyCache(tmp_path, k=None, verify_batches=1)
    aug = ReplayAugment(RandomShift(2), seed=3, period=2)
    module = Recording()
    fit(cache, teacher, epochs=3, aug=aug, module=module, extra=(per_epoch,))

    # epoch 0: slot 0 filled (32) + one verified batch (8); epoch 1: slot 1 filled; epoch 2 = slot 0: no teacher
    assert per_epoch.counts == [N + BATCH, N, 0]
    assert cache.stats["miss_batches"] == 0 and cache.stats["hit_batches"] == 3 * N // BATCH
    assert cache.stats["verified_batches"] == 1

    x = images()
    inputs = {(e, int(i)): v for e, batch, idx in module.seen for i, v in zip(idx, batch)}
    for i in range(N):  # the student saw the replayed view: epoch 2 repeats epoch 0 (other shuffle), epoch 1 differs
        assert torch.equal(inputs[(2, i)], inputs[(0, i)])
        assert torch.equal(inputs[(2, i)], aug.apply(x[i : i + 1], torch.tensor([i]), 2)[0])
    assert sum(not torch.equal(inputs[(1, i)], inputs[(0, i)]) for i in range(N)) > N // 2
    # what the cache served equals the live teacher on the view the student saw (float16 tolerance), in the epochs
    # that filled a slot and in epoch 2, which read slot 0 from disk
    assert [s[0] for s in cache.served] == [e for e in range(3) for _ in range(N // BATCH)]
    for epoch, idx, logits, features in cache.served:
        view = torch.stack([inputs[(epoch, int(i))] for i in idx])
        ref_logits, ref_features = live(teacher, view)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(features[TAP], ref_features, rtol=1e-3, atol=1e-3)
        assert not torch.allclose(ref_logits, live(teacher, x[idx])[0], atol=1e-3)  # augmentation mattered

    # one shard per slot, plain tensors that load with weights_only=True
    assert [p.name.split("-")[0] for p in shards(tmp_path)] == ["slot0", "slot1"]
    for path in shards(tmp_path):
        shard = torch.load(path, weights_only=True)
        assert sorted(shard["samples"].tolist()) == list(range(N))
        assert shard["values"].dtype == torch.float16 and shard["values"].shape == (N, 10)
        assert shard["indices"].dtype == torch.int16 and shard["tail_lse"].dtype == torch.float32
        assert shard["features"][TAP].dtype == torch.float16 and shard["features"][TAP].shape == (N, 16, 8, 8)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_topk_shard_and_a_later_run_reads_without_the_teacher(tmp_path: Path) -> None:
    teacher = CountingTeacher()
    fit(TeacherOutputCache(tmp_path, k=3), teacher, loss="kd")  # no augmentation: every epoch reads slot 0
    (path,) = shards(tmp_path, 0)
    shard = torch.load(path, weights_only=True)
    order = shard["samples"].argsort()
    logits, _ = live(teacher, images())
    top = logits.topk(3, dim=-1)
    assert torch.equal(shard["indices"][order].long(), top.indices)
    torch.testing.assert_close(shard["values"][order].float(), top.values, rtol=1e-3, atol=1e-3)
    rest = torch.logsumexp(logits.scatter(-1, top.indices, float("-inf")), dim=-1)
    torch.testing.assert_close(shard["tail_lse"][order], rest)
    assert shard["features"] == {}  # kd reads no tap

    # a later run: everything is read from the first epoch on; the teacher runs only to verify one batch
    per_epoch = PerEpoch(teacher)
    cache = TeacherOutputCache(tmp_path, k=3, verify_batches=1)
    fit(cache, teacher, epochs=2, loss="kd", extra=(per_epoch,))
    assert per_epoch.counts == [BATCH, 0]
    assert cache.stats["computed"] == 0 and cache.stats["miss_batches"] == 0 and cache.stats["verified_batches"] == 1
    assert len(shards(tmp_path)) == 1  # nothing new written


def test_training_from_the_cache_matches_training_with_the_live_teacher(tmp_path: Path) -> None:
    """Filling draws no random numbers the training would see (shuffle, augmentation), and k = C stores the logits
    to float16: the student ends up where the live teacher takes it, up to that rounding."""
    students = []
    for cache in (None, TeacherOutputCache(tmp_path, verify_batches=0)):
        torch.manual_seed(0)
        module = UserModule(SmallCNN(seed=0))
        callbacks = [ReplayAugment(RandomShift(2)), *([cache] if cache else []), DistillCallback(CountingTeacher())]
        data = DataLoader(loader().dataset, batch_size=BATCH, shuffle=True)  # shuffled by the global RNG
        fast_trainer(max_epochs=2, callbacks=callbacks).fit(module, data)
        students.append(torch.cat([p.detach().flatten() for p in module.parameters()]))
    start = torch.cat([p.detach().flatten() for p in SmallCNN(seed=0).parameters()])
    moved = (students[0] - start).abs().max()
    assert moved > 1e-2  # the student trained
    torch.testing.assert_close(students[1], students[0], rtol=0, atol=1e-3 * float(moved))


def test_online_filling_with_the_module_face(tmp_path: Path) -> None:
    """prefill=False: the training steps fill the cache (whole batches run live on a miss); DistillationModule."""
    teacher = CountingTeacher()
    per_epoch = PerEpoch(teacher)
    cache = TeacherOutputCache(tmp_path, k=2, prefill=False, verify_batches=0)
    module = DistillationModule(SmallCNN(seed=0), teacher, loss="kd")
    trainer = fast_trainer(max_epochs=2, callbacks=[per_epoch, cache])
    trainer.fit(module, loader())
    assert per_epoch.counts == [N, 0]
    assert cache.stats["miss_batches"] == N // BATCH and cache.stats["hit_batches"] == N // BATCH
    assert trainer.callback_metrics["train/teacher_cache/read"] == N
    assert trainer.callback_metrics["train/teacher_cache/computed"] == 0


# --------------------------------------------------------------------------------------------------------------------
# Stale caches, failed writes, un-replayed augmentation
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache filled by SmallCNN(seed=1), k=3, RandomShift(2) seed 0, period 1."""
    path = tmp_path_factory.mktemp("filled") / "cache"
    fit(TeacherOutputCache(path, k=3), CountingTeacher(), aug=ReplayAugment(RandomShift(2), period=1))
    return path


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"teacher": CountingTeacher(seed=2)}, "teacher"),
        ({"k": 4}, "k"),
        ({"aug": ReplayAugment(RandomCropFlip(4), period=1)}, "augment"),
        ({"aug": ReplayAugment(RandomShift(2), seed=1, period=1)}, "augment"),
        ({"aug": None}, "augment"),
        ({"data": loader(images() + 1)}, "data"),
    ],
    ids=["teacher-weights", "k", "transform", "aug-seed", "no-augment", "data"],
)
def test_stale_cache_is_refused(filled: Path, tmp_path: Path, change: dict, field: str) -> None:
    shutil.copytree(filled, tmp_path / "cache")
    settings = {"teacher": CountingTeacher(), "k": 3, "aug": ReplayAugment(RandomShift(2), period=1), "data": None}
    settings.update(change)
    cache = TeacherOutputCache(tmp_path / "cache", k=settings["k"])
    with pytest.raises(StaleCacheError, match=rf"(?s)differing fields:.*\b{field}:.*rebuild=True"):
        fit(cache, settings["teacher"], aug=settings["aug"], data=settings["data"])


def test_other_period_and_rebuild_are_accepted(filled: Path, tmp_path: Path) -> None:
    shutil.copytree(filled, tmp_path / "cache")
    teacher = CountingTeacher()
    per_epoch = PerEpoch(teacher)
    # the period only decides which slot an epoch uses: slot 0 is still valid
    cache = TeacherOutputCache(tmp_path / "cache", k=3, verify_batches=0)
    fit(cache, teacher, aug=ReplayAugment(RandomShift(2), period=4), extra=(per_epoch,))
    assert per_epoch.counts == [0]
    # rebuild: another teacher's outputs replace the old ones
    other = CountingTeacher(seed=2)
    cache = TeacherOutputCache(tmp_path / "cache", k=3, rebuild=True, verify_batches=0)
    fit(cache, other, aug=ReplayAugment(RandomShift(2), period=1))
    assert cache.stats["computed"] == N and len(shards(tmp_path / "cache")) == 1


def test_key_in_dir_gives_each_setting_its_own_directory(tmp_path: Path) -> None:
    template = str(tmp_path / "teacher" / "{key}")
    caches = [TeacherOutputCache(template, k=k, verify_batches=0) for k in (3, 4, 3)]
    for cache in caches:
        fit(cache, CountingTeacher(), loss="kd")
    assert caches[0].dir != caches[1].dir and caches[2].dir == caches[0].dir
    assert sorted(p.name for p in (tmp_path / "teacher").iterdir()) == sorted({caches[0].dir.name, caches[1].dir.name})
    assert [c.stats["computed"] for c in caches] == [N, N, 0]  # the third run reads the first one's outputs


def test_interrupted_shard_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs) -> None:
        f.write(b"PK\x03\x04 half a shard")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        fit(TeacherOutputCache(tmp_path), CountingTeacher(), loss="kd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]  # no shard, no temporary file

    monkeypatch.setattr(torch, "save", real_save)
    cache = TeacherOutputCache(tmp_path)
    fit(cache, CountingTeacher(), loss="kd")
    assert cache.stats["computed"] == N
    (path,) = shards(tmp_path)
    assert len(torch.load(path, weights_only=True)["samples"]) == N


def test_an_interrupted_fill_keeps_its_written_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_kd.strategies.teacher_cache as module

    monkeypatch.setattr(module, "FLUSH_SECONDS", 0.0)  # write after every filled batch
    probes = 2 + 1  # DistillCallback's and the cache's shape probes
    with pytest.raises(RuntimeError, match="killed"):
        fit(TeacherOutputCache(tmp_path), CountingTeacher(limit=probes + 2 * BATCH), loss="kd")
    assert len(shards(tmp_path)) == 2  # two batches were filled and written before the teacher died
    cache = TeacherOutputCache(tmp_path)
    fit(cache, CountingTeacher(), loss="kd")
    assert cache.stats["computed"] == N - 2 * BATCH  # only the rest is computed


class NoisyImages(Dataset):
    """A dataset-level random transform (not replayable): fresh noise at every access."""

    def __init__(self) -> None:
        self.x = images()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i] + 0.5 * torch.randn_like(self.x[i]), i % 10, i


def test_unreplayed_augmentation_is_caught(tmp_path: Path) -> None:
    cache = TeacherOutputCache(tmp_path, k=3, data_id="noisy")
    with pytest.raises(CacheMismatchError, match="ReplayAugment"):
        fit(cache, CountingTeacher(), data=DataLoader(NoisyImages(), batch_size=BATCH), loss="kd")


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="k must be"):
        TeacherOutputCache(tmp_path, k=0)
    with pytest.raises(RuntimeError, match="exactly one distillation engine, found 0"):
        fast_trainer(callbacks=[TeacherOutputCache(tmp_path)]).fit(ClassifierModule(SmallCNN()), loader())
    with pytest.raises(ValueError, match="features=True"):
        fit(TeacherOutputCache(tmp_path / "f", features=False), CountingTeacher())
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "slot0-rank0-abc.pt").write_bytes(b"")
    with pytest.raises(StaleCacheError, match="no manifest.json"):
        fit(TeacherOutputCache(tmp_path / "s"), CountingTeacher(), loss="kd")


# --------------------------------------------------------------------------------------------------------------------
# DDP: per-rank shards, read back by a single process
# --------------------------------------------------------------------------------------------------------------------
def _fork_available() -> bool:
    return "fork" in multiprocessing.get_all_start_methods() and dist.is_available() and dist.is_gloo_available()


@pytest.mark.slow
@pytest.mark.skipif(not _fork_available(), reason="needs the 'fork' start method and torch.distributed with gloo")
def test_two_process_ddp_shards_are_read_by_one_process(tmp_path: Path) -> None:
    aug = ReplayAugment(RandomShift(2), period=1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[aug, TeacherOutputCache(tmp_path, k=4), DistillCallback(CountingTeacher(), loss=LOSS)],
    )
    trainer.fit(UserModule(SmallCNN(seed=0)), loader())

    files = shards(tmp_path)
    assert sorted(p.name.split("-")[1] for p in files) == ["rank0", "rank1"]  # the fill was split between ranks
    parts = [set(torch.load(p, weights_only=True)["samples"].tolist()) for p in files]
    assert not parts[0] & parts[1] and parts[0] | parts[1] == set(range(N))

    teacher = CountingTeacher()
    per_epoch = PerEpoch(teacher)
    cache = SpyCache(tmp_path, k=4, verify_batches=0)
    module = Recording()
    fit(cache, teacher, aug=aug, module=module, extra=(per_epoch,))
    assert per_epoch.counts == [0] and cache.stats["computed"] == 0 and cache.stats["hit_batches"] == N // BATCH
    for (_, idx, logits, features), (_, view, seen_idx) in zip(cache.served, module.seen):
        assert torch.equal(idx, seen_idx)
        ref_logits, ref_features = live(teacher, view)
        top = ref_logits.topk(4, dim=-1)
        torch.testing.assert_close(logits.gather(-1, top.indices), top.values, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(features[TAP], ref_features, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------------------------------------------
# The Hydra app
# --------------------------------------------------------------------------------------------------------------------
def test_app_replays_epoch_two_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_kd.config import compose
    from lightning_kd.models import save_model_file
    from lightning_kd.run import train

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(1)
    teacher = timm.create_model("test_resnet", num_classes=10)
    teacher = save_model_file(teacher, tmp_path / "teacher.pt", {"model": "test_resnet", "num_classes": 10})
    cfg = compose(
        [
            "data=synthetic",
            "data.num_samples=64",
            "data.image_size=16",
            "data.batch_size=16",
            "trainer.max_epochs=2",
            "trainer.limit_val_batches=1",
            "trainer.num_sanity_val_steps=0",
            "progress_bar=none",
            "model=test_resnet",  # timm's tiny test ResNet
            "teacher=test_resnet",
            f"teacher.checkpoint={teacher}",
            "augment=shift",
            "augment.period=1",
            "teacher_cache=disk",
            f"teacher_cache.dir={tmp_path / 'cache'}",
        ]
    )
    res = train(cfg)
    assert 0.0 <= res["student_acc"] <= 1.0
    with open(tmp_path / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/teacher_cache/computed")]
    n_train = 44  # the synthetic train split of 64 samples (70 %)
    computed = [float(r["train/teacher_cache/computed"]) for r in rows]
    read = [float(r["train/teacher_cache/read"]) for r in rows]
    assert computed == [n_train, 0.0]  # epoch 1 fills slot 0, epoch 2 replays it without the teacher
    assert read == [32.0, 32.0]  # 2 batches of 16 per epoch (drop_last)
    manifest = (tmp_path / "cache" / "manifest.json").read_text()
    assert '"RandomShift"' in manifest and '"synthetic"' in manifest
