"""Score map -> pseudo-labels: which pixels of an image are confidently defective or confidently normal.

Every labeler takes the batch of score maps as the PostProcessor leaves them (normalized so that the nominal
pixel threshold sits at ``nominal_threshold``, 0.5 by default) and returns dense boolean maps. Non-finite
pixels are never labeled, and the two sets never overlap.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from anomalib_tts.pipeline.devices import host_reads_are_free
from anomalib_tts.pipeline.registry import Registry
from anomalib_tts.pipeline.validation import check_odd, check_range


@dataclass
class PseudoLabels:
    """Dense pseudo-labels for a batch: ``(B, H, W)`` bool maps."""

    positive: Tensor
    negative: Tensor


class PseudoLabeler(ABC):
    """Base of the pseudo-label recipes: a new recipe is one subclass (in YAML: its ``class_path``).

    Example:
        >>> class AboveThreshold(PseudoLabeler):
        ...     def __call__(self, score_maps: Tensor, nominal_threshold: float) -> PseudoLabels:
        ...         valid = torch.isfinite(score_maps)
        ...         return PseudoLabels(valid & (score_maps > nominal_threshold), valid & (score_maps < 0.2))
        >>> labels = AboveThreshold()(torch.tensor([[[0.1, 0.3, 0.9]]]), nominal_threshold=0.5)
        >>> labels.positive.tolist(), labels.negative.tolist()
        ([[[False, False, True]]], [[[True, False, False]]])
    """

    @abstractmethod
    def __call__(self, score_maps: Tensor, nominal_threshold: float) -> PseudoLabels:
        """Label the ``(B, H, W)`` score maps; non-finite pixels must be neither positive nor negative."""


LABELERS: Registry[PseudoLabeler] = Registry("pseudo-label recipe")


def masked_quantile(values: Tensor, valid: Tensor, quantile: float) -> Tensor:
    """Per-image quantile over the valid pixels (lower interpolation; no size limit, unlike ``torch.quantile``).

    One ``kthvalue`` selection per call, no sort: the invalid pixels of an image are filled with just enough
    ``-inf`` (the rest ``+inf``) that the same rank of every row lands on that image's own quantile. On CPU each
    row's valid pixels are selected by NumPy's ``partition`` instead (an introselect, several times faster than
    ``kthvalue`` there), which gives the same value.

    Args:
        values: ``(B, H, W)`` maps.
        valid: ``(B, H, W)`` bool, pixels that count.
        quantile: In ``[0, 1]``.

    Returns:
        ``(B,)`` quantiles; ``nan`` for an image with no valid pixel.

    Example:
        >>> values = torch.tensor([[[1.0, 5.0, 2.0, 9.0]]])
        >>> masked_quantile(values, values < 9, 0.5)  # the median of 1, 5, 2
        tensor([2.])
    """
    flat = values.flatten(1)
    mask = valid.flatten(1)
    size = flat.shape[1]
    rank = int((size - 1) * quantile)
    if host_reads_are_free(mask) and flat.dtype in (torch.float32, torch.float64):
        return _masked_quantile_on_host(flat, mask, quantile)
    count = mask.sum(dim=1)
    if quantile == 1.0:  # the maximum needs no selection
        result = torch.where(mask, flat, torch.full_like(flat, float("-inf"))).amax(dim=1)
        return torch.where(count > 0, result, torch.full_like(result, float("nan")))
    valid_rank = ((count - 1).clamp(min=0).double() * quantile).floor().to(torch.int64)
    invalid_order = (~mask).cumsum(dim=1)
    filler = torch.where(invalid_order <= (rank - valid_rank)[:, None], float("-inf"), float("inf")).to(flat.dtype)
    result = torch.where(mask, flat, filler).kthvalue(rank + 1, dim=1).values
    return torch.where(count > 0, result, torch.full_like(result, float("nan")))


def _masked_quantile_on_host(flat: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """:func:`masked_quantile` of ``(B, N)`` CPU values: each row's valid values selected by ``numpy.partition``."""
    if bool(mask.all()):  # the usual case: every row whole (a free read on CPU)
        if quantile == 1.0:
            return flat.amax(dim=1)
        rank = int((flat.shape[1] - 1) * quantile)
        return torch.from_numpy(np.partition(flat.numpy(), rank, axis=1)[:, rank].copy())
    values, chosen = flat.numpy(), mask.numpy()
    result = np.full(flat.shape[0], np.nan, dtype=values.dtype)
    for row in range(flat.shape[0]):
        kept = values[row][chosen[row]]
        if kept.size:
            rank = int((kept.size - 1) * quantile)
            result[row] = kept.max() if quantile == 1.0 else np.partition(kept, rank)[rank]
    return torch.from_numpy(result)


def local_peaks(score_maps: Tensor, valid: Tensor, window: int) -> Tensor:
    """Pixels that hold the maximum of their ``window x window`` neighbourhood (plateaus included)."""
    filled = torch.where(valid, score_maps, torch.full_like(score_maps, float("-inf")))
    neighbourhood_max = F.max_pool2d(filled[:, None], window, stride=1, padding=window // 2)[:, 0]
    return valid & (filled >= neighbourhood_max)


def dilate(mask: Tensor, size: int) -> Tensor:
    """Binary dilation of ``(B, H, W)`` bool maps with a ``size x size`` square."""
    if size <= 1:
        return mask
    return F.max_pool2d(mask[:, None].float(), size, stride=1, padding=size // 2)[:, 0] > 0


def _peak_positives(
    score_maps: Tensor,
    valid: Tensor,
    bar: Tensor,
    peak_window: int,
    neighbourhood: int,
    inclusive: Tensor | None = None,
) -> Tensor:
    """Local peaks above the per-image ``bar`` (or at it, for images where ``inclusive``) plus valid neighbours."""
    above = score_maps > bar[:, None, None]
    if inclusive is not None:
        above |= inclusive[:, None, None] & (score_maps == bar[:, None, None])
    peaks = local_peaks(score_maps, valid, peak_window) & above
    return dilate(peaks, neighbourhood) & valid


@LABELERS.register("percentile")
class PercentilePeaks(PseudoLabeler):
    """The paper's recipe: positives are local maxima above the image's own percentile plus their neighbours,
    negatives are all other valid pixels.

    It needs no nominal statistics but assumes defects are small: with large defects the negatives are full of
    defect pixels. Every image has a "top 1%", so it should be gated (see ``TestTimeSegmentation.gate``).

    Args:
        percentile: Per-image percentile a peak must exceed, in ``[0, 100]``.
        peak_window: Side of the window in which a peak is a maximum (odd).
        neighbourhood: Side of the square around each peak that is labeled positive (odd; 3 = the 8 neighbours).

    Example:
        >>> maps = torch.zeros(1, 9, 9)
        >>> maps[0, 4, 4] = 1.0
        >>> labels = PercentilePeaks(percentile=99)(maps, nominal_threshold=0.5)
        >>> int(labels.positive.sum()), int(labels.negative.sum())
        (9, 72)
    """

    def __init__(self, percentile: float = 99.0, peak_window: int = 3, neighbourhood: int = 3) -> None:
        check_range("percentile", percentile, 0.0, 100.0)
        check_odd("peak_window", peak_window)
        check_odd("neighbourhood", neighbourhood)
        self.percentile = percentile
        self.peak_window = peak_window
        self.neighbourhood = neighbourhood

    def __call__(self, score_maps: Tensor, nominal_threshold: float) -> PseudoLabels:
        del nominal_threshold
        valid = torch.isfinite(score_maps)
        bar = masked_quantile(score_maps, valid, self.percentile / 100)
        # anomalib's normalized maps saturate at 1: when the percentile is the maximum, the maximum counts
        saturated = bar >= masked_quantile(score_maps, valid, 1.0)
        positive = _peak_positives(score_maps, valid, bar, self.peak_window, self.neighbourhood, saturated)
        return PseudoLabels(positive=positive, negative=valid & ~positive)


@LABELERS.register("nominal")
class NominalAware(PseudoLabeler):
    """Positives and negatives on either side of the nominal threshold, with a margin.

    Negatives are drawn only where the map is clearly below the nominal threshold, so large defects cannot
    leak into them; positives are local peaks above the threshold plus every pixel clearly above it. A
    defect-free image has no positive and is left alone.

    Args:
        positive_margin: How far above ``nominal_threshold`` a pixel must be to count as defective (may be
            negative: anomalib's threshold is the highest nominal validation score, often above thin defects).
        negative_margin: How far below ``nominal_threshold`` a pixel must be to count as normal.
        peak_window: Side of the window in which a peak is a maximum (odd).
        neighbourhood: Side of the square around each peak that is labeled positive (odd).

    Example:
        >>> maps = torch.tensor([[[0.1, 0.45, 0.9]]])
        >>> labels = NominalAware(positive_margin=0.1, negative_margin=0.1)(maps, nominal_threshold=0.5)
        >>> labels.positive.tolist(), labels.negative.tolist()
        ([[[False, False, True]]], [[[True, False, False]]])
    """

    def __init__(
        self,
        positive_margin: float = 0.1,
        negative_margin: float = 0.1,
        peak_window: int = 3,
        neighbourhood: int = 1,
    ) -> None:
        check_range("positive_margin", positive_margin, -1.0, 1.0)
        check_range("negative_margin", negative_margin, -1.0, 1.0)
        if positive_margin < -negative_margin:
            msg = f"positive_margin ({positive_margin}) must not put the positive bar below the negative one"
            raise ValueError(msg)
        check_odd("peak_window", peak_window)
        check_odd("neighbourhood", neighbourhood)
        self.positive_margin = positive_margin
        self.negative_margin = negative_margin
        self.peak_window = peak_window
        self.neighbourhood = neighbourhood

    def bars(self, score_maps: Tensor, valid: Tensor, nominal_threshold: float) -> tuple[Tensor, Tensor]:
        """Per-image ``(positive_bar, negative_bar)``: above the first is defective, below the second normal."""
        del valid
        ones = score_maps.new_ones(score_maps.shape[0])
        return ones * (nominal_threshold + self.positive_margin), ones * (nominal_threshold - self.negative_margin)

    def __call__(self, score_maps: Tensor, nominal_threshold: float) -> PseudoLabels:
        valid = torch.isfinite(score_maps)
        positive_bar, negative_bar = self.bars(score_maps, valid, nominal_threshold)
        above = valid & (score_maps > positive_bar[:, None, None])
        positive = above | _peak_positives(score_maps, valid, positive_bar, self.peak_window, self.neighbourhood)
        negative = valid & (score_maps < negative_bar[:, None, None]) & ~positive
        return PseudoLabels(positive=positive, negative=negative)


@LABELERS.register("robust")
class RobustNominal(NominalAware):
    """``nominal`` whose bars rise with the image's own score level, to survive drifted images.

    When a test image drifts from the training images (lighting, surface finish), its whole map rises above
    the nominal threshold and ``nominal`` would call all of it defective. Here the negative bar is the higher of
    the nominal one and the image's own ``drift_quantile`` (its median by default: the image's lower half is
    taken as normal), and the positive bar keeps the nominal gap above it. On an image that has not drifted
    (median below the nominal negative bar) this is exactly ``nominal``; it assumes defects cover less than
    ``1 - drift_quantile`` of the image.

    Args:
        positive_margin: As in ``nominal``.
        negative_margin: As in ``nominal``.
        drift_quantile: Per-image quantile below which pixels are always taken as normal, in ``[0, 1]``.
        peak_window: As in ``nominal``.
        neighbourhood: As in ``nominal``.

    Example:
        >>> maps = torch.linspace(0.6, 0.8, 100).reshape(1, 10, 10)  # drifted: all above the nominal threshold
        >>> maps[0, 5, 5] = 1.0
        >>> int(NominalAware()(maps, nominal_threshold=0.5).positive.sum())
        99
        >>> labels = RobustNominal()(maps, nominal_threshold=0.5)
        >>> int(labels.positive.sum()), int(labels.negative.sum())
        (1, 49)
    """

    def __init__(
        self,
        positive_margin: float = 0.1,
        negative_margin: float = 0.1,
        drift_quantile: float = 0.5,
        peak_window: int = 3,
        neighbourhood: int = 1,
    ) -> None:
        super().__init__(positive_margin, negative_margin, peak_window, neighbourhood)
        check_range("drift_quantile", drift_quantile, 0.0, 1.0)
        self.drift_quantile = drift_quantile

    def bars(self, score_maps: Tensor, valid: Tensor, nominal_threshold: float) -> tuple[Tensor, Tensor]:
        positive_bar, negative_bar = super().bars(score_maps, valid, nominal_threshold)
        drift = (masked_quantile(score_maps, valid, self.drift_quantile) - negative_bar).nan_to_num(0.0).clamp(min=0)
        return positive_bar + drift, negative_bar + drift


@LABELERS.register("relative")
class PeakRelative(PseudoLabeler):
    """Bars placed within each image's own range, from its median to its maximum, above a nominal floor.

    Positives are pixels above ``median + positive_fraction * (max - median)``, negatives pixels below
    ``median + negative_fraction * (max - median)``. Because both bars move with the image's median, a drifted
    image (whose whole map rose) is labeled like an undrifted one; because they scale with the image's peak,
    a faint thin crack and a strong large defect both get a core of positives. An image is refined only if its
    peak clears the nominal floor ``nominal_threshold + floor_margin``, so defect-free images are left alone.

    Args:
        positive_fraction: Position of the positive bar in ``[median, max]``, in ``(0, 1)``.
        negative_fraction: Position of the negative bar in ``[median, max]``, in ``[0, positive_fraction)``.
        floor_margin: Offset of the floor from the nominal threshold (negative: below it).
        min_peak_deviations: Also require the peak to stand this many robust standard deviations
            (``1.4826 * MAD``) above the median; 0 disables the check.
        sure_margin: A peak above ``nominal_threshold + sure_margin`` skips that check: it is above every
            nominal validation pixel already (a large defect raises the median and the MAD with it).

    Example:
        >>> maps = torch.linspace(0.0, 0.2, 100).reshape(1, 10, 10)
        >>> maps[0, 4:6, 4:6] = 0.45  # a faint defect, below anomalib's threshold of 0.5
        >>> labels = PeakRelative()(maps, nominal_threshold=0.5)
        >>> int(labels.positive.sum()), int(labels.negative.sum())
        (4, 90)
        >>> int(PeakRelative()(maps * 0.3, nominal_threshold=0.5).positive.sum())  # peak below the floor
        0
    """

    def __init__(
        self,
        positive_fraction: float = 0.5,
        negative_fraction: float = 0.25,
        floor_margin: float = -0.35,
        min_peak_deviations: float = 3.5,
        sure_margin: float = 0.0,
    ) -> None:
        check_range("positive_fraction", positive_fraction, 0.0, 1.0)
        check_range("negative_fraction", negative_fraction, 0.0, positive_fraction)
        check_range("floor_margin", floor_margin, -1.0, 1.0)
        check_range("min_peak_deviations", min_peak_deviations, 0.0, float("inf"))
        check_range("sure_margin", sure_margin, floor_margin, float("inf"))
        self.positive_fraction = positive_fraction
        self.negative_fraction = negative_fraction
        self.floor_margin = floor_margin
        self.min_peak_deviations = min_peak_deviations
        self.sure_margin = sure_margin

    def __call__(self, score_maps: Tensor, nominal_threshold: float) -> PseudoLabels:
        valid = torch.isfinite(score_maps)
        median = masked_quantile(score_maps, valid, 0.5)
        peak = masked_quantile(score_maps, valid, 1.0)
        spread = peak - median
        floor = nominal_threshold + self.floor_margin
        positive_bar = (median + self.positive_fraction * spread).clamp(min=floor)
        negative_bar = median + self.negative_fraction * spread
        positive = valid & (score_maps > positive_bar[:, None, None])
        sure = peak > nominal_threshold + self.sure_margin
        # the deviation check only decides images whose peak is not sure; on CPU, skip it when there are none
        if self.min_peak_deviations > 0 and not (host_reads_are_free(sure) and bool(sure.all())):
            deviation = 1.4826 * masked_quantile((score_maps - median[:, None, None]).abs(), valid, 0.5)
            stands_out = spread > self.min_peak_deviations * deviation
            positive &= (stands_out | sure)[:, None, None]
        negative = valid & (score_maps < negative_bar[:, None, None]) & positive.flatten(1).any(dim=1)[:, None, None]
        return PseudoLabels(positive=positive, negative=negative)
