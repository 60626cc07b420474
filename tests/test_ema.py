"""EMA / momentum teacher (MKD) and its Fisher-masked update (PSMT): ``lightning_kd.strategies.ema``.

What makes the strategy: after every optimizer step the teacher equals the EMA of the student's weights as they were
after each step (computed here independently), it is never trained (no gradient, not in the optimizer), the PSMT mask
protects exactly the low-Fisher elements, and the teacher survives a checkpoint/resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import TINY_APP, SmallCNN, UserModule, fast_trainer, make_loader
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_kd import DistillationModule
from lightning_kd.engine import freeze
from lightning_kd.strategies.ema import (
    EMADistillCallback,
    EMATeacherCallback,
    MomentumTeacher,
    quantile,
    run_app,
    student_of,
)
from lightning_kd.taps import LayerTaps, frozen_copy


class BNNet(nn.Module):
    """conv · BatchNorm · ReLU · pool · fc: a model with running statistics (float buffers) and an int buffer."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class Recorder(Callback):
    """Placed after the EMA callback: records the student's and the teacher's tensors at each optimizer step."""

    def __init__(self, pair) -> None:
        self.pair = pair  # pl_module -> (teacher, student)
        self.initial: dict[str, torch.Tensor] = {}
        self.students: list[dict[str, torch.Tensor]] = []
        self.teachers: list[dict[str, torch.Tensor]] = []
        self.batches: list[int] = []
        self._step = 0

    @staticmethod
    def _tensors(model: nn.Module, names) -> dict[str, torch.Tensor]:
        state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        return {n: state[n].detach().clone() for n in names}

    def on_train_start(self, trainer, pl_module) -> None:
        teacher, student = self.pair(pl_module)
        self.names = [n for n, _ in [*teacher.named_parameters(), *teacher.named_buffers()]]
        self.initial = self._tensors(student, self.names)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:
            return
        self._step = trainer.global_step
        teacher, student = self.pair(pl_module)
        self.students.append(self._tensors(student, self.names))
        self.teachers.append(self._tensors(teacher, self.names))
        self.batches.append(batch_idx)


def expected_ema(initial, students, momentum: float, *, buffers: bool = True):
    """θ_T,k = m·θ_T,k−1 + (1−m)·θ_S,k from θ_T,0 = θ_S,0, for every recorded step (float tensors; ints copied)."""
    teacher = {n: v.clone() for n, v in initial.items()}
    out = []
    for student in students:
        for n, s in student.items():
            if s.is_floating_point() and (buffers or "running" not in n):
                teacher[n] = momentum * teacher[n] + (1 - momentum) * s
            else:
                teacher[n] = s.clone()
        out.append({n: v.clone() for n, v in teacher.items()})
    return out


def assert_close_all(actual, expected, atol: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for n in actual:
        torch.testing.assert_close(actual[n], expected[n], atol=atol, rtol=0, msg=n)


def _callback_face(momentum: float, net: nn.Module | None = None, **options):
    module = UserModule(net if net is not None else SmallCNN())
    cb = EMADistillCallback(loss="kd", momentum=momentum, **options)
    return module, cb, Recorder(lambda m: (cb.teacher_model, student_of(m, cb.student_attr)))


def _module_face(momentum: float, **options):
    net = SmallCNN()
    module = DistillationModule(net, copy.deepcopy(net), loss="kd", scheduler=None)
    cb = EMATeacherCallback(momentum=momentum, **options)
    return module, cb, Recorder(lambda m: (m.engine.teacher, m.model))


# --------------------------------------------------------------------------------------------------------------------
# The EMA inside a fit
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("face", ["callback", "module"])
def test_teacher_is_ema_of_student_after_each_step_and_never_trained(face: str) -> None:
    m = 0.7
    module, cb, rec = _callback_face(m) if face == "callback" else _module_face(m)
    trainer = fast_trainer(max_steps=3, callbacks=[cb, rec])
    trainer.fit(module, make_loader(n=32, batch=8))

    assert cb.ema.updates == 3 and len(rec.teachers) == 3
    for actual, expected in zip(rec.teachers, expected_ema(rec.initial, rec.students, m)):
        assert_close_all(actual, expected)
    # not trivially satisfied: the student moved, and the teacher is neither the student nor its initial copy
    last_s, last_t = rec.students[-1], rec.teachers[-1]
    name = next(n for n in last_t if n.endswith("fc.weight"))
    assert not torch.allclose(last_s[name], rec.initial[name])
    assert not torch.allclose(last_t[name], last_s[name]) and not torch.allclose(last_t[name], rec.initial[name])

    teacher = cb.ema.teacher
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    in_optimizer = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}
    assert all(sub is not teacher for sub in module.modules())  # held outside the module tree


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_extremes(momentum: float) -> None:
    """m = 0: the teacher is the student after every step; m = 1: it stays the initial student (exactly)."""
    module, cb, rec = _callback_face(momentum)
    fast_trainer(max_steps=2, callbacks=[cb, rec]).fit(module, make_loader(n=16, batch=8))
    assert len(rec.teachers) == 2
    for teacher, student in zip(rec.teachers, rec.students):
        reference = student if momentum == 0.0 else rec.initial
        assert all(torch.equal(teacher[n], reference[n]) for n in teacher)
    assert not torch.equal(rec.students[-1]["net.fc.weight"], rec.initial["net.fc.weight"])


def test_accumulation_updates_once_per_optimizer_step() -> None:
    m = 0.5
    module, cb, rec = _callback_face(m)
    trainer = fast_trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[cb, rec])
    trainer.fit(module, make_loader(n=32, batch=8))  # 4 batches -> 2 optimizer steps
    assert trainer.global_step == 2 and cb.ema.updates == 2
    assert rec.batches == [1, 3]
    for actual, expected in zip(rec.teachers, expected_ema(rec.initial, rec.students, m)):
        assert_close_all(actual, expected)


@pytest.mark.parametrize("buffers", ["ema", "copy"])
def test_batchnorm_buffers(buffers: str) -> None:
    """``ema``: running mean/var are averaged like the weights; ``copy``: taken from the student. The int buffer
    ``num_batches_tracked`` is copied either way."""
    m = 0.6
    module, cb, rec = _callback_face(m, net=BNNet(), student_attr="net", buffers=buffers)
    fast_trainer(max_steps=3, callbacks=[cb, rec]).fit(module, make_loader(n=32, batch=8))
    expected = expected_ema(rec.initial, rec.students, m, buffers=buffers == "ema")
    for actual, exp, student in zip(rec.teachers, expected, rec.students):
        assert_close_all(actual, exp)
        assert torch.equal(actual["features.1.num_batches_tracked"], student["features.1.num_batches_tracked"])
    mean = "features.1.running_mean"
    assert torch.equal(rec.teachers[-1][mean], rec.students[-1][mean]) == (buffers == "copy")


# --------------------------------------------------------------------------------------------------------------------
# The rule by hand: warm-up, the PSMT mask, the quantile
# --------------------------------------------------------------------------------------------------------------------
def _linear_pair(**options) -> tuple[MomentumTeacher, nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    student = nn.Linear(4, 3)
    teacher = copy.deepcopy(student)
    rule = MomentumTeacher(**options)
    rule.bind(teacher, student)
    return rule, teacher, student


def test_warmup_is_the_mean_of_the_iterates() -> None:
    rule, teacher, student = _linear_pair(momentum=0.9, warmup=True)
    assert [rule.momentum_at(k) for k in (1, 2, 3, 9, 50)] == pytest.approx([0.5, 2 / 3, 0.75, 0.9, 0.9])
    states = [student.weight.detach().clone()]
    for _ in range(3):
        with torch.no_grad():
            student.weight.normal_()
        states.append(student.weight.detach().clone())
        rule.update()
    torch.testing.assert_close(teacher.weight, torch.stack(states).mean(0), atol=1e-6, rtol=0)


def test_quantile_interpolates_linearly() -> None:
    values = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0, 1.0], [2.0, 5.0]])]
    assert float(quantile(values, 0.3)) == pytest.approx(1.5)  # sorted 0..5, position 0.3·5 = 1.5
    assert float(quantile(values, 0.4)) == pytest.approx(2.0)  # exactly on an order statistic
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert float(quantile([x[:300], x[300:]], 0.03)) == pytest.approx(float(torch.quantile(x, 0.03)), abs=1e-6)


def _set_grads(student: nn.Linear) -> None:
    """F = g²: weight 1, 4, 9, …, 144 (row-major), bias 0.25, 400, 900. The 0.2-quantile of the 15 values lies at
    position 0.2·14 = 2.8 of the sorted list (0.25, 1, 4, 9, …): 4 + 0.8·(9 − 4) = 8, so F < 8 protects bias[0],
    weight[0, 0] and weight[0, 1]."""
    student.weight.grad = torch.arange(1.0, 13.0).reshape(3, 4)
    student.bias.grad = torch.tensor([0.5, 20.0, 30.0])


PROTECTED_W = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
PROTECTED_B = torch.tensor([1, 0, 0], dtype=torch.bool)


@pytest.mark.parametrize(("protect", "restore"), [("keep", False), ("source", True), ("source", False)])
def test_psmt_mask_protects_low_fisher_elements(protect: str, restore: bool) -> None:
    m = 0.5
    rule, teacher, student = _linear_pair(momentum=m, fisher_quantile=0.2, protect=protect, restore_student=restore)
    source = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    with torch.no_grad():  # a first, unmasked update (no gradients seen yet), so that teacher != θ_0
        student.weight.add_(1.0)
        student.bias.add_(1.0)
    rule.update()
    assert rule.protected_fraction is None
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}

    _set_grads(student)
    rule.observe_gradients()
    with torch.no_grad():  # the optimizer step
        student.weight.add_(torch.linspace(-1, 1, 12).reshape(3, 4))
        student.bias.sub_(2.0)
    stepped = {n: p.detach().clone() for n, p in student.named_parameters()}
    rule.update()

    assert rule.protected_fraction == pytest.approx(3 / 15)
    for name, mask in (("weight", PROTECTED_W), ("bias", PROTECTED_B)):
        t = getattr(teacher, name).detach()
        held = before[name] if protect == "keep" else source[name]
        assert torch.equal(t[mask], held[mask])  # protected: exactly held
        ema = m * before[name] + (1 - m) * stepped[name]
        torch.testing.assert_close(t[~mask], ema[~mask], atol=1e-6, rtol=0)  # the others follow the EMA
        assert not torch.allclose(t[mask], ema[mask])  # and the mask made a difference
        s = getattr(student, name).detach()
        assert torch.equal(s[mask], source[name][mask] if restore else stepped[name][mask])
        assert torch.equal(s[~mask], stepped[name][~mask])


def test_fisher_running_mean_and_nonfinite_steps() -> None:
    rule, _, student = _linear_pair(fisher_quantile=0.1, fisher_decay=0.25)
    student.weight.grad, student.bias.grad = torch.full((3, 4), 2.0), torch.zeros(3)
    rule.observe_gradients()
    student.weight.grad = torch.full((3, 4), 4.0)
    rule.observe_gradients()
    torch.testing.assert_close(rule.fisher["weight"], torch.full((3, 4), 0.25 * 4 + 0.75 * 16))
    student.weight.grad = torch.full((3, 4), float("inf"))  # a step the grad scaler skips
    rule.observe_gradients()
    torch.testing.assert_close(rule.fisher["weight"], torch.full((3, 4), 13.0))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fisher_under_16_mixed_uses_unscaled_gradients() -> None:
    """With a float16 grad scaler (scale 2^16), F is read after Lightning's ``unscale_``: it matches the float32 run's
    squared gradients (scaled ones would be 2^32 times larger)."""
    from lightning.pytorch.plugins import MixedPrecision

    fisher = {}
    for precision in ("32", "16-mixed"):
        module = UserModule(SmallCNN())
        cb = EMADistillCallback(loss="kd", student_attr="net", fisher_quantile=0.2, fisher_decay=0.5)
        plugins = [MixedPrecision("16-mixed", "cpu")] if precision == "16-mixed" else []
        trainer = fast_trainer(max_steps=1, callbacks=[cb], plugins=plugins)
        trainer.fit(module, make_loader(n=8, batch=8))
        fisher[precision] = sum(float(f.sum()) for f in cb.ema.fisher.values())
    assert trainer.precision_plugin.scaler.get_scale() >= 2.0**15
    assert fisher["16-mixed"] == pytest.approx(fisher["32"], rel=0.05)


def test_bad_arguments_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\]"):
        MomentumTeacher(1.5)
    with pytest.raises(ValueError, match="buffers must be one of"):
        MomentumTeacher(buffers="average")
    with pytest.raises(ValueError, match="fisher_quantile must be a fraction in"):
        MomentumTeacher(fisher_quantile=1.0)
    with pytest.raises(ValueError, match="set fisher_quantile="):
        MomentumTeacher(restore_student=True)
    with pytest.raises(ValueError, match="is not a copy of the student"):
        MomentumTeacher().bind(nn.Linear(4, 2), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"student_attr='model'.*\['net'\]"):
        student_of(UserModule(), "model")
    with pytest.raises(ValueError, match="no teacher to update"):
        EMATeacherCallback().setup(fast_trainer(), UserModule(), "fit")


def test_teacher_copy_leaves_out_trainer_attachments_and_taps() -> None:
    module = UserModule()
    module.add_module("_lkd_engine", nn.Linear(2, 2))
    taps = LayerTaps(module, ["net.fc"])
    teacher = freeze(frozen_copy(module))  # how EMADistillCallback makes its teacher
    assert [n for n, _ in module.named_children()] == ["net", "_lkd_engine"]  # the student is left as it was
    assert [n for n, _ in teacher.named_children()] == ["net"]
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    with taps.capture():
        teacher(torch.randn(2, 3, 8, 8))
    assert len(taps) == 0  # the student's tap did not fire on the teacher
    with taps.capture():
        module(torch.randn(2, 3, 8, 8))
    assert len(taps) == 1
    taps.remove()


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------------
PSMT = {"fisher_quantile": 0.2, "fisher_decay": 0.5, "protect": "source", "restore_student": True}


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.parametrize("options", [{}, PSMT], ids=["ema", "psmt"])
def test_resume_gives_the_same_teacher(tmp_path, options) -> None:
    """4 steps straight == 2 steps, save, resume 2 more (teacher, count, F, θ_0); the file loads weights_only."""
    loader = make_loader(n=8, batch=8)  # one batch per epoch: the resumed run sees the same batches whatever epoch

    def fit(steps: int, seed: int = 0, ckpt: str | None = None):
        module = UserModule(SmallCNN(seed=seed))
        cb = EMADistillCallback(loss="kd", momentum=0.8, student_attr="net", **options)
        trainer = fast_trainer(max_steps=steps, max_epochs=-1, callbacks=[cb])
        trainer.fit(module, loader, ckpt_path=ckpt)
        return cb, trainer

    straight, _ = fit(4)
    half, trainer = fit(2)
    path = str(tmp_path / "half.ckpt")
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["callbacks"][half.state_key]["ema"]
    assert state["updates"] == 2 and set(state["teacher"]) == set(half.teacher_model.state_dict())
    resumed, _ = fit(4, seed=5, ckpt=path)  # a different init: everything must come from the file

    assert resumed.ema.updates == straight.ema.updates == 4
    assert_close_all(resumed.teacher_model.state_dict(), straight.teacher_model.state_dict())
    assert not torch.allclose(straight.teacher_model.fc.weight, half.teacher_model.fc.weight)
    if options:
        assert_close_all(resumed.ema.source, straight.ema.source)
        assert_close_all(resumed.ema.fisher, straight.ema.fisher)


# --------------------------------------------------------------------------------------------------------------------
# Hydra app
# --------------------------------------------------------------------------------------------------------------------
APP = [
    *TINY_APP,
    "model=test_resnet",  # timm's tiny test ResNet (with BatchNorm)
]


def test_app_trains_the_student_with_its_ema_teacher(tmp_path, monkeypatch) -> None:
    from lightning_kd.config import compose
    from lightning_kd.run import train

    monkeypatch.chdir(tmp_path)
    res = train(compose(["strategy=ema", "teacher=resnet50", *APP]))
    assert res["strategy"] == "ema" and res["teacher"] == "EMA of test_resnet"
    for key in ("student_acc", "teacher_acc", "agreement"):
        assert 0.0 <= res[key] <= 1.0
    assert ["EMA momentum", 0.99] in res["rows"] and ["EMA updates", 2] in res["rows"]
    assert not (tmp_path / "teacher").exists()  # no teacher was trained (teacher= is ignored)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = [s for k, s in checkpoint["callbacks"].items() if k.startswith("EMADistillCallback")]
    assert state["ema"]["updates"] == 2 and "fc.weight" in state["ema"]["teacher"]


def test_psmt_config_and_stage_check() -> None:
    from lightning_kd.config import compose

    cfg = compose(["strategy=psmt"])
    assert cfg.strategy.name == "ema"
    assert (cfg.strategy.fisher_quantile, cfg.strategy.protect, cfg.strategy.restore_student) == (0.03, "source", True)
    cfg = compose(["strategy=ema", "stage=teacher"])
    assert math.isclose(cfg.strategy.momentum, 0.99) and cfg.strategy.fisher_quantile is None
    with pytest.raises(ValueError, match="use stage=all"):
        run_app(cfg, None, None)
