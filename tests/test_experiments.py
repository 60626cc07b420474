"""``experiment=cifar100/<method>/<pair>``: every experiment composes, its recipe is the RepDistiller / mdistiller
CIFAR-100 protocol, its loss terms set up on the real CIFAR zoo pair (taps resolve, shapes fit), and the README's
table carries the same published numbers as the configs."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from lightning_kd.config import CONF_DIR, compose
from lightning_kd.engine import DistillEngine
from lightning_kd.losses import DistillBatch
from lightning_kd.models import create_model

ROOT = CONF_DIR / "experiment" / "cifar100"
METHODS = ("kd", "dkd", "crd", "rkd", "fitnet", "at")
PAIRS = {  # file stem: (teacher, student) as the issue lists them
    "resnet32x4-resnet8x4": ("resnet32x4", "resnet8x4"),
    "resnet56-resnet20": ("resnet56", "resnet20"),
    "wrn_40_2-wrn_16_2": ("wrn_40_2", "wrn_16_2"),
    "vgg13-vgg8": ("vgg13_cifar", "vgg8_cifar"),
    "resnet32x4-shufflev2": ("resnet32x4", "shufflenetv2_cifar"),
}
SMALL_LR_STUDENTS = ("mobilenetv2_cifar", "shufflenetv1_cifar", "shufflenetv2_cifar")
DKD_BETA = {"resnet56-resnet20": 2.0, "wrn_40_2-wrn_16_2": 6.0, "vgg13-vgg8": 6.0}  # mdistiller configs; others 8
EXPERIMENTS = sorted(f"cifar100/{p.parent.name}/{p.stem}" for p in ROOT.glob("*/*.yaml") if p.parent.name in METHODS)


@functools.cache
def _composed(name: str) -> Any:
    return compose([f"experiment={name}"])


def test_every_method_and_pair_has_an_experiment() -> None:
    assert EXPERIMENTS == sorted(f"cifar100/{m}/{p}" for m in METHODS for p in PAIRS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_recipe_is_the_published_protocol(name: str) -> None:
    _, method, pair = name.split("/")
    cfg = _composed(name)
    teacher, student = PAIRS[pair]
    assert (cfg.teacher.name, cfg.model.name) == (teacher, student)
    assert cfg.data._target_.endswith("CIFAR100DataModule")
    assert (cfg.data.batch_size, cfg.data.val_size, cfg.data.augment, cfg.data.image_size) == (64, 0, True, 32)
    assert cfg.trainer.max_epochs == 240 and cfg.teacher_epochs == 240
    opt = cfg.optimizer
    assert opt._target_ == "torch.optim.SGD" and (opt.momentum, opt.weight_decay, opt.nesterov) == (0.9, 5e-4, False)
    assert opt.lr == (0.01 if student in SMALL_LR_STUDENTS else 0.05)
    teacher_lr = cfg.teacher_optimizer.get("lr", opt.lr)
    assert teacher_lr == 0.05  # teachers always train at 0.05
    sched = cfg.scheduler
    assert sched._target_ == "torch.optim.lr_scheduler.MultiStepLR"
    assert list(sched.milestones) == [150, 180, 210] and sched.gamma == 0.1
    assert cfg.label_smoothing == 0.0
    terms, task = cfg.loss.terms, cfg.loss.task_weight
    assert list(terms) == [method]
    term = terms[method]
    if method == "kd":
        assert (task, term.weight, term.temperature) == (0.1, 0.9, 4.0)  # RepDistiller -r 0.1 -a 0.9, T = 4
    elif method == "dkd":
        assert (task, term.alpha, term.temperature, term.warmup) == (1.0, 1.0, 4.0, 20)
        assert term.beta == DKD_BETA.get(pair, 8.0)
    elif method == "crd":
        assert (task, term.weight, term.nce_k, term.nce_t, term.nce_m, term.feat_dim) == (
            1.0,
            0.8,
            16384,
            0.07,
            0.5,
            128,
        )
    elif method == "rkd":
        assert (task, term.weight, term.distance_weight, term.angle_weight) == (1.0, 1.0, 25.0, 50.0)
    elif method == "fitnet":
        assert (task, term.weight, term.student_layers, term.teacher_layers) == (1.0, 100.0, "stage:2", "stage:2")
        assert term.batchnorm and term.relu
    elif method == "at":
        maps = 5 if pair == "vgg13-vgg8" else 4  # the feature maps RepDistiller's models return (feat[:-1])
        expected = [f"stage:{i}" for i in range(1, maps)]  # feat[1:-1]
        assert (task, term.weight, term.p) == (1.0, 1000.0, 2.0)
        assert list(term.student_layers) == expected and list(term.teacher_layers) == expected
    published = cfg.published
    assert 60 < published.top1 < 80 and published.teacher > published.student


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_terms_set_up_on_the_real_pair(pair: str) -> None:
    """The six methods' terms of a pair, in one engine on the CIFAR zoo models: every tap resolves, shapes fit
    (connectors, resize), and one loss value is finite."""
    configs = [_composed(f"cifar100/{method}/{pair}") for method in METHODS]
    terms = {m: OmegaConf.to_container(c.loss.terms[m], resolve=True) for m, c in zip(METHODS, configs)}
    torch.manual_seed(0)
    student, teacher = create_model(configs[0].model.name, 100), create_model(configs[0].teacher.name, 100)
    x, y, idx = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), torch.arange(4)
    engine = DistillEngine(terms, teacher)
    engine.setup(student, x[:2], student, num_samples=64)
    engine.prepare([(x, y, idx)], "cpu")
    student.train()
    with engine.student_capture():
        logits = student(x)
    s_out, t_out = engine.student_outputs(logits), engine.run_teacher(x)
    total, logs = engine(DistillBatch(s_out, t_out, y, idx, step=0, epoch=0, inputs=x))
    assert torch.isfinite(total) and set(METHODS) <= {k.split("/")[1] for k in logs}, sorted(logs)


def test_readme_table_matches_the_configs() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in EXPERIMENTS:
        cfg = _composed(name)
        row = re.search(rf"^\|[^\n]*`experiment={re.escape(name)}`[^\n]*$", readme, flags=re.M)
        assert row, f"README has no row for experiment={name}"
        cells = [c.strip() for c in row.group(0).split("|")]
        assert f"{cfg.published.top1:.2f}" in cells, (name, cells)
        assert cells[-2] == "" or cells[-2] == "–", "the 'ours' column is filled only by real runs"
