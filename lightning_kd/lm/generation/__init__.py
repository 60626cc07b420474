"""On-policy, sequence-level and speculative generation for LM distillation
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Lightning callbacks that rewrite the training batch, in place, in ``on_train_batch_start`` (after the batch reached
the device, before ``training_step``): the loss terms then compare teacher and student on generated sequences. They
work with both faces, :class:`~lightning_kd.lm.module.LMDistillationModule` and a user's module wrapped by
:class:`~lightning_kd.callback.DistillCallback`.

=================================  ==================================================================  ==============
callback                           the training sequences                                              ``loss=``
=================================  ==================================================================  ==============
:class:`OnPolicyDistillation`      the student's samples with probability λ (GKD, Agarwal et al. 2024)  ``gkd``
``OnPolicyDistillation(seq_kd)``   the teacher's samples otherwise (sequence-level KD, Kim & Rush 2016) ``seqkd``
:class:`SpeculativeDistillation`   student proposals, teacher replacements outside its top-K (SKD)      ``skd``
:class:`AdaptiveOffPolicy`         fresh or replayed student samples, more as val loss worsens          ``distillm``
=================================  ==================================================================  ==============

Batches are ``{input_ids, attention_mask, labels (-100 ignored), prompt_lengths, index}``, right-padded
(:mod:`lightning_kd.lm.data`); the prompt (``prompt_lengths`` tokens, ``<bos>`` included) is kept, the completion is
replaced and labelled, ``-100`` stays on prompt and padding. Sampling is seeded from ``(seed, global step, batch
index)``; decisions do not depend on the rank, so DDP ranks agree and a resumed run repeats them.
"""

from lightning_kd.lm.generation.adaptive import AdaptiveOffPolicy, ReplayBuffer
from lightning_kd.lm.generation.base import GenerationCallback
from lightning_kd.lm.generation.batch import (
    cut_at_eos,
    derive_seed,
    left_pad,
    pack_sequences,
    prompt_lengths_of,
    prompts_of,
    rewrite_batch,
    sampling_seed,
    seeded_rng,
    uniform,
)
from lightning_kd.lm.generation.on_policy import OnPolicyDistillation
from lightning_kd.lm.generation.speculative import (
    InterleavedSample,
    SpeculativeDistillation,
    nucleus_probabilities,
    speculative_sample,
)

__all__ = [
    "AdaptiveOffPolicy",
    "GenerationCallback",
    "InterleavedSample",
    "OnPolicyDistillation",
    "ReplayBuffer",
    "SpeculativeDistillation",
    "cut_at_eos",
    "derive_seed",
    "left_pad",
    "nucleus_probabilities",
    "pack_sequences",
    "prompt_lengths_of",
    "prompts_of",
    "rewrite_batch",
    "sampling_seed",
    "seeded_rng",
    "speculative_sample",
    "uniform",
]
