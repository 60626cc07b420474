"""Channel-wise distillation (CWD)
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Shu, Liu, Gao, Yan, Shen, "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021
(arXiv:2011.13256).

Each channel :math:`c` of a feature map :math:`y \\in \\mathbb{R}^{B\\times C\\times H\\times W}` becomes a
distribution over its :math:`HW` positions,

.. math::

    \\phi(y_c)_i = \\frac{\\exp(y_{c,i} / \\tau)}{\\sum_{j=1}^{HW} \\exp(y_{c,j} / \\tau)},

and the loss of one matched pair is the KL divergence from the teacher's to the student's channel distributions,

.. math::

    L_{CWD} = \\frac{\\tau^2}{C} \\sum_{c=1}^{C} \\mathrm{KL}\\big(\\phi(y^T_c) \\,\\|\\, \\phi(r(y^S)_c)\\big)

averaged over the batch (i.e. the sum over batch and channels divided by :math:`B \\cdot C`, the number of channel
distributions compared), with :math:`C` the teacher's channel count and :math:`r` a 1×1 convolution that maps the
student's channels to the teacher's when the counts differ (the paper's rule; built with
:func:`lightning_kd.losses.connectors.make_connector`, owned by the term, trained with the student and saved in
checkpoints). The pairs are summed. The loss attends to each channel's most salient positions: where the teacher's
channel is large, a mismatch costs most.

Normalisation checked against the public code:

- irfanICMLL/TorchDistiller ``SemSeg-distill/utils/criterion.py`` (the authors' official code), ``CriterionCWD``
  with ``norm_type='channel'``, ``divergence='kl'``: ``softmax`` over the flattened :math:`HW` of each channel of
  ``preds / T``, ``KLDivLoss(reduction='sum')(log φ_S, φ_T)``, divided by ``n * c`` and multiplied by ``T**2``;
  ``README.md`` trains it on the logit map with ``exp_cwd.sh channel kl 3 4`` (loss weight 3, T = 4, Cityscapes).
  Same value as ours (we use ``log_softmax`` rather than ``softmax(...).log()``, which is more stable).
- open-mmlab/mmrazor ``mmrazor/models/losses/cwd.py`` ``ChannelWiseDivergence``: the same formula,
  ``sum(φ_T·log φ_T − φ_T·log φ_S)·τ² / (C·N)``.
- pppppM/mmdetection-distiller ``mmdet/distillation/losses/cwd.py`` (the detection code linked from the authors'
  README): it adds a 1×1 ``align`` conv when the widths differ, as we do, but (1) sums the *cross-entropy*
  :math:`-\\sum \\phi_T \\log \\phi_S`, which exceeds the KL by the teacher's entropy (a constant for the student:
  same gradient, different value, never zero), and (2) takes ``C`` from the student map before the connector. We
  follow the KL of the paper and of the authors' segmentation code and divide by the channel count actually
  compared (the teacher's); the tests show the difference.

torchdistill 1.1.5 has no CWD (its ``ChSimLoss`` is a different method), so there is no parity test; the tests
check hand-worked values and an independent restatement of the authors' formula.

Defaults for classification CNNs at 32×32 (the paper only covers dense prediction, so these are our choice):

- pairs ``stage:-4``, ``stage:-3``, ``stage:-2`` on both sides (timm ``feature_info``; ``layer1``–``layer3`` of a
  ResNet, 8×8 / 4×4 / 2×2 maps at 32×32 input), as for :mod:`~lightning_kd.losses.at`. The last stage is left out:
  at 32×32 a timm ResNet's ``layer4`` is 1×1, and the distribution of a channel over a single position is the
  constant 1, so that pair would always contribute exactly zero (:meth:`CWDLoss.setup` warns about 1×1 pairs; at
  16×16 input ``layer3`` is 1×1 too). At ImageNet resolution the last stage(s) are the natural choice.
- ``temperature`` τ = 1 and ``weight`` 5 (per pair, summed): the authors' setting for intermediate *feature* maps,
  pppppM/mmdetection-distiller ``configs/distillers/cwd/cwd_retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py``
  (``tau=1.0``, ``weight=5.0`` on each FPN level; mmrazor's Faster R-CNN FPN config uses ``tau=1``,
  ``loss_weight=10``). Backbone stages of a classifier are features, not logit maps, and their maps are tiny, where
  τ = 4 would flatten each channel's distribution towards uniform. The segmentation setting of the paper is τ = 4
  with weight 3 on the logit map (``README.md`` above).

DDP: no batch statistics; each rank averages over its local batch and DDP's gradient averaging makes it the global
mean when ranks hold equal batch sizes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.losses.base import DistillBatch, LayerPairs, LossTerm, SetupContext, check_temperature, register_loss
from lightning_kd.losses.connectors import make_connector

DEFAULT_LAYERS = ("stage:-4", "stage:-3", "stage:-2")
CWD_CONNECTORS = ("auto", "conv", "none")


def channel_log_distributions(f: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log φ(f)``: per sample and channel, the log-softmax over the spatial positions of ``f / τ``.

    ``f`` is [B, C, H, W] (or [B, C, *spatial]); returns [B, C, H·W] in float32."""
    if f.dim() < 3:
        raise ValueError(f"channel_log_distributions expects a feature map [B, C, H, W], got shape {tuple(f.shape)}")
    return F.log_softmax(f.float().flatten(2) / temperature, dim=-1)


def cwd_loss(f_s: torch.Tensor, f_t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """CWD loss of one pair: ``τ² / (B·C) · Σ_{b,c} KL(φ(f_t[b, c]) ‖ φ(f_s[b, c]))``, float32.

    Both maps must have the same shape (apply the connector to the student first)."""
    if f_s.shape != f_t.shape or f_s.dim() < 3:
        raise ValueError(
            f"cwd_loss: student map {tuple(f_s.shape)} and teacher map {tuple(f_t.shape)} must be feature maps "
            "[B, C, H, W] of the same shape (map the student's channels with a 1×1 conv first; pick layers of equal "
            "resolution)"
        )
    log_s = channel_log_distributions(f_s, temperature)
    log_t = channel_log_distributions(f_t.detach(), temperature)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)  # [B, C]
    return kl.mean() * temperature**2


@register_loss("cwd")
class CWDLoss(LossTerm):
    """Channel-wise distillation between matched student/teacher feature maps, summed over the pairs.

    Args:
        weight: weight of the term (each pair's loss is weighted equally; authors' detection setting: 5).
        student_layers: student taps, one per pair (module path, ``path:input`` or ``stage:N``).
        teacher_layers: teacher taps, same length and order; each pair must have the same H×W.
        temperature: τ of the spatial softmax of each channel (> 0); the loss is scaled by τ².
        connector: ``auto`` (a 1×1 conv only where the channel counts differ, the paper's rule), ``conv`` (a 1×1
            conv on every pair) or ``none`` (no connector: the counts must match).

    ``forward`` returns a dict ``{student tap: pair loss}`` (logged as ``train/cwd/<tap>``), whose sum is the loss.
    """

    def __init__(
        self,
        weight: float = 5.0,
        student_layers: Sequence[str] = DEFAULT_LAYERS,
        teacher_layers: Sequence[str] = DEFAULT_LAYERS,
        temperature: float = 1.0,
        connector: str = "auto",
    ) -> None:
        super().__init__(weight)
        self.layers = LayerPairs.parse("cwd", student_layers, teacher_layers)
        self.student_taps, self.teacher_taps = self.layers.student, self.layers.teacher
        self.temperature = check_temperature("cwd", temperature)
        if connector not in CWD_CONNECTORS:
            raise ValueError(f"cwd: connector must be one of {CWD_CONNECTORS}, got {connector!r}")
        self.connector_kind = connector
        #: one connector per pair (``nn.Identity`` where none is needed), built in :meth:`setup`
        self.connectors: nn.ModuleList | None = None

    def setup(self, ctx: SetupContext) -> None:
        shapes = []
        for _, s_tap, t_tap in self.layers:
            s_shape, t_shape = tuple(ctx.student[s_tap].shape), tuple(ctx.teacher[t_tap].shape)
            if len(s_shape) != 4 or len(t_shape) != 4:
                raise ValueError(
                    f"cwd: pair student '{s_tap}' {s_shape} / teacher '{t_tap}' {t_shape}: channel-wise distillation "
                    "needs feature maps [B, C, H, W]; pick convolutional stages, not embeddings or token sequences"
                )
            if s_shape[2:] != t_shape[2:]:
                raise ValueError(
                    f"cwd: spatial sizes differ for the pair student '{s_tap}' {s_shape} / teacher '{t_tap}' "
                    f"{t_shape} (H×W {s_shape[2:]} vs {t_shape[2:]}). Pick stages of equal resolution in "
                    "student_layers / teacher_layers (e.g. the same 'stage:N' for two ResNets)"
                )
            if s_shape[1] != t_shape[1] and self.connector_kind == "none":
                raise ValueError(
                    f"cwd: the pair student '{s_tap}' {s_shape} / teacher '{t_tap}' {t_shape} has {s_shape[1]} vs "
                    f"{t_shape[1]} channels and connector is 'none'; set connector: auto (a 1×1 conv maps the "
                    "student's channels to the teacher's) or pick layers of equal width"
                )
            if math.prod(s_shape[2:]) == 1:
                warnings.warn(
                    f"cwd: the pair student '{s_tap}' / teacher '{t_tap}' has 1×1 maps; the distribution of a "
                    "channel over a single position is constant, so it always contributes zero. Pick an earlier "
                    "stage or a larger input",
                    stacklevel=2,
                )
            shapes.append((s_shape, t_shape))
        if self.connectors is not None:  # already built (e.g. restored)
            return
        connectors = []
        for (s_shape, t_shape), (_, s_tap, t_tap) in zip(shapes, self.layers):
            kind = self.connector_kind
            if kind == "auto":
                kind = "conv" if s_shape[1] != t_shape[1] else "none"
            connectors.append(make_connector(s_shape[1:], t_shape[1:], kind, where=f"cwd ({s_tap} -> {t_tap})"))
        self.connectors = nn.ModuleList(connectors)

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        if self.connectors is None:
            raise RuntimeError("cwd: setup() was not called, so the connectors do not exist yet")
        return {
            name: cwd_loss(connector(batch.student[s_tap]), batch.teacher[t_tap], self.temperature)
            for (name, s_tap, t_tap), connector in zip(self.layers, self.connectors)
        }

    def extra_repr(self) -> str:
        pairs = ", ".join(f"{s}->{t}" for _, s, t in self.layers)
        return f"weight={self.weight}, temperature={self.temperature}, connector={self.connector_kind}, pairs=[{pairs}]"
