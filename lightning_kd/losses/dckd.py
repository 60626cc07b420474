"""DCKD: dual-constrained knowledge distillation for preference alignment
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Gao et al., "Advantage-Guided Distillation for Preference Alignment in Small Language Models", ICLR 2025. DCKD is the
paper's first method: knowledge distillation "with two KL-divergence constraints from the aligned teacher to the
unaligned student", on the preferred *and* the dispreferred response of each preference pair, so the student also
learns how the aligned (DPO) teacher scores what should not be generated. With ``y⁺``/``y⁻`` the chosen/rejected
responses to the same prompt, ``π_T`` the aligned teacher and ``π_S`` the student, per token ``t`` of a response:

.. math::

    \\mathcal{L}_{\\mathrm{DCKD}} = w_{\\mathrm{sft}}\\,\\mathrm{mean}_{t \\in y^+}\\big[-\\log \\pi_S(y^+_t)\\big]
    + w^+\\,\\mathrm{mean}_{t \\in y^+} \\mathrm{KL}(\\pi_T \\,\\|\\, \\pi_S)
    + w^-\\,\\mathrm{mean}_{t \\in y^-} \\mathrm{KL}(\\pi_T \\,\\|\\, \\pi_S).

**Confirmed** against the training script released with the paper's ADPA pipeline (``DistillTrainer
.get_batch_loss_metrics``: ``sft_on_chosen``·NLL on the chosen response + ``distillation_weight``·(
``chosen_distil_weight``·FKL on chosen + ``rejected_distil_weight``·FKL on rejected), per-token forward KL summed over
the vocabulary and averaged over each response's label tokens, softmax at temperature 1, chosen and rejected rows
run through the student in one concatenated batch) and its README ("KL constraints on both the chosen and rejected
responses"). ``distillation_weight`` is folded into ``chosen_weight``/``rejected_weight`` here. **Not reproduced:**
the released pipeline stores the teacher's probabilities top-k compressed (a storage trick; here the teacher runs
online over the full vocabulary) and clamps the student's probabilities at 1e-7 before the log (here: exact
log-softmax). The paper's tuned weights were not available to check: all three default to 1. ADPA (the advantage
term, which needs a second, reference teacher and student-generated responses) is not implemented here.

**Batch layout.** Like the authors' trainer (and TRL's ``concatenated_forward``), a batch of ``2B`` rows holds the
``B`` chosen sequences first and then the ``B`` rejected sequences, row ``i`` and row ``i + B`` answering the same
prompt; labels are ``-100`` on the prompt and padding. The term checks the layout (even batch, same prompt tokens in
each pair, read from ``input_ids`` under the attention mask) and raises otherwise;
:func:`concat_preference_pairs` builds such a batch from a chosen and a rejected token batch. It contains the NLL on
the chosen responses, so it replaces the task loss (``task_weight`` defaults to 0: the next-token loss on all rows
would also train on the rejected responses).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from lightning_kd.lm.divergences import FORWARD_KL, RowData, TokenDivergence, next_token_targets, token_divergence
from lightning_kd.losses.base import DistillBatch, register_loss
from lightning_kd.losses.token import TokenDivergenceLoss, attention_mask_of, sequence_logits


def gold_nll(log_q: torch.Tensor, log_p: torch.Tensor, rows: RowData) -> tuple[torch.Tensor, torch.Tensor]:
    """``−log q_g`` for the gold ids ``rows["gold"]`` (the teacher is not used); ``∂/∂log q = −onehot(g)``."""
    index = rows["gold"].long().unsqueeze(-1)
    value = -log_q.gather(-1, index).squeeze(-1)
    grad = torch.zeros_like(log_q).scatter_(-1, index, -1.0)
    return value, grad


#: the student's negative log-likelihood of the gold tokens, as a chunked token "divergence".
GOLD_NLL = TokenDivergence("gold_nll", gold_nll)


def _weight(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"dckd: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _leading_prompt(ids: torch.Tensor, labels: torch.Tensor, attention: torch.Tensor | None) -> list[int]:
    """The tokens of one row before its first labelled token, padding (attention 0) left out."""
    labelled = (labels != -100).nonzero()
    end = int(labelled[0]) if labelled.numel() else labels.numel()
    keep = torch.ones(end, dtype=torch.bool) if attention is None else attention[:end].bool().cpu()
    return ids[:end].cpu()[keep].tolist()


def check_preference_pairs(batch: DistillBatch) -> int:
    """``B`` for a batch of ``2B`` rows laid out as chosen rows then rejected rows with the same prompts; a
    ``ValueError`` saying what is wrong otherwise."""
    labels = batch.targets
    if labels is None:
        raise ValueError(
            "dckd: needs labels (-100 on the prompt and padding) to find the response tokens; the batch has none"
        )
    rows = labels.shape[0]
    if rows % 2:
        raise ValueError(
            f"dckd: a batch of preference pairs has an even number of rows (B chosen, then B rejected); got {rows}"
        )
    half = rows // 2
    inputs = batch.inputs if isinstance(batch.inputs, dict) else {}
    ids, attention = inputs.get("input_ids"), attention_mask_of(batch)
    if ids is None:
        return half
    for i in range(half):
        args = [(ids[r], labels[r], None if attention is None else attention[r]) for r in (i, i + half)]
        if _leading_prompt(*args[0]) != _leading_prompt(*args[1]):
            raise ValueError(
                f"dckd: rows {i} and {i + half} have different prompts; a batch must hold the B chosen responses "
                "first and then the B rejected responses to the same prompts, in the same order (as DPO trainers "
                "concatenate them)"
            )
    return half


#: pad value of each ``[B, T]`` key of a token batch when two batches are brought to the same length.
_PAD_VALUES = {"labels": -100, "attention_mask": 0}


def concat_preference_pairs(chosen: dict, rejected: dict, pad_id: int = 0) -> dict:
    """One DCKD batch from a token batch of chosen responses and one of rejected responses to the same prompts (row
    ``i`` of each), in the Hugging Face form (``input_ids``, ``attention_mask``, ``labels``): the ``[B, T]`` tensors
    are right-padded to the longer length (``pad_id``, attention 0, label -100) and stacked chosen first. Sample
    indices (``index``/``indices``/``idx``) are dropped: a chosen and a rejected row would share one, and a teacher
    cache keyed by index would then mix them up; other ``[B]`` tensors are concatenated."""
    rows = chosen["input_ids"].shape[0]
    if rejected["input_ids"].shape[0] != rows:
        raise ValueError(
            f"dckd: {rows} chosen rows but {rejected['input_ids'].shape[0]} rejected rows; pairs need one of each"
        )
    width = max(chosen["input_ids"].shape[1], rejected["input_ids"].shape[1])
    out: dict = {}
    for key, value in chosen.items():
        if key in ("index", "indices", "idx") or not isinstance(value, torch.Tensor):
            continue
        other = rejected[key]
        if value.dim() == 2:
            fill = _PAD_VALUES.get(key, pad_id)
            value, other = (torch.nn.functional.pad(v, (0, width - v.shape[1]), value=fill) for v in (value, other))
        out[key] = torch.cat([value, other])
    return out


@register_loss("dckd")
class DCKDLoss(TokenDivergenceLoss):
    """DCKD (Gao et al., ICLR 2025): NLL on the chosen responses plus forward KL to the aligned teacher on both the
    chosen and the rejected responses (module docstring for the batch layout).

    Args:
        weight: weight of the term.
        sft_weight: weight of the student's NLL on the chosen responses (the authors' ``sft_on_chosen``).
        chosen_weight: weight of the forward KL on the chosen responses (``chosen_distil_weight``).
        rejected_weight: weight of the forward KL on the rejected responses (``rejected_distil_weight``).
        temperature: τ > 0 on both logits in the KL parts (authors: 1); the NLL is always at τ = 1.
        shift_labels: labels aligned with the input ids (the logit at t is scored at label t + 1).
        chunk_size: positions per chunk (default: 2²¹ float32 values per chunk).
    """

    replaces_task_loss: ClassVar[bool] = True
    #: batches must hold preference pairs (:func:`concat_preference_pairs`), not plain token batches.
    preference_pairs: ClassVar[bool] = True

    def __init__(
        self,
        weight: float = 1.0,
        sft_weight: float = 1.0,
        chosen_weight: float = 1.0,
        rejected_weight: float = 1.0,
        temperature: float = 1.0,
        shift_labels: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(weight, temperature, shift_labels, chunk_size)
        self.sft_weight = _weight("sft_weight", sft_weight)
        self.chosen_weight = _weight("chosen_weight", chosen_weight)
        self.rejected_weight = _weight("rejected_weight", rejected_weight)
        self.div = FORWARD_KL
        self.params = {}

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        student = sequence_logits("dckd", batch.student.logits)
        half = check_preference_pairs(batch)
        assert batch.targets is not None
        scored = self.positions(batch)
        chosen = scored.clone()
        chosen[half:] = False
        rejected = scored.clone()
        rejected[:half] = False
        teacher = batch.teacher.logits
        common = {"temperature": self.temperature, "chunk_size": self.chunk_size}
        kl_chosen = token_divergence(student, teacher, chosen, self.div, **common)
        kl_rejected = token_divergence(student, teacher, rejected, self.div, **common)
        gold = next_token_targets(batch.targets, self.shift_labels).clamp_min(0)
        nll = token_divergence(student, teacher, chosen, GOLD_NLL, chunk_size=self.chunk_size, row_data={"gold": gold})
        self.diagnostics = {
            "nll_chosen": nll.detach(),
            "kl_chosen": kl_chosen.detach(),
            "kl_rejected": kl_rejected.detach(),
        }
        return self.sft_weight * nll + self.chosen_weight * kl_chosen + self.rejected_weight * kl_rejected

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, sft_weight={self.sft_weight}, chosen_weight={self.chosen_weight}, "
            f"rejected_weight={self.rejected_weight}, temperature={self.temperature}"
        )


__all__ = ["GOLD_NLL", "DCKDLoss", "check_preference_pairs", "concat_preference_pairs", "gold_nll"]
