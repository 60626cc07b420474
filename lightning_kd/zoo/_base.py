"""The timm face shared by every CIFAR zoo model: classifier API, feature_info, pretrained config and builder.

Sources: timm's model conventions (``forward_features`` / ``forward_head`` / ``get_classifier`` /
``reset_classifier`` / ``feature_info`` / ``forward_intermediates``, ``build_model_with_cfg``), RepDistiller's
CIFAR-100 normalisation (``dataset/cifar100.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from torch import nn

#: CIFAR-100 train-set statistics as RepDistiller normalises its inputs (``dataset/cifar100.py``); the released
#: teachers were trained on inputs normalised with these.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
REPDISTILLER_URL = "https://github.com/HobbitLong/RepDistiller"


class NoPretrainedWeightsError(RuntimeError):
    """``pretrained=True`` on a CIFAR zoo model without a local weight file."""


def cifar_cfg(*, first_conv: str, classifier: str, pool_size: tuple[int, int], **kwargs: Any) -> dict[str, Any]:
    """A timm pretrained config for a CIFAR-100 model without hub weights (``url`` and ``hf_hub_id`` empty)."""
    return {
        "url": "",
        "num_classes": 100,
        "input_size": (3, 32, 32),
        "pool_size": pool_size,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR100_MEAN,
        "std": CIFAR100_STD,
        "first_conv": first_conv,
        "classifier": classifier,
        "origin_url": REPDISTILLER_URL,
        "paper_ids": "arXiv:1910.10699",
        **kwargs,
    }


class CifarNet(nn.Module):
    """Base of the zoo models: a backbone (``forward_features``), global average pooling and one linear classifier.

    Subclasses build their layers with RepDistiller's module names (so that its checkpoints load key for key), set
    :attr:`feature_info` (entry ``i`` is RepDistiller's ``feat[i]`` of ``model(x, is_feat=True)``, the output of the
    named module), create the classifier with :meth:`make_classifier` at :attr:`head_path`, and implement
    :meth:`forward_features`.

    RepDistiller pools with a fixed window (``AvgPool2d(8)``, ``avg_pool2d(out, 4)``, ...) that equals the final map
    at 32x32 inputs; here pooling is global, which is the same at 32x32 and also works at other sizes.
    """

    #: dotted path of the classifier (RepDistiller's name: ``fc``, ``classifier`` or ``linear``).
    head_path: ClassVar[str] = "fc"
    #: one ``{"num_chs", "reduction", "module"}`` per feature map of RepDistiller's ``feat`` list (pooled vector
    #: excluded); ``reduction`` is the stride at 32x32 inputs.
    feature_info: list[dict[str, Any]]

    def __init__(self, num_classes: int, num_features: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = num_features
        self.feature_info = []

    def make_classifier(self, num_classes: int) -> nn.Module:
        """The classifier module stored at :attr:`head_path` (``nn.Identity`` when ``num_classes`` is 0)."""
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, before pooling."""
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling, then the classifier (skipped when ``pre_logits``)."""
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self.head_path)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: none, the model returns pooled features)."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"{type(self).__name__} only supports global_pool='avg', got {global_pool!r}")
        self.num_classes = num_classes
        parent, _, leaf = self.head_path.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, leaf, self.make_classifier(num_classes))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's intermediate-feature API: the outputs of the :attr:`feature_info` modules picked by ``indices``
        (``None``: all, an int ``n``: the last ``n``), captured with forward hooks during one :meth:`forward_features`.
        ``norm`` and ``stop_early`` are accepted for API compatibility (no final norm here; the whole backbone runs).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"{type(self).__name__} only outputs NCHW features, got output_fmt={output_fmt!r}")
        take, _ = feature_take_indices(len(self.feature_info), indices)
        captured: dict[int, torch.Tensor] = {}

        def keeper(i: int) -> Any:
            return lambda module, args, output: captured.__setitem__(i, output)

        handles = [self.get_submodule(self.feature_info[i]["module"]).register_forward_hook(keeper(i)) for i in take]
        try:
            final = self.forward_features(x)
        finally:
            for handle in handles:
                handle.remove()
        intermediates = [captured[i] for i in take]
        return intermediates if intermediates_only else (final, intermediates)


def check_pretrained(variant: str, kwargs: dict[str, Any]) -> None:
    """Refuse ``pretrained=True`` unless a local weight source is given (timm's ``pretrained_cfg_overlay=dict(
    file=...)``): the zoo has no hub weights, and a silent random init would look like a loaded teacher."""
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get("pretrained_cfg"),
        pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
    )
    if cfg.has_weights or getattr(cfg, "state_dict", None):
        return
    raise NoPretrainedWeightsError(
        f"{variant!r} (lightning_kd CIFAR zoo, architecture of RepDistiller's models/) has no downloadable weights, "
        "so pretrained=True cannot be honoured. Load a local checkpoint instead, e.g. a released RepDistiller "
        "teacher (scripts/fetch_pretrained_teachers.sh) or one from mdistiller's cifar_teachers.tar: "
        f"teacher.checkpoint=<file> in the app, lightning_kd.models.create_model({variant!r}, 100, checkpoint=<file>), "
        f"or timm.create_model({variant!r}, pretrained=True, pretrained_cfg_overlay=dict(file=<file>)). "
        "Use pretrained=False for a random initialisation."
    )


def build_cifar_model(
    model_cls: type[CifarNet], variant: str, pretrained: bool, num_stages: int, **kwargs: Any
) -> CifarNet:
    """``timm.models.build_model_with_cfg`` for a zoo model; ``features_only=True`` returns timm's feature getter
    over :meth:`CifarNet.forward_intermediates` (default: all ``num_stages`` feature maps)."""
    if pretrained:
        check_pretrained(variant, kwargs)
    feature_cfg = {"feature_cls": "getter", "out_indices": tuple(range(num_stages))}
    return build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=feature_cfg, **kwargs)
