"""Language-model distillation
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Token-level divergences (:mod:`lightning_kd.lm.divergences`, torch only) and the causal-LM task: models, tokenizers,
the offline text corpus and data, the Lightning modules, on-policy generation and the Hydra app. The modules that
need ``transformers`` (``pip install "lightning-kd[llm]"``) import it when they are used, so importing this package
needs only torch.
"""
