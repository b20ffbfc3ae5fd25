"""Self-checks decide which refined masks an image's own evidence supports; fallback masks serve the others."""

import pytest
import torch

from anomalib_tts.pipeline.checks import SELF_CHECKS, BoundedGrowth, Evidence, NoCheck
from anomalib_tts.pipeline.classifiers import LogisticRegression
from anomalib_tts.pipeline.fallbacks import FALLBACKS, StableThreshold, ThresholdMask
from anomalib_tts.pipeline.features import Modalities
from anomalib_tts.pipeline.labelers import PeakRelative
from anomalib_tts.pipeline.refinement import Outcome, RefinedMasks, RefinementInputs, RefinementPipeline
from tests.helpers import Colour

SIZE = 64


def _disk(radius: float, size: int = SIZE) -> torch.Tensor:
    coordinates = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    return coordinates[:, None] ** 2 + coordinates[None, :] ** 2 <= radius**2


def _wide_blob_over_a_small_defect() -> tuple[torch.Tensor, torch.Tensor]:
    """A 4-pixel-wide defect at the centre; the map sees it as a smooth blob ten times as wide (40 pixels)."""
    defect = _disk(2.0)
    coordinates = torch.arange(SIZE, dtype=torch.float32) - (SIZE - 1) / 2
    squared = coordinates[:, None] ** 2 + coordinates[None, :] ** 2
    blob = torch.exp(-squared / (2 * 12.0**2))  # falls to 1/4 of its peak at a radius of about 20
    return (0.1 + 0.8 * blob)[None], defect[None]


def _evidence(score_maps: torch.Tensor, decision: torch.Tensor) -> Evidence:
    return Evidence(score_maps, PeakRelative()(score_maps, 0.5), decision, 0.5)


def test_growth_rejects_a_mask_that_fills_a_blob_ten_times_wider_than_the_defect() -> None:
    maps, defect = _wide_blob_over_a_small_defect()
    evidence = _evidence(maps, torch.where(maps > 0.15, 1.0, -1.0))  # the classifier filled the blob's surround
    positives = int(evidence.labels.positive.sum())
    assert positives > 20 * int(defect.sum())  # the bar at half the range: positives already cover the blob
    assert int((evidence.decision > 0).sum()) > 3 * positives
    assert BoundedGrowth(max_growth=3.0)(evidence).tolist() == [False]
    assert NoCheck()(evidence).tolist() == [True]


def test_growth_keeps_a_mask_that_stays_near_its_positives() -> None:
    maps, _ = _wide_blob_over_a_small_defect()
    positive = PeakRelative()(maps, 0.5).positive
    traced = torch.where(_disk(float(positive.sum() ** 0.5 * 0.7))[None], 1.0, -1.0)  # about the positives' area
    assert BoundedGrowth(max_growth=3.0)(_evidence(maps, traced)).tolist() == [True]
    shrunk = torch.where(defect_only := _disk(2.0)[None], 1.0, -1.0)  # far smaller than its positives is fine
    assert defect_only.any()
    assert BoundedGrowth(max_growth=3.0)(_evidence(maps, shrunk)).tolist() == [True]


def test_growth_is_per_image_in_a_batch() -> None:
    maps, _ = _wide_blob_over_a_small_defect()
    maps = maps.repeat(2, 1, 1)
    decision = torch.stack([torch.where(maps[0] > 0.15, 1.0, -1.0), torch.where(maps[1] > 0.6, 1.0, -1.0)])
    assert BoundedGrowth(max_growth=3.0)(_evidence(maps, decision)).tolist() == [False, True]


@pytest.mark.parametrize("max_growth", [0.5, float("nan")])
def test_growth_below_one_is_refused_with_its_value(max_growth: float) -> None:
    with pytest.raises(ValueError, match="max_growth must be at least 1"):
        BoundedGrowth(max_growth=max_growth)


def test_stable_threshold_leaves_a_defect_free_map_empty() -> None:
    generator = torch.Generator().manual_seed(0)
    noise = 0.1 + 0.3 * torch.rand(3, SIZE, SIZE, generator=generator)  # peaks below the floor of 0.4
    assert not StableThreshold()(noise, noise > 0.5, 0.5).any()
    assert StableThreshold(floor=0.0)(noise, noise > 0.5, 0.5).any()  # swept into the noise, it finds "defects"


def test_stable_threshold_finds_a_defect_on_a_drifted_map_that_the_threshold_marks_whole() -> None:
    defect = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    defect[0, 20:32, 24:36] = True
    shading = torch.linspace(0.55, 0.69, SIZE).expand(1, SIZE, SIZE)  # the whole map rose, unevenly
    drifted = torch.where(defect, 0.95, shading)
    assert bool((drifted > 0.5).all())  # anomalib's mask: the whole image
    assert bool((StableThreshold()(drifted, drifted > 0.5, 0.5) == defect).all())


def test_stable_threshold_reaches_into_noise_above_its_floor() -> None:
    """MEBin's criterion: eroded noise adds no component, so the stable run ends inside the noise band."""
    defect = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    defect[0, 20:32, 24:36] = True
    noise = 0.45 + 0.07 * torch.rand(1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    noisy = torch.where(defect, 0.95, noise)
    mask = StableThreshold()(noisy, noisy > 0.5, 0.5)
    assert bool(mask[defect].all())
    assert int(mask.sum()) > 2 * int((noisy > 0.5).sum())  # more noise than anomalib's threshold lets in
    assert bool((StableThreshold(floor=0.55)(noisy, noisy > 0.5, 0.5) == defect).all())  # a floor above it


def test_stable_threshold_of_an_image_does_not_depend_on_its_batchmates() -> None:
    generator = torch.Generator().manual_seed(2)
    maps = 0.2 * torch.rand(3, SIZE, SIZE, generator=generator)
    maps[0, 10:20, 10:20] = 0.7
    maps[1, 30:50, 30:50] = 1.0
    maps[2, 5:13, 40:48] = 0.6
    together = StableThreshold()(maps, maps > 0.5, 0.5)
    alone = torch.cat(
        [StableThreshold()(maps[index : index + 1], maps[index : index + 1] > 0.5, 0.5) for index in range(3)]
    )
    assert bool((together == alone).all())
    assert [int(mask.sum()) for mask in together] == [100, 400, 64]


def test_stable_threshold_ignores_non_finite_scores() -> None:
    maps = torch.zeros(1, SIZE, SIZE)
    maps[0, 10:20, 10:20] = 0.9
    maps[0, 0, :5] = float("nan")
    mask = StableThreshold()(maps, maps > 0.5, 0.5)
    assert int(mask.sum()) == 100
    assert not mask[0, 0, :5].any()


@pytest.mark.parametrize(
    ("options", "argument"),
    [({"floor": 1.0}, "floor"), ({"sample_rate": 0}, "sample_rate"), ({"min_interval_len": 2.5}, "min_interval_len")],
)
def test_stable_threshold_refuses_bad_options_naming_them(options: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        StableThreshold(**options)


def test_threshold_mask_returns_the_images_own_masks() -> None:
    masks = torch.rand(2, 8, 8) > 0.5
    assert ThresholdMask()(torch.rand(2, 8, 8), masks, 0.5) is masks


def test_registries_name_the_known_checks_and_fallbacks() -> None:
    assert (SELF_CHECKS.get("growth"), SELF_CHECKS.get("none")) == (BoundedGrowth, NoCheck)
    assert (FALLBACKS.get("stable"), FALLBACKS.get("threshold")) == (StableThreshold, ThresholdMask)
    with pytest.raises(ValueError, match=r"unknown self-check 'nonsense'; choose one of \['growth', 'none'\]"):
        SELF_CHECKS.create("nonsense")
    with pytest.raises(ValueError, match=r"unknown fallback mask 'nonsense'; choose one of \[.*'stable'") as raised:
        FALLBACKS.create("nonsense")
    assert "'threshold'" in str(raised.value)


def _refine(
    self_check, fallback, images: torch.Tensor, maps: torch.Tensor, masks: torch.Tensor, eligible=None
) -> RefinedMasks:
    pipeline = RefinementPipeline(
        PeakRelative(), Colour(), LogisticRegression(), self_check=self_check, fallback=fallback
    )
    return pipeline(RefinementInputs(Modalities(images), maps, masks, torch.tensor([0, 1]), eligible=eligible))


def _scene() -> tuple[torch.Tensor, torch.Tensor]:
    """Image 0: a defect the map sees as a wide blob, the colour of the blob's surround; image 1: a sharp defect."""
    maps, _ = _wide_blob_over_a_small_defect()
    images = torch.zeros(2, 3, SIZE, SIZE)
    images[0, 0] = (maps[0] > 0.12).float()  # the whole blob looks alike: the classifier fills it
    sharp = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    sharp[20:30, 20:30] = True
    images[1, 1] = sharp.float()
    maps = torch.cat([maps, torch.where(sharp, 0.9, 0.1)[None]])
    return images, maps


def test_an_image_failing_the_self_check_gets_the_fallback_and_is_marked() -> None:
    images, maps = _scene()
    anomalib_masks = maps > 0.5
    unchecked = _refine(NoCheck(), ThresholdMask(), images, maps, anomalib_masks)
    assert unchecked.outcome.tolist() == [Outcome.REFINED, Outcome.REFINED]
    assert not torch.equal(unchecked.masks[0], anomalib_masks[0])  # the refined mask is not anomalib's
    checked = _refine(BoundedGrowth(), ThresholdMask(), images, maps, anomalib_masks)
    assert checked.outcome.tolist() == [Outcome.SELF_CHECK_FAILED, Outcome.REFINED]
    assert torch.equal(checked.masks[0], anomalib_masks[0])  # the threshold fallback: anomalib's mask
    assert torch.equal(checked.masks[1], unchecked.masks[1])  # its batchmate is refined as before
    assert bool(checked.decision[0].isnan().all())
    stable = _refine(BoundedGrowth(), StableThreshold(), images, maps, anomalib_masks)
    stable_mask = StableThreshold()(maps[:1], anomalib_masks[:1], 0.5)[0]
    assert not torch.equal(stable_mask, anomalib_masks[0])  # the two fallbacks can be told apart
    assert torch.equal(stable.masks[0], stable_mask)
    assert torch.equal(stable.masks[1], unchecked.masks[1])


def test_gated_images_keep_anomalibs_mask_whatever_the_fallback() -> None:
    images, maps = _scene()
    anomalib_masks = torch.zeros_like(maps, dtype=torch.bool)
    eligible = torch.tensor([True, False])
    result = _refine(BoundedGrowth(), StableThreshold(), images, maps, anomalib_masks, eligible)
    assert result.outcome.tolist() == [Outcome.SELF_CHECK_FAILED, Outcome.GATED]
    fallback = StableThreshold()(maps, anomalib_masks, 0.5)
    assert fallback.flatten(1).any(dim=1).tolist() == [True, True]  # the fallback would mark both defects
    assert torch.equal(result.masks[0], fallback[0])  # failed the check: the stable threshold's mask
    assert not result.masks[1].any()  # gated: anomalib's (empty) mask, not the fallback's
