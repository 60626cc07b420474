"""Online / mutual distillation
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Two or more networks train together, each distilling from the others' current predictions. One LightningModule,
:class:`MutualDistillationModule`, holds every network in an ``nn.ModuleDict`` (so all are trainable, in the one
optimizer, wrapped by DDP and saved in checkpoints) and trains network :math:`i` on

.. math::

    L_i = \\text{task\\_weight} \\cdot \\mathrm{CE}(z_i, y)
          + w_i \\cdot \\frac{1}{K-1} \\sum_{j \\ne i} \\sum_{\\text{terms}} \\text{weight} \\cdot
            \\text{term}\\big(\\text{student} = z_i,\\ \\text{teacher} = \\mathrm{sg}(z_j)\\big)

where :math:`\\mathrm{sg}` is stop-gradient (the peer's logits are detached), the terms are ordinary logit-level
:class:`~lightning_kd.losses.base.LossTerm` objects (default ``kd``) and :math:`w_i` is ``distill_weights[i]``
(default 1). The step's loss is :math:`\\sum_i L_i`.

Methods it covers (the configs are ``conf/strategy/mutual.yaml``, ``ctcd.yaml``, ``bdkd.yaml``):

- **DML** — Zhang, Xiang, Hospedales, Lu, "Deep Mutual Learning", CVPR 2018 (arXiv:1706.00384):
  :math:`L_i = \\mathrm{CE}_i + \\frac{1}{K-1}\\sum_{j\\ne i} \\mathrm{KL}(p_j \\| p_i)` at temperature 1 — the
  ``kd`` term with ``temperature: 1`` (τ² = 1), ``task_weight: 1``, all :math:`w_i = 1`. Checked against
  ``SforAiDl/KD_Lib: KD_Lib/KD/vision/DML/dml.py`` (CE + mean over the other peers of the distillation loss).
- **CTCD** — Lee, Hou, Kim, Liang, Zhang, Hwang, Min, "Co-training and Co-distillation for Quality Improvement and
  Compression of Language Models", Findings of EMNLP 2023 (arXiv:2311.02849): a large and a small network co-trained,
  :math:`L_{large} = \\mathrm{CE} + \\alpha\\,\\mathrm{KL}(p_{small} \\| p_{large})`, :math:`L_{small} = \\mathrm{CE} +
  \\beta\\,\\mathrm{KL}(p_{large} \\| p_{small})`: ``distill_weights={large: α, small: β}``. The asymmetric weights are
  recalled from the paper (abstract confirmed; no public code found), not checked.
- **BD-KD** — Amara et al., arXiv:2212.12965: the ``bdkd`` term (:mod:`lightning_kd.losses.bdkd`, an unconfirmed
  reconstruction) on both sides, student and online teacher.

Simultaneous update, not DML's alternation. DML's Algorithm 1 updates :math:`\\theta_1`, recomputes the predictions,
then updates :math:`\\theta_2`. Here every network takes one step on the same batch from the same predictions: one
forward per network per step instead of K, one optimizer, one DDP all-reduce, and the schedule CTCD and BD-KD use
("trained simultaneously"). Because each :math:`L_i` sees its peers only through detached logits, the gradient of
:math:`\\sum_i L_i` with respect to :math:`\\theta_i` is exactly :math:`\\nabla_{\\theta_i} L_i`, and per-parameter
optimizers (SGD with momentum / weight decay, Adam) step each network as if it had its own optimizer. Two things do
couple the networks: gradient clipping by the global norm (``gradient_clip_val``) and a shared learning-rate
schedule.

Logs: ``train/<name>/ce``, ``train/<name>/<term>`` (and parts), ``train/<name>/agreement`` (mean top-1 agreement with
its peers; per peer ``train/<name>/agreement/<peer>`` when K > 2), ``train/loss``; for ``val`` and ``test``:
``<stage>/<name>/acc``, ``<stage>/<name>/ece`` (torchmetrics ``MulticlassCalibrationError(n_bins=15, norm="l1")``,
one metric object per network and stage, synchronised and reset by Lightning) and
``<stage>/<name>/agreement/<peer>``.

Any network can be the final model: ``module.export(name)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_kd.engine import (
    ClassCountMismatchError,
    DistillEngine,
    LossSpec,
    agreement,
    as_logits,
    calibration_error,
    check_finite_task_loss,
    eval_mode,
    split_targets,
    unpack_batch,
)
from lightning_kd.losses.base import DistillBatch, ModelOutputs, SetupContext, check_number
from lightning_kd.module import ClassifierModule, OptimizerFactory
from lightning_kd.trainer_utils import max_steps_of, num_samples_of, probe_inputs

STAGES = ("val", "test")


class MutualDistillationModule(ClassifierModule):
    """Several networks trained together, each distilling from the others' detached predictions (DML, CTCD,
    BD-KD; see the module docstring for the loss).

    Args:
        networks: ``{name: network}``, at least two distinct modules returning logits over the same classes. Names
            appear in log keys and checkpoint keys (``model.<name>.*``): no ``.`` or ``/``.
        loss: the distillation terms every network uses toward each peer (see
            :func:`~lightning_kd.engine.build_terms`); logit-level only — terms that read layer taps or need a pass
            of a frozen teacher over the data are refused.
        task_weight: weight of each network's cross-entropy on labels; default 1, or 0 when a term replaces the
            label loss (``pld``).
        distill_weights: ``{name: w_i}``, the weight of network ``name``'s distillation loss (default 1 each):
            CTCD's ``{large: α, small: β}``.
        peer_loss: ``{name: loss}`` replacing ``loss`` for the named networks (e.g. BD-KD's online teacher with
            ``{"bdkd": {"mode": "reverse"}}``).
        optimizer, scheduler, label_smoothing: as in :class:`~lightning_kd.module.ClassifierModule`; the optimizer
            gets every network's parameters.
        num_classes: the number of classes (for the ECE metrics); default: the networks' ``num_classes`` attribute
            (timm models), else found by probing one training batch in ``setup``.
        primary: the network ``forward`` uses (default: the first).

    Example::

        >>> import timm
        >>> module = MutualDistillationModule(
        ...     {"large": timm.create_model("resnet34", num_classes=10),
        ...      "small": timm.create_model("resnet18", num_classes=10)},
        ...     loss={"kd": {"temperature": 1.0}}, distill_weights={"large": 0.5, "small": 1.0})
        >>> module.names
        ['large', 'small']
    """

    def __init__(
        self,
        networks: Mapping[str, nn.Module],
        loss: LossSpec = "kd",
        task_weight: float | None = None,
        distill_weights: Mapping[str, float] | None = None,
        peer_loss: Mapping[str, LossSpec] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: Any = "cosine",
        label_smoothing: float = 0.0,
        num_classes: int | None = None,
        primary: str | None = None,
    ) -> None:
        networks = _check_networks(networks)
        names = list(networks)
        distill_weights = _check_weights(distill_weights, names)  # plain floats: saved in hparams
        peer_loss = dict(peer_loss or {})
        unknown = sorted(set(peer_loss) - set(names))
        if unknown:
            raise ValueError(f"peer_loss names {unknown} are not networks; networks: {names}")
        if primary is not None and primary not in names:
            raise ValueError(f"primary={primary!r} is not a network; networks: {names}")
        num_classes = num_classes if num_classes is not None else _num_classes_attribute(networks)
        super().__init__(nn.ModuleDict(networks), optimizer, scheduler, label_smoothing)
        self.names = names
        self.primary = primary or names[0]
        self.distill_weights = distill_weights
        # One engine per network: its term loop (weighting, finite checks, per-term logs) is reused as is; its teacher
        # slot is a placeholder, because the "teacher" of each step is a peer's detached logits passed in the batch.
        self.engines = nn.ModuleDict(
            {
                name: DistillEngine(peer_loss.get(name, loss), nn.Identity(), log_prefix=f"train/{name}/")
                for name in names
            }
        )
        for name, engine in self.engines.items():
            _check_terms(name, engine)
        if task_weight is None:
            replaces = any(t.replaces_task_loss for e in self.engines.values() for t in e.terms.values())
            task_weight = 0.0 if replaces else 1.0
        self.task_weight = check_number("mutual", "task_weight", task_weight)
        self.num_classes = num_classes
        self.calibration: nn.ModuleDict | None = None
        if num_classes is not None:
            self._build_metrics(num_classes)
        self._terms_ready = False
        self._max_steps = -1

    # -- construction helpers ----------------------------------------------------------------------------------------
    def save_hyperparameters(self, *args: Any, ignore: Any = None, frame: Any = None, logger: bool = True) -> None:
        """:class:`ClassifierModule` saves its init arguments; the networks and per-network losses are modules or
        specs, not hyperparameters (and would make checkpoints unloadable with ``weights_only=True``)."""
        ignore = [ignore] if isinstance(ignore, str) else list(ignore or [])
        frame = frame or inspect.currentframe().f_back  # type: ignore[union-attr] - the caller's __init__ frame
        super().save_hyperparameters(*args, ignore=[*ignore, "networks", "peer_loss"], frame=frame, logger=logger)

    def _build_metrics(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self.calibration = nn.ModuleDict(
            {stage: nn.ModuleDict({n: calibration_error(self.num_classes) for n in self.names}) for stage in STAGES}
        )

    @property
    def networks(self) -> nn.ModuleDict:
        """The trained networks by name (the ``model`` ModuleDict)."""
        return self.model  # type: ignore[return-value]

    def export(self, name: str) -> nn.Module:
        """The trained network ``name`` itself (not a copy: ``copy.deepcopy`` it if training continues), e.g. to
        save with :func:`lightning_kd.models.save_model_file`."""
        if name not in self.names:
            raise KeyError(f"no network named {name!r}; networks: {self.names}")
        return self.networks[name]

    def forward(self, x: torch.Tensor, network: str | None = None) -> torch.Tensor:
        """Logits of ``network`` (default: :attr:`primary`).

        Without ``network`` and in training mode, every network runs (only the primary's logits are returned), so that
        a pass that recomputes BatchNorm statistics through the module's forward (``torch.optim.swa_utils.update_bn``,
        ``averaging=wakd``) updates the statistics of every network, not only the primary's. Training steps do not
        use ``forward``; in eval mode only the primary runs."""
        if network is None and self.training:
            outputs = {name: net(x) for name, net in self.networks.items()}
            return outputs[self.primary]
        return self.export(network or self.primary)(x)

    # -- before fitting ----------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Probe every network on a few training inputs (eval mode, no grad): the class counts must agree; terms
        build what they need from the probe (as with a frozen teacher, with network ``i`` as the student and its
        first peer as the teacher: a term that keeps ``SetupContext.teacher_model`` and runs it, such as
        ``cutmixpick``, runs that peer, which must then be done without gradient, as that term does); the ECE
        metrics are created if the class count was unknown."""
        if stage != "fit" or self._terms_ready:
            if self.calibration is None:
                raise ValueError(
                    "MutualDistillationModule: the number of classes is unknown (the networks have no num_classes "
                    "attribute); pass num_classes=N, or fit first"
                )
            return
        inputs = probe_inputs(self.trainer, self)
        with eval_mode(self), torch.no_grad():
            outputs = {name: ModelOutputs(as_logits(net(inputs))) for name, net in self.networks.items()}
        counts = {name: out.logits.shape[-1] for name, out in outputs.items()}
        if len(set(counts.values())) != 1:
            raise ClassCountMismatchError(
                f"the networks predict different numbers of classes {counts}; create them with the same num_classes"
            )
        n = next(iter(counts.values()))
        if self.num_classes is not None and self.num_classes != n:
            raise ClassCountMismatchError(f"num_classes={self.num_classes} but the networks predict {n} classes")
        if self.calibration is None:
            self._build_metrics(n)
        samples = num_samples_of(self.trainer)
        for name in self.names:
            peer = self._peers(name)[0]
            ctx = SetupContext(outputs[name], outputs[peer], self.networks[name], self.networks[peer], n, samples)
            for term in self.engines[name].terms.values():
                term.setup(ctx)
        self._terms_ready = True

    def on_train_start(self) -> None:
        self._max_steps = max_steps_of(self.trainer)

    def _peers(self, name: str) -> list[str]:
        return [n for n in self.names if n != name]

    # -- one step ----------------------------------------------------------------------------------------------------
    def network_losses(
        self, batch: Any, *, step: int | None = None, epoch: int | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Each network's loss :math:`L_i` (a graph reaching only network ``i``'s parameters) and the values to log.

        ``step``/``epoch`` default to the trainer's (0 outside a fit)."""
        inputs, targets, indices = unpack_batch(batch)
        labels, soft = split_targets(targets)
        step = self.global_step if step is None else step
        epoch = self.current_epoch if epoch is None else epoch
        logits = {name: as_logits(net(inputs)) for name, net in self.networks.items()}
        detached = {name: z.detach() for name, z in logits.items()}
        losses: dict[str, torch.Tensor] = {}
        logs: dict[str, torch.Tensor] = {}
        for name in self.names:
            z = logits[name]
            ce = self.task_loss(z, targets)
            check_finite_task_loss(ce, f"{name}/ce", step)
            distill, peer_logs = self._distill(name, z, detached, labels, soft, indices, inputs, step, epoch)
            losses[name] = self.task_weight * ce + self.distill_weights[name] * distill
            logs[f"train/{name}/ce"] = ce.detach()
            logs.update(peer_logs)
        return losses, logs

    def _distill(
        self,
        name: str,
        z: torch.Tensor,
        detached: Mapping[str, torch.Tensor],
        labels: torch.Tensor | None,
        soft: torch.Tensor | None,
        indices: torch.Tensor | None,
        inputs: torch.Tensor,
        step: int,
        epoch: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean over the peers of network ``name``'s weighted terms, with the peer's detached logits as teacher."""
        engine = self.engines[name]
        peers = self._peers(name)
        total = z.new_zeros((), dtype=torch.float32)
        sums: dict[str, torch.Tensor] = {}
        agree_key = f"train/{name}/agreement"
        logs: dict[str, torch.Tensor] = {}
        for peer in peers:
            batch = DistillBatch(
                ModelOutputs(z),
                ModelOutputs(detached[peer]),
                labels,
                indices,
                step,
                epoch,
                self._max_steps,
                inputs,
                soft,
            )
            value, peer_logs = engine(batch)
            total = total + value
            for key, v in peer_logs.items():
                sums[key] = sums.get(key, 0) + v
            if len(peers) > 1:
                logs[f"{agree_key}/{peer}"] = peer_logs[agree_key]
        logs.update({key: v / len(peers) for key, v in sums.items()})
        return total / len(peers), logs

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        losses, logs = self.network_losses(batch)
        loss = sum(losses.values())
        self.log_dict({**logs, "train/loss": loss.detach()})
        return loss  # type: ignore[return-value]

    # -- evaluation --------------------------------------------------------------------------------------------------
    def _evaluate_networks(self, batch: Any, stage: str) -> None:
        inputs, targets, _ = unpack_batch(batch)
        labels, _ = split_targets(targets)
        logits = {name: as_logits(net(inputs)) for name, net in self.networks.items()}
        assert self.calibration is not None
        for name, z in logits.items():
            self.log(f"{stage}/{name}/acc", (z.argmax(-1) == labels).float().mean(), sync_dist=True)
            ece = self.calibration[stage][name]
            ece.update(z.float().softmax(-1), labels)
            self.log(f"{stage}/{name}/ece", ece)
            for peer in self._peers(name):
                self.log(f"{stage}/{name}/agreement/{peer}", agreement(z, logits[peer]), sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate_networks(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate_networks(batch, "test")


# --------------------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------------------
def _check_networks(networks: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    if not isinstance(networks, Mapping) or len(networks) < 2:
        raise ValueError(
            "networks must be a mapping {name: nn.Module} of at least two networks (mutual distillation needs peers), "
            f"got {type(networks).__name__} of length {len(networks) if hasattr(networks, '__len__') else '?'}"
        )
    out: dict[str, nn.Module] = {}
    for name, net in networks.items():
        if not isinstance(name, str) or not name or "." in name or "/" in name:
            raise ValueError(f"network name {name!r} must be a non-empty string without '.' or '/'")
        if not isinstance(net, nn.Module):
            raise TypeError(f"network {name!r} is a {type(net).__name__}, not an nn.Module")
        if any(net is other for other in out.values()):
            raise ValueError(
                f"network {name!r} is the same object as another network; mutual distillation needs distinct "
                "networks (create a second one, or copy.deepcopy it and re-initialise)"
            )
        out[name] = net
    return out


def _check_weights(weights: Mapping[str, float] | None, names: list[str]) -> dict[str, float]:
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"distill_weights names {unknown} are not networks; networks: {names}")
    return {n: check_number("mutual", f"distill_weights[{n!r}]", weights.get(n, 1.0)) for n in names}


def _check_terms(name: str, engine: DistillEngine) -> None:
    for term_name, term in engine.terms.items():
        taps = term.taps()
        if any(taps.values()):
            raise ValueError(
                f"loss term {term_name!r} (network {name!r}) reads layer taps "
                f"({', '.join(str(t) for side in taps.values() for t in side)}); mutual distillation passes only the "
                "peers' logits. Use logit-level terms (kd, dkd, bdkd, ...)"
            )
        if term.needs_prepare:
            raise ValueError(
                f"loss term {term_name!r} (network {name!r}) needs a pass of a frozen teacher over the data before "
                "fitting; in mutual distillation every network trains, so it cannot be used"
            )


def _num_classes_attribute(networks: Mapping[str, nn.Module]) -> int | None:
    counts = {name: getattr(net, "num_classes", None) for name, net in networks.items()}
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts.values()):
        return None
    if len(set(counts.values())) != 1:
        raise ClassCountMismatchError(
            f"the networks predict different numbers of classes {counts}; create them with the same num_classes"
        )
    return next(iter(counts.values()))


# --------------------------------------------------------------------------------------------------------------------
# The Hydra app (strategy=mutual; conf/strategy/mutual.yaml, ctcd.yaml, bdkd.yaml)
# --------------------------------------------------------------------------------------------------------------------
def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def run_app(cfg: DictConfig, datamodule: Any, out_dir: Path) -> dict[str, Any]:
    """``strategy=mutual``: build the networks of ``cfg.strategy.peers``, train them together with
    :class:`MutualDistillationModule`, test each one (accuracy, ECE), save ``cfg.strategy.export`` to
    ``<out_dir>/<name>.pt`` and report it as ``student_acc``. ``teacher_acc`` is the accuracy of the largest other
    network (most parameters; the first on a tie).

    Optional callbacks: ``augment=`` (mixup; its logit standardisation reaches every network's terms) and
    ``averaging=`` (WAKD; it averages every network's weights and recomputes every network's BatchNorm statistics,
    see :meth:`MutualDistillationModule.forward`) are added; ``teacher_cache=`` is refused (there is no frozen
    teacher whose outputs could be stored). A term that runs its teacher model itself (``cutmixpick``) gets each
    network's first peer (see :meth:`MutualDistillationModule.setup`).
    """
    from hydra.utils import instantiate

    from lightning_kd.app import (
        build_model,
        check_single_fit,
        evaluate,
        fit_report,
        make_trainer,
        option_callbacks,
        scheduler_of,
        train_baseline,
    )
    from lightning_kd.models import save_model_file

    strategy = cfg.strategy
    check_single_fit(cfg, "mutual", "every network trains together in one fit")
    peers = strategy.get("peers") or {"student": cfg.model, "peer": cfg.model}
    names = [str(n) for n in peers]
    export = str(strategy.get("export") or names[0])
    if export not in names:
        raise ValueError(f"strategy.export={export} is not one of strategy.peers: {names}")
    loss_cfg = strategy.get("loss") or cfg.loss
    num_classes = int(datamodule.num_classes)

    L.seed_everything(cfg.seed, workers=True)  # one seed, built in turn: copies of one architecture differ in init
    networks = {name: build_model(peers[name], num_classes) for name in names}
    module = MutualDistillationModule(
        networks,
        loss=_plain(loss_cfg.terms),
        task_weight=loss_cfg.get("task_weight"),
        distill_weights=_plain(strategy.get("distill_weights")),
        peer_loss=_plain(strategy.get("peer_terms")),
        optimizer=instantiate(cfg.optimizer),
        scheduler=scheduler_of(cfg),
        label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
        primary=export,
    )
    trainer = make_trainer(cfg, out_dir, checkpoints=True, extra=tuple(option_callbacks(cfg)))
    trainer.fit(module, datamodule, ckpt_path=cfg.ckpt_path)
    scores = trainer.test(module, datamodule=datamodule, verbose=False)[0]

    others = [n for n in names if n != export]
    sizes = {n: sum(p.numel() for p in networks[n].parameters()) for n in others}
    teacher = max(others, key=lambda n: sizes[n])  # max keeps the first of equal sizes
    path = save_model_file(
        module.export(export),
        out_dir / f"{export}.pt",
        {"model": str(peers[export].name), "num_classes": num_classes, "strategy": "mutual", "network": export},
    )
    acc = {n: float(scores[f"test/{n}/acc"]) for n in names}
    ece = {n: float(scores[f"test/{n}/ece"]) for n in names}
    results: dict[str, Any] = {
        "teacher": f"{teacher} = {peers[teacher].name}",
        "teacher_source": "online peer trained together; the largest other network",
        "teacher_acc": acc[teacher],
        "student": f"{export} = {peers[export].name}",
        "loss": ",".join(module.engines[export].terms),
        "student_acc": acc[export],
        "student_val_acc": evaluate(module.export(export), datamodule, split="val")["acc"],
        "agreement": float(scores[f"test/{export}/agreement/{teacher}"]),
        "exported": str(path),
        **{f"acc/{n}": acc[n] for n in names},
        **{f"ece/{n}": ece[n] for n in names},
        "rows": [row for n in names for row in ([f"network {n}: accuracy", acc[n]], [f"network {n}: ECE", ece[n]])],
        **fit_report(trainer, out_dir),
    }
    if cfg.baseline:
        results["baseline_acc"] = train_baseline(cfg, datamodule, out_dir)
    return results
