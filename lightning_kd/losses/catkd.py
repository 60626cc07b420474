"""Class attention transfer (CAT-KD)
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Guo, Yan, Li, Lin, "Class Attention Transfer Based Knowledge Distillation", CVPR 2023 (arXiv:2304.12777).

The class activation maps (CAMs) of a network whose head is global average pooling + a linear classifier
:math:`W \\in \\mathbb{R}^{K\\times C}` are its last convolutional map :math:`A \\in \\mathbb{R}^{B\\times C\\times H
\\times W}` pushed through the classifier as a 1×1 convolution:

.. math::

    \\mathrm{CAM}_{b,k,h,w} = \\sum_c W_{k,c}\\, A_{b,c,h,w}, \\qquad
    \\frac{1}{HW}\\sum_{h,w} \\mathrm{CAM}_{b,k,h,w} + b_k = z_{b,k}

(averaged over space they give back the logits). CAT transfers them:

.. math::

    L_{CAT} = \\mathrm{MSE}\\big(\\phi(\\mathrm{pool}_r(\\mathrm{CAM}^S)),\\;
              \\phi(\\mathrm{pool}_r(\\mathrm{CAM}^T))\\big)

with :math:`\\mathrm{pool}_r` an adaptive average pooling to :math:`r\\times r` and :math:`\\phi` either the identity
or an L2 normalisation of each class map over its :math:`r^2` positions; the mean runs over batch, classes and
positions. CAT-KD is ``task_weight · CE + β · L_CAT``. The student's CAMs use the student's own classifier *with*
gradient (the classifier is trained through this term as well as through the CE); the teacher's use its frozen
classifier. Student and teacher maps may differ in width and resolution (no connector: each model has its own
classifier, and both CAMs are pooled to :math:`r\\times r`).

Options from the paper's analysis: binarising the teacher's CAMs (1 where a CAM exceeds its spatial average
activation, 0 elsewhere) and transferring only the CAMs of the ``num_cams`` classes the teacher scores highest
(``cam_selection: top``) or lowest (``bottom``).

Sources (checked against the authors' code, GzyAftermath/CAT-KD, commit 4467073):

- ``mdistiller/distillers/CAT_KD.py``: ``CAT_loss`` = ``adaptive_avg_pool2d`` of both CAMs to
  ``CAM_RESOLUTION``², optional ``F.normalize(feat, dim=(2, 3))``, ``F.mse_loss``, times ``CAT_loss_weight``;
  binarisation ``tea - ||tea||_1 / (h·w)`` → ReLU → bool on the full-resolution teacher CAMs before pooling
  (the threshold is the spatial mean of ``|CAM|``; we do the same); the CE term is added unless ``onlyCAT``.
- ``mdistiller/models/cifar/resnet.py`` (``ResNet_test``) and ``tools/train.py``: the CAMs come from a 1×1
  convolution ``conv_test`` **without bias** that replaces the classifier (the teacher's ``fc.weight`` is copied in,
  its bias dropped), applied to the last stage's output. Here the CAMs are likewise :math:`W A` without the bias;
  the student keeps its timm classifier (with bias) for its logits.
- defaults from ``configs/cifar100/CAT_KD/res32x4_res8x4.yaml`` (the CIFAR-100 ResNet32×4 → ResNet8×4 pair):
  β = ``CAT_loss_weight`` 15, ``CAM_RESOLUTION`` 2, ``IF_NORMALIZE`` False, ``CE_WEIGHT`` 1. The authors tune β per
  pair (CIFAR-100: 0.7 for ResNet56 → ResNet20 up to 600 for ResNet32×4 → ShuffleNetV1, with normalisation on for
  the heterogeneous pairs; ImageNet ResNet34 → ResNet18: β 0.5, resolution 4) and their README advises keeping the
  CAT loss "within 1–50 after the first epoch": retune ``weight`` for your models.

Deviation: class selection. The authors' code keeps the classes whose teacher logit is *strictly* greater than the
``CAMs_Nums``-th largest (``CAMs_Nums − 1`` classes), and for the lowest-scored classes hard-codes 100 classes and
keeps ``CAMs_Nums + 1`` of them, falling back to all classes on ties. We keep exactly ``num_cams`` classes
(``torch.topk`` on the teacher logits; the test suite shows the difference).

Default taps: ``stage:-1`` (timm's last ``feature_info`` stage; for ResNets ``layer4``, the map the head pools). At
32×32 input a timm ResNet's ``layer4`` is 1×1: its CAMs are then the bias-free logits and CAT degenerates to an MSE
on them (a warning says so); use larger inputs, e.g. ≥ 64×64, to transfer spatial maps.

DDP: the loss is an element-wise mean over the local batch (no batch statistics), computed per rank.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.losses.base import DistillBatch, LossTerm, SetupContext, register_loss
from lightning_kd.taps import TapError, TapSpec, find_classifier, get_module

CAM_SELECTIONS = ("top", "bottom")


def class_activation_maps(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """CAMs ``CAM[b, k] = Σ_c W[k, c] · A[b, c]`` of a map ``A`` [B, C, H, W] under a classifier weight ``W``
    [K, C] (a 1×1 convolution without bias), as [B, K, H, W] in float32 (autocast off)."""
    if features.dim() != 4 or weight.dim() != 2 or features.shape[1] != weight.shape[1]:
        raise ValueError(
            f"class_activation_maps: expects a map [B, C, H, W] and a weight [K, C] with the same C, got "
            f"{tuple(features.shape)} and {tuple(weight.shape)}"
        )
    with torch.autocast(device_type=features.device.type, enabled=False):
        return torch.einsum("kc,bchw->bkhw", weight.float(), features.float())


def binarize_cams(cams: torch.Tensor) -> torch.Tensor:
    """1 where a CAM exceeds its spatial mean absolute activation ``‖CAM‖₁ / HW`` (the authors' threshold), else 0."""
    threshold = cams.abs().mean(dim=(2, 3), keepdim=True)
    return (cams > threshold).to(cams.dtype)


def select_cams(
    cams_s: torch.Tensor, cams_t: torch.Tensor, teacher_logits: torch.Tensor, num: int, selection: str = "top"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, per sample, the CAMs of the ``num`` classes with the highest (``"top"``) or lowest (``"bottom"``)
    teacher logits, on both sides (same classes, in the same order)."""
    if selection not in CAM_SELECTIONS:
        raise ValueError(f"select_cams: selection must be one of {CAM_SELECTIONS}, got {selection!r}")
    idx = teacher_logits.detach().float().topk(num, dim=1, largest=selection == "top").indices  # [B, num]

    def take(cams: torch.Tensor) -> torch.Tensor:
        return cams.gather(1, idx[:, :, None, None].expand(-1, -1, *cams.shape[2:]))

    return take(cams_s), take(cams_t)


def cat_loss(cams_s: torch.Tensor, cams_t: torch.Tensor, resolution: int = 2, normalize: bool = False) -> torch.Tensor:
    """CAT loss: MSE between the CAMs average-pooled to ``resolution``², each class map optionally L2-normalised
    over its positions first. The CAMs may differ in spatial size; batch and class counts must match. Float32."""
    if cams_s.shape[:2] != cams_t.shape[:2]:
        raise ValueError(
            f"cat_loss: student CAMs {tuple(cams_s.shape)} and teacher CAMs {tuple(cams_t.shape)} differ in batch or "
            "class count"
        )
    s = F.adaptive_avg_pool2d(cams_s.float(), resolution).flatten(2)
    t = F.adaptive_avg_pool2d(cams_t.float(), resolution).flatten(2)
    if normalize:
        s, t = F.normalize(s, dim=2), F.normalize(t, dim=2)
    return F.mse_loss(s, t)


def classifier_weight(module: nn.Module) -> torch.Tensor:
    """The [K, C] weight of a linear classifier (``nn.Linear`` or a 1×1 ``nn.Conv2d``)."""
    return module.weight.flatten(1)


def _find_linear_classifier(term: str, model: nn.Module, path: str | None, side: str) -> tuple[str, nn.Module]:
    try:
        path = path or find_classifier(model)
        module = get_module(model, path)
    except TapError as err:
        raise ValueError(f"{term}: cannot find the {side}'s classifier: {err} (set {side}_classifier=...)") from None
    is_1x1 = isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
    if not (isinstance(module, nn.Linear) or is_1x1):
        raise ValueError(
            f"{term}: the {side}'s classifier '{path}' is {type(module).__name__}, not a linear layer: CAMs need the "
            f"weights of a linear classifier (nn.Linear or a 1×1 nn.Conv2d) applied after global average pooling. "
            f"Name it with {side}_classifier='<module path>' (a timm model with num_classes=0 has no classifier)"
        )
    return path, module


@register_loss("catkd")
class CATKDLoss(LossTerm):
    """Class attention transfer: MSE between the student's and the teacher's pooled class activation maps.

    Args:
        weight: β, weight of the term (authors' CIFAR-100 ResNet32×4 → ResNet8×4: 15; tune it per pair).
        student_layer: the student's last convolutional map, the input of its global pooling (``stage:-1``).
        teacher_layer: the teacher's, same syntax.
        resolution: side of the average-pooled CAMs (the authors' ``CAM_RESOLUTION``, 2 on CIFAR-100).
        normalize: L2-normalise each pooled class map over its positions (the authors' ``IF_NORMALIZE``).
        binarize: binarise the teacher's CAMs at their spatial mean absolute activation (``IF_BINARIZE``).
        num_cams: transfer only the CAMs of this many classes per sample, chosen by the teacher's logits
            (``None``: all classes).
        cam_selection: ``"top"`` (highest teacher logits) or ``"bottom"`` (lowest), with ``num_cams``.
        student_classifier: module path of the student's linear classifier (``None``: timm's
            ``get_classifier()``, else the last ``nn.Linear``). Its weight gets gradients from this term.
        teacher_classifier: module path of the teacher's linear classifier (``None``: found the same way).
    """

    def __init__(
        self,
        weight: float = 15.0,
        student_layer: str = "stage:-1",
        teacher_layer: str = "stage:-1",
        resolution: int = 2,
        normalize: bool = False,
        binarize: bool = False,
        num_cams: int | None = None,
        cam_selection: str = "top",
        student_classifier: str | None = None,
        teacher_classifier: str | None = None,
    ) -> None:
        super().__init__(weight)
        self.student_tap = TapSpec.parse(student_layer)
        self.teacher_tap = TapSpec.parse(teacher_layer)
        self.student_taps = [self.student_tap]
        self.teacher_taps = [self.teacher_tap]
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"catkd: resolution must be an integer >= 1, got {resolution!r}")
        self.resolution = resolution
        self.normalize = bool(normalize)
        self.binarize = bool(binarize)
        if num_cams is not None and (isinstance(num_cams, bool) or not isinstance(num_cams, int) or num_cams < 1):
            raise ValueError(f"catkd: num_cams must be null (all classes) or an integer >= 1, got {num_cams!r}")
        self.num_cams = num_cams
        if cam_selection not in CAM_SELECTIONS:
            raise ValueError(f"catkd: cam_selection must be one of {CAM_SELECTIONS}, got {cam_selection!r}")
        self.cam_selection = cam_selection
        self.student_classifier_path = student_classifier
        self.teacher_classifier_path = teacher_classifier
        self.is_setup = False

    def setup(self, ctx: SetupContext) -> None:
        s_path, s_head = _find_linear_classifier("catkd", ctx.student_model, self.student_classifier_path, "student")
        t_path, t_head = _find_linear_classifier("catkd", ctx.teacher_model, self.teacher_classifier_path, "teacher")
        for side, tap, feat, path, head in [
            ("student", self.student_tap, ctx.student[self.student_tap], s_path, s_head),
            ("teacher", self.teacher_tap, ctx.teacher[self.teacher_tap], t_path, t_head),
        ]:
            shape = tuple(feat.shape)
            w = classifier_weight(head)
            if feat.dim() != 4:
                raise ValueError(
                    f"catkd: the {side} tap '{tap}' gives {shape}, but CAMs need a feature map [B, C, H, W]: tap the "
                    f"last convolutional stage, the map the head pools (e.g. {side}_layer: stage:-1)"
                )
            if shape[1] != w.shape[1]:
                raise ValueError(
                    f"catkd: the {side} tap '{tap}' has {shape[1]} channels {shape} but the {side}'s classifier "
                    f"'{path}' takes {w.shape[1]} features: tap the map its global pooling reads (stage:-1 for timm "
                    f"CNNs) or name the matching classifier with {side}_classifier"
                )
            if w.shape[0] != ctx.num_classes:
                raise ValueError(
                    f"catkd: the {side}'s classifier '{path}' has {w.shape[0]} outputs but the models predict "
                    f"{ctx.num_classes} classes; name the final classifier with {side}_classifier"
                )
        if self.num_cams is not None and self.num_cams > ctx.num_classes:
            raise ValueError(f"catkd: num_cams = {self.num_cams} exceeds the {ctx.num_classes} classes")
        self.borrow("student_head", s_head)
        self.borrow("teacher_head", t_head)
        self.is_setup = True
        self._warn_if_degenerate(ctx, t_head)

    def _warn_if_degenerate(self, ctx: SetupContext, t_head: nn.Module) -> None:
        s, t = ctx.student[self.student_tap], ctx.teacher[self.teacher_tap]
        flat = [
            f"{side} '{tap}'"
            for side, tap, f in [("student", self.student_tap, s), ("teacher", self.teacher_tap, t)]
            if math.prod(f.shape[2:]) == 1
        ]
        if flat and self.resolution > 1:
            maps = f"{' and '.join(flat)} {'maps are' if len(flat) > 1 else 'map is'}"
            warnings.warn(
                f"catkd: the {maps} 1×1, so the CAMs have no spatial extent (they are the bias-free logits, repeated "
                "over the pooled positions). Use larger inputs (e.g. >= 64×64 for ResNets) to transfer class attention",
                stacklevel=3,
            )
        with torch.no_grad():
            cams = class_activation_maps(t, classifier_weight(t_head).detach())
            bias = t_head.bias.float() if getattr(t_head, "bias", None) is not None else 0.0
            rebuilt = cams.mean(dim=(2, 3)) + bias
        logits = ctx.teacher.logits.float()
        if rebuilt.shape != logits.shape or not torch.allclose(rebuilt, logits, atol=1e-3, rtol=1e-3):
            warnings.warn(
                f"catkd: the teacher's CAMs from '{self.teacher_tap}' do not average to its logits, so they are not "
                "its class activation maps (the head has layers between the map and the classifier, or does not "
                "average-pool); tap the map the classifier's global average pooling reads",
                stacklevel=3,
            )

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        if not self.is_setup:
            raise RuntimeError("catkd: setup() was not called, so the classifiers are not known yet")
        cams_s = class_activation_maps(batch.student[self.student_tap], classifier_weight(self.student_head))
        cams_t = class_activation_maps(
            batch.teacher[self.teacher_tap].detach(), classifier_weight(self.teacher_head).detach()
        )
        if self.binarize:
            cams_t = binarize_cams(cams_t)
        if self.num_cams is not None:
            cams_s, cams_t = select_cams(cams_s, cams_t, batch.teacher.logits, self.num_cams, self.cam_selection)
        return cat_loss(cams_s, cams_t, self.resolution, self.normalize)

    def extra_repr(self) -> str:
        extra = f", num_cams={self.num_cams} ({self.cam_selection})" if self.num_cams is not None else ""
        return (
            f"weight={self.weight}, student={self.student_tap}, teacher={self.teacher_tap}, "
            f"resolution={self.resolution}, normalize={self.normalize}, binarize={self.binarize}{extra}"
        )
