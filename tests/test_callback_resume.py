"""DistillCallback and checkpoints: the terms' state (connectors, memory banks, Z normalisers, the negative-sampling
stream, epoch-driven schedules) survives a save/resume, the teacher is never saved, checkpoints load with
``weights_only=True``, and the callback has its own entry in ``checkpoint["callbacks"]``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import SmallCNN, UserModule, fast_trainer, make_loader
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_kd import DistillCallback

FITNET = {"fitnet": {"student_layers": "net.features.2", "teacher_layers": "features.2"}}
# every term here carries state across steps: fitnet a connector, crd heads + banks + Z + sampler stream, dkd an
# epoch-driven warm-up (factor 0.5 in epoch 0, 1.0 from epoch 1)
LOSS = ["kd", FITNET, {"crd": {"nce_k": 4, "feat_dim": 8}}, {"dkd": {"warmup": 2}}]
N = 32
# the resumed runs deliberately leave out the ModelCheckpoint that wrote the file
pytestmark = pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
TOTAL_STEPS = 6
CKPT_STEP = 3


class MomentumModule(UserModule):
    """The user's module with SGD momentum, so the optimizer holds per-parameter state (connectors included)."""

    def __init__(self) -> None:
        super().__init__(SmallCNN(seed=0))
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen.extend(int(i) for i in batch[2])
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class ResumableLoader(DataLoader):
    """A DataLoader with the ``state_dict``/``load_state_dict`` interface Lightning uses to resume mid-epoch: it
    records how many batches of the current pass were taken and skips them after a restore (the test checks the
    resumed run sees exactly the remaining batches, so a wrong count would show there)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._skip = 0

    def __iter__(self) -> Iterator[Any]:
        skip, self._skip, self._yielded = self._skip, 0, 0
        for i, batch in enumerate(super().__iter__()):
            if i < skip:
                continue
            self._yielded = i + 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state["consumed"])


def _loader(kind: str) -> DataLoader:
    if kind == "epoch_end":  # 3 batches (11, 11, 10) per epoch: step 3 ends epoch 0
        return make_loader(n=N, batch=11)
    base = make_loader(n=N, batch=8)  # 4 batches per epoch: step 3 is mid-epoch, step 4 starts epoch 1
    return ResumableLoader(base.dataset, batch_size=8)


def _callback(**kwargs: Any) -> DistillCallback:
    return DistillCallback(teacher=SmallCNN(seed=1), loss=LOSS, **kwargs)


def _trainer(steps: int, callbacks: list[Callback]) -> L.Trainer:
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    return fast_trainer(
        max_steps=steps, max_epochs=-1, deterministic=True, callbacks=callbacks, enable_checkpointing=checkpointing
    )


def _run(steps: int, kind: str, *, ckpt_dir: Path | None = None, ckpt_path: Path | None = None):
    """Fit a fresh module + callback; optionally save at CKPT_STEP, or resume from ``ckpt_path``."""
    L.seed_everything(0)
    cb = _callback()
    callbacks: list[Callback] = [cb]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=CKPT_STEP, save_top_k=-1))
    model = MomentumModule()
    trainer = _trainer(steps, callbacks)
    trainer.fit(model, _loader(kind), ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    assert trainer.global_step == steps
    return model, cb, trainer


def _checkpoint(tmp_path: Path, kind: str = "epoch_end") -> tuple[Path, UserModule, DistillCallback]:
    model, cb, _ = _run(CKPT_STEP, kind, ckpt_dir=tmp_path)
    path = tmp_path / f"epoch=0-step={CKPT_STEP}.ckpt"
    assert path.is_file(), sorted(p.name for p in tmp_path.iterdir())
    return path, model, cb


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor anywhere in a (nested) checkpoint."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


@pytest.mark.parametrize("kind", ["epoch_end", "mid_epoch"])
def test_resume_gives_the_uninterrupted_result(tmp_path: Path, kind: str) -> None:
    """6 steps in one go == 3 steps, checkpoint, then a NEW trainer/module/callback resumed to 6 steps: student,
    connector, CRD heads, banks, labels, Z, sampler counter and the optimizer's momentum all equal."""
    model_a, cb_a, trainer_a = _run(TOTAL_STEPS, kind)
    path, model_first, _ = _checkpoint(tmp_path, kind)
    model_b, cb_b, trainer_b = _run(TOTAL_STEPS, kind, ckpt_path=path)

    # the two halves trained on exactly the samples of the uninterrupted run, in its order
    assert model_first.seen + model_b.seen == model_a.seen
    assert trainer_b.current_epoch == trainer_a.current_epoch

    torch.testing.assert_close(model_b.net.state_dict(), model_a.net.state_dict(), rtol=1e-6, atol=1e-7)
    assert cb_a.engine is not None and cb_b.engine is not None
    state_a, state_b = cb_a.engine.state_dict(), cb_b.engine.state_dict()
    assert set(state_a) == set(state_b)
    for key in ("terms.fitnet.connector.weight", "terms.crd.memory.student_bank", "terms.crd.memory.sample_count"):
        assert key in state_a
    torch.testing.assert_close(state_b, state_a, rtol=1e-6, atol=1e-7)
    assert int(state_b["terms.crd.memory.sample_count"]) == TOTAL_STEPS  # one draw per step, the stream continued
    assert bool((state_b["terms.crd.memory.labels"] >= 0).all())  # every sample seen once the run is done
    momenta_a = [s["momentum_buffer"] for s in trainer_a.optimizers[0].state_dict()["state"].values()]
    momenta_b = [s["momentum_buffer"] for s in trainer_b.optimizers[0].state_dict()["state"].values()]
    torch.testing.assert_close(momenta_b, momenta_a, rtol=1e-6, atol=1e-7)


def test_checkpoint_loads_weights_only_and_holds_no_teacher(tmp_path: Path) -> None:
    path, model, cb = _checkpoint(tmp_path)
    ckpt = torch.load(path, weights_only=True)  # raises on any pickled object that is not plain data
    teacher = cb.teacher
    assert isinstance(teacher, torch.nn.Module)
    entry = ckpt["callbacks"][cb.state_key]
    assert entry["terms"] == ["kd", "fitnet", "crd", "dkd"] and "teacher" not in entry

    # the model state is exactly the student plus the callback's terms (no teacher.* keys hidden anywhere)
    state = ckpt["state_dict"]
    student_keys = {f"net.{k}" for k in model.net.state_dict()}
    engine_keys = {f"_lkd_engine.{k}" for k in cb.engine.state_dict()}  # type: ignore[union-attr]
    assert set(state) == student_keys | engine_keys
    assert not any("teacher." in k or k.startswith("teacher") for k in state)
    assert len(state) == len(student_keys) + len(engine_keys)
    # the connector and banks are saved, with the values the callback held at the save
    for key in ("terms.fitnet.connector.weight", "terms.crd.memory.teacher_bank", "terms.crd.normalizers"):
        torch.testing.assert_close(state[f"_lkd_engine.{key}"], cb.engine.state_dict()[key])  # type: ignore[union-attr]

    # no tensor anywhere in the file (state, optimizer, callbacks) is one of the teacher's weights
    teacher_tensors = [t for t in teacher.state_dict().values() if t.numel() > 1]
    assert teacher_tensors
    saved = list(_tensors(ckpt))
    for t in teacher_tensors:
        assert not any(s.shape == t.shape and torch.equal(s, t) for s in saved), "a teacher tensor was saved"


def test_distinct_names_give_distinct_state_keys() -> None:
    a, b = _callback(name="a"), _callback(name="b")
    assert a.state_key != b.state_key
    assert _callback().state_key not in (a.state_key, b.state_key)
    assert _callback(name="a").state_key == a.state_key  # stable: a resumed run finds its entry again


def test_each_callback_has_its_own_checkpoint_entry(tmp_path: Path) -> None:
    """Two named callbacks in one fit: each one's state is in checkpoint['callbacks'] under its own state_key, and
    their engines are saved side by side under distinct submodule names."""
    L.seed_everything(0)
    first = DistillCallback(teacher=SmallCNN(seed=1), loss=[FITNET], name="a")
    second = DistillCallback(teacher=SmallCNN(seed=2), loss=[FITNET, "kd"], name="b")
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    _trainer(2, [first, second, saver]).fit(UserModule(SmallCNN()), make_loader(n=N))
    ckpt = torch.load(tmp_path / "epoch=0-step=2.ckpt", weights_only=True)
    assert first.state_key != second.state_key
    assert ckpt["callbacks"][first.state_key]["name"] == "a"
    assert ckpt["callbacks"][second.state_key]["name"] == "b"
    assert ckpt["callbacks"][second.state_key]["terms"] == ["fitnet", "kd"]
    for cb in (first, second):
        assert "teacher" not in ckpt["callbacks"][cb.state_key]  # not saved unless asked (save_teacher=True)
    for attr in ("_lkd_engine_a", "_lkd_engine_b"):
        assert f"{attr}.terms.fitnet.connector.weight" in ckpt["state_dict"]
    # the two connectors are distinct modules with distinct values (neither overwrote the other)
    assert not torch.equal(
        ckpt["state_dict"]["_lkd_engine_a.terms.fitnet.connector.weight"],
        ckpt["state_dict"]["_lkd_engine_b.terms.fitnet.connector.weight"],
    )
