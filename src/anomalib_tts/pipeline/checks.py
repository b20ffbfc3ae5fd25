"""After the classifier: does an image's own evidence support its refined mask?

A :class:`SelfCheck` looks at a refined image's pseudo-labels, decision map and score map and says whether the
refined mask may replace the image's mask (``SELF_CHECKS``: ``"growth"``, ``"none"``). An image that fails gets the
fallback mask (:mod:`anomalib_tts.pipeline.fallbacks`).
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from anomalib_tts.pipeline.labelers import PseudoLabels
from anomalib_tts.pipeline.registry import Registry


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
            was chosen by worst case over six evaluation sets.

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
