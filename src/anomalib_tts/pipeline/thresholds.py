"""MEBin's stable threshold (AnomalyNCD, CVPR 2025; anomalib 2.7's ``MEBinPostProcessor``), computed fast.

A map is cut at a sweep of thresholds, each cut eroded and its connected components counted; the threshold is the
lower end of the longest run of a constant, non-zero count. anomalib counts components with kornia's iterative
labelling, seconds per map on a CPU; here the counts come from ``scipy.ndimage.label`` (8-connectivity, as
kornia's 3x3 max-pooling) and the erosion from one grey-level minimum filter, which give the same thresholds in
milliseconds.
"""

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from anomalib_tts.pipeline.devices import to_device


def erode_maps(maps: Tensor, kernel_size: int) -> Tensor:
    """``(B, H, W)`` grey-level erosion (minimum filter) with kornia's square kernel and geodesic border.

    A binary map cut from the result at ``t`` is kornia's ``erosion`` of the map cut at ``t`` (a pixel stays in
    the eroded set exactly when its whole window lies above ``t``), so one filter serves every threshold of a
    sweep. The kernel's origin is at ``kernel_size // 2``, as in kornia.

    Example:
        >>> erode_maps(torch.tensor([[[0.0, 1.0, 1.0, 1.0]]]), 2).tolist()
        [[[0.0, 0.0, 1.0, 1.0]]]
    """
    before = kernel_size // 2
    after = kernel_size - 1 - before
    padded = F.pad(maps[:, None].float(), (before, after, before, after), value=float("inf"))
    return -F.max_pool2d(-padded, kernel_size, stride=1)[:, 0]


def stable_thresholds(
    scaled: Tensor, sample_rate: int = 4, min_interval_len: int = 4, kernel_size: int | None = 6
) -> Tensor:
    """MEBin's threshold of each map on the ``[0, 255]`` scale: the sweep, the erosion, the component counts.

    Args:
        scaled: ``(B, H, W)`` maps on the ``[0, 255]`` scale of the sweep.
        sample_rate: Step of the sweep.
        min_interval_len: Shortest stable run of the component count, in sweep steps.
        kernel_size: Side of the square erosion kernel; ``None`` counts components without erosion.

    Returns:
        ``(B,)`` thresholds; a mask is ``scaled > threshold``.
    """
    if kernel_size is not None:
        scaled = erode_maps(scaled, kernel_size)
    levels = list(range(255, -1, -sample_rate))
    thresholds = [
        stable_threshold(component_counts(image, levels), min_interval_len, sample_rate)
        for image in scaled.float().cpu().numpy()
    ]
    return to_device(torch.tensor(thresholds, dtype=scaled.dtype), scaled.device)


def component_counts(image: np.ndarray, levels: Sequence[float]) -> list[int]:
    """Connected components (8-connectivity) of ``image > level`` for each level.

    Every cut lies inside the bounding box of the lowest one, and cuts at or above the image's maximum are empty,
    so only that box is labeled, and only at the levels below its maximum: the same counts as labeling the whole
    image at every level, at a fraction of the cost when the map's high values are concentrated.

    Example:
        >>> image = np.zeros((8, 8), dtype=np.float32)
        >>> image[1, 1], image[1, 5], image[5, 5] = 9.0, 5.0, 5.0
        >>> component_counts(image, [10, 6, 4, 0])
        [0, 1, 3, 3]
    """
    from scipy import ndimage

    rows = np.flatnonzero((image > min(levels)).any(axis=1))
    columns = np.flatnonzero((image > min(levels)).any(axis=0))
    if rows.size == 0:
        return [0] * len(levels)
    box = image[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
    peak = float(box.max())
    connectivity = np.ones((3, 3), dtype=bool)
    return [ndimage.label(box > level, structure=connectivity)[1] if level < peak else 0 for level in levels]


def stable_threshold(component_counts: Sequence[int], min_interval_len: int, sample_rate: int) -> int:
    """MEBin's threshold on the ``[0, 255]`` sweep: the end of the longest run of a constant, non-zero count.

    Args:
        component_counts: Connected components at thresholds ``255, 255 - sample_rate, ...`` (high to low).
        min_interval_len: Shortest run that counts.
        sample_rate: Step of the sweep.

    Returns:
        The threshold at the lower end of the longest run of the count that has the longest run; 255 when no
        run is long enough (no anomaly).

    Example:
        >>> stable_threshold([0, 1, 1, 1, 1, 2, 2, 3], min_interval_len=4, sample_rate=4)  # ones: 4 long, ending at 4
        239
    """
    runs: dict[int, list[tuple[int, int]]] = {}
    start = 0
    while start < len(component_counts):
        end = start
        while end + 1 < len(component_counts) and component_counts[end + 1] == component_counts[start]:
            end += 1
        if component_counts[start] != 0 and end - start + 1 >= min_interval_len:
            runs.setdefault(component_counts[start], []).append((start, end))
        start = end + 1
    if not runs:
        return 255
    longest = {count: max(end - begin + 1 for begin, end in spans) for count, spans in runs.items()}
    best_count = max(longest, key=lambda count: longest[count])  # the first count reaching the longest run
    _, end = max(runs[best_count], key=lambda span: span[1] - span[0] + 1)
    return max(255 - end * sample_rate, 0)
