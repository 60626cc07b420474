"""Tests of ClassroomKD (:mod:`lightning_kd.losses.classroom`), CPU.

Reference values are hand computations with ``math`` only: the mentors' and the student's probability of the label,
the filter ``CE_m <= CE_S``, the standing ``w = M · s / Σ s`` and the temperature ``1 + τ · (1 − s_S / s_m)``.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_kd.losses import DistillBatch, ModelOutputs, SetupContext, create_loss
from lightning_kd.losses.classroom import ClassroomKD, classroom_weights, kd_per_sample, member_logits
from lightning_kd.losses.kd import kd_loss


def _softmax(z: list[float], tau: float = 1.0) -> list[float]:
    e = [math.exp(v / tau) for v in z]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


# Three samples, three classes, two mentors A and B. Labels: 0, 1, 2.
STUDENT = [[1.0, 0.5, 0.0], [0.2, 0.4, 0.0], [0.0, 0.0, 2.0]]
MENTOR_A = [[3.0, 0.0, 0.0], [0.0, 2.0, 0.5], [1.0, 1.0, 0.5]]  # better, better, worse than the student
MENTOR_B = [[2.0, 0.5, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 1.0]]  # better, worse, worse
LABELS = [0, 1, 2]


def _hand_classroom(tau: float, per_sample: bool = True) -> tuple[float, list[list[bool]], list[float]]:
    """(loss, active[x][m], per-mentor parts) by hand."""
    mentors = {"a": MENTOR_A, "b": MENTOR_B}
    ce = {"s": [-math.log(_softmax(z)[y]) for z, y in zip(STUDENT, LABELS)]}
    for name, zs in mentors.items():
        ce[name] = [-math.log(_softmax(z)[y]) for z, y in zip(zs, LABELS)]
    if not per_sample:
        ce = {k: [sum(v) / len(v)] * len(v) for k, v in ce.items()}
    parts = {name: 0.0 for name in mentors}
    active = []
    for x in range(3):
        score = {k: math.exp(-v[x]) for k, v in ce.items()}  # probability of the label
        total = sum(score.values())
        row = []
        for name, zs in mentors.items():
            w_m, w_s = 2 * score[name] / total, 2 * score["s"] / total
            on = score[name] >= score["s"]
            row.append(on)
            if on:
                t = 1 + tau * (w_m - w_s) / max(w_m, w_s)
                parts[name] += w_m * t**2 * _kl(_softmax(zs[x], t), _softmax(STUDENT[x], t)) / 3
        active.append(row)
    return sum(parts.values()), active, [parts["a"], parts["b"]]


def _batch(targets=LABELS, members=True, soft=None) -> DistillBatch:
    s = torch.tensor(STUDENT, requires_grad=True)
    a, b = torch.tensor(MENTOR_A), torch.tensor(MENTOR_B)
    teacher = ModelOutputs((a + b) / 2, members={"a": a, "b": b} if members else {})
    y = None if targets is None else torch.tensor(targets)
    return DistillBatch(ModelOutputs(s), teacher, targets=y, soft_targets=soft)


@pytest.mark.parametrize("tau", [12.0, 2.0])
def test_hand_worked_two_mentors_three_samples(tau: float) -> None:
    expected, active, parts = _hand_classroom(tau)
    assert active == [[True, True], [True, False], [False, False]]  # the case exercises every filter outcome
    term = ClassroomKD(temperature=tau)
    got = term(_batch())
    assert got["a"].item() == pytest.approx(parts[0], rel=1e-5)
    assert got["b"].item() == pytest.approx(parts[1], rel=1e-5)
    assert sum(got.values()).item() == pytest.approx(expected, rel=1e-5)
    assert term.diagnostics["active/a"].item() == pytest.approx(2 / 3)
    assert term.diagnostics["active/b"].item() == pytest.approx(1 / 3)


def test_batch_level_ranking_follows_the_authors_code() -> None:
    expected, _, _ = _hand_classroom(12.0, per_sample=False)
    got = ClassroomKD(temperature=12.0, per_sample=False)(_batch())
    assert sum(got.values()).item() == pytest.approx(expected, rel=1e-5)


def test_fixed_temperature_without_mentoring() -> None:
    s, a, b = torch.tensor(STUDENT), torch.tensor(MENTOR_A), torch.tensor(MENTOR_B)
    ce = lambda z: torch.nn.functional.cross_entropy(z, torch.tensor(LABELS), reduction="none")
    active, weight, tau = classroom_weights(ce(s), torch.stack([ce(a), ce(b)], 1), 3.0, adaptive=False)
    assert torch.all(tau == 3.0)
    expected = sum((active[:, m] * weight[:, m] * kd_per_sample(s, z, 3.0)).mean() for m, z in enumerate((a, b)))
    got = ClassroomKD(temperature=3.0, adaptive=False)(_batch())
    assert sum(got.values()).item() == pytest.approx(expected.item(), rel=1e-5)


def test_weights_are_normalised_standing_and_gap_temperatures_are_bounded() -> None:
    g = torch.Generator().manual_seed(0)
    student_ce, mentor_ce = torch.rand(6, generator=g) * 3, torch.rand(6, 3, generator=g) * 3
    active, weight, tau = classroom_weights(student_ce, mentor_ce, 12.0)
    scores = torch.cat([student_ce[:, None], mentor_ce], 1).neg().exp()
    torch.testing.assert_close(weight, 3 * scores[:, 1:] / scores.sum(1, keepdim=True))
    assert torch.equal(active, mentor_ce <= student_ce[:, None])
    assert torch.all(tau[~active] == 1.0) and torch.all((tau >= 1) & (tau < 13))


def test_per_sample_kd_matches_kd_loss() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert kd_per_sample(s, t, 4.0).mean().item() == pytest.approx(kd_loss(s, t, 4.0).item(), rel=1e-5)
    taus = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    rows = torch.stack([kd_loss(s[i : i + 1], t[i : i + 1], float(taus[i])) for i in range(5)])
    torch.testing.assert_close(kd_per_sample(s, t, taus), rows)


def test_gradient_reaches_the_student_only_through_active_mentors() -> None:
    batch = _batch()
    sum(ClassroomKD()(batch).values()).backward()
    grad = batch.student.logits.grad
    assert grad[:2].abs().sum() > 0  # samples with an active mentor
    assert torch.all(grad[2] == 0)  # no mentor beats the student on the last sample


def test_single_teacher_is_one_mentor() -> None:
    batch = _batch(members=False)
    assert list(member_logits(batch.teacher)) == ["teacher"]
    got = ClassroomKD()(batch)
    assert list(got) == ["teacher"] and torch.isfinite(got["teacher"])


def test_soft_targets_rank_by_their_cross_entropy() -> None:
    one_hot = torch.nn.functional.one_hot(torch.tensor(LABELS), 3).float()
    hard = ClassroomKD()(_batch())
    soft = ClassroomKD()(_batch(soft=one_hot))
    for name in hard:
        assert soft[name].item() == pytest.approx(hard[name].item(), rel=1e-6)


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="no class labels"):
        ClassroomKD()(_batch(targets=None))
    term = ClassroomKD()
    probe = _batch()
    term.setup(SetupContext(probe.student, probe.teacher, torch.nn.Identity(), torch.nn.Identity(), 3))
    assert term.members == ["a", "b"]
    with pytest.raises(
        ValueError, match=r"set up for the teachers \['a', 'b'\] but this step's teacher has \['teacher'\]"
    ):
        term(_batch(members=False))  # e.g. an output cache that kept only the combined logits
    with pytest.raises(ValueError, match="temperature"):
        ClassroomKD(temperature=0.0)
    assert isinstance(create_loss("classroom", per_sample=False), ClassroomKD)
