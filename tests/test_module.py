"""DistillationModule: the teacher stays frozen, in eval mode, out of optimizer and checkpoint; taps come off."""

from __future__ import annotations

import pytest
import torch
from conftest import fast_trainer, make_loader, tiny
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_kd import DistillationModule, NonFiniteLossError
from lightning_kd.engine import ClassCountMismatchError
from lightning_kd.losses.connectors import ShapeMismatchError
from lightning_kd.taps import TapError


def _hooks_left(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_teacher_frozen_eval_and_unchanged() -> None:
    student, teacher = tiny("resnet18"), tiny("resnet18", seed=1)
    teacher.train()  # the module must put it in eval mode itself
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = DistillationModule(student, teacher, loss=["kd", "rkd", "fitnet"], task_weight=0.1)
    modes: list[bool] = []
    teacher.register_forward_pre_hook(lambda m, a: modes.append(m.training))

    class CheckMode(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            assert not opt_params & {id(p) for p in teacher.parameters()}

    loader = make_loader()
    fast_trainer(max_epochs=2, num_sanity_val_steps=2, callbacks=[CheckMode()]).fit(module, loader, loader)
    assert modes and not any(modes), "teacher ran in train mode"
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(not p.requires_grad for p in teacher.parameters())
    keys = module.state_dict().keys()
    assert not any(k.startswith("teacher") for k in keys)
    assert any(k.startswith("engine.terms.fitnet.connector") for k in keys)
    assert len(keys) == len(student.state_dict()) + len(module.engine.state_dict())
    assert _hooks_left(student) == 0 and _hooks_left(teacher) == 1  # only this test's own pre-hook


def test_terms_logged_and_student_learns() -> None:
    module = DistillationModule(tiny(), tiny(seed=1), loss=["kd", "rkd"], task_weight=0.1)
    loader = make_loader(n=64)
    trainer = fast_trainer(max_epochs=3)
    trainer.fit(module, loader, loader)
    for key in ("train/kd", "train/rkd", "train/rkd/distance", "train/rkd/angle", "train/ce", "train/loss"):
        assert key in trainer.callback_metrics, key
    assert trainer.callback_metrics["val/acc"] > 0.5
    metrics = trainer.test(module, loader, verbose=False)[0]
    assert 0.0 <= metrics["test/agreement"] <= 1.0


def test_checkpoint_weights_only_and_resume(tmp_path) -> None:
    loader = make_loader()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    module = DistillationModule(tiny(), tiny(seed=1), loss=["kd", "fitnet"])
    fast_trainer(max_epochs=1, enable_checkpointing=True, callbacks=[ckpt_cb]).fit(module, loader)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert any(k.startswith("engine.terms.fitnet.connector") for k in ckpt["state_dict"])
    assert not any("teacher" in k for k in ckpt["state_dict"])
    connector = ckpt["state_dict"]["engine.terms.fitnet.connector.weight"]

    resumed = DistillationModule(tiny(seed=5), tiny(seed=1), loss=["kd", "fitnet"])
    seen = {}

    class Peek(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            seen["step"] = trainer.global_step
            seen["connector"] = pl_module.engine.terms["fitnet"].connector.weight.detach().clone()

    trainer = fast_trainer(max_epochs=2, callbacks=[Peek()])
    trainer.fit(resumed, loader, ckpt_path=tmp_path / "last.ckpt")
    assert seen["step"] == ckpt["global_step"] > 0
    assert torch.equal(seen["connector"], connector)
    assert trainer.global_step == 2 * seen["step"]


def test_class_count_mismatch() -> None:
    module = DistillationModule(tiny(classes=10), tiny(classes=7), loss="kd")
    with pytest.raises(ClassCountMismatchError, match=r"student predicts 10 classes and the teacher 7"):
        fast_trainer(max_steps=1).fit(module, make_loader())


def test_bad_layer_path_names_model_and_close_matches() -> None:
    module = DistillationModule(tiny(), tiny(), loss={"fitnet": {"student_layers": "layer33"}})
    with pytest.raises(TapError, match=r"ResNet has no layer 'layer33'.*layer3"):
        fast_trainer(max_steps=1).fit(module, make_loader())


def test_shapes_without_connector() -> None:
    student = tiny("resnet18")
    teacher = tiny("resnet50")  # layer3: 256 vs 1024 channels
    module = DistillationModule(student, teacher, loss={"fitnet": {"connector": "none"}})
    with pytest.raises(ShapeMismatchError, match=r"\[256, 1, 1\].*\[1024, 1, 1\].*connector"):
        fast_trainer(max_steps=1).fit(module, make_loader())


def test_non_finite_loss_names_term_and_step() -> None:
    class NaNTeacher(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3 * 16 * 16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1)) * float("nan")

    module = DistillationModule(tiny(), NaNTeacher(), loss="kd")
    with pytest.raises(NonFiniteLossError, match=r"loss term 'kd' is nan at step 0"):
        fast_trainer(max_steps=1).fit(module, make_loader())


def test_task_weight_defaults_to_zero_when_a_term_replaces_the_label_loss() -> None:
    assert DistillationModule(tiny(), tiny(), loss="kd").task_weight == 1.0
    assert DistillationModule(tiny(), tiny(), loss="pld").task_weight == 0.0  # PLD contains the label term
    assert DistillationModule(tiny(), tiny(), loss="simkd").task_weight == 0.0  # SimKD trains without CE
    assert DistillationModule(tiny(), tiny(), loss="pld", task_weight=0.5).task_weight == 0.5  # explicit wins


def test_scheduler_factory_steps_per_epoch_and_stays_out_of_checkpoints(tmp_path) -> None:
    """A Hydra-partial scheduler (the CIFAR protocol's MultiStepLR) is stepped once per epoch; the factory is not
    saved as a hyperparameter, so the checkpoint still loads with weights_only=True."""
    from functools import partial

    from lightning_kd.module import ClassifierModule

    lrs = []

    class Lr(Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    factory = partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[1, 2], gamma=0.1)
    module = ClassifierModule(tiny(), partial(torch.optim.SGD, lr=0.5), scheduler=factory)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = fast_trainer(max_epochs=3, enable_checkpointing=True, callbacks=[Lr(), ckpt_cb])
    trainer.fit(module, make_loader(n=16))
    assert lrs == pytest.approx([0.5, 0.05, 0.005])
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert "scheduler" not in ckpt["hyper_parameters"]
    with pytest.raises(ValueError, match="scheduler must be"):
        ClassifierModule(tiny(), scheduler="step")
