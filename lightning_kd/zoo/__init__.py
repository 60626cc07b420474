"""CIFAR distillation model zoo
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

The architectures of the CIFAR-100 distillation tables (RepDistiller ``models/``, CRD, Tian et al., ICLR 2020;
mdistiller ``mdistiller/models/cifar/``, DKD/DOT) that timm lacks, registered in timm's registry on import, so that
``timm.create_model("resnet8x4", num_classes=100)`` and the app's ``model=resnet8x4`` work. ``import lightning_kd``
imports this package.

- Same layers and state_dict keys as RepDistiller's definitions: their released teachers (``save/models/*/
  ckpt_epoch_240.pth``, mdistiller's ``cifar_teachers.tar``, both ``{"model": state_dict, ...}``) load with
  ``teacher.checkpoint=<file>`` / ``lightning_kd.models.create_model(name, 100, checkpoint=<file>)``.
- ``feature_info[i]`` is RepDistiller's ``feat[i]`` (``model(x, is_feat=True)``, pooled vector excluded), so the tap
  ``stage:i`` reads the same feature map as RepDistiller's feature-distillation code; ``embedding`` and ``logits``
  are the classifier's input and output.
- Defaults: ``num_classes=100``, 3x32x32 inputs, CIFAR-100 mean/std in ``pretrained_cfg``; no hub weights
  (``pretrained=True`` without a local file raises :class:`NoPretrainedWeightsError`).
"""

from lightning_kd.zoo import cifar_mobilenetv2, cifar_resnet, cifar_shufflenet, cifar_vgg, cifar_wrn  # noqa: F401
from lightning_kd.zoo._base import CifarNet, NoPretrainedWeightsError

#: the registered names (timm model names).
CIFAR_MODELS: tuple[str, ...] = (
    "resnet8x4",
    "resnet32x4",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
    "vgg8_cifar",
    "vgg13_cifar",
    "mobilenetv2_cifar",
    "shufflenetv1_cifar",
    "shufflenetv2_cifar",
)

__all__ = ["CIFAR_MODELS", "CifarNet", "NoPretrainedWeightsError"]
