"""On-policy (GKD) and sequence-level distillation
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

:class:`OnPolicyDistillation` is the data side of Generalized Knowledge Distillation (Agarwal et al., "On-Policy
Distillation of Language Models: Learning from Self-Generated Mistakes", ICLR 2024): with probability λ a training
batch is replaced by the student's own samples from the batch's prompts, on which the loss terms then compare teacher
and student token by token (GKD's loss is the generalized JSD, ``loss=gkd`` = ``jsd`` β 0.5 + this callback).
``seq_kd=True`` makes the teacher generate the batches that are not on-policy: sequence-level KD (Kim & Rush,
"Sequence-Level Knowledge Distillation", EMNLP 2016), which with ``lmbda=0`` trains on teacher generations only
(``loss=seqkd``). Kim & Rush decode the teacher with beam search; like TRL we sample it (``temperature``).

Order of a step, as TRL's ``GKDTrainer.training_step`` (trl 1.16, ``trl/experimental/gkd/gkd_trainer.py``): draw
``u``; if ``u < λ`` the student generates; else if ``seq_kd`` the teacher generates; else the batch is left as is.
(Older TRL let the teacher generate first and the student overwrite it with probability λ: the same outcome.)
Sampling follows TRL's ``GKDConfig`` defaults: temperature 0.9, ``top_k`` 0 (off), ``top_p`` 1.0, no gradient; the
completion ends at the first eos, which is labelled. ``u`` is derived from ``(seed, global step, batch index)``, so
every DDP rank makes the same choice and a resumed run makes the same choices again.

Logged: ``train/on_policy``, the fraction of this fit's batches (so far) that were the student's generations.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from lightning_kd.lm.generation.base import GenerationCallback, TokenIds, check_sampling
from lightning_kd.lm.generation.batch import check_token_batch, pack_sequences, prompts_of, rewrite_batch

STUDENT, TEACHER = "student", "teacher"


class OnPolicyDistillation(GenerationCallback):
    """Replace training batches by student (probability ``lmbda``) or teacher (``seq_kd``) generations.

    Args:
        lmbda: λ, the probability that a batch is the student's own generations (0 = supervised KD, 1 = fully
            on-policy; TRL's default 0.5).
        seq_kd: let the teacher generate the batches that are not on-policy (sequence-level KD).
        max_new_tokens: completion length at most (TRL's default 128).
        temperature, top_k, top_p: sampling (TRL: 0.9, 0 = no top-k, 1.0 = no nucleus).
        seed, student, distill_callback, eos_token_id, pad_token_id: see :class:`GenerationCallback`.
    """

    def __init__(
        self,
        lmbda: float = 0.5,
        seq_kd: bool = False,
        max_new_tokens: int = 128,
        temperature: float = 0.9,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        student: str | None = None,
        distill_callback: str | None = None,
        eos_token_id: TokenIds = None,
        pad_token_id: int | None = None,
    ) -> None:
        super().__init__(
            max_new_tokens=max_new_tokens,
            seed=seed,
            student=student,
            distill_callback=distill_callback,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        if not 0 <= lmbda <= 1:
            raise ValueError(f"OnPolicyDistillation: lmbda must be in [0, 1], got {lmbda}")
        check_sampling("OnPolicyDistillation", temperature, top_k, top_p)
        self.lmbda = float(lmbda)
        self.seq_kd = bool(seq_kd)
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.batches = 0
        self.on_policy_batches = 0

    @property
    def needs_teacher(self) -> bool:  # type: ignore[override]
        return self.seq_kd

    def source(self, step: int, batch_idx: int) -> str | None:
        """Who generates batch ``batch_idx`` of global step ``step``: ``"student"`` (probability λ), else
        ``"teacher"`` with ``seq_kd``, else ``None`` (the batch is kept)."""
        if self.coin("lambda", step, batch_idx) < self.lmbda:
            return STUDENT
        return TEACHER if self.seq_kd else None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        source = self.source(trainer.global_step, batch_idx)
        if source is not None:
            batch = check_token_batch(batch, self._name)
            model = self.student_model(pl_module) if source == STUDENT else self.teacher_model(trainer, pl_module)
            prompts = prompts_of(batch)
            with self.precision_context(trainer):
                completions = self.sample(
                    model,
                    prompts,
                    seed=self.batch_seed(trainer, batch_idx),
                    temperature=self.temperature,
                    top_k=self.top_k,
                    top_p=self.top_p,
                )
            rewrite_batch(batch, pack_sequences(prompts, completions, self.token_ids(model)[1]))
        self.batches += 1
        self.on_policy_batches += source == STUDENT
        size = len(batch["input_ids"]) if isinstance(batch, dict) and "input_ids" in batch else None
        pl_module.log("train/on_policy", self.on_policy_batches / self.batches, batch_size=size)

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "on_policy_batches": self.on_policy_batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches = int(state_dict.get("batches", 0))
        self.on_policy_batches = int(state_dict.get("on_policy_batches", 0))


__all__ = ["OnPolicyDistillation"]
