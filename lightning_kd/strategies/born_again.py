"""Born-again generations
^^^^^^^^^^^^^^^^^^^^^^

Furlanello, Lipton, Tschannen, Itti, Anandkumar, "Born-Again Neural Networks", ICML 2018 (arXiv:1805.04770).

A sequence of teaching selves (paper, section 3.1): generation 0 is trained on the labels; generation ``k`` — the
*same* architecture, freshly initialised — is distilled from generation ``k - 1``:

.. math::

    \\theta_k^* = \\arg\\min_{\\theta_k} \\mathcal{L}\\big(f(x, \\theta_{k-1}^*), f(x, \\theta_k)\\big)

and the Born-Again Network Ensemble (BANE, Eq. 4) averages the generations' predictions. The paper's BAN objective is
the cross-entropy between the student's and the teacher's plain softmax outputs with no label loss (Table 2, "BAN";
"BAN+L" adds the label loss and was slightly worse on CIFAR-100); here that is ``kd`` at ``τ = 1`` with
``task_weight = 0`` (the KL and the cross-entropy to the teacher differ by the teacher's entropy, a constant), the
default. The paper's two ablations are the terms :mod:`~lightning_kd.losses.cwtm` and :mod:`~lightning_kd.losses.dkpp`.
Each generation trains with the same schedule as generation 0 ("using the same training schedule originally used to
train the teacher networks").

BANE. The paper averages the born-again students: "BAN-1 ... BAN-3, Ens*2, Ens*3", and "we include the teacher as a
member of the ensemble for Ens*3 for 80-120 since we did not train a BAN-3 for this configuration" — so generation 0
is *not* a member by default (``ensemble_teacher=True`` adds it). The ensemble's prediction is the mean of the
members' softmax outputs; its accuracy is measured on the test split.

How the loop uses the package. Generation 0 is ``make_module(model)`` (default :class:`ClassifierModule`: CE on the
labels) in a ``Trainer`` from ``make_trainer``; generation ``k >= 1`` is the same kind of module with a
:class:`~lightning_kd.callback.DistillCallback` added — the engine every other strategy uses — whose teacher is a new
``make_model()`` loaded from generation ``k - 1``'s file (``torch.load(weights_only=True)``, strict key and shape
check): never the in-memory object. Every finished generation is written with
:func:`~lightning_kd.models.save_model_file` (atomic) as ``<out_dir>/gen<k>.pt``, then recorded in
``<out_dir>/generations.json`` (atomic); an entry there is what marks a generation finished. Its test accuracy is
measured right after its fit (on the trainer's device); the ensemble and the last generation's agreement with its
teacher are evaluated at the end from the saved files.

Fresh initialisation. Before building generation ``k`` the loop calls ``lightning.seed_everything(seed + k)`` (which
also gives each generation its own data order and augmentation draws, as the paper's "different random seeds"), then
``make_model()``: a factory that draws its initial weights from the global RNG gets a different initialisation per
generation. A factory that seeds itself (``torch.manual_seed`` inside) would give every generation the same start; the
loop compares a hash of each generation's initial weights with those of the earlier generations and warns when they
are equal.

Resuming. ``fit`` first reads ``generations.json``: the longest run of finished generations ``0..j`` whose files exist
is reused (logged, and ``reused=True`` in the result), and training starts at ``j + 1``. A generation interrupted
mid-fit is retrained from its start (no mid-generation ``ckpt_path`` resume). The file also records the plan (loss
terms, task weight, seed, metadata); a directory written under another plan is refused rather than mixed. Raising
``generations`` later extends a finished chain.

Distributed training: every process runs the loop; the weights files and ``generations.json`` are written by global
rank 0 only, with a barrier before the next generation reads them. (Not exercised by the tests.)
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_kd.app import (
    build_model,
    check_single_fit,
    classifier_module,
    evaluate,
    make_trainer,
    option_callbacks,
    write_json_atomic,
)
from lightning_kd.callback import DistillCallback
from lightning_kd.engine import LossSpec, as_logits, build_terms, eval_mode, split_targets, unpack_batch
from lightning_kd.losses.base import check_number, check_temperature
from lightning_kd.models import load_weights, save_model_file
from lightning_kd.module import ClassifierModule

log = logging.getLogger("lightning_kd")

#: The paper's BAN objective: KL (≡ cross-entropy up to a constant) to the teacher's plain softmax outputs.
PAPER_LOSS: dict[str, Any] = {"kd": {"temperature": 1.0}}
#: ``objective`` choices of ``conf/strategy/born_again.yaml``.
OBJECTIVES = ("kd", "cwtm", "dkpp", "loss")
RECORD_FILE = "generations.json"
FORMAT_VERSION = 1

ModelFactory = Callable[[], nn.Module]
ModuleFactory = Callable[[nn.Module], L.LightningModule]
TrainerFactory = Callable[[int, list[Callback]], L.Trainer]


@dataclass(frozen=True)
class GenerationRecord:
    """One finished generation.

    Attributes:
        generation: ``0`` (trained on labels) ... ``generations``.
        checkpoint: its weights (:func:`~lightning_kd.models.save_model_file` format).
        acc: its top-1 accuracy on the test split.
        seed: the seed it was initialised and trained under (``seed + generation``).
        reused: found finished on disk by this ``fit`` rather than trained by it.
    """

    generation: int
    checkpoint: Path
    acc: float
    seed: int
    reused: bool


@dataclass(frozen=True)
class BornAgainResult:
    """What :meth:`BornAgain.fit` produced.

    Attributes:
        generations: every generation, ``0`` first.
        ensemble_acc: test accuracy of the mean softmax of ``ensemble_members`` (``None`` with ``ensemble=False``).
        ensemble_members: the generations averaged in the ensemble.
        agreement: top-1 agreement of the last generation with its teacher on the test split (``None`` with
            ``ensemble=False``).
        path: the ``generations.json`` record.
    """

    generations: list[GenerationRecord]
    ensemble_acc: float | None
    ensemble_members: list[int]
    agreement: float | None
    path: Path

    @property
    def generation_acc(self) -> list[float]:
        """Test accuracy per generation, ``0`` first."""
        return [g.acc for g in self.generations]

    @property
    def teacher_acc(self) -> float:
        """Generation 0 (trained on labels)."""
        return self.generations[0].acc

    @property
    def student_acc(self) -> float:
        """The last generation."""
        return self.generations[-1].acc

    @property
    def checkpoints(self) -> list[Path]:
        """Every generation's weights file, ``0`` first."""
        return [g.checkpoint for g in self.generations]


class BornAgain:
    """Train born-again generations of one architecture (BAN), each distilled from the previous one.

    Args:
        make_model: a factory ``() -> nn.Module`` returning a new, randomly initialised network (logits out). Called
            under ``seed_everything(seed + k)`` for generation ``k``, and again to rebuild saved generations.
        out_dir: where ``gen<k>.pt`` and ``generations.json`` are written and found again (resume).
        generations: born-again generations after generation 0 (``>= 1``; the paper trains three).
        loss: loss terms of generations ``>= 1`` (any :func:`~lightning_kd.engine.build_terms` spec: ``"dkpp"``,
            ``{"kd": {"temperature": 2.0}}``, ``LossTerm`` objects, ...; copied afresh per generation). Default: the
            paper's BAN, ``{"kd": {"temperature": 1.0}}`` (a bare ``"kd"`` would use the registry's τ = 4).
        task_weight: weight of the module's own (label) loss in generations ``>= 1``. Default 0: the paper's BAN,
            CWTM and DKPP students learn from the teacher term only; 1 gives BAN+L.
        make_module: ``model -> LightningModule`` for every generation (default :class:`ClassifierModule`, i.e.
            cross-entropy on the labels, SGD + cosine); generation ``k >= 1`` adds the distillation through
            :class:`DistillCallback`, so any module whose ``training_step`` returns its loss works.
        make_trainer: ``(generation, callbacks) -> Trainer``, which must pass ``callbacks`` to the new Trainer (it
            holds the generation's DistillCallback); or a dict of ``lightning.Trainer`` keyword arguments (then
            ``default_root_dir`` defaults to ``<out_dir>/gen<k>``); default ``{}`` (Lightning's defaults).
        callbacks: ``generation -> list of extra callbacks`` (fresh instances per generation), placed before the
            DistillCallback.
        seed: generation ``k`` is initialised and trained under ``seed + k``.
        ensemble: evaluate the BAN ensemble (and the last generation's agreement with its teacher) at the end.
        ensemble_teacher: include generation 0 in the ensemble (the paper's BANE averages the students only).
        metadata: extra JSON-able metadata saved in every generation's file and in the plan (e.g.
            ``{"model": "resnet18", "num_classes": 10}`` makes the files loadable by
            :func:`~lightning_kd.models.load_model_file`).

    Example::

        >>> import timm
        >>> ban = BornAgain(lambda: timm.create_model("resnet18", num_classes=10), "ban_runs", generations=2,
        ...                 loss="dkpp", make_trainer={"max_epochs": 1, "accelerator": "cpu"})
        >>> ban.paths()[-1].name
        'gen2.pt'
    """

    def __init__(
        self,
        make_model: ModelFactory,
        out_dir: str | Path,
        generations: int = 3,
        *,
        loss: LossSpec | None = None,
        task_weight: float | None = None,
        make_module: ModuleFactory | None = None,
        make_trainer: TrainerFactory | Mapping[str, Any] | None = None,
        callbacks: Callable[[int], Sequence[Callback]] | None = None,
        seed: int = 0,
        ensemble: bool = True,
        ensemble_teacher: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if not callable(make_model):
            raise TypeError(f"born_again: make_model must be a factory () -> nn.Module, got {type(make_model)}")
        if isinstance(generations, bool) or not isinstance(generations, int) or generations < 1:
            raise ValueError(
                f"born_again: generations must be an integer >= 1 (born-again students after generation 0), "
                f"got {generations!r}"
            )
        if isinstance(make_trainer, Mapping) and "callbacks" in make_trainer:
            raise ValueError(
                "born_again: give extra callbacks as callbacks=lambda generation: [...] (fresh instances per "
                "generation), not in the Trainer arguments"
            )
        if make_trainer is not None and not (callable(make_trainer) or isinstance(make_trainer, Mapping)):
            raise TypeError("born_again: make_trainer must be a (generation, callbacks) -> Trainer factory or a dict")
        self.make_model = make_model
        self.out_dir = Path(out_dir)
        self.generations = generations
        self.loss: LossSpec = copy.deepcopy(PAPER_LOSS) if loss is None else loss
        terms = build_terms(copy.deepcopy(self.loss))  # fail now on a bad spec, not after generation 0
        if not terms:
            raise ValueError("born_again: loss must name at least one distillation term (e.g. 'kd', 'cwtm', 'dkpp')")
        self.term_names = list(terms)
        self.task_weight = check_number("born_again", "task_weight", 0.0 if task_weight is None else task_weight)
        self.make_module: ModuleFactory = make_module or ClassifierModule
        self.make_trainer = make_trainer
        self.callbacks = callbacks
        self.seed = int(seed)
        self.ensemble = bool(ensemble)
        self.ensemble_teacher = bool(ensemble_teacher)
        try:  # through JSON: the plan compares equal to its reading from generations.json (tuples become lists)
            self.metadata: dict[str, Any] = json.loads(json.dumps(dict(metadata or {})))
        except TypeError as err:
            raise TypeError(f"born_again: metadata must be JSON-able (str, numbers, lists, dicts): {err}") from None
        self.plan = {
            "loss": repr(nn.ModuleDict(terms)),
            "task_weight": self.task_weight,
            "seed": self.seed,
            "metadata": self.metadata,
        }
        self._device = torch.device("cpu")

    # -- files -------------------------------------------------------------------------------------------------------
    @property
    def record_path(self) -> Path:
        """``<out_dir>/generations.json``."""
        return self.out_dir / RECORD_FILE

    def path(self, generation: int) -> Path:
        """The weights file of ``generation``."""
        return self.out_dir / f"gen{generation}.pt"

    def paths(self) -> list[Path]:
        """Every generation's weights file, ``0`` first."""
        return [self.path(k) for k in range(self.generations + 1)]

    def load(self, generation: int) -> nn.Module:
        """A new ``make_model()`` with ``generation``'s saved weights (``weights_only=True``, strict)."""
        model = self.make_model()
        return load_weights(model, self.path(generation), arch=f"{type(model).__name__} (born-again generation)")

    def _read_records(self) -> list[dict[str, Any]]:
        """The finished prefix ``0..j`` recorded in ``generations.json`` whose files exist (``[]`` without one)."""
        path = self.record_path
        if not path.is_file():
            return []
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"born_again: cannot read {path} ({err}); delete it to retrain every generation") from None
        if saved.get("plan") != self.plan:
            old = saved.get("plan") or {}
            changed = sorted(k for k in {*old, *self.plan} if old.get(k) != self.plan.get(k))
            raise ValueError(
                f"born_again: {self.out_dir} holds generations trained under another plan (differs in: "
                f"{', '.join(changed)}); recorded plan: {old}. Use another out_dir for this run, or delete that "
                "directory to start the chain over"
            )
        records: list[dict[str, Any]] = []
        for entry in saved.get("generations", []):
            if entry.get("generation") != len(records) or not self.path(len(records)).is_file():
                break
            records.append(entry)
        return records

    def _write_records(self, records: list[dict[str, Any]], ensemble: dict[str, Any] | None = None) -> None:
        if rank_zero_only.rank != 0:  # under DDP every process runs the loop; one writes
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        payload = {"format": FORMAT_VERSION, "plan": self.plan, "generations": records, "ensemble": ensemble}
        write_json_atomic(self.record_path, payload)

    # -- the loop ----------------------------------------------------------------------------------------------------
    def fit(self, datamodule: L.LightningDataModule, test_dataloader: Any = None) -> BornAgainResult:
        """Train (or reuse) generations ``0..generations`` on ``datamodule`` and evaluate them.

        Args:
            datamodule: the data for every generation (``trainer.fit(module, datamodule=...)``).
            test_dataloader: batches ``(inputs, labels, ...)`` for the accuracies and the ensemble; default
                ``datamodule.test_dataloader()`` (after ``datamodule.setup("test")``).
        """
        records = self._read_records()
        if records:
            log.info("born_again: generations 0..%d found finished in %s; reusing them", len(records) - 1, self.out_dir)
        reused = len(records)
        test_data = _TestData(datamodule, test_dataloader)
        for k in range(reused, self.generations + 1):
            records.append(self._train_generation(k, datamodule, test_data, records))
            self._write_records(records)
        result_records = [
            GenerationRecord(k, self.path(k), float(r["acc"]), int(r["seed"]), k < reused)
            for k, r in enumerate(records[: self.generations + 1])
        ]
        members = self.ensemble_members()
        ensemble_acc = agreement = None
        if self.ensemble:
            ensemble_acc, agreement = self.evaluate_ensemble(test_data.loader(), members)
            self._write_records(records, {"members": members, "acc": ensemble_acc, "agreement": agreement})
        return BornAgainResult(
            result_records, ensemble_acc, members if self.ensemble else [], agreement, self.record_path
        )

    def _train_generation(
        self, k: int, datamodule: L.LightningDataModule, test_data: _TestData, earlier: list[dict[str, Any]]
    ) -> dict[str, Any]:
        seed = self.seed + k
        L.seed_everything(seed, workers=True, verbose=False)
        model = self.make_model()
        init = weights_hash(model)
        same = [r["generation"] for r in earlier if r.get("init_sha256") == init]
        if same:
            warnings.warn(
                f"born_again: generation {k} starts from the same weights as generation(s) {same}: make_model seems "
                "to seed itself. Born-again generations need a fresh initialisation; let make_model draw from the "
                f"global RNG, which the loop seeds with seed + generation ({seed})",
                stacklevel=3,
            )
        callbacks = list(self.callbacks(k)) if self.callbacks is not None else []
        if k > 0:
            teacher = self.load(k - 1)
            callbacks.append(DistillCallback(teacher, loss=copy.deepcopy(self.loss), task_weight=self.task_weight))
        trainer = self._trainer(k, callbacks)
        log.info("born_again: training generation %d (seed %d)%s", k, seed, f", teacher gen{k - 1}.pt" if k else "")
        trainer.fit(self.make_module(model), datamodule=datamodule)
        if not trainer.state.finished:
            raise RuntimeError(
                f"born_again: generation {k}'s fit did not finish ({trainer.state.status}); not recorded"
            )
        if weights_hash(model) == init:
            warnings.warn(
                f"born_again: generation {k}'s network did not change during its fit; make_module must train the "
                "network it is given (not a copy), and the Trainer must take at least one step",
                stacklevel=3,
            )
        self._device = trainer.strategy.root_device  # Lightning moves the module back to the CPU after fit
        probs, targets = predict_probabilities(model.to(self._device), test_data.loader())
        model.cpu()
        acc = float((probs.argmax(-1) == targets).float().mean())
        if trainer.is_global_zero:
            meta = {
                **self.metadata,
                "generation": k,
                "seed": seed,
                "test_acc": acc,
                "teacher": f"gen{k - 1}.pt" if k else None,
            }
            save_model_file(model, self.path(k), meta)
        trainer.strategy.barrier("born_again_generation")
        log.info("born_again: generation %d test accuracy %.4f -> %s", k, acc, self.path(k))
        return {"generation": k, "checkpoint": self.path(k).name, "acc": acc, "seed": seed, "init_sha256": init}

    def _trainer(self, k: int, callbacks: list[Callback]) -> L.Trainer:
        if callable(self.make_trainer):
            trainer = self.make_trainer(k, callbacks)
        else:
            kwargs = {"default_root_dir": str(self.out_dir / f"gen{k}"), **(self.make_trainer or {})}
            trainer = L.Trainer(**kwargs, callbacks=callbacks)
        missing = [type(c).__name__ for c in callbacks if c not in trainer.callbacks]
        if missing:
            raise ValueError(
                f"born_again: make_trainer({k}, callbacks) returned a Trainer without the callbacks {missing}; pass "
                "them on: lightning.Trainer(..., callbacks=callbacks)"
            )
        return trainer

    def ensemble_members(self) -> list[int]:
        """The generations averaged in the BAN ensemble: ``1..generations`` (and ``0`` with ``ensemble_teacher``)."""
        return list(range(0 if self.ensemble_teacher else 1, self.generations + 1))

    def evaluate_ensemble(self, loader: Any, members: Sequence[int] | None = None) -> tuple[float, float]:
        """From the saved files: the accuracy over ``loader`` of the mean softmax output of ``members`` (default
        :meth:`ensemble_members`), and the top-1 agreement of the last generation with its teacher."""
        members = list(self.ensemble_members() if members is None else members)
        probs: dict[int, torch.Tensor] = {}
        targets = torch.empty(0)
        for k in sorted({*members, self.generations - 1, self.generations}):
            model = self.load(k).to(self._device)
            probs[k], targets = predict_probabilities(model, loader)
            del model
        mean = torch.stack([probs[k] for k in members]).mean(dim=0)
        ensemble_acc = float((mean.argmax(-1) == targets).float().mean())
        last, previous = probs[self.generations].argmax(-1), probs[self.generations - 1].argmax(-1)
        return ensemble_acc, float((last == previous).float().mean())


class _TestData:
    """The test batches: a given loader, or the datamodule's (set up once for ``"test"``)."""

    def __init__(self, datamodule: L.LightningDataModule, loader: Any = None) -> None:
        self.datamodule = datamodule
        self._loader = loader
        self._ready = loader is not None

    def loader(self) -> Any:
        if self._loader is not None:
            return self._loader
        if not self._ready:
            self.datamodule.setup("test")
            self._ready = True
        return self.datamodule.test_dataloader()


def predict_probabilities(model: nn.Module, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax probabilities [N, C] float32, labels [N])`` of ``model`` over ``loader`` (eval mode, no grad, on
    the model's device and in its parameters' dtype; returned on the CPU)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else None  # a model trained with a *-true precision is half precision
    probs, labels = [], []
    with eval_mode(model), torch.no_grad():
        for batch in loader:
            inputs, targets, _ = unpack_batch(batch)
            if targets is None:
                raise ValueError("born_again: the test batches carry no labels; accuracies need (inputs, labels)")
            inputs = inputs.to(device=device, dtype=dtype if inputs.is_floating_point() else None)
            probs.append(F.softmax(as_logits(model(inputs)).float(), dim=-1).cpu())
            labels.append(split_targets(targets)[0].reshape(-1).cpu())  # type: ignore[union-attr]
    if not probs:
        raise ValueError("born_again: the test dataloader is empty")
    return torch.cat(probs), torch.cat(labels)


def weights_hash(model: nn.Module) -> str:
    """SHA-256 of a model's state (names, dtypes, shapes, bytes): equal hashes mean identical weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# The Hydra app: strategy=born_again
# --------------------------------------------------------------------------------------------------------------------
def objective_loss(strategy: DictConfig, loss: DictConfig, seed: int = 0) -> tuple[Any, float]:
    """The loss spec and task weight of ``strategy.objective``: ``kd`` / ``dkpp`` at ``strategy.temperature``,
    ``cwtm``, or ``loss`` (the terms and task weight of ``loss=``). ``strategy.task_weight`` (when not null) overrides
    the task weight (default 0 for the paper's objectives)."""
    objective = str(strategy.objective)
    temperature = check_temperature("born_again", float(strategy.temperature))
    specs = {
        "kd": {"kd": {"temperature": temperature}},
        "dkpp": {"dkpp": {"temperature": temperature, "seed": int(seed)}},
        "cwtm": {"cwtm": {}},
    }
    if objective == "loss":
        spec: Any = OmegaConf.to_container(loss.terms, resolve=True)
        default_weight = float(loss.task_weight)
    elif objective in specs:
        spec, default_weight = specs[objective], 0.0
    else:
        raise ValueError(
            f"strategy.objective must be one of {', '.join(OBJECTIVES)} (kd: the paper's BAN; cwtm, dkpp: its "
            f"ablations; loss: the terms of loss=), got {objective!r}"
        )
    task_weight = strategy.get("task_weight")
    return spec, default_weight if task_weight is None else float(task_weight)


def run_app(cfg: DictConfig, datamodule: Any, out_dir: Path) -> dict[str, Any]:
    """``strategy=born_again``: generation 0 = ``model=`` trained on labels, then ``strategy.generations``
    generations of the same architecture each distilled from the previous one, every one for ``trainer.max_epochs``
    with the app's optimizer and scheduler; weights in ``<out_dir>/generations/gen<k>.pt`` (finished ones are reused
    when the run directory is reused: ``hydra.run.dir=<that directory>``). ``teacher=`` is not used."""
    opts = cfg.strategy
    check_single_fit(
        cfg,
        "born_again",
        "it trains its own generation 0 (the first teacher) and then the generations",
        refuse_cache=False,
    )
    if cfg.ckpt_path:
        raise ValueError(
            "strategy=born_again resumes by generation, not from ckpt_path: rerun with hydra.run.dir=<the interrupted "
            "run's directory> and the finished generations in <dir>/generations are reused"
        )
    if cfg.model.pretrained or cfg.model.checkpoint:
        raise ValueError(
            "strategy=born_again starts every generation from a fresh random initialisation; unset "
            "model.pretrained / model.checkpoint"
        )
    spec, task_weight = objective_loss(opts, cfg.loss, int(cfg.seed))
    num_classes = int(datamodule.num_classes)
    kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True) if cfg.model.get("kwargs") else {}
    ban = BornAgain(
        lambda: build_model(cfg.model, num_classes),
        out_dir / "generations",
        int(opts.generations),
        loss=spec,
        task_weight=task_weight,
        make_module=lambda model: classifier_module(cfg, model),
        make_trainer=lambda k, callbacks: make_trainer(cfg, out_dir / f"gen{k}", checkpoints=False, extra=callbacks),
        callbacks=lambda k: option_callbacks(cfg) if k > 0 else [],
        seed=int(cfg.seed),
        ensemble=bool(opts.ensemble),
        ensemble_teacher=bool(opts.get("ensemble_teacher", False)),
        metadata={"model": str(cfg.model.name), "num_classes": num_classes, "model_kwargs": kwargs},
    )
    result = ban.fit(datamodule)
    last = len(result.generations) - 1
    rows: list[list[Any]] = [
        [f"generation {g.generation} accuracy{' (reused)' if g.reused else ''}", g.acc] for g in result.generations
    ]
    if result.ensemble_acc is not None:
        members = ",".join(map(str, result.ensemble_members))
        rows.append([f"BAN ensemble accuracy (generations {members})", result.ensemble_acc])
    reused = [g.generation for g in result.generations if g.reused]
    results: dict[str, Any] = {
        "teacher": f"{cfg.model.name} generation 0",
        "teacher_source": "trained on labels" if 0 not in reused else f"reused: {result.checkpoints[0]}",
        "teacher_acc": result.teacher_acc,
        "student": f"{cfg.model.name} generation {last}",
        "loss": ",".join(ban.term_names),
        "objective": str(opts.objective),
        "task_weight": task_weight,
        "student_acc": result.student_acc,
        "student_val_acc": evaluate(ban.load(last), datamodule, split="val")["acc"],
        "generation_acc": result.generation_acc,
        "ensemble_acc": result.ensemble_acc,
        "ensemble_members": result.ensemble_members,
        "reused_generations": reused,
        "rows": rows,
        "checkpoint": str(result.checkpoints[-1]),
        "checkpoints": [str(p) for p in result.checkpoints],
        "generations": str(result.path),
        "logs": str(out_dir / f"gen{last}" / "logs" / "metrics.csv"),
    }
    if result.agreement is not None:
        results["agreement"] = result.agreement
    if cfg.baseline:
        results["baseline_acc"] = result.teacher_acc  # generation 0 is the no-KD baseline (same seed, same schedule)
    return results
