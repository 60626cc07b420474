"""Explanation-enhanced KD (e²KD)
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Parchami-Araghi, Böhle, Rao, Schiele, "Good Teachers Explain: Explanation-Enhanced Knowledge Distillation",
ECCV 2024 (arXiv:2402.03119).

Hinton KD plus a term that makes the student *explain* its prediction like the teacher, for the class the teacher
predicts, :math:`\\hat c = \\arg\\max_k z^T_k`:

.. math::

    L = \\tau^2\\,\\mathrm{KL}\\big(\\sigma(z_T/\\tau)\\,\\|\\,\\sigma(z_S/\\tau)\\big)
        + \\lambda\\,\\frac{1}{B}\\sum_b \\Big(1 - \\cos\\big(E_T(x_b, \\hat c_b),\\, E_S(x_b, \\hat c_b)\\big)\\Big)

with :math:`E` the explanation, here Grad-CAM (the paper's choice for standard CNNs) on the last convolutional map
:math:`A`:

.. math::

    \\alpha_k = \\frac{1}{HW}\\sum_{h,w} \\frac{\\partial z_{\\hat c}}{\\partial A_{k,h,w}}, \\qquad
    E = \\mathrm{ReLU}\\Big(\\sum_k \\alpha_k A_k\\Big) \\in \\mathbb{R}^{H\\times W}

and :math:`\\cos` the cosine similarity of the flattened maps of one sample. For a global-average-pooling + linear
head, :math:`\\alpha_k = W_{\\hat c,k}/HW` and :math:`E = \\mathrm{ReLU}(\\mathrm{CAM}_{\\hat c})/HW`.

How the gradients flow. The student's Grad-CAM is computed with ``torch.autograd.grad(z_S[b, ĉ_b].sum(), A_S,
create_graph=True)`` on the student's real logits, so the explanation loss trains the student through both
:math:`A_S` and, second-order, through :math:`\\alpha` (e.g. the classifier's weights). The teacher ran without
gradients, so its class scores are recomputed from its (detached) tapped map through its head, with gradients
enabled only for that map: timm's ``forward_head`` (borrowed in :meth:`E2KDLoss.setup`, which checks that
``forward_head(tap)`` reproduces the teacher's logits) or the module named by ``teacher_head``. The teacher's
parameters never receive gradients. When the maps differ in size the student's Grad-CAM is resized (bilinear) to the
teacher's; with ``map_size`` both are resized to ``map_size``² (the authors resize both to the input image size).

Sources (checked against the authors' code, m-parchami/GoodTeachersExplain, commit a1b7bb5):

- ``bcos/distillation_methods/TeachersExplain.py``: ``explanation_aware_forward`` (``ExpMethod.GRAD_CAM_POS``):
  ``exp_classes`` = the teacher's top-1 (``select_classes_and_teachers``, ``exp_of='top1'``); the student's
  ``logits_to_explain.sum().backward(inputs=[features], create_graph=True)``, ``grad_cam = relu((features.grad.mean(
  (2, 3), keepdim=True) * features).sum(1, keepdim=True))`` resized with ``torchvision`` ``resize`` to the image
  size; the same for the teacher with ``create_graph=False`` and the result detached (the gradient of its score
  w.r.t. its last map involves only its head, which is what this term re-runs). The explained map is the output of
  the last residual stage (``bcos/models/standard_nets.py``: ``features = self.layer4(x)``, then average pooling
  and ``fc``). ``TeachersExplainCriterion._explanation_loss``: ``1 - F.cosine_similarity`` of the
  flattened maps per sample, averaged over the batch; the logit loss is ``KLDivLoss(reduction='none')`` of
  ``log_softmax(z_S/T)`` against ``softmax(z_T/T)``, ``.sum(-1).mean(0) · T²``
  (:func:`~lightning_kd.losses.kd.kd_loss`).
- ``bcos/experiments/ImageNet/final_live/experiment_parameters.py``: ``DEFAULT_TE_CRITERION`` has
  ``explanation_loss_coef`` (λ) 1.0, ``teacher_logit_temperature`` (τ) 1.0, ``teacher_logit_loss_coef`` 1.0; the
  Grad-CAM (standard ResNet) grids sweep λ ∈ {0, 1, 5, 10}, τ ∈ {1, 5}, logit coefficient ∈ {0.5, 1} and always
  set ``gt_logit_loss_coef`` to 0 (no cross-entropy, hence ``task_weight: 0`` in ``conf/loss/e2kd.yaml``). Our
  defaults are ``DEFAULT_TE_CRITERION``'s; the values the paper reports per experiment are in its supplement
  (Sec. C), which we could not consult: treat λ and τ as hyperparameters to tune.

Deviations: by default the maps are compared at the teacher map's resolution instead of being upsampled to the image
size (the term does not see the images; set ``map_size`` to the image side to follow the authors: bilinear
upsampling, as ``torchvision`` ``resize`` does). The paper also uses B-cos explanations for B-cos networks; only
Grad-CAM is implemented here.

Default taps: ``stage:-1`` on both sides (timm's last ``feature_info`` stage; for ResNets ``layer4``, the input of
``forward_head``). At 32×32 input a timm ResNet's ``layer4`` is 1×1: a one-pixel Grad-CAM carries no spatial
information and the explanation part is constant (0, or 1 when a map is zero); a warning says so. Use larger inputs
(e.g. ≥ 64×64 for ResNets).

DDP: the explanation is per sample and the loss a mean over the local batch (no batch statistics), per rank. The
double backward through ``autograd.grad(create_graph=True)`` works with DDP's gradient hooks but has not been run
under DDP in this package's tests.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.losses.base import (
    DistillBatch,
    LossTerm,
    SetupContext,
    check_number,
    check_temperature,
    register_loss,
)
from lightning_kd.losses.kd import kd_loss
from lightning_kd.taps import INTERNAL_PREFIX, TapError, TapSpec, get_module


def grad_cam(features: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM ``ReLU(Σ_k α_k A_k)``, ``α_k`` = spatial mean of ``∂score/∂A_k``, for a map ``A`` [B, C, H, W] and
    the gradient of the explained score w.r.t. it (same shape). Returns [B, H, W] in float32 (differentiable in
    both arguments)."""
    if features.dim() != 4 or grads.shape != features.shape:
        raise ValueError(
            f"grad_cam: expects a map [B, C, H, W] and a gradient of the same shape, got {tuple(features.shape)} "
            f"and {tuple(grads.shape)}"
        )
    alpha = grads.float().mean(dim=(2, 3), keepdim=True)
    return F.relu((alpha * features.float()).sum(dim=1))


def explanation_loss(cam_s: torch.Tensor, cam_t: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Batch mean of ``1 − cos(E_T, E_S)`` over the flattened maps [B, H, W] (``F.cosine_similarity``, eps 1e-8).

    With ``size`` both maps are resized (bilinear) to ``size × size`` first; otherwise the student's map is resized
    to the teacher's size when they differ. Float32.
    """
    if cam_s.dim() != 3 or cam_t.dim() != 3 or cam_s.shape[0] != cam_t.shape[0]:
        raise ValueError(
            f"explanation_loss: expects maps [B, H, W] with the same batch size, got {tuple(cam_s.shape)} and "
            f"{tuple(cam_t.shape)}"
        )
    s, t = cam_s.float(), cam_t.float()
    target = (size, size) if size is not None else tuple(t.shape[1:])
    s, t = _resize(s, target), _resize(t, target)
    return (1 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1)).mean()


def _resize(cam: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    if tuple(cam.shape[1:]) == tuple(size):
        return cam
    return F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False, antialias=True)[:, 0]


def _param_dtype(head: Callable[..., torch.Tensor]) -> torch.dtype | None:
    owner = getattr(head, "__self__", head)
    if isinstance(owner, nn.Module):
        param = next(owner.parameters(), None)
        if param is not None:
            return param.dtype
    return None


def teacher_grad_cam(head: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor, classes: torch.Tensor):
    """Grad-CAM of a frozen model for ``classes`` [B], recomputing its scores ``head(features)`` with gradients
    enabled for the (detached) map only. Returns ``(cam [B, H, W] float32 detached, logits)``."""
    dtype = _param_dtype(head) or features.dtype
    with torch.enable_grad():
        a = features.detach().to(dtype).requires_grad_(True)
        logits = head(a)
        (grads,) = torch.autograd.grad(logits[torch.arange(len(classes), device=a.device), classes].sum(), a)
    return grad_cam(a.detach(), grads).detach(), logits.detach()


def _find_forward_head(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    for name, module in [("", model), *model.named_modules()]:
        if name.startswith(INTERNAL_PREFIX):
            continue
        head = getattr(module, "forward_head", None)
        if callable(head):
            return head
    return None


@register_loss("e2kd")
class E2KDLoss(LossTerm):
    """Explanation-enhanced KD: Hinton KD + λ·(1 − cos) between the teacher's and the student's Grad-CAM maps for
    the teacher's top-1 class.

    Args:
        weight: weight of the whole term (KD part + explanation part).
        temperature: τ of the KD part (the authors' default 1; their grids also use 5).
        explanation_weight: λ, weight of the explanation part (the authors' default 1; grids 1, 5, 10).
        kd_weight: weight of the KD part (the authors' ``teacher_logit_loss_coef``: 1, grids 0.5 and 1; 0 drops it).
        student_layer: the student's last convolutional map (Grad-CAM layer); it must feed the student's logits.
        teacher_layer: the teacher's, which must be the input of its head (timm ResNets: ``stage:-1``).
        teacher_head: module path of the teacher's module that maps ``teacher_layer`` to logits (``None``: timm's
            ``forward_head``).
        map_size: compare the maps after resizing both to ``map_size × map_size`` (the authors use the input image
            size); ``None``: at the teacher map's size.

    ``forward`` returns ``{"kd": kd_weight · τ²·KL, "explanation": λ · mean(1 − cos)}`` (logged as ``train/e2kd/kd``,
    ``train/e2kd/explanation``), whose sum is the loss.
    """

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 1.0,
        explanation_weight: float = 1.0,
        kd_weight: float = 1.0,
        student_layer: str = "stage:-1",
        teacher_layer: str = "stage:-1",
        teacher_head: str | None = None,
        map_size: int | None = None,
    ) -> None:
        super().__init__(weight)
        self.temperature = check_temperature("e2kd", temperature)
        for name, value in [("explanation_weight", explanation_weight), ("kd_weight", kd_weight)]:
            check_number("e2kd", name, value)
        self.explanation_weight = float(explanation_weight)
        self.kd_weight = float(kd_weight)
        self.student_tap = TapSpec.parse(student_layer)
        self.teacher_tap = TapSpec.parse(teacher_layer)
        self.student_taps = [self.student_tap]
        self.teacher_taps = [self.teacher_tap]
        self.teacher_head_path = teacher_head
        if map_size is not None and (isinstance(map_size, bool) or not isinstance(map_size, int) or map_size < 1):
            raise ValueError(
                f"e2kd: map_size must be null (the teacher map's size) or an integer >= 1, got {map_size!r}"
            )
        self.map_size = map_size
        self.is_setup = False

    def setup(self, ctx: SetupContext) -> None:
        s, t = ctx.student[self.student_tap], ctx.teacher[self.teacher_tap]
        for side, tap, feat in [("student", self.student_tap, s), ("teacher", self.teacher_tap, t)]:
            if feat.dim() != 4:
                raise ValueError(
                    f"e2kd: the {side} tap '{tap}' gives {tuple(feat.shape)}, but Grad-CAM needs a convolutional map "
                    f"[B, C, H, W]: tap the last convolutional stage (e.g. {side}_layer: stage:-1)"
                )
        head = self._teacher_head(ctx)
        with torch.no_grad():
            try:
                rebuilt = head(t.to(_param_dtype(head) or t.dtype))
            except Exception as err:  # reported with the taps and the fix
                raise ValueError(
                    f"e2kd: the teacher's head fails on the tapped map '{self.teacher_tap}' {tuple(t.shape)} "
                    f"({type(err).__name__}: {err}); teacher_layer must be the input of the head (for timm models the "
                    "output of forward_features; for ResNets stage:-1 = layer4)"
                ) from err
        logits = ctx.teacher.logits.float()
        if not isinstance(rebuilt, torch.Tensor) or rebuilt.shape != logits.shape:
            got = tuple(rebuilt.shape) if isinstance(rebuilt, torch.Tensor) else type(rebuilt).__name__
            raise ValueError(
                f"e2kd: the teacher's head maps the tapped map '{self.teacher_tap}' to {got}, not to logits "
                f"{tuple(logits.shape)}; teacher_layer must be the input of the head (timm ResNets: stage:-1)"
            )
        if not torch.allclose(rebuilt.float(), logits, atol=1e-3, rtol=1e-3):
            raise ValueError(
                f"e2kd: the teacher's head applied to the tapped map '{self.teacher_tap}' does not reproduce the "
                f"teacher's logits (max difference {(rebuilt.float() - logits).abs().max():.3g}); teacher_layer must "
                "be the input of the head (for timm models the output of forward_features; for ResNets stage:-1 = "
                "layer4), or name the module that maps it to logits with teacher_head"
            )
        self.borrow("teacher_head", head)
        self.is_setup = True
        flat = [
            f"{side} '{tap}'"
            for side, tap, f in [("student", self.student_tap, s), ("teacher", self.teacher_tap, t)]
            if math.prod(f.shape[2:]) == 1
        ]
        if flat:
            maps = f"{' and '.join(flat)} {'maps are' if len(flat) > 1 else 'map is'}"
            warnings.warn(
                f"e2kd: the {maps} 1×1, so the Grad-CAM is a single number and the explanation part carries no "
                "spatial information (it is constant). Use larger inputs (e.g. >= 64×64 for ResNets)",
                stacklevel=2,
            )

    def _teacher_head(self, ctx: SetupContext) -> Callable[[torch.Tensor], torch.Tensor]:
        model = ctx.teacher_model
        if self.teacher_head_path is not None:
            try:
                return get_module(model, self.teacher_head_path)
            except TapError as err:
                raise ValueError(f"e2kd: teacher_head: {err}") from None
        head = _find_forward_head(model)
        if head is None:
            raise ValueError(
                f"e2kd: the teacher {type(model).__name__} has no timm forward_head(), which e2kd needs to recompute "
                f"its class scores from the tapped map '{self.teacher_tap}' with gradients. Use a timm teacher, or "
                "set teacher_head='<module path>' to the module that maps that map to logits"
            )
        return head

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        if not self.is_setup:
            raise RuntimeError("e2kd: setup() was not called, so the teacher's head is not known yet")
        s_map, t_map = batch.student[self.student_tap], batch.teacher[self.teacher_tap]
        s_logits, t_logits = batch.student.logits, batch.teacher.logits
        classes = t_logits.detach().argmax(dim=-1)
        rows = torch.arange(len(classes), device=classes.device)
        if not (torch.is_grad_enabled() and s_map.requires_grad and s_logits.requires_grad):
            raise RuntimeError(
                f"e2kd: the student's map '{self.student_tap}' and logits carry no autograd graph (gradients are "
                "disabled or the student is frozen); the student's Grad-CAM needs d logits / d map, so e2kd runs in "
                "training steps only"
            )
        (s_grads,) = torch.autograd.grad(s_logits[rows, classes].sum(), s_map, create_graph=True, allow_unused=True)
        if s_grads is None:
            raise ValueError(
                f"e2kd: the student's logits do not depend on its tapped map '{self.student_tap}'; student_layer "
                "must be a map that feeds the logits (the last convolutional stage, stage:-1)"
            )
        cam_s = grad_cam(s_map, s_grads)
        cam_t, _ = teacher_grad_cam(self.teacher_head, t_map, classes)
        return {
            "kd": self.kd_weight * kd_loss(s_logits, t_logits, self.temperature),
            "explanation": self.explanation_weight * explanation_loss(cam_s, cam_t, self.map_size),
        }

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, temperature={self.temperature}, explanation_weight={self.explanation_weight}, "
            f"kd_weight={self.kd_weight}, student={self.student_tap}, teacher={self.teacher_tap}, "
            f"map_size={self.map_size}"
        )
