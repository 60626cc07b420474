"""Lightning modules for causal language models
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

:class:`CausalLMModule` trains one causal LM on next-token cross-entropy (the LM teacher, or the no-distillation
baseline); :class:`LMDistillationModule` adds a frozen teacher and token-level loss terms
(:mod:`lightning_kd.losses.token`, TAID, ATKD, ULD...). They are the vision side's
:class:`~lightning_kd.module.ClassifierModule` and :class:`~lightning_kd.module.DistillationModule` with the
objective of a language model (:class:`CausalLMObjective`): the same engine, taps, checkpoints and logging.

Batches are dicts in the Hugging Face convention (``input_ids``, ``attention_mask``, ``labels`` with ``-100``
ignored; :class:`~lightning_kd.lm.data.TextDataModule` makes them). Logged: ``train/ce``; at each validation/test
epoch end ``<stage>/loss`` (mean next-token NLL over label tokens), ``<stage>/ppl = exp(<stage>/loss)`` and
``<stage>/acc`` (next-token top-1 accuracy); with a teacher also ``<stage>/agreement``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from lightning_kd.engine import unpack_batch
from lightning_kd.lm.divergences import IGNORE_INDEX, next_token_targets
from lightning_kd.module import ClassifierModule, DistillationModule


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed next-token negative log-likelihood (float32) over the labels that are not ``-100``: the logit at
    ``t`` is scored against ``labels[t + 1]`` (Hugging Face convention)."""
    targets = next_token_targets(labels)
    return F.cross_entropy(
        logits.flatten(0, -2).float(),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
        label_smoothing=label_smoothing,
    )


class TokenNLL(Metric):
    """Next-token NLL, top-1 accuracy and perplexity accumulated over label tokens (summed across DDP ranks)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("correct", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:  # type: ignore[override]
        targets = next_token_targets(labels)
        mask = targets != IGNORE_INDEX
        with torch.no_grad():
            self.nll += next_token_nll(logits, labels).double()
            self.correct += ((logits.argmax(-1) == targets) & mask).sum().double()
            self.tokens += mask.sum().double()

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        tokens = self.tokens.clamp_min(1)
        loss = self.nll / tokens
        return {"loss": loss.float(), "ppl": loss.exp().float(), "acc": (self.correct / tokens).float()}


class CausalLMObjective:
    """The language-model objective shared by :class:`CausalLMModule` and :class:`LMDistillationModule`: mean
    next-token cross-entropy as the task loss, token-weighted perplexity in evaluation, AdamW by default."""

    label_smoothing: float

    def _init_metrics(self) -> None:
        self.val_tokens = TokenNLL()
        self.test_tokens = TokenNLL()

    def task_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the label tokens (float32)."""
        count = (next_token_targets(targets) != IGNORE_INDEX).sum().clamp_min(1)
        return next_token_nll(logits, targets, label_smoothing=self.label_smoothing) / count

    def _evaluate(self, batch: Any, stage: str) -> torch.Tensor:
        inputs, targets, _ = unpack_batch(batch)
        if targets is None:
            raise ValueError("language-model batches need 'labels' (-100 = ignored) to evaluate the next-token loss")
        logits = self(inputs)  # type: ignore[operator]
        getattr(self, f"{stage}_tokens").update(logits, targets)
        return logits

    def _log_tokens(self, stage: str) -> None:
        metric: TokenNLL = getattr(self, f"{stage}_tokens")
        values = metric.compute()
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=stage == "val")  # type: ignore[attr-defined]
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_tokens("val")

    def on_test_epoch_end(self) -> None:
        self._log_tokens("test")

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:  # type: ignore[attr-defined]
            self.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
        return super().configure_optimizers()  # type: ignore[misc]


class CausalLMModule(CausalLMObjective, ClassifierModule):
    """Train a causal LM on next-token cross-entropy (see :class:`~lightning_kd.module.ClassifierModule` for the
    arguments; the default optimizer is AdamW(lr 3e-3, weight decay 0.01))."""

    def __init__(self, model: torch.nn.Module, optimizer: Any = None, scheduler: Any = "cosine", **kw: Any) -> None:
        super().__init__(model, optimizer, scheduler, **kw)
        self._init_metrics()


class LMDistillationModule(CausalLMObjective, DistillationModule):
    """Distil a frozen causal-LM ``teacher`` into ``student``: ``task_weight · CE + Σ weight_i · term_i`` with
    token-level terms (see :class:`~lightning_kd.module.DistillationModule` for the arguments; ``loss`` defaults to
    the forward KL ``fkl``)."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, loss: Any = "fkl", **kw: Any) -> None:
        super().__init__(student, teacher, loss, **kw)
        self._init_metrics()


def perplexity(loss: float) -> float:
    """``exp(loss)``, ``inf`` on overflow."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


__all__ = ["CausalLMModule", "CausalLMObjective", "LMDistillationModule", "TokenNLL", "next_token_nll", "perplexity"]
