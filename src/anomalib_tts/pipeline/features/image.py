"""The image's own colour and local texture at full resolution, and several feature sources side by side.

A backbone's features live on a grid 8 to 16 times coarser than the image, so a classifier fitted on them draws
the score map's blob again, however small the defect inside it. :class:`ImageFeatures` reads the image itself at
its own resolution (or at a small stride): its colour, how it differs from its neighbourhood, and how much it
varies there. Next to a backbone's features (:class:`StackedFeatures`) they let the per-image classifier keep the
pixels of the blob that look like the defect's core and drop the rest.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from anomalib_tts.pipeline.features.source import FEATURES, FeatureSource, Modalities, WeightedMaps, as_rgb
from anomalib_tts.pipeline.validation import check_count


def _local_mean(values: Tensor, window: int) -> Tensor:
    return F.avg_pool2d(values, window, stride=1, padding=window // 2, count_include_pad=False)


@FEATURES.register("image")
class ImageFeatures(FeatureSource):
    """Colour and local texture of the image, one map at ``1 / stride`` of its resolution.

    Channels: the colour (3); for each window, the colour minus its local mean (3) and the local standard
    deviation of the grey level (1); the grey level's gradient magnitude (1). Grayscale images are repeated to
    three channels and RGBA images lose their alpha channel.

    Args:
        windows: Sides of the square neighbourhoods, odd numbers of pixels.
        stride: Average-pool the image by this factor first (1: full resolution).

    Example:
        >>> features = ImageFeatures(windows=(3, 7))
        >>> [tuple(level.shape) for level in features(Modalities(torch.rand(2, 3, 32, 32)))]
        [(2, 12, 32, 32)]
    """

    def __init__(self, windows: Sequence[int] = (3, 7, 15), stride: int = 1) -> None:
        windows = tuple(windows)
        if not windows or any(check_count("windows", window) % 2 == 0 for window in windows):
            msg = f"windows must be a non-empty list of odd numbers of pixels, got {list(windows)}"
            raise ValueError(msg)
        self.windows = windows
        self.stride = check_count("stride", stride)

    @property
    def num_channels(self) -> int:
        """Channels of the single feature map."""
        return 3 + 4 * len(self.windows) + 1

    def __call__(self, inputs: Modalities) -> list[Tensor]:
        image = as_rgb(inputs.image).float()
        if self.stride > 1:
            image = F.avg_pool2d(image, self.stride, ceil_mode=True)
        grey = image.mean(dim=1, keepdim=True)
        channels = [image]
        for window in self.windows:
            channels.append(image - _local_mean(image, window))
            variance = _local_mean(grey.square(), window) - _local_mean(grey, window).square()
            channels.append(variance.clamp(min=0).sqrt())
        vertical, horizontal = torch.gradient(grey, dim=(2, 3))
        channels.append(torch.sqrt(vertical.square() + horizontal.square()))
        return [torch.cat(channels, dim=1)]


@FEATURES.register("stacked")
class StackedFeatures(FeatureSource):
    """The maps of several sources side by side, each source's maps weighted after standardization.

    Args:
        sources: The feature sources, or their registered names.
        weights: One positive weight per source (relative importance for the L2-penalized classifier); all 1
            when ``None``.

    Example:
        >>> stacked = StackedFeatures([ImageFeatures(windows=(3,)), ImageFeatures(windows=(3,))], [1.0, 0.5])
        >>> maps = stacked(Modalities(torch.rand(1, 3, 16, 16)))
        >>> len(maps), maps.weights
        (2, [1.0, 0.5])

        In an anomalib YAML, the ``features`` of ``anomalib_tts.TestTimeSegmentation``::

            features:
              class_path: anomalib_tts.StackedFeatures
              init_args:
                sources: [model, image]
    """

    def __init__(self, sources: Sequence[str | FeatureSource], weights: Sequence[float] | None = None) -> None:
        if not sources:
            msg = "sources must name at least one feature source"
            raise ValueError(msg)
        weights = [1.0] * len(sources) if weights is None else [float(weight) for weight in weights]
        if len(weights) != len(sources) or not all(weight > 0 for weight in weights):
            msg = f"weights must be one positive number per source ({len(sources)} sources), got {list(weights)}"
            raise ValueError(msg)
        self.sources = [FEATURES.create(source) for source in sources]
        self.weights = weights

    def setup(self, model: nn.Module | None) -> None:
        for source in self.sources:
            source.setup(model)

    def teardown(self) -> None:
        """Release what the sources hold."""
        for source in self.sources:
            source.teardown()

    def __call__(self, inputs: Modalities) -> list[Tensor]:
        maps: list[Tensor] = []
        weights: list[float] = []
        for source, weight in zip(self.sources, self.weights, strict=True):
            source_maps = source(inputs)
            inner = source_maps.weights if isinstance(source_maps, WeightedMaps) else [1.0] * len(source_maps)
            maps.extend(source_maps)
            weights.extend(weight * value for value in inner)
        return WeightedMaps(maps, weights)
