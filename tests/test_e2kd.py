"""Explanation-enhanced KD (:mod:`lightning_kd.losses.e2kd`): hand-worked Grad-CAM and loss, properties, parity with
an independent re-implementation of the authors' pipeline (m-parchami/GoodTeachersExplain), the second-order gradient
path, bf16, errors, a real timm pair through Lightning and the YAML config (CPU)."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import GapNet, fast_trainer, gen, random_data
from omegaconf import OmegaConf
from torch import nn
from torchvision.transforms.functional import resize

import lightning_kd
from lightning_kd.config import CONF_DIR, compose
from lightning_kd.engine import DistillEngine, build_terms
from lightning_kd.losses import DistillBatch, ModelOutputs, SetupContext, create_loss
from lightning_kd.losses.e2kd import E2KDLoss, explanation_loss, grad_cam, teacher_grad_cam
from lightning_kd.taps import TapSpec

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _outputs(model: nn.Module, tap: str, x: torch.Tensor) -> ModelOutputs:
    a = model.features(x)
    tapped = model.get_submodule(tap)(x) if tap != "features" else a
    return ModelOutputs(model.forward_head(a), {TapSpec.parse(tap): tapped})


def _setup(term: E2KDLoss, student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        s, t = _outputs(student, str(term.student_tap), x), _outputs(teacher, str(term.teacher_tap), x)
    term.setup(SetupContext(s, t, student, teacher, num_classes=s.logits.shape[1]))


def _batch(term: E2KDLoss, student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> DistillBatch:
    with torch.no_grad():
        t = _outputs(teacher, str(term.teacher_tap), x)
    return DistillBatch(_outputs(student, str(term.student_tap), x), t)


def _term(**kwargs) -> E2KDLoss:
    return E2KDLoss(**{"student_layer": "features", "teacher_layer": "features", **kwargs})


# --------------------------------------------------------------------------------------------------- hand-worked
A = torch.tensor([[[1.0, 0.0], [2.0, -1.0]], [[0.0, 3.0], [-2.0, 1.0]]]).view(1, 2, 2, 2)


def _head(weight: list[list[float]], bias: list[float]) -> GapNet:
    model = GapNet(channels=2, classes=2)
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor(weight))
        model.fc.bias.copy_(torch.tensor(bias))
    return model


def test_hand_worked_grad_cam_of_gap_linear_is_relu_cam_over_hw() -> None:
    model = _head([[1.0, -1.0], [0.5, 2.0]], [3.0, -4.0])
    # class 0: ReLU(A_0 - A_1) / 4 = ReLU([[1, -3], [4, -2]]) / 4; class 1: ReLU(0.5 A_0 + 2 A_1) / 4
    class0 = torch.tensor([[0.25, 0.0], [1.0, 0.0]])
    class1 = torch.tensor([[0.125, 1.5], [0.0, 0.375]])
    cams, logits = teacher_grad_cam(model.forward_head, A.repeat(2, 1, 1, 1), torch.tensor([0, 1]))
    torch.testing.assert_close(cams[0], class0)
    torch.testing.assert_close(cams[1], class1)
    torch.testing.assert_close(logits, model.forward_head(A.repeat(2, 1, 1, 1)).detach())
    # the same through autograd on a map in a graph (the student's path)
    a = A.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model.forward_head(a)[0, 1], a, create_graph=True)
    torch.testing.assert_close(g[0], torch.tensor([0.5, 2.0]).view(2, 1, 1).expand(2, 2, 2) / 4)
    torch.testing.assert_close(grad_cam(a, g)[0], class1)


def test_hand_worked_loss_value() -> None:
    teacher = _head([[0.0, 0.0], [1.0, 0.0]], [0.0, 10.0])  # top-1 is class 1, Grad-CAM ReLU(A_0) / 4
    student = _head([[1.0, 1.0], [0.5, 2.0]], [0.0, 0.0])  # Grad-CAM of class 1: ReLU(0.5 A_0 + 2 A_1) / 4
    term = _term(temperature=2.0, explanation_weight=3.0, kd_weight=0.5)
    with torch.no_grad():
        t_logits = teacher.forward_head(A)
    s_map = A.clone().requires_grad_(True)
    s_logits = student.forward_head(s_map)
    term.setup(
        SetupContext(
            ModelOutputs(s_logits.detach(), {term.student_tap: A}),
            ModelOutputs(t_logits, {term.teacher_tap: A}),
            student,
            teacher,
            num_classes=2,
        )
    )
    parts = term(
        DistillBatch(ModelOutputs(s_logits, {term.student_tap: s_map}), ModelOutputs(t_logits, {term.teacher_tap: A}))
    )
    assert set(parts) == {"kd", "explanation"}
    t_vec, s_vec = [1.0, 0.0, 2.0, 0.0], [0.5, 6.0, 0.0, 1.5]  # row-major, the common 1/4 cancels in the cosine
    cos = sum(a * b for a, b in zip(t_vec, s_vec)) / (
        math.sqrt(sum(a * a for a in t_vec)) * math.sqrt(sum(b * b for b in s_vec))
    )
    assert float(parts["explanation"].detach()) == pytest.approx(3.0 * (1 - cos), rel=1e-6)
    # KD part: 0.5 · τ² · KL(softmax(z_T/τ) ‖ softmax(z_S/τ)), logits = W · mean(A) + b, mean(A) = (0.5, 0.5)
    z_t, z_s = [0.0, 0.5 + 10.0], [1.0, 0.25 + 1.0]
    p_t = [math.exp(v / 2) / sum(math.exp(u / 2) for u in z_t) for v in z_t]
    p_s = [math.exp(v / 2) / sum(math.exp(u / 2) for u in z_s) for v in z_s]
    kl = sum(p * math.log(p / q) for p, q in zip(p_t, p_s))
    assert float(parts["kd"].detach()) == pytest.approx(0.5 * 4 * kl, rel=1e-5)


# --------------------------------------------------------------------------------------------------- properties
def test_zero_for_identical_models_and_positive_otherwise() -> None:
    x = torch.randn(4, 3, 6, 6, generator=gen(1))
    teacher = GapNet(seed=1)
    student = copy.deepcopy(teacher)
    for map_size in (None, 12):
        term = _term(map_size=map_size)
        _setup(term, student, teacher, x)
        parts = term(_batch(term, student, teacher, x))
        assert float(parts["explanation"].detach()) < 1e-6 and float(parts["kd"].detach()) < 1e-6
    term = _term()
    other = GapNet(seed=2)
    _setup(term, other, teacher, x)
    assert float(term(_batch(term, other, teacher, x))["explanation"].detach()) > 1e-3


def test_explanation_is_invariant_to_positive_scaling_of_the_student_map() -> None:
    # Grad-CAM of GAP + linear is linear in the map, and the cosine ignores the scale
    x = torch.randn(3, 3, 6, 6, generator=gen(2))
    student, teacher = GapNet(seed=3), GapNet(seed=4)
    term = _term()
    _setup(term, student, teacher, x)
    batch = _batch(term, student, teacher, x)
    ref = term(batch)["explanation"].detach()
    assert float(ref) > 1e-3
    for c in (0.1, 7.0):
        s_map = c * student.features(x)
        scaled = DistillBatch(ModelOutputs(student.forward_head(s_map), {term.student_tap: s_map}), batch.teacher)
        torch.testing.assert_close(term(scaled)["explanation"].detach(), ref, **TOL)
    cam_s, cam_t = torch.rand(3, 4, 4, generator=gen(5)), torch.rand(3, 4, 4, generator=gen(6))
    torch.testing.assert_close(explanation_loss(5 * cam_s, 0.2 * cam_t), explanation_loss(cam_s, cam_t), **TOL)


# ------------------------------------------------------------------------------------- parity with the authors' code
def _authors_e2kd(student, teacher, x, temperature, exp_coef, logit_coef):
    """m-parchami/GoodTeachersExplain ``explanation_aware_forward`` (GRAD_CAM_POS, live teacher with
    ``no_grad_features``) + ``TeachersExplainCriterion.forward``, written out independently."""
    features = student.features(x)
    output = student.forward_head(features)
    with torch.no_grad():
        t_feat = teacher.features(x)
    t_features = t_feat.detach().requires_grad_(True)
    t_output = teacher.forward_head(t_features)
    exp_classes = torch.max(t_output, dim=-1)[1]
    rows = range(len(x))
    output[rows, exp_classes].sum().backward(inputs=[features], create_graph=True, retain_graph=True)
    cam = F.relu((features.grad.mean((2, 3), keepdim=True) * features).sum(1, keepdim=True))
    cam = resize(cam, (x.shape[-2], x.shape[-1]))
    t_output[rows, exp_classes].sum().backward(inputs=[t_features], create_graph=False, retain_graph=False)
    t_cam = F.relu((t_features.grad.mean((2, 3), keepdim=True) * t_features).sum(1, keepdim=True)).detach()
    t_cam = resize(t_cam, (x.shape[-2], x.shape[-1]))
    n = len(x)
    exp_loss = (1 - F.cosine_similarity(cam.view(n, -1), t_cam.view(n, -1))).mean()
    kl = nn.KLDivLoss(reduction="none")(
        F.log_softmax(output / temperature, dim=1), F.softmax(t_output.detach() / temperature, dim=1)
    )
    logit_loss = kl.sum(dim=-1).mean(dim=0) * temperature**2
    return exp_coef * exp_loss + logit_coef * logit_loss


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")  # the authors' own call
@pytest.mark.parametrize(("temperature", "exp_coef", "logit_coef"), [(1.0, 1.0, 1.0), (5.0, 10.0, 0.5)])
def test_matches_the_authors_pipeline(temperature: float, exp_coef: float, logit_coef: float) -> None:
    x = torch.randn(4, 3, 8, 8, generator=gen(10))
    student, teacher = GapNet(channels=8, seed=1), GapNet(channels=12, seed=2, stride=2)  # 8×8 and 4×4 maps
    expected = _authors_e2kd(student, teacher, x, temperature, exp_coef, logit_coef)
    expected_grads = torch.autograd.grad(expected, list(student.parameters()))

    term = _term(temperature=temperature, explanation_weight=exp_coef, kd_weight=logit_coef, map_size=8)
    _setup(term, student, teacher, x)
    parts = term(_batch(term, student, teacher, x))
    assert 0.05 < float(parts["explanation"].detach()) / exp_coef < 0.95  # non-degenerate maps
    value = sum(parts.values())
    torch.testing.assert_close(value, expected, **TOL)
    grads = torch.autograd.grad(value, list(student.parameters()))
    for ours, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(ours, theirs, **TOL)
    assert all(g.abs().sum() > 0 for g in grads)
    # the default (compare at the teacher map's 4×4 size, no upsampling to the image) is a documented deviation
    default = _term(temperature=temperature, explanation_weight=exp_coef, kd_weight=logit_coef)
    _setup(default, student, teacher, x)
    assert (
        abs(float(sum(default(_batch(default, student, teacher, x)).values()).detach()) - float(expected.detach()))
        > 1e-4
    )


def test_student_map_is_resized_to_the_teacher_size() -> None:
    # hand-worked bilinear upsampling (align_corners=False): columns [0, 1] -> [0, 0.25, 0.75, 1]
    cam_s = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).view(1, 2, 2)
    row = [0.0, 0.25, 0.75, 1.0]
    assert float(explanation_loss(cam_s, torch.tensor([row] * 4).view(1, 4, 4))) == pytest.approx(0.0, abs=1e-6)
    flipped = row[::-1]
    cos = sum(a * b for a, b in zip(row, flipped)) / sum(a * a for a in row)  # 0.375 / 1.625
    assert float(explanation_loss(cam_s, torch.tensor([flipped] * 4).view(1, 4, 4))) == pytest.approx(1 - cos, rel=1e-6)
    # a larger student map is resized down as torchvision's resize does (bilinear, antialiased)
    big, small = torch.rand(2, 6, 6, generator=gen(11)), torch.rand(2, 3, 3, generator=gen(12))
    down = resize(big[:, None], [3, 3])[:, 0]
    expected = (1 - F.cosine_similarity(down.flatten(1), small.flatten(1))).mean()
    torch.testing.assert_close(explanation_loss(big, small), expected, **TOL)
    # map_size resizes both
    both = (
        1 - F.cosine_similarity(resize(big[:, None], [4, 4]).flatten(1), resize(small[:, None], [4, 4]).flatten(1))
    ).mean()
    torch.testing.assert_close(explanation_loss(big, small, size=4), both, **TOL)


# ----------------------------------------------------------------------------------------- gradients and precision
def test_explanation_trains_the_student_through_the_second_order_path_never_the_teacher() -> None:
    x = torch.randn(4, 3, 6, 6, generator=gen(20))
    student, teacher = GapNet(seed=7), GapNet(channels=6, seed=8)  # the teacher is left trainable here
    term = _term(kd_weight=0.0)
    _setup(term, student, teacher, x)
    assert list(term.parameters()) == [] and term.state_dict() == {}  # the teacher's head is borrowed, not owned
    parts = term(_batch(term, student, teacher, x))
    assert float(parts["kd"].detach()) == 0.0
    parts["explanation"].backward()
    # the map does not depend on fc, so fc's gradient can only come through α = ∂z/∂A (the double backward)
    assert student.fc.weight.grad is not None and student.fc.weight.grad.abs().sum() > 0
    assert student.fc.bias.grad is None or float(student.fc.bias.grad.abs().sum()) == 0.0
    assert student.features[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_bf16_inputs_give_float32_close_to_the_float32_computation() -> None:
    x = torch.randn(4, 3, 6, 6, generator=gen(21))
    student, teacher = GapNet(seed=9), GapNet(seed=10)
    term = _term()
    _setup(term, student, teacher, x)

    def run(dtype: torch.dtype) -> dict[str, torch.Tensor]:
        s_map = student.features(x).to(torch.bfloat16).to(dtype)  # same rounded values in both runs
        with torch.no_grad():
            t_map = teacher.features(x).to(torch.bfloat16).to(dtype)
            t_logits = teacher.forward_head(t_map.float()).to(dtype)
        s_logits = student.forward_head(s_map.float()).to(dtype)
        return term(
            DistillBatch(
                ModelOutputs(s_logits, {term.student_tap: s_map}), ModelOutputs(t_logits, {term.teacher_tap: t_map})
            )
        )

    low, ref = run(torch.bfloat16), run(torch.float32)
    for name in ("kd", "explanation"):
        assert low[name].dtype == torch.float32
        torch.testing.assert_close(low[name], ref[name], atol=2e-2, rtol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = term(_batch(term, student, teacher, x))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in parts.values())


# --------------------------------------------------------------------------------------------------- errors
def test_teacher_head_is_required_and_must_reproduce_the_logits() -> None:
    x = torch.randn(2, 3, 6, 6, generator=gen(30))
    student = GapNet(seed=11)
    plain = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)),
    )
    term = E2KDLoss(student_layer="features", teacher_layer="0")
    with torch.no_grad():
        s = _outputs(student, "features", x)
        t = ModelOutputs(plain(x), {term.teacher_tap: plain[0](x)})
    with pytest.raises(ValueError, match=r"Sequential has no timm forward_head\(\).*'0'.*teacher_head="):
        term.setup(SetupContext(s, t, student, plain, num_classes=5))
    ok = E2KDLoss(student_layer="features", teacher_layer="0", teacher_head="1")  # a module path instead
    ok.setup(SetupContext(s, ModelOutputs(t.logits, {ok.teacher_tap: t[term.teacher_tap]}), student, plain, 5))
    with pytest.raises(ValueError, match="teacher_head: Sequential has no layer 'head'"):
        E2KDLoss(student_layer="features", teacher_layer="0", teacher_head="head").setup(
            SetupContext(s, ModelOutputs(t.logits, {ok.teacher_tap: t[term.teacher_tap]}), student, plain, 5)
        )
    teacher = GapNet(seed=12)
    wrong = _term(teacher_layer="features.0")  # the pre-ReLU conv output: forward_head(tap) != logits
    with pytest.raises(
        ValueError,
        match=r"tapped map 'features.0' does not reproduce the teacher's logits \(max difference",
    ):
        _setup(wrong, student, teacher, x)
    not_logits = _term(teacher_head="features.1")  # maps the map to a map
    with pytest.raises(ValueError, match=r"maps the tapped map 'features' to \(2, 4, 6, 6\), not to logits"):
        _setup(not_logits, student, teacher, x)
    failing = _term(teacher_head="fc")  # a Linear on a [B, C, H, W] map
    with pytest.raises(ValueError, match="head fails on the tapped map 'features'"):
        _setup(failing, student, teacher, x)


def test_timm_teacher_head_check() -> None:
    torch.manual_seed(0)
    student, teacher = timm.create_model("resnet18", num_classes=5), timm.create_model("resnet18", num_classes=5)
    x = torch.randn(2, 3, 64, 64, generator=gen(31))
    DistillEngine("e2kd", teacher).setup(student, x, student)  # forward_head(layer4) reproduces the logits
    bad = DistillEngine({"e2kd": {"teacher_layer": "stage:-2"}}, copy.deepcopy(teacher))
    with pytest.raises(ValueError, match=r"'stage:-2'.*for ResNets stage:-1 = layer4"):
        bad.setup(student, x, student)


def test_student_map_must_feed_the_logits_in_a_graph() -> None:
    x = torch.randn(2, 3, 6, 6, generator=gen(32))
    student, teacher = GapNet(seed=13), GapNet(seed=14)
    term = _term()
    _setup(term, student, teacher, x)
    batch = _batch(term, student, teacher, x)
    unrelated = torch.randn(2, 4, 6, 6, requires_grad=True)
    detached = DistillBatch(ModelOutputs(batch.student.logits, {term.student_tap: unrelated}), batch.teacher)
    with pytest.raises(ValueError, match="do not depend on its tapped map 'features'"):
        term(detached)
    with torch.no_grad():
        frozen = _batch(term, student, teacher, x)
    with pytest.raises(RuntimeError, match="no autograd graph"):
        term(frozen)
    with pytest.raises(RuntimeError, match="setup"):
        _term()(batch)


def test_bad_arguments_non_map_taps_and_one_by_one_maps() -> None:
    with pytest.raises(ValueError, match="temperature"):
        E2KDLoss(temperature=0)
    with pytest.raises(ValueError, match="explanation_weight"):
        E2KDLoss(explanation_weight=-1)
    with pytest.raises(ValueError, match="kd_weight"):
        E2KDLoss(kd_weight=float("nan"))
    with pytest.raises(ValueError, match="map_size"):
        E2KDLoss(map_size=0)
    x = torch.randn(2, 3, 6, 6, generator=gen(33))
    student, teacher = GapNet(seed=15), GapNet(seed=16)
    term = E2KDLoss(student_layer="fc:input", teacher_layer="features")
    with torch.no_grad():
        s = ModelOutputs(student(x), {term.student_tap: student.features(x).mean(dim=(2, 3))})
        t = _outputs(teacher, "features", x)
    with pytest.raises(ValueError, match=r"student tap 'fc:input' gives \(2, 4\).*\[B, C, H, W\]"):
        term.setup(SetupContext(s, t, student, teacher, num_classes=5))
    x = torch.randn(2, 3, 2, 2, generator=gen(34))
    with pytest.warns(UserWarning, match="1×1"):
        _setup(_term(), GapNet(seed=17, stride=2), GapNet(seed=18, stride=2), x)


# ----------------------------------------------------------------------------------------------- config and Lightning
def test_yaml_builds_the_term_with_its_values() -> None:
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / "e2kd.yaml"))
    values = yaml["terms"]["e2kd"]
    assert sorted(values) == sorted(p for p in inspect.signature(E2KDLoss.__init__).parameters if p != "self")
    assert yaml["task_weight"] == 0.0
    cfg = compose(["loss=e2kd"])
    term = build_terms(cfg.loss.terms)["e2kd"]
    assert isinstance(term, E2KDLoss)
    assert term.weight == values["weight"] == 1.0
    assert term.temperature == values["temperature"] == 1.0
    assert term.explanation_weight == values["explanation_weight"] == 1.0
    assert term.kd_weight == values["kd_weight"] == 1.0
    assert str(term.student_tap) == values["student_layer"] == "stage:-1"
    assert str(term.teacher_tap) == values["teacher_layer"] == "stage:-1"
    assert term.teacher_head_path is values["teacher_head"] is None
    assert term.map_size is values["map_size"] is None
    assert isinstance(create_loss("e2kd"), E2KDLoss)


def test_timm_resnet_pair_through_lightning() -> None:
    torch.manual_seed(0)
    student = timm.create_model("resnet18", num_classes=10)
    teacher = timm.create_model("resnet34", num_classes=10)
    module = lightning_kd.DistillationModule(student, teacher, loss="e2kd", task_weight=0.0)
    data = random_data(n=8, size=64)
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    trainer = fast_trainer(max_steps=1)
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    for key in ("train/e2kd", "train/e2kd/kd", "train/e2kd/explanation"):
        assert key in metrics and math.isfinite(float(metrics[key])), key
    assert float(metrics["train/e2kd/explanation"]) > 0
    torch.testing.assert_close(
        metrics["train/e2kd/kd"] + metrics["train/e2kd/explanation"], metrics["train/e2kd"], **TOL
    )
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), teacher_before))
