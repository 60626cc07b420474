"""SimKD: the reused teacher classifier
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Chen, Mei, Zhang, Wang, Feng, Chen, "Knowledge Distillation with the Reused Teacher Classifier", CVPR 2022
(arXiv:2203.14001).

The student's final feature map :math:`f_S \\in \\mathbb{R}^{B\\times C_S\\times H_S\\times W_S}` passes through a
trainable projector :math:`P` to the teacher's width, and the only distillation loss is

.. math::

    L_{SimKD} = \\frac{1}{B\\,C_T\\,H\\,W}\\lVert P(\\mathrm{align}(f_S)) - \\mathrm{align}(f_T) \\rVert_2^2 ,

a mean squared error; there is no cross-entropy (``task_weight: 0``). At inference the student predicts with the
**teacher's classifier, frozen**, on the pooled projected map: :math:`\\hat y = W_T\\,\\mathrm{GAP}(P(f_S)) + b_T`.
If the student's features matched the teacher's exactly, it would reproduce the teacher's predictions.

Followed (checked against the authors' code, DefangChen/SimKD ``models/util.py`` class ``SimKD`` and
``train_student.py``; ``scripts/run_distill.sh``: ``--distill simkd -c 0 -d 0 -b 1``):

- features: the last convolutional map before pooling (RepDistiller's ``feat[-2]``; here ``stage:-1``, timm's last
  ``feature_info`` stage, which for timm ResNets is ``layer4``, the map global-pooled by the head);
- spatial alignment: the larger map is adaptive-average-pooled to the smaller one's size (square, as in the code);
- projector (``factor`` = 2): 1×1 conv :math:`C_S \\to C_T/2` · BN · ReLU · 3×3 conv :math:`C_T/2 \\to C_T/2` · BN ·
  ReLU · 1×1 conv :math:`C_T/2 \\to C_T` · BN · ReLU, convolutions without bias;
- loss ``nn.MSELoss()`` with weight 1, no CE, no KD; the teacher classifier is not optimised.

The teacher's classifier is copied into the term (``classifier``, ``requires_grad=False``) so that checkpoints hold
everything the student needs for inference. :meth:`SimKDLoss.setup` checks that the teacher's head really is
global average pooling + that classifier on the tapped map (true for timm ResNets, RegNets, EfficientNets…), and
raises otherwise. The student's own classifier is unused (and untrained).

Inference: :meth:`SimKDLoss.student_predictor` returns an ``nn.Module`` (the student + projector + teacher
classifier) that maps images to logits; :class:`~lightning_kd.module.DistillationModule` uses it for validation and
test metrics. With :class:`~lightning_kd.callback.DistillCallback` your module's ``forward`` is not changed: call
``callback.engine.student_predictor(model)`` to get the predictor.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.losses.base import DistillBatch, LossTerm, SetupContext, register_loss
from lightning_kd.taps import LayerTaps, TapSpec


def simkd_projector(student_channels: int, teacher_channels: int, factor: int = 2) -> nn.Sequential:
    """The authors' bottleneck projector ``C_S → C_T/factor → C_T/factor (3×3) → C_T``, each conv + BN + ReLU."""
    mid = max(1, teacher_channels // factor)
    return nn.Sequential(
        nn.Conv2d(student_channels, mid, kernel_size=1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, teacher_channels, kernel_size=1, bias=False),
        nn.BatchNorm2d(teacher_channels),
        nn.ReLU(inplace=True),
    )


def align_spatial(f: torch.Tensor, size: int) -> torch.Tensor:
    """Adaptive-average-pool ``f`` to ``size × size`` when it is larger (the authors' alignment), else unchanged."""
    return F.adaptive_avg_pool2d(f, (size, size)) if f.shape[2] > size else f


class SimKDPredictor(nn.Module):
    """The deployable SimKD student: ``images → student map → projector → GAP → teacher classifier``.

    Its ``state_dict`` holds the student, the projector and the teacher's classifier.
    """

    def __init__(self, student: nn.Module, term: SimKDLoss) -> None:
        super().__init__()
        self.student = student
        self.projector = term.projector
        self.classifier = term.classifier
        self.size = term.size
        self.taps = LayerTaps(student, [term.student_tap])
        self.tap = term.student_tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.taps.capture():
            self.student(x)
        f = self.taps.pop()[self.tap]
        return simkd_logits(self.projector(align_spatial(f, self.size)), self.classifier)


def simkd_logits(projected: torch.Tensor, classifier: nn.Module) -> torch.Tensor:
    """The teacher classifier applied to the globally average-pooled projected map."""
    return classifier(projected.mean(dim=(2, 3)))


@register_loss("simkd")
class SimKDLoss(LossTerm):
    """SimKD: MSE between the projected student map and the teacher map; the student reuses the teacher's classifier.

    Args:
        weight: weight of the term (authors: 1, with no cross-entropy: ``task_weight: 0``).
        student_layer: the student's final feature map (default ``stage:-1``).
        teacher_layer: the teacher's final feature map, the input of its global pooling (default ``stage:-1``).
        factor: bottleneck reduction of the projector (authors: 2).
    """

    replaces_task_loss = True

    def __init__(
        self,
        weight: float = 1.0,
        student_layer: str = "stage:-1",
        teacher_layer: str = "stage:-1",
        factor: int = 2,
    ) -> None:
        super().__init__(weight)
        if int(factor) != factor or factor < 1:
            raise ValueError(f"simkd: factor must be a positive integer, got {factor}")
        self.factor = int(factor)
        self.student_tap = TapSpec.parse(student_layer)
        self.teacher_tap = TapSpec.parse(teacher_layer)
        self.student_taps = [self.student_tap]
        self.teacher_taps = [self.teacher_tap]
        self.projector: nn.Module | None = None
        self.classifier: nn.Module | None = None
        self.size = 0

    def setup(self, ctx: SetupContext) -> None:
        s, t = ctx.student[self.student_tap], ctx.teacher[self.teacher_tap]
        if s.dim() != 4 or t.dim() != 4:
            raise ValueError(
                f"simkd: needs feature maps [B, C, H, W]; student '{self.student_tap}' gives {tuple(s.shape)} and "
                f"teacher '{self.teacher_tap}' gives {tuple(t.shape)}. Tap the last convolutional stage (stage:-1)"
            )
        self.size = min(s.shape[2], t.shape[2])
        if self.classifier is None:
            self.classifier = self._teacher_classifier(ctx, t)
        if self.projector is None:
            self.projector = simkd_projector(s.shape[1], t.shape[1], self.factor).to(s.device)

    def _teacher_classifier(self, ctx: SetupContext, t_map: torch.Tensor) -> nn.Module:
        get = getattr(ctx.teacher_model, "get_classifier", None)
        head = get() if callable(get) else None
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"simkd: reuses the teacher's linear classifier, but {type(ctx.teacher_model).__name__}."
                f"get_classifier() gives {type(head).__name__}; use a timm CNN teacher whose head is global average "
                "pooling + nn.Linear (ResNet, RegNet, EfficientNet, MobileNet…)"
            )
        if head.in_features != t_map.shape[1]:
            raise ValueError(
                f"simkd: the teacher tap '{self.teacher_tap}' has {t_map.shape[1]} channels but the teacher's "
                f"classifier takes {head.in_features} features; tap the map the head pools (stage:-1)"
            )
        with torch.no_grad():
            reproduced = simkd_logits(t_map.float(), copy.deepcopy(head).float())
        if not torch.allclose(reproduced, ctx.teacher.logits.float(), atol=1e-3, rtol=1e-3):
            raise ValueError(
                f"simkd: the teacher's logits are not its classifier applied to the average-pooled tap "
                f"'{self.teacher_tap}' (max difference "
                f"{(reproduced - ctx.teacher.logits.float()).abs().max():.3g}); SimKD needs the map right before "
                "global average pooling and a head without extra layers"
            )
        classifier = copy.deepcopy(head).train(self.training)  # the teacher is in eval mode; follow the term
        classifier.requires_grad_(False)
        return classifier

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        if self.projector is None or self.classifier is None:
            raise RuntimeError("simkd: setup() was not called, so the projector does not exist yet")
        s = align_spatial(batch.student[self.student_tap], self.size)
        t = align_spatial(batch.teacher[self.teacher_tap], self.size)
        return F.mse_loss(self.projector(s).float(), t.float())

    def student_predictor(self, student: nn.Module) -> nn.Module:
        """The student as SimKD deploys it (see :class:`SimKDPredictor`); built once per student."""
        if self.projector is None or self.classifier is None:
            raise RuntimeError("simkd: setup() was not called, so there is no projector to predict with yet")
        cached = self.__dict__.get("_predictor")
        if cached is None or cached.student is not student:
            cached = SimKDPredictor(student, self)
            self.borrow("_predictor", cached)
        return cached

    def extra_repr(self) -> str:
        return f"weight={self.weight}, student={self.student_tap}, teacher={self.teacher_tap}, factor={self.factor}"
