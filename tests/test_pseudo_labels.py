"""Pseudo-label recipes put positives and negatives where they belong."""

import pytest
import torch

from anomalib_tts.pipeline.labelers import (
    LABELERS,
    NominalAware,
    PeakRelative,
    PercentilePeaks,
    RobustNominal,
    masked_quantile,
)


def _map_with_square(
    size: int = 64, low: float = 0.2, high: float = 0.9, square: slice = slice(10, 40)
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    maps = low + 0.1 * torch.rand(1, size, size, generator=generator)
    maps[0, square, square] = high + 0.05 * torch.rand(
        square.stop - square.start, square.stop - square.start, generator=generator
    )
    return maps


def test_percentile_finds_the_planted_peak_and_its_neighbours() -> None:
    maps = 0.1 * torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(1))
    maps[0, 5, 7] = 1.0
    maps[1, 20, 3] = 1.0
    labels = PercentilePeaks(percentile=99.5)(maps, nominal_threshold=0.5)
    assert labels.positive[0, 4:7, 6:9].all()
    assert labels.positive[1, 19:22, 2:5].all()
    assert not (labels.positive & labels.negative).any()


def test_nominal_negatives_never_fall_inside_a_large_defect() -> None:
    maps = _map_with_square()  # the defect covers 22% of the image
    labels = NominalAware()(maps, nominal_threshold=0.5)
    inside = torch.zeros_like(labels.positive)
    inside[0, 10:40, 10:40] = True
    assert not (labels.negative & inside).any()
    assert labels.positive[inside].all()
    assert not (labels.positive & ~inside).any()


def test_percentile_recipe_leaks_defect_pixels_into_negatives() -> None:
    """The failure the nominal-aware recipes fix: with a large defect the paper's negatives contain it."""
    maps = _map_with_square()
    labels = PercentilePeaks()(maps, nominal_threshold=0.5)
    assert labels.negative[0, 10:40, 10:40].float().mean() > 0.5


def test_nominal_labels_a_defect_free_map_without_positives() -> None:
    maps = 0.4 * torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2))
    for name in ("nominal", "robust"):
        labels = LABELERS.get(name)()(maps, nominal_threshold=0.5)
        assert not labels.positive.any(), name


def test_robust_survives_a_drifted_map_where_nominal_calls_everything_defective() -> None:
    maps = _map_with_square(low=0.65, high=1.0)  # drift: the normal part sits above the nominal threshold
    inside = torch.zeros(1, 64, 64, dtype=torch.bool)
    inside[0, 10:40, 10:40] = True
    nominal = NominalAware()(maps, nominal_threshold=0.5)
    assert nominal.positive[~inside].float().mean() > 0.9
    robust = RobustNominal()(maps, nominal_threshold=0.5)
    assert robust.positive[~inside].float().mean() < 0.01
    assert robust.positive[inside].float().mean() > 0.9
    assert robust.negative.sum() > 100
    assert not (robust.negative & inside).any()


@pytest.mark.parametrize("name", ["percentile", "nominal", "robust"])
def test_non_finite_pixels_are_never_labeled(name: str) -> None:
    maps = _map_with_square()
    maps[0, :5] = float("nan")
    maps[0, 20, :] = float("inf")
    maps[0, 21, :] = float("-inf")
    labels = LABELERS.get(name)()(maps, nominal_threshold=0.5)
    bad = ~torch.isfinite(maps)
    assert not (labels.positive & bad).any()
    assert not (labels.negative & bad).any()
    assert labels.positive.any()


@pytest.mark.parametrize("quantile", [0.0, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("kept_fraction", [1.0, 0.7, 0.05])
def test_masked_quantile_matches_sorted_valid_pixels(quantile: float, kept_fraction: float) -> None:
    values = torch.rand(3, 10, 13, generator=torch.Generator().manual_seed(3))
    valid = torch.rand(3, 10, 13, generator=torch.Generator().manual_seed(4)) < kept_fraction
    valid[0] = True  # images of one batch with different numbers of valid pixels
    result = masked_quantile(values, valid, quantile)
    for index in range(3):
        kept = values[index][valid[index]].sort().values
        assert result[index] == kept[int((kept.numel() - 1) * quantile)]
    assert masked_quantile(values, torch.zeros_like(valid), 0.5).isnan().all()


@pytest.mark.parametrize(
    ("factory", "argument"),
    [
        (lambda: PercentilePeaks(percentile=-1), "percentile"),
        (lambda: PercentilePeaks(percentile=150.0), "percentile"),
        (lambda: PeakRelative(positive_fraction=-0.5), "positive_fraction"),
        (lambda: PercentilePeaks(peak_window=4), "peak_window"),
        (lambda: NominalAware(negative_margin=2), "negative_margin"),
        (lambda: RobustNominal(drift_quantile=1.5), "drift_quantile"),
    ],
)
def test_invalid_arguments_name_the_argument(factory, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        factory()


def test_unknown_recipe_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="percentile"):
        LABELERS.get("magic")


def test_percentile_counts_a_saturated_maximum() -> None:
    """anomalib's normalized maps clip at 1: a defect wider than 1% of the image is a plateau at the percentile."""
    maps = 0.2 * torch.rand(1, 40, 40, generator=torch.Generator().manual_seed(5))
    maps[0, 5:15, 5:15] = 1.0  # 6% of the image saturated
    labels = PercentilePeaks()(maps, nominal_threshold=0.5)
    assert labels.positive[0, 5:15, 5:15].all()
    assert not labels.positive[0, 20:, 20:].any()


@pytest.mark.parametrize("low", [0.2, 0.65], ids=["nominal-level", "drifted"])
def test_relative_labels_a_large_defect_with_or_without_drift(low: float) -> None:
    maps = _map_with_square(low=low, high=low + 0.7)
    inside = torch.zeros(1, 64, 64, dtype=torch.bool)
    inside[0, 10:40, 10:40] = True
    labels = LABELERS.get("relative")()(maps, nominal_threshold=0.5)
    assert labels.positive[inside].float().mean() > 0.9
    assert not (labels.positive & ~inside).any()
    assert not (labels.negative & inside).any()
    assert labels.negative[~inside].float().mean() > 0.9


def test_relative_leaves_a_defect_free_map_unlabeled() -> None:
    maps = 0.3 * torch.rand(4, 32, 32, generator=torch.Generator().manual_seed(6))  # noise only
    labels = LABELERS.get("relative")()(maps, nominal_threshold=0.5)
    assert not labels.positive.any()
    assert not labels.negative.any()


def test_relative_refines_a_diffuse_defect_above_the_nominal_threshold() -> None:
    """A map that rises smoothly to 0.8 has no peak standing out from its spread, but its top is above every
    nominal validation pixel (0.5), so it is labeled; with that shortcut disabled it is left alone."""
    maps = torch.linspace(0.0, 0.8, 64)[None, None, :].expand(1, 64, 64).contiguous()
    labels = LABELERS.get("relative")()(maps, nominal_threshold=0.5)
    assert labels.positive.any()
    assert (maps[labels.positive] > 0.6).all()  # median + half the spread
    assert (maps[labels.negative] < 0.5).all()  # median 0.4 + a quarter of the 0.4 spread
    strict = LABELERS.get("relative")(sure_margin=1.0)(maps, nominal_threshold=0.5)
    assert not strict.positive.any()
    assert not strict.negative.any()


def test_relative_sure_margin_may_not_sit_below_the_floor() -> None:
    with pytest.raises(ValueError, match="sure_margin"):
        LABELERS.get("relative")(floor_margin=-0.2, sure_margin=-0.3)


def test_relative_labels_an_image_the_same_whether_or_not_a_batchmate_needs_the_deviation_check() -> None:
    """A sure peak skips the spread check; a batch of sure peaks skips computing it. Either way, same labels."""
    sure = _map_with_square(low=0.1, high=0.9)  # peak above the nominal threshold
    unsure = 0.2 * torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(7))
    unsure[0, 30, 30] = 0.45  # a faint peak: the deviation check decides
    labeler = LABELERS.get("relative")()
    alone = labeler(sure, nominal_threshold=0.5)
    together = labeler(torch.cat((sure, unsure)), nominal_threshold=0.5)
    assert torch.equal(alone.positive[0], together.positive[0])
    assert torch.equal(alone.negative[0], together.negative[0])
    assert torch.equal(labeler(unsure, nominal_threshold=0.5).positive[0], together.positive[1])
    assert together.positive[1].any()  # the faint peak stands out of its flat map
