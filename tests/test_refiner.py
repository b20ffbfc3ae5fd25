"""The pipeline turns score maps into better masks, keeps masks it cannot refine, and is deterministic."""

import pytest
import torch

from anomalib_tts.pipeline.classifiers import LinearSVM
from anomalib_tts.pipeline.fallbacks import StableThreshold
from anomalib_tts.pipeline.features import FeatureSource, Modalities
from anomalib_tts.pipeline.labelers import NominalAware, RobustNominal
from anomalib_tts.pipeline.refinement import Outcome, RefinedMasks, RefinementInputs, RefinementPipeline
from tests.helpers import Colour, pooled_f1


def _scene(batch: int = 4, size: int = 48) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images whose first channel marks the defect exactly; score maps that see only a blurred blob of it."""
    generator = torch.Generator().manual_seed(0)
    truth = torch.zeros(batch, size, size, dtype=torch.bool)
    for index in range(batch):
        top, left = 6 + 5 * index, 10 + 3 * index
        truth[index, top : top + 12, left : left + 4] = True  # thin vertical defect
    images = torch.rand(batch, 3, size, size, generator=generator) * 0.2
    images[:, 0] += truth.float()
    blurred = torch.nn.functional.avg_pool2d(truth.float()[:, None], 9, stride=1, padding=4)[:, 0]
    maps = 0.3 * torch.rand(batch, size, size, generator=generator) + 0.7 * blurred / blurred.amax()
    return images, maps, truth


def _pipeline(pseudo_labels=None, features=None, **options) -> RefinementPipeline:
    """The nominal-aware recipe, the images' colour and the SVM; no self-check, anomalib's mask as the fallback."""
    options = {"self_check": "none", "fallback": "threshold", **options}
    return RefinementPipeline(pseudo_labels or NominalAware(), features or Colour(), LinearSVM(), **options)


def _refine(
    pipeline: RefinementPipeline, images: torch.Tensor, maps: torch.Tensor, masks: torch.Tensor, seeds=None, **more
) -> RefinedMasks:
    seeds = torch.arange(maps.shape[0]) if seeds is None else seeds
    return pipeline(RefinementInputs(Modalities(images), maps, masks, seeds, **more))


def test_refined_masks_beat_the_threshold_and_keep_shape_and_dtype() -> None:
    images, maps, truth = _scene()
    thresholded = maps > 0.5
    result = _refine(_pipeline(), images, maps, thresholded)
    assert result.masks.shape == maps.shape
    assert result.masks.dtype == torch.bool
    assert result.refined.all()
    assert pooled_f1(result.masks, truth) > 0.9
    assert pooled_f1(thresholded, truth) < 0.7


def test_the_product_defaults_refine_the_scene_too() -> None:
    """Growth check and stable fallback by default: the defects are traced, no image falls back."""
    images, maps, truth = _scene()
    pipeline = RefinementPipeline(features=Colour())
    assert (type(pipeline.self_check).__name__, type(pipeline.fallback).__name__) == (
        "BoundedGrowth",
        "StableThreshold",
    )
    result = _refine(pipeline, images, maps, maps > 0.5)
    assert result.refined.all()
    assert pooled_f1(result.masks, truth) > 0.9


class _Wide(FeatureSource):
    """The images' colour repeated over many channels, plus noise channels: wider than max_channels."""

    def __call__(self, inputs: Modalities) -> list[torch.Tensor]:
        noise = torch.rand(
            inputs.image.shape[0], 2, *inputs.image.shape[2:], generator=torch.Generator().manual_seed(1)
        )
        return [inputs.image.repeat(1, 8, 1, 1), noise]


class _RecordingSVM(LinearSVM):
    def fit(self, features: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor):
        self.channels = features.shape[2]
        return super().fit(features, labels, valid)


@pytest.mark.parametrize(("max_channels", "fitted_on"), [(16, 16), (None, 26), (64, 26)])
def test_features_wider_than_max_channels_are_fitted_in_their_projection(max_channels, fitted_on: int) -> None:
    images, maps, truth = _scene()
    classifier = _RecordingSVM()
    pipeline = RefinementPipeline(
        NominalAware(), _Wide(), classifier, self_check="none", fallback="threshold", max_channels=max_channels
    )
    result = _refine(pipeline, images, maps, maps > 0.5)
    assert classifier.channels == fitted_on
    assert result.refined.all()
    assert pooled_f1(result.masks, truth) > 0.8  # the defect's colour survives the projection


def test_images_without_confident_defects_get_the_fallback_mask() -> None:
    images, maps, _ = _scene(batch=2)
    maps[1] = 0.3 * maps[1] / maps[1].max()  # no pixel above the nominal threshold, nor above the stable floor
    original = torch.zeros_like(maps, dtype=torch.bool)
    original[1, 0, 0] = True  # a mask the fallbacks tell apart: the stable threshold's is empty
    stable = _refine(_pipeline(RobustNominal(), fallback="stable"), images, maps, original)
    assert stable.outcome.tolist() == [Outcome.REFINED, Outcome.FEW_POSITIVES]
    assert not stable.masks[1].any()
    threshold = _refine(_pipeline(RobustNominal(), fallback="threshold"), images, maps, original)
    assert threshold.outcome.tolist() == [Outcome.REFINED, Outcome.FEW_POSITIVES]
    assert torch.equal(threshold.masks[1], original[1])
    assert torch.equal(threshold.masks[0], stable.masks[0])  # the refined batchmate is the same either way


def test_decision_values_are_the_soft_refined_mask_and_nan_where_the_mask_was_not_refined() -> None:
    images, maps, _ = _scene(batch=2)
    maps[1] = 0.3 * maps[1] / maps[1].max()  # not refined
    original = torch.zeros_like(maps, dtype=torch.bool)
    result = _refine(_pipeline(RobustNominal()), images, maps, original)
    assert result.outcome.tolist() == [Outcome.REFINED, Outcome.FEW_POSITIVES]
    assert result.decision.shape == maps.shape
    assert torch.isfinite(result.decision[0]).all()
    assert torch.equal(result.decision[0] > 0, result.masks[0])
    assert 0 < int((result.decision[0] > 0).sum()) < maps[0].numel()
    assert torch.isnan(result.decision[1]).all()
    unrefined = _refine(_pipeline(RobustNominal()), images[1:], maps[1:], original[1:])
    assert unrefined.outcome.tolist() == [Outcome.FEW_POSITIVES]
    assert torch.isnan(unrefined.decision).all()


def test_too_few_negatives_keeps_the_mask_not_the_fallbacks() -> None:
    images, maps, _ = _scene(batch=1)
    maps[:] = 0.95
    maps[0, 0, :3] = 0.0
    original = torch.zeros_like(maps, dtype=torch.bool)
    fallback = StableThreshold()(maps, original, 0.5)
    assert fallback.any()  # what the image would get if it fell back: not its own (empty) mask
    result = _refine(_pipeline(fallback=StableThreshold()), images, maps, original)
    assert result.outcome.tolist() == [Outcome.FEW_NEGATIVES]
    assert not result.masks.any()


def test_gating_leaves_ineligible_images_alone() -> None:
    images, maps, _ = _scene(batch=2)
    original = maps > 0.5
    original[0, -4:, -4:] = True  # anomalib's mask has a stray corner neither refinement nor fallback gives
    assert not torch.equal(StableThreshold()(maps[:1], original[:1], 0.5)[0], original[0])
    pipeline = _pipeline(fallback="stable")
    result = _refine(pipeline, images, maps, original, eligible=torch.tensor([False, True]))
    assert result.outcome.tolist() == [Outcome.GATED, Outcome.REFINED]
    assert torch.equal(result.masks[0], original[0])
    assert not torch.equal(result.masks[1], original[1])


def test_same_image_same_mask_whatever_the_batch() -> None:
    images, maps, _ = _scene()
    pipeline = _pipeline(max_positives=30, max_negatives=30)
    seeds = torch.tensor([7, 8, 9, 10])
    first = _refine(pipeline, images, maps, maps > 0.5, seeds).masks
    again = _refine(pipeline, images, maps, maps > 0.5, seeds).masks
    order = torch.tensor([3, 1, 0, 2])
    shuffled = _refine(pipeline, images[order], maps[order], maps[order] > 0.5, seeds[order]).masks
    alone = _refine(pipeline, images[2:3], maps[2:3], maps[2:3] > 0.5, seeds[2:3]).masks
    assert torch.equal(first, again)
    assert torch.equal(first[order], shuffled)
    assert torch.equal(first[2:3], alone)
    decision = _refine(pipeline, images, maps, maps > 0.5, seeds).decision
    other_seeds = _refine(pipeline, images, maps, maps > 0.5, seeds + 100).decision
    assert not torch.equal(decision, other_seeds)  # the seeds choose the 30 pixels, so they do matter


class _Counting(Colour):
    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, inputs: Modalities) -> list[torch.Tensor]:
        self.calls.append(inputs.image.shape[0])
        return super().__call__(inputs)


def test_features_are_computed_only_when_an_image_is_refined() -> None:
    images, maps, _ = _scene(batch=2)
    features = _Counting()
    pipeline = _pipeline(features=features)
    result = _refine(pipeline, images, 0.2 * maps, maps > 2)
    assert result.outcome.tolist() == [Outcome.FEW_POSITIVES] * 2
    assert features.calls == []
    _refine(pipeline, images, maps, maps > 0.5)
    assert features.calls == [2]  # the whole batch, once


@pytest.mark.parametrize("argument", ["max_positives", "min_negatives"])
def test_invalid_sizes_name_the_argument(argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        _pipeline(**{argument: 0})
