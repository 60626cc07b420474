"""CIFAR distillation model zoo (:mod:`lightning_kd.zoo`): registration in timm, parameter counts against
RepDistiller's definitions and the published ones, shapes, feature_info through the taps, timm's classifier API,
checkpoints in RepDistiller's format and this package's, ``pretrained=True`` refusal, the app config, and one
distillation step (CPU)."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from conftest import fast_trainer, random_data

import lightning_kd
from lightning_kd.app import build_model
from lightning_kd.config import compose
from lightning_kd.models import create_model, load_model_file, save_model_file
from lightning_kd.taps import LayerTaps
from lightning_kd.zoo import CIFAR_MODELS, CifarNet, NoPretrainedWeightsError

#: Exact parameter counts (100-class heads) of RepDistiller's definitions (HobbitLong/RepDistiller b84f547,
#: ``models/__init__.py`` ``model_dict[...](num_classes=100)``), measured by instantiating their modules; mdistiller's
#: copies (a08d46f) have the same state_dict keys and shapes. Key lists, shapes and outputs were compared too.
REPDISTILLER_PARAMS = {
    "resnet8x4": 1_233_540,  # model_dict["resnet8x4"]
    "resnet32x4": 7_433_860,  # model_dict["resnet32x4"]
    "resnet20": 278_324,  # model_dict["resnet20"]
    "resnet32": 472_756,  # model_dict["resnet32"]
    "resnet56": 861_620,  # model_dict["resnet56"]
    "resnet110": 1_736_564,  # model_dict["resnet110"]
    "wrn_16_2": 703_284,  # model_dict["wrn_16_2"]
    "wrn_40_1": 569_780,  # model_dict["wrn_40_1"]
    "wrn_40_2": 2_255_156,  # model_dict["wrn_40_2"]
    "vgg8_cifar": 3_965_028,  # model_dict["vgg8"] (vgg8_bn)
    "vgg13_cifar": 9_462_180,  # model_dict["vgg13"] (vgg13_bn)
    "mobilenetv2_cifar": 812_836,  # model_dict["MobileNetV2"] (mobile_half)
    "shufflenetv1_cifar": 949_258,  # model_dict["ShuffleV1"]
    "shufflenetv2_cifar": 1_355_528,  # model_dict["ShuffleV2"]
}

#: Published parameter counts (millions) and how they were counted: (name, num_classes, without the 1x1 projection
#: shortcuts, decimals, value, source). No published count was found for resnet8x4, resnet32x4, vgg8, vgg13, the
#: CIFAR MobileNetV2 and the ShuffleNets (searched: RepDistiller, mdistiller, HSAKD, MCL, SimKD READMEs); for those
#: the exact RepDistiller count above is the reference.
PUBLISHED = [
    # He et al., "Deep Residual Learning", CVPR 2016, Table 6 (CIFAR-10; option-A zero-padding shortcuts, so the
    # 1x1 projections of RepDistiller's option B are left out of the count)
    ("resnet20", 10, True, 2, 0.27, "He et al. 2016, Table 6"),
    ("resnet32", 10, True, 2, 0.46, "He et al. 2016, Table 6"),
    ("resnet56", 10, True, 2, 0.85, "He et al. 2016, Table 6"),
    ("resnet110", 10, True, 1, 1.7, "He et al. 2016, Table 6"),
    # Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016, Table 4 (one count for CIFAR-10/100; it matches the
    # 10-class head: the 100-class WRN-40-2 has 2.26M)
    ("wrn_40_1", 10, False, 1, 0.6, "WRN paper, Table 4"),
    ("wrn_40_2", 10, False, 1, 2.2, "WRN paper, Table 4"),
    # Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019: clovaai/overhaul-distillation
    # README.md, CIFAR-100 settings table (student sizes)
    ("wrn_16_2", 100, False, 2, 0.70, "clovaai/overhaul-distillation README"),
    ("resnet56", 100, False, 2, 0.86, "clovaai/overhaul-distillation README"),
]

# RepDistiller's feature maps at 32x32: (channels, side) of feat[0], feat[1], ... (pooled vector excluded)
FEATURE_SHAPES = {
    "resnet8x4": [(32, 32), (64, 32), (128, 16), (256, 8)],
    "resnet32x4": [(32, 32), (64, 32), (128, 16), (256, 8)],
    "resnet20": [(16, 32), (16, 32), (32, 16), (64, 8)],
    "resnet32": [(16, 32), (16, 32), (32, 16), (64, 8)],
    "resnet56": [(16, 32), (16, 32), (32, 16), (64, 8)],
    "resnet110": [(16, 32), (16, 32), (32, 16), (64, 8)],
    "wrn_16_2": [(16, 32), (32, 32), (64, 16), (128, 8)],
    "wrn_40_1": [(16, 32), (16, 32), (32, 16), (64, 8)],
    "wrn_40_2": [(16, 32), (32, 32), (64, 16), (128, 8)],
    "vgg8_cifar": [(64, 32), (128, 16), (256, 8), (512, 4), (512, 4)],
    "vgg13_cifar": [(64, 32), (128, 16), (256, 8), (512, 4), (512, 4)],
    "mobilenetv2_cifar": [(16, 16), (12, 16), (16, 8), (48, 4), (160, 2)],
    "shufflenetv1_cifar": [(24, 32), (240, 16), (480, 8), (960, 4)],
    "shufflenetv2_cifar": [(24, 32), (116, 16), (232, 8), (464, 4)],
}


def n_params(model: torch.nn.Module, skip_projections: bool = False) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if not (skip_projections and ".downsample." in name))


def test_names_are_registered_in_timm() -> None:
    assert set(CIFAR_MODELS) == set(REPDISTILLER_PARAMS) and len(CIFAR_MODELS) == 14
    assert all(timm.is_model(name) for name in CIFAR_MODELS)
    assert set(CIFAR_MODELS) <= set(timm.list_models())
    assert "resnet8x4" in timm.list_models(module="cifar_resnet")


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_model_counts_shapes_and_feature_taps(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name)  # defaults: 100 classes, 3x32x32
    assert isinstance(model, CifarNet)
    assert n_params(model) == REPDISTILLER_PARAMS[name]
    cfg = model.pretrained_cfg
    assert cfg["num_classes"] == 100 and cfg["input_size"] == (3, 32, 32)
    assert not cfg.get("url") and not cfg.get("hf_hub_id")
    assert model.get_submodule(cfg["classifier"]).out_features == 100

    shapes = FEATURE_SHAPES[name]
    assert [(f["num_chs"], 32 // f["reduction"]) for f in model.feature_info] == shapes
    specs = [f"stage:{i}" for i in range(len(shapes))] + ["embedding", "logits"]
    taps = LayerTaps(model, specs)
    x = torch.randn(2, 3, 32, 32)
    with taps.capture():
        out = model(x)
    got = {str(k): v for k, v in taps.pop().items()}
    taps.remove()
    assert out.shape == (2, 100)
    for i, (chs, side) in enumerate(shapes):
        assert got[f"stage:{i}"].shape == (2, chs, side, side), f"stage:{i}"
    assert got["embedding"].shape == (2, model.num_features)
    torch.testing.assert_close(got["logits"], out)


@pytest.mark.parametrize("name, classes, skip_projections, decimals, millions, source", PUBLISHED)
def test_parameter_count_matches_published(
    name: str, classes: int, skip_projections: bool, decimals: int, millions: float, source: str
) -> None:
    count = n_params(timm.create_model(name, num_classes=classes), skip_projections)
    assert round(count / 1e6, decimals) == millions, f"{name}: {count} params vs {millions}M ({source})"


def test_classifier_api_intermediates_and_features_only() -> None:
    model = timm.create_model("mobilenetv2_cifar").eval()  # the Sequential head (key classifier.0.weight)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(model.forward_features(x), final)
        assert [m.shape[1] for m in maps] == [f["num_chs"] for f in model.feature_info]
        pooled = model.forward_head(final, pre_logits=True)
        assert pooled.shape == (2, 1280) and model.num_features == 1280
        model.reset_classifier(10)
        assert model.forward_head(final).shape == (2, 10) and model.num_classes == 10
        assert "classifier.0.weight" in model.state_dict()
        model.reset_classifier(0)
        torch.testing.assert_close(model.forward_head(final), pooled)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(10, global_pool="max")

    features = timm.create_model("resnet20", features_only=True, out_indices=(1, 3))
    assert [m.shape[1:] for m in features(x)] == [(16, 32, 32), (64, 8, 8)]
    assert features.feature_info.channels() == [16, 64]


def test_pretrained_without_a_file_is_refused() -> None:
    with pytest.raises(NoPretrainedWeightsError, match=r"teacher\.checkpoint=") as err:
        timm.create_model("resnet32x4", pretrained=True)
    assert "pretrained_cfg_overlay=dict(file=" in str(err.value)
    with pytest.raises(NoPretrainedWeightsError):
        create_model("wrn_40_2", 100, pretrained=True)


def test_repdistiller_checkpoint_files_load(tmp_path) -> None:
    # RepDistiller's train_teacher.py saves {"epoch", "model": state_dict, "accuracy", "optimizer"}; mdistiller's
    # cifar_teachers.tar holds the same files. Read with weights_only=True.
    torch.manual_seed(0)
    source = timm.create_model("resnet20")
    with torch.no_grad():
        for buffer in source.buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)  # non-default BN statistics, so a skipped buffer would show
    source.eval()
    optimizer = torch.optim.SGD(source.parameters(), lr=0.05, momentum=0.9)
    path = tmp_path / "ckpt_epoch_240.pth"  # e.g. save/models/resnet20_vanilla/ckpt_epoch_240.pth
    state = {
        "epoch": 240,
        "model": source.state_dict(),
        "accuracy": torch.tensor(69.06),
        "optimizer": optimizer.state_dict(),
    }
    torch.save(state, path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = source(x)
        loaded = create_model("resnet20", 100, checkpoint=path).eval()
        torch.testing.assert_close(loaded(x), expected)
        via_timm = timm.create_model("resnet20", pretrained=True, pretrained_cfg_overlay={"file": str(path)}).eval()
        torch.testing.assert_close(via_timm(x), expected)
        # saved from an nn.DataParallel wrapper: keys prefixed "module."
        torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "dp.pth")
        torch.testing.assert_close(create_model("resnet20", 100, checkpoint=tmp_path / "dp.pth").eval()(x), expected)


def test_state_dict_round_trip_through_the_package_format(tmp_path) -> None:
    torch.manual_seed(1)
    model = timm.create_model("wrn_16_2").eval()
    path = save_model_file(model, tmp_path / "teacher.pt", {"model": "wrn_16_2", "num_classes": 100})
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(create_model("wrn_16_2", 100, checkpoint=path).eval()(x), expected)
        rebuilt, meta = load_model_file(path)
        torch.testing.assert_close(rebuilt.eval()(x), expected)
    assert meta["model"] == "wrn_16_2"


def test_app_composes_zoo_models() -> None:
    cfg = compose(["model=resnet8x4", "teacher=resnet32x4"])
    assert (cfg.model.name, cfg.teacher.name) == ("resnet8x4", "resnet32x4")
    student, teacher = build_model(cfg.model, 100), build_model(cfg.teacher, 100)
    assert (n_params(student), n_params(teacher)) == (
        REPDISTILLER_PARAMS["resnet8x4"],
        REPDISTILLER_PARAMS["resnet32x4"],
    )


def test_attention_transfer_step_resnet32x4_to_resnet8x4() -> None:
    # RepDistiller's AT matches feat[1:-1]: stage:1..3 = layer1..layer3 of both networks (16x16 inputs to keep it
    # cheap: the zoo pools globally, so any size divisible by the total stride works)
    torch.manual_seed(0)
    layers = ["stage:1", "stage:2", "stage:3"]
    module = lightning_kd.DistillationModule(
        timm.create_model("resnet8x4"),
        timm.create_model("resnet32x4"),
        loss={"at": {"weight": 1000.0, "student_layers": layers, "teacher_layers": layers}},
    )
    before = module.model.fc.weight.detach().clone()
    trainer = fast_trainer(max_steps=1)
    trainer.fit(module, random_data(n=2, size=16, classes=100, batch=2))
    resolved = {str(k): str(v) for k, v in module.engine.student_taps.requested.items()}
    assert resolved == {"stage:1": "layer1", "stage:2": "layer2", "stage:3": "layer3"}
    value = float(trainer.callback_metrics["train/at"])
    assert math.isfinite(value) and value > 0
    assert not torch.equal(before, module.model.fc.weight)
