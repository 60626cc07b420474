"""DistiLLM's adaptive off-policy student-generated outputs
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models" (ICML 2024): student-generated
outputs (SGOs) are used with a probability p that rises when the validation loss gets worse, and they are reused
off-policy from a replay buffer, which saves most of the generation cost. ``loss=distillm`` pairs this callback with
the skew KL (α = 0.1).

The rule, as in the released code (github:jongwooko/distillm, ``finetune.py`` and ``distillm/buffer.py``; defaults
from ``arguments.py`` and ``scripts/gpt2/distillm/*.sh``):

- p starts at ``init_threshold`` (0.0). At each step draw ``u ~ U[0, 1)`` and set the fresh-sample threshold
  ``s = p·(1 − t/T)`` (``replay_ratio="decreasing"``, the default; ``"constant"``: ``p/2``; ``"increasing"``:
  ``p·t/T``), ``t`` the step (1-based) and ``T`` the total number of steps;
- if ``u < s``, or ``u < p`` while the buffer holds fewer than ``capacity`` (1000) samples, the student generates
  completions of the batch's prompts, they go into the buffer and the step trains on them;
- else if ``u < p`` the step trains on ``batch size`` samples drawn uniformly without replacement from the buffer;
- else the batch is kept;
- after each validation, if ``val_loss ≥ prev + loss_eps`` (``loss_eps`` 0.1): ``p ← min(p + 0.1, 1)`` and
  ``prev ← val_loss``. ``prev`` only moves when p rises; it starts at the loss before training in DistiLLM, here at the
  first validation after training started (the sanity check is skipped).

DistiLLM samples with temperature 1, no top-k, top-p 1 (``--temperature 1.0 --top-k 0 --gen-top-p 1.0``) and
``max_length − max_prompt_length = 512 − 256 = 256`` new tokens; it validates once per epoch (``--eval-interval -1``).
Here ``u`` is derived from ``(seed, step, batch index)``, and the monitored loss is averaged over DDP ranks, so every
rank takes the same branch; each rank keeps its own buffer (its own data), and a checkpoint stores rank 0's.

Logged: ``train/sgo/threshold`` (p), ``train/sgo/fresh`` and ``train/sgo/replayed`` (fractions of this fit's
batches so far), ``train/sgo/buffer`` (samples held).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch

from lightning_kd.lm.generation.base import GenerationCallback, TokenIds, check_sampling
from lightning_kd.lm.generation.batch import check_token_batch, derive_seed, pack_sequences, prompts_of, rewrite_batch
from lightning_kd.trainer_utils import max_steps_of

REPLAY_RATIOS = ("decreasing", "constant", "increasing")
FRESH, REPLAYED = "fresh", "replayed"


class ReplayBuffer:
    """The last ``capacity`` student generations, one entry per sample, on the CPU: ``input_ids`` (prompt +
    completion, unpadded), ``prompt_length`` and the dataset ``index`` (-1 when the batch had none)."""

    def __init__(self, capacity: int) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"ReplayBuffer: capacity must be a positive integer, got {capacity!r}")
        self.capacity = capacity
        self.samples: deque[dict[str, Any]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def full(self) -> bool:
        return len(self.samples) >= self.capacity

    def add(self, packed: Mapping[str, torch.Tensor], index: torch.Tensor | None) -> None:
        """Store the rows of a packed batch (:func:`~lightning_kd.lm.generation.batch.pack_sequences`)."""
        lengths = packed["attention_mask"].sum(-1).tolist()
        prompts = packed["prompt_lengths"].tolist()
        indices = index.tolist() if index is not None else [-1] * len(lengths)
        for row, n, p, i in zip(packed["input_ids"].cpu(), lengths, prompts, indices):
            self.samples.append({"input_ids": row[:n].clone(), "prompt_length": int(p), "index": int(i)})

    def draw(self, n: int, generator: torch.Generator) -> list[dict[str, Any]]:
        """``n`` samples drawn uniformly without replacement."""
        if n > len(self.samples):
            raise ValueError(
                f"cannot replay a batch of {n} samples from a buffer of {len(self.samples)}: make the capacity at "
                "least the batch size"
            )
        return [self.samples[j] for j in torch.randperm(len(self.samples), generator=generator)[:n].tolist()]

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "samples": [dict(s) for s in self.samples]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.samples = deque((dict(s) for s in state.get("samples", [])), maxlen=self.capacity)


class AdaptiveOffPolicy(GenerationCallback):
    """DistiLLM's adaptive off-policy use of student-generated outputs (see the module documentation).

    Args:
        capacity: replay-buffer size in samples (DistiLLM ``--capacity 1000``).
        init_threshold: the initial probability p of training on student outputs (``--init-threshold 0.0``).
        loss_eps: the validation-loss increase that raises p (``--loss-eps 0.1``).
        threshold_step: how much p rises each time (0.1 in DistiLLM, hard-coded there).
        replay_ratio: how the fresh share ``s/p`` evolves over training: ``decreasing`` (DistiLLM's default),
            ``constant`` or ``increasing``.
        monitor: the validation metric (a loss: lower is better) whose worsening raises p.
        max_new_tokens: completion length at most (DistiLLM: 256).
        temperature, top_k, top_p: sampling (DistiLLM: 1.0, 0 = off, 1.0).
        seed, student, eos_token_id, pad_token_id: see :class:`GenerationCallback`.
    """

    def __init__(
        self,
        capacity: int = 1000,
        init_threshold: float = 0.0,
        loss_eps: float = 0.1,
        threshold_step: float = 0.1,
        replay_ratio: str = "decreasing",
        monitor: str = "val/loss",
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        student: str | None = None,
        eos_token_id: TokenIds = None,
        pad_token_id: int | None = None,
    ) -> None:
        super().__init__(
            max_new_tokens=max_new_tokens,
            seed=seed,
            student=student,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        if not 0 <= init_threshold <= 1:
            raise ValueError(f"AdaptiveOffPolicy: init_threshold must be in [0, 1], got {init_threshold}")
        if replay_ratio not in REPLAY_RATIOS:
            raise ValueError(f"AdaptiveOffPolicy: replay_ratio must be one of {REPLAY_RATIOS}, got {replay_ratio!r}")
        check_sampling("AdaptiveOffPolicy", temperature, top_k, top_p)
        self.buffer = ReplayBuffer(capacity)
        self.threshold = float(init_threshold)
        self.loss_eps = float(loss_eps)
        self.threshold_step = float(threshold_step)
        self.replay_ratio = replay_ratio
        self.monitor = monitor
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.prev_loss: float | None = None
        self.counts = {"batches": 0, FRESH: 0, REPLAYED: 0}
        self._total_steps = -1

    # -- the schedule ------------------------------------------------------------------------------------------------
    def fresh_threshold(self, step: int) -> float:
        """``s``: the probability of fresh student generations at global step ``step`` (0-based)."""
        p = self.threshold
        if self.replay_ratio == "constant":
            return 0.5 * p
        progress = min(1.0, (step + 1) / self._total_steps)
        return p * progress if self.replay_ratio == "increasing" else p * (1 - progress)

    def choose(self, step: int, batch_idx: int) -> str | None:
        """``"fresh"``, ``"replayed"`` or ``None`` (keep the batch) for batch ``batch_idx`` of step ``step``."""
        u = self.coin("sgo", step, batch_idx)
        if u < self.fresh_threshold(step) or (u < self.threshold and not self.buffer.full):
            return FRESH
        return REPLAYED if u < self.threshold else None

    def update(self, val_loss: float) -> None:
        """DistiLLM's rule after a validation: raise p by ``threshold_step`` (at most 1) when ``val_loss`` is at
        least ``loss_eps`` above the loss at the last raise (the first call only records the loss)."""
        if self.prev_loss is None:
            self.prev_loss = float(val_loss)
        elif val_loss >= self.prev_loss + self.loss_eps:
            self.threshold = min(self.threshold + self.threshold_step, 1.0)
            self.prev_loss = float(val_loss)

    # -- hooks -------------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._total_steps = max_steps_of(trainer)
        if self.replay_ratio != "constant" and self._total_steps <= 0:
            raise RuntimeError(
                f"AdaptiveOffPolicy(replay_ratio={self.replay_ratio!r}) needs the number of training steps; set "
                "trainer max_steps (or use a dataloader with a length), or replay_ratio='constant'"
            )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        choice = self.choose(step, batch_idx)
        if choice is not None:
            batch = check_token_batch(batch, self._name)
            student = self.student_model(pl_module)
            pad = self.token_ids(student)[1]
            index = batch.get("index") if isinstance(batch.get("index"), torch.Tensor) else None
            if choice == FRESH:
                prompts = prompts_of(batch)
                with self.precision_context(trainer):
                    completions = self.sample(
                        student,
                        prompts,
                        seed=self.batch_seed(trainer, batch_idx),
                        temperature=self.temperature,
                        top_k=self.top_k,
                        top_p=self.top_p,
                    )
                packed = pack_sequences(prompts, completions, pad)
                self.buffer.add(packed, index)
            else:
                size = len(batch["input_ids"])
                generator = torch.Generator().manual_seed(
                    derive_seed(self.seed, "replay", trainer.global_rank, step, batch_idx)
                )
                samples = self.buffer.draw(size, generator)
                device = batch["input_ids"].device
                rows = [s["input_ids"].to(device) for s in samples]
                prompts = [row[: s["prompt_length"]] for row, s in zip(rows, samples)]
                packed = pack_sequences(prompts, [row[len(p) :] for row, p in zip(rows, prompts)], pad)
                if index is not None:
                    batch["index"] = torch.tensor([s["index"] for s in samples], device=index.device)
            rewrite_batch(batch, packed)
            self.counts[choice] += 1
        self.counts["batches"] += 1
        n = self.counts["batches"]
        size = len(batch["input_ids"]) if isinstance(batch, dict) and "input_ids" in batch else None
        logs = {
            "train/sgo/threshold": self.threshold,
            "train/sgo/fresh": self.counts[FRESH] / n,
            "train/sgo/replayed": self.counts[REPLAYED] / n,
            "train/sgo/buffer": float(len(self.buffer)),
        }
        pl_module.log_dict(logs, batch_size=size)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise KeyError(
                f"AdaptiveOffPolicy monitors {self.monitor!r}, which the module did not log in validation (logged: "
                f"{sorted(trainer.callback_metrics)}); set monitor= to the validation loss it logs"
            )
        value = torch.as_tensor(value, dtype=torch.float32, device=pl_module.device)
        self.update(float(trainer.strategy.reduce(value, reduce_op="mean")))

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "prev_loss": self.prev_loss,
            "counts": dict(self.counts),
            "buffer": self.buffer.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.threshold = float(state_dict["threshold"])
        self.prev_loss = state_dict.get("prev_loss")
        self.counts = {"batches": 0, FRESH: 0, REPLAYED: 0, **state_dict.get("counts", {})}
        self.buffer.load_state_dict(state_dict.get("buffer", {}))


__all__ = ["AdaptiveOffPolicy", "ReplayBuffer"]
