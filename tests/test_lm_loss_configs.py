"""Every language-model loss config (``conf/loss/*.yaml`` with ``task: lm``, auto-discovered: a new YAML is covered
by adding it) composes with ``task=lm``, is refused by the image task, and takes one training step through
:class:`~lightning_kd.lm.module.LMDistillationModule`'s engine on tiny GPT-2s under CPU bf16 autocast: the loss is a
finite float32 scalar, the student gets finite gradients (not all zero), the teacher none.

The batch serves every kind of term: its rows are two prompts with two answers each, chosen rows first and
rejected rows after (the preference-pair layout of DCKD; an ordinary LM batch for the others). Terms that compare
distributions across vocabularies (:attr:`LossTerm.cross_vocabulary`, ULD) get a teacher with another vocabulary and
batches carrying the teacher's own tokenization (``teacher_input_ids``...), as
:class:`~lightning_kd.lm.data.TextDataModule` makes them with ``teacher_tokenizer``.

A Hydra compose costs ~0.5 s of CPU (the ConfigStore holds every timm model twice), so the YAMLs are composed
together once; each case reads its YAML directly, which is the node Hydra puts under ``loss`` for a YAML without a
defaults list or interpolations (checked; any other is composed on its own).
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lm_helpers import tiny_lm
from omegaconf import DictConfig, OmegaConf

from lightning_kd.config import CONF_DIR, compose, loss_config_names
from lightning_kd.engine import build_terms, teacher_view, unpack_batch
from lightning_kd.lm.app import check_lm_config, generation_callbacks
from lightning_kd.lm.data import pad_batch
from lightning_kd.lm.module import LMDistillationModule
from lightning_kd.run import task_runner

LM_LOSSES = loss_config_names("lm")
VOCAB, TEACHER_VOCAB = 64, 80  # the teacher's own vocabulary, for cross-vocabulary terms


def loss_node(loss: str) -> DictConfig:
    """The ``loss`` node of ``task=lm loss=<loss>``."""
    path = CONF_DIR / "loss" / f"{loss}.yaml"
    node = OmegaConf.load(path)
    if "defaults" in node or "${" in path.read_text():
        return compose(["task=lm", f"loss={loss}"]).loss
    return node


def app_config(loss: str, task: str) -> DictConfig:
    """The keys of the app's config the task checks read."""
    return OmegaConf.create({"task": task, "loss": loss_node(loss), "strategy": {"name": "distill"}, "stage": "all"})


def test_lm_losses_are_discovered() -> None:
    # the token divergences of the LM core are all marked task: lm (and none of the image losses is)
    assert {"fkl", "rkl", "symkl", "jsd", "tvd", "skewkl", "skewrkl"} <= set(LM_LOSSES)
    assert not set(LM_LOSSES) & set(loss_config_names("classification"))


def test_every_lm_loss_composes_with_task_lm() -> None:
    """One Hydra compose over all the LM loss YAMLs (a list merges them into one ``loss`` node)."""
    cfg = compose(["task=lm", f"loss=[{','.join(LM_LOSSES)}]"])
    choices = cfg.hydra.runtime.choices
    assert (choices.task, choices.model, choices.teacher, choices.data) == ("lm", "lm_tiny", "lm_small", "text")
    assert cfg.task == "lm" and cfg.loss.task == "lm"
    for loss in LM_LOSSES:
        assert set(loss_node(loss).terms) <= set(cfg.loss.terms), loss


@pytest.mark.parametrize("loss", LM_LOSSES)
def test_lm_loss_is_accepted_by_task_lm_and_refused_by_the_image_task(loss: str) -> None:
    cfg = app_config(loss, "lm")
    assert cfg.loss.task == "lm"
    assert build_terms(cfg.loss.terms), f"loss={loss} builds no term"
    check_lm_config(cfg)  # passes
    assert all(isinstance(cb, Callback) for cb in generation_callbacks(cfg))  # a generation node is a callback
    with pytest.raises(ValueError, match=r"loss=\S+ is a language-model loss: add task=lm"):
        task_runner(app_config(loss, "classification"))


def paired_items(vocab: int, prompt: int, answers: tuple[int, int], seed: int) -> list[dict[str, Any]]:
    """Two prompts, each followed by two different answers: rows 0-1 the first answers, rows 2-3 the second ones to
    the same prompts in the same order (the preference-pair layout DCKD reads, and a plain LM batch for every other
    loss), labels -100 on the prompts."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (prompt,), generator=g).tolist() for _ in range(2)]
    items = []
    for n in answers:
        for p in prompts:
            answer = torch.randint(0, vocab, (n + len(items) % 2,), generator=g).tolist()  # rows of unequal length
            items.append({"input_ids": p + answer, "labels": [-100] * prompt + answer, "prompt_length": prompt})
    return [item | {"index": i} for i, item in enumerate(items)]


def _batch(cross_vocabulary: bool) -> dict[str, Any]:
    batch = pad_batch(paired_items(VOCAB, 3, (6, 4), seed=0), pad_id=0)
    if cross_vocabulary:  # the teacher's own tokenization of "the same texts": other ids, other lengths
        own = pad_batch(paired_items(TEACHER_VOCAB, 4, (7, 5), seed=1), pad_id=0)
        batch |= {f"teacher_{k}": own[k] for k in ("input_ids", "attention_mask", "labels")}
    return batch


@pytest.mark.parametrize("loss", LM_LOSSES)
def test_one_bf16_step_through_the_engine(loss: str) -> None:
    node = loss_node(loss)
    terms = build_terms(node.terms)
    cross = any(term.cross_vocabulary for term in terms.values())
    student = tiny_lm(VOCAB, n_layer=1, seed=0)
    teacher = tiny_lm(TEACHER_VOCAB if cross else VOCAB, n_layer=2, seed=1)
    module = LMDistillationModule(student, teacher, loss=terms, task_weight=float(node.task_weight))
    batch = _batch(cross)
    inputs, targets, _ = unpack_batch(batch)
    teacher_inputs = teacher_view(batch, inputs, targets)[0]
    module.engine.setup(student, inputs, student, 4, None if teacher_inputs is inputs else teacher_inputs)
    module.engine.prepare([batch], "cpu")  # only terms with needs_prepare use it
    module._max_steps = 10  # what on_train_start reads from the trainer (schedules such as TAID's)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert student(**inputs).logits.dtype == torch.bfloat16  # the autocast reaches the student
            value = module.training_step(batch, 0)
    assert value.dtype == torch.float32 and value.dim() == 0, (value.dtype, value.shape)
    assert torch.isfinite(value), value
    value.backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
