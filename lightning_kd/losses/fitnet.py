"""FitNets hint loss with layer maps
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015 (arXiv:1412.6550), generalised to several student
layers with the layer-selection strategies compared by Yu, Wen & Mou, "Revisiting Intermediate-Layer Matching in
Knowledge Distillation: Layer-Selection Strategy Doesn't Matter (Much)", Findings of IJCNLP-AACL 2025
(arXiv:2502.04499).

With student taps :math:`s_0 … s_{L_S-1}` and teacher taps :math:`t_0 … t_{L_T-1}`, student layer :math:`i` is
matched to teacher layer :math:`m(i)` through a learned connector :math:`r_i` (1×1 convolution for maps, linear for
vectors; see :mod:`lightning_kd.losses.connectors`):

.. math::

    L = \\sum_{i=0}^{L_S-1} \\operatorname{mean}\\big( (r_i(f^S_{s_i}) - f^T_{t_{m(i)}})^2 \\big)

(each pair's MSE is the mean over the batch and every element; ``forward`` returns the pairs in a dict, summed by the
engine). The layer maps, 0-based:

- ``forward`` (uniform spread, last to last): :math:`m(i) = \\lceil (i+1) L_T / L_S \\rceil - 1`. With
  :math:`L_S = L_T` this is the identity (the lists are paired in order, like ``at``/``sp``).
- ``reverse``: the forward map read backwards, :math:`m(i) = m_{fwd}(L_S - 1 - i)`.
- ``random``: the forward map permuted, :math:`m(i) = m_{fwd}(\\pi(i))`, with :math:`\\pi` a permutation drawn from
  ``seed`` (the paper's "out-of-order random matching").
- ``all_to_one``: every student layer to the middle teacher layer, :math:`m(i) = \\lceil L_T / 2 \\rceil - 1`.
- an explicit list of teacher indices, one per student layer (e.g. ``[0, 0, 2]``).

For example :math:`L_S = 3, L_T = 4`: forward ``[1, 2, 3]``, reverse ``[3, 2, 1]``, all_to_one ``[1, 1, 1]``;
:math:`L_S = 4, L_T = 2`: forward ``[0, 0, 1, 1]``, reverse ``[1, 1, 0, 0]``, all_to_one ``[0, 0, 0, 0]``.

Sources (checked against the authors' released code, MANGA-UOFA/Layer-Selection, identical to zony249/fdistill-reverse):

- ``classification/trainer.py``: ``LAYER_MAP`` (student depth → teacher layer indices for the 12-layer BERT teacher:
  1: [11], 2: [5, 11], 3: [3, 7, 11], 4: [2, 5, 8, 11], 6: [1, 3, 5, 7, 9, 11], 9: [1, 2, 3, 5, 6, 7, 9, 10, 11])
  equals the forward formula above for every entry; reverse is ``LAYER_MAP[n][::-1]``; random matching is
  ``np.random.permutation(LAYER_MAP[n])``; all-to-one (``scripts/all-to-one/*.sh``: ``--match_all_layers --to 6``)
  matches every student layer to ``hidden_states[6]``, the output of teacher layer 6 of 12.
- ``llm/sft_trainer.py``: ``LAYER_SELECTION`` (every 4th teacher layer, again the forward formula),
  ``select_reverse_matching`` (reversed), ``select_shuffle_matching`` (a ``torch.randperm`` of the forward list) and
  ``select_all_one_matching`` (``hidden_states[L_T // 2]``: the output of teacher layer :math:`L_T/2`, 1-based, i.e.
  index :math:`L_T/2 - 1` here). For odd :math:`L_T` we take the exact middle :math:`\\lceil L_T/2 \\rceil - 1`
  (the authors' teachers all have an even depth, where both agree).

Deviations (all deliberate):

- **Connector and loss.** The authors match transformer hidden states of equal width with no projection (a bias-free
  linear adapter only in their width experiments), sum the squared error over the hidden dimension, average over the
  tokens and *average* over the matched layers (their LLM code also L2-normalises the hidden states first). We keep
  FitNets' (and the CRD benchmark's) connector and element-mean MSE per pair and *sum* over the pairs, like the other
  multi-layer terms; the two differ by constant factors (width, number of pairs) that the weight absorbs — divide the
  weight by :math:`L_S` to reproduce a layer average. Their classification code also matches the embedding-layer
  outputs (``hidden_states[0]``) of both models as an extra pair: list those taps yourself if you want them.
- **Resolution.** The paper works on transformers, where every layer has the same sequence length. CNN stages do
  not: with ``resize: true`` a pair of maps of different size is compared at the smaller size, the larger map being
  adaptive-average-pooled (the student inside its connector, the teacher in the loss; see
  :mod:`lightning_kd.losses.connectors`). Without it, a resolution mismatch is an error (FitNets' behaviour).
- **Random map.** Drawn once, at construction, from ``seed`` alone (a Fisher–Yates shuffle on Python's
  ``random.Random(seed).random()``, whose output sequence Python guarantees across versions): it does not depend on
  the global RNG, so it is identical on every DDP rank and on resume. It is also saved in the term's state
  (buffer ``layer_map_index``); loading a checkpoint made with a different map raises instead of silently pairing
  connectors with the wrong layers.

One stage, like the CRD benchmark code (the paper trains the hint in a separate first stage): the term is added to the
task loss. Defaults: one pair, ``stage:-2`` of both models (timm ``feature_info``; ``layer3`` of a ResNet), a plain
1×1 conv and weight 100 (the CRD benchmark's β for FitNets). Under DDP each rank computes its own batch's MSE (nothing
is gathered); DDP's gradient averaging makes that the MSE of the global batch for equal per-rank batch sizes.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.losses.base import DistillBatch, LayerPairs, LossTerm, SetupContext, register_loss
from lightning_kd.losses.connectors import CONNECTOR_KINDS, make_connector, pool_to

LAYER_MAPS = ("forward", "reverse", "random", "all_to_one")


# --------------------------------------------------------------------------------------------------------------------
# Layer maps (0-based teacher index for each student layer)
# --------------------------------------------------------------------------------------------------------------------
def forward_layer_map(num_student: int, num_teacher: int) -> list[int]:
    """Uniform spread, last to last: ``m(i) = ceil((i + 1) · L_T / L_S) − 1`` (exact integer arithmetic)."""
    return [((i + 1) * num_teacher + num_student - 1) // num_student - 1 for i in range(num_student)]


def reverse_layer_map(num_student: int, num_teacher: int) -> list[int]:
    """The forward map read backwards: the first student layer gets the last teacher layer."""
    return forward_layer_map(num_student, num_teacher)[::-1]


def all_to_one_layer_map(num_student: int, num_teacher: int) -> list[int]:
    """Every student layer to the middle teacher layer, index ``ceil(L_T / 2) − 1``."""
    return [(num_teacher + 1) // 2 - 1] * num_student


def random_layer_map(num_student: int, num_teacher: int, seed: int) -> list[int]:
    """The forward map in an order drawn from ``seed`` only (Fisher–Yates on ``random.Random(seed).random()``)."""
    targets = forward_layer_map(num_student, num_teacher)
    rng = random.Random(seed)
    for i in range(len(targets) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        targets[i], targets[j] = targets[j], targets[i]
    return targets


def _as_index(x: object) -> object:
    """``x`` as a Python int when it is an integer (not a bool), else unchanged (reported as invalid)."""
    if isinstance(x, bool):
        return x
    try:
        return operator.index(x)
    except TypeError:
        return x


def resolve_layer_map(
    layer_map: str | Sequence[int], num_student: int, num_teacher: int, seed: int = 0, term: str = "fitnet"
) -> list[int]:
    """The teacher index of each student layer for a preset name or an explicit list, validated."""
    if isinstance(layer_map, str):
        presets = {"forward": forward_layer_map, "reverse": reverse_layer_map, "all_to_one": all_to_one_layer_map}
        if layer_map == "random":
            return random_layer_map(num_student, num_teacher, seed)
        if layer_map not in presets:
            raise ValueError(
                f"{term}: unknown layer_map {layer_map!r}; use one of {', '.join(LAYER_MAPS)} or a list of teacher "
                f"indices (one per student layer, each in 0..{num_teacher - 1})"
            )
        return presets[layer_map](num_student, num_teacher)
    try:
        indices = [_as_index(x) for x in layer_map]
    except TypeError:
        raise TypeError(
            f"{term}: layer_map must be one of {', '.join(LAYER_MAPS)} or a list of teacher indices, got "
            f"{type(layer_map).__name__} {layer_map!r}"
        ) from None
    if len(indices) != num_student:
        raise ValueError(
            f"{term}: layer_map {indices} has {len(indices)} entries but there are {num_student} student layers; "
            "give one teacher index per student layer"
        )
    bad = [x for x in indices if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < num_teacher]
    if bad:
        raise ValueError(
            f"{term}: layer_map {indices} has entries {bad} out of range: each must be an integer teacher index in "
            f"0..{num_teacher - 1} (there are {num_teacher} teacher layers)"
        )
    return indices


def hint_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FitNets hint of one pair: MSE (mean over every element) between the connected student feature and the
    teacher's, in float32. The shapes must be equal."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"hint_loss: connected student feature {tuple(student.shape)} and teacher feature "
            f"{tuple(teacher.shape)} differ"
        )
    return F.mse_loss(student.float(), teacher.float())


# --------------------------------------------------------------------------------------------------------------------
# The term
# --------------------------------------------------------------------------------------------------------------------
@register_loss("fitnet")
class FitNetLoss(LossTerm):
    """Hint loss between student layers and the teacher layers a layer map assigns them, summed over the pairs.

    Args:
        weight: weight of the term (the CRD benchmark uses β = 100 for one pair).
        student_layers: one student tap (module path, ``path:input``, ``stage:N`` or ``embedding``) or a list of
            them. A single string keeps the one-pair FitNet of before: ``forward`` returns a scalar; a list makes
            ``forward`` return a dict ``{student tap: pair MSE}`` (logged as ``train/<term>/<tap>``).
        teacher_layers: one teacher tap or a list: the candidates the layer map picks from (:math:`L_T` of them;
            those no student layer is mapped to are not tapped).
        layer_map: ``forward`` | ``reverse`` | ``random`` | ``all_to_one`` or a list of teacher indices (one per
            student layer, each in ``0..L_T-1``); see the module docstring for the formulas.
        seed: seed of the ``random`` map (ignored by the others).
        connector: ``auto`` | ``conv`` | ``linear`` | ``none`` (one connector per pair).
        batchnorm: BatchNorm after the 1×1 conv (the CRD benchmark's ``ConvReg``).
        relu: ReLU after the connector.
        resize: allow pairs of maps with different H×W: the larger map is adaptive-average-pooled to the smaller
            (needed e.g. for ``all_to_one`` over ResNet stages). Off: a resolution mismatch raises.

    The connector of pair 0 is the submodule ``connector`` (FitNet's historical name, so one-pair state dicts keep
    their keys); pair ``i ≥ 1`` has ``connector_<i>``. :attr:`connectors` lists them in pair order.
    """

    def __init__(
        self,
        weight: float = 100.0,
        student_layers: str | Sequence[str] = "stage:-2",
        teacher_layers: str | Sequence[str] = "stage:-2",
        layer_map: str | Sequence[int] = "forward",
        seed: int = 0,
        connector: str = "auto",
        batchnorm: bool = False,
        relu: bool = False,
        resize: bool = False,
    ) -> None:
        super().__init__(weight)
        self.single = isinstance(student_layers, str)
        s_layers = [student_layers] if self.single else list(student_layers)
        t_layers = [teacher_layers] if isinstance(teacher_layers, str) else list(teacher_layers)
        if not s_layers or not t_layers:
            raise ValueError(
                f"fitnet: student_layers ({len(s_layers)}) and teacher_layers ({len(t_layers)}) must each name at "
                "least one tap"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"fitnet: seed must be an integer, got {seed!r}")
        self.seed = seed
        self.mapping = resolve_layer_map(layer_map, len(s_layers), len(t_layers), seed)
        self.layer_map = layer_map if isinstance(layer_map, str) else list(self.mapping)
        self.pairs = LayerPairs.parse("fitnet", s_layers, [t_layers[m] for m in self.mapping])
        self.student_taps = list(self.pairs.student)
        self.teacher_taps = list(dict.fromkeys(self.pairs.teacher))  # each mapped teacher layer once
        #: teacher index of each student layer; saved with the term so a checkpoint cannot be resumed under another map
        self.register_buffer("layer_map_index", torch.tensor(self.mapping, dtype=torch.long))
        if connector not in CONNECTOR_KINDS:
            raise ValueError(f"fitnet: connector must be one of {', '.join(CONNECTOR_KINDS)}, got {connector!r}")
        self.connector_kind = connector
        self.batchnorm = batchnorm
        self.relu = relu
        self.resize = resize
        self.connector: nn.Module | None = None

    # -- connectors --------------------------------------------------------------------------------------------------
    @staticmethod
    def _connector_name(i: int) -> str:
        return "connector" if i == 0 else f"connector_{i}"

    @property
    def connectors(self) -> list[nn.Module]:
        """The connectors in pair order (empty before :meth:`setup`)."""
        if self.connector is None:
            return []
        return [getattr(self, self._connector_name(i)) for i in range(len(self.student_taps))]

    def setup(self, ctx: SetupContext) -> None:
        if self.connector is not None:  # already built (e.g. restored)
            return
        for i, (_, s_tap, t_tap) in enumerate(self.pairs):
            module = make_connector(
                tuple(ctx.student[s_tap].shape[1:]),
                tuple(ctx.teacher[t_tap].shape[1:]),
                self.connector_kind,
                batchnorm=self.batchnorm,
                relu=self.relu,
                resize=self.resize,
                where=f"fitnet ({s_tap} -> {t_tap})",
            )
            setattr(self, self._connector_name(i), module)

    # -- loss --------------------------------------------------------------------------------------------------------
    def forward(self, batch: DistillBatch) -> torch.Tensor | dict[str, torch.Tensor]:
        if self.connector is None:
            raise RuntimeError("fitnet: setup() was not called, so the connectors do not exist yet")
        parts = {}
        for (name, s_tap, t_tap), connector in zip(self.pairs, self.connectors):
            student = connector(batch.student[s_tap])
            teacher = batch.teacher[t_tap].detach()  # a target: never back-propagate into the teacher
            if self.resize and teacher.dim() == 4 and student.dim() == 4:
                teacher = pool_to(teacher, student.shape[2:])
            parts[name] = hint_loss(student, teacher)
        return parts[self.pairs.names[0]] if self.single else parts

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        key = prefix + "layer_map_index"
        saved = state_dict.get(key)
        if saved is not None and saved.tolist() != self.mapping:
            errors.append(
                f"fitnet: the checkpoint was trained with the layer map {saved.tolist()} but this term maps the "
                f"student layers to teacher indices {self.mapping} (layer_map={self.layer_map!r}, seed={self.seed}); "
                "use the layer_map and seed of the run you resume"
            )
            return
        n_missing = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        if saved is None and key in missing_keys[n_missing:]:  # a state from before layer maps: the map is re-derived
            missing_keys.remove(key)

    def extra_repr(self) -> str:
        pairs = ", ".join(f"{s}->{t}" for _, s, t in self.pairs)
        return (
            f"weight={self.weight}, layer_map={self.layer_map!r}, layer_map_index={self.mapping}, pairs=[{pairs}], "
            f"connector={self.connector_kind}, resize={self.resize}"
        )
