"""SimKD (:mod:`lightning_kd.losses.simkd`): hand-worked loss, the authors' projector, the reused frozen teacher
classifier, the deployable predictor, errors, and a timm pair through Lightning (CPU)."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import GapNet, fast_trainer, gen, make_loader, tiny
from omegaconf import OmegaConf
from torch import nn

import lightning_kd
from lightning_kd.config import CONF_DIR, compose
from lightning_kd.engine import build_terms
from lightning_kd.losses import DistillBatch, ModelOutputs, SetupContext
from lightning_kd.losses.simkd import SimKDLoss, align_spatial, simkd_projector

TOL = {"atol": 1e-5, "rtol": 1e-5}


def setup_term(term: SimKDLoss, student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> SetupContext:
    s_map, t_map = student.features(x), teacher.features(x)
    ctx = SetupContext(
        student=ModelOutputs(student(x), {term.student_tap: s_map}),
        teacher=ModelOutputs(teacher(x), {term.teacher_tap: t_map}),
        student_model=student,
        teacher_model=teacher,
        num_classes=3,
    )
    term.setup(ctx)
    return ctx


def batch_of(term: SimKDLoss, s_map: torch.Tensor, t_map: torch.Tensor) -> DistillBatch:
    b = len(s_map)
    return DistillBatch(
        ModelOutputs(torch.zeros(b, 3), {term.student_tap: s_map}),
        ModelOutputs(torch.zeros(b, 3), {term.teacher_tap: t_map}),
    )


# --------------------------------------------------------------------------------------------------- hand-worked
def test_hand_worked_alignment_and_mse_with_an_identity_projector() -> None:
    # student 4×4 map (one channel) is average-pooled to the teacher's 2×2 before the MSE
    s = torch.arange(16.0).reshape(1, 1, 4, 4)
    t = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    pooled = [[(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4], [(8 + 9 + 12 + 13) / 4, (10 + 11 + 14 + 15) / 4]]
    assert pooled == [[2.5, 4.5], [10.5, 12.5]]
    expected = ((2.5 - 1) ** 2 + (4.5 - 2) ** 2 + (10.5 - 3) ** 2 + (12.5 - 4) ** 2) / 4
    torch.testing.assert_close(align_spatial(s, 2), torch.tensor([[pooled]]))
    term = SimKDLoss(student_layer="a", teacher_layer="b")
    term.projector, term.classifier, term.size = nn.Identity(), nn.Linear(1, 3), 2
    assert float(term(batch_of(term, s, t))) == pytest.approx(expected)
    # the teacher map is pooled instead when it is the larger one
    term.size = 2
    assert float(term(batch_of(term, t, s))) == pytest.approx(expected)


def test_projector_is_the_authors_bottleneck() -> None:
    proj = simkd_projector(8, 12, factor=2)
    convs = [m for m in proj if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (8, 6, (1, 1)),
        (6, 6, (3, 3)),
        (6, 12, (1, 1)),
    ]
    assert all(c.bias is None for c in convs)
    assert [type(m).__name__ for m in proj].count("BatchNorm2d") == 3
    assert tuple(proj(torch.randn(2, 8, 5, 5, generator=gen(0))).shape) == (2, 12, 5, 5)


# --------------------------------------------------------------------------------------------------- properties
def test_perfectly_aligned_features_reproduce_the_teacher() -> None:
    """The paper's point: with aligned features the student predicts exactly as the teacher."""
    torch.manual_seed(0)
    teacher = GapNet(6, classes=3, seed=1).eval()
    student = GapNet(6, classes=3, seed=2).eval()
    student.features.load_state_dict(teacher.features.state_dict())
    x = torch.randn(4, 3, 5, 5, generator=gen(1))
    term = SimKDLoss(student_layer="features", teacher_layer="features")
    setup_term(term, student, teacher, x)
    term.projector = nn.Identity()  # a perfect projector for identical features
    predictor = term.student_predictor(student)
    torch.testing.assert_close(predictor(x), teacher(x), **TOL)
    assert float(term(batch_of(term, student.features(x), teacher.features(x)))) == 0.0
    # the student's own (different) classifier is not what predicts
    assert not torch.allclose(student(x), teacher(x))


def test_teacher_classifier_is_a_frozen_copy_and_gradients_reach_projector_and_student() -> None:
    torch.manual_seed(0)
    teacher, student = GapNet(8, classes=3, seed=1), GapNet(4, classes=3, seed=2)
    x = torch.randn(3, 3, 6, 6, generator=gen(2))
    term = SimKDLoss(student_layer="features", teacher_layer="features")
    setup_term(term, student, teacher, x)
    assert term.classifier is not teacher.fc
    torch.testing.assert_close(term.classifier.weight, teacher.fc.weight)
    assert not any(p.requires_grad for p in term.classifier.parameters())
    trainable = {n for n, p in term.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projector.") for n in trainable)
    s_map = student.features(x)
    loss = term(batch_of(term, s_map, teacher.features(x).detach()))
    assert loss.dtype == torch.float32 and float(loss) > 0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.projector.parameters())
    assert student.features[0].weight.grad.abs().sum() > 0
    assert term.classifier.weight.grad is None and teacher.fc.weight.grad is None
    # the classifier copy is in the state_dict (checkpoints hold everything the student needs to predict)
    assert {"classifier.weight", "classifier.bias"} <= set(term.state_dict())


def test_bf16_inputs_give_a_float32_loss() -> None:
    torch.manual_seed(0)
    teacher, student = GapNet(8, classes=3, seed=1), GapNet(4, classes=3, seed=2)
    x = torch.randn(3, 3, 4, 4, generator=gen(3))
    term = SimKDLoss(student_layer="features", teacher_layer="features")
    setup_term(term, student, teacher, x)
    term.eval()
    s, t = student.features(x).detach(), teacher.features(x).detach()
    ref = term(batch_of(term, s, t))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = term(batch_of(term, s.bfloat16(), t.bfloat16()))
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, atol=0.05 * float(ref), rtol=0.05)


# --------------------------------------------------------------------------------------------------- errors
def test_errors_name_the_problem() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=gen(4))
    with pytest.raises(ValueError, match="factor"):
        SimKDLoss(factor=0)
    # a max-pooling head is not "classifier(avgpool(map))"
    with pytest.raises(ValueError, match="average-pooled"):
        setup_term(
            SimKDLoss(student_layer="features", teacher_layer="features"),
            GapNet(4, classes=3),
            GapNet(6, classes=3, pool="max"),
            x,
        )
    # vectors instead of maps
    term = SimKDLoss(student_layer="emb", teacher_layer="emb")
    ctx = SetupContext(
        ModelOutputs(torch.zeros(2, 3), {term.student_tap: torch.zeros(2, 8)}),
        ModelOutputs(torch.zeros(2, 3), {term.teacher_tap: torch.zeros(2, 8)}),
        GapNet(4, classes=3),
        GapNet(8, classes=3),
        3,
    )
    with pytest.raises(ValueError, match=r"feature maps \[B, C, H, W\]"):
        term.setup(ctx)
    # a teacher without a linear classifier
    no_head = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    term = SimKDLoss(student_layer="features", teacher_layer="0")
    ctx = SetupContext(
        ModelOutputs(torch.zeros(2, 3), {term.student_tap: torch.zeros(2, 4, 4, 4)}),
        ModelOutputs(no_head(x), {term.teacher_tap: no_head[0](x)}),
        GapNet(4, classes=3),
        no_head,
        3,
    )
    with pytest.raises(ValueError, match="get_classifier"):
        term.setup(ctx)
    with pytest.raises(RuntimeError, match="setup"):
        SimKDLoss().student_predictor(GapNet(4))


# --------------------------------------------------------------------------------------------------- config and Lightning
def test_yaml_builds_the_term_with_its_values() -> None:
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / "simkd.yaml"))
    values = yaml["terms"]["simkd"]
    assert sorted(values) == sorted(p for p in inspect.signature(SimKDLoss.__init__).parameters if p != "self")
    assert yaml["task_weight"] == 0.0
    cfg = compose(["loss=simkd"])
    term = build_terms(cfg.loss.terms)["simkd"]
    assert isinstance(term, SimKDLoss) and term.weight == 1.0 and term.factor == 2
    assert str(term.student_tap) == str(term.teacher_tap) == "stage:-1"


def test_timm_pair_through_lightning_predicts_with_the_teacher_classifier() -> None:
    student, teacher = tiny("resnet18", seed=0), tiny("resnet34", seed=1)
    module = lightning_kd.DistillationModule(student, teacher, loss="simkd", task_weight=0.0)
    trainer = fast_trainer(max_steps=2)
    trainer.fit(module, make_loader(n=16, size=32))
    assert torch.isfinite(trainer.callback_metrics["train/simkd"])
    term = module.engine.terms["simkd"]
    torch.testing.assert_close(term.classifier.weight, teacher.get_classifier().weight)
    x = torch.randn(4, 3, 32, 32, generator=gen(5))
    module.eval()
    with torch.no_grad():
        predictor = module.engine.student_predictor(module.model)
        torch.testing.assert_close(module(x), predictor(x))
        assert not torch.allclose(module(x), module.model(x))
    # the test loop (and the teacher–student agreement) uses the SimKD predictions
    metrics = trainer.test(module, make_loader(n=8, size=32), verbose=False)[0]
    assert 0.0 <= metrics["test/agreement"] <= 1.0
    # the checkpointed state holds the projector and the teacher classifier copy, not the teacher
    keys = set(module.state_dict())
    assert {"engine.terms.simkd.classifier.weight", "engine.terms.simkd.projector.0.weight"} <= keys
    assert not any(k.startswith("engine.teacher") for k in keys)
