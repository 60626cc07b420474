"""Universal Logit Distillation: distillation across tokenizers
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs" (2024;
reference code: Nicolas-BZRD/llm-recipes, ``models/distillation_model.py``).

A teacher and a student with different tokenizers have different vocabularies and cut the same text into different
numbers of tokens, so their next-token distributions can be compared neither entry by entry nor position by
position. ULD compares them through a Wasserstein-1 distance whose cost ignores token identity: with every
vocabulary entry at the same distance from every other, the optimal transport between two distributions reduces,
once both are **sorted in descending order** and the smaller vocabulary is **zero-padded**, to

.. math::

    \\mathrm{ULD}(q, p) = \\sum_{i=1}^{\\max(V_S, V_T)} \\big| q_{(i)} - p_{(i)} \\big|,
    \\qquad q = \\operatorname{softmax}(z_S/\\tau_S),\\; p = \\operatorname{softmax}(z_T/\\tau_T),

where ``q_(i)`` is the ``i``-th largest student probability (``0`` beyond ``V_S``), likewise ``p_(i)``.

Positions. Each model reads its own tokenization of the same text, with the prompt and the answer tokenized
separately (:class:`~lightning_kd.lm.data.TextDataModule` with ``teacher_tokenizer``), so both answers start at a
token boundary. Per sample, the answer tokens of each side are those whose label is not ``-100``; the ``k``-th
answer token of the student is paired with the ``k``-th answer token of the teacher, from the first one on, and the
longer answer is **truncated** to the shorter. Labels follow Hugging Face (aligned with the input ids): the
distribution scored for the answer token at ``t + 1`` is the logit at ``t`` on both sides. Per answer, the
per-position distances are averaged; the answers of the batch are then averaged (``reduction="sample"``, as the
reference code) or all aligned positions averaged at once (``reduction="token"``). ``skip_eos`` drops the last
answer token of each side (the end-of-sequence token that both tokenizations append; a truncated answer loses a real
token instead). The paper's total is ``w_CE · CE + w_D · ULD``: ``w_CE`` is the engine's ``task_weight`` (the
student's own next-token cross-entropy), ``w_D`` this term's ``weight``; both 1 in the reference.

Computation. :func:`~lightning_kd.lm.divergences.token_divergence` runs over the student's aligned positions in
chunks; each chunk gathers the paired teacher rows, computes both softmaxes in float32, sorts them and returns the
distance with its closed-form gradient: with ``r(v)`` the rank of entry ``v`` in the student's descending order and
``g_v = sign(q_v − p_(r(v)))``, ``∂ULD/∂log q_v = q_v · g_v`` (the sort is a locally constant permutation), which
the shared mechanism maps through the softmax. Memory above the logits: the student-logit gradient (which backward
allocates anyway) and, per chunk of ``n`` positions, about ten float32 arrays of ``n × V_S`` (the mechanism's and
the sort's temporaries) and five of ``n × V_T`` (the gathered teacher rows, their softmax and sort), int64 sort
orders included; ``n`` is chosen so that one array of the larger vocabulary holds 2²¹ values (8 MiB), so the peak
stays near 120 MiB whatever the sequence length and vocabularies (measured on CPU: 2 × 256 positions, V_S = 16k,
V_T = 32k, float32: 129 MiB above the inputs, 31 MiB of it the gradient; 2 × 1024 positions: 223 MiB, 125 MiB of
it the gradient).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from lightning_kd.losses.base import DistillBatch, LossTerm, check_number, register_loss
from lightning_kd.losses.token import sequence_logits

REDUCTIONS = ("sample", "token")


def answer_ranks(labels: torch.Tensor, shift: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, rank)`` of the scored logit positions: ``mask[b, t]`` says the logit at ``t`` is scored against an
    answer label (:func:`~lightning_kd.lm.divergences.next_token_mask`), ``rank[b, t]`` is its order among the
    scored positions of row ``b`` (0 for the first answer token; meaningless where ``mask`` is false)."""
    from lightning_kd.lm.divergences import next_token_mask

    mask = next_token_mask(labels, shift)
    return mask, mask.long().cumsum(-1) - 1


def align_answers(
    student_labels: torch.Tensor, teacher_labels: torch.Tensor, *, shift: bool = True, skip_eos: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair the answer positions of two tokenizations of the same batch.

    Args:
        student_labels: ``[B, T_S]``, ``-100`` on prompt and padding.
        teacher_labels: ``[B, T_T]``, the teacher's own labels of the same samples.
        shift: labels aligned with the input ids (the logit at ``t`` predicts the label at ``t + 1``).
        skip_eos: drop the last answer position of each side before pairing.

    Returns:
        ``(mask, teacher_row, length)``: ``mask [B, T_S]`` the student positions that are scored; ``teacher_row
        [B, T_S]`` for each of them the row ``b · T_T + t`` of the teacher's flattened logits it is paired with (the
        same answer rank); ``length [B]`` the paired positions per sample, ``min`` of the two answer lengths.
    """
    if student_labels.dim() != 2 or teacher_labels.dim() != 2 or len(student_labels) != len(teacher_labels):
        raise ValueError(
            f"uld: student labels {tuple(student_labels.shape)} and teacher labels {tuple(teacher_labels.shape)} must "
            "be [batch, sequence] with the same batch size (the teacher's own tokenization of the same samples)"
        )
    s_mask, s_rank = answer_ranks(student_labels, shift)
    t_mask, t_rank = answer_ranks(teacher_labels, shift)
    drop = 1 if skip_eos else 0
    length = torch.minimum(s_mask.sum(-1) - drop, t_mask.sum(-1) - drop).clamp_min(0)
    s_keep = s_mask & (s_rank < length[:, None])
    t_keep = t_mask & (t_rank < length[:, None])
    t_len = teacher_labels.shape[1]
    # table[b, r] = flat teacher row of the answer position of rank r in sample b
    table = torch.zeros(teacher_labels.shape, dtype=torch.long, device=teacher_labels.device)
    b_idx, t_idx = t_keep.nonzero(as_tuple=True)
    table[b_idx, t_rank[b_idx, t_idx]] = b_idx * t_len + t_idx
    teacher_row = table.gather(1, s_rank.clamp(0, t_len - 1))
    return s_keep, torch.where(s_keep, teacher_row, 0), length


def sorted_l1(log_q: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ULD's distance between rows of student log-probabilities ``log_q [n, V_S]`` and teacher probabilities
    ``p [n, V_T]`` (float32): ``Σ_i |q_(i) − p_(i)|`` over both rows sorted in descending order, the shorter one
    zero-padded; and its gradient with respect to ``log q`` in the student's vocabulary order."""
    q = log_q.exp()
    q_sorted, order = q.sort(-1, descending=True)
    p_sorted = p.sort(-1, descending=True).values
    v_s, v_t = q.shape[-1], p.shape[-1]
    tail = p_sorted[:, v_s:].sum(-1) if v_t > v_s else None  # teacher mass facing the student's zero padding
    head = p_sorted[:, :v_s] if v_t >= v_s else F.pad(p_sorted, (0, v_s - v_t))
    diff = q_sorted - head
    value = diff.abs().sum(-1)
    if tail is not None:
        value = value + tail
    grad = torch.zeros_like(q).scatter_(-1, order, q_sorted * diff.sign())
    return value, grad


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_labels: torch.Tensor,
    teacher_labels: torch.Tensor,
    *,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    skip_eos: bool = False,
    reduction: str = "sample",
    shift_labels: bool = True,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The ULD distance (module docstring) between a student and a teacher that tokenize the same samples
    differently.

    Args:
        student_logits: ``[B, T_S, V_S]`` (any float dtype; receives the gradient).
        teacher_logits: ``[B, T_T, V_T]`` (constants).
        student_labels, teacher_labels: ``[B, T_S]`` / ``[B, T_T]``, ``-100`` outside the answers.
        student_temperature, teacher_temperature: τ_S, τ_T > 0.
        skip_eos: drop the last answer token of each side.
        reduction: ``"sample"`` (mean per answer, then over the answers that have a paired position; the reference
            code) or ``"token"`` (mean over every paired position).
        shift_labels: labels aligned with the input ids (Hugging Face); ``False`` when aligned with the logits.
        chunk_size: positions per chunk (default: 2²¹ float32 values of the larger vocabulary per chunk).

    Returns:
        a float32 scalar; 0 (zero gradient) when no position can be paired.
    """
    from lightning_kd.lm.divergences import DEFAULT_CHUNK_ELEMENTS, TokenDivergence, log_probs, token_divergence

    if reduction not in REDUCTIONS:
        raise ValueError(f"uld: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for logits, labels, side in (
        (student_logits, student_labels, "student"),
        (teacher_logits, teacher_labels, "teacher"),
    ):
        if logits.dim() != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(
                f"uld: {side} logits {tuple(logits.shape)} must be [batch, sequence, vocabulary] and its labels "
                f"{tuple(labels.shape)} [batch, sequence] of the same sequence length"
            )
    mask, teacher_row, length = align_answers(student_labels, teacher_labels, shift=shift_labels, skip_eos=skip_eos)
    if reduction == "sample":
        answers = (length > 0).sum().clamp_min(1)
        per_sample = 1.0 / (length.clamp_min(1) * answers).double()
    else:
        per_sample = (1.0 / length.sum().clamp_min(1).double()).expand_as(length)
    weight = per_sample.float()[:, None].expand_as(mask).contiguous()
    teacher_flat = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    t_temp = check_number("uld", "teacher_temperature", teacher_temperature, positive=True)

    def fn(log_q: torch.Tensor, _no_teacher: None, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        p = log_probs(teacher_flat.index_select(0, rows["teacher_row"]), t_temp).exp()
        value, grad = sorted_l1(log_q, p)
        w = rows["weight"]
        return value * w, grad * w[:, None]

    # The teacher's rows enter through ``row_data`` (its vocabulary and positions differ from the student's), so the
    # shared mechanism gets no teacher logits of the student's shape.
    rows = chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // max(student_logits.shape[-1], teacher_logits.shape[-1]))
    return token_divergence(
        student_logits, None, mask, TokenDivergence("uld", fn), temperature=student_temperature,
        chunk_size=rows, normalizer=1.0, row_data={"teacher_row": teacher_row, "weight": weight},
    )  # fmt: skip


@register_loss("uld")
class ULDLoss(LossTerm):
    """Universal Logit Distillation (Boizard et al. 2024): the sorted-probability L1 distance (a closed-form
    Wasserstein-1) between the student's and the teacher's next-token distributions on the answer tokens, paired
    from the first answer token and truncated to the shorter answer, across different tokenizers and vocabularies
    (module docstring, :func:`uld_loss`).

    The batch must carry the teacher's own tokenization (``teacher_input_ids``, ``teacher_attention_mask``,
    ``teacher_labels``: ``TextDataModule(teacher_tokenizer=...)``), which gives ``DistillBatch.teacher_targets``.
    Without it, the teacher is taken to read the student's tokens when both logits have the same shape.

    Args:
        weight: ``w_D``, the term's weight (the cross-entropy's ``w_CE`` is the engine's ``task_weight``).
        student_temperature, teacher_temperature: τ_S, τ_T > 0 (1 and 1 in the reference).
        skip_eos: drop the last answer token (EOS) of each side.
        reduction: ``"sample"`` (reference) or ``"token"``; see :func:`uld_loss`.
        shift_labels: labels aligned with the input ids (Hugging Face convention).
        chunk_size: positions per chunk (``None``: 2²¹ float32 values of the larger vocabulary per chunk).
    """

    cross_vocabulary: ClassVar[bool] = True

    def __init__(
        self,
        weight: float = 1.0,
        student_temperature: float = 1.0,
        teacher_temperature: float = 1.0,
        skip_eos: bool = False,
        reduction: str = "sample",
        shift_labels: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(weight)
        self.student_temperature = check_number("uld", "student_temperature", student_temperature, positive=True)
        self.teacher_temperature = check_number("uld", "teacher_temperature", teacher_temperature, positive=True)
        if reduction not in REDUCTIONS:
            raise ValueError(f"uld: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"uld: chunk_size must be a positive integer or null, got {chunk_size!r}")
        self.skip_eos = bool(skip_eos)
        self.reduction = reduction
        self.shift_labels = bool(shift_labels)
        self.chunk_size = chunk_size

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        student = sequence_logits("uld", batch.student.logits)
        teacher = sequence_logits("uld", batch.teacher.logits)
        if batch.targets is None:
            raise ValueError("uld: the batch has no labels; token batches need 'labels' (-100 outside the answers)")
        teacher_labels = batch.teacher_targets
        if teacher_labels is None:
            if teacher.shape != student.shape:
                raise ValueError(
                    f"uld: the batch has no teacher labels, and the teacher's logits {tuple(teacher.shape)} differ "
                    f"from the student's {tuple(student.shape)}: give the data the teacher's tokenizer "
                    "(TextDataModule(teacher_tokenizer=...)) or add teacher_input_ids, teacher_attention_mask and "
                    "teacher_labels to the batch"
                )
            teacher_labels = batch.targets  # the teacher read the student's own tokens
        return uld_loss(
            student, teacher, batch.targets, teacher_labels, student_temperature=self.student_temperature,
            teacher_temperature=self.teacher_temperature, skip_eos=self.skip_eos, reduction=self.reduction,
            shift_labels=self.shift_labels, chunk_size=self.chunk_size,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, student_temperature={self.student_temperature}, "
            f"teacher_temperature={self.teacher_temperature}, skip_eos={self.skip_eos}, reduction={self.reduction!r}"
        )


__all__ = ["ULDLoss", "align_answers", "answer_ranks", "sorted_l1", "uld_loss"]
