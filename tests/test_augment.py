"""Distillation-aware augmentation: MIX-KD partial mixup (the callback, on both faces and through the app) and the
T-stddev metric (Good-DA-in-KD)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from conftest import TINY_APP, GapNet, UserModule, fast_trainer, make_loader, tiny

from lightning_kd import DistillationModule
from lightning_kd.callback import DistillCallback
from lightning_kd.losses.base import DistillBatch, LossTerm
from lightning_kd.metrics import TeacherStddev, teacher_stddev
from lightning_kd.strategies.augment import PartialMixup, partial_mixup


# --------------------------------------------------------------------------------------------------------------------
# partial mixup
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("batch", "fraction", "unmixed"), [(20, 0.25, 5), (16, 0.9, 14), (8, 0.0, 0), (8, 1.0, 8)])
def test_unmixed_fraction_is_as_configured(batch: int, fraction: float, unmixed: int) -> None:
    x, y = torch.randn(batch, 3, 4, 4), torch.arange(batch) % 5
    mixed, soft, lam, _ = partial_mixup(x, y, 5, alpha=1.0, unmixed_fraction=fraction, rng=np.random.default_rng(0))
    assert int((lam == 1).sum()) == unmixed
    keep = lam == 1
    assert torch.equal(mixed[keep], x[keep])
    assert torch.equal(soft[keep], torch.nn.functional.one_hot(y[keep], 5).float())


def test_soft_targets_sum_to_one_and_mix_the_right_labels() -> None:
    x, y = torch.randn(12, 3, 4, 4), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1])
    mixed, soft, lam, perm = partial_mixup(x, y, 5, alpha=0.4, unmixed_fraction=0.5, rng=np.random.default_rng(1))
    assert soft.dtype == torch.float32 and soft.shape == (12, 5)
    torch.testing.assert_close(soft.sum(-1), torch.ones(12))
    for i in range(12):
        expected = torch.zeros(5)
        expected[y[i]] += lam[i]
        expected[y[perm[i]]] += 1 - lam[i]
        torch.testing.assert_close(soft[i], expected)
        torch.testing.assert_close(mixed[i], lam[i] * x[i] + (1 - lam[i]) * x[perm[i]])
    assert len(set(lam[lam < 1].tolist())) == int((lam < 1).sum())  # one λ per sample


class Recorder(LossTerm):
    """Records the inputs, labels and soft targets the engine hands to the terms."""

    def __init__(self) -> None:
        super().__init__(weight=0.0)
        self.seen: list[DistillBatch] = []

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        self.seen.append(batch)
        return batch.student.logits.sum() * 0


@pytest.mark.parametrize("face", ["module", "callback"])
def test_teacher_and_student_see_the_same_mixed_batch(face: str) -> None:
    student, teacher = GapNet(seed=0), GapNet(seed=1)
    seen: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    student.register_forward_hook(lambda m, a, o: seen["student"].append(a[0].detach().clone()))
    teacher.register_forward_hook(lambda m, a, o: seen["teacher"].append(a[0].detach().clone()))
    recorder = Recorder()
    mixup = PartialMixup(alpha=1.0, unmixed_fraction=0.5, num_classes=5, seed=7)
    loss = {"kd": {}, "recorder": recorder}
    if face == "module":
        module, callbacks = DistillationModule(student, teacher, loss=loss), [mixup]
    else:
        module, callbacks = UserModule(student), [mixup, DistillCallback(teacher, loss=loss)]
    loader = make_loader(n=16, classes=5, size=8, batch=8)
    fast_trainer(max_steps=2, callbacks=callbacks).fit(module, loader)

    for step, (x, y, _) in enumerate(loader):
        rng = np.random.default_rng([7, 0, 0, step])  # (seed, rank, epoch, batch_idx)
        mixed, soft, lam, _ = partial_mixup(x, y, 5, alpha=1.0, unmixed_fraction=0.5, rng=rng)
        assert int((lam == 1).sum()) == 4
        # the last two forwards of each model (setup probes excluded): one per training step
        assert torch.equal(seen["student"][-2 + step], mixed) and torch.equal(seen["teacher"][-2 + step], mixed)
        batch = recorder.seen[step]
        assert torch.equal(batch.inputs, mixed) and torch.equal(batch.soft_targets, soft)
        assert torch.equal(batch.targets, soft.argmax(-1))
    assert torch.equal(mixup.last_lambda, lam)


@contextmanager
def lightning_info() -> Iterator[list[str]]:
    """The messages of Lightning's rank_zero_info during the block (its logger does not propagate to caplog)."""
    from lightning_utilities.core import rank_zero

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, level = Collect(logging.INFO), rank_zero.log.level
    rank_zero.log.addHandler(handler)
    rank_zero.log.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        rank_zero.log.removeHandler(handler)
        rank_zero.log.setLevel(level)


def test_standardize_logits_switches_the_terms_on_for_the_fit_only() -> None:
    flags: list[bool] = []

    class Flag(LossTerm):
        def forward(self, batch: DistillBatch) -> torch.Tensor:
            flags.append(module.engine.terms["kd"].standardize)
            return batch.student.logits.sum() * 0

    module = DistillationModule(GapNet(seed=0), GapNet(seed=1), loss={"kd": {}, "flag": Flag(weight=0.0)})
    with lightning_info() as messages:
        fast_trainer(max_steps=1, callbacks=[PartialMixup(num_classes=5, standardize_logits=True)]).fit(
            module, make_loader(n=8, classes=5, size=8, batch=8)
        )
    assert flags == [True] and module.engine.terms["kd"].standardize is False
    assert "PartialMixup: logit standardisation turned on for loss term 'kd'" in messages


def test_standardize_logits_warns_when_no_term_has_it() -> None:
    module = DistillationModule(GapNet(seed=0), GapNet(seed=1), loss={"pkt": {}})
    with pytest.warns(UserWarning, match="no distillation term has a `standardize` option"):
        fast_trainer(max_steps=1, callbacks=[PartialMixup(num_classes=5, standardize_logits=True)]).fit(
            module, make_loader(n=8, classes=5, size=8, batch=8)
        )


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="unmixed_fraction must be in"):
        PartialMixup(unmixed_fraction=1.5)
    with pytest.raises(ValueError, match="alpha must be"):
        PartialMixup(alpha=0)
    mixup = PartialMixup(num_classes=5)
    mixup.seed = 0
    with pytest.raises(TypeError, match="tuple batch cannot be changed in place"):
        mixup.on_train_batch_start(fast_trainer(), UserModule(), (torch.randn(2, 3), torch.zeros(2)), 0)
    with pytest.raises(ValueError, match="num_classes is 3"):
        partial_mixup(
            torch.randn(2, 3), torch.tensor([0, 4]), 3, alpha=1.0, unmixed_fraction=0, rng=np.random.default_rng()
        )
    # no num_classes and no datamodule that knows it
    with pytest.raises(ValueError, match="PartialMixup needs the number of classes"):
        fast_trainer(max_steps=1, callbacks=[PartialMixup()]).fit(UserModule(GapNet()), make_loader(n=8, classes=5))


def test_refuses_a_teacher_output_cache() -> None:
    module = DistillationModule(GapNet(seed=0), GapNet(seed=1), loss="kd")
    module.engine.output_cache = object()  # any installed cache
    with pytest.raises(RuntimeError, match="cannot be combined with a teacher-output cache"):
        fast_trainer(max_steps=1, callbacks=[PartialMixup(num_classes=5)]).fit(
            module, make_loader(n=8, classes=5, size=8, batch=8)
        )


def test_dict_batches_and_resumable_seed() -> None:
    mixup = PartialMixup(num_classes=3, unmixed_fraction=0.5, seed=11)
    batch = {"image": torch.randn(4, 3, 4, 4), "label": torch.tensor([0, 1, 2, 0]), "index": torch.arange(4)}
    original = batch["image"].clone()

    class T:  # the trainer attributes the callback reads
        global_rank, current_epoch = 0, 2

    mixup.on_train_batch_start(T(), UserModule(), batch, 3)
    expected = partial_mixup(
        original,
        torch.tensor([0, 1, 2, 0]),
        3,
        alpha=1.0,
        unmixed_fraction=0.5,
        rng=np.random.default_rng([11, 0, 2, 3]),
    )
    assert torch.equal(batch["image"], expected[0]) and torch.equal(batch["label"], expected[1])
    restored = PartialMixup(num_classes=3)
    restored.load_state_dict(torch.load(_saved(mixup.state_dict()), weights_only=True))
    assert restored.seed == 11


def _saved(state: dict) -> object:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_app_mixkd(tmp_path, monkeypatch) -> None:
    """augment=mixkd through the Hydra app (kd loss): the callback is built from the YAML and switches kd on."""
    from lightning_kd.config import compose
    from lightning_kd.models import save_model_file
    from lightning_kd.run import train

    monkeypatch.chdir(tmp_path)
    meta = {"model": "test_resnet", "num_classes": 10}
    teacher = save_model_file(tiny("test_resnet", seed=1), tmp_path / "teacher.pt", meta)
    cfg = compose(
        [
            "augment=mixkd",
            *TINY_APP,
            "model=test_resnet",  # timm's tiny test ResNet (with BatchNorm)
            "teacher=test_resnet",
            f"teacher.checkpoint={teacher}",
        ]
    )
    assert cfg.augment._target_ == "lightning_kd.strategies.augment.PartialMixup"
    with lightning_info() as messages:
        res = train(cfg)
    assert math.isfinite(res["student_acc"]) and res["loss"] == "kd"
    header = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/kd", "train/ce"} <= set(header)
    assert [m for m in messages if "logit standardisation" in m] == [
        "PartialMixup: logit standardisation turned on for loss term 'kd'"
    ]


# --------------------------------------------------------------------------------------------------------------------
# T-stddev
# --------------------------------------------------------------------------------------------------------------------
P = torch.tensor([[0.5, 0.5], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6], [0.9, 0.1]])


def test_teacher_stddev_by_hand() -> None:
    # chunks of 2: means (0.6, 0.4) and (0.3, 0.7); unbiased std over 2 chunks = |0.6 − 0.3| / sqrt(2) per class;
    # the 5th sample is an incomplete chunk and is left out
    expected = 0.3 / math.sqrt(2)
    metric = TeacherStddev(chunk_size=2)
    metric.update(P.log())
    assert metric.compute().item() == pytest.approx(expected, rel=1e-6)
    split = TeacherStddev(chunk_size=2)  # chunks cut at sample boundaries across batches
    for rows in (P[:3], P[3:4], P[4:]):
        split.update(rows.log())
    assert split.compute().item() == pytest.approx(expected, rel=1e-6)
    three = TeacherStddev(chunk_size=1)  # 5 chunks of one sample: the std of the probabilities themselves
    three.update(P.log())
    assert three.compute().item() == pytest.approx(P.std(dim=0).mean().item(), rel=1e-6)


def test_teacher_stddev_syncs_across_ranks() -> None:
    """Two ranks, each with one chunk: compute() sees both (their sums added), as a single process with both chunks."""
    rank1 = TeacherStddev(chunk_size=2)
    rank1.update(torch.cat([P[2:4], P[4:]]).log())  # one chunk + one waiting sample
    gathered = iter([getattr(rank1, name) for name in rank1._reductions])  # states in the order they are synced
    rank0 = TeacherStddev(
        chunk_size=2,
        dist_sync_fn=lambda tensor, group=None: [tensor, next(gathered)],  # all_gather of 2 ranks
        distributed_available_fn=lambda: True,
    )
    rank0(P[:2].log())  # forward() accumulates like update()
    assert rank0.compute().item() == pytest.approx(0.3 / math.sqrt(2), rel=1e-6)
    assert int(rank0.num_chunks) == 1 and int(rank0.pending_count) == 0  # local state restored after compute


def test_teacher_stddev_needs_two_chunks() -> None:
    metric = TeacherStddev(chunk_size=4)
    metric.update(P.log())
    with pytest.warns(UserWarning, match="at least 2 complete chunks"):
        assert math.isnan(metric.compute().item())
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        TeacherStddev(chunk_size=0)


def test_teacher_stddev_over_a_loader_with_a_transform() -> None:
    teacher = GapNet(seed=1)
    loader = make_loader(n=16, classes=5, size=8, batch=4)
    value = teacher_stddev(teacher, loader, chunk_size=4)
    metric = TeacherStddev(chunk_size=4)
    with torch.no_grad():
        for x, _, _ in loader:
            metric.update(teacher(x))
    assert value == pytest.approx(metric.compute().item(), rel=1e-6)
    flipped = teacher_stddev(teacher, loader, chunk_size=4, transform=lambda x: x.flip(-1))
    assert flipped != pytest.approx(value)
    with pytest.raises(ValueError, match="at least 2 are needed"):
        teacher_stddev(teacher, loader, chunk_size=16)
