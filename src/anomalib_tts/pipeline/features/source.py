"""What a feature source is: a batch's :class:`Modalities` in, a list of feature maps out.

A :class:`FeatureSource` turns a batch's images (and depth maps, where the data has them) into feature maps, one
per layer, each at its own resolution. Sources are registered in :data:`FEATURES` by name; a new source is one
subclass (in YAML: its ``class_path``).
"""

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch  # noqa: F401 (the examples use it)
from torch import Tensor, nn

from anomalib_tts.pipeline.registry import Registry


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


class WeightedMaps(list[Tensor]):
    """Feature maps, as a provider returns them, with one weight per map applied after standardization.

    Args:
        maps: ``(B, C_l, h_l, w_l)`` maps.
        weights: One positive weight per map (relative importance for the L2-penalized classifier).

    Example:
        >>> from anomalib_tts.pipeline.features.pyramid import FeaturePyramid
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


@dataclass
class Modalities:
    """What a batch shows of its images, handed to a feature source in one piece.

    Attributes:
        image: ``(B, C, H, W)`` model input images (normalized as the pre-processor leaves them).
        depth_map: ``(B, 3, H', W')`` organized XYZ point clouds (anomalib's ``MVTec3D``, ``Folder3D``), or ``None``.

    Example:
        >>> inputs = Modalities(image=torch.zeros(2, 3, 8, 8))
        >>> inputs.image.shape, inputs.depth_map
        (torch.Size([2, 3, 8, 8]), None)
    """

    image: Tensor
    depth_map: Tensor | None = None


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

    def setup(self, model: nn.Module | None) -> None:
        """Prepare for the maps of ``model`` (the anomalib model, or ``None``); ``ValueError`` if unusable."""
        del model

    def teardown(self) -> None:
        """Release what ``setup`` acquired (hooks on the model, ...)."""

    @abstractmethod
    def __call__(self, inputs: Modalities) -> list[Tensor]:
        """Feature maps ``(B, C_l, h_l, w_l)`` of a batch, at any resolution each."""


FEATURES: Registry[FeatureSource] = Registry("feature source", methods=("setup", "teardown", "__call__"))
