"""Token-level divergences for language models
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Loss terms over the next-token distributions of a causal-LM teacher and student (logits ``[B, T, V]``, labels
``[B, T]`` with ``-100`` ignored; the logit at position ``t`` is scored against the label at ``t + 1``). All of them
are computed by :func:`lightning_kd.lm.divergences.token_divergence`: float32 on chunks of positions, a closed-form
gradient, memory bounded whatever the vocabulary. ``p = softmax(z_T/τ)``, ``q = softmax(z_S/τ)``, mean over
scored tokens, no τ² factor (as TRL and DistiLLM).

==============  ===========================================  =============================================
name            per-token loss                               paper
==============  ===========================================  =============================================
``fkl``         KL(p ‖ q)                                    Hinton et al. 2015 (token-level "KD")
``rkl``         KL(q ‖ p)                                    Gu et al., MiniLLM, ICLR 2024 (token-level form)
``symkl``       (1 − λ)·KL(p ‖ q) + λ·KL(q ‖ p)              DistiLLM's ``symmetric_kl`` baseline
``jsd``         β·KL(p ‖ m) + (1 − β)·KL(q ‖ m), m = βp+(1−β)q Agarwal et al., GKD, ICLR 2024 (TRL's form)
``tvd``         ½ Σ |p − q|                                  DistiLLM's ``tv_distance`` baseline
``skewkl``      KL(p ‖ αp + (1 − α)q)                        Ko et al., DistiLLM, ICML 2024
``skewrkl``     KL(q ‖ (1 − α)p + αq)                        Ko et al., DistiLLM, ICML 2024
==============  ===========================================  =============================================

``jsd`` with β = 0 is exactly ``fkl`` and with β = 1 exactly ``rkl`` (TRL's definition). GKD's on-policy sampling
(λ) is not a loss: ``conf/loss/gkd.yaml`` pairs ``jsd`` with :class:`~lightning_kd.lm.generation.OnPolicyDistillation`.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lightning_kd.losses.base import DistillBatch, LossTerm, check_temperature, register_loss


def sequence_logits(term: str, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` if they are token logits ``[B, T, V]``, else a ``ValueError`` saying what the term needs."""
    if logits.dim() != 3:
        raise ValueError(
            f"{term}: token-level loss needs language-model logits [batch, sequence, vocabulary], got shape "
            f"{tuple(logits.shape)}; for image classifiers use loss=kd"
        )
    return logits


def attention_mask_of(batch: DistillBatch) -> torch.Tensor | None:
    """The student's attention mask, when its inputs are token keyword arguments."""
    inputs = batch.inputs
    return inputs.get("attention_mask") if isinstance(inputs, dict) else None


class TokenDivergenceLoss(LossTerm):
    """Base of the token-level divergence terms: masking, shifting and the chunked computation.

    Args:
        weight: weight of the term.
        temperature: τ > 0, applied to both logits.
        shift_labels: labels are aligned with the input ids (Hugging Face convention: the logit at ``t`` predicts
            the label at ``t + 1``); ``false`` when the batch's labels are already aligned with the logits.
        chunk_size: positions per chunk (default: 2²¹ float32 values per chunk).
    """

    #: the :data:`~lightning_kd.lm.divergences.DIVERGENCES` name of the subclass.
    divergence: ClassVar[str] = "forward_kl"

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 1.0,
        shift_labels: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(weight)
        name = getattr(type(self), "registry_name", type(self).__name__)
        self.temperature = check_temperature(name, temperature)
        self.shift_labels = bool(shift_labels)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"{name}: chunk_size must be a positive integer or null, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.use_divergence()

    def use_divergence(self, **params: float) -> None:
        """Build :attr:`divergence` with ``params`` (β, α, λ), validating them now."""
        from lightning_kd.lm.divergences import get_divergence

        self.params = {k: float(v) for k, v in params.items()}
        self.div = get_divergence(self.divergence, **self.params)

    def positions(self, batch: DistillBatch) -> torch.Tensor:
        """The scored positions of this step (:func:`~lightning_kd.lm.divergences.position_mask`)."""
        from lightning_kd.lm.divergences import position_mask

        return position_mask(batch.targets, batch.student.logits, self.shift_labels, attention_mask_of(batch))

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        from lightning_kd.lm.divergences import token_divergence

        name = getattr(type(self), "registry_name", type(self).__name__)
        student = sequence_logits(name, batch.student.logits)
        return token_divergence(
            student, batch.teacher.logits, self.positions(batch), self.div, temperature=self.temperature,
            chunk_size=self.chunk_size,
        )  # fmt: skip

    def extra_repr(self) -> str:
        params = "".join(f", {k}={v}" for k, v in self.params.items())
        return f"weight={self.weight}, temperature={self.temperature}{params}"


@register_loss("fkl")
class ForwardKLTokenLoss(TokenDivergenceLoss):
    """Forward KL(p ‖ q) per token (mass-covering)."""

    divergence = "forward_kl"


@register_loss("rkl")
class ReverseKLTokenLoss(TokenDivergenceLoss):
    """Reverse KL(q ‖ p) per token: MiniLLM's token-level objective (Gu et al., "MiniLLM: Knowledge Distillation of
    Large Language Models", ICLR 2024), mode-seeking."""

    divergence = "reverse_kl"


@register_loss("tvd")
class TotalVariationTokenLoss(TokenDivergenceLoss):
    """Total variation ½ Σ |p − q| per token (DistiLLM's TVD baseline)."""

    divergence = "total_variation"


@register_loss("symkl")
class SymmetricKLTokenLoss(TokenDivergenceLoss):
    """``(1 − λ)·KL(p ‖ q) + λ·KL(q ‖ p)`` per token.

    Args:
        reverse_weight: λ in [0, 1]; 0.5 is the symmetric KL.
    """

    divergence = "symmetric_kl"

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 1.0,
        reverse_weight: float = 0.5,
        shift_labels: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(weight, temperature, shift_labels, chunk_size)
        self.use_divergence(reverse_weight=reverse_weight)


@register_loss("jsd")
class GeneralizedJSDTokenLoss(TokenDivergenceLoss):
    """GKD's generalized Jensen–Shannon divergence per token (Agarwal et al., ICLR 2024; TRL's
    ``generalized_jsd_loss``): ``β·KL(p ‖ m) + (1 − β)·KL(q ‖ m)`` with ``m = β·p + (1 − β)·q``; β = 0 is the
    forward KL, β = 1 the reverse KL.

    Args:
        beta: β in [0, 1] (TRL's default 0.5).
    """

    divergence = "generalized_jsd"

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 1.0,
        beta: float = 0.5,
        shift_labels: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(weight, temperature, shift_labels, chunk_size)
        self.use_divergence(beta=beta)


@register_loss("skewkl")
class SkewKLTokenLoss(TokenDivergenceLoss):
    """DistiLLM's skew KL ``KL(p ‖ α·p + (1 − α)·q)`` per token (Ko et al., ICML 2024).

    Args:
        alpha: α in [0, 1) (DistiLLM's ``--skew-alpha 0.1``); 0 is the forward KL.
    """

    divergence = "skew_forward_kl"

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 1.0,
        alpha: float = 0.1,
        shift_labels: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(weight, temperature, shift_labels, chunk_size)
        self.use_divergence(alpha=alpha)


@register_loss("skewrkl")
class SkewReverseKLTokenLoss(TokenDivergenceLoss):
    """DistiLLM's skew reverse KL ``KL(q ‖ (1 − α)·p + α·q)`` per token (Ko et al., ICML 2024).

    Args:
        alpha: α in [0, 1) (DistiLLM's ``--skew-alpha 0.1``); 0 is the reverse KL.
    """

    divergence = "skew_reverse_kl"

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 1.0,
        alpha: float = 0.1,
        shift_labels: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(weight, temperature, shift_labels, chunk_size)
        self.use_divergence(alpha=alpha)


__all__ = [
    "ForwardKLTokenLoss",
    "GeneralizedJSDTokenLoss",
    "ReverseKLTokenLoss",
    "SkewKLTokenLoss",
    "SkewReverseKLTokenLoss",
    "SymmetricKLTokenLoss",
    "TokenDivergenceLoss",
    "TotalVariationTokenLoss",
    "attention_mask_of",
    "sequence_logits",
]
