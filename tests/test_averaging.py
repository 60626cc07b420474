"""WAKD weight averaging: the student ends with the uniform mean of its weights at the scheduled steps, BatchNorm
statistics recomputed on the training data, the teacher and the terms' parts never in the averaged copy, both faces
of the engine, and the Hydra app (``averaging=wakd``)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import TINY_APP, fast_trainer, make_loader, tiny
from torch import nn
from torch.optim.swa_utils import update_bn

from lightning_kd import DistillationModule
from lightning_kd.callback import DistillCallback
from lightning_kd.engine import DistillEngine
from lightning_kd.module import ClassifierModule
from lightning_kd.strategies.averaging import WAKD


class BNNet(nn.Module):
    """conv · BatchNorm · ReLU · global average pool · fc."""

    def __init__(self, classes: int = 5, seed: int = 0, width: int = 4) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class Snapshots(L.Callback):
    """Records the student's parameters after every optimizer step, and what validation saw."""

    def __init__(self, student: nn.Module) -> None:
        self.student = student
        self.after_step: dict[int, dict[str, torch.Tensor]] = {}
        self.in_validation: list[dict[str, torch.Tensor]] = []
        self.after_validation: list[dict[str, torch.Tensor]] = []

    def _params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.student.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after_step[trainer.global_step] = self._params()

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.in_validation.append(self._params())

    def on_validation_end(self, trainer, pl_module) -> None:
        self.after_validation.append(self._params())


def mean_of(snapshots: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in snapshots]).mean(0) for k in snapshots[0]}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def assert_params(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_average_of_the_scheduled_steps_and_batchnorm_recomputed() -> None:
    student, teacher = BNNet(seed=0), BNNet(seed=1)
    module = DistillationModule(student, teacher, loss="kd")  # module face: the engine is a child from __init__
    wakd = WAKD(start_fraction=0.5, every_n_steps=2)  # 8 steps: s0 = 4, averaged after steps 4, 6, 8
    record = Snapshots(student)
    loader = make_loader(n=32, classes=5, size=8, batch=4)  # 8 batches, not shuffled
    trainer = fast_trainer(
        max_steps=8, callbacks=[wakd, record], val_check_interval=6, limit_val_batches=1, num_sanity_val_steps=0
    )
    trainer.fit(module, loader, make_loader(n=4, classes=5, size=8, batch=4))

    expected = mean_of([record.after_step[s] for s in (4, 6, 8)])
    assert wakd.n_averaged == 3
    assert_params(student, expected)
    # validation after step 6 ran with the average of steps 4 and 6, and training resumed from step 6's weights
    assert len(record.in_validation) == 1
    assert same(record.in_validation[0], mean_of([record.after_step[4], record.after_step[6]]))
    assert same(record.after_validation[0], record.after_step[6])

    # BatchNorm statistics: an independent pass of torch's update_bn over the training inputs with the same weights
    reference = BNNet()
    reference.load_state_dict({**reference.state_dict(), **expected})
    update_bn((x for x, _, _ in loader), reference)
    bn, ref_bn = student.features[1], reference.features[1]
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == len(loader)
    assert bn.momentum == 0.1 and student.training  # restored after the pass

    # the averaged copy is the student alone: no engine, no teacher
    averaged = wakd._average_model.module
    assert not any(isinstance(m, DistillEngine) for m in averaged.modules())
    assert sum(p.numel() for p in averaged.parameters()) == sum(p.numel() for p in student.parameters())


def test_distill_callback_attached_first_keeps_terms_out_of_the_average() -> None:
    student, teacher = BNNet(seed=0), BNNet(seed=1, width=6)
    module = ClassifierModule(student, scheduler=None)
    # fitnet's connector (4 -> 6 channels) is trainable; the DistillCallback comes first, so its engine is already
    # attached to the module when WAKD copies it
    distill = DistillCallback(
        teacher, loss={"fitnet": {"student_layers": "model.features.1", "teacher_layers": "features.1"}}
    )
    wakd = WAKD(start_fraction=0.0, recompute_bn=False)  # s0 = 1: every step
    record = Snapshots(student)
    connector: list[dict[str, torch.Tensor]] = []

    class Connector(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            connector.append({k: v.detach().clone() for k, v in distill.engine.named_parameters()})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            connector.append({k: v.detach().clone() for k, v in distill.engine.named_parameters()})

    trainer = fast_trainer(max_steps=3, callbacks=[distill, wakd, record, Connector()])
    trainer.fit(module, make_loader(n=12, classes=5, size=8, batch=4))
    assert_params(student, mean_of([record.after_step[s] for s in (1, 2, 3)]))
    assert not any(name.startswith("_lkd_") for name, _ in wakd._average_model.module.named_modules())
    # the connector trained, and keeps its last trained values (neither averaged nor swapped)
    first, last = connector[0], connector[-1]
    assert first and any(not torch.equal(first[k], last[k]) for k in first)
    for name, p in distill.engine.named_parameters():
        torch.testing.assert_close(p.detach(), last[name])


def test_schedule_and_errors() -> None:
    wakd = WAKD(start_step=3, every_n_steps=2)
    wakd._first_step = 3
    assert [s for s in range(10) if wakd.should_update(step_idx=s)] == [2, 4, 6, 8]  # after steps 3, 5, 7, 9
    assert not wakd.should_update(epoch_idx=0)
    with pytest.raises(ValueError, match="start_fraction must be in"):
        WAKD(start_fraction=1.5)
    with pytest.raises(ValueError, match="every_n_steps"):
        WAKD(every_n_steps=0)


def test_no_averaged_step_keeps_the_last_weights() -> None:
    student = BNNet()
    record = Snapshots(student)
    with pytest.warns(UserWarning, match="no weights were averaged"):
        fast_trainer(max_steps=2, callbacks=[WAKD(start_step=5), record]).fit(
            ClassifierModule(student, scheduler=None), make_loader(n=8, classes=5, size=8, batch=4)
        )
    assert_params(student, record.after_step[2])


def test_app_wakd(tmp_path, monkeypatch) -> None:
    from lightning_kd.config import compose
    from lightning_kd.models import save_model_file
    from lightning_kd.run import train

    monkeypatch.chdir(tmp_path)
    meta = {"model": "test_resnet", "num_classes": 10}
    teacher = save_model_file(tiny("test_resnet", seed=1), tmp_path / "teacher.pt", meta)
    cfg = compose(
        [
            "averaging=wakd",
            "averaging.start_fraction=0.5",
            *TINY_APP,
            "model=test_resnet",  # timm's tiny test ResNet (with BatchNorm)
            "teacher=test_resnet",
            f"teacher.checkpoint={teacher}",
        ]
    )
    res = train(cfg)
    assert math.isfinite(res["student_acc"])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    wakd_state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("WAKD"))
    assert wakd_state == {"latest_update_step": 2}
    assert int(ckpt["averaging_state"]["n_averaged"]) == 2  # steps 1 and 2 (s0 = round(0.5 · 2) = 1)
    assert set(ckpt["state_dict"]) == set(ckpt["current_model_state"])


def test_resume_continues_the_average(tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(max_steps: int, ckpt_path=None, checkpoint: bool = False) -> nn.Module:
        student = BNNet(seed=0)
        module = DistillationModule(student, BNNet(seed=1), loss="kd", scheduler=None)
        callbacks = [WAKD(start_step=1)]
        if checkpoint:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, filename="last"))
        trainer = fast_trainer(max_steps=max_steps, max_epochs=-1, callbacks=callbacks, enable_checkpointing=checkpoint)
        trainer.fit(module, make_loader(n=4, classes=5, size=8, batch=4), ckpt_path=ckpt_path)
        return student

    # one batch per epoch: every step sees the same data, so the resumed fit must reproduce the straight one exactly
    straight = fit(4)
    fit(2, checkpoint=True)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert int(ckpt["averaging_state"]["n_averaged"]) == 2 and set(ckpt["state_dict"]) == set(
        ckpt["current_model_state"]
    )
    resumed = fit(4, ckpt_path=tmp_path / "last.ckpt", checkpoint=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
