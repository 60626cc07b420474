"""Channel-wise distillation (:mod:`lightning_kd.losses.cwd`): hand-worked values with ``math``, an independent
restatement of the authors' normalisation, the difference with the detection code's cross-entropy variant,
invariances, connectors, errors and warnings, gradients, dtype, a state_dict round trip, a real timm pair through
Lightning and the YAML config (CPU).

torchdistill 1.1.5 has no CWD: there is no parity test."""

from __future__ import annotations

import inspect
import math

import pytest
import timm
import torch
from conftest import fast_trainer, gen, layer_batch, random_data, total
from omegaconf import OmegaConf
from torch import nn

import lightning_kd
from lightning_kd.config import CONF_DIR, compose
from lightning_kd.engine import build_terms
from lightning_kd.losses import ModelOutputs, SetupContext, create_loss
from lightning_kd.losses.cwd import CWDLoss, channel_log_distributions, cwd_loss

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _ctx(term: CWDLoss, s_shapes: list[tuple[int, ...]], t_shapes: list[tuple[int, ...]]) -> SetupContext:
    return SetupContext(
        student=ModelOutputs(torch.zeros(2, 3), {k: torch.zeros(sh) for k, sh in zip(term.student_taps, s_shapes)}),
        teacher=ModelOutputs(torch.zeros(2, 3), {k: torch.zeros(sh) for k, sh in zip(term.teacher_taps, t_shapes)}),
        student_model=nn.Identity(),
        teacher_model=nn.Identity(),
        num_classes=3,
    )


def _softmax(z: list[float], tau: float) -> list[float]:
    e = [math.exp(v / tau) for v in z]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


# --------------------------------------------------------------------------------------------------- hand-worked
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_hand_worked_two_channels_one_by_two(tau: float) -> None:
    # B = 1, C = 2, H×W = 1×2. At τ: teacher channel 0 -> (3/4, 1/4), student channel 0 uniform (1/2, 1/2);
    # teacher channel 1 uniform, student channel 1 -> (2/3, 1/3).
    t = torch.tensor([[[[tau * math.log(3), 0.0]], [[0.0, 0.0]]]])
    s = torch.tensor([[[[0.0, 0.0]], [[tau * math.log(2), 0.0]]]])
    kl0 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    kl1 = 0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3))
    expected = tau**2 * (kl0 + kl1) / 2  # τ²/C · Σ_c KL, batch of one
    assert expected > 1e-2
    assert float(cwd_loss(s, t, tau)) == pytest.approx(expected, rel=1e-5)
    term = CWDLoss(student_layers=["layer1"], teacher_layers=["layer2"], temperature=tau)
    term.setup(_ctx(term, [(1, 2, 1, 2)], [(1, 2, 1, 2)]))
    parts = term(layer_batch(term, [s], [t]))
    assert set(parts) == {"layer1"}
    assert float(parts["layer1"]) == pytest.approx(expected, rel=1e-5)


def test_hand_worked_batch_of_two_three_by_one() -> None:
    # the mean runs over batch × channels: B = 2, C = 1, H×W = 3×1
    s = [[0.0, 1.0, 2.0], [1.0, 1.0, -1.0]]
    t = [[2.0, 1.0, 0.0], [0.5, 0.0, 0.0]]
    tau = 1.5
    expected = tau**2 * sum(_kl(_softmax(ti, tau), _softmax(si, tau)) for si, ti in zip(s, t)) / 2
    got = cwd_loss(torch.tensor(s).view(2, 1, 3, 1), torch.tensor(t).view(2, 1, 3, 1), tau)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    probs = channel_log_distributions(torch.tensor(t).view(2, 1, 3, 1), tau).exp()
    torch.testing.assert_close(probs[0, 0], torch.tensor(_softmax(t[0], tau)), **TOL)


# -------------------------------------------------------------------------- reference formulas (authors' code)
def _authors_kl(f_s: torch.Tensor, f_t: torch.Tensor, tau: float) -> torch.Tensor:
    """The normalisation of the authors' CriterionCWD(norm_type='channel', divergence='kl') and of mmrazor's
    ChannelWiseDivergence, restated: softmax over H·W per channel, summed KL, / (N·C), · τ²."""
    n, c = f_s.shape[:2]
    p_s = torch.softmax(f_s.reshape(n * c, -1) / tau, dim=1)
    p_t = torch.softmax(f_t.reshape(n * c, -1) / tau, dim=1)
    return nn.KLDivLoss(reduction="sum")(p_s.log(), p_t) / (n * c) * tau**2


def _detection_code_ce(f_s: torch.Tensor, f_t: torch.Tensor, tau: float, c_student: int) -> torch.Tensor:
    """pppppM/mmdetection-distiller's variant: cross-entropy −Σ φ_T log φ_S, divided by the student's own C."""
    n = f_s.shape[0]
    log_s = torch.log_softmax(f_s.flatten(2) / tau, dim=-1)
    p_t = torch.softmax(f_t.flatten(2) / tau, dim=-1)
    return -(p_t * log_s).sum() * tau**2 / (c_student * n)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_matches_authors_normalisation(tau: float) -> None:
    s = torch.randn(4, 6, 5, 3, generator=gen(1)) * 2
    t = torch.randn(4, 6, 5, 3, generator=gen(2)) * 2
    torch.testing.assert_close(cwd_loss(s, t, tau), _authors_kl(s, t, tau), **TOL)


def test_detection_code_cross_entropy_variant_differs_by_teacher_entropy() -> None:
    s = torch.randn(3, 8, 4, 4, generator=gen(3))
    t = torch.randn(3, 8, 4, 4, generator=gen(4))
    tau = 1.0
    ce = _detection_code_ce(s, t, tau, c_student=8)
    log_t = torch.log_softmax(t.flatten(2) / tau, dim=-1)
    entropy = -(log_t.exp() * log_t).sum(-1).mean() * tau**2  # mean teacher entropy per channel
    torch.testing.assert_close(cwd_loss(s, t, tau), ce - entropy, **TOL)
    assert float(ce - cwd_loss(s, t, tau)) > 1.0  # the CE variant is not zero at student == teacher
    assert float(_detection_code_ce(t, t, tau, 8)) > 1.0 and float(cwd_loss(t, t, tau)) < 1e-6
    # with a connector (student 4 channels -> teacher 8) that code divides by the student's 4, we by the 8 compared
    assert float(_detection_code_ce(s, t, tau, c_student=4)) == pytest.approx(2 * float(ce), rel=1e-5)


# --------------------------------------------------------------------------------------------------- invariances
def test_zero_at_equality_and_positive_otherwise() -> None:
    f = torch.randn(3, 5, 4, 4, generator=gen(5))
    assert float(cwd_loss(f, f.clone())) < 1e-6
    assert float(cwd_loss(f, torch.randn(3, 5, 4, 4, generator=gen(6)))) > 1e-2


def test_invariant_to_per_channel_shift_not_to_scale() -> None:
    s = torch.randn(3, 5, 4, 4, generator=gen(7))
    t = torch.randn(3, 5, 4, 4, generator=gen(8))
    ref = cwd_loss(s, t, 2.0)
    shift_s = torch.randn(3, 5, 1, 1, generator=gen(9)) * 5
    shift_t = torch.randn(3, 5, 1, 1, generator=gen(10)) * 5
    torch.testing.assert_close(cwd_loss(s + shift_s, t + shift_t, 2.0), ref, **TOL)
    assert abs(float(cwd_loss(3 * s, t, 2.0)) - float(ref)) > 1e-3
    # scaling both maps and τ together by a scales the loss by a² (the τ² factor)
    torch.testing.assert_close(cwd_loss(3 * s, 3 * t, 6.0), 9 * ref, **TOL)


def test_channel_permutation_of_both_maps_does_not_change_the_loss() -> None:
    s = torch.randn(2, 6, 3, 3, generator=gen(11))
    t = torch.randn(2, 6, 3, 3, generator=gen(12))
    perm = torch.randperm(6, generator=gen(13))
    torch.testing.assert_close(cwd_loss(s[:, perm], t[:, perm]), cwd_loss(s, t), **TOL)
    # but matching channel c of the student with another channel of the teacher does
    assert abs(float(cwd_loss(s[:, perm], t)) - float(cwd_loss(s, t))) > 1e-3


# --------------------------------------------------------------------------------------------------- connectors
def test_connectors_auto_conv_none() -> None:
    term = CWDLoss(student_layers=["a", "b"], teacher_layers=["c", "d"])
    term.setup(_ctx(term, [(2, 4, 4, 4), (2, 8, 2, 2)], [(2, 4, 4, 4), (2, 16, 2, 2)]))
    assert isinstance(term.connectors[0], nn.Identity)  # equal widths: no connector (the paper's rule)
    assert isinstance(term.connectors[1], nn.Conv2d) and term.connectors[1].kernel_size == (1, 1)
    assert (term.connectors[1].in_channels, term.connectors[1].out_channels) == (8, 16)
    conv = CWDLoss(student_layers=["a"], teacher_layers=["c"], connector="conv")
    conv.setup(_ctx(conv, [(2, 4, 4, 4)], [(2, 4, 4, 4)]))
    assert isinstance(conv.connectors[0], nn.Conv2d)
    none = CWDLoss(student_layers=["a"], teacher_layers=["c"], connector="none")
    with pytest.raises(ValueError) as err:
        none.setup(_ctx(none, [(2, 4, 4, 4)], [(2, 8, 4, 4)]))
    for piece in ("'a'", "'c'", "4 vs 8 channels", "connector: auto"):
        assert piece in str(err.value), str(err.value)
    with pytest.raises(ValueError, match="connector must be one of"):
        CWDLoss(connector="linear")


def test_loss_uses_the_connector_output() -> None:
    term = CWDLoss(student_layers=["a"], teacher_layers=["b"], temperature=2.0)
    term.setup(_ctx(term, [(2, 3, 4, 4)], [(2, 5, 4, 4)]))
    s = torch.randn(2, 3, 4, 4, generator=gen(14))
    t = torch.randn(2, 5, 4, 4, generator=gen(15))
    expected = _authors_kl(term.connectors[0](s), t, 2.0)
    torch.testing.assert_close(total(term(layer_batch(term, [s], [t]))), expected, **TOL)


def test_state_dict_round_trip() -> None:
    shapes_s, shapes_t = [(2, 3, 4, 4), (2, 8, 2, 2)], [(2, 5, 4, 4), (2, 8, 2, 2)]
    term = CWDLoss(student_layers=["a", "b"], teacher_layers=["c", "d"])
    term.setup(_ctx(term, shapes_s, shapes_t))
    with torch.no_grad():
        for p in term.parameters():
            p.add_(torch.randn(p.shape, generator=gen(16)))
    state = term.state_dict()
    assert sorted(state) == ["connectors.0.bias", "connectors.0.weight"]
    fresh = CWDLoss(student_layers=["a", "b"], teacher_layers=["c", "d"])
    fresh.setup(_ctx(fresh, shapes_s, shapes_t))
    fresh.load_state_dict(state)
    fs = [torch.randn(sh, generator=gen(17 + i)) for i, sh in enumerate(shapes_s)]
    ft = [torch.randn(sh, generator=gen(27 + i)) for i, sh in enumerate(shapes_t)]
    a, b = term(layer_batch(term, fs, ft)), fresh(layer_batch(fresh, fs, ft))
    assert set(a) == set(b) == {"a", "b"}
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL)
    # a second setup (e.g. after restoring) keeps the loaded connector
    fresh.setup(_ctx(fresh, shapes_s, shapes_t))
    torch.testing.assert_close(fresh.connectors[0].weight, term.connectors[0].weight)


# ----------------------------------------------------------------------------------------------- errors and gradients
def test_spatial_mismatch_raises_with_taps_and_shapes() -> None:
    term = CWDLoss(student_layers=["layer1", "layer2"], teacher_layers=["layer1", "layer3"])
    with pytest.raises(ValueError) as err:
        term.setup(_ctx(term, [(2, 4, 8, 8), (2, 8, 4, 4)], [(2, 16, 8, 8), (2, 32, 2, 2)]))
    msg = str(err.value)
    for piece in ("cwd", "layer2", "layer3", "(2, 8, 4, 4)", "(2, 32, 2, 2)", "equal resolution"):
        assert piece in msg, msg
    with pytest.raises(ValueError, match="same shape"):
        cwd_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2))
    with pytest.raises(ValueError, match="same shape"):
        cwd_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, 4))


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="equal length"):
        CWDLoss(student_layers=["layer1", "layer2"], teacher_layers=["layer1"])
    with pytest.raises(ValueError, match="temperature"):
        CWDLoss(temperature=-1.0)
    term = CWDLoss(student_layers=["embedding"], teacher_layers=["embedding"])
    with pytest.raises(ValueError, match=r"cwd: .*'embedding'.*feature maps \[B, C, H, W\]"):
        term.setup(_ctx(term, [(2, 8)], [(2, 8)]))
    not_setup = CWDLoss(student_layers=["a"], teacher_layers=["b"])
    with pytest.raises(RuntimeError, match="setup"):
        not_setup(layer_batch(not_setup, [torch.zeros(1, 2, 2, 2)], [torch.zeros(1, 2, 2, 2)]))


def test_one_by_one_pair_warns_it_is_constant() -> None:
    term = CWDLoss(student_layers=["layer4"], teacher_layers=["layer4"])
    with pytest.warns(UserWarning, match="1×1"):
        term.setup(_ctx(term, [(2, 512, 1, 1)], [(2, 512, 1, 1)]))
    s, t = torch.randn(2, 4, 1, 1, generator=gen(40)), torch.randn(2, 4, 1, 1, generator=gen(41))
    assert float(cwd_loss(s, t)) == 0.0


def test_gradients_reach_student_and_connector_only() -> None:
    term = CWDLoss(student_layers=["a"], teacher_layers=["b"])
    term.setup(_ctx(term, [(3, 4, 4, 4)], [(3, 8, 4, 4)]))
    s = torch.randn(3, 4, 4, 4, generator=gen(42)).requires_grad_()
    t = torch.randn(3, 8, 4, 4, generator=gen(43)).requires_grad_()  # detached by the loss even so
    out = total(term(layer_batch(term, [s], [t])))
    assert out.dtype == torch.float32
    out.backward()
    assert t.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    for p in term.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_half_precision_inputs_give_float32() -> None:
    s = torch.randn(2, 4, 4, 4, generator=gen(44)).bfloat16()
    t = torch.randn(2, 4, 4, 4, generator=gen(45)).bfloat16()
    out = cwd_loss(s, t, 4.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, cwd_loss(s.float(), t.float(), 4.0), **TOL)
    term = CWDLoss(student_layers=["a"], teacher_layers=["b"])
    term.setup(_ctx(term, [(2, 4, 4, 4)], [(2, 4, 4, 4)]))
    assert total(term(layer_batch(term, [s], [t]))).dtype == torch.float32


# ----------------------------------------------------------------------------------------------- config and Lightning
def test_yaml_builds_the_term_with_its_values() -> None:
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / "cwd.yaml"))
    values = yaml["terms"]["cwd"]
    assert sorted(values) == sorted(p for p in inspect.signature(CWDLoss.__init__).parameters if p != "self")
    cfg = compose(["loss=cwd"])
    term = build_terms(cfg.loss.terms)["cwd"]
    assert isinstance(term, CWDLoss)
    assert term.weight == values["weight"] == 5.0
    assert term.temperature == values["temperature"] == 1.0
    assert term.connector_kind == values["connector"] == "auto"
    assert [str(s) for s in term.student_taps] == values["student_layers"] == ["stage:-4", "stage:-3", "stage:-2"]
    assert [str(t) for t in term.teacher_taps] == values["teacher_layers"]
    assert isinstance(create_loss("cwd"), CWDLoss)


@pytest.mark.parametrize("connector", ["auto", "conv"])
def test_timm_resnet_pair_through_lightning(connector: str) -> None:
    # resnet18 and resnet34 have equal stage widths: 'auto' builds no connector, 'conv' a 1×1 conv per pair
    torch.manual_seed(0)
    student = timm.create_model("resnet18", num_classes=10)
    teacher = timm.create_model("resnet34", num_classes=10)
    loss = "cwd" if connector == "auto" else {"cwd": {"connector": connector}}
    module = lightning_kd.DistillationModule(student, teacher, loss=loss)
    data = random_data(n=8, size=32)
    trainer = fast_trainer(max_steps=1)
    term = module.engine.terms["cwd"]
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    assert "train/cwd" in metrics
    assert math.isfinite(float(metrics["train/cwd"])) and float(metrics["train/cwd"]) > 0
    parts = [k for k in metrics if k.startswith("train/cwd/")]
    assert sorted(parts) == ["train/cwd/stage:-2", "train/cwd/stage:-3", "train/cwd/stage:-4"]
    torch.testing.assert_close(sum(metrics[k] for k in parts), metrics["train/cwd"], **TOL)
    convs = [c for c in term.connectors if isinstance(c, nn.Conv2d)]
    assert len(convs) == (0 if connector == "auto" else 3)
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in optimised for c in convs for p in c.parameters())  # optimised with the student
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in convs)
