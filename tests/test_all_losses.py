"""Every conf/loss/*.yaml on a real timm pair under bf16 autocast (CPU): the loss is float32 and finite, and gradients
reach the student and every trainable part of the terms, never the teacher. A new loss is covered by adding its
YAML."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny
from omegaconf import OmegaConf

from lightning_kd.config import CONF_DIR, loss_config_names
from lightning_kd.engine import DistillEngine
from lightning_kd.losses import DistillBatch

LOSSES = loss_config_names("classification")  # the image-model losses (task=lm ones: test_lm_loss_configs.py)
N, CLASSES, SIZE = 16, 10, 32


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 3, SIZE, SIZE, generator=g), torch.arange(N) % CLASSES, torch.arange(N)


@pytest.mark.parametrize("loss", LOSSES)
def test_loss_under_bf16_autocast_is_float32_with_gradients(loss: str, data) -> None:
    x, y, idx = data
    terms = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / f"{loss}.yaml"))["terms"]
    student, teacher = tiny("resnet18", CLASSES, seed=0), tiny("resnet34", CLASSES, seed=1)
    engine = DistillEngine(terms, teacher)
    engine.setup(student, x[:4], student, num_samples=N)
    loader = [(x[i : i + 8], y[i : i + 8], idx[i : i + 8]) for i in range(0, N, 8)]
    engine.prepare(loader, "cpu")
    student.train()
    engine.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t_out = engine.run_teacher(x[:8])
        with engine.student_capture():
            logits = student(x[:8])
        s_out = engine.student_outputs(logits)
        assert logits.dtype == torch.bfloat16  # autocast is really on
        batch = DistillBatch(s_out, t_out, y[:8], idx[:8], step=1000, epoch=1000, max_steps=2000, inputs=x[:8])
        total, logs = engine(batch)
    assert total.dtype == torch.float32, f"{loss}: total is {total.dtype}"
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in logs.values()), logs
    total.backward()
    student_grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert student_grads and any(g.abs().sum() > 0 for g in student_grads), f"{loss}: no gradient reaches the student"
    assert all(torch.isfinite(g).all() for g in student_grads)
    for name, p in engine.terms.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{loss}: parameter {name} got no gradient"
    assert all(p.grad is None for p in teacher.parameters()), f"{loss}: the teacher received gradients"
