"""The baselines ``compare`` scores: anomalib 2.7's SuperADD threshold and MEBin masks, against anomalib's own code."""

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from anomalib_tts.pipeline.thresholds import stable_threshold
from anomalib_tts.tools.baselines import mebin_masks, superadd_threshold


def _smooth_maps(seed: int, count: int, size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    maps = F.avg_pool2d(torch.rand(count, 1, size, size, generator=generator), 7, 1, 3)[:, 0]
    for index in range(count):  # blobs of several sizes and heights, some images without one
        if index % 3 != 2:
            row, col = torch.randint(4, size - 12, (2,), generator=generator).tolist()
            extent = 3 + 2 * index
            maps[index, row : row + extent, col : col + extent] += 0.2 + 0.1 * index
    return (maps - maps.amin()) / (maps.amax() - maps.amin())


@pytest.mark.parametrize(
    ("seed", "options"), [(0, {}), (1, {"erode": False}), (2, {"kernel_size": 3, "sample_rate": 8})]
)
def test_mebin_masks_equal_anomalibs(seed: int, options: dict) -> None:
    from anomalib.post_processing.mebin import mebin_binarize

    maps = _smooth_maps(seed, count=5, size=40)
    expected, _ = mebin_binarize(maps[:, None], **options)
    masks = mebin_masks(maps, **options)
    assert masks.dtype == torch.bool
    assert masks.any()  # the comparison is not between two empty batches
    assert torch.equal(masks, expected[:, 0].bool())


def test_mebin_masks_depend_on_the_batch_as_anomalibs_do() -> None:
    maps = _smooth_maps(3, count=4, size=40)
    alone = mebin_masks(maps[:1])
    together = mebin_masks(maps)[:1]
    assert not torch.equal(alone, together)  # the sweep spans the batch's peaks


def test_mebin_masks_of_flat_maps_are_empty() -> None:
    assert not mebin_masks(torch.full((2, 16, 16), 0.3)).any()


def test_stable_threshold_picks_the_longest_constant_run() -> None:
    # two components for 5 steps (indices 4-8) beat one component for 3: the run ends at index 8, 255 - 8 * 4
    assert stable_threshold([0, 1, 1, 1, 2, 2, 2, 2, 2, 1], min_interval_len=4, sample_rate=4) == 223
    assert stable_threshold([0, 1, 1, 2, 3], min_interval_len=4, sample_rate=4) == 255  # no run is long enough


def test_superadd_threshold_is_the_percentile_times_the_factor() -> None:
    pixels = torch.arange(1, 201, dtype=torch.float32)  # 1..200: the 95th percentile (lower) is 190
    assert superadd_threshold(pixels) == pytest.approx(190 * 1.421)
    assert superadd_threshold(pixels, percentile=50, factor=1.0) == pytest.approx(100)
    with pytest.raises(ValueError, match="percentile"):
        superadd_threshold(pixels, percentile=120)
