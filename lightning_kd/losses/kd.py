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

import torch
import torch.nn.functional as F

from lightning_kd.losses.base import DistillBatch, LossTerm, check_temperature, register_loss


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-sample z-score of logits (logit standardisation; Sun et al., "Logit Standardization in Knowledge
    Distillation", CVPR 2024): ``Z(z) = (z − mean(z)) / (std(z) + eps)``, with the unbiased standard deviation and
    ``eps = 1e-7`` as in the authors' code (sunshangquan/logit-standardization-KD) and torchdistill's
    ``LogitStdKDLoss``. Float32."""
    z = logits.float()
    return (z - z.mean(dim=-1, keepdim=True)) / (z.std(dim=-1, keepdim=True) + eps)


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, *, standardize: bool = False
) -> torch.Tensor:
    """``τ² · KL(softmax(z_T/τ) ‖ softmax(z_S/τ))``, batch mean, computed in float32 whatever the input dtype.

    With ``standardize``, both logits are z-scored per sample first (:func:`standardize_logits`); τ is then the
    paper's base temperature and the τ² factor is kept, as in the authors' code.
    """
    s, t = student_logits.float(), teacher_logits.float()
    if standardize:
        s, t = standardize_logits(s), standardize_logits(t)
    log_s = F.log_softmax(s / temperature, dim=-1)
    log_t = F.log_softmax(t / temperature, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


@register_loss("kd")
class KDLoss(LossTerm):
    """Hinton KD on logits.

    Args:
        weight: weight of the term (``loss.terms.kd.weight``).
        temperature: softmax temperature τ (> 0).
        standardize: z-score the logits per sample before the softmax (logit standardisation, CVPR 2024).
    """

    def __init__(self, weight: float = 1.0, temperature: float = 4.0, standardize: bool = False) -> None:
        super().__init__(weight)
        self.temperature = check_temperature("kd", temperature)
        self.standardize = bool(standardize)

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        return kd_loss(batch.student.logits, batch.teacher.logits, self.temperature, standardize=self.standardize)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}, standardize={self.standardize}"
