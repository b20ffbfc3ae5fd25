"""The refiner turns score maps into better masks, keeps masks it cannot refine, and is deterministic."""

import pytest
import torch

from anomalib_tts.classifiers import LinearSVM
from anomalib_tts.features import FeatureSource, Modalities
from anomalib_tts.pseudo_labels import NominalAware, RobustNominal
from anomalib_tts.refiner import Outcome, TestTimeRefiner


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


class _Colour(FeatureSource):
    """The images themselves as the only feature level."""

    def __call__(self, inputs: Modalities) -> list[torch.Tensor]:
        return [inputs.image]


_identity = _Colour()


def _f1(masks: torch.Tensor, truth: torch.Tensor) -> float:
    tp = (masks & truth).sum()
    return float(2 * tp / (masks.sum() + truth.sum()))


def test_refined_masks_beat_the_threshold_and_keep_shape_and_dtype() -> None:
    images, maps, truth = _scene()
    thresholded = maps > 0.5
    refiner = TestTimeRefiner(NominalAware(), _identity, LinearSVM())
    result = refiner(Modalities(images), maps, thresholded, 0.5, torch.arange(4))
    assert result.masks.shape == maps.shape
    assert result.masks.dtype == torch.bool
    assert result.refined.all()
    assert _f1(result.masks, truth) > 0.9
    assert _f1(thresholded, truth) < 0.7


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
    refiner = TestTimeRefiner(NominalAware(), _Wide(), classifier, max_channels=max_channels)
    result = refiner(Modalities(images), maps, maps > 0.5, 0.5, torch.arange(4))
    assert classifier.channels == fitted_on
    assert result.refined.all()
    assert _f1(result.masks, truth) > 0.8  # the defect's colour survives the projection


def test_images_without_confident_defects_keep_their_mask() -> None:
    images, maps, _ = _scene(batch=2)
    maps[1] = 0.3 * maps[1] / maps[1].max()  # no pixel above the nominal threshold
    original = torch.zeros_like(maps, dtype=torch.bool)
    original[1, 0, 0] = True
    result = TestTimeRefiner(RobustNominal(), _identity, LinearSVM())(
        Modalities(images), maps, original, 0.5, torch.arange(2)
    )
    assert result.outcome.tolist() == [Outcome.REFINED, Outcome.FEW_POSITIVES]
    assert torch.equal(result.masks[1], original[1])


def test_decision_values_are_the_soft_refined_mask_and_nan_where_the_mask_was_kept() -> None:
    images, maps, _ = _scene(batch=2)
    maps[1] = 0.3 * maps[1] / maps[1].max()  # not refined
    original = torch.zeros_like(maps, dtype=torch.bool)
    result = TestTimeRefiner(RobustNominal(), _identity, LinearSVM())(
        Modalities(images), maps, original, 0.5, torch.arange(2)
    )
    assert result.decision.shape == maps.shape
    assert torch.isfinite(result.decision[0]).all()
    assert torch.equal(result.decision[0] > 0, result.masks[0])
    assert 0 < int((result.decision[0] > 0).sum()) < maps[0].numel()
    assert torch.isnan(result.decision[1]).all()
    unrefined = TestTimeRefiner(RobustNominal(), _identity, LinearSVM())(
        Modalities(images[1:]), maps[1:], original[1:], 0.5, torch.arange(1)
    )
    assert torch.isnan(unrefined.decision).all()


def test_too_few_negatives_keeps_the_mask() -> None:
    images, maps, _ = _scene(batch=1)
    maps[:] = 0.95
    maps[0, 0, :3] = 0.0
    original = torch.zeros_like(maps, dtype=torch.bool)
    result = TestTimeRefiner(NominalAware(), _identity, LinearSVM())(
        Modalities(images), maps, original, 0.5, torch.arange(1)
    )
    assert result.outcome.tolist() == [Outcome.FEW_NEGATIVES]
    assert not result.masks.any()


def test_gating_leaves_ineligible_images_alone() -> None:
    images, maps, _ = _scene(batch=2)
    original = maps > 0.5
    refiner = TestTimeRefiner(NominalAware(), _identity, LinearSVM())
    result = refiner(Modalities(images), maps, original, 0.5, torch.arange(2), eligible=torch.tensor([False, True]))
    assert result.outcome.tolist() == [Outcome.GATED, Outcome.REFINED]
    assert torch.equal(result.masks[0], original[0])


def test_same_image_same_mask_whatever_the_batch() -> None:
    images, maps, _ = _scene()
    refiner = TestTimeRefiner(NominalAware(), _identity, LinearSVM(), max_positives=30, max_negatives=30)
    seeds = torch.tensor([7, 8, 9, 10])
    first = refiner(Modalities(images), maps, maps > 0.5, 0.5, seeds).masks
    again = refiner(Modalities(images), maps, maps > 0.5, 0.5, seeds).masks
    order = torch.tensor([3, 1, 0, 2])
    shuffled = refiner(Modalities(images[order]), maps[order], maps[order] > 0.5, 0.5, seeds[order]).masks
    alone = refiner(Modalities(images[2:3]), maps[2:3], maps[2:3] > 0.5, 0.5, seeds[2:3]).masks
    assert torch.equal(first, again)
    assert torch.equal(first[order], shuffled)
    assert torch.equal(first[2:3], alone)


def test_features_are_computed_only_when_an_image_is_refined() -> None:
    images, maps, _ = _scene(batch=2)
    calls = []

    def features(inputs: Modalities) -> list[torch.Tensor]:
        calls.append(inputs.image.shape[0])
        return [inputs.image]

    refiner = TestTimeRefiner(NominalAware(), features, LinearSVM())
    refiner(Modalities(images), 0.2 * maps, maps > 2, 0.5, torch.arange(2))
    assert calls == []


@pytest.mark.parametrize("argument", ["max_positives", "min_negatives"])
def test_invalid_sizes_name_the_argument(argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        TestTimeRefiner(NominalAware(), _identity, LinearSVM(), **{argument: 0})
