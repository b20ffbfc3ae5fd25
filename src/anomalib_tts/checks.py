"""After the classifier: does an image's own evidence support its refined mask, and which mask replaces it if not.

Two components, each chosen by name or object like the pipeline's other stages:

- a :class:`SelfCheck` looks at a refined image's pseudo-labels, decision map and score map and says whether the
  refined mask may replace the image's mask (``SELF_CHECKS``: ``"growth"``, ``"none"``);
- a :class:`FallbackMask` gives the mask of every image the refinement chose not to replace (no confident defect,
  or a failed self-check); gated images (``gate="pred_label"``) and images that could not be refined (too few
  negatives or finite scores, a failed fit) keep anomalib's mask (``FALLBACKS``: ``"threshold"``, anomalib's own
  mask; ``"stable"``, MEBin's per-image stable threshold).
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from anomalib_tts.baselines import stable_thresholds
from anomalib_tts.pseudo_labels import PseudoLabels
from anomalib_tts.registry import Registry
from anomalib_tts.validation import check_count


@dataclass
class Evidence:
    """What one batch's refinement rests on, for the self-check.

    Attributes:
        score_maps: ``(B, H, W)`` normalized anomaly maps (``nominal_threshold`` is anomalib's threshold).
        labels: The pseudo-labels the classifier was fitted on (dense, before sampling).
        decision: ``(B, H, W)`` the fitted decision at every pixel (the refined mask is ``decision > 0``); ``nan``
            for images that were not fitted.
        nominal_threshold: The normalized nominal pixel threshold.
    """

    score_maps: Tensor
    labels: PseudoLabels
    decision: Tensor
    nominal_threshold: float


class SelfCheck(ABC):
    """Base of the self-checks: a new check is one subclass (in YAML: its ``class_path``).

    Example:
        >>> class SmallMasks(SelfCheck):
        ...     def __call__(self, evidence: Evidence) -> Tensor:
        ...         return (evidence.decision > 0).flatten(1).float().mean(dim=1) <= 0.5
        >>> decision = torch.tensor([[[1.0, -1.0]], [[1.0, 1.0]]])
        >>> labels = PseudoLabels(decision > 0, decision < 0)
        >>> SmallMasks()(Evidence(decision, labels, decision, 0.5)).tolist()
        [True, False]
    """

    @abstractmethod
    def __call__(self, evidence: Evidence) -> Tensor:
        """``(B,)`` bool: the refined mask of each image may replace its mask (only read for refined images)."""


SELF_CHECKS: Registry[SelfCheck] = Registry("self-check")


@SELF_CHECKS.register("none")
class NoCheck(SelfCheck):
    """Every fitted image keeps its refined mask (the behaviour before self-checks).

    Example:
        >>> decision = torch.ones(2, 4, 4)
        >>> NoCheck()(Evidence(decision, PseudoLabels(decision > 0, decision < 0), decision, 0.5)).tolist()
        [True, True]
    """

    def __call__(self, evidence: Evidence) -> Tensor:
        return torch.ones(evidence.decision.shape[0], dtype=torch.bool, device=evidence.decision.device)


@SELF_CHECKS.register("growth")
class BoundedGrowth(SelfCheck):
    """A refined mask may be at most ``max_growth`` times as large as its positive core.

    The classifier extends the confident positives to the pixels that look like them. Where the score map is a
    blob much wider than a small defect, the positives already cover more than the defect, and a mask that then
    grows to several times their area has filled the blob's surround (pixels the map itself was unsure of)
    rather than traced a defect. Such an image is not refined: it gets the fallback mask.

    Args:
        max_growth: Largest ratio of refined-mask area to positive pseudo-label area, at least 1. The default
            was chosen by worst case over six evaluation sets (``examples/choose_defaults.py``).

    Example:
        >>> decision = -torch.ones(2, 10, 10)
        >>> decision[:, 4:6, 4:6] = 1.0  # both masks: 4 pixels
        >>> positive = torch.zeros(2, 10, 10, dtype=torch.bool)
        >>> positive[0, 4:6, 4:6] = True  # 4 positives: the mask did not grow
        >>> positive[1, 4, 4] = True  # 1 positive: the mask grew fourfold
        >>> labels = PseudoLabels(positive, decision < 0)
        >>> BoundedGrowth(max_growth=3.0)(Evidence(decision, labels, decision, 0.5)).tolist()
        [True, False]
    """

    def __init__(self, max_growth: float = 4.0) -> None:
        if not max_growth >= 1.0:
            msg = f"max_growth must be at least 1 (a mask as large as its positives), got {max_growth}"
            raise ValueError(msg)
        self.max_growth = max_growth

    def __call__(self, evidence: Evidence) -> Tensor:
        mask_area = (evidence.decision > 0).flatten(1).sum(dim=1)
        positive_area = evidence.labels.positive.flatten(1).sum(dim=1)
        return mask_area <= self.max_growth * positive_area


class FallbackMask(ABC):
    """Base of the fallback masks: what an image gets when its mask is not replaced by a refined one.

    Example:
        >>> class Empty(FallbackMask):
        ...     def __call__(self, score_maps: Tensor, masks: Tensor, nominal_threshold: float) -> Tensor:
        ...         return torch.zeros_like(masks)
        >>> Empty()(torch.rand(1, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool), 0.5).any().item()
        False
    """

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
            default was chosen by worst case over six evaluation sets (``examples/choose_defaults.py``).
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
