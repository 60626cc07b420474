"""Token-level relationship graph (TRG)
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Zhang, Liu, He, "Knowledge Distillation via Token-level Relationship Graph", arXiv:2306.12442 (2023).

The nodes of the graph are *tokens*: the patch tokens of a ViT (``[B, N, D]``, class/distillation/register tokens
dropped) or the positions of a CNN feature map ``[B, C, H, W]`` (optionally grouped into non-overlapping
``patch_size × patch_size`` patches, each flattened to a ``C·p²`` vector). ``tokens_per_image`` tokens are sampled at
random from every image — the same positions for student and teacher, so that node :math:`i` of both graphs is the
same image region — and the :math:`n = B\\cdot M` sampled tokens of the batch form one graph. Three losses:

- **local preserving** (:math:`L_{local}`, weight β): a k-NN graph with Gaussian edge weights
  :math:`A_{ij} = \\exp(-\\lVert T_i - T_j\\rVert^2 / 2\\sigma)` for :math:`j \\in \\mathrm{kNN}(i)`, 0 otherwise;
  each node's edge weights are turned into a distribution over its neighbours,
  :math:`P_{i\\cdot} = \\mathrm{softmax}_{j \\in \\mathrm{kNN}(i)}(A_{ij})`, and
  :math:`L_{local} = \\frac{1}{n}\\sum_i \\mathrm{KL}(P^T_{i\\cdot} \\,\\Vert\\, P^S_{i\\cdot})`.
  No connector: each model's graph lives in its own feature space (widths may differ).
- **global topology** (:math:`L_{global}`, weight γ): InfoNCE over the nodes, the positive of student token
  :math:`i` being teacher token :math:`i` and the negatives every other sampled teacher token,
  :math:`L_{global} = -\\frac{1}{n}\\sum_i \\log \\frac{\\exp(\\cos(W T^S_i, T^T_i)/\\tau_g)}
  {\\sum_j \\exp(\\cos(W T^S_i, T^T_j)/\\tau_g)}`, with :math:`W` a learned linear connector to the teacher's width
  and a *dynamic temperature* :math:`\\tau_g` that decreases during training (coarse structure first, hard
  negatives later).
- **contextual** (:math:`L_{inner}`, weight α): inside each image, the token-similarity matrix
  :math:`CS = \\mathrm{softmax}(F F^\\top / \\sqrt{D})` (rows, over the image's sampled tokens) of the student is
  matched to the teacher's by mean squared error, :math:`L_{inner} = \\mathrm{MSE}(CS^S, CS^T)`.

The term returns ``{"context": α·L_inner, "local": β·L_local, "global": γ·L_global}`` (zero-weight parts are left
out); the paper's total is :math:`L_{CE} + \\lambda L_{KD} + \\alpha L_{inner} + \\beta L_{local} +
\\gamma L_{global}` — add a ``kd`` term for the vanilla-KD part.

**What could and could not be verified.** No code from the authors could be found (searched GitHub by title,
arXiv id, authors and method names), and only the abstract of the paper was available to us, not its method section.
The formulas above follow a secondary, equation-level summary of the paper (losses :math:`L_{local}` = KL between
softmax-normalised k-NN Gaussian adjacencies, :math:`L_{global}` = InfoNCE with a linear projection, same-position
positives and a dynamic :math:`\\tau_g`, :math:`L_{inner}` = MSE of :math:`\\mathrm{softmax}(FF^\\top/\\sqrt D)`;
random per-image token sampling; CNN tokens = fixed-size patches of the penultimate-layer feature map). The local
loss has the form (our inference, not a statement of the paper we could read) of the *local structure preserving*
(LSP) loss of Yang et al., "Distilling Knowledge from Graph Convolutional Networks", CVPR 2020, whose code
(ihollywhy/DistillGCN.PyTorch, ``local_structure.py`` ``get_graph_local_structure`` and ``auxilary_loss.py``
``graph_KLDiv``) we checked for the conventions below; LSP's kernel is ``exp(-‖z_i − z_j‖₁ / 100)``, TRG's (and
ours) the Gaussian of the squared Euclidean distance. **Unconfirmed choices** (our reading; change them through the
arguments where possible):

- the softmax runs over each node's k neighbours only (LSP's ``edge_softmax``), not over all nodes with zeros for
  non-neighbours; self-loops are excluded;
- the k-NN neighbourhoods are those of the **teacher** graph and are shared by the student graph (LSP uses one graph
  for both models), so the student is asked to reproduce the teacher's edge weights on the teacher's neighbours;
- KL direction :math:`\\mathrm{KL}(P^T\\Vert P^S)` as in LSP's code (``graph_KLDiv`` weights by the teacher; LSP's
  paper writes :math:`D_{KL}(S^s\\Vert S^t)`); reductions are means over nodes (not sums) so the scale does not grow
  with the batch;
- ``normalize=True`` L2-normalises the tokens before the Gaussian kernel, so that
  :math:`\\lVert T_i - T_j\\rVert^2 = 2 - 2\\cos(T_i, T_j)` (the graph is a function of cosine similarities and
  insensitive to the overall feature scale). With raw features of a few hundred dimensions the
  kernel :math:`\\exp(-d^2/2\\sigma)` underflows to 0 for every edge unless σ is tuned per layer; ``normalize=False``
  gives the raw Euclidean kernel;
- the connector :math:`W` only feeds the global loss; the contextual loss uses each model's raw tokens with its own
  :math:`D`; all three losses use the same sampled tokens (the paper may compute the contextual loss on all tokens of
  an image: ``tokens_per_image: null`` does that);
- the temperature schedule is linear from ``temperature_start`` (step 0) to ``temperature_end`` (last step); when the
  number of steps is unknown it is ``temperature_end``;
- the defaults (k = 8, σ = 1, 16 tokens per image, τ 0.5 → 0.1, α = β = γ = 1) are our choices, not the paper's
  values, which we could not read. Scale: a softmax of edge weights in (0, 1] is flat, so :math:`L_{local}` is small
  by construction (≈ 1e-3 between a random timm resnet18 and resnet34; bounded by the unit range of the logits), as
  is :math:`L_{inner}` at initialisation, while :math:`L_{global}` is of order :math:`\\log n` (3–6): with unit
  weights the InfoNCE dominates the gradient; raise ``local_weight`` / ``context_weight`` to give the graph and the
  context more say.

Sampling: the positions come from a CPU ``torch.Generator`` seeded with ``(seed, step)``, so a run is reproducible
and the student and teacher always see the same tokens; the memory of the graph is :math:`O(n^2)` with
:math:`n = B\\cdot\\min(N, M)`. When an image has at most ``tokens_per_image`` tokens, all are used (no sampling).

Under DDP every rank builds its graph from its own local batch (nothing is gathered; the loss depends on the per-rank
batch size, and with ``seed`` fixed the ranks sample the same positions in their different images).

Defaults: the last feature stage of both models (``stage:-1``: ``layer4`` of a ResNet, the map before global pooling;
the last block of a timm ViT). At 32×32 input a timm ResNet's ``layer4`` is 1×1: one token per image, so the graph is
instance-level and the contextual loss is constantly zero (:meth:`TRGLoss.setup` warns); use ``stage:-2`` or larger
images for token-level relations.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from lightning_kd.losses.base import (
    DistillBatch,
    LossTerm,
    SetupContext,
    check_number,
    check_temperature,
    register_loss,
)
from lightning_kd.losses.connectors import make_connector
from lightning_kd.taps import TapSpec


# --------------------------------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------------------------------
def to_tokens(x: torch.Tensor, patch_size: int = 1, prefix: int = 0) -> torch.Tensor:
    """Tokens ``[B, N, D]`` of a feature map ``[B, C, H, W]`` (non-overlapping ``p×p`` patches, row-major, each
    flattened to ``C·p²`` values) or of a token sequence ``[B, N', D]`` (its first ``prefix`` tokens dropped)."""
    if x.dim() == 4:
        if patch_size == 1:
            return x.flatten(2).transpose(1, 2)
        return F.unfold(x, kernel_size=patch_size, stride=patch_size).transpose(1, 2)
    if x.dim() == 3:
        if patch_size != 1:
            raise ValueError(f"patch_size {patch_size} applies to feature maps [B, C, H, W], not to tokens {x.shape}")
        return x[:, prefix:]
    raise ValueError(f"tokens need a feature map [B, C, H, W] or a token sequence [B, N, D], got {tuple(x.shape)}")


def num_prefix_tokens(model: torch.nn.Module) -> int:
    """timm's ``num_prefix_tokens`` (class + distillation + register tokens) of ``model`` or of its first submodule
    that has one (a ViT wrapped in a LightningModule), else 0."""
    for module in model.modules():
        value = getattr(module, "num_prefix_tokens", None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def sample_token_indices(
    batch: int, num_tokens: int, per_image: int | None, generator: torch.Generator
) -> torch.Tensor:
    """``[B, M]`` positions: ``M = min(per_image, N)`` distinct random positions per image (drawn with ``generator``,
    independently per image), or all positions in order when ``per_image`` is ``None`` or ``≥ N``."""
    if per_image is None or per_image >= num_tokens:
        return torch.arange(num_tokens).expand(batch, num_tokens)
    return torch.rand(batch, num_tokens, generator=generator).argsort(dim=1)[:, :per_image]


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tokens[b, index[b]]`` for every image: ``[B, N, D]``, ``[B, M]`` → ``[B, M, D]``."""
    return tokens.gather(1, index.to(tokens.device).unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


# --------------------------------------------------------------------------------------------------------------------
# The three losses (float32, on nodes [n, D] or per-image tokens [B, M, D])
# --------------------------------------------------------------------------------------------------------------------
def knn_indices(z: torch.Tensor, k: int) -> torch.Tensor:
    """``[n, k]`` indices of the ``k`` nearest other nodes of each node (squared Euclidean distance, self excluded)."""
    sq = z.pow(2).sum(1)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * z @ z.t()).clamp(min=0)
    d2.fill_diagonal_(float("inf"))
    return d2.topk(k, dim=1, largest=False).indices


def neighbour_log_probs(z: torch.Tensor, neighbours: torch.Tensor, sigma: float) -> torch.Tensor:
    """``log softmax_{j ∈ N(i)} exp(-‖z_i − z_j‖² / 2σ)`` for the ``[n, k]`` neighbour lists (exact differences)."""
    d2 = (z[neighbours] - z.unsqueeze(1)).pow(2).sum(-1)
    return torch.exp(-d2 / (2.0 * sigma)).log_softmax(dim=1)


def local_preserving_loss(
    z_s: torch.Tensor, z_t: torch.Tensor, k: int = 8, sigma: float = 1.0, normalize: bool = True
) -> torch.Tensor:
    """Mean over nodes of ``KL(P_T ‖ P_S)`` between the neighbour distributions of the Gaussian k-NN graphs of the
    nodes ``z_s: [n, Ds]`` and ``z_t: [n, Dt]``; the neighbourhoods are the teacher's (``k`` is capped at ``n − 1``)."""
    z_s, z_t = z_s.float(), z_t.float()
    if normalize:
        z_s, z_t = F.normalize(z_s, dim=1), F.normalize(z_t, dim=1)
    with torch.no_grad():
        z_t = z_t.detach()
        neighbours = knn_indices(z_t, min(k, len(z_t) - 1))
        log_p_t = neighbour_log_probs(z_t, neighbours, sigma)
    log_p_s = neighbour_log_probs(z_s, neighbours, sigma)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()


def token_infonce_loss(u: torch.Tensor, v: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of the nodes: student node ``i`` (``u: [n, D]``) against all teacher nodes (``v: [n, D]``), the
    positive being teacher node ``i``; cosine similarities over ``temperature``; mean over nodes."""
    logits = F.normalize(u.float(), dim=1) @ F.normalize(v.float().detach(), dim=1).t() / temperature
    return F.cross_entropy(logits, torch.arange(len(u), device=u.device))


def contextual_similarity(f: torch.Tensor) -> torch.Tensor:
    """``softmax(F Fᵀ / √D)`` over the rows, per image: ``[B, M, D]`` → ``[B, M, M]``."""
    f = f.float()
    return (f @ f.transpose(1, 2) / math.sqrt(f.shape[-1])).softmax(dim=-1)


def contextual_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """MSE between the per-image token-similarity matrices of student ``[B, M, Ds]`` and teacher ``[B, M, Dt]``."""
    with torch.no_grad():
        cs_t = contextual_similarity(f_t.detach())
    return F.mse_loss(contextual_similarity(f_s), cs_t)


def linear_temperature(start: float, end: float, step: int, max_steps: int) -> float:
    """``start`` at step 0, ``end`` at ``max_steps`` (linear; ``end`` when ``max_steps`` is unknown, ≤ 0)."""
    if max_steps <= 0:
        return end
    frac = min(max(step / max_steps, 0.0), 1.0)
    return start + (end - start) * frac


# --------------------------------------------------------------------------------------------------------------------
# The term
# --------------------------------------------------------------------------------------------------------------------
@register_loss("trg")
class TRGLoss(LossTerm):
    """TRG: contextual + local-preserving + global-topology losses on a graph of sampled tokens.

    Args:
        weight: weight of the whole term.
        student_layer: student tap: a feature map ``[B, C, H, W]`` or a token sequence ``[B, N, D]``.
        teacher_layer: teacher tap, same kinds; after patching / dropping prefix tokens both must have the same number
            of tokens per image (same resolution).
        context_weight: α, weight of the contextual (inner-instance) loss.
        local_weight: β, weight of the local-preserving (k-NN graph KL) loss.
        global_weight: γ, weight of the global (token InfoNCE) loss.
        k: neighbours per node in the k-NN graph (capped at ``n − 1`` for small batches).
        sigma: bandwidth σ of the Gaussian edge weight ``exp(−‖T_i − T_j‖² / 2σ)``.
        normalize: L2-normalise the tokens before the Gaussian kernel (``‖T_i − T_j‖² = 2 − 2 cos``).
        temperature_start: τ_g of the global loss at the first step.
        temperature_end: τ_g at the last step (linear schedule; used throughout when the step count is unknown).
        tokens_per_image: tokens sampled per image (``null``: all tokens).
        patch_size: for feature maps, group ``p×p`` positions into one token (H and W must be divisible by ``p``).
        drop_prefix_tokens: for token sequences, drop the model's ``num_prefix_tokens`` leading tokens (class,
            distillation, register tokens of timm ViTs) so that the nodes are patch tokens.
        connector: ``auto`` | ``linear`` | ``none``: the student-to-teacher projection of the global loss.
        seed: seed of the token sampling (combined with the step).

    ``forward`` returns ``{"context", "local", "global"}`` (logged as ``train/trg/<part>``), already weighted by α, β,
    γ; parts with weight 0 are left out.
    """

    def __init__(
        self,
        weight: float = 1.0,
        student_layer: str = "stage:-1",
        teacher_layer: str = "stage:-1",
        context_weight: float = 1.0,
        local_weight: float = 1.0,
        global_weight: float = 1.0,
        k: int = 8,
        sigma: float = 1.0,
        normalize: bool = True,
        temperature_start: float = 0.5,
        temperature_end: float = 0.1,
        tokens_per_image: int | None = 16,
        patch_size: int = 1,
        drop_prefix_tokens: bool = True,
        connector: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__(weight)
        self.student_tap = TapSpec.parse(student_layer)
        self.teacher_tap = TapSpec.parse(teacher_layer)
        self.student_taps = [self.student_tap]
        self.teacher_taps = [self.teacher_tap]
        for name, value in (
            ("context_weight", context_weight),
            ("local_weight", local_weight),
            ("global_weight", global_weight),
        ):
            check_number("trg", name, value)
        self.context_weight, self.local_weight, self.global_weight = (
            float(context_weight),
            float(local_weight),
            float(global_weight),
        )
        for name, value in (("k", k), ("patch_size", patch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"trg: {name} must be an integer >= 1, got {value!r}")
        if tokens_per_image is not None and (
            isinstance(tokens_per_image, bool) or not isinstance(tokens_per_image, int) or tokens_per_image < 1
        ):
            raise ValueError(
                f"trg: tokens_per_image must be an integer >= 1 or null (all tokens), got {tokens_per_image!r}"
            )
        check_number("trg", "sigma", sigma, positive=True)
        self.k, self.patch_size, self.tokens_per_image = k, patch_size, tokens_per_image
        self.sigma = float(sigma)
        self.normalize = bool(normalize)
        self.temperature_start = check_temperature("trg (temperature_start)", temperature_start)
        self.temperature_end = check_temperature("trg (temperature_end)", temperature_end)
        self.drop_prefix_tokens = bool(drop_prefix_tokens)
        if connector not in ("auto", "linear", "none"):
            raise ValueError(
                f"trg: connector must be 'auto', 'linear' or 'none' (tokens are vectors), got {connector!r}"
            )
        self.connector_kind = connector
        self.seed = int(seed)
        self.connector: torch.nn.Module | None = None
        self._prefix = {"student": 0, "teacher": 0}

    # -- shapes ------------------------------------------------------------------------------------------------------
    def _token_shape(self, side: str, tap: TapSpec, shape: tuple[int, ...]) -> tuple[int, int]:
        """``(N, D)`` of the tokens of one side, or a ``ValueError`` naming the tap, its shape and the fix."""
        where = f"trg: {side} tap '{tap}' {shape}"
        if len(shape) == 4:
            c, h, w = shape[1:]
            p = self.patch_size
            if h % p or w % p:
                raise ValueError(
                    f"{where}: its {h}×{w} map is not divisible into {p}×{p} patches; set patch_size to a divisor of "
                    "H and W (1: one token per position)"
                )
            return (h // p) * (w // p), c * p * p
        if len(shape) == 3:
            if self.patch_size != 1:
                raise ValueError(
                    f"{where} is a token sequence; patch_size={self.patch_size} only applies to feature maps "
                    "[B, C, H, W]: set patch_size: 1"
                )
            n = shape[1] - self._prefix[side]
            if n < 1:
                raise ValueError(f"{where} has no tokens left after dropping {self._prefix[side]} prefix tokens")
            return n, shape[2]
        raise ValueError(
            f"{where}: TRG needs a feature map [B, C, H, W] (tokens = positions) or a token sequence [B, N, D]; "
            "pick a convolutional stage or a transformer block, not an embedding"
        )

    def setup(self, ctx: SetupContext) -> None:
        for side, model in (("student", ctx.student_model), ("teacher", ctx.teacher_model)):
            self._prefix[side] = num_prefix_tokens(model) if self.drop_prefix_tokens else 0
        s_shape, t_shape = tuple(ctx.student[self.student_tap].shape), tuple(ctx.teacher[self.teacher_tap].shape)
        n_s, d_s = self._token_shape("student", self.student_tap, s_shape)
        n_t, d_t = self._token_shape("teacher", self.teacher_tap, t_shape)
        if n_s != n_t:
            raise ValueError(
                f"trg: student tap '{self.student_tap}' {s_shape} gives {n_s} tokens per image and teacher tap "
                f"'{self.teacher_tap}' {t_shape} gives {n_t} (after patch_size={self.patch_size} and dropping "
                f"{self._prefix['student']}/{self._prefix['teacher']} prefix tokens); node i must be the same image "
                "region in both graphs: pick layers of equal resolution (e.g. a ViT's patch grid equal to the CNN "
                "stage's H×W) or change patch_size"
            )
        if min(n_s, self.tokens_per_image or n_s) == 1:
            warnings.warn(
                f"trg: student '{self.student_tap}' {s_shape} / teacher '{self.teacher_tap}' {t_shape} give one token "
                "per image: the graph is instance-level and the contextual loss is constantly zero. Pick an earlier "
                "stage (e.g. stage:-2) or larger inputs for token-level relations",
                stacklevel=2,
            )
        if self.connector is None:  # not yet built (a restored term keeps its own)
            self.connector = make_connector(
                (n_s, d_s), (n_t, d_t), self.connector_kind, where=f"trg ({self.student_tap} -> {self.teacher_tap})"
            )

    # -- forward -----------------------------------------------------------------------------------------------------
    def temperature(self, step: int, max_steps: int) -> float:
        """τ_g at ``step`` of ``max_steps`` (linear from ``temperature_start`` to ``temperature_end``)."""
        return linear_temperature(self.temperature_start, self.temperature_end, step, max_steps)

    def sample(self, batch: int, num_tokens: int, step: int) -> torch.Tensor:
        """The ``[B, M]`` token positions of this step (seeded by ``seed`` and ``step``)."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + int(step)) % (2**63))
        return sample_token_indices(batch, num_tokens, self.tokens_per_image, generator)

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        if self.connector is None:
            raise RuntimeError("trg: setup() was not called, so the connector does not exist yet")
        s = to_tokens(batch.student[self.student_tap], self.patch_size, self._prefix["student"])
        t = to_tokens(batch.teacher[self.teacher_tap], self.patch_size, self._prefix["teacher"])
        if s.shape[:2] != t.shape[:2]:
            raise ValueError(
                f"trg: student tokens {tuple(s.shape)} and teacher tokens {tuple(t.shape)} differ in batch size or "
                "tokens per image; the input resolution must give both taps the same token grid"
            )
        index = self.sample(s.shape[0], s.shape[1], batch.step)
        s, t = gather_tokens(s, index).float(), gather_tokens(t, index).float()
        b, m = s.shape[:2]
        if b * m < 2:
            raise ValueError(f"trg needs at least 2 tokens in the batch to build a graph, got {b}×{m}")
        parts: dict[str, torch.Tensor] = {}
        if self.context_weight:
            parts["context"] = self.context_weight * contextual_loss(s, t)
        s_nodes, t_nodes = s.flatten(0, 1), t.flatten(0, 1)
        if self.local_weight:
            parts["local"] = self.local_weight * local_preserving_loss(
                s_nodes, t_nodes, self.k, self.sigma, self.normalize
            )
        if self.global_weight:
            tau = self.temperature(batch.step, batch.max_steps)
            parts["global"] = self.global_weight * token_infonce_loss(self.connector(s_nodes).float(), t_nodes, tau)
        return parts

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, student={self.student_tap}, teacher={self.teacher_tap}, "
            f"alpha={self.context_weight}, beta={self.local_weight}, gamma={self.global_weight}, k={self.k}, "
            f"sigma={self.sigma}, tau={self.temperature_start}->{self.temperature_end}, "
            f"tokens_per_image={self.tokens_per_image}"
        )
