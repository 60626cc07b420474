"""Attention transfer (AT)
^^^^^^^^^^^^^^^^^^^^^^^^

Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of Convolutional Neural Networks
via Attention Transfer", ICLR 2017 (arXiv:1612.03928).

The spatial attention map of a feature map :math:`f \\in \\mathbb{R}^{B\\times C\\times H\\times W}` is

.. math::

    Q(f) = \\frac{\\operatorname{vec}(A)}{\\lVert \\operatorname{vec}(A) \\rVert_2}, \\qquad
    A_{hw} = \\frac{1}{C}\\sum_c |f_{c,h,w}|^p

and the loss of one matched pair is the mean over the batch and the :math:`HW` positions of
:math:`(Q(f_S) - Q(f_T))^2`; the pairs are summed.

Notes on the conventions:

- **mean vs. sum over channels.** The paper (Eq. 2 and §3.1) writes :math:`F^p_{sum} = \\sum_c |A_c|^p`; the authors'
  code and RepDistiller use the channel *mean*. The two differ by the constant :math:`C`, which the L2 normalisation
  removes, so the attention map is the same either way (and the student and teacher may have different widths: no
  connector is needed).
- **'code' reduction.** The paper writes :math:`\\sum_j \\lVert Q_S^j - Q_T^j \\rVert_2` (a norm, not squared);
  the authors' code squares the difference and averages over the batch *and the positions*. We follow the code, as do
  RepDistiller and torchdistill's ``ATLoss(mode='code')`` (torchdistill's ``mode='paper'`` sums un-squared norms
  over pairs and divides by the batch size). Consequence: the loss is small (≈ 1/HW scale), hence the large weight.
- :math:`|f|^p`: the reference code writes ``f.pow(p)``; we take the absolute value first (the paper's definition),
  identical for the default ``p = 2`` and well defined for odd ``p``.

Sources (checked):

- szagoruyko/attention-transfer ``utils.py`` (lines 18–23 of commit 893df54, cited by torchdistill):
  ``at(x) = normalize(x.pow(2).mean(1).view(x.size(0), -1))`` and ``at_loss(x, y) = (at(x) - at(y)).pow(2).mean()``.
- HobbitLong/RepDistiller ``distiller_zoo/AT.py``: ``Attention(p=2)``, ``at(f) = F.normalize(f.pow(p).mean(1).view(
  B, -1))``, per-pair ``(at(f_s) - at(f_t)).pow(2).mean()``; when the resolutions differ it average-pools the larger
  map to the smaller (mdistiller ``distillers/AT.py`` too): ours does so with ``resize=True`` and otherwise raises, so
  that a mismatched pair is a choice, not an accident; ``train_student.py``: ``g_s = feat_s[1:-1]`` (the residual groups, not the
  stem nor the pooled embedding) and ``loss_kd = sum(loss_group)``; ``scripts/run_cifar_distill.sh``: AT runs with
  ``-b 1000`` (the CRD benchmark's β).
- torchdistill 1.1.5 ``torchdistill.losses.mid_level.ATLoss`` (``mode='code'`` is the above; parity is tested).

Defaults: weight 1000 (CRD benchmark / RepDistiller), ``p = 2``, and the pairs ``stage:-4``, ``stage:-3``,
``stage:-2`` on both sides — timm's ``feature_info``; for ResNets these are ``layer1``–``layer3``, the three groups
that precede the last one, i.e. RepDistiller's ``feat[1:-1]`` for its three-group CIFAR ResNets. The last stage is left
out on purpose: at 32×32 input a timm ResNet's ``layer4`` is 1×1, and the attention map of a single position is the
constant 1, so that pair would always contribute exactly zero (a 1×1 pair triggers a warning in :meth:`ATLoss.setup`).
At ImageNet resolution you may prefer the last stages (torchdistill's ImageNet example uses ``layer3`` and ``layer4``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lightning_kd.losses.base import DistillBatch, LayerPairs, LossTerm, SetupContext, register_loss
from lightning_kd.losses.connectors import pool_to

DEFAULT_LAYERS = ("stage:-4", "stage:-3", "stage:-2")


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention map ``normalize_L2(vec(mean_c |f_c|^p))`` of ``f`` [B, C, H, W] (or [B, C, *spatial]),
    returned as [B, H·W] in float32."""
    if f.dim() < 3:
        raise ValueError(f"attention_map expects a feature map [B, C, H, W], got shape {tuple(f.shape)}")
    a = f.float().abs().pow(p).mean(1).flatten(1)
    return F.normalize(a, p=2.0, dim=1)


def at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2.0, resize: bool = False) -> torch.Tensor:
    """AT loss of one pair (authors' code): mean over batch and positions of ``(Q(f_S) − Q(f_T))²``.

    The channel counts may differ; the batch and spatial sizes must match unless ``resize``, which adaptive-average-
    pools the larger map to the smaller one's H×W first (RepDistiller / mdistiller ``at_loss``).
    """
    if resize and f_s.dim() == 4 and f_t.dim() == 4 and f_s.shape[2:] != f_t.shape[2:]:
        if f_s.shape[2] * f_s.shape[3] > f_t.shape[2] * f_t.shape[3]:
            f_s = pool_to(f_s, f_t.shape[2:])
        else:
            f_t = pool_to(f_t, f_s.shape[2:])
    if f_s.shape[0] != f_t.shape[0] or f_s.shape[2:] != f_t.shape[2:]:
        raise ValueError(
            f"at_loss: student map {tuple(f_s.shape)} and teacher map {tuple(f_t.shape)} differ in batch or spatial "
            "size; pick layers of equal resolution"
        )
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


@register_loss("at")
class ATLoss(LossTerm):
    """Attention transfer between matched student/teacher layers, summed over the pairs.

    Args:
        weight: weight of the term (the CRD benchmark / RepDistiller use β = 1000).
        student_layers: student taps, one per pair (module path, ``path:input`` or ``stage:N``).
        teacher_layers: teacher taps, same length and order; each pair must have the same spatial size.
        p: exponent of the attention map ``mean_c |f_c|^p`` (the paper and the reference code use 2).
        resize: allow pairs of different H×W: the larger map is average-pooled to the smaller (RepDistiller's
            behaviour, needed for cross-architecture pairs such as resnet32x4 → ShuffleNetV2).

    ``forward`` returns a dict ``{student tap: pair loss}`` (logged as ``train/at/<tap>``), whose sum is the loss.
    """

    def __init__(
        self,
        weight: float = 1000.0,
        student_layers: Sequence[str] = DEFAULT_LAYERS,
        teacher_layers: Sequence[str] = DEFAULT_LAYERS,
        p: float = 2.0,
        resize: bool = False,
    ) -> None:
        super().__init__(weight)
        self.layers = LayerPairs.parse("at", student_layers, teacher_layers)
        self.student_taps, self.teacher_taps = self.layers.student, self.layers.teacher
        p = float(p)
        if not (math.isfinite(p) and p > 0):
            raise ValueError(f"at: p must be a finite positive number, got {p}")
        self.p = p
        self.resize = bool(resize)

    def setup(self, ctx: SetupContext) -> None:
        for _, s_tap, t_tap in self.layers:
            s_shape, t_shape = tuple(ctx.student[s_tap].shape), tuple(ctx.teacher[t_tap].shape)
            if len(s_shape) < 3 or len(t_shape) < 3:
                raise ValueError(
                    f"at: pair student '{s_tap}' {s_shape} / teacher '{t_tap}' {t_shape}: attention transfer needs "
                    "feature maps [B, C, H, W]; pick convolutional stages, not embeddings"
                )
            if s_shape[2:] != t_shape[2:] and not self.resize:
                raise ValueError(
                    f"at: spatial sizes differ for the pair student '{s_tap}' {s_shape} / teacher '{t_tap}' "
                    f"{t_shape} (H×W {s_shape[2:]} vs {t_shape[2:]}). Pick stages of equal resolution in "
                    "student_layers / teacher_layers (e.g. the same 'stage:N' for two ResNets), or set resize: true to pool the "
                    "larger map to the smaller"
                )
            if min(math.prod(s_shape[2:]), math.prod(t_shape[2:])) == 1:
                warnings.warn(
                    f"at: the pair student '{s_tap}' / teacher '{t_tap}' has 1×1 maps, whose attention map is "
                    "constant: it always contributes zero. Pick an earlier stage or a larger input",
                    stacklevel=2,
                )

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        return {
            name: at_loss(batch.student[s_tap], batch.teacher[t_tap], self.p, self.resize)
            for name, s_tap, t_tap in self.layers
        }

    def extra_repr(self) -> str:
        pairs = ", ".join(f"{s}->{t}" for _, s, t in self.layers)
        return f"weight={self.weight}, p={self.p}, resize={self.resize}, pairs=[{pairs}]"
