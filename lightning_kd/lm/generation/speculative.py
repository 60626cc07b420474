"""Speculative knowledge distillation (SKD)
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Xu et al., "Speculative Knowledge Distillation: Bridging the Teacher-Student Gap Through Interleaved Sampling"
(ICLR 2025, arXiv:2410.11325), Algorithm 1: the training sequences are built token by token from the prompt,

    y_i ~ q_S(· | y_<i, x)                      (the student proposes)
    if y_i ∉ top_K(p_T(· | y_<i, x)):  y_i ~ p_T(· | y_<i, x)   (the teacher replaces a poorly ranked proposal)

and the student is then trained on them with a token-level divergence D(p_T ‖ q_S) (``loss=skd``: forward KL, the
released ``distance_metric: kl``). Early in training most proposals are replaced (≈ supervised KD on teacher samples),
later most are kept (≈ on-policy KD); K → ∞ is on-policy KD.

Checked against the paper's Algorithm 1 and the released code (google-research/google-research ``speculative_kd``:
``transformers/utils.py`` ``_speculative_kd_sampling``, ``config/kd_train.yaml``, ``train/ddp_skd.py``):

- the replacement is **sampled** from the teacher's distribution (``torch.multinomial``), not its argmax;
- K = 25 (``top_k: 25``; the paper reports K ∈ [5, 50] all beating both baselines, Appendix B);
- sampling settings of the released config: student temperature 0.5, top-p 0.5; teacher temperature 0.2, top-p 0.5
  (the defaults here). [inferred] In that code the student drafts through Hugging Face assisted generation, whose
  draft config is a copy of the teacher's ``generate`` settings; the student settings are set on the DDP wrapper and
  may not reach it. Here each side uses its own settings, as the paper describes;
- the divergence is the forward KL at temperature 1 (``nn.KLDivLoss(log_target=True)(log q_S, log p_T)``).

Differences: the released code drafts γ = 5 student tokens and verifies them in one teacher pass (the result is the
same as Algorithm 1's token-by-token loop, which is what runs here, batched, with key/value caches for both models).
The top-K test uses the teacher's logits; the released code takes the top-K of the teacher's temperature/top-p
*processed* probabilities, which equals it except that when fewer than K tokens survive top-p the rest of its K are
arbitrary zero-probability tokens.

Logged: ``train/skd_replaced``, the fraction of generated tokens the teacher replaced in the batch;
:attr:`SpeculativeDistillation.last_replaced` keeps the replaced positions of the last batch (``[B, T]``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_kd.engine import eval_mode
from lightning_kd.lm.generation.base import GenerationCallback, TokenIds, check_length, check_sampling
from lightning_kd.lm.generation.batch import (
    check_token_batch,
    cut_at_eos,
    left_pad,
    pack_sequences,
    prompts_of,
    rewrite_batch,
)


@dataclass
class InterleavedSample:
    """The result of :func:`speculative_sample` (``[B, N]`` each; positions after a row's eos hold the pad id)."""

    tokens: torch.Tensor  #: the kept or replaced token at each step
    proposals: torch.Tensor  #: the student's proposal at each step
    replaced: torch.Tensor  #: bool, the teacher replaced the proposal


def nucleus_probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """``softmax(logits / τ)`` restricted to the smallest set of tokens whose probability reaches ``top_p``
    (nucleus sampling, Holtzman et al. 2020), renormalised; float32."""
    probs = (logits.float() / temperature).softmax(-1)
    if top_p >= 1:
        return probs
    sorted_probs, order = probs.sort(-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # the mass of the tokens ranked above
    drop = before >= top_p
    drop[..., 0] = False
    probs = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)
    return probs / probs.sum(-1, keepdim=True)


class _Decoder:
    """Step-by-step next-token logits of a causal LM on a left-padded batch: a key/value cache when the model's
    forward takes one (``cache`` in transformers 5, ``past_key_values`` before), else the whole prefix each step."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_arg = next((name for name in ("cache", "past_key_values") if name in params), None)
        self.ids, self.mask, self.cache = ids, mask, None

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {"attention_mask": self.mask, "position_ids": positions}
        if self.cache_arg is not None:
            kwargs |= {self.cache_arg: self.cache, "use_cache": True}
        out = self.model(input_ids=ids, **kwargs)
        if self.cache_arg is not None:
            self.cache = out.get(self.cache_arg) if isinstance(out, Mapping) else getattr(out, self.cache_arg, None)
        logits = out["logits"] if isinstance(out, Mapping) else out.logits
        return logits[:, -1]

    def start(self) -> torch.Tensor:
        return self._forward(self.ids, (self.mask.cumsum(-1) - 1).clamp_min(0))

    def step(self, token: torch.Tensor) -> torch.Tensor:
        self.ids = torch.cat([self.ids, token[:, None]], dim=1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(token), 1)], dim=1)
        positions = (self.mask.cumsum(-1) - 1).clamp_min(0)
        if self.cache is not None:
            return self._forward(token[:, None], positions[:, -1:])
        return self._forward(self.ids, positions)


@torch.no_grad()
def speculative_sample(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    top_k: int = 25,
    student_temperature: float = 0.5,
    student_top_p: float = 0.5,
    teacher_temperature: float = 0.2,
    teacher_top_p: float = 0.5,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
) -> InterleavedSample:
    """SKD's interleaved sampling (Algorithm 1) on left-padded prompts ``input_ids``/``attention_mask`` ``[B, P]``.

    At each step the student's proposal is drawn from its nucleus distribution; it is kept when it is among the K
    highest teacher logits at that prefix, else replaced by a draw from the teacher's nucleus distribution. A row
    stops after its first eos. Both draws are made at every step from ``generator`` (so the random stream does not
    depend on which proposals were replaced). Models are called in eval mode without gradients.
    """
    if top_k < 1:
        raise ValueError(f"speculative_sample: top_k must be >= 1, got {top_k}")
    eos = torch.tensor(list(eos_token_ids), device=input_ids.device, dtype=torch.long)
    tokens, proposals, replaced = [], [], []
    with eval_mode(student), eval_mode(teacher):
        s_dec, t_dec = _Decoder(student, input_ids, attention_mask), _Decoder(teacher, input_ids, attention_mask)
        s_logits, t_logits = s_dec.start(), t_dec.start()
        done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            q = nucleus_probabilities(s_logits, student_temperature, student_top_p)
            p = nucleus_probabilities(t_logits, teacher_temperature, teacher_top_p)
            proposal = torch.multinomial(q, 1, generator=generator).squeeze(-1)
            fallback = torch.multinomial(p, 1, generator=generator).squeeze(-1)
            top = t_logits.topk(min(top_k, t_logits.shape[-1]), dim=-1).indices
            accepted = (top == proposal[:, None]).any(-1)
            token = torch.where(accepted, proposal, fallback)
            token = token.masked_fill(done, pad_token_id)
            tokens.append(token)
            proposals.append(proposal.masked_fill(done, pad_token_id))
            replaced.append(~accepted & ~done)
            done = done | torch.isin(token, eos)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            s_logits, t_logits = s_dec.step(token), t_dec.step(token)
    return InterleavedSample(torch.stack(tokens, 1), torch.stack(proposals, 1), torch.stack(replaced, 1))


class SpeculativeDistillation(GenerationCallback):
    """Replace every training batch by SKD's interleaved student/teacher samples from its prompts.

    Args:
        top_k: K, the teacher's top-K that a student proposal must be in to be kept (paper: 25).
        max_new_tokens: completion length at most (released config: 128 for summarisation).
        student_temperature, student_top_p: the student's proposal distribution (released config: 0.5, 0.5).
        teacher_temperature, teacher_top_p: the teacher's replacement distribution (released config: 0.2, 0.5).
        seed, student, distill_callback, eos_token_id, pad_token_id: see :class:`GenerationCallback`.
    """

    needs_teacher = True

    def __init__(
        self,
        top_k: int = 25,
        max_new_tokens: int = 128,
        student_temperature: float = 0.5,
        student_top_p: float = 0.5,
        teacher_temperature: float = 0.2,
        teacher_top_p: float = 0.5,
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
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"SpeculativeDistillation: top_k must be a positive integer, got {top_k!r}")
        check_sampling("SpeculativeDistillation (student)", student_temperature, 0, student_top_p)
        check_sampling("SpeculativeDistillation (teacher)", teacher_temperature, 0, teacher_top_p)
        self.top_k = top_k
        self.student_temperature, self.student_top_p = float(student_temperature), float(student_top_p)
        self.teacher_temperature, self.teacher_top_p = float(teacher_temperature), float(teacher_top_p)
        #: ``[B, T]`` bool: the positions of the last rewritten batch whose token the teacher replaced.
        self.last_replaced: torch.Tensor | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        batch = check_token_batch(batch, self._name)
        student, teacher = self.student_model(pl_module), self.teacher_model(trainer, pl_module)
        eos_ids, pad = self.token_ids(student)
        prompts = prompts_of(batch)
        ids, mask = left_pad(prompts, pad)
        for model in (student, teacher):
            check_length(self._name, model, ids.shape[1], self.max_new_tokens)
        generator = torch.Generator(device=ids.device).manual_seed(self.batch_seed(trainer, batch_idx))
        with self.precision_context(trainer):
            sample = speculative_sample(
                student,
                teacher,
                ids,
                mask,
                max_new_tokens=self.max_new_tokens,
                top_k=self.top_k,
                student_temperature=self.student_temperature,
                student_top_p=self.student_top_p,
                teacher_temperature=self.teacher_temperature,
                teacher_top_p=self.teacher_top_p,
                eos_token_ids=eos_ids,
                pad_token_id=pad,
                generator=generator,
            )
        completions = cut_at_eos(sample.tokens, eos_ids)
        packed = pack_sequences(prompts, completions, pad)
        replaced = torch.zeros_like(packed["input_ids"], dtype=torch.bool)
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            replaced[i, len(prompt) : len(prompt) + len(completion)] = sample.replaced[i, : len(completion)]
        rewrite_batch(batch, packed)
        self.last_replaced = replaced
        generated = sum(len(c) for c in completions)
        pl_module.log("train/skd_replaced", replaced.sum().item() / max(generated, 1), batch_size=len(prompts))


__all__ = ["InterleavedSample", "SpeculativeDistillation", "nucleus_probabilities", "speculative_sample"]
