"""Confidence-Weighted by Teacher Max (:mod:`lightning_kd.losses.cwtm`, BAN's first ablation), CPU: hand-worked values
with ``math`` only, the batch-normalised weights (sum 1, equal weights give the plain cross-entropy), the paper's
gradient (Eq. 10), soft targets, errors, dtype, the YAML config and the module wrapper."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import GapNet, gen, make_loader
from omegaconf import OmegaConf

from lightning_kd import DistillationModule
from lightning_kd.config import CONF_DIR, compose
from lightning_kd.engine import build_terms
from lightning_kd.losses import DistillBatch, ModelOutputs, create_loss
from lightning_kd.losses.cwtm import CWTMLoss, cwtm_loss, cwtm_weights

TOL = {"atol": 1e-6, "rtol": 1e-5}


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def batch_of(s, t, y=None, soft=None) -> DistillBatch:
    return DistillBatch(ModelOutputs(s), ModelOutputs(t), targets=y, soft_targets=soft)


# --------------------------------------------------------------------------------------------------------- hand-worked
def test_hand_worked_two_samples_three_classes() -> None:
    s = [[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]]
    t = [[3.0, 1.0, 0.5], [0.0, 0.2, 0.1]]  # teacher: sure and right, then unsure and wrong
    y = [0, 2]
    conf = [max(_softmax(row)) for row in t]
    w = [c / sum(conf) for c in conf]
    ce = [-math.log(_softmax(row)[label]) for row, label in zip(s, y)]
    expected = w[0] * ce[0] + w[1] * ce[1]
    assert w[0] > 0.5 > w[1]  # the confident sample dominates
    got = cwtm_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(cwtm_weights(torch.tensor(t)), torch.tensor(w), **TOL)
    assert CWTMLoss()(batch_of(torch.tensor(s), torch.tensor(t), torch.tensor(y))).item() == pytest.approx(
        expected, rel=1e-6
    )


def test_weight_uses_the_teacher_max_even_when_the_teacher_is_wrong() -> None:
    # the teacher is sure of class 1 while the label is 0: its confidence still weights the sample (paper: "even if the
    # teacher [is] wrong"); the student's CE is still on the label
    s, t, y = torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 5.0], [0.0, 0.0]]), torch.tensor([0, 0])
    w = cwtm_weights(t)
    p_max = 1 / (1 + math.exp(-5.0))
    assert w[0].item() == pytest.approx(p_max / (p_max + 0.5), rel=1e-6)
    assert cwtm_loss(s, t, y).item() == pytest.approx(math.log(2.0), rel=1e-6)  # both CEs are log 2


# ---------------------------------------------------------------------------------------------------------- properties
def test_weights_sum_to_one_and_are_positive() -> None:
    t = torch.randn(16, 10, generator=gen(0)) * 3
    w = cwtm_weights(t)
    assert w.shape == (16,) and w.dtype == torch.float32
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert (w > 0).all()
    # ordering: the more confident the teacher, the larger the weight
    conf = F.softmax(t, dim=-1).amax(-1)
    assert torch.equal(w.argsort(), conf.argsort())


def test_equal_confidence_gives_the_plain_cross_entropy() -> None:
    # every teacher row is a permutation of the same logits: equal max probability, weights 1/B
    base = torch.tensor([2.0, 0.5, -1.0, 0.0])
    t = torch.stack([base[torch.randperm(4, generator=gen(i))] for i in range(6)])
    s = torch.randn(6, 4, generator=gen(7))
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    torch.testing.assert_close(cwtm_weights(t), torch.full((6,), 1 / 6), **TOL)
    torch.testing.assert_close(cwtm_loss(s, t, y), F.cross_entropy(s, y), **TOL)


def test_gradient_is_the_papers_eq_10() -> None:
    # d/dz_S of Σ_s w_s CE_s = w_s (q_s − y_s): the label gradient re-weighted by the teacher's batch-normalised max
    s = torch.randn(5, 4, generator=gen(1), requires_grad=True)
    t = torch.randn(5, 4, generator=gen(2)) * 2
    y = torch.tensor([0, 3, 1, 1, 2])
    cwtm_loss(s, t, y).backward()
    expected = cwtm_weights(t)[:, None] * (F.softmax(s.detach(), -1) - F.one_hot(y, 4).float())
    torch.testing.assert_close(s.grad, expected, **TOL)


def test_soft_targets() -> None:
    s, t = torch.randn(4, 3, generator=gen(3)), torch.randn(4, 3, generator=gen(4))
    y = torch.tensor([0, 2, 1, 2])
    one_hot = F.one_hot(y, 3).float()
    torch.testing.assert_close(cwtm_loss(s, t, None, one_hot), cwtm_loss(s, t, y), **TOL)
    mixed = 0.7 * one_hot + 0.3 * one_hot.flip(0)
    per_sample = -(mixed * F.log_softmax(s, -1)).sum(-1)
    torch.testing.assert_close(cwtm_loss(s, t, y, mixed), (cwtm_weights(t) * per_sample).sum(), **TOL)
    # the term prefers the batch's soft targets (mixup) over their argmax
    term = CWTMLoss()
    torch.testing.assert_close(term(batch_of(s, t, mixed.argmax(-1), mixed)), cwtm_loss(s, t, y, mixed), **TOL)


def test_no_gradient_to_the_teacher_and_float32_under_bf16() -> None:
    s = torch.randn(4, 5, generator=gen(5)).bfloat16().requires_grad_()
    t = torch.randn(4, 5, generator=gen(6)).bfloat16().requires_grad_()
    out = cwtm_loss(s, t, torch.tensor([0, 1, 2, 3]))
    assert out.dtype == torch.float32
    out.backward()
    assert s.grad is not None and t.grad is None


# -------------------------------------------------------------------------------------------------------------- errors
def test_needs_labels() -> None:
    s = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="cwtm: the batch has no targets"):
        CWTMLoss()(batch_of(s, s))
    with pytest.raises(ValueError, match="differ in shape"):
        cwtm_loss(s, torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="3 targets for a batch of 2"):
        cwtm_loss(s, s, torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------------------------------------- config and the module
def test_yaml_keys_are_the_constructor_params_and_it_replaces_the_task_loss() -> None:
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / "cwtm.yaml"))
    assert set(yaml["terms"]["cwtm"]) == {p for p in inspect.signature(CWTMLoss.__init__).parameters if p != "self"}
    assert yaml["task_weight"] == 0.0
    cfg = compose(["loss=cwtm"])
    term = build_terms(cfg.loss.terms)["cwtm"]
    assert isinstance(term, CWTMLoss) and term.weight == 1.0
    assert isinstance(create_loss("cwtm"), CWTMLoss) and CWTMLoss.replaces_task_loss


def test_module_defaults_task_weight_to_zero_and_trains() -> None:
    from conftest import fast_trainer

    module = DistillationModule(GapNet(classes=10, seed=0), GapNet(classes=10, seed=1), loss="cwtm")
    assert module.task_weight == 0.0
    before = [p.detach().clone() for p in module.model.parameters()]
    trainer = fast_trainer(max_steps=1)
    trainer.fit(module, make_loader(n=16, size=8))
    metrics = trainer.callback_metrics
    torch.testing.assert_close(metrics["train/loss"], metrics["train/cwtm"], **TOL)  # CWTM alone
    assert any(not torch.equal(a, b) for a, b in zip(before, module.model.parameters()))
