"""Binarizations a user would pick instead of refinement, computed as anomalib 2.7's post-processors compute them.

``anomalib-tts compare`` scores these next to the refined masks, on the same score maps:

- :func:`superadd_threshold`: ``SuperADDPostProcessor``'s pixel threshold, a percentile of the nominal
  validation pixel scores times a factor (95th percentile x 1.421 by default);
- :func:`mebin_masks`: ``MEBinPostProcessor``'s per-image masks (AnomalyNCD, CVPR 2025), with the fast component
  counts of :mod:`anomalib_tts.pipeline.thresholds` (the same masks as anomalib's ``mebin_binarize``).
"""

import torch
from torch import Tensor

from anomalib_tts.pipeline.thresholds import stable_thresholds


def superadd_threshold(nominal_pixels: Tensor, percentile: float = 95.0, factor: float = 1.421) -> float:
    """``SuperADDPostProcessor``'s pixel threshold: ``percentile`` of the nominal pixel scores times ``factor``.

    anomalib estimates the percentile from up to 100 000 randomly drawn pixels per validation batch; this takes
    it over the pixels given (exact, lower interpolation: no random draw).

    Args:
        nominal_pixels: Raw pixel scores of nominal validation images, any shape.
        percentile: In ``[0, 100]``.
        factor: Multiplies the percentile.

    Returns:
        The threshold on the raw scale of ``nominal_pixels``.

    Example:
        >>> superadd_threshold(torch.arange(101.0))  # the 95th of 0..100, times 1.421
        134.995
    """
    if not 0 <= percentile <= 100:
        msg = f"percentile must lie in [0, 100], got {percentile}"
        raise ValueError(msg)
    values = nominal_pixels.flatten().float()
    if values.numel() == 0:
        msg = "superadd_threshold needs at least one nominal pixel score"
        raise ValueError(msg)
    rank = int((values.numel() - 1) * percentile / 100)
    return round(float(values.kthvalue(rank + 1).values) * factor, 6)


def mebin_masks(
    anomaly_maps: Tensor,
    sample_rate: int = 4,
    min_interval_len: int = 4,
    erode: bool = True,
    kernel_size: int = 6,
) -> Tensor:
    """``MEBinPostProcessor``'s masks of one batch (anomalib's ``mebin_binarize``, with fast component counts).

    As in anomalib, the sweep's range runs from the lowest to the highest per-image peak of the *batch*, so an
    image's mask depends on its batchmates: pass the batches anomalib's test loop would see.

    Args:
        anomaly_maps: ``(B, H, W)`` maps as the PostProcessor leaves them (normalized and clipped to ``[0, 1]``).
        sample_rate: Step of the threshold sweep on the ``[0, 255]`` scale.
        min_interval_len: Shortest stable run of the component count, in sweep steps.
        erode: Erode each binarized map before counting its components.
        kernel_size: Side of the square erosion kernel.

    Returns:
        ``(B, H, W)`` bool masks.

    Example:
        >>> maps = torch.zeros(2, 32, 32)
        >>> maps[0, 8:20, 8:20] = 1.0
        >>> maps[1, 4:10, 4:10] = 0.6
        >>> [int(mask.sum()) for mask in mebin_masks(maps)]  # the second blob is at the batch's lowest peak
        [144, 0]
        >>> [int(mask.sum()) for mask in mebin_masks(maps[1:])]  # alone, it is found
        [36]
    """
    if sample_rate <= 0 or min_interval_len <= 0 or kernel_size <= 0:
        msg = (
            f"sample_rate, min_interval_len and kernel_size must be positive, got {sample_rate}, "
            f"{min_interval_len}, {kernel_size}"
        )
        raise ValueError(msg)
    maps = anomaly_maps.float()
    peaks = maps.amax(dim=(-2, -1))
    high, low = peaks.max(), peaks.min()
    if high == low:  # every image peaks at the same height: sweep from the batch's lowest pixel instead
        low = maps.amin()
        if high == low:
            return torch.zeros_like(maps, dtype=torch.bool)
    span = high - low
    scaled = torch.where(maps < low, 0.0, ((maps - low) / span * 255).clamp(0, 255))
    thresholds = stable_thresholds(scaled, sample_rate, min_interval_len, kernel_size if erode else None)
    raw = thresholds.to(maps.dtype) / 255 * span + low
    return maps > raw[:, None, None]
