"""FitNets hint loss
^^^^^^^^^^^^^^^^^^^

Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015 (arXiv:1412.6550).

.. math::

    L_{hint} = \\frac{1}{N} \\lVert r(f_S) - f_T \\rVert_2^2

mean squared error between a tapped teacher feature :math:`f_T` and the tapped student feature passed through a
learned connector :math:`r` (1×1 convolution for maps, linear for vectors; see
:mod:`lightning_kd.losses.connectors`). The connector belongs to the term: it is optimised with the student and saved
in checkpoints. The paper trains the hint in a separate first stage; like the CRD benchmark code, this term is simply
added to the task loss (one stage).

Defaults: the second-to-last feature stage of both models (``stage:-2``, timm's ``feature_info``), a plain 1×1 conv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_kd.losses.base import DistillBatch, LossTerm, SetupContext, register_loss
from lightning_kd.losses.connectors import make_connector
from lightning_kd.taps import TapSpec


@register_loss("fitnet")
class FitNetLoss(LossTerm):
    """Hint loss between one student layer and one teacher layer.

    Args:
        weight: weight of the term.
        student_layer: student tap (module path, ``path:input``, ``stage:N`` or ``embedding``).
        teacher_layer: teacher tap, same syntax.
        connector: ``auto`` | ``conv`` | ``linear`` | ``none``.
        batchnorm: BatchNorm after the 1×1 conv (the CRD benchmark's ``ConvReg``).
        relu: ReLU after the connector.
    """

    def __init__(
        self,
        weight: float = 1.0,
        student_layer: str = "stage:-2",
        teacher_layer: str = "stage:-2",
        connector: str = "auto",
        batchnorm: bool = False,
        relu: bool = False,
    ) -> None:
        super().__init__(weight)
        self.student_tap = TapSpec.parse(student_layer)
        self.teacher_tap = TapSpec.parse(teacher_layer)
        self.student_taps = [self.student_tap]
        self.teacher_taps = [self.teacher_tap]
        self.connector_kind = connector
        self.batchnorm = batchnorm
        self.relu = relu
        self.connector: torch.nn.Module | None = None

    def setup(self, ctx: SetupContext) -> None:
        if self.connector is not None:  # already built (e.g. restored)
            return
        self.connector = make_connector(
            tuple(ctx.student[self.student_tap].shape[1:]),
            tuple(ctx.teacher[self.teacher_tap].shape[1:]),
            self.connector_kind,
            batchnorm=self.batchnorm,
            relu=self.relu,
            where=f"fitnet ({self.student_tap} -> {self.teacher_tap})",
        )

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        if self.connector is None:
            raise RuntimeError("fitnet: setup() was not called, so the connector does not exist yet")
        student = self.connector(batch.student[self.student_tap])
        return F.mse_loss(student.float(), batch.teacher[self.teacher_tap].float())

    def extra_repr(self) -> str:
        return f"weight={self.weight}, student={self.student_tap}, teacher={self.teacher_tap}"
