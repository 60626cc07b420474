"""Learned router over several teachers (MST-Distill's distillation stage)
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Li, Yang, Chen, Dong, Chen, Wang, "MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge Distillation", ACM Multimedia 2025
(arXiv:2507.07015). Only the third stage of the method is implemented here (routed distillation from a group of
teachers); its co-training and MaskNet stages are not.

A GateNet (two linear layers ``C → hidden → M``, ``hidden = 2C``) reads the student's logits and gives softmax gates
:math:`g(x) \\in \\Delta^M` over the :math:`M` members of a
:class:`~lightning_kd.strategies.multi_teacher.TeacherEnsemble`. Each sample is routed to its top-:math:`k` teachers
:math:`\\mathcal{K}(x)` (routing weights :math:`r_m(x) = 1/k` on them, 0 elsewhere):

.. math::

    L_{kd} = \\frac{1}{k} \\sum_{j=1}^{k} \\frac{1}{B} \\sum_x \\tau^2\\,
        \\mathrm{KL}\\big(\\mathrm{softmax}(z_{\\mathcal{K}_j(x)}/\\tau) \\,\\|\\, \\mathrm{softmax}(z_S/\\tau)\\big),
    \\qquad
    L_{balance} = \\frac{1}{M}\\, \\mathrm{KL}\\big(u \\,\\|\\, \\bar g\\big)
        = \\frac{1}{M} \\sum_m \\frac{1}{M} \\log\\frac{1/M}{\\bar g_m},\\quad \\bar g = \\frac{1}{B}\\sum_x g(x)

The term returns ``{"kd": L_kd, "balance": balance_weight · L_balance}`` (logged as ``train/router/kd`` and
``train/router/balance``); its ``diagnostics`` hold, per teacher, the fraction of samples routed to it
(``routed/<member>``). The GateNet is built in :meth:`RouterKD.setup` from the class count and the ensemble's member
names, so it is trained with the student and saved in checkpoints.

**Checked against the authors' code** (``Gray-OREO/MST-Distill``: ``KD_methods/MST.py`` — ``GateNet``,
``k_ways_MTGdistillation_detached``, ``load_balancing_loss``, ``weighted_MTGdistillation_detached`` — and
``main-MST-Distill.py``, stage 3):

- ``GateNet`` = ``Linear(C, 2C)`` then ``Linear(2C, M)`` with **no activation** between them (kept as is);
- the GateNet reads the student's outputs **without detaching** them (``gate_logits = GateNet(outputs_s)``), so the
  balance term also reaches the student; ``detach_input=True`` is offered as an option;
- the top-:math:`k` indices come from ``torch.topk`` of the gates and the KD term is the unweighted mean over the
  :math:`k` routed teachers (teachers detached, τ = 4): **the router gets its gradient only from the balance term**
  (the choice is not differentiable, and the gate values do not weight the KD term). This is mirrored;
  ``mode="weighted"`` is the authors' soft variant (KD to the gate-weighted sum of the teachers' logits, through
  which the gates also get a KD gradient; defined in ``MST.py`` but not used by their main script);
- the balance term is ``nn.KLDivLoss(reduction="batchmean")(log(mean gate), uniform)``, i.e. KL(uniform ‖ mean gate)
  divided by :math:`M` (``batchmean`` over a 1-D tensor divides by its length). The method notes wrote KL(mean gate ‖
  uniform); the code's direction and scale are used here;
- defaults: ``k = 1``, ``w_kl = w_lb = 1`` (``weight = balance_weight = 1`` here). The authors also decay
  ``w_lb`` by 0.9 every 10 epochs and ``w_kl`` by 0.5 every 30; no schedule is applied here.

DDP: the mean gate is over the local batch (per rank), as in the authors' single-process code.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_kd.losses.base import (
    DistillBatch,
    LossTerm,
    SetupContext,
    check_number,
    check_temperature,
    register_loss,
)
from lightning_kd.losses.classroom import member_logits
from lightning_kd.losses.kd import kd_loss

MODES = ("topk", "weighted")


class GateNet(nn.Sequential):
    """The router: ``Linear(num_classes, hidden)`` then ``Linear(hidden, num_teachers)`` (no activation, as in the
    authors' ``GateNet``); outputs gate logits."""

    def __init__(self, num_classes: int, num_teachers: int, hidden: int | None = None) -> None:
        hidden = hidden or 2 * num_classes
        super().__init__(nn.Linear(num_classes, hidden), nn.Linear(hidden, num_teachers))


def top_k_routes(gates: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices [B, k], routing weights [B, M])`` of the top-``k`` gates per sample: weight ``1/k`` on each chosen
    teacher and 0 elsewhere (each row sums to 1 with exactly ``k`` non-zeros). No gradient."""
    indices = gates.detach().topk(k, dim=-1).indices
    routes = torch.zeros_like(gates, dtype=torch.float32).scatter(-1, indices, 1.0 / k)
    return indices, routes


def load_balance_loss(gates: torch.Tensor) -> torch.Tensor:
    """``KL(uniform ‖ mean gate) / M`` over the batch's mean gate (the authors' ``load_balancing_loss``, mode KL)."""
    mean_gate = gates.float().mean(0)
    m = mean_gate.numel()
    return (torch.log(torch.tensor(1.0 / m, device=gates.device)) - torch.log(mean_gate)).sum() / m**2


@register_loss("router")
class RouterKD(LossTerm):
    """KD from the top-``k`` teachers that a GateNet on the student's logits picks per sample, plus a load-balancing
    term (MST-Distill's routed distillation).

    Args:
        weight: weight of the term (the authors' ``w_kl``; it also scales the balance part).
        top_k: teachers per sample (``k``, at most the number of ensemble members).
        temperature: softmax temperature τ of the KD part (> 0).
        balance_weight: weight of the load-balancing part relative to the KD part (the authors' ``w_lb``).
        mode: ``"topk"`` (the authors' main script) or ``"weighted"`` (KD to ``Σ_m g_m z_m``, their soft variant).
        detach_input: feed the GateNet the student's logits detached (the authors do not detach them).
        hidden: width of the GateNet's hidden layer (default ``2 · num_classes``).

    Example::

        >>> term = RouterKD(top_k=1, temperature=4.0)
        >>> term.top_k, term.mode
        (1, 'topk')
    """

    def __init__(
        self,
        weight: float = 1.0,
        top_k: int = 1,
        temperature: float = 4.0,
        balance_weight: float = 1.0,
        mode: str = "topk",
        detach_input: bool = False,
        hidden: int | None = None,
    ) -> None:
        super().__init__(weight)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ValueError(f"router: top_k must be an integer >= 1, got {top_k!r}")
        if mode not in MODES:
            raise ValueError(f"router: mode must be one of {MODES}, got {mode!r}")
        if hidden is not None and (not isinstance(hidden, int) or hidden < 1):
            raise ValueError(f"router: hidden must be a positive integer or null, got {hidden!r}")
        self.top_k = top_k
        self.temperature = check_temperature("router", temperature)
        self.balance_weight = check_number("router", "balance_weight", balance_weight)
        self.mode = mode
        self.detach_input = bool(detach_input)
        self.hidden = hidden
        self.gate: GateNet | None = None
        self.members: list[str] = []
        #: values logged next to the loss (not part of it): ``routed/<member>``.

    def setup(self, ctx: SetupContext) -> None:
        self.members = list(member_logits(ctx.teacher))
        if self.top_k > len(self.members):
            raise ValueError(
                f"router: top_k={self.top_k} but the teacher has {len(self.members)} member(s) "
                f"({', '.join(self.members)}); use a TeacherEnsemble with at least top_k members or lower top_k"
            )
        self.gate = GateNet(ctx.num_classes, len(self.members), self.hidden)

    def gates(self, student_logits: torch.Tensor) -> torch.Tensor:
        """Softmax gates ``[B, M]`` (float32) for the student's logits."""
        if self.gate is None:
            raise RuntimeError("router: setup() must run before the first step (it builds the GateNet)")
        z = student_logits.detach() if self.detach_input else student_logits
        return torch.softmax(self.gate(z.to(self.gate[0].weight.dtype)).float(), dim=-1)

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        members = member_logits(batch.teacher, self.members, "router")
        z_s = batch.student.logits
        gates = self.gates(z_s)
        stacked = torch.stack(list(members.values()), dim=1).float()  # [B, M, C]
        if self.mode == "topk":
            indices, routes = top_k_routes(gates, self.top_k)
            rows = torch.arange(len(z_s), device=z_s.device)
            kd = sum(kd_loss(z_s, stacked[rows, indices[:, j]], self.temperature) for j in range(self.top_k))
            kd = kd / self.top_k
            routed = (routes > 0).float().mean(0)
        else:
            kd = kd_loss(z_s, (gates.unsqueeze(-1) * stacked).sum(1), self.temperature)
            routed = gates.detach().mean(0)
        self.diagnostics = {f"routed/{name}": routed[m] for m, name in enumerate(self.members)}
        return {"kd": kd, "balance": self.balance_weight * load_balance_loss(gates)}

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, top_k={self.top_k}, temperature={self.temperature}, "
            f"balance_weight={self.balance_weight}, mode={self.mode!r}, detach_input={self.detach_input}"
        )


__all__ = ["GateNet", "RouterKD", "load_balance_loss", "top_k_routes"]
