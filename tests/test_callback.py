"""DistillCallback on a plain LightningModule that knows nothing about distillation."""

from __future__ import annotations

import pickle

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import fast_trainer, make_loader, tiny
from lightning.pytorch.callbacks import Callback

from lightning_kd import DistillCallback
from lightning_kd.models import save_model_file


class Plain(L.LightningModule):
    """A user's existing module: a timm net, CE loss, SGD on self.parameters()."""

    def __init__(self, returns: str = "tensor") -> None:
        super().__init__()
        self.net = tiny("resnet18")
        self.returns = returns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        loss = F.cross_entropy(self(x), y)
        self.log("user/ce", loss)
        if self.returns == "dict":
            return {"loss": loss, "extra": loss.detach()}
        if self.returns == "none":
            return None
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # lr 0: weights stay put, gradients are what we compare


class GradSpy(Callback):
    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append(pl_module.net.fc.weight.grad.detach().clone())


def _fit(callbacks, returns="tensor", steps=1):
    model = Plain(returns)
    spy = GradSpy()
    trainer = fast_trainer(max_steps=steps, callbacks=[*callbacks, spy])
    trainer.fit(model, make_loader())
    return model, trainer, spy


def test_callback_changes_student_gradients_and_logs() -> None:
    _, _, plain = _fit([])
    model, trainer, distilled = _fit([DistillCallback(teacher=tiny("resnet34", seed=3), loss="kd")])
    assert not torch.allclose(plain.grads[0], distilled.grads[0])
    assert "train/kd" in trainer.callback_metrics and "train/distill" in trainer.callback_metrics
    assert trainer.callback_metrics["train/kd"] > 0
    # the user's module is restored after fit
    assert "training_step" not in model.__dict__
    assert not any(name.startswith("_lkd_") for name, _ in model.named_modules())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_gradient_equals_task_plus_weighted_kd() -> None:
    """The injected loss is exactly task_weight * user_loss + weight * kd: check on the classifier's gradient."""
    _, _, plain = _fit([])
    cb = DistillCallback(teacher=tiny("resnet34", seed=3), loss={"kd": {"weight": 0.0}}, task_weight=0.5)
    _, _, half = _fit([cb])
    torch.testing.assert_close(half.grads[0], 0.5 * plain.grads[0], rtol=1e-4, atol=1e-6)


def test_dict_return_and_feature_terms_with_timm_name_teacher() -> None:
    cb = DistillCallback(
        teacher="resnet34", loss=["kd", {"fitnet": {"student_layers": "net.layer3", "teacher_layers": "layer3"}}]
    )
    model, trainer, _ = _fit([cb], returns="dict", steps=2)
    assert "train/fitnet" in trainer.callback_metrics
    assert cb.engine is not None and cb.engine.terms["fitnet"].connector is not None


def test_teacher_from_saved_file(tmp_path) -> None:
    path = save_model_file(tiny("resnet34", seed=3), tmp_path / "t.pt", {"model": "resnet34", "num_classes": 10})
    _, trainer, _ = _fit([DistillCallback(teacher=str(path), loss="kd")])
    assert "train/kd" in trainer.callback_metrics


def test_none_return_is_refused() -> None:
    with pytest.raises(RuntimeError, match="returned NoneType"):
        _fit([DistillCallback(teacher=tiny("resnet18", seed=3), loss="kd")], returns="none")


def test_manual_optimization_is_refused() -> None:
    class Manual(Plain):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(RuntimeError, match="automatic optimization"):
        fast_trainer(max_steps=1, callbacks=[DistillCallback(teacher=tiny(seed=3))]).fit(Manual(), make_loader())


def test_connector_outside_optimizer_is_refused() -> None:
    class NetOnly(Plain):
        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=0.01)

    cb = DistillCallback(
        teacher=tiny("resnet34", seed=3), loss={"fitnet": {"student_layers": "net.layer3", "teacher_layers": "layer3"}}
    )
    with pytest.raises(RuntimeError, match="not in your optimizer"):
        fast_trainer(max_steps=1, callbacks=[cb]).fit(NetOnly(), make_loader())


def test_callback_pickles_before_fit() -> None:
    cb = DistillCallback(teacher=tiny("resnet18", seed=3), loss=["kd", "rkd"])
    clone = pickle.loads(pickle.dumps(cb))
    assert clone.loss == ["kd", "rkd"]


def test_compiled_student_is_refused_with_a_clear_error() -> None:
    from conftest import SmallCNN, UserModule

    from lightning_kd.taps import TapError

    model = UserModule(torch.compile(SmallCNN()))  # compilation is lazy: nothing is compiled by this test
    cb = DistillCallback(teacher=SmallCNN(seed=1), loss="kd")
    with pytest.raises(TapError, match=r"'net' is a torch.compile'd module"):
        fast_trainer(max_steps=1, callbacks=[cb]).fit(model, make_loader())
    assert "training_step" not in model.__dict__  # nothing left behind


def test_agreement_is_logged_through_the_users_logger() -> None:
    from conftest import SmallCNN, UserModule

    trainer = fast_trainer(max_steps=2, callbacks=[DistillCallback(teacher=SmallCNN(seed=1), loss="kd")])
    trainer.fit(UserModule(), make_loader())
    value = float(trainer.callback_metrics["train/agreement"])
    assert 0.0 <= value <= 1.0 and "user/ce" in trainer.callback_metrics


def test_teacher_saved_only_when_asked(tmp_path) -> None:
    from conftest import SmallCNN, UserModule

    def run(save: bool):
        teacher = SmallCNN(seed=1)
        cb = DistillCallback(teacher=teacher, loss="kd", save_teacher=save)
        trainer = fast_trainer(max_steps=1, callbacks=[cb])
        trainer.fit(UserModule(), make_loader())
        path = tmp_path / f"save-{save}.ckpt"
        trainer.save_checkpoint(path)
        return teacher, cb, torch.load(path, weights_only=True)

    teacher, cb, ckpt = run(False)
    assert "teacher" not in ckpt["callbacks"][cb.state_key]
    assert not any("teacher" in k for k in ckpt["state_dict"])
    # no saved tensor holds the teacher's weights (the student is a different random init)
    assert not any(
        v.shape == teacher.fc.weight.shape and torch.equal(v, teacher.fc.weight) for v in ckpt["state_dict"].values()
    )
    teacher, cb, ckpt = run(True)
    state = ckpt["callbacks"][cb.state_key]["teacher"]
    torch.testing.assert_close(state["fc.weight"], teacher.fc.weight.detach())
    # restored into a fresh teacher on resume
    fresh_teacher = SmallCNN(seed=5)
    fresh = DistillCallback(teacher=fresh_teacher, loss="kd", save_teacher=True)
    trainer = fast_trainer(max_steps=2, callbacks=[fresh])
    trainer.fit(UserModule(), make_loader(), ckpt_path=tmp_path / "save-True.ckpt")
    torch.testing.assert_close(fresh_teacher.fc.weight, teacher.fc.weight)


def test_checkpoint_loads_into_the_users_module_without_the_distillation_parts(tmp_path) -> None:
    from conftest import SmallCNN, UserModule

    from lightning_kd import student_state_dict

    fitnet = {"fitnet": {"student_layers": "net.features.2", "teacher_layers": "features.2"}}
    from lightning.pytorch.callbacks import ModelCheckpoint

    saver = ModelCheckpoint(dirpath=tmp_path, filename="c", enable_version_counter=False)  # written during fit
    cb = DistillCallback(teacher=SmallCNN(seed=1), loss=fitnet)
    trainer = fast_trainer(max_steps=1, callbacks=[cb, saver], enable_checkpointing=True)
    model = UserModule()
    trainer.fit(model, make_loader())
    ckpt = torch.load(tmp_path / "c.ckpt", weights_only=True)
    assert any(k.startswith("_lkd_engine.") for k in ckpt["state_dict"])  # kept for ckpt_path= resume
    with pytest.raises(RuntimeError, match="Unexpected key"):
        UserModule().load_state_dict(ckpt["state_dict"])
    fresh = UserModule()
    fresh.load_state_dict(student_state_dict(ckpt))  # strict
    torch.testing.assert_close(fresh.net.fc.weight, model.net.fc.weight)
