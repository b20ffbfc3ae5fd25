"""Feature maps of one batch, standardized per image, read at any pixel, optionally reduced to fewer channels.

The :class:`FeaturePyramid` standardizes a source's maps per image and channel and serves the two operations the
rest of the pipeline needs: reading features at sampled pixel coordinates (bilinear, for fitting) and projecting a
linear classifier onto every pixel. The projection is computed at each layer's own resolution and only the
resulting score map is upsampled, which equals classifying bilinearly upsampled features (both operations are
linear) without ever building full-resolution feature maps.

Features wider than ``max_channels`` (WideResNet-50's ``layer2`` + ``layer3``: 1536 channels) are reduced, level by
level at the levels' own resolution and image by image, to their coordinates in the level's dominant channel
subspace: the classifier is then fitted in that subspace, at a fraction of the cost, and every later operation
reads the narrower levels.
"""

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from anomalib_tts.pipeline.features.source import WeightedMaps

PROJECTION_SEED = 0
ORTHONORMAL_JITTER = 1e-12
SUBSPACE_ITERATIONS = 1  # products with F F^T per dominant subspace


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
