"""The Hydra app for language models
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

``python -m lightning_kd.run task=lm [loss=fkl|rkl|jsd|...] [overrides]`` runs :func:`run_lm`, the language-model
counterpart of :func:`lightning_kd.app.run_distill` (``conf/task/lm.yaml`` chooses ``model=lm_tiny``,
``teacher=lm_small``, ``data=text``, ``loss=fkl``, AdamW):

1. the teacher, a causal LM (:func:`~lightning_kd.lm.models.create_causal_lm`): its weights (``teacher.checkpoint``
   / ``teacher.pretrained``), else a teacher trained earlier with the same key (data signature with the corpus and
   tokenizer hashes, seed, epochs, optimizer, trainer settings) from the teacher store (:class:`LMTeacherStore`:
   files written by :func:`~lightning_kd.lm.models.save_lm_file`), else trained now on next-token cross-entropy
   (:class:`~lightning_kd.lm.module.CausalLMModule`) for ``teacher_epochs`` and stored atomically;
2. the student, a plain :class:`~lightning_kd.lm.module.CausalLMModule` distilled by
   :class:`~lightning_kd.callback.DistillCallback` with the terms of ``loss=`` (``task_weight · CE + Σ weight_i ·
   term_i``), exactly as the image app distils a classifier: the callback a user adds to their own LM
   LightningModule is the one the app runs (its loss equals :class:`~lightning_kd.lm.module.LMDistillationModule`'s,
   tests/test_lm_app.py), and the student checkpoint holds the student alone. Extra callbacks, in this order: the
   loss's ``generation`` node (on-policy generation, e.g. ``loss=gkd``), then the optional groups
   (``teacher_cache=lm_topk``...);
3. with ``baseline=true`` (the default of ``task=lm``), the student trained without distillation on the same seed;
4. ``results.json``: perplexities on the test split (``teacher_ppl``, ``student_ppl``, ``baseline_ppl``), the
   student's validation perplexity, next-token loss and next-token top-1 accuracy (``student_val_ppl``,
   ``student_val_loss``, ``student_val_acc``: the objective hyperparameter searches maximise, higher is better), the
   teacher–student next-token agreement, and the text used (``corpus``: sources with their versions and sizes, and
   the hashes of the corpus and the tokenizer).

Perplexity is ``exp`` of the mean next-token negative log-likelihood over the label tokens of a split
(:class:`~lightning_kd.lm.module.TokenNLL`). A teacher with its own tokenizer (``data.teacher_tokenizer``, ULD) is
scored on its own tokenization of the same texts, so its perplexity is per teacher token.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_kd.app import (
    check_loss_task,
    fit_report,
    make_trainer,
    option_callbacks,
    scheduler_of,
    teacher_recipe,
    with_epochs,
)
from lightning_kd.callback import DistillCallback
from lightning_kd.engine import as_logits, call_model, eval_mode, inputs_to, teacher_view, unpack_batch
from lightning_kd.lm.divergences import next_token_mask
from lightning_kd.lm.models import LM_TASK, create_causal_lm, load_lm_file, save_lm_file
from lightning_kd.lm.module import CausalLMModule, TokenNLL
from lightning_kd.teacher_store import TeacherStore

log = logging.getLogger("lightning_kd")

#: the ``strategy=`` options available with ``task=lm``.
LM_STRATEGIES = ("distill",)
#: config groups of the image app that do not apply to language models.
IMAGE_ONLY_GROUPS = ("augment",)
#: trainer settings that change the weights a teacher ends with (part of its key in the store).
TEACHER_TRAINER_KEYS = ("max_steps", "limit_train_batches", "accumulate_grad_batches", "gradient_clip_val", "precision")


# --------------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------------
def check_lm_config(cfg: DictConfig) -> None:
    """Refuse what ``task=lm`` cannot run, before any data or model is built: another strategy than ``distill``, an
    image loss, an image-only option group (``augment=``), an unknown ``stage``."""
    strategy = str(cfg.strategy.name)
    if strategy not in LM_STRATEGIES:
        raise ValueError(
            f"strategy={strategy} is not available with task=lm: language models are distilled from a frozen "
            f"teacher ({', '.join(f'strategy={s}' for s in LM_STRATEGIES)}); drop strategy= or use the image task"
        )
    check_loss_task(cfg, LM_TASK)
    for group in IMAGE_ONLY_GROUPS:
        if cfg.get(group) is not None:
            raise ValueError(f"{group}= applies to images and not to task=lm; drop {group}= (or ~{group})")


# --------------------------------------------------------------------------------------------------------------------
# Models and modules
# --------------------------------------------------------------------------------------------------------------------
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


def use_tokenizer_ids(model: nn.Module, tokenizer: Any) -> nn.Module:
    """Give ``model``'s ``config`` and ``generation_config`` the special-token ids of ``tokenizer`` (``bos``,
    ``eos``, ``pad``; those the tokenizer has): a model built from a config (``gpt2``) otherwise keeps the ids of the
    tokenizer it was published with (GPT-2's 50256), outside a small vocabulary, and generation
    (:mod:`lightning_kd.lm.generation`, ``model.generate``) would never stop or pad with a wrong id."""
    for attr in SPECIAL_TOKENS:
        value = getattr(tokenizer, attr, None)
        if value is None:
            continue
        for config in (getattr(model, "config", None), getattr(model, "generation_config", None)):
            if config is not None:
                setattr(config, attr, int(value))
    return model


def build_lm(node: DictConfig, vocab_size: int, tokenizer: Any = None) -> nn.Module:
    """The causal LM of a ``model``/``teacher`` config node (``name``, ``pretrained``, ``checkpoint``, ``kwargs``,
    optionally ``lora``) for a tokenizer of ``vocab_size`` tokens, through
    :func:`~lightning_kd.lm.models.create_causal_lm`; with ``tokenizer``, its special-token ids
    (:func:`use_tokenizer_ids`)."""
    model = _create_lm(node, vocab_size)
    return model if tokenizer is None else use_tokenizer_ids(model, tokenizer)


def _create_lm(node: DictConfig, vocab_size: int) -> nn.Module:
    kwargs = OmegaConf.to_container(node.get("kwargs") or OmegaConf.create({}), resolve=True)
    assert isinstance(kwargs, dict)
    lora = node.get("lora")  # peft.LoraConfig fields (create_causal_lm wraps the model), or None
    if lora is not None:
        kwargs["lora"] = OmegaConf.to_container(lora, resolve=True) if isinstance(lora, DictConfig) else lora
    try:
        return create_causal_lm(
            str(node.name), vocab_size, pretrained=bool(node.pretrained), checkpoint=node.checkpoint, **kwargs
        )
    except ValueError as err:
        if "unknown language model" not in str(err):
            raise
        raise ValueError(
            f"{err}. With task=lm, model= and teacher= take a causal-LM config (model=lm_tiny, teacher=lm_small, or "
            "your own conf/model/<name>.yaml with name: <transformers model type or directory>), not a timm name"
        ) from None


def lm_module(cfg: DictConfig, model: nn.Module) -> CausalLMModule:
    """``model`` in a causal-LM module with the configured optimizer, scheduler and label smoothing."""
    return CausalLMModule(
        model, instantiate(cfg.optimizer), scheduler_of(cfg), label_smoothing=float(cfg.label_smoothing)
    )


def train_lm(cfg: DictConfig, model: nn.Module, datamodule: Any, out_dir: Path, max_epochs: int) -> None:
    """Next-token cross-entropy training (the teacher, or the baseline)."""
    make_trainer(with_epochs(cfg, max_epochs), out_dir, checkpoints=False).fit(lm_module(cfg, model), datamodule)


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------
def evaluate_lm(
    model: nn.Module,
    datamodule: Any,
    split: str = "test",
    *,
    teacher: nn.Module | None = None,
    teacher_tokens: bool = False,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Next-token loss (mean NLL per label token), perplexity ``exp(loss)`` and top-1 accuracy of ``model`` on the
    ``split`` split (``"test"`` or ``"val"``; plain loop, eval mode, no grad), on ``device`` (``None``: where the
    model is; the model is moved there). ``teacher_tokens``: read the batch's teacher tokenization when it carries
    one (a teacher with its own tokenizer). With a ``teacher`` (same vocabulary), also the next-token top-1
    agreement at the labelled positions."""
    if split not in ("test", "val"):
        raise ValueError(f"evaluate_lm: split must be 'test' or 'val', got {split!r}")
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    metric = TokenNLL().to(device)
    same = torch.zeros((), dtype=torch.float64)
    positions = torch.zeros((), dtype=torch.float64)
    if teacher is not None:
        teacher.to(device)
    with torch.no_grad(), eval_mode(model):
        for batch in loader:
            inputs, labels, _ = unpack_batch(batch)
            if teacher_tokens:
                inputs, teacher_labels = teacher_view(batch, inputs, labels)
                labels = labels if teacher_labels is None else teacher_labels
            if labels is None:
                raise ValueError("evaluate_lm needs batches with 'labels' (-100 = ignored)")
            inputs, labels = inputs_to(inputs, device), labels.to(device)
            logits = as_logits(call_model(model, inputs))
            metric.update(logits, labels)
            if teacher is not None:
                with eval_mode(teacher):
                    t_logits = as_logits(call_model(teacher, inputs))
                if t_logits.shape == logits.shape:
                    mask = next_token_mask(labels)
                    same += ((logits.argmax(-1) == t_logits.argmax(-1)) & mask).sum().double().cpu()
                    positions += mask.sum().double().cpu()
    values = {k: float(v) for k, v in metric.compute().items()}
    if teacher is not None and positions > 0:
        values["agreement"] = float(same / positions)
    return values


# --------------------------------------------------------------------------------------------------------------------
# The teacher
# --------------------------------------------------------------------------------------------------------------------
class LMTeacherStore(TeacherStore):
    """The teacher store (:class:`~lightning_kd.teacher_store.TeacherStore`: ``<cache_dir>/teachers``) for causal
    LMs: files written by :func:`~lightning_kd.lm.models.save_lm_file` (weights + the model's config, atomically)
    and read back by :func:`~lightning_kd.lm.models.load_lm_file` (``weights_only=True``). The configured name is
    kept under ``name`` (the file's ``model`` is the transformers model type)."""

    def read(self, path: Path) -> tuple[nn.Module, dict[str, Any]]:
        return load_lm_file(path)

    def write(self, model: nn.Module, path: Path, metadata: dict[str, Any]) -> Path:
        meta = dict(metadata)
        return save_lm_file(model, path, {"name": meta.pop("model"), **meta})


def teacher_store_key(cfg: DictConfig, datamodule: Any) -> dict[str, Any]:
    """What the trained teacher depends on: the data (corpus and tokenizer hashes, segmentation, split seed), the
    batch size, seed, epochs, optimizer, scheduler, label smoothing, the teacher's config fields and the trainer
    settings of :data:`TEACHER_TRAINER_KEYS`. ``cfg`` is the teacher's recipe (:func:`teacher_recipe`)."""
    scheduler = cfg.scheduler
    if isinstance(scheduler, DictConfig):
        scheduler = OmegaConf.to_container(scheduler, resolve=True)
    return {
        "task": LM_TASK,
        "data": datamodule.signature(),
        "batch_size": int(datamodule.batch_size),
        "seed": int(cfg.seed),
        "epochs": int(cfg.teacher_epochs),
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "scheduler": scheduler,
        "label_smoothing": float(cfg.label_smoothing),
        "kwargs": OmegaConf.to_container(cfg.teacher.kwargs, resolve=True),
        "lora": OmegaConf.to_container(cfg.teacher.lora, resolve=True) if cfg.teacher.get("lora") else None,
        "trainer": {k: cfg.trainer.get(k) for k in TEACHER_TRAINER_KEYS},
    }


def obtain_lm_teacher(cfg: DictConfig, datamodule: Any, out_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load the configured teacher, reuse a stored one, or train and store it. Returns the model and a report."""
    vocab_size = datamodule.teacher_vocab_size
    tokenizer = datamodule.teacher_tokenizer or datamodule.tokenizer
    if cfg.teacher.checkpoint or cfg.teacher.pretrained:
        teacher = build_lm(cfg.teacher, vocab_size, tokenizer)
        source = f"checkpoint {cfg.teacher.checkpoint}" if cfg.teacher.checkpoint else f"pretrained {cfg.teacher.name}"
        return teacher, {"teacher_source": source}
    if datamodule.teacher_tokenizer is not None:
        raise ValueError(
            "data.teacher_tokenizer gives the teacher its own tokenizer, so the teacher must come with its weights "
            "(teacher.checkpoint=<file> or teacher.pretrained=true): a teacher is trained here on the student's tokens"
        )
    recipe = teacher_recipe(cfg)
    store = LMTeacherStore(cfg.cache_dir)
    key = teacher_store_key(recipe, datamodule)
    name = str(cfg.teacher.name)
    path = store.path(name, key)
    stored = store.load(name, key)
    if stored is not None:
        log.info("teacher: reused %s from the teacher store (%s)", name, path)
        return use_tokenizer_ids(stored[0], tokenizer), {"teacher_source": f"teacher store (reused): {path}"}
    if cfg.stage == "student":
        raise FileNotFoundError(
            f"stage=student needs a teacher, but {name} was never trained with this data/seed/epochs/optimizer "
            f"(looked for {path}). Run stage=teacher (or stage=all) first, or give teacher.checkpoint=<file>."
        )
    epochs = int(cfg.teacher_epochs)
    log.info("teacher: no weights given and none stored; training %s for %d epochs", name, epochs)
    L.seed_everything(cfg.seed, workers=True)
    teacher = build_lm(cfg.teacher, vocab_size, tokenizer)
    train_lm(recipe, teacher, datamodule, out_dir / "teacher", epochs)
    if callable(getattr(teacher, "merge_and_unload", None)):  # LoRA (teacher.lora): adapters merged, a plain model
        teacher = teacher.merge_and_unload()
    store.save(teacher.cpu(), name, key, {"vocab_size": vocab_size})
    log.info("teacher: trained and stored at %s", path)
    return teacher, {"teacher_source": f"teacher store (trained now): {path}"}


# --------------------------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------------------------
def eval_device(cfg: DictConfig) -> torch.device:
    """Where the app evaluates perplexities: the GPU when the trainer may use one (``accelerator`` ``auto``,
    ``gpu`` or ``cuda``) and one is available, else the CPU (Lightning returns models to the CPU after a fit)."""
    accelerator = str(cfg.trainer.get("accelerator") or "auto")
    return torch.device("cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu")


def corpus_report(datamodule: Any) -> dict[str, Any]:
    """What text the run used: the corpus sources (with versions and sizes), its hash and the data signature."""
    corpus = getattr(datamodule, "corpus", None)
    report: dict[str, Any] = {"data": datamodule.signature()}
    if corpus is not None:
        report["corpus"] = {"sources": list(corpus.sources), "signature": corpus.signature, "chars": corpus.num_chars}
    return report


def generation_callbacks(cfg: DictConfig) -> list[Any]:
    """The loss's ``generation`` node (a Lightning callback with ``_target_``, e.g. on-policy generation of
    ``loss=gkd``), instantiated, or nothing."""
    node = cfg.loss.get("generation")
    return [instantiate(node, _convert_="all")] if node is not None else []


def run_lm(cfg: DictConfig, datamodule: Any, out_dir: Path) -> dict[str, Any]:
    """``task=lm``: a frozen causal-LM teacher (loaded, reused or trained) distilled into the student by
    :class:`~lightning_kd.callback.DistillCallback` on a plain causal-LM module; optional no-KD baseline."""
    check_lm_config(cfg)
    teacher, report = obtain_lm_teacher(cfg, datamodule, out_dir)
    own_tokens = datamodule.teacher_tokenizer is not None
    device = eval_device(cfg)
    teacher_scores = evaluate_lm(teacher, datamodule, teacher_tokens=own_tokens, device=device)
    results: dict[str, Any] = {
        "task": LM_TASK,
        "teacher": str(cfg.teacher.name),
        **report,
        "teacher_ppl": teacher_scores["ppl"],
        "teacher_loss": teacher_scores["loss"],
        **corpus_report(datamodule),
    }
    rows: list[list[Any]] = [["teacher perplexity (test)", teacher_scores["ppl"]]]
    results["rows"] = rows
    if cfg.stage == "teacher":
        return results
    L.seed_everything(cfg.seed, workers=True)
    student = build_lm(cfg.model, datamodule.vocab_size, datamodule.tokenizer)
    module = lm_module(cfg, student)
    distill = DistillCallback(teacher, loss=cfg.loss.terms, task_weight=float(cfg.loss.task_weight))
    extra = (*generation_callbacks(cfg), *option_callbacks(cfg), distill)
    trainer = make_trainer(cfg, out_dir, checkpoints=True, extra=extra)
    trainer.fit(module, datamodule, ckpt_path=cfg.ckpt_path)
    assert distill.engine is not None
    test = evaluate_lm(student, datamodule, teacher=None if own_tokens else teacher, device=device)
    val = evaluate_lm(student, datamodule, "val", device=device)
    results |= {
        "student": str(cfg.model.name),
        "loss": ",".join(distill.engine.terms),
        "student_ppl": test["ppl"],
        "student_loss": test["loss"],
        "student_val_ppl": val["ppl"],
        "student_val_loss": val["loss"],
        "student_val_acc": val["acc"],  # next-token top-1 accuracy: the objective of searches (higher is better)
        **({"agreement": test["agreement"]} if "agreement" in test else {}),
        **fit_report(trainer, out_dir),
    }
    rows += [
        ["student perplexity (test)", test["ppl"]],
        ["student perplexity (validation)", val["ppl"]],
    ]
    if cfg.baseline:
        baseline = train_lm_baseline(cfg, datamodule, out_dir)
        results |= {"baseline_ppl": baseline["ppl"], "baseline_loss": baseline["loss"]}
        rows.append(["baseline perplexity (no KD, test)", baseline["ppl"]])
    return results


def train_lm_baseline(cfg: DictConfig, datamodule: Any, out_dir: Path) -> dict[str, float]:
    """Test loss and perplexity of the student trained without distillation on the same seed (``baseline=true``)."""
    L.seed_everything(cfg.seed, workers=True)
    baseline = build_lm(cfg.model, datamodule.vocab_size, datamodule.tokenizer)
    train_lm(cfg, baseline, datamodule, out_dir / "baseline", int(cfg.trainer.max_epochs))
    return evaluate_lm(baseline, datamodule, device=eval_device(cfg))


__all__ = [
    "LMTeacherStore",
    "build_lm",
    "check_lm_config",
    "evaluate_lm",
    "obtain_lm_teacher",
    "run_lm",
    "use_tokenizer_ids",
]
