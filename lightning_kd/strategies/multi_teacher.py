"""Several teachers
^^^^^^^^^^^^^^^^^

:class:`TeacherEnsemble` holds several frozen teachers (any architectures with the same class count) and is itself a
teacher: its forward returns the combined logits (``.logits``) and each member's logits (``.members``), which the
engine passes on to the loss terms (``DistillBatch.teacher.members``) and uses to log the student's agreement with
each member (``train/agreement/<member>``). Taps address a member's layers as ``members.<name>.<path>``.

How the teachers are combined is the choice of loss term:

- **averaging** — any loss on the ensemble's combined logits, no new term::

      DistillCallback(TeacherEnsemble({"resnet34": t1, "resnet50": t2}), loss="kd")

  ``combine="mean_logits"`` (default) averages the logits, so ``softmax(z̄/τ)`` is the normalised geometric mean of
  the teachers' tempered distributions; ``combine="mean_probs"`` gives ``log`` of the mean probability (the usual
  ensemble prediction at τ = 1). :class:`PerTeacher` instead applies a logit term to each member and averages (or sums,
  the advice of RepDistiller's authors for ensembles, HobbitLong/RepDistiller issue #17) the losses; for KD, the mean of
  the per-teacher losses has the same gradient as KD to the arithmetic mean of the tempered distributions (the KL is
  linear in its first argument), which neither combined-logit rule gives;
- **per-sample gating** — :class:`~lightning_kd.losses.classroom.ClassroomKD` (``loss="classroom"``);
- **a learned router** — :class:`~lightning_kd.losses.router.RouterKD` (``loss="router"``, MST-Distill);
- **data partitioning** with a frozen copy of the initial student —
  :class:`~lightning_kd.losses.partition.PartitionKD` (``loss="partition"``, Fantastic Gains).

Terms may record values to log that are not part of the loss in their ``diagnostics`` dict (the router's routing
fractions, partitioning's share of samples sent to the teacher); the engine logs them as ``train/<term>/<key>``.

A teacher-output cache (``teacher_cache=``) stores only the combined logits: batches served from it log no
per-member agreement, and the classroom, router and partition terms refuse them with an error (they need each
member's logits); ``combine=average`` with a combined-logit loss works with the cache.

``python -m lightning_kd.run strategy=multi_teacher`` (:func:`run_app`) obtains each teacher of
``strategy.teachers`` like the single teacher of the default strategy (weights, else the teacher store, else trained
and stored), and distils the ensemble with the terms that ``strategy.combine`` selects.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_kd.app import (
    build_model,
    classifier_module,
    evaluate,
    fit_report,
    make_trainer,
    obtain_teacher,
    option_callbacks,
    train_baseline,
)
from lightning_kd.callback import DistillCallback
from lightning_kd.engine import ClassCountMismatchError, LossSpec, as_logits, build_terms
from lightning_kd.losses.base import DistillBatch, LossTerm, ModelOutputs, SetupContext, TeacherPass
from lightning_kd.losses.classroom import member_logits
from lightning_kd.taps import TapSpec

log = logging.getLogger("lightning_kd")

COMBINE_RULES = ("mean_logits", "mean_probs")
COMBINE_TERMS = ("average", "classroom", "router", "partition")


# --------------------------------------------------------------------------------------------------------------------
# The ensemble
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class EnsembleOutput:
    """What :class:`TeacherEnsemble` returns: the combined logits and each member's logits by name."""

    logits: torch.Tensor
    members: dict[str, torch.Tensor]


def combine_logits(logits: Sequence[torch.Tensor], rule: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Combine the members' logits ``[B, C]`` into one prediction (float32).

    - ``"mean_logits"``: ``Σ_m w_m z_m``;
    - ``"mean_probs"``: ``log Σ_m w_m softmax(z_m)`` (valid logits: their softmax is the weighted mean probability).

    ``weights`` (non-negative, summing to 1) default to uniform.
    """
    stacked = torch.stack([z.float() for z in logits])  # [M, B, C]
    w = torch.full((len(logits),), 1.0 / len(logits), device=stacked.device) if weights is None else weights
    w = w.to(stacked.device, torch.float32).view(-1, 1, 1)
    if rule == "mean_logits":
        return (w * stacked).sum(0)
    if rule == "mean_probs":
        return torch.logsumexp(torch.log_softmax(stacked, dim=-1) + torch.log(w), dim=0)
    raise ValueError(f"combine must be one of {COMBINE_RULES}, got {rule!r}")


def _default_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__.lower())


def _unique_names(names: Sequence[str]) -> list[str]:
    """Module-safe (no ``.``), unique names: repeated ones get ``_2``, ``_3``..."""
    out: list[str] = []
    for name in names:
        base = name.replace(".", "_") or "teacher"
        candidate, i = base, 1
        while candidate in out:
            i += 1
            candidate = f"{base}_{i}"
        out.append(candidate)
    return out


class TeacherEnsemble(nn.Module):
    """Several teachers used as one.

    Args:
        members: ``{name: model}`` or a list of models (named by their timm architecture, else their class; repeated
            names get a suffix). Names with ``.`` have it replaced by ``_`` (module names cannot contain dots).
        combine: ``"mean_logits"`` or ``"mean_probs"`` (see :func:`combine_logits`).
        weights: one non-negative weight per member (normalised to sum to 1); default uniform.

    ``forward(x)`` returns an :class:`EnsembleOutput`. Every member must predict the same number of classes: checked
    here when every member has a ``num_classes`` attribute (timm models do), and on every forward otherwise
    (:class:`~lightning_kd.engine.ClassCountMismatchError` naming each member's count).

    Example::

        >>> import timm
        >>> ensemble = TeacherEnsemble({"resnet18": timm.create_model("resnet18", num_classes=10),
        ...                             "resnet34": timm.create_model("resnet34", num_classes=10)})
        >>> out = ensemble(torch.randn(2, 3, 32, 32))
        >>> out.logits.shape, sorted(out.members)
        (torch.Size([2, 10]), ['resnet18', 'resnet34'])
    """

    def __init__(
        self,
        members: Mapping[str, nn.Module] | Sequence[nn.Module],
        combine: str = "mean_logits",
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(members, Mapping):
            names, models = [str(k) for k in members], list(members.values())
        else:
            models = list(members)
            names = [_default_name(m) for m in models]
        if not models:
            raise ValueError("TeacherEnsemble needs at least one member")
        bad = [type(m).__name__ for m in models if not isinstance(m, nn.Module)]
        if bad:
            raise TypeError(f"TeacherEnsemble members must be nn.Modules, got {', '.join(bad)}")
        if combine not in COMBINE_RULES:
            raise ValueError(f"TeacherEnsemble: combine must be one of {COMBINE_RULES}, got {combine!r}")
        self.members = nn.ModuleDict(dict(zip(_unique_names(names), models)))
        self.combine = combine
        if weights is None:
            self.weights: torch.Tensor | None = None
        else:
            w = torch.as_tensor([float(v) for v in weights], dtype=torch.float32)
            if len(w) != len(models) or bool((w < 0).any()) or float(w.sum()) <= 0:
                raise ValueError(
                    f"TeacherEnsemble: weights must be {len(models)} non-negative numbers with a positive sum "
                    f"(one per member), got {list(weights)}"
                )
            self.weights = w / w.sum()
        counts = {name: getattr(m, "num_classes", None) for name, m in self.members.items()}
        if all(isinstance(c, int) for c in counts.values()):
            self._check_counts(counts)

    @staticmethod
    def _check_counts(counts: Mapping[str, int]) -> None:
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{name}: {n}" for name, n in counts.items())
            raise ClassCountMismatchError(
                f"the teachers of a TeacherEnsemble must predict the same number of classes, got {listed}; create "
                "every member with the same num_classes (e.g. timm.create_model(name, num_classes=N))"
            )

    def forward(self, x: torch.Tensor) -> EnsembleOutput:
        outputs = {name: as_logits(model(x)) for name, model in self.members.items()}
        self._check_counts({name: int(z.shape[-1]) for name, z in outputs.items()})
        return EnsembleOutput(combine_logits(list(outputs.values()), self.combine, self.weights), outputs)

    def as_classifier(self) -> nn.Module:
        """A module whose forward returns only the combined logits (for code that expects a tensor)."""
        return _CombinedLogits(self)

    def extra_repr(self) -> str:
        return f"combine={self.combine!r}"


class _CombinedLogits(nn.Module):
    def __init__(self, ensemble: TeacherEnsemble) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ensemble(x).logits


# --------------------------------------------------------------------------------------------------------------------
# Per-teacher losses and diagnostics
# --------------------------------------------------------------------------------------------------------------------
class PerTeacher(LossTerm):
    """Apply one logit term to each member of the teacher ensemble separately and reduce the losses.

    Args:
        term: the term (anything :func:`~lightning_kd.engine.build_terms` accepts that yields one term: ``"kd"``,
            ``{"kd": {"temperature": 4}}`` or a :class:`LossTerm`). Its ``weight`` becomes this term's weight.
        reduction: ``"mean"`` (default) or ``"sum"`` over the members.

    Each member's value is in ``diagnostics`` (``<member>``). The inner term sees a batch whose teacher logits are the
    member's (features are the ensemble's taps, unchanged: use it for logit terms).
    """

    def __init__(self, term: LossSpec, reduction: str = "mean") -> None:
        terms = build_terms(term)
        if len(terms) != 1:
            raise ValueError(f"PerTeacher wraps exactly one term, got {len(terms)} ({', '.join(terms)})")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"PerTeacher: reduction must be 'mean' or 'sum', got {reduction!r}")
        inner = next(iter(terms.values()))
        super().__init__(inner.weight)
        self.term = inner
        self.reduction = reduction
        self.needs_prepare = inner.needs_prepare  # type: ignore[misc]
        self.replaces_task_loss = inner.replaces_task_loss  # type: ignore[misc]

    def taps(self) -> dict[str, list[TapSpec]]:
        return self.term.taps()

    def setup(self, ctx: SetupContext) -> None:
        self.term.setup(ctx)

    def prepare(self, passes: Iterable[TeacherPass]) -> None:
        self.term.prepare(passes)

    def student_predictor(self, student: nn.Module) -> nn.Module | None:
        return self.term.student_predictor(student)

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        values = {}
        for name, logits in member_logits(batch.teacher).items():
            teacher = ModelOutputs(logits, batch.teacher.features)
            value = self.term(dataclasses.replace(batch, teacher=teacher))
            values[name] = sum(value.values()) if isinstance(value, Mapping) else value
        self.diagnostics = {name: v.detach() for name, v in values.items()}
        stacked = torch.stack([v.float() for v in values.values()])
        return stacked.mean() if self.reduction == "mean" else stacked.sum()

    def extra_repr(self) -> str:
        return f"weight={self.weight}, reduction={self.reduction!r}"


# --------------------------------------------------------------------------------------------------------------------
# The Hydra app's strategy
# --------------------------------------------------------------------------------------------------------------------
def teacher_config(cfg: DictConfig, name: str, checkpoint: str | None) -> DictConfig:
    """A copy of ``cfg`` whose ``teacher`` node is the timm model ``name`` (weights from ``checkpoint``, else timm's
    pretrained weights when ``teacher.pretrained``, else the teacher store or training)."""
    member = copy.deepcopy(cfg)
    OmegaConf.set_struct(member, False)
    member.teacher = {"name": name, "pretrained": bool(cfg.teacher.pretrained), "checkpoint": checkpoint, "kwargs": {}}
    return member


def obtain_teachers(cfg: DictConfig, datamodule: Any, out_dir: Path) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Each teacher of ``strategy.teachers`` (with ``strategy.checkpoints[i]`` when given), obtained like the single
    teacher of the default strategy. Returns ``({name: model}, {name: source})``."""
    names = list(cfg.strategy.teachers or [])
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"strategy.teachers must be a non-empty list of timm model names, got {names!r} "
            "(e.g. strategy.teachers=[resnet34,resnet50])"
        )
    checkpoints = list(cfg.strategy.checkpoints or [None] * len(names))
    if len(checkpoints) != len(names):
        raise ValueError(
            f"strategy.checkpoints has {len(checkpoints)} entries for {len(names)} teachers {names}; give one path "
            "(or null) per teacher, or leave it null"
        )
    keys = _unique_names(names)
    models, sources = {}, {}
    for key, name, checkpoint in zip(keys, names, checkpoints):
        if key != name.replace(".", "_") and checkpoint is None:
            log.warning("teacher %s is listed twice without checkpoints: both copies get the same weights", name)
        model, report = obtain_teacher(teacher_config(cfg, name, checkpoint), datamodule, out_dir / f"teacher_{key}")
        models[key], sources[key] = model, report["teacher_source"]
    return models, sources


def evaluate_ensemble(ensemble: TeacherEnsemble, datamodule: Any, student: nn.Module | None = None) -> dict[str, Any]:
    """One pass over the test split: the accuracy of the ensemble (``acc``) and of each member (``members``) and, with a
    ``student``, its accuracy (``student_acc``), its agreement with the ensemble (``agreement``) and with each member
    (``member_agreement``)."""
    device = next(ensemble.parameters()).device
    ensemble.eval()
    if student is not None:
        student.eval().to(device)
    total = 0
    correct: dict[str, int] = {}
    agree: dict[str, int] = {}
    with torch.no_grad():
        for inputs, targets, *_ in datamodule.test_dataloader():
            inputs, targets = inputs.to(device), targets.to(device)
            out = ensemble(inputs)
            preds = {"": out.logits.argmax(-1), **{k: z.argmax(-1) for k, z in out.members.items()}}
            if student is not None:
                preds["student"] = as_logits(student(inputs)).argmax(-1)
                for key in out.members.keys() | {""}:
                    agree[key] = agree.get(key, 0) + int((preds["student"] == preds[key]).sum())
            for key, pred in preds.items():
                correct[key] = correct.get(key, 0) + int((pred == targets).sum())
            total += len(targets)
    n = max(total, 1)
    scores: dict[str, Any] = {"acc": correct[""] / n, "members": {k: correct[k] / n for k in ensemble.members}}
    if student is not None:
        scores |= {
            "student_acc": correct["student"] / n,
            "agreement": agree[""] / n,
            "member_agreement": {k: agree[k] / n for k in ensemble.members},
        }
    return scores


def loss_spec(cfg: DictConfig) -> tuple[Any, float]:
    """``(terms, task_weight)`` for ``strategy.combine``: ``loss=`` for ``average`` (each term wrapped in
    :class:`PerTeacher` with ``strategy.per_teacher``), else the ``strategy.<combine>`` node."""
    combine = cfg.strategy.combine
    if combine not in COMBINE_TERMS:
        raise ValueError(f"strategy.combine must be one of {COMBINE_TERMS}, got {combine!r}")
    if combine != "average":
        log.info("combine=%s: loss terms from strategy.%s (the loss= group is not used)", combine, combine)
        node = cfg.strategy[combine]
        return OmegaConf.to_container(node.terms, resolve=True), float(node.task_weight)
    terms = OmegaConf.to_container(cfg.loss.terms, resolve=True)
    if cfg.strategy.per_teacher:
        reduction = cfg.strategy.per_teacher if cfg.strategy.per_teacher in ("mean", "sum") else "mean"
        terms = {name: PerTeacher({name: kwargs}, reduction) for name, kwargs in terms.items()}
    return terms, float(cfg.loss.task_weight)


def run_app(cfg: DictConfig, datamodule: Any, out_dir: Path) -> dict[str, Any]:
    """``strategy=multi_teacher``: the teachers of ``strategy.teachers`` (loaded, reused or trained) in a
    :class:`TeacherEnsemble`, distilled into the student by :class:`~lightning_kd.callback.DistillCallback` with the
    terms ``strategy.combine`` selects. Reports the ensemble's and each teacher's test accuracy and the student's
    agreement with each."""
    members, sources = obtain_teachers(cfg, datamodule, out_dir)
    ensemble = TeacherEnsemble(members, combine=cfg.strategy.ensemble)
    teachers = evaluate_ensemble(ensemble, datamodule)
    rows = [[f"teacher {k} accuracy", acc] for k, acc in teachers["members"].items()]
    results: dict[str, Any] = {
        "teacher": "+".join(members),
        "teacher_source": "; ".join(f"{k}: {v}" for k, v in sources.items()),
        "teacher_acc": teachers["acc"],
        "teacher_accs": teachers["members"],
        "rows": rows,
    }
    if cfg.stage == "teacher":
        return results
    terms, task_weight = loss_spec(cfg)
    L.seed_everything(cfg.seed, workers=True)
    student = build_model(cfg.model, datamodule.num_classes)
    module = classifier_module(cfg, student)
    distill = DistillCallback(ensemble, loss=terms, task_weight=task_weight)
    trainer = make_trainer(cfg, out_dir, checkpoints=True, extra=(*option_callbacks(cfg), distill))
    trainer.fit(module, datamodule, ckpt_path=cfg.ckpt_path)
    assert distill.engine is not None
    predictor = distill.engine.student_predictor(module) or student
    scores = evaluate_ensemble(ensemble, datamodule, predictor)
    rows += [[f"agreement with {k}", v] for k, v in scores["member_agreement"].items()]
    results |= {
        "student": cfg.model.name,
        "combine": cfg.strategy.combine,
        "loss": ",".join(distill.engine.terms),
        "student_acc": scores["student_acc"],
        "student_val_acc": evaluate(predictor, datamodule, split="val")["acc"],
        "agreement": scores["agreement"],
        "member_agreement": scores["member_agreement"],
        **fit_report(trainer, out_dir),
    }
    if cfg.baseline:
        results["baseline_acc"] = train_baseline(cfg, datamodule, out_dir)
    return results


__all__ = [
    "EnsembleOutput",
    "PerTeacher",
    "TeacherEnsemble",
    "combine_logits",
    "evaluate_ensemble",
    "run_app",
]
