"""Tests of data-partitioned KD (:mod:`lightning_kd.losses.partition`, Fantastic Gains), CPU: the per-sample routing
between the teacher and the frozen initial student by hand, the loss against :func:`kd_loss` to the routed targets,
and the frozen copy (unchanged by training, no gradient, in checkpoints, free of the engine and its hooks)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SmallCNN, UserModule, fast_trainer, make_loader
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_kd import DistillationModule, DistillCallback
from lightning_kd.engine import DistillEngine
from lightning_kd.losses import DistillBatch, ModelOutputs, SetupContext, create_loss
from lightning_kd.losses.kd import kd_loss
from lightning_kd.losses.partition import PartitionKD, partition_targets
from lightning_kd.taps import LayerTaps, frozen_copy

# Four samples, three classes; labels 0, 1, 2, 0.
INITIAL = [[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.5, 0.5, 0.5], [0.0, 4.0, 0.0]]
TEACHER = [[0.5, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5], [1.0, 0.0, 0.0]]
LABELS = [0, 1, 2, 0]


def _softmax(z: list[float], tau: float = 1.0) -> list[float]:
    e = [math.exp(v / tau) for v in z]
    return [v / sum(e) for v in e]


def test_hand_worked_routing_with_and_without_labels() -> None:
    # by label: p0(y) = .79 vs pT(y) = .45 -> initial; .91 vs .58 -> initial; 1/3 vs 1/3 (tie) -> initial;
    # .03 vs .58 -> teacher. By maximum probability: initial on samples 0, 1, 3 (0.96 > 0.58), a tie on sample 2.
    by_label = [_softmax(t)[y] > _softmax(i)[y] for i, t, y in zip(INITIAL, TEACHER, LABELS)]
    by_max = [max(_softmax(t)) > max(_softmax(i)) for i, t in zip(INITIAL, TEACHER)]
    assert by_label == [False, False, False, True] and by_max == [False, False, False, False]
    candidates = torch.stack([torch.tensor(INITIAL), torch.tensor(TEACHER)], dim=1)
    choice, target = partition_targets(candidates, torch.tensor(LABELS), "label")
    assert choice.tolist() == [int(b) for b in by_label]
    torch.testing.assert_close(target[3], torch.tensor(TEACHER[3]))
    torch.testing.assert_close(target[:3], torch.tensor(INITIAL[:3]))
    assert partition_targets(candidates, torch.tensor(LABELS), "max")[0].tolist() == [0, 0, 0, 0]
    assert partition_targets(candidates, None, "auto")[0].tolist() == [0, 0, 0, 0]  # no labels: maximum probability


class _Fixed(torch.nn.Module):
    """A 'model' whose output is a fixed logit table (the frozen initial student of the hand-worked case)."""

    def __init__(self, logits: list[list[float]]) -> None:
        super().__init__()
        self.register_buffer("table", torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.long()]


def _term(initial: list[list[float]] = INITIAL, members: tuple[str, ...] = (), **kwargs) -> PartitionKD:
    term = PartitionKD(**kwargs)
    teacher = ModelOutputs(torch.zeros(1, 3), members={m: torch.zeros(1, 3) for m in members})
    term.setup(SetupContext(ModelOutputs(torch.zeros(1, 3)), teacher, _Fixed(initial), None, 3))
    return term


def test_loss_is_kd_to_the_routed_target_with_the_teacher_fraction_logged() -> None:
    term = _term(temperature=2.0)
    student = torch.tensor([[0.1, 0.2, 0.3]] * 4, requires_grad=True)
    batch = DistillBatch(
        ModelOutputs(student), ModelOutputs(torch.tensor(TEACHER)), torch.tensor(LABELS), inputs=torch.arange(4)
    )
    targets = torch.tensor([INITIAL[0], INITIAL[1], INITIAL[2], TEACHER[3]])
    assert term(batch).item() == pytest.approx(kd_loss(student, targets, 2.0).item(), rel=1e-6)
    assert term.diagnostics["teacher_fraction"].item() == pytest.approx(0.25)


def test_ensemble_members_compete_with_the_initial_student() -> None:
    term = _term(members=("a", "b"))
    second = [[0.0, 0.0, 5.0], [0.0, 6.0, 0.0], [0.0, 0.0, 1.0], [3.0, 0.0, 0.0]]  # most confident on 1, 2, 3
    members = {"a": torch.tensor(TEACHER), "b": torch.tensor(second)}
    batch = DistillBatch(
        ModelOutputs(torch.zeros(4, 3)),
        ModelOutputs(torch.zeros(4, 3), members=members),
        torch.tensor(LABELS),
        inputs=torch.arange(4),
    )
    term(batch)
    assert term.diagnostics["routed/a"].item() == 0.0
    assert term.diagnostics["routed/b"].item() == pytest.approx(0.75)
    assert term.diagnostics["teacher_fraction"].item() == pytest.approx(0.75)


def test_frozen_copy_is_unchanged_by_training_and_gets_no_gradient() -> None:
    module = DistillationModule(SmallCNN(seed=0), SmallCNN(seed=1), loss="partition")
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    fast_trainer(max_steps=3).fit(module, make_loader())
    copy = module.engine.terms["partition"].initial
    assert copy is not None and copy is not module.model
    for k, v in copy.state_dict().items():
        assert torch.equal(v, initial[k]), f"the frozen copy's {k} changed"
    assert any(not torch.equal(v, initial[k]) for k, v in module.model.state_dict().items())  # the student trained
    assert all(not p.requires_grad and p.grad is None for p in copy.parameters())
    assert "engine.terms.partition.initial.fc.weight" in module.state_dict()  # kept for resume
    assert not copy.training  # run in eval mode


def test_resume_restores_the_initial_student_not_the_restarted_one(tmp_path) -> None:
    first = DistillationModule(SmallCNN(seed=0), SmallCNN(seed=1), loss="partition")
    initial = {k: v.clone() for k, v in first.model.state_dict().items()}
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last", save_top_k=1)
    fast_trainer(max_steps=2, enable_checkpointing=True, callbacks=[checkpoint]).fit(first, make_loader())
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    torch.testing.assert_close(state["engine.terms.partition.initial.fc.weight"], initial["fc.weight"])

    second = DistillationModule(SmallCNN(seed=5), SmallCNN(seed=1), loss="partition")  # another initialisation
    fast_trainer(max_steps=3).fit(second, make_loader(), ckpt_path=tmp_path / "last.ckpt")
    for k, v in second.engine.terms["partition"].initial.state_dict().items():
        assert torch.equal(v, initial[k]), k


def test_callback_face_copies_the_module_without_trainer_engines_or_hooks() -> None:
    user = UserModule()
    first = DistillCallback(SmallCNN(seed=1), loss="kd", name="a")  # its engine is attached before the second's setup
    second = DistillCallback(SmallCNN(seed=2), loss="partition", name="b")
    trainer = fast_trainer(max_steps=1, callbacks=[first, second])
    trainer.fit(user, make_loader())
    copy = second.engine.terms["partition"].initial
    assert isinstance(copy, UserModule) and copy._trainer is None
    assert [name for name, _ in copy.named_children()] == ["net"]  # no _lkd_engine_a
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in copy.modules())
    assert 0.0 <= float(trainer.callback_metrics["train/b/partition"]) < math.inf


def test_frozen_copy_drops_the_taps_hooks() -> None:
    net = SmallCNN()
    taps = LayerTaps(net, ["fc", "features.0"])
    assert net.fc._forward_hooks  # the taps are installed on the original
    copy = frozen_copy(net)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in copy.modules())
    taps.remove()


def test_frozen_copy_keeps_the_users_own_hooks() -> None:
    net = SmallCNN()
    calls = []
    net.fc.register_forward_hook(lambda *_: calls.append(1))
    copy = frozen_copy(net)
    copy(torch.zeros(1, 3, 8, 8))
    assert calls == [1] and all(not p.requires_grad for p in copy.parameters())


def test_errors_name_the_problem() -> None:
    term = _term()
    batch = DistillBatch(ModelOutputs(torch.zeros(4, 3)), ModelOutputs(torch.tensor(TEACHER)), torch.tensor(LABELS))
    with pytest.raises(ValueError, match="no inputs"):
        term(batch)
    with pytest.raises(ValueError, match="needs class labels"):
        _term(confidence="label")(
            DistillBatch(ModelOutputs(torch.zeros(4, 3)), ModelOutputs(torch.tensor(TEACHER)), inputs=torch.arange(4))
        )
    with pytest.raises(ValueError, match="confidence"):
        PartitionKD(confidence="entropy")
    assert isinstance(create_loss("partition", temperature=2.0), PartitionKD)


def test_under_bf16_autocast_the_loss_is_float32_and_reaches_the_student() -> None:
    student, teacher = SmallCNN(seed=0), SmallCNN(seed=1)
    engine = DistillEngine("partition", teacher)
    x, y = next(iter(make_loader()))[:2]
    engine.setup(student, x[:2], student)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t_out = engine.run_teacher(x)
        with engine.student_capture():
            logits = student(x)
        total, _ = engine(DistillBatch(engine.student_outputs(logits), t_out, y, inputs=x))
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in engine.terms["partition"].initial.parameters())
