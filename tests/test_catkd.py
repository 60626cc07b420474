"""Class attention transfer (:mod:`lightning_kd.losses.catkd`): hand-worked CAMs and losses, CAM properties, parity
with an independent re-implementation of the authors' pipeline (GzyAftermath/CAT-KD), class selection vs. the authors'
mask, gradients, bf16, errors, a real timm pair through Lightning and the YAML config (CPU)."""

from __future__ import annotations

import copy
import inspect
import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import GapNet, fast_trainer, gen, random_data
from omegaconf import OmegaConf
from torch import nn

import lightning_kd
from lightning_kd.config import CONF_DIR, compose
from lightning_kd.engine import DistillEngine, build_terms
from lightning_kd.losses import DistillBatch, ModelOutputs, SetupContext, create_loss
from lightning_kd.losses.catkd import CATKDLoss, binarize_cams, cat_loss, class_activation_maps, select_cams
from lightning_kd.taps import TapSpec

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _outputs(model: nn.Module, tap: str, x: torch.Tensor) -> ModelOutputs:
    a = model.get_submodule(tap)(x) if tap != "features" else model.features(x)
    return ModelOutputs(model.fc(model.features(x).mean(dim=(2, 3))), {TapSpec.parse(tap): a})


def _setup(term: CATKDLoss, student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        s, t = _outputs(student, str(term.student_tap), x), _outputs(teacher, str(term.teacher_tap), x)
    term.setup(SetupContext(s, t, student, teacher, num_classes=s.logits.shape[1]))


def _batch(term: CATKDLoss, student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> DistillBatch:
    with torch.no_grad():
        t = _outputs(teacher, str(term.teacher_tap), x)
    return DistillBatch(_outputs(student, str(term.student_tap), x), t)


def _maps_batch(term: CATKDLoss, s_map, t_map, t_logits=None) -> DistillBatch:
    b = len(s_map)
    t_logits = torch.zeros(b, 2) if t_logits is None else t_logits
    return DistillBatch(
        ModelOutputs(torch.zeros(b, t_logits.shape[1]), {term.student_tap: s_map}),
        ModelOutputs(t_logits, {term.teacher_tap: t_map}),
    )


def _ctx_for_maps(term: CATKDLoss, s_map, t_map, s_head: nn.Linear, t_head: nn.Linear) -> SetupContext:
    k = s_head.out_features
    s_model, t_model = nn.Sequential(nn.Identity(), s_head), nn.Sequential(nn.Identity(), t_head)
    with torch.no_grad():
        t_logits = t_head(t_map.mean(dim=(2, 3)))
    return SetupContext(
        ModelOutputs(torch.zeros(len(s_map), k), {term.student_tap: s_map}),
        ModelOutputs(t_logits, {term.teacher_tap: t_map}),
        s_model,
        t_model,
        num_classes=k,
    )


# --------------------------------------------------------------------------------------------------- hand-worked
def test_hand_worked_two_classes_one_channel() -> None:
    a_s = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    a_t = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    s_head, t_head = nn.Linear(1, 2), nn.Linear(1, 2)
    with torch.no_grad():
        s_head.weight.copy_(torch.tensor([[2.0], [-1.0]]))
        s_head.bias.copy_(torch.tensor([5.0, 7.0]))  # the bias is not part of the CAMs
        t_head.weight.copy_(torch.tensor([[1.0], [1.0]]))
    # CAM_k = W[k, 0] · A
    cams = class_activation_maps(a_s, s_head.weight)
    torch.testing.assert_close(cams[0, 0], torch.tensor([[2.0, 4.0], [6.0, 8.0]]))
    torch.testing.assert_close(cams[0, 1], torch.tensor([[-1.0, -2.0], [-3.0, -4.0]]))
    # resolution 2 on 2×2 maps: plain MSE over 2 classes × 4 positions
    diff0 = [2 - 0, 4 - 1, 6 - 1, 8 - 0]
    diff1 = [-1 - 0, -2 - 1, -3 - 1, -4 - 0]
    expected = sum(d * d for d in diff0 + diff1) / 8  # (4+9+25+64 + 1+9+16+16) / 8 = 18
    assert expected == 18.0
    term = CATKDLoss(student_layer="s", teacher_layer="t")
    term.setup(_ctx_for_maps(term, a_s, a_t, s_head, t_head))
    assert float(term(_maps_batch(term, a_s, a_t)).detach()) == pytest.approx(expected, rel=1e-6)
    # resolution 1: pooled CAMs 5 and -2.5 against 0.5 and 0.5
    expected_r1 = ((5 - 0.5) ** 2 + (-2.5 - 0.5) ** 2) / 2
    term1 = CATKDLoss(student_layer="s", teacher_layer="t", resolution=1)
    term1.setup(_ctx_for_maps(term1, a_s, a_t, s_head, t_head))
    assert float(term1(_maps_batch(term1, a_s, a_t)).detach()) == pytest.approx(expected_r1, rel=1e-6)
    # normalised: each class map divided by its L2 norm over the positions
    n0, n1, nt = math.sqrt(4 + 16 + 36 + 64), math.sqrt(1 + 4 + 9 + 16), math.sqrt(2)
    s0, s1, t0 = [v / n0 for v in (2, 4, 6, 8)], [v / n1 for v in (-1, -2, -3, -4)], [v / nt for v in (0, 1, 1, 0)]
    expected_n = (sum((a - b) ** 2 for a, b in zip(s0, t0)) + sum((a - b) ** 2 for a, b in zip(s1, t0))) / 8
    termn = CATKDLoss(student_layer="s", teacher_layer="t", normalize=True)
    termn.setup(_ctx_for_maps(termn, a_s, a_t, s_head, t_head))
    assert float(termn(_maps_batch(termn, a_s, a_t)).detach()) == pytest.approx(expected_n, rel=1e-6)


def test_hand_worked_binarization_threshold_is_mean_absolute_activation() -> None:
    cams = torch.tensor([[1.0, -3.0], [2.0, 0.0]]).view(1, 1, 2, 2)  # mean |CAM| = 6 / 4 = 1.5
    torch.testing.assert_close(binarize_cams(cams)[0, 0], torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    # the plain spatial mean (0) would have kept 1 and 2
    assert float(binarize_cams(cams).sum()) == 1.0


# --------------------------------------------------------------------------------------------------- properties
def test_cams_of_a_timm_resnet_average_to_its_logits_and_setup_does_not_warn() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64, generator=gen(0))
    with torch.no_grad():
        feats = model.forward_features(x)
        cams = class_activation_maps(feats, model.fc.weight)
        logits = model(x)
    assert cams.shape == (2, 7, 2, 2)
    torch.testing.assert_close(cams.mean(dim=(2, 3)) + model.fc.bias, logits, atol=1e-4, rtol=1e-4)
    # the default taps resolve to that map on a timm pair: no 1×1 and no "not CAMs" warning at 64×64
    engine = DistillEngine("catkd", copy.deepcopy(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.setup(model, x, model)


def test_zero_for_identical_models_and_positive_otherwise() -> None:
    x = torch.randn(3, 3, 6, 6, generator=gen(1))
    teacher = GapNet(seed=1)
    student = copy.deepcopy(teacher)
    for kwargs in [
        {},
        {"normalize": True},
        {"resolution": 3},
        {"num_cams": 2},
        {"num_cams": 2, "cam_selection": "bottom"},
    ]:
        term = CATKDLoss(student_layer="features", teacher_layer="features", **kwargs)
        _setup(term, student, teacher, x)
        assert float(term(_batch(term, student, teacher, x)).detach()) < 1e-12, kwargs
    term = CATKDLoss(student_layer="features", teacher_layer="features")
    other = GapNet(seed=2)
    _setup(term, other, teacher, x)
    assert float(term(_batch(term, other, teacher, x)).detach()) > 1e-4


def test_normalized_loss_is_invariant_to_positive_scaling_of_the_student_map() -> None:
    s = torch.randn(2, 4, 4, 4, generator=gen(2))
    t = torch.randn(2, 6, 2, 2, generator=gen(3))
    w_s, w_t = torch.randn(5, 4, generator=gen(4)), torch.randn(5, 6, generator=gen(5))
    ref = cat_loss(class_activation_maps(s, w_s), class_activation_maps(t, w_t), 2, normalize=True)
    for c in (0.1, 3.0, 40.0):
        scaled = cat_loss(class_activation_maps(c * s, w_s), class_activation_maps(t, w_t), 2, normalize=True)
        torch.testing.assert_close(scaled, ref, **TOL)
    raw = cat_loss(class_activation_maps(s, w_s), class_activation_maps(t, w_t), 2)
    raw3 = cat_loss(class_activation_maps(3 * s, w_s), class_activation_maps(t, w_t), 2)
    assert abs(float(raw3) - float(raw)) > 1e-3


# ------------------------------------------------------------------------------------- parity with the authors' code
def _authors_cat(stu_map, tea_map, w_s, w_t, resolution, normalize, binarize):
    """GzyAftermath/CAT-KD ``CAT_KD.forward_train`` + ``CAT_loss``, written out independently: CAMs from a bias-free
    1×1 convolution, binarisation with the L1-norm threshold, adaptive pooling, ``F.normalize(dim=(2, 3))``, MSE."""
    stu = F.conv2d(stu_map, w_s[:, :, None, None])
    tea = F.conv2d(tea_map, w_t[:, :, None, None])
    if binarize:
        h, w = tea.shape[2:]
        threshold = torch.norm(tea, dim=(2, 3), keepdim=True, p=1) / (h * w)
        tea = F.relu(tea - threshold).bool() * torch.ones_like(tea)
    stu = F.adaptive_avg_pool2d(stu, (resolution, resolution))
    tea = F.adaptive_avg_pool2d(tea, (resolution, resolution))
    if normalize:
        stu, tea = F.normalize(stu, dim=(2, 3)), F.normalize(tea, dim=(2, 3))
    return F.mse_loss(stu, tea)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("binarize", [False, True])
@pytest.mark.parametrize("resolution", [1, 2, 4])
def test_matches_the_authors_formulation(normalize: bool, binarize: bool, resolution: int) -> None:
    # different widths and resolutions on the two sides (the authors' heterogeneous pairs)
    s_map = torch.randn(3, 4, 8, 8, generator=gen(10))
    t_map = torch.randn(3, 6, 4, 4, generator=gen(11))
    s_head, t_head = nn.Linear(4, 5), nn.Linear(6, 5)
    with torch.no_grad():
        s_head.weight.copy_(torch.randn(5, 4, generator=gen(12)))
        t_head.weight.copy_(torch.randn(5, 6, generator=gen(13)))
    s_ref = s_map.clone().requires_grad_(True)
    w_ref = s_head.weight.detach().clone().requires_grad_(True)
    expected = _authors_cat(s_ref, t_map, w_ref, t_head.weight.detach(), resolution, normalize, binarize)
    expected.backward()

    term = CATKDLoss(
        student_layer="s", teacher_layer="t", resolution=resolution, normalize=normalize, binarize=binarize
    )
    term.setup(_ctx_for_maps(term, s_map, t_map, s_head, t_head))
    s_ours = s_map.clone().requires_grad_(True)
    value = term(_maps_batch(term, s_ours, t_map, torch.zeros(3, 5)))
    torch.testing.assert_close(value, expected, **TOL)
    assert float(value.detach()) > 1e-4
    value.backward()
    torch.testing.assert_close(s_ours.grad, s_ref.grad, **TOL)
    torch.testing.assert_close(s_head.weight.grad, w_ref.grad, **TOL)


def test_class_selection_keeps_exactly_num_cams_unlike_the_authors_mask() -> None:
    b, k, x = 2, 100, 75  # the authors' CIFAR-100 "only transfer certain classes" config: CAMs_Nums 75
    logits = torch.randn(b, k, generator=gen(20))  # no ties
    cams_s, cams_t = torch.randn(b, k, 2, 2, generator=gen(21)), torch.randn(b, k, 2, 2, generator=gen(22))
    for selection, largest in [("top", True), ("bottom", False)]:
        sel_s, sel_t = select_cams(cams_s, cams_t, logits, x, selection)
        assert sel_s.shape == sel_t.shape == (b, x, 2, 2)
        idx = logits.topk(x, dim=1, largest=largest).indices
        for i in range(b):
            torch.testing.assert_close(sel_s[i], cams_s[i, idx[i]])
            torch.testing.assert_close(sel_t[i], cams_t[i, idx[i]])
    ordered = torch.sort(logits, descending=True)[0]
    # authors' Strategy 0: relu(logits - the x-th largest) > 0 keeps x - 1 classes
    top_mask = F.relu(logits - ordered[:, x - 1].view(b, 1)).bool()
    assert top_mask.sum(1).tolist() == [x - 1] * b
    # authors' Strategy 1: ~(logits > the (100 - x)-th largest, index 99 - x) keeps x + 1 classes
    bottom_mask = ~F.relu(logits - ordered[:, 99 - x].view(b, 1)).bool()
    assert bottom_mask.sum(1).tolist() == [x + 1] * b
    # our selection equals the authors' masking with a mask of exactly the top x classes
    exact = F.relu(logits - ordered[:, x].view(b, 1)).bool()
    sel_s, sel_t = select_cams(cams_s, cams_t, logits, x, "top")
    masked_s = torch.masked_select(cams_s, exact[:, :, None, None].expand_as(cams_s)).view(b, x, 2, 2)
    masked_t = torch.masked_select(cams_t, exact[:, :, None, None].expand_as(cams_t)).view(b, x, 2, 2)
    torch.testing.assert_close(cat_loss(sel_s, sel_t, 2), F.mse_loss(masked_s, masked_t), **TOL)


# ----------------------------------------------------------------------------------------- gradients and precision
def test_gradients_reach_the_student_map_and_classifier_never_the_teacher() -> None:
    x = torch.randn(4, 3, 6, 6, generator=gen(30))
    student, teacher = GapNet(channels=4, seed=3), GapNet(channels=6, seed=4)  # teacher left trainable
    term = CATKDLoss(student_layer="features", teacher_layer="features")
    _setup(term, student, teacher, x)
    assert list(term.parameters()) == [] and term.state_dict() == {}  # classifiers are borrowed, not owned
    batch = _batch(term, student, teacher, x)
    s_map = batch.student["features"]
    s_map.retain_grad()
    value = term(batch)
    assert value.dtype == torch.float32
    value.backward()
    assert s_map.grad is not None and s_map.grad.abs().sum() > 0
    assert student.fc.weight.grad is not None and student.fc.weight.grad.abs().sum() > 0
    assert student.fc.bias.grad is None  # the CAMs have no bias
    assert student.features[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_bf16_inputs_give_float32_equal_to_the_float32_computation() -> None:
    s = torch.randn(2, 4, 4, 4, generator=gen(40)).bfloat16()
    t = torch.randn(2, 6, 4, 4, generator=gen(41)).bfloat16()
    w_s, w_t = torch.randn(5, 4, generator=gen(42)), torch.randn(5, 6, generator=gen(43))
    out = cat_loss(class_activation_maps(s, w_s), class_activation_maps(t, w_t), 2, normalize=True)
    assert out.dtype == torch.float32
    ref = cat_loss(class_activation_maps(s.float(), w_s), class_activation_maps(t.float(), w_t), 2, normalize=True)
    torch.testing.assert_close(out, ref, **TOL)
    # under autocast the CAMs are still computed in float32
    s32, t32 = torch.randn(2, 4, 4, 4, generator=gen(44)), torch.randn(2, 6, 4, 4, generator=gen(45))
    ref32 = cat_loss(class_activation_maps(s32, w_s), class_activation_maps(t32, w_t), 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = cat_loss(class_activation_maps(s32, w_s), class_activation_maps(t32, w_t), 2)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, ref32, **TOL)


# --------------------------------------------------------------------------------------------------- errors
def test_channel_mismatch_names_the_tap_shape_and_classifier() -> None:
    x = torch.randn(2, 3, 6, 6, generator=gen(50))
    teacher = GapNet(channels=6, seed=6)

    class Wider(GapNet):  # a tap whose width is not the classifier's
        def __init__(self) -> None:
            super().__init__(channels=4, seed=5)
            self.extra = nn.Conv2d(3, 8, 1)

    wide = Wider()
    term = CATKDLoss(student_layer="extra", teacher_layer="features")
    with torch.no_grad():
        s = ModelOutputs(wide(x), {term.student_tap: wide.extra(x)})
        t = _outputs(teacher, "features", x)
    with pytest.raises(ValueError) as err:
        term.setup(SetupContext(s, t, wide, teacher, num_classes=5))
    for piece in ("catkd", "student", "'extra'", "8 channels", "(2, 8, 6, 6)", "'fc'", "4 features", "stage:-1"):
        assert piece in str(err.value), str(err.value)


def test_classifier_must_be_linear_and_exist() -> None:
    x = torch.randn(2, 3, 6, 6, generator=gen(51))
    student, teacher = GapNet(seed=7), GapNet(seed=8)
    term = CATKDLoss(student_layer="features", teacher_layer="features", student_classifier="features")
    with pytest.raises(ValueError, match=r"student's classifier 'features' is Sequential, not a linear layer"):
        _setup(term, student, teacher, x)
    term = CATKDLoss(student_layer="features", teacher_layer="features", teacher_classifier="head")
    with pytest.raises(ValueError, match="cannot find the teacher's classifier.*teacher_classifier"):
        _setup(term, student, teacher, x)
    headless = nn.Sequential(nn.Conv2d(3, 4, 3))
    term = CATKDLoss(student_layer="features", teacher_layer="0")
    with torch.no_grad():
        s = _outputs(student, "features", x)
        t = ModelOutputs(torch.zeros(2, 5), {term.teacher_tap: headless(x)})
    with pytest.raises(ValueError, match="cannot find the teacher's classifier"):
        term.setup(SetupContext(s, t, student, headless, num_classes=5))


def test_bad_arguments_and_non_map_taps() -> None:
    with pytest.raises(ValueError, match="resolution"):
        CATKDLoss(resolution=0)
    with pytest.raises(ValueError, match="num_cams"):
        CATKDLoss(num_cams=0)
    with pytest.raises(ValueError, match="cam_selection"):
        CATKDLoss(cam_selection="middle")
    x = torch.randn(2, 3, 6, 6, generator=gen(52))
    student, teacher = GapNet(seed=9), GapNet(seed=10)
    term = CATKDLoss(student_layer="features", teacher_layer="features", num_cams=6)
    with pytest.raises(ValueError, match="num_cams = 6 exceeds the 5 classes"):
        _setup(term, student, teacher, x)
    term = CATKDLoss(student_layer="fc:input", teacher_layer="features")
    with torch.no_grad():
        s = ModelOutputs(student(x), {term.student_tap: student.features(x).mean(dim=(2, 3))})
        t = _outputs(teacher, "features", x)
    with pytest.raises(ValueError, match=r"student tap 'fc:input' gives \(2, 4\).*\[B, C, H, W\]"):
        term.setup(SetupContext(s, t, student, teacher, num_classes=5))
    fresh = CATKDLoss(student_layer="features", teacher_layer="features")
    with pytest.raises(RuntimeError, match="setup"):
        fresh(_batch(fresh, student, teacher, x))


def test_warns_for_one_by_one_maps_and_for_maps_that_are_not_the_pooled_one() -> None:
    x = torch.randn(2, 3, 2, 2, generator=gen(53))
    student, teacher = GapNet(seed=11, stride=2), GapNet(seed=12, stride=2)  # 1×1 maps
    term = CATKDLoss(student_layer="features", teacher_layer="features")
    with pytest.warns(UserWarning, match="1×1"):
        _setup(term, student, teacher, x)
    x = torch.randn(2, 3, 6, 6, generator=gen(54))
    term = CATKDLoss(student_layer="features", teacher_layer="features.0")  # the pre-ReLU conv output
    with pytest.warns(UserWarning, match="do not average to its logits"):
        _setup(term, GapNet(seed=13), GapNet(seed=14), x)


# ----------------------------------------------------------------------------------------------- config and Lightning
def test_yaml_builds_the_term_with_its_values() -> None:
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / "catkd.yaml"))
    values = yaml["terms"]["catkd"]
    assert sorted(values) == sorted(p for p in inspect.signature(CATKDLoss.__init__).parameters if p != "self")
    assert yaml["task_weight"] == 1.0
    cfg = compose(["loss=catkd"])
    term = build_terms(cfg.loss.terms)["catkd"]
    assert isinstance(term, CATKDLoss)
    assert term.weight == values["weight"] == 15.0
    assert term.resolution == values["resolution"] == 2
    assert term.normalize is values["normalize"] is False and term.binarize is values["binarize"] is False
    assert term.num_cams is values["num_cams"] is None and term.cam_selection == values["cam_selection"] == "top"
    assert str(term.student_tap) == values["student_layer"] == "stage:-1"
    assert str(term.teacher_tap) == values["teacher_layer"] == "stage:-1"
    assert term.student_classifier_path is values["student_classifier"] is None
    assert term.teacher_classifier_path is values["teacher_classifier"] is None
    assert isinstance(create_loss("catkd"), CATKDLoss)


def test_timm_resnet_pair_through_lightning() -> None:
    torch.manual_seed(0)
    student = timm.create_model("resnet18", num_classes=10)
    teacher = timm.create_model("resnet34", num_classes=10)
    module = lightning_kd.DistillationModule(student, teacher, loss="catkd")
    data = random_data(n=8, size=64)
    fc_before = student.fc.weight.detach().clone()
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    trainer = fast_trainer(max_steps=1)
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    assert "train/catkd" in metrics
    assert math.isfinite(float(metrics["train/catkd"])) and float(metrics["train/catkd"]) > 0
    assert module.engine.terms["catkd"].state_dict() == {}
    assert not torch.equal(student.fc.weight, fc_before)
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), teacher_before))
