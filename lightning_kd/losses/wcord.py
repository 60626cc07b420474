"""Wasserstein contrastive representation distillation
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Chen, Wang, Gan, Liu, Henao, Carin, "Wasserstein Contrastive Representation Distillation", CVPR 2021
(arXiv:2012.08674).

WCoRD uses both forms of the Wasserstein distance between teacher and student representations:

- **global** (dual form): the Wasserstein dependency measure :math:`W(p(t, s), p(t)p(s))` between the joint and the
  product of marginals, estimated with a contrastive objective whose critic is kept 1-Lipschitz (Ozair et al.,
  "Wasserstein Dependency Measure for Representation Learning", NeurIPS 2019: InfoNCE with a Lipschitz critic).
  Here, on the CRD machinery (:mod:`~lightning_kd.losses.memory`: linear + L2 heads, two momentum memory banks,
  positives = the same sample, ``K`` negatives per anchor from the bank), with critic
  :math:`g(t, s) = \\langle e_T(t), e_S(s)\\rangle / \\tau`:

  .. math::

      L_{global} = -\\frac{1}{B}\\sum_i \\log\\frac{e^{\\langle m^T_i, s_i\\rangle/\\tau}}
      {\\sum_{j \\in \\{i\\}\\cup\\mathrm{neg}(i)} e^{\\langle m^T_j, s_i\\rangle/\\tau}}
      \\; + \\; (\\text{same, teacher anchor } t_i \\text{ against the student bank } m^S),

  and the Lipschitz constraint as a one-sided gradient penalty on the critic with respect to the tapped features,
  at the batch's positive pairs: :math:`L_{lip} = \\mathrm{mean}_i \\max(0, \\lVert\\nabla_{(f_T, f_S)}
  g(f_{T,i}, f_{S,i})\\rVert - 1)^2`, computed on detached copies of the features so that it constrains the
  critic (the heads) only;
- **local** (primal form): optimal transport between the batch's student and teacher embeddings (uniform weights
  :math:`1/B`) with cosine cost :math:`C_{ij} = 1 - \\langle s_i, t_j\\rangle`, solved with entropic (Sinkhorn)
  regularisation :math:`\\varepsilon` in the log domain: :math:`L_{local} = \\sum_{ij} \\pi^*_{ij} C_{ij}`. The plan
  :math:`\\pi^*` is computed without gradient; by the envelope theorem :math:`\\pi^*` is the exact gradient of the
  entropic OT value with respect to :math:`C`. Teacher embeddings enter the local term detached (only the student
  and its head are pulled towards the teacher's distribution, the teacher head is shaped by the global term).

``L = w_g L_global + w_l L_local + w_{lip} L_{lip}``; the term returns ``{"global", "local"}`` plus ``"lipschitz"``
when ``lipschitz_weight > 0``, each already weighted. The paper adds it to cross-entropy (and optionally KD).

The gradient penalty is off by default (``lipschitz_weight: 0``): with τ = 0.07 the critic varies by up to
:math:`2/\\tau \\approx 29` over the unit sphere, while timm ResNet penultimate features have norms of about 2 at
initialisation (resnet18/34, 32×32 inputs), so the critic's gradient norm is about 20 and the penalty about 360 —
it would dominate the loss, and the heads can only lower it by inflating their bias, i.e. by making the embeddings
less dependent on the features. Enable it (e.g. 0.01–0.1) to experiment with the Lipschitz constraint; by default
the global term is the InfoNCE bound on CRD's memory bank.

What could be confirmed, and what not: no code was released with the paper (Papers-with-Code lists none; no public
implementation was found), and only the abstract could be read here. The abstract confirms the structure: dual form
→ a global contrastive objective that maximises a lower bound of the mutual information between teacher and
student; primal form → local transfer within a mini-batch matching the teacher's and student's feature
distributions. **Not confirmed** (recalled from the paper or chosen here): the InfoNCE form of the global term with
CRD's memory bank, heads, ``K`` = 16384, τ = 0.07 and momentum 0.5; the Lipschitz constraint as a one-sided
gradient penalty on the heads (and that it is off by default); the cosine cost, Sinkhorn's ε = 0.05 and 100
iterations; detaching the teacher in the local term; the weights ``global_weight`` = 0.8 (CRD's β) and
``local_weight`` = 1. Treat these as this library's defaults, not the paper's.

Under DDP: the memory banks are updated with the embeddings of all ranks (all-gathered, no gradient; see
:mod:`~lightning_kd.losses.memory`); the InfoNCE, the gradient penalty and the optimal transport are computed per rank
on the rank's local batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_kd.losses.base import check_number, register_loss
from lightning_kd.losses.memory import Embed, MemoryBankTerm
from lightning_kd.losses.sinkd import sinkhorn_plan


def infonce_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over anchors of ``−log softmax(logits)[:, 0]`` (column 0 = positive), ``logits [B, K+1]``."""
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def bank_logits(anchor: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """``⟨rows[i, j], anchor[i]⟩ / τ``: ``anchor [B, d]``, ``rows [B, K+1, d]`` → ``[B, K+1]``."""
    return torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2) / temperature


@torch.no_grad()
def coupling(cost: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Entropic optimal-transport coupling of the square ``cost [B, B]`` between uniform weights ``1/B``: minimises
    ``⟨π, C⟩ − ε H(π)``. It is SinKD's Sinkhorn plan (:func:`lightning_kd.losses.sinkd.sinkhorn_plan`, rows and columns
    of mass 1) divided by ``B``; no gradient."""
    return sinkhorn_plan(cost, epsilon, iterations) / cost.shape[0]


def ot_loss(student: torch.Tensor, teacher: torch.Tensor, epsilon: float = 0.05, iterations: int = 100) -> torch.Tensor:
    """Local WCoRD term: ``Σ π*_ij (1 − cos(s_i, t_j))`` with the Sinkhorn plan ``π*`` held constant.

    ``student [B, d]``, ``teacher [B', d]`` (any norms; cosines are taken). The value is invariant to permuting either
    batch: it compares the two empirical distributions, not sample pairs.
    """
    cost = 1.0 - F.normalize(student.float(), dim=1) @ F.normalize(teacher.float(), dim=1).t()
    return (coupling(cost.detach(), epsilon, iterations) * cost).sum()


def critic_gradient_penalty(
    embed_s: Embed, embed_t: Embed, f_s: torch.Tensor, f_t: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``mean_i max(0, ‖∇_(f_t, f_s) g(f_t,i, f_s,i)‖ − 1)²`` for the critic ``g = ⟨e_t(f_t), e_s(f_s)⟩ / τ``.

    The gradient is taken at detached copies of the features, so the penalty trains the heads only.
    """
    f_s = f_s.detach().float().requires_grad_(True)
    f_t = f_t.detach().float().requires_grad_(True)
    with torch.enable_grad():
        critic = (embed_s(f_s) * embed_t(f_t)).sum(dim=1) / temperature
        g_s, g_t = torch.autograd.grad(critic.sum(), (f_s, f_t), create_graph=True)
    norm = torch.sqrt(g_s.flatten(1).pow(2).sum(1) + g_t.flatten(1).pow(2).sum(1) + 1e-12)
    return F.relu(norm - 1.0).pow(2).mean()


@register_loss("wcord")
class WCoRDLoss(MemoryBankTerm):
    """WCoRD: global contrastive term with a Lipschitz critic and memory-bank negatives + local batch OT.

    Args:
        weight: weight of the whole term.
        global_weight: weight of the global (dual-form, contrastive) part.
        local_weight: weight of the local (primal-form, Sinkhorn OT) part.
        lipschitz_weight: weight of the critic's one-sided gradient penalty (default 0: off, see the module notes).
        feat_dim: width of the contrast embeddings.
        nce_k: negatives per anchor (capped at ``N − 1``).
        nce_t: temperature τ of the critic.
        nce_m: momentum of the memory-bank update.
        negatives: ``"other_class"`` (needs integer targets) or ``"instance"``.
        sinkhorn_eps: entropic regularisation ε of the local OT (cost in [0, 2]).
        sinkhorn_iters: Sinkhorn iterations.
        student_layer: student tap (default: penultimate embedding; flattened).
        teacher_layer: teacher tap (default: penultimate embedding; flattened).

    The batches must carry each sample's dataset index and the training-set size must be known at setup.
    """

    def __init__(
        self,
        weight: float = 1.0,
        global_weight: float = 0.8,
        local_weight: float = 1.0,
        lipschitz_weight: float = 0.0,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
        negatives: str = "other_class",
        sinkhorn_eps: float = 0.05,
        sinkhorn_iters: int = 100,
        student_layer: str = "embedding",
        teacher_layer: str = "embedding",
    ) -> None:
        super().__init__(weight, feat_dim, nce_k, nce_t, nce_m, negatives, student_layer, teacher_layer)
        for name, value in (
            ("global_weight", global_weight),
            ("local_weight", local_weight),
            ("lipschitz_weight", lipschitz_weight),
        ):
            check_number("wcord", name, value)
        if not (isinstance(sinkhorn_iters, int) and sinkhorn_iters >= 1):
            raise ValueError(f"wcord: sinkhorn_iters must be an integer >= 1, got {sinkhorn_iters!r}")
        check_number("wcord", "sinkhorn_eps", sinkhorn_eps, positive=True)
        self.global_weight = float(global_weight)
        self.local_weight = float(local_weight)
        self.lipschitz_weight = float(lipschitz_weight)
        self.sinkhorn_eps = float(sinkhorn_eps)
        self.sinkhorn_iters = sinkhorn_iters

    def contrast_parts(self, f_s, f_t, s, t, w_s, w_t) -> dict[str, torch.Tensor]:
        """Global InfoNCE in both directions, local batch OT and (optionally) the critic's gradient penalty."""
        if f_s.shape[0] < 2:
            raise ValueError("wcord needs at least 2 samples per batch (the local term matches batch distributions)")
        student_anchor = infonce_loss(bank_logits(s, w_t, self.nce_t))
        teacher_anchor = infonce_loss(bank_logits(t, w_s, self.nce_t))
        parts = {
            "global": self.global_weight * (student_anchor + teacher_anchor),
            "local": self.local_weight * ot_loss(s, t.detach(), self.sinkhorn_eps, self.sinkhorn_iters),
        }
        if self.lipschitz_weight:
            if torch.is_grad_enabled():
                penalty = critic_gradient_penalty(self.embed_s, self.embed_t, f_s, f_t, self.nce_t)
            else:  # evaluation without autograd: nothing to constrain
                penalty = s.new_zeros(())
            parts["lipschitz"] = self.lipschitz_weight * penalty
        return parts

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, global_weight={self.global_weight}, local_weight={self.local_weight}, "
            f"lipschitz_weight={self.lipschitz_weight}, sinkhorn_eps={self.sinkhorn_eps}, "
            f"sinkhorn_iters={self.sinkhorn_iters}"
        )
