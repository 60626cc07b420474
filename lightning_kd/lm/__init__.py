"""Language-model distillation
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Hugging Face causal LMs on the same engine as the image models (``task=lm`` in the Hydra app):

- :mod:`~lightning_kd.lm.divergences`: token-level divergences computed in float32 on chunks of positions with a
  closed-form gradient (bounded memory for large vocabularies); the loss terms are in :mod:`lightning_kd.losses`
  (``token``, ``taid``, ``atkd``, ``dckd``, ``uld``);
- :mod:`~lightning_kd.lm.models` (``create_causal_lm``, LoRA, save/load), :mod:`~lightning_kd.lm.tokenizer`
  (byte-level BPE trained offline), :mod:`~lightning_kd.lm.corpus` (the offline default corpus),
  :mod:`~lightning_kd.lm.data` (``TextDataModule``);
- :mod:`~lightning_kd.lm.module` (``CausalLMModule``, ``LMDistillationModule``, perplexity);
- :mod:`~lightning_kd.lm.generation` (GKD on-policy, sequence-level and speculative KD, DistiLLM's replay buffer);
- :mod:`~lightning_kd.lm.logit_cache` (teacher logits computed once, top-k / top-p truncated);
- :mod:`~lightning_kd.lm.app` (``python -m lightning_kd.run task=lm``).

The modules that need ``transformers`` (``pip install "lightning-kd[llm]"``) import it when they are used, so
importing this package and the divergences needs only torch.
"""
