"""HARD: learned adversarial augmentation (spatial-transformer variant)
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Nix, Burg, Sinz, "HARD: Hard Augmentations for Robust Distillation", arXiv:2305.14890 (2023). An augmentation
model :math:`g_\\phi` is trained, alternating with the student, to produce inputs on which **teacher and student
disagree**, while staying inputs the teacher still reads as it reads the clean image; the student is then distilled on
clean plus augmented inputs. This module implements the spatial-transformer augmentor (bounded per-sample affine
warps, ``affine_grid`` + ``grid_sample``); the paper's VAE-latent augmentor is not implemented.

Augmentor objective (minimised by the augmentor's own optimizer; teacher and student fixed):

.. math::

    \\mathcal L_\\phi = -\\,\\mathrm{KL}_\\tau\\big(p_T(g_\\phi(x)) \\,\\|\\, p_S(g_\\phi(x))\\big)
        + \\lambda\\,\\mathrm{KL}_\\tau\\big(p_T(x) \\,\\|\\, p_T(g_\\phi(x))\\big),
    \\qquad \\mathrm{KL}_\\tau(p\\|q) = \\tau^2\\,\\mathrm{KL}(\\mathrm{softmax}(z_p/\\tau) \\| \\mathrm{softmax}(z_q/\\tau)),

both terms :func:`~lightning_kd.losses.kd.kd_loss` (batch mean, float32). The first term rewards disagreement; the
second (``teacher_weight`` λ) keeps the augmented image meaningful to the teacher, so the augmentor cannot win by
destroying the image. Gradients reach :math:`\\phi` through both models' forward passes (``torch.autograd.grad`` with
respect to :math:`\\phi` only, so no ``.grad`` of the teacher or the student is touched); teacher and student run in
eval mode for this step (no BatchNorm statistics updated, no dropout).

Spatial transformer: a small localisation net (conv → ReLU → global average pool, concatenated with a noise vector
:math:`z \\sim \\mathcal N(0, I)` so that the same image gets different warps) → linear → 4 raw values
:math:`u = (u_r, u_s, u_x, u_y)`, squashed into bounds:

.. math::

    r = r_{max}\\tanh u_r, \\quad s = s_{max}^{\\tanh u_s}, \\quad t_{x,y} = 2\\,t_{max}\\tanh u_{x,y}, \\qquad
    \\theta = \\begin{pmatrix} s\\cos r & -s\\sin r & t_x \\\\ s\\sin r & s\\cos r & t_y \\end{pmatrix}

(``max_rotation`` :math:`r_{max}` in degrees, ``max_scale`` :math:`s_{max} \\ge 1` so :math:`s \\in [1/s_{max},
s_{max}]`, ``max_translation`` :math:`t_{max}` as a fraction of the image side — ``affine_grid``'s coordinates span
[-1, 1], hence the 2). The last linear layer starts at zero, so the augmentor starts as the identity warp. Sampling
is bicubic (zero padding): the identity warp samples exactly at pixel centres, where bilinear interpolation has a
kink and its one-sided gradient pointed the wrong way in our tests (the first augmentor step *lowered* the
disagreement); bicubic interpolation is smooth there. Bicubic values may slightly overshoot the input range.

**Unconfirmed.** The objective above is methods.md §11.1's reconstruction ([recalled, uncertain]); no public code of
the paper was found with the search tools (searched sinzlab repositories and the paper title), so the exact
divergence, the weighting λ, the localisation architecture, the noise input, the eval-mode choice and the
clean/augmented mix are this package's design, not checked against the authors.

The batch the training step sees is the clean batch followed by augmented copies of its first
``ceil(augmented_fraction · B)`` samples (labels, soft labels and dataset indices repeated), so the DistillCallback's
teacher and the student both see the augmented inputs. A teacher-output cache is refused (it would serve the clean
image's outputs). Under DDP the augmentor's gradients are averaged over ranks so that every rank keeps the same
augmentor.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_kd.engine import DistillEngine, as_logits, eval_mode
from lightning_kd.losses.kd import kd_loss
from lightning_kd.module import DistillationModule
from lightning_kd.strategies.augment import _INPUT_KEYS
from lightning_kd.strategies.teacher_cache import find_engine


class AffineAugmentor(nn.Module):
    """Spatial-transformer augmentor: per-sample bounded affine warp (rotation, isotropic scale, translation).

    Args:
        in_channels: image channels.
        hidden: channels of the localisation conv.
        noise_dim: size of the noise vector fed next to the pooled features (0: deterministic warp per image).
        max_rotation: largest rotation, degrees (≥ 0).
        max_scale: largest zoom factor (≥ 1); the scale lies in ``[1/max_scale, max_scale]``.
        max_translation: largest shift per axis, as a fraction of the image side (≥ 0).
    """

    def __init__(
        self,
        in_channels: int = 3,
        hidden: int = 16,
        noise_dim: int = 8,
        max_rotation: float = 30.0,
        max_scale: float = 1.25,
        max_translation: float = 0.25,
    ) -> None:
        super().__init__()
        for name, value, low in (("max_rotation", max_rotation, 0.0), ("max_scale", max_scale, 1.0)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low):
                raise ValueError(f"HARD augmentor: {name} must be a finite number >= {low}, got {value}")
        if not (isinstance(max_translation, (int, float)) and 0.0 <= max_translation <= 1.0):
            raise ValueError(
                f"HARD augmentor: max_translation is a fraction of the image side in [0, 1], got {max_translation}"
            )
        for name, value in (("in_channels", in_channels), ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"HARD augmentor: {name} must be a positive integer, got {value}")
        if not isinstance(noise_dim, int) or noise_dim < 0:
            raise ValueError(f"HARD augmentor: noise_dim must be an integer >= 0, got {noise_dim}")
        self.in_channels = in_channels
        self.noise_dim = noise_dim
        self.max_rotation = math.radians(float(max_rotation))
        self.log_max_scale = math.log(float(max_scale))
        self.max_translation = float(max_translation)
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.head = nn.Linear(hidden + noise_dim, 4)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def theta(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Affine matrices ``[B, 2, 3]`` (``affine_grid`` convention) for the images ``x`` ``[B, C, H, W]``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"HARD augmentor expects images [B, {self.in_channels}, H, W], got shape {tuple(x.shape)}; set "
                "in_channels= to your images' channel count"
            )
        feats = F.relu(self.conv(x)).mean(dim=(2, 3))
        if self.noise_dim:
            if noise is None:
                noise = torch.randn(x.shape[0], self.noise_dim, device=x.device, dtype=feats.dtype)
            feats = torch.cat([feats, noise], dim=1)
        u = torch.tanh(self.head(feats))
        rot = self.max_rotation * u[:, 0]
        scale = torch.exp(self.log_max_scale * u[:, 1])
        shift = 2.0 * self.max_translation * u[:, 2:]
        cos, sin = torch.cos(rot) * scale, torch.sin(rot) * scale
        row0 = torch.stack([cos, -sin, shift[:, 0]], dim=1)
        row1 = torch.stack([sin, cos, shift[:, 1]], dim=1)
        return torch.stack([row0, row1], dim=1)

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        theta = self.theta(x, noise)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bicubic", padding_mode="zeros", align_corners=False)


def hard_objective(
    teacher_aug: torch.Tensor,
    student_aug: torch.Tensor,
    teacher_clean: torch.Tensor,
    *,
    temperature: float,
    teacher_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The augmentor's loss ``−KL_τ(p_T(g(x)) ‖ p_S(g(x))) + λ·KL_τ(p_T(x) ‖ p_T(g(x)))`` from logits.

    Returns ``(loss, disagreement, teacher_shift)``; ``teacher_clean`` is treated as a constant.
    """
    disagreement = kd_loss(student_aug, teacher_aug, temperature)
    teacher_shift = kd_loss(teacher_aug, teacher_clean.detach(), temperature)
    return -disagreement + teacher_weight * teacher_shift, disagreement, teacher_shift


class HARDAugment(Callback):
    """HARD as a Lightning callback: before each training step, one or more augmentor steps on the batch (teacher and
    student fixed), then the batch is extended in place with augmented copies.

    Args:
        augmentor: the augmentation model (default :class:`AffineAugmentor` with the bounds below).
        lr: learning rate of the augmentor's Adam optimizer.
        steps: augmentor steps per training batch (≥ 1).
        teacher_weight: λ, weight of the teacher-consistency term (≥ 0).
        temperature: τ of both KL terms.
        augmented_fraction: fraction of each batch that gets an augmented copy appended, in (0, 1].
        in_channels, max_rotation, max_scale, max_translation, noise_dim: :class:`AffineAugmentor` options (used only
            when ``augmentor`` is not given).

    Requires exactly one distillation engine (one DistillCallback, or a DistillationModule) and image batches
    ``[B, C, H, W]`` in a list ``[input, target, ...]`` or a dict. The augmentor and its optimizer state are saved in
    the callback's checkpoint state (tensors and plain containers only); the LightningModule's optimizer is untouched.
    Logs ``train/hard/disagreement``, ``train/hard/teacher_shift`` (before the augmentor step) per batch.
    """

    def __init__(
        self,
        augmentor: nn.Module | None = None,
        lr: float = 1e-3,
        steps: int = 1,
        teacher_weight: float = 1.0,
        temperature: float = 1.0,
        augmented_fraction: float = 1.0,
        in_channels: int = 3,
        max_rotation: float = 30.0,
        max_scale: float = 1.25,
        max_translation: float = 0.25,
        noise_dim: int = 8,
    ) -> None:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"HARDAugment: lr must be a finite number > 0, got {lr}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"HARDAugment: steps (augmentor steps per batch) must be an integer >= 1, got {steps}")
        if not (isinstance(teacher_weight, (int, float)) and math.isfinite(teacher_weight) and teacher_weight >= 0):
            raise ValueError(f"HARDAugment: teacher_weight must be a finite number >= 0, got {teacher_weight}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"HARDAugment: temperature must be a finite number > 0, got {temperature}")
        if not (isinstance(augmented_fraction, (int, float)) and 0.0 < augmented_fraction <= 1.0):
            raise ValueError(
                f"HARDAugment: augmented_fraction must be in (0, 1] (the share of the batch that gets an augmented "
                f"copy), got {augmented_fraction}"
            )
        self.augmentor = augmentor or AffineAugmentor(
            in_channels, noise_dim=noise_dim, max_rotation=max_rotation, max_scale=max_scale,
            max_translation=max_translation,
        )  # fmt: skip
        self.lr = float(lr)
        self.steps = steps
        self.teacher_weight = float(teacher_weight)
        self.temperature = float(temperature)
        self.augmented_fraction = float(augmented_fraction)
        self.optimizer = torch.optim.Adam(self.augmentor.parameters(), lr=self.lr)
        self._engine: DistillEngine | None = None
        self._trainer: L.Trainer | None = None
        #: the last augmented inputs appended to the batch (detached, for inspection/visualisation)
        self.last_augmented: torch.Tensor | None = None

    # -- checkpoint state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"augmentor": self.augmentor.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.augmentor.load_state_dict(state_dict["augmentor"])
        self.optimizer.load_state_dict(state_dict["optimizer"])

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.augmentor.to(pl_module.device)
        self._engine = None

    def _find_engine(self, trainer: L.Trainer, pl_module: L.LightningModule) -> DistillEngine:
        if self._engine is None:
            try:
                engine = find_engine(trainer, pl_module)
            except RuntimeError as err:
                raise RuntimeError(f"HARDAugment needs the teacher of exactly one distillation engine: {err}") from err
            if engine.output_cache is not None:
                raise RuntimeError(
                    "HARDAugment cannot be combined with a teacher-output cache: the cache returns the teacher's "
                    "outputs for each sample index, but HARD shows the teacher new augmented images at every step. "
                    "Remove teacher_cache= (or augment=hard)."
                )
            self._engine = engine
        return self._engine

    @staticmethod
    def _student(pl_module: L.LightningModule) -> nn.Module:
        """The network whose logits are the student's: a DistillationModule's ``model`` (its own head), else the
        LightningModule itself (callback face: ``pl_module(x)`` must return the logits)."""
        return pl_module.model if isinstance(pl_module, DistillationModule) else pl_module

    def augmentor_step(self, inputs: torch.Tensor, teacher: nn.Module, student: nn.Module) -> dict[str, torch.Tensor]:
        """``steps`` optimizer steps of the augmentor on ``inputs`` (teacher and student in eval mode, their
        parameters untouched). Returns the objective's parts measured before the first step."""
        params = [p for p in self.augmentor.parameters() if p.requires_grad]
        x = inputs.detach()
        with torch.no_grad(), eval_mode(teacher):
            teacher_clean = as_logits(teacher(x)).detach()
        first: dict[str, torch.Tensor] = {}
        with eval_mode(teacher), eval_mode(student):
            for _ in range(self.steps):
                aug = self.augmentor(x.float()).to(x.dtype)
                loss, disagreement, shift = hard_objective(
                    as_logits(teacher(aug)),
                    as_logits(student(aug)),
                    teacher_clean,
                    temperature=self.temperature,
                    teacher_weight=self.teacher_weight,
                )
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"HARDAugment: the augmentor objective is {loss.item()}; lower lr= or check the inputs"
                    )
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                self.optimizer.zero_grad(set_to_none=True)
                for p, g in zip(params, grads):
                    p.grad = None if g is None else self._reduce(g)
                self.optimizer.step()
                if not first:
                    first = {
                        "objective": loss.detach(),
                        "disagreement": disagreement.detach(),
                        "teacher_shift": shift.detach(),
                    }
        return first

    def _reduce(self, grad: torch.Tensor) -> torch.Tensor:
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            return trainer.strategy.reduce(grad, reduce_op="mean")
        return grad

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        engine = self._find_engine(trainer, pl_module)
        self._trainer = trainer
        key = _input_key(batch)
        inputs = batch[key]
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
            raise ValueError(
                f"HARDAugment warps images: the batch's inputs must be a [B, C, H, W] tensor, got "
                f"{tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__}"
            )
        with torch.enable_grad():
            parts = self.augmentor_step(inputs, engine.teacher, self._student(pl_module))
        b = inputs.shape[0]
        k = max(1, math.ceil(self.augmented_fraction * b - 1e-9))
        with torch.no_grad():
            augmented = self.augmentor(inputs[:k].float()).to(inputs.dtype)
        self.last_augmented = augmented
        _extend(batch, key, augmented, b, k)
        pl_module.log_dict({f"train/hard/{name}": value for name, value in parts.items() if name != "objective"})


def _input_key(batch: Any) -> Any:
    if isinstance(batch, list) and batch and isinstance(batch[0], torch.Tensor):
        return 0
    if isinstance(batch, dict):
        key = next((k for k in _INPUT_KEYS if k in batch), None)
        if key is None:
            raise KeyError(
                f"HARDAugment cannot find the inputs in a batch with keys {list(batch)}; expected one of {_INPUT_KEYS}"
            )
        return key
    raise TypeError(
        f"HARDAugment extends the batch in place, so it must be a list [input, target, ...] or a dict; got "
        f"{type(batch).__name__}. Return a list from your collate_fn (torch's default collate already does)."
    )


def _extend(batch: Any, key: Any, augmented: torch.Tensor, b: int, k: int) -> None:
    """Append ``augmented`` to the inputs and the first ``k`` rows of every other per-sample tensor to itself."""
    keys = range(len(batch)) if isinstance(batch, list) else list(batch)
    for other in keys:
        value = batch[other]
        if other == key:
            batch[other] = torch.cat([value, augmented], dim=0)
        elif isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == b:
            batch[other] = torch.cat([value, value[:k]], dim=0)


__all__ = ["AffineAugmentor", "HARDAugment", "hard_objective"]
