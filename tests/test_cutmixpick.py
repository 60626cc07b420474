"""CutMixPick (Wang et al., NeurIPS 2022): CutMix views, scoring, picking the highest-scoring views, gradients to the
student only, and the extra forwards on both faces of the engine without disturbing the layer taps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import GapNet, UserModule, fast_trainer, make_loader

from lightning_kd import DistillationModule
from lightning_kd.callback import DistillCallback
from lightning_kd.losses.base import DistillBatch, LossTerm, ModelOutputs, SetupContext
from lightning_kd.losses.cutmixpick import CutMixPickLoss, cutmix_views, entropy, per_sample_kl
from lightning_kd.losses.kd import kd_loss
from lightning_kd.taps import TapSpec


def _term(student: torch.nn.Module, teacher: torch.nn.Module, **kwargs) -> CutMixPickLoss:
    term = CutMixPickLoss(**kwargs)
    out = ModelOutputs(torch.zeros(1, 5))
    term.setup(SetupContext(out, out, student, teacher, 5))
    return term


def test_cutmix_views_paste_one_box_from_a_partner_without_fixed_points() -> None:
    x = torch.randn(6, 3, 16, 16)
    views, lam, perm = cutmix_views(x, np.random.default_rng(3))
    assert not (perm == torch.arange(6)).any() and sorted(perm.tolist()) == list(range(6))
    changed = (views != x).any(dim=1)  # [B, H, W]: pixels taken from the partner
    rows, cols = changed.any(dim=(0, 2)).nonzero().flatten(), changed.any(dim=(0, 1)).nonzero().flatten()
    y1, y2, x1, x2 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    box = torch.zeros(16, 16, dtype=torch.bool)
    box[y1:y2, x1:x2] = True
    assert torch.equal(changed.all(dim=0), box)  # one rectangle, the same for every view
    assert torch.equal(views[:, :, box], x[perm][:, :, box]) and torch.equal(views[:, :, ~box], x[:, :, ~box])
    assert lam == pytest.approx(1 - box.sum().item() / 256)


def test_scores_by_hand() -> None:
    two = torch.tensor([[0.0, 0.0], [math.log(0.9), math.log(0.1)]])
    assert entropy(two).tolist() == pytest.approx([math.log(2), -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))])
    kl = per_sample_kl(student_logits=two[1:], teacher_logits=two[:1], temperature=1.0)
    assert kl.item() == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))


@pytest.mark.parametrize("criterion", ["teacher_entropy", "student_entropy", "kl"])
def test_score_criteria_follow_their_formula(criterion: str) -> None:
    student, teacher = GapNet(seed=0), GapNet(seed=1)
    term = _term(student, teacher, criterion=criterion, temperature=2.0)
    views = torch.randn(4, 3, 8, 8)
    scores, t_logits = term.score(views)
    with torch.no_grad():
        expected = {
            "teacher_entropy": entropy(teacher(views)),
            "student_entropy": entropy(student(views)),
            "kl": per_sample_kl(student(views), teacher(views), 2.0),
        }[criterion]
    torch.testing.assert_close(scores, expected)
    assert (t_logits is None) == (criterion == "student_entropy")


def test_picks_the_highest_scoring_views_and_returns_kd_on_them() -> None:
    student, teacher = GapNet(seed=0), GapNet(seed=1)
    x = torch.randn(4, 3, 8, 8)
    term = _term(student, teacher, mix_runs=2, n_pick=3, temperature=2.0)
    hand = torch.tensor([0.1, 5.0, 0.3, 4.0, 0.2, 3.0, 9.0, 0.0])  # pool of 2·4 views
    term.score = lambda views: (hand, None)
    seen: dict[str, torch.Tensor] = {}
    student.register_forward_hook(lambda m, args, out: seen.__setitem__("student", args[0].detach().clone()))
    teacher.register_forward_hook(lambda m, args, out: seen.__setitem__("teacher", args[0].detach().clone()))
    batch = DistillBatch(ModelOutputs(torch.zeros(4, 5)), ModelOutputs(torch.zeros(4, 5)), step=5, inputs=x)
    loss = term(batch)

    pool = _term(student, teacher, mix_runs=2).pool(x, step=5)  # same seed and step: the same views
    picked = pool[[6, 1, 3]]
    assert torch.equal(seen["student"], picked) and torch.equal(seen["teacher"], picked)
    with torch.no_grad():
        expected = kd_loss(student(picked), teacher(picked), 2.0)
    torch.testing.assert_close(loss.detach(), expected)


def test_default_picks_batch_size_views_of_highest_teacher_entropy() -> None:
    student, teacher = GapNet(seed=0), GapNet(seed=1)
    x = torch.randn(4, 3, 8, 8)
    term = _term(student, teacher, mix_runs=3)
    seen: list[torch.Tensor] = []
    student.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    term(DistillBatch(ModelOutputs(torch.zeros(4, 5)), ModelOutputs(torch.zeros(4, 5)), step=0, inputs=x))
    assert len(seen) == 1  # teacher-entropy scoring does not run the student: one forward, on the picked views
    pool = _term(student, teacher, mix_runs=3).pool(x, step=0)
    with torch.no_grad():
        top = entropy(teacher(pool)).topk(4).indices
    assert torch.equal(seen[0], pool[top])


def test_gradients_reach_the_student_only() -> None:
    student, teacher = GapNet(seed=0), GapNet(seed=1)  # the teacher's parameters even require grad here
    for criterion in ("teacher_entropy", "kl"):
        student.zero_grad()
        term = _term(student, teacher, criterion=criterion)
        x = torch.randn(4, 3, 8, 8)
        term(DistillBatch(ModelOutputs(torch.zeros(4, 5)), ModelOutputs(torch.zeros(4, 5)), inputs=x)).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        assert all(p.grad is None for p in teacher.parameters())


def test_bad_arguments_and_missing_inputs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="criterion must be one of"):
        CutMixPickLoss(criterion="entropy")
    with pytest.raises(ValueError, match="mix_runs"):
        CutMixPickLoss(mix_runs=0)
    with pytest.raises(ValueError, match="n_pick"):
        CutMixPickLoss(n_pick=0)
    term = _term(GapNet(), GapNet())
    with pytest.raises(ValueError, match=r"needs the step's image batch \[B, C, H, W\]"):
        term(DistillBatch(ModelOutputs(torch.zeros(2, 5)), ModelOutputs(torch.zeros(2, 5))))


class Probe(LossTerm):
    """Records what the engine handed over for the student's embedding tap, and what it should be."""

    def __init__(self, embed) -> None:
        super().__init__(weight=0.0)
        self.student_taps = [TapSpec.parse("embedding")]
        self.embed = embed
        self.checks: list[bool] = []

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        with torch.no_grad():
            expected = self.embed(batch.inputs)
        self.checks.append(torch.allclose(batch.student["embedding"], expected, atol=1e-6))
        return batch.student.logits.sum() * 0


@pytest.mark.parametrize("face", ["module", "callback"])
def test_both_faces_run_the_extra_forwards_without_disturbing_the_taps(face: str) -> None:
    student, teacher = GapNet(seed=0), GapNet(seed=1)
    embed = lambda x: student.features(x).mean(dim=(2, 3))  # GapNet's classifier input
    probe = Probe(embed)
    loss = {"cutmixpick": CutMixPickLoss(n_pick=3), "probe": probe}  # the probe runs after cutmixpick's forwards
    sizes: list[int] = []
    student.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    if face == "module":
        module, callbacks = DistillationModule(student, teacher, loss=loss), []
    else:
        module = UserModule(student)
        callbacks = [DistillCallback(teacher, loss=loss)]
    trainer = fast_trainer(max_steps=2, callbacks=callbacks)
    trainer.fit(module, make_loader(n=16, classes=5, size=8, batch=4))
    assert probe.checks == [True, True]
    assert "train/cutmixpick" in trainer.callback_metrics
    # per step: the setup probe aside, the training forward on 4 inputs, then cutmixpick's student forward on 3 views
    assert sizes[-4:] == [4, 3, 4, 3]
    engine = module.engine if face == "module" else callbacks[0].engine
    assert engine.terms["cutmixpick"].student_model is (student if face == "module" else module)
