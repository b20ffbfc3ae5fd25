"""Pixel features from an organized point cloud: surface normals, curvature and local height statistics.

anomalib's RGB + 3D datamodules (``MVTec3D``, ``Folder3D``) put an organized XYZ map ``(B, 3, H, W)`` next to
each image as ``batch.depth_map``; real scans have missing points, stored as ``(0, 0, 0)``. Defects such as
dents are often invisible in colour but plain in this geometry, so :class:`GeometryFeatures` turns it into pixel
features the per-image classifier can use, and :class:`RgbdFeatures` puts them next to the RGB backbone's.

Every step is batched torch on the batch's device: missing points are filled from the nearest coarser level of
a masked image pyramid (no holes, no crash), the cloud is centred and scaled per image (so metres and
millimetres give the same features), and each scale is a box filter of a given radius.
"""

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from anomalib_tts.pipeline.features.source import FEATURES, FeatureSource, Modalities, WeightedMaps

logger = logging.getLogger(__name__)

CHANNELS_PER_SCALE = 6  # normal (3), mean curvature, height above the local surface, roughness
_EPS = 1e-8


def valid_points(depth_maps: Tensor) -> Tensor:
    """``(B, 1, H, W)`` bool: points that were measured (finite and not all-zero).

    Example:
        >>> cloud = torch.ones(1, 3, 2, 2)
        >>> cloud[0, :, 0, 0] = 0
        >>> valid_points(cloud)[0, 0].tolist()
        [[False, True], [True, True]]
    """
    return (torch.isfinite(depth_maps).all(dim=1) & (depth_maps != 0).any(dim=1))[:, None]


def has_points(depth_maps: Tensor) -> Tensor:
    """``(B,)`` bool: depth maps with at least one measured point."""
    return valid_points(depth_maps).flatten(1).any(dim=1)


def _masked_resample(points: Tensor, valid: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Area-resample ``points`` to ``size`` averaging measured points only; a cell is valid if any point was."""
    if tuple(points.shape[-2:]) == tuple(size):
        return points, valid
    weight = F.interpolate(valid, size=size, mode="area")
    resampled = F.interpolate(points * valid, size=size, mode="area") / weight.clamp(min=_EPS)
    return resampled, (weight > 0).float()


def fill_missing(points: Tensor, valid: Tensor) -> Tensor:
    """Replace missing points by the mean of the measured ones in the finest pyramid cell that has any.

    A masked image pyramid (2x2 cells) is built up to a single cell, then read back from the coarsest level
    down: each level keeps its measured means and takes the coarser level's value where it has none.

    Args:
        points: ``(B, C, H, W)`` values.
        valid: ``(B, 1, H, W)`` float, 1 where measured.

    Returns:
        ``points`` with every missing point filled (left at 0 only in maps without any measured point).

    Example:
        >>> values = torch.tensor([[[[1.0, 0.0], [3.0, 5.0]]]])
        >>> fill_missing(values, (values != 0).float())[0, 0].tolist()
        [[1.0, 3.0], [3.0, 5.0]]
    """
    levels = [(points * valid, valid)]
    while max(levels[-1][1].shape[-2:]) > 1:
        total, weight = levels[-1]
        levels.append((F.avg_pool2d(total, 2, ceil_mode=True), F.avg_pool2d(weight, 2, ceil_mode=True)))
    filled = torch.zeros_like(levels[-1][0])
    for total, weight in reversed(levels):
        coarser = F.interpolate(filled, size=total.shape[-2:], mode="nearest")
        filled = torch.where(weight > 0, total / weight.clamp(min=_EPS), coarser)
    return torch.where(valid > 0, points, filled)


def _box_mean(values: Tensor, radius: int) -> Tensor:
    """Mean over the in-bounds part of each ``(2 radius + 1)^2`` window, as two separable passes."""
    size = 2 * radius + 1
    rows = F.avg_pool2d(values, (1, size), stride=1, padding=(0, radius), count_include_pad=False)
    return F.avg_pool2d(rows, (size, 1), stride=1, padding=(radius, 0), count_include_pad=False)


def _central_differences(values: Tensor, step: int) -> tuple[Tensor, Tensor]:
    """Differences ``v(x + step) - v(x - step)`` along columns and rows (replicated borders)."""
    padded = F.pad(values, (step, step, step, step), mode="replicate")
    height, width = values.shape[-2:]
    centre_rows = padded[..., step : step + height, :]
    centre_cols = padded[..., :, step : step + width]
    along_cols = centre_rows[..., 2 * step :] - centre_rows[..., :width]
    along_rows = centre_cols[..., 2 * step :, :] - centre_cols[..., :height, :]
    return along_cols, along_rows


def _unit_cross(first: Tensor, second: Tensor) -> Tensor:
    """Unit cross product of two ``(B, 3, H, W)`` vector fields (written out: faster than ``torch.cross`` here)."""
    (ax, ay, az), (bx, by, bz) = first.unbind(dim=1), second.unbind(dim=1)
    cross = torch.stack((ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx), dim=1)
    return cross / cross.square().sum(dim=1, keepdim=True).sqrt().clamp(min=_EPS)


def _rate_along(change: Tensor, tangent: Tensor) -> Tensor:
    """Change of a vector field per unit length along ``tangent`` (both measured over the same step)."""
    return (change * tangent).sum(dim=1, keepdim=True) / tangent.square().sum(dim=1, keepdim=True).clamp(min=_EPS)


def _scale_features(points: Tensor, radius: int) -> Tensor:
    """Normal, mean curvature, height above the smoothed surface and roughness at one box radius."""
    smooth = _box_mean(points, radius)
    tangent_u, tangent_v = _central_differences(smooth, radius)
    normal = _unit_cross(tangent_u, tangent_v)
    normal_change_u, normal_change_v = _central_differences(normal, radius)
    curvature = 0.5 * (_rate_along(normal_change_u, tangent_u) + _rate_along(normal_change_v, tangent_v))
    height = ((points - smooth) * normal).sum(dim=1, keepdim=True)
    roughness = _box_mean(height.square(), radius).sqrt()
    return torch.cat((normal, curvature, height, roughness), dim=1)


def geometric_features(depth_maps: Tensor, size: tuple[int, int], scales: Sequence[int] = (2, 4, 8)) -> Tensor:
    """Geometric pixel features of organized point clouds, at ``size``.

    Args:
        depth_maps: ``(B, 3, H, W)`` organized XYZ; missing points are ``(0, 0, 0)`` (or non-finite).
        size: Output resolution ``(h, w)`` (typically the model's input size).
        scales: Box radii in output pixels.

    Returns:
        ``(B, 6 * len(scales), h, w)`` float32: per scale the unit normal (3), the mean curvature, the height
        of each point above the smoothed surface and the local RMS of that height. Maps without any measured
        point give zeros.

    Example:
        >>> columns, rows = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="xy")
        >>> plane = torch.stack((columns, rows, torch.full((16, 16), 5.0)))[None]
        >>> features = geometric_features(plane, (8, 8), scales=(1,))
        >>> features.shape
        torch.Size([1, 6, 8, 8])
        >>> features[0, :3, 4, 4].tolist()  # a flat plane facing the camera
        [0.0, 0.0, 1.0]
    """
    depth_maps = depth_maps.float()
    valid = valid_points(depth_maps).float()
    points = torch.where(valid > 0, depth_maps, torch.zeros_like(depth_maps))
    points, valid = _masked_resample(points, valid, size)
    count = valid.sum(dim=(2, 3), keepdim=True).clamp(min=1)
    centre = (points * valid).sum(dim=(2, 3), keepdim=True) / count
    spread = (((points - centre) * valid).square().sum(dim=(1, 2, 3), keepdim=True) / count).sqrt()
    points = fill_missing((points - centre) / spread.clamp(min=_EPS), valid)
    features = torch.cat([_scale_features(points, radius) for radius in scales], dim=1)
    return features * (valid.flatten(1).any(dim=1)[:, None, None, None])


@FEATURES.register("geometry")
class GeometryFeatures(FeatureSource):
    """Geometric pixel features of the batch's organized point clouds (see :func:`geometric_features`).

    Computed at the images' resolution: the depth map is resampled to the model input size, which assumes the
    pre-processor only resizes (as anomalib's default for ``MVTec3D`` does), no crop. Batches without a depth map
    are an error; :class:`RgbdFeatures` uses these features where a batch has one.

    Args:
        scales: Box radii in pixels of the model input, one feature block per radius.

    Example:
        >>> features = GeometryFeatures(scales=(2, 4))
        >>> maps = features(Modalities(torch.rand(2, 3, 32, 32), depth_map=torch.rand(2, 3, 64, 64)))
        >>> [tuple(level.shape) for level in maps]
        [(2, 12, 32, 32)]
    """

    def __init__(self, scales: Sequence[int] = (2, 4, 8)) -> None:
        scales = tuple(scales)
        if not scales or any(int(radius) != radius or radius < 1 for radius in scales):
            msg = f"scales must be a non-empty list of integer radii >= 1, got {list(scales)}"
            raise ValueError(msg)
        self.scales = tuple(int(radius) for radius in scales)

    @property
    def num_channels(self) -> int:
        """Channels of the single feature level."""
        return CHANNELS_PER_SCALE * len(self.scales)

    def __call__(self, inputs: Modalities) -> list[Tensor]:
        if inputs.depth_map is None:
            msg = "GeometryFeatures needs the batch's depth_map; use RgbdFeatures for data with and without one"
            raise ValueError(msg)
        images = inputs.image
        return [geometric_features(inputs.depth_map.to(images.device), tuple(images.shape[-2:]), self.scales)]


def usable_depth(depth_maps: Tensor | None) -> str | None:
    """Why ``depth_maps`` cannot give geometric features, or ``None`` when it can."""
    if depth_maps is None:
        return "the batch carries no depth_map"
    if depth_maps.ndim != 4 or depth_maps.shape[1] != 3:
        return f"depth_map has shape {tuple(depth_maps.shape)}, not an organized XYZ map (B, 3, H, W)"
    if not bool(has_points(depth_maps).any()):
        return "every depth_map of the batch is empty (all points zero or missing)"
    return None


@FEATURES.register("rgbd")
class RgbdFeatures(FeatureSource):
    """RGB backbone features and geometric features side by side, the geometric ones weighted.

    Each feature map is standardized per image and channel by the feature pyramid
    (:class:`~anomalib_tts.pipeline.features.pyramid.FeaturePyramid`); the geometric level is then multiplied by
    ``geometry_weight`` (with the classifier's L2 penalty, a larger weight makes geometry cheaper to use). Without a
    usable depth map the RGB features are returned alone, with a warning when ``expect_depth`` is set; images of a batch whose own depth map is empty get all-zero
    geometric features (after standardization: no signal), with a warning.

    Args:
        rgb: The RGB feature source, or its registered name (``"timm"``: ``TimmFeatures()``, ``"model"``:
            ``ModelFeatures()``).
        geometry: The geometric feature source; default scales when ``None``.
        geometry_weight: Weight of the geometric features relative to the RGB ones (> 0).
        expect_depth: Warn when a batch carries no depth map (for data that should have one).

    Example:
        >>> class Colour(FeatureSource):
        ...     def __call__(self, inputs: Modalities) -> list[Tensor]:
        ...         return [inputs.image]
        >>> features = RgbdFeatures(Colour(), GeometryFeatures(scales=(2,)), geometry_weight=2.0)
        >>> maps = features(Modalities(torch.rand(2, 3, 32, 32), depth_map=torch.rand(2, 3, 32, 32)))
        >>> [level.shape[1] for level in maps], maps.weights
        ([3, 6], [1.0, 2.0])
        >>> len(features(Modalities(torch.rand(2, 3, 32, 32))))  # no depth map: RGB only
        1

        In an anomalib YAML, the ``features`` of ``anomalib_tts.TestTimeSegmentation``::

            features:
              class_path: anomalib_tts.RgbdFeatures
              init_args:
                rgb: model
                geometry:
                  class_path: anomalib_tts.GeometryFeatures
                  init_args:
                    scales: [2, 4, 8]
                expect_depth: true
    """

    def __init__(
        self,
        rgb: str | FeatureSource = "timm",
        geometry: GeometryFeatures | None = None,
        geometry_weight: float = 1.0,
        expect_depth: bool = False,
    ) -> None:
        if not geometry_weight > 0:
            msg = f"geometry_weight must be > 0, got {geometry_weight}"
            raise ValueError(msg)
        self.rgb = FEATURES.create(rgb)
        self.geometry = geometry if geometry is not None else GeometryFeatures()
        self.geometry_weight = float(geometry_weight)
        self.expect_depth = expect_depth

    def setup(self, model: nn.Module | None) -> None:
        self.rgb.setup(model)
        self.geometry.setup(model)

    def teardown(self) -> None:
        """Release what the sources hold (e.g. the model hook of ``ModelFeatures``)."""
        self.rgb.teardown()
        self.geometry.teardown()

    def __call__(self, inputs: Modalities) -> list[Tensor]:
        rgb_maps = list(self.rgb(inputs))
        depth_maps = inputs.depth_map
        problem = usable_depth(depth_maps)
        if problem is not None:
            if depth_maps is not None or self.expect_depth:
                logger.warning("test-time segmentation uses RGB features only for this batch: %s", problem)
            return rgb_maps
        assert depth_maps is not None
        empty = int((~has_points(depth_maps)).sum())
        if empty:
            logger.warning(
                "test-time segmentation uses RGB features only for %d of %d images: their depth_map is empty",
                empty,
                depth_maps.shape[0],
            )
        geometry_maps = self.geometry(inputs)
        weights = [1.0] * len(rgb_maps) + [self.geometry_weight] * len(geometry_maps)
        return WeightedMaps([*rgb_maps, *geometry_maps], weights)
