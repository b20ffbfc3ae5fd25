"""The mask of every image the refinement chose not to replace: no confident defect, or a failed self-check.

A :class:`FallbackMask` gives those masks (``FALLBACKS``: ``"threshold"``, anomalib's own mask; ``"stable"``,
MEBin's per-image stable threshold). Gated images and images that could not be refined (too few negatives or
finite scores, a failed fit) keep anomalib's mask instead.
"""

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from anomalib_tts.pipeline.registry import Registry
from anomalib_tts.pipeline.thresholds import stable_thresholds
from anomalib_tts.pipeline.validation import check_count


class FallbackMask(ABC):
    """Base of the fallback masks: what an image gets when its mask is not replaced by a refined one.

    Attributes:
        on_device: ``True`` where each image's mask is computed from that image alone, by tensor operations on the
            maps' device: on an accelerator the pipeline then computes it for the whole batch and keeps it where an
            image falls back, instead of reading back which images do (a wait for the device). ``False`` (the
            default, e.g. MEBin's sweep, which runs on the host): it is called on the falling-back images only.

    Example:
        >>> class Empty(FallbackMask):
        ...     def __call__(self, score_maps: Tensor, masks: Tensor, nominal_threshold: float) -> Tensor:
        ...         return torch.zeros_like(masks)
        >>> Empty()(torch.rand(1, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool), 0.5).any().item()
        False
    """

    on_device: bool = False

    @abstractmethod
    def __call__(self, score_maps: Tensor, masks: Tensor, nominal_threshold: float) -> Tensor:
        """``(B, H, W)`` bool masks from the normalized ``score_maps`` and the images' current ``masks``."""


FALLBACKS: Registry[FallbackMask] = Registry("fallback mask")


@FALLBACKS.register("threshold")
class ThresholdMask(FallbackMask):
    """The image keeps the mask it came with: anomalib's, the map cut at the PostProcessor's threshold.

    Example:
        >>> masks = torch.rand(2, 4, 4) > 0.5
        >>> bool((ThresholdMask()(torch.rand(2, 4, 4), masks, 0.5) == masks).all())
        True
    """

    on_device = True

    def __call__(self, score_maps: Tensor, masks: Tensor, nominal_threshold: float) -> Tensor:
        return masks


@FALLBACKS.register("stable")
class StableThreshold(FallbackMask):
    """MEBin's stable threshold (anomalib 2.7's ``MEBinPostProcessor``), swept from a floor to each image's peak.

    The normalized map, clipped to ``[0, 1]`` as anomalib's PostProcessor leaves it, is cut at thresholds from the
    image's peak down to ``floor``, in steps of ``sample_rate / 255`` of that range; each cut is eroded and its
    connected components counted; the mask is the map above the lower end of the longest run of a constant,
    non-zero count. A map whose peak does not clear ``floor`` gets an empty mask. ``MEBinPostProcessor`` sweeps
    between the lowest and the highest peak of the *batch*, so its masks depend on the batchmates (and alone in
    its batch, an image is swept down to its lowest pixel); here the range belongs to the image, so its mask
    does not. Component counts come from ``scipy.ndimage.label`` (8-connectivity), on the CPU.

    Args:
        floor: Lowest threshold of the sweep, on the normalized scale (anomalib's threshold is at 0.5). The
            default was chosen by worst case over six evaluation sets.
        sample_rate: Step of the sweep on its ``[0, 255]`` scale.
        min_interval_len: Shortest stable run of the component count, in sweep steps.
        kernel_size: Side of the square erosion kernel; 0 counts the components without erosion.

    Example:
        >>> maps = torch.full((2, 32, 32), 0.1)
        >>> maps[0, 8:20, 8:20] = 0.9  # one defect, below anomalib's clipped maximum
        >>> [int(mask.sum()) for mask in StableThreshold()(maps, maps > 0.5, 0.5)]  # the second peaks below 0.4
        [144, 0]
    """

    def __init__(
        self, floor: float = 0.4, sample_rate: int = 4, min_interval_len: int = 4, kernel_size: int = 6
    ) -> None:
        if not 0.0 <= floor < 1.0:
            msg = f"floor must lie in [0, 1) on the normalized scale, got {floor}"
            raise ValueError(msg)
        self.floor = floor
        self.sample_rate = check_count("sample_rate", sample_rate)
        self.min_interval_len = check_count("min_interval_len", min_interval_len)
        self.kernel_size = check_count("kernel_size", kernel_size, minimum=0)

    def __call__(self, score_maps: Tensor, masks: Tensor, nominal_threshold: float) -> Tensor:
        clipped = torch.nan_to_num(score_maps.float(), nan=0.0).clamp(0.0, 1.0)
        peak = clipped.flatten(1).amax(dim=1)
        span = (peak - self.floor).clamp(min=torch.finfo(clipped.dtype).eps)
        scaled = ((clipped - self.floor) / span[:, None, None] * 255).clamp(0, 255)
        kernel_size = self.kernel_size or None
        thresholds = stable_thresholds(scaled, self.sample_rate, self.min_interval_len, kernel_size)
        return (scaled > thresholds[:, None, None]) & (peak > self.floor)[:, None, None]


@FALLBACKS.register("fixed")
class FixedThreshold(FallbackMask):
    """The map cut at one global threshold on the normalized scale (anomalib's own is at 0.5).

    A calibration that finds a global threshold best for a dataset (e.g. mean + 3 std of the nominal pixels)
    expresses it as this fallback, with refinement off.

    Args:
        threshold: Pixels of the normalized map above it are defective.

    Example:
        >>> FixedThreshold(0.3)(torch.tensor([[[0.2, 0.4]]]), torch.zeros(1, 1, 2, dtype=torch.bool), 0.5).tolist()
        [[[False, True]]]
    """

    on_device = True

    def __init__(self, threshold: float) -> None:
        self.threshold = float(threshold)

    def __call__(self, score_maps: Tensor, masks: Tensor, nominal_threshold: float) -> Tensor:
        return torch.nan_to_num(score_maps.float(), nan=float("-inf")) > self.threshold
