"""Correlation congruence (CC / CCKD)
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Peng, Jin, Liu, Li, Wu, Liu, Zhou, Zhang, "Correlation Congruence for Knowledge Distillation", ICCV 2019
(arXiv:1904.01802).

The student is asked to reproduce the teacher's *correlations between the samples of the batch*. With the batch's
(embedded) features :math:`x_1 \\dots x_B` of one model, its correlation matrix is
:math:`\\psi(x)_{ij} = k(x_i, x_j)`, and the loss is

.. math::

    L_{CC} = \\frac{1}{B^2} \\lVert \\psi(x^T) - \\psi(x^S) \\rVert_F^2
           = \\operatorname{mean}_{i,j} \\big(\\psi(x^T)_{ij} - \\psi(x^S)_{ij}\\big)^2 .

The kernel is the paper's P-order Taylor approximation of the Gaussian RBF
:math:`k(x, y) = \\exp(-\\gamma \\lVert x - y \\rVert^2)`: for unit vectors
:math:`\\lVert x - y \\rVert^2 = 2 - 2\\langle x, y\\rangle`, hence

.. math::

    k(x, y) = e^{-2\\gamma}\\, e^{2\\gamma \\langle x, y\\rangle}
            \\approx \\sum_{p=0}^{P} e^{-2\\gamma}\\, \\frac{(2\\gamma)^p}{p!}\\, \\langle x, y\\rangle^p ,

computed for the whole batch from the Gram matrix :math:`x x^\\top` (element-wise powers). ``kernel: bilinear`` uses
:math:`k(x, y) = \\langle x, y\\rangle` instead (the paper's bilinear-pool kernel).

Conventions, and where each comes from:

- **Embeddings.** The features (penultimate vectors by default, flattened if a map is tapped) go through a learned
  linear embedding to ``embed_dim`` = 128 on *both* sides, as in the code the CC authors shared with the CRD benchmark
  (HobbitLong/RepDistiller ``train_student.py``: ``embed_s = LinearEmbed(feat_s[-1].shape[1], opt.feat_dim)``,
  ``embed_t = LinearEmbed(feat_t[-1]...)``, both trainable, ``feat_dim = 128``) and in torchdistill's ImageNet config
  (``configs/sample/ilsvrc2012/cckd/resnet18_from_resnet50.yaml``: a trainable ``Linear4CCKD`` 2048→128 / 512→128
  on each model's ``avgpool``, the teacher body frozen). They are linear connectors (:func:`make_connector`) built in
  :meth:`CCLoss.setup`, optimised with the student and checkpointed with the term; the teacher's embedding receives
  gradients, the teacher itself never does. ``embed_teacher: false`` keeps the teacher's raw features (the target is
  then fixed); ``embed_dim: null`` uses raw features on both sides (as AberHu/Knowledge-Distillation-Zoo
  ``kd_losses/cc.py`` does). No embedding is needed for shape reasons: :math:`\\psi` is :math:`B\\times B` whatever
  the widths. Note that with a trainable teacher embedding the *target* moves too: both embeddings could in principle
  drift toward a degenerate solution (e.g. every sample mapped to one direction, where both matrices are constant);
  the task loss on the student does not constrain the embeddings. Use ``embed_teacher: false`` for a fixed target.
- **Unit-norm features** (``normalize: true``). The Taylor formula above equals the Gaussian RBF (as
  :math:`P\\to\\infty`) only for unit vectors, which is where its constant :math:`e^{-2\\gamma}` comes from; the
  embeddings are therefore L2-normalised first, as in AberHu/Knowledge-Distillation-Zoo ``kd_losses/cc.py``
  (``F.normalize(feat)``, then the same expansion and ``F.mse_loss`` of the two matrices). For an even order (the
  default :math:`P = 2`) the kernel values then lie in :math:`(0, 1]` and the loss in :math:`[0, 1)`.
- **Reduction.** :math:`\\frac{1}{B^2}\\lVert\\cdot\\rVert_F^2` = the mean of the squared entry differences
  (``F.mse_loss`` in Knowledge-Distillation-Zoo).

Deviations of torchdistill 1.1.5 ``CCKDLoss`` (``torchdistill.losses.mid_level``), which otherwise computes the same
kernel matrix (``row = 1; row += (2γ)^p / p! · (x xᵀ)^p; row *= exp(-2γ)``, p = 1..P): it does not normalise the
embeddings (``normalize: false`` reproduces its matrices exactly; then the entries are unbounded, e.g.
:math:`(x\\cdot y)^2` of raw 128-d embeddings), and its ``batchmean`` reduction is ``torch.dist(ψ_S, ψ_T, 2) / B²``:
the Frobenius norm *not squared*, over :math:`B^2`. With ``normalize: false`` our value is exactly
``B² · torchdistill²`` (tested, with torchdistill's own ``Linear4CCKD`` embeddings given our weights).

RepDistiller's ``distiller_zoo/CC.py`` (the restructured authors' code) computes something else: with
:math:`\\delta_i = |e^S_i - e^T_i|` (element-wise, embedded features) it returns
:math:`\\operatorname{mean}_i \\langle \\delta_i, \\delta_{i+1} \\rangle` over consecutive samples of the batch — an
instance-level congruence of the two embeddings, zero whenever :math:`e^S = e^T`, with no kernel and no correlation
matrix. We follow the paper's kernel formulation instead; the test suite reimplements RepDistiller's formula and shows
the difference (e.g. our loss is invariant to a rotation of the student's embedding space, theirs is not).

Defaults: :math:`\\gamma = 0.4` and :math:`P = 2` (torchdistill's CCKD config and Knowledge-Distillation-Zoo's
``--gamma 0.4 --P_order 2``); weight 100 (Knowledge-Distillation-Zoo's ``--lambda_kd 100.0`` for CIFAR with exactly
this normalised, mean-squared formulation; RepDistiller's ``-b 0.02`` and torchdistill's 0.003 belong to their
different reductions and do not transfer); penultimate embeddings on both sides (``embedding``: RepDistiller's
``feat[-1]``, torchdistill's ``avgpool``).

The paper's text itself could not be consulted here: the formula above is the one the public implementations agree
on (torchdistill for the kernel, Knowledge-Distillation-Zoo for normalisation and reduction).

Under DDP the correlations are between the samples of each rank's local batch (not gathered); :math:`B` is the
per-rank batch size. The kernels are computed in float32 with autocast disabled.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.losses.base import DistillBatch, LossTerm, SetupContext, check_number, register_loss
from lightning_kd.losses.connectors import make_connector
from lightning_kd.taps import TapSpec

KERNELS = ("gaussian", "bilinear")


def taylor_gaussian_kernel(x: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """``Σ_{p=0..order} e^{-2γ} (2γ)^p / p! · (x xᵀ)^p`` (element-wise powers) of the rows of ``x`` [B, D] → [B, B].

    Equal to the Gaussian RBF ``exp(-γ‖x_i − x_j‖²)`` truncated at order ``P`` when the rows have unit norm.
    """
    gram = x @ x.t()
    out = torch.zeros_like(gram)
    power = torch.ones_like(gram)
    for p in range(order + 1):
        if p:
            power = power * gram
        out = out + (math.exp(-2.0 * gamma) * (2.0 * gamma) ** p / math.factorial(p)) * power
    return out


def correlation_matrix(
    x: torch.Tensor, kernel: str = "gaussian", gamma: float = 0.4, order: int = 2, normalize: bool = True
) -> torch.Tensor:
    """The batch correlation matrix ``ψ(x)`` [B, B] of the features ``x`` [B, ...] (flattened per sample), float32."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float().flatten(1)
        if normalize:
            x = F.normalize(x, p=2.0, dim=1)
        if kernel == "bilinear":
            return x @ x.t()
        if kernel == "gaussian":
            return taylor_gaussian_kernel(x, gamma, order)
    raise ValueError(f"cc: kernel must be one of {KERNELS}, got {kernel!r}")


def cc_loss(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    kernel: str = "gaussian",
    gamma: float = 0.4,
    order: int = 2,
    normalize: bool = True,
) -> torch.Tensor:
    """CC loss ``mean_ij (ψ(f_T) − ψ(f_S))²`` = ``‖ψ_T − ψ_S‖²_F / B²`` of (embedded) features ``f_s`` [B, Ds] and
    ``f_t`` [B, Dt] (widths may differ; at least 2 samples). Gradients flow to both inputs (the teacher's side only
    carries gradient when it went through a trainable embedding)."""
    if f_s.shape[0] != f_t.shape[0] or f_s.shape[0] < 2:
        raise ValueError(
            f"cc: student features {tuple(f_s.shape)} and teacher features {tuple(f_t.shape)} must hold the same "
            "number of samples, at least 2 (the loss relates the samples of a batch)"
        )
    k_s = correlation_matrix(f_s, kernel, gamma, order, normalize)
    k_t = correlation_matrix(f_t, kernel, gamma, order, normalize)
    return (k_s - k_t).pow(2).mean()


@register_loss("cc")
class CCLoss(LossTerm):
    """Correlation congruence: match the batch's kernel correlation matrices of (embedded) student/teacher features.

    Args:
        weight: weight of the term (100, Knowledge-Distillation-Zoo's CIFAR value for this formulation).
        student_layer: student tap (default: the penultimate embedding; maps are flattened per sample).
        teacher_layer: teacher tap, same syntax.
        embed_dim: width of the learned linear embeddings (128 as in the authors' code via RepDistiller and in
            torchdistill); ``None`` uses the raw features (no trainable part).
        embed_teacher: also embed the teacher's features with a trainable linear map (authors' code, torchdistill);
            ``False`` keeps the teacher's raw features as a fixed target. Ignored when ``embed_dim`` is ``None``.
        kernel: ``gaussian`` (P-order Taylor expansion of the Gaussian RBF, the paper's choice) or ``bilinear``
            (plain inner products).
        gamma: γ of the Gaussian RBF ``exp(-γ‖x − y‖²)`` (paper / torchdistill: 0.4).
        order: Taylor order P (paper / torchdistill: 2).
        normalize: L2-normalise the (embedded) features before the kernel, which makes the Taylor series that of the
            Gaussian RBF (Knowledge-Distillation-Zoo); ``False`` reproduces torchdistill's matrices.
    """

    def __init__(
        self,
        weight: float = 100.0,
        student_layer: str = "embedding",
        teacher_layer: str = "embedding",
        embed_dim: int | None = 128,
        embed_teacher: bool = True,
        kernel: str = "gaussian",
        gamma: float = 0.4,
        order: int = 2,
        normalize: bool = True,
    ) -> None:
        super().__init__(weight)
        if kernel not in KERNELS:
            raise ValueError(f"cc: kernel must be one of {KERNELS}, got {kernel!r}")
        check_number("cc", "gamma", gamma, positive=True)
        if isinstance(order, bool) or not isinstance(order, int) or order < 0:
            raise ValueError(f"cc: order (the Taylor order P) must be an integer >= 0, got {order!r}")
        if embed_dim is not None and (isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1):
            raise ValueError(f"cc: embed_dim must be a positive integer or null (no embedding), got {embed_dim!r}")
        self.student_tap = TapSpec.parse(student_layer)
        self.teacher_tap = TapSpec.parse(teacher_layer)
        self.student_taps = [self.student_tap]
        self.teacher_taps = [self.teacher_tap]
        self.embed_dim = embed_dim
        self.embed_teacher = bool(embed_teacher) and embed_dim is not None
        self.kernel = kernel
        self.gamma = float(gamma)
        self.order = order
        self.normalize = bool(normalize)
        self.embed_s: nn.Module | None = None
        self.embed_t: nn.Module | None = None

    def setup(self, ctx: SetupContext) -> None:
        s_shape, t_shape = tuple(ctx.student[self.student_tap].shape), tuple(ctx.teacher[self.teacher_tap].shape)
        for side, tap, shape in (("student", self.student_tap, s_shape), ("teacher", self.teacher_tap, t_shape)):
            if len(shape) < 2:
                raise ValueError(
                    f"cc: {side} tap '{tap}' has shape {shape}; the term needs one feature vector (or map) per "
                    "sample, [B, D] or [B, C, H, W]. Tap e.g. 'embedding' or a stage"
                )
        if self.embed_dim is None or self.embed_s is not None:  # nothing to build, or already built (restored)
            return
        self.embed_s = make_connector(
            (math.prod(s_shape[1:]),), (self.embed_dim,), "linear", where=f"cc student embedding ({self.student_tap})"
        )
        if self.embed_teacher:
            self.embed_t = make_connector(
                (math.prod(t_shape[1:]),),
                (self.embed_dim,),
                "linear",
                where=f"cc teacher embedding ({self.teacher_tap})",
            )

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        if self.embed_dim is not None and self.embed_s is None:
            raise RuntimeError("cc: setup() was not called, so the embeddings do not exist yet")
        s = batch.student[self.student_tap].flatten(1)
        t = batch.teacher[self.teacher_tap].detach().flatten(1)  # only the teacher's embedding is trained
        if self.embed_s is not None:
            s = self.embed_s(s)
        if self.embed_t is not None:
            t = self.embed_t(t)
        return cc_loss(s, t, self.kernel, self.gamma, self.order, self.normalize)

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, student={self.student_tap}, teacher={self.teacher_tap}, embed_dim={self.embed_dim}, "
            f"embed_teacher={self.embed_teacher}, kernel={self.kernel}, gamma={self.gamma}, order={self.order}, "
            f"normalize={self.normalize}"
        )
