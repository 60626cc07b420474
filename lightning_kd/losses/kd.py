"""Hinton knowledge distillation
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep Learning Workshop
(arXiv:1503.02531).

.. math::

    L_{KD} = \\tau^2 \\cdot \\mathrm{KL}\\big(\\mathrm{softmax}(z_T/\\tau) \\,\\|\\, \\mathrm{softmax}(z_S/\\tau)\\big)

averaged over the batch. The :math:`\\tau^2` factor keeps the gradient scale independent of :math:`\\tau`. The
cross-entropy on labels is the engine's task loss; ``conf/loss/kd.yaml`` sets CE 0.1 / KD 0.9 and
:math:`\\tau = 4`, the CIFAR-100 settings of the CRD benchmark (RepDistiller ``-r 0.1 -a 0.9``, ``kd_T 4``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightning_kd.losses.base import DistillBatch, LossTerm, register_loss


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``τ² · KL(softmax(z_T/τ) ‖ softmax(z_S/τ))``, batch mean, computed in float32 whatever the input dtype."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


@register_loss("kd")
class KDLoss(LossTerm):
    """Hinton KD on logits.

    Args:
        weight: weight of the term (``loss.terms.kd.weight``).
        temperature: softmax temperature τ (> 0).
    """

    def __init__(self, weight: float = 1.0, temperature: float = 4.0) -> None:
        super().__init__(weight)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"kd: temperature must be a finite number > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        return kd_loss(batch.student.logits, batch.teacher.logits, self.temperature)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}"
