"""Tests of :mod:`lightning_kd.taps` (CPU, random init, small inputs, no downloads)."""

from __future__ import annotations

import doctest
import gc
import weakref
from typing import Any

import pytest
import timm
import torch
from torch import nn

import lightning_kd.taps as taps_module
from lightning_kd.taps import (
    INTERNAL_PREFIX,
    LayerTaps,
    TapError,
    TapSpec,
    feature_stage_path,
    find_classifier,
    get_module,
    module_paths,
    resolve,
)

BATCH = 2
IMG = 32

# name, create_model kwargs, module-path taps (with hard-coded output shapes at 2x3x32x32), whether the stage tensors
# are tokens (B, N, C) rather than feature maps (B, C, H, W)
FAMILIES: dict[str, dict[str, Any]] = {
    "resnet": {
        "model": "resnet18",
        "kwargs": {},
        "paths": {"layer3": (BATCH, 256, 2, 2), "layer4": (BATCH, 512, 1, 1)},
        "tokens": False,
    },
    "convnext": {
        "model": "convnext_atto",
        "kwargs": {},
        "paths": {"stages.2": (BATCH, 160, 2, 2)},
        "tokens": False,
    },
    "efficientnet": {
        "model": "efficientnet_b0",
        "kwargs": {},
        "paths": {"blocks.5": (BATCH, 192, 1, 1)},
        "tokens": False,
    },
    "vit": {
        "model": "vit_tiny_patch16_224",
        "kwargs": {"img_size": IMG, "patch_size": 8},
        # 4x4 patches + class token, width 192
        "paths": {"blocks.5.mlp": (BATCH, 17, 192), "blocks.2:input": (BATCH, 17, 192)},
        "tokens": True,
    },
    "mobilenetv3": {
        "model": "mobilenetv3_small_050",
        "kwargs": {},
        "paths": {"blocks.3": (BATCH, 24, 2, 2)},
        "tokens": False,
    },
}


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """These models are tiny: one intra-op thread is as fast, and does not thrash when the 2 cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _create(family: str, num_classes: int = 10) -> nn.Module:
    cfg = FAMILIES[family]
    torch.manual_seed(0)
    return timm.create_model(cfg["model"], pretrained=False, num_classes=num_classes, **cfg["kwargs"]).eval()


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(BATCH, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _by_name(captured: dict[TapSpec, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {str(k): v for k, v in captured.items()}


# --------------------------------------------------------------------------------------------------------------------
# TapSpec grammar


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("layer3", TapSpec("layer3", "output")),
        ("fc:input", TapSpec("fc", "input")),
        ("fc:output", TapSpec("fc", "output")),
        (" blocks.5.mlp ", TapSpec("blocks.5.mlp", "output")),
        ("embedding", TapSpec("embedding", "output")),
        ("logits", TapSpec("logits", "output")),
        ("stage:-1", TapSpec("stage:-1", "output")),
        ("stage:2", TapSpec("stage:2", "output")),
        (TapSpec("head", "input"), TapSpec("head", "input")),
    ],
)
def test_tapspec_parse(spec: str | TapSpec, expected: TapSpec) -> None:
    parsed = TapSpec.parse(spec)
    assert parsed == expected
    assert TapSpec.parse(str(parsed)) == parsed  # str() round-trips


@pytest.mark.parametrize("spec", ["", "   ", None, 3, "layer3:foo", "fc:inputs"])
def test_tapspec_parse_rejects(spec: Any) -> None:
    with pytest.raises(TapError):
        TapSpec.parse(spec)


# --------------------------------------------------------------------------------------------------------------------
# 1. five timm families


@pytest.mark.parametrize("family", list(FAMILIES))
def test_timm_families(family: str) -> None:
    cfg = FAMILIES[family]
    model = _create(family)
    x = _x()
    paths: dict[str, tuple[int, ...]] = cfg["paths"]
    specs = [*paths, "embedding", "logits", "stage:-1"]
    if family == "resnet":
        specs.append("stage:3")

    # reference values, computed without the taps: manual hooks on model.get_submodule(path), forward_head, model(x)
    manual: dict[str, torch.Tensor] = {}
    handles = []
    for spec in paths:
        path, _, io = spec.partition(":")
        module = model.get_submodule(path)
        if io == "input":
            handles.append(module.register_forward_pre_hook(lambda m, a, s=spec: manual.__setitem__(s, a[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, a, o, s=spec: manual.__setitem__(s, o)))
    with torch.no_grad():
        expected_logits = model(x)
        expected_embedding = model.forward_head(model.forward_features(x), pre_logits=True)
    for h in handles:
        h.remove()
    assert set(manual) == set(paths)
    assert _no_hooks(model)

    taps = LayerTaps(model, specs)
    assert taps.attached and _hook_count(model) > 0
    with torch.no_grad(), taps.capture():
        out = model(x)
    got = _by_name(taps.pop())
    assert list(got) == specs  # keyed by the requested specs, in order

    torch.testing.assert_close(out, expected_logits, atol=1e-5, rtol=0)
    for spec, shape in paths.items():
        assert tuple(got[spec].shape) == shape, spec
        torch.testing.assert_close(got[spec], manual[spec], atol=1e-5, rtol=0)

    num_features = model.head_hidden_size  # width of the pre-logits (e.g. after the conv head of MobileNetV3)
    assert got["embedding"].shape == (BATCH, num_features) == expected_embedding.shape
    torch.testing.assert_close(got["embedding"], expected_embedding, atol=1e-5, rtol=0)
    assert got["logits"].shape == (BATCH, 10)
    torch.testing.assert_close(got["logits"], expected_logits, atol=1e-5, rtol=0)

    # the symbolic taps resolve to the timm classifier
    head_path = taps.requested[TapSpec("embedding")].path
    assert taps.requested[TapSpec("embedding")] == TapSpec(head_path, "input")
    assert taps.requested[TapSpec("logits")] == TapSpec(head_path, "output")
    assert model.get_submodule(head_path) is model.get_classifier()

    # stage:N resolves to feature_info[N]["module"], with its number of channels
    stage_specs = [s for s in specs if s.startswith("stage:")]
    for spec in stage_specs:
        index = int(spec.split(":")[1])
        info = model.feature_info[index]
        assert taps.requested[TapSpec(spec)] == TapSpec(info["module"], "output")
        channels = got[spec].shape[-1] if cfg["tokens"] else got[spec].shape[1]
        assert channels == info["num_chs"], (spec, info)

    taps.remove()
    assert _no_hooks(model)


def test_stage_matches_named_layer_and_feature_maps() -> None:
    """``stage:N`` captures the very tensors of timm's ``features_only`` view of the same weights."""
    model = _create("resnet")
    taps = LayerTaps(model, [f"stage:{i}" for i in range(len(model.feature_info))])
    with torch.no_grad(), taps.capture():
        model(_x())
    got = list(taps.pop().values())
    assert [t.shape[1] for t in got] == [f["num_chs"] for f in model.feature_info]
    reductions = [IMG // t.shape[-1] for t in got]
    assert reductions == [f["reduction"] for f in model.feature_info]


# --------------------------------------------------------------------------------------------------------------------
# 2. errors


def test_bad_path_names_model_and_close_paths() -> None:
    model = _create("resnet")
    with pytest.raises(TapError) as exc:
        LayerTaps(model, ["layer5"])
    msg = str(exc.value)
    assert "ResNet" in msg and "layer5" in msg
    assert "layer4" in msg
    assert _no_hooks(model)  # nothing half-installed


def test_nested_typo_lists_the_right_path() -> None:
    model = _create("vit")
    with pytest.raises(TapError) as exc:
        LayerTaps(model, ["blocks.5.mlpp"])
    msg = str(exc.value)
    assert "VisionTransformer" in msg
    assert "blocks.5.mlp" in msg.split("Closest valid paths:")[1]


def test_unmatched_path_falls_back_to_siblings() -> None:
    model = _create("resnet")
    with pytest.raises(TapError) as exc:
        get_module(model, "layer4.qwertyuiopasdfghjklzxcvbnm")
    assert "layer4.0" in str(exc.value) or "layer4.1" in str(exc.value)


def test_bad_io_suffix() -> None:
    model = _create("resnet")
    with pytest.raises(TapError, match="'input' or 'output'"):
        LayerTaps(model, ["layer3:foo"])
    assert _no_hooks(model)


def test_stage_out_of_range_gives_stage_count() -> None:
    model = _create("resnet")
    n = len(model.feature_info)
    with pytest.raises(TapError, match=rf"{n} feature stages") as exc:
        LayerTaps(model, ["stage:99"])
    assert "stage:99" in str(exc.value)
    with pytest.raises(TapError, match="stage:<int>"):
        LayerTaps(model, ["stage:last"])


def test_stage_without_feature_info() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(TapError, match="feature_info"):
        resolve(model, "stage:0")


@pytest.mark.parametrize("spec", ["embedding", "logits"])
def test_no_classifier(spec: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    with pytest.raises(TapError) as exc:
        LayerTaps(model, [spec])
    msg = str(exc.value)
    assert "Sequential" in msg and "classifier" in msg
    assert "explicitly" in msg  # the hint: name the layer
    assert _no_hooks(model)


def test_classifier_fallbacks_and_wrapped_timm_model() -> None:
    # plain torch model: the last nn.Linear
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    assert find_classifier(mlp) == "3"
    taps = LayerTaps(mlp, ["embedding", "logits"])
    x = torch.randn(BATCH, 3, 2, 2)
    with taps.capture():
        y = mlp(x)
    got = _by_name(taps.pop())
    torch.testing.assert_close(got["embedding"], mlp[2](mlp[1](mlp[0](x))))
    assert got["logits"] is y

    # a user module wrapping a timm model (as a LightningModule does): found through the submodule, with its prefix;
    # the package's own attachments are never tap targets
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _create("resnet")
            setattr(self, f"{INTERNAL_PREFIX}engine", nn.Linear(2, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    wrapper = Wrapper()
    assert find_classifier(wrapper) == "net.fc"
    assert feature_stage_path(wrapper, -1) == "net.layer4"
    assert not any(p.startswith(INTERNAL_PREFIX) for p in module_paths(wrapper))
    assert resolve(wrapper, "embedding") == TapSpec("net.fc", "input")


# --------------------------------------------------------------------------------------------------------------------
# 3. current step only


@pytest.mark.parametrize("one_block", [True, False], ids=["one-capture", "capture-per-step"])
def test_keeps_only_current_step(one_block: bool) -> None:
    model = _create("resnet")
    taps = LayerTaps(model, ["layer3", "embedding"])
    n_slots = 2

    # weak references to the very tensor objects the taps store (detach=False stores the module's tensor itself)
    seen: dict[str, list[weakref.ref[torch.Tensor]]] = {"layer3": [], "embedding": []}
    spy = [
        model.layer3.register_forward_hook(lambda m, a, o: seen["layer3"].append(weakref.ref(o))),
        model.fc.register_forward_pre_hook(lambda m, a: seen["embedding"].append(weakref.ref(a[0]))),
    ]

    def step(i: int) -> torch.Tensor:
        x = _x(seed=i)
        _ = model(x)
        assert len(taps) == n_slots  # exactly one tensor per tap, whatever the step
        return x

    if one_block:
        with taps.capture():
            for i in range(20):
                last_x = step(i)
    else:
        for i in range(20):
            with taps.capture():
                last_x = step(i)
    for h in spy:
        h.remove()
    assert len(taps) == n_slots

    gc.collect()
    for refs in seen.values():
        assert len(refs) == 20
        assert all(r() is None for r in refs[:-1]), "tensors of earlier steps are still alive"
        assert refs[-1]() is not None

    got = _by_name(taps.pop())
    assert len(taps) == 0
    assert got["layer3"] is seen["layer3"][-1]()
    assert got["embedding"] is seen["embedding"][-1]()
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(last_x), pre_logits=True)
    torch.testing.assert_close(got["embedding"].detach(), expected, atol=1e-5, rtol=0)

    # once handed over and dropped by the caller, nothing keeps the last step alive either
    del got
    gc.collect()
    assert all(refs[-1]() is None for refs in seen.values())
    with pytest.raises(TapError, match="no value captured"):
        taps.pop()
    taps.remove()


def test_nothing_captured_outside_capture() -> None:
    model = _create("resnet")
    taps = LayerTaps(model, ["layer3", "embedding"])
    with torch.no_grad():
        model(_x(0))
    assert len(taps) == 0
    with pytest.raises(TapError, match="no value captured") as exc:
        taps.pop()
    assert "ResNet" in str(exc.value)

    # a forward after stop() does not overwrite what the capture step stored
    with torch.no_grad(), taps.capture():
        model(_x(1))
    with torch.no_grad():
        model(_x(2))
        expected = model.forward_head(model.forward_features(_x(1)), pre_logits=True)
    torch.testing.assert_close(_by_name(taps.pop())["embedding"], expected, atol=1e-5, rtol=0)

    # start() clears leftovers of an earlier step; clear() drops them
    taps.start()
    with torch.no_grad():
        model(_x(3))
    taps.stop()
    assert len(taps) == 2
    taps.start()
    assert len(taps) == 0
    taps.stop()
    with torch.no_grad(), taps.capture():
        model(_x(4))
    taps.clear()
    assert len(taps) == 0
    taps.remove()


def test_layer_not_run_is_reported() -> None:
    model = _create("resnet")
    taps = LayerTaps(model, ["layer3", "fc"])
    with torch.no_grad(), taps.capture():
        model.forward_features(_x())  # the classifier does not run
    assert len(taps) == 1
    with pytest.raises(TapError, match=r"no value captured for tap\(s\) \['fc'\]"):
        taps.pop()
    assert len(taps) == 0
    taps.remove()


def test_capture_stops_on_exception() -> None:
    model = _create("resnet")
    taps = LayerTaps(model, ["layer3"])
    with pytest.raises(RuntimeError), taps.capture():
        model(torch.randn(BATCH, 5, IMG, IMG))  # wrong channel count
    with torch.no_grad():
        model(_x())
    assert len(taps) == 0
    taps.remove()


# --------------------------------------------------------------------------------------------------------------------
# 4. remove()


def test_remove_leaves_no_hooks() -> None:
    model = _create("vit")
    assert _no_hooks(model)
    taps = LayerTaps(model, ["blocks.5.mlp", "blocks.2:input", "embedding", "logits", "stage:-1"])
    assert not _no_hooks(model)
    assert _hook_count(model) == 5
    taps.attach()  # idempotent
    assert _hook_count(model) == 5
    with torch.no_grad(), taps.capture():
        model(_x())
    taps.remove()
    assert not taps.attached and len(taps) == 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())

    # detached taps record nothing, even under capture(); attach() brings them back
    with torch.no_grad(), taps.capture():
        model(_x())
    assert len(taps) == 0
    taps.attach()
    assert _hook_count(model) == 5
    with torch.no_grad(), taps.capture():
        model(_x())
    assert len(taps.pop()) == 5
    taps.remove()
    assert _no_hooks(model)


# --------------------------------------------------------------------------------------------------------------------
# 5. gradients


def test_student_taps_keep_the_graph() -> None:
    model = _create("resnet").train()
    taps = LayerTaps(model, ["layer3", "embedding"], detach=False)
    with taps.capture():
        model(_x())
    got = _by_name(taps.pop())
    for name, tensor in got.items():
        assert tensor.requires_grad and tensor.grad_fn is not None, name
    got["embedding"].sum().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert model.layer4[1].conv2.weight.grad is not None
    assert model.fc.weight.grad is None  # the embedding is the classifier's input
    taps.remove()


def test_teacher_taps_detach() -> None:
    model = _create("resnet").train()
    taps = LayerTaps(model, ["layer3", "embedding", "logits"], detach=True)
    with taps.capture():
        out = model(_x())
    assert out.requires_grad  # the model's own output keeps its graph
    got = _by_name(taps.pop())
    for name, tensor in got.items():
        assert not tensor.requires_grad and tensor.grad_fn is None, name
    torch.testing.assert_close(got["logits"], out.detach())
    taps.remove()


# --------------------------------------------------------------------------------------------------------------------
# 6. docstring example


def test_doctest() -> None:
    result = doctest.testmod(taps_module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0


# --------------------------------------------------------------------------------------------------------------------
# 7. one hook per (module, io)


def test_shared_tap_single_hook() -> None:
    model = _create("resnet")
    taps = LayerTaps(model, ["embedding", "fc:input", "logits", "fc", "stage:-1", "layer4"])
    assert len(model.fc._forward_pre_hooks) == 1
    assert len(model.fc._forward_hooks) == 1
    assert len(model.layer4._forward_hooks) == 1
    assert _hook_count(model) == 3
    with torch.no_grad(), taps.capture():
        out = model(_x())
    assert len(taps) == 3
    got = _by_name(taps.pop())
    assert list(got) == ["embedding", "fc:input", "logits", "fc", "stage:-1", "layer4"]
    assert got["embedding"] is got["fc:input"]
    assert got["logits"] is got["fc"]
    assert got["stage:-1"] is got["layer4"]
    torch.testing.assert_close(got["logits"], out)
    taps.remove()
    assert _no_hooks(model)


def test_duplicate_request_is_one_key() -> None:
    model = _create("resnet")
    taps = LayerTaps(model, ["layer3", "layer3", TapSpec("layer3")])
    assert _hook_count(model) == 1
    with torch.no_grad(), taps.capture():
        model(_x())
    assert list(_by_name(taps.pop())) == ["layer3"]
    taps.remove()
