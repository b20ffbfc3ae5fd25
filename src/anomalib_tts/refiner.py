"""The refinement pipeline, pure torch: score map -> pseudo-labels -> pixel features -> classifier -> mask."""

from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor

from anomalib_tts.checks import Evidence, FallbackMask, NoCheck, SelfCheck, ThresholdMask
from anomalib_tts.classifiers import PixelClassifier
from anomalib_tts.features import FeaturePyramid, FeatureSource, Modalities, flat_to_grid
from anomalib_tts.pseudo_labels import PseudoLabeler, PseudoLabels
from anomalib_tts.sampling import sample_pixels
from anomalib_tts.validation import check_count

DEFAULT_MAX_CHANNELS = 256  # docs/speed.md: its speed with WideResNet-50, its masks on real features
POSITIVE_STREAM = 1
NEGATIVE_STREAM = 2


class Outcome(IntEnum):
    """What happened to one image."""

    REFINED = 0
    GATED = 1  # not eligible (e.g. anomalib's pred_label is normal)
    FEW_POSITIVES = 2  # no confident defect: the image keeps its mask
    FEW_NEGATIVES = 3
    FIT_FAILED = 4  # the classifier produced no finite model
    FEW_VALID = 5  # too few finite scores in the map (NaN/inf) to label both classes
    SELF_CHECK_FAILED = 6  # fitted, but the image's own evidence does not support the refined mask


FALLBACK_OUTCOMES = (Outcome.FEW_POSITIVES, Outcome.SELF_CHECK_FAILED)  # images that get the fallback mask
STAGE_PREFIX = "tts."


def stage(name: str) -> torch.profiler.record_function:
    """Marks one stage of the refinement for ``torch.profiler`` (``tts.<name>``; ``benchmark_speed.py --stages``)."""
    return torch.profiler.record_function(STAGE_PREFIX + name)


@dataclass
class Refinement:
    """Result for a batch.

    Attributes:
        masks: ``(B, H, W)`` bool, the refined mask where ``outcome == REFINED``, the fallback mask where it is
            ``FEW_POSITIVES`` or ``SELF_CHECK_FAILED`` (by default the original too), the original elsewhere.
        outcome: ``(B,)`` int64 :class:`Outcome` codes.
        num_positives: ``(B,)`` positives used for fitting (after the cap).
        num_negatives: ``(B,)`` negatives used for fitting (after the cap).
        decision: ``(B, H, W)`` float, the classifier's decision value at every pixel of the refined images (the
            refined mask is ``decision > 0``), ``nan`` for the others: a soft map to threshold differently.
    """

    masks: Tensor
    outcome: Tensor
    num_positives: Tensor
    num_negatives: Tensor
    decision: Tensor

    @property
    def refined(self) -> Tensor:
        """``(B,)`` bool, images whose mask was replaced."""
        return self.outcome == Outcome.REFINED


@dataclass
class TrainingPixels:
    """The pixels of each image drawn from its pseudo-labels to fit the classifier on, positives first.

    Attributes:
        index: ``(B, P + N)`` flat pixel indices of the score map.
        valid: ``(B, P + N)`` bool, slots that hold a drawn pixel (an image with fewer candidates has empty ones).
        targets: ``(B, P + N)`` +1 (defective) for the first ``P`` slots, -1 (normal) for the others.
        num_positives: ``(B,)`` drawn positives.
        num_negatives: ``(B,)`` drawn negatives.
    """

    index: Tensor
    valid: Tensor
    targets: Tensor
    num_positives: Tensor
    num_negatives: Tensor


class TestTimeRefiner:
    """Refines a batch of binary masks from its score maps and modalities.

    The stages, in order: the pseudo-label recipe labels each map, :meth:`draw` samples training pixels from the
    labels, :meth:`screen` decides which images can be refined, the feature source computes the batch's features,
    the classifier fits one model per image on the features at the drawn pixels, the fitted decision labels
    every pixel of the images it fitted, and the self-check decides which of those refined masks to keep. Images
    without a confident defect and those that fail the self-check get the fallback mask.

    Args:
        labeler: Pseudo-label recipe.
        features: Pixel-feature source (already ``setup``).
        classifier: Per-image classifier.
        max_positives: Cap on the positives sampled per image.
        max_negatives: Cap on the negatives sampled per image.
        min_positives: Fewer confident positives than this: the image keeps its mask.
        min_negatives: Fewer confident negatives than this: the image keeps its mask.
        self_check: Decides which refined masks the images' own evidence supports (:mod:`anomalib_tts.checks`).
        fallback: The mask of the images without a confident defect or failing the self-check.
        max_channels: Features wider than this are reduced to this many channels, each level to its dominant
            channel subspace (:class:`~anomalib_tts.features.FeaturePyramid`), before the fit; ``None`` fits on
            every channel.

    Example:
        >>> from anomalib_tts.classifiers import LinearSVM
        >>> from anomalib_tts.pseudo_labels import NominalAware
        >>> images = torch.rand(2, 3, 32, 32)
        >>> maps = torch.rand(2, 32, 32) * 0.3
        >>> maps[0, 8:16, 8:16] = 0.9
        >>> refiner = TestTimeRefiner(NominalAware(), lambda inputs: [inputs.image], LinearSVM())
        >>> result = refiner(Modalities(images), maps, maps > 0.5, 0.5, seeds=torch.tensor([0, 1]))
        >>> result.outcome.tolist()  # the second map has no confident defect
        [0, 2]
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        labeler: PseudoLabeler,
        features: FeatureSource,
        classifier: PixelClassifier,
        max_positives: int = 1000,
        max_negatives: int = 1000,
        min_positives: int = 10,
        min_negatives: int = 10,
        self_check: SelfCheck | None = None,
        fallback: FallbackMask | None = None,
        max_channels: int | None = DEFAULT_MAX_CHANNELS,
    ) -> None:
        max_positives = check_count("max_positives", max_positives)
        max_negatives = check_count("max_negatives", max_negatives)
        min_positives = check_count("min_positives", min_positives)
        min_negatives = check_count("min_negatives", min_negatives)
        if min_positives > max_positives or min_negatives > max_negatives:
            msg = "min_positives/min_negatives must not exceed max_positives/max_negatives"
            raise ValueError(msg)
        self.labeler = labeler
        self.features = features
        self.classifier = classifier
        self.max_positives = max_positives
        self.max_negatives = max_negatives
        self.min_positives = min_positives
        self.min_negatives = min_negatives
        self.self_check = NoCheck() if self_check is None else self_check
        self.fallback = ThresholdMask() if fallback is None else fallback
        self.max_channels = None if max_channels is None else check_count("max_channels", max_channels)

    def draw(self, labels: PseudoLabels, seeds: Tensor) -> TrainingPixels:
        """Sample up to the caps of positives and negatives per image (seeded per image, see ``sampling``).

        Both sets of every image are drawn in one selection (a row per set), each from its own stream.
        """
        batch_size = seeds.shape[0]
        streams = torch.tensor((POSITIVE_STREAM, NEGATIVE_STREAM), device=seeds.device).repeat_interleave(batch_size)
        index, valid = sample_pixels(
            torch.cat((labels.positive.flatten(1), labels.negative.flatten(1))),
            max(self.max_positives, self.max_negatives),
            seeds.repeat(2),
            streams,
        )
        positive_index, negative_index = (
            index[:batch_size, : self.max_positives],
            index[batch_size:, : self.max_negatives],
        )
        positive_valid, negative_valid = (
            valid[:batch_size, : self.max_positives],
            valid[batch_size:, : self.max_negatives],
        )
        return TrainingPixels(
            index=torch.cat((positive_index, negative_index), dim=1),
            valid=torch.cat((positive_valid, negative_valid), dim=1),
            targets=torch.cat((torch.ones_like(positive_index), -torch.ones_like(negative_index)), dim=1),
            num_positives=positive_valid.sum(dim=1),
            num_negatives=negative_valid.sum(dim=1),
        )

    def screen(self, score_maps: Tensor, pixels: TrainingPixels, eligible: Tensor | None) -> Tensor:
        """``(B,)`` :class:`Outcome` codes before fitting: ``REFINED`` for the images to refine."""
        outcome = torch.full((score_maps.shape[0],), int(Outcome.REFINED), dtype=torch.int64, device=score_maps.device)
        outcome = torch.where(pixels.num_negatives < self.min_negatives, int(Outcome.FEW_NEGATIVES), outcome)
        outcome = torch.where(pixels.num_positives < self.min_positives, int(Outcome.FEW_POSITIVES), outcome)
        num_valid = torch.isfinite(score_maps).flatten(1).sum(dim=1)
        outcome = torch.where(num_valid < self.min_positives + self.min_negatives, int(Outcome.FEW_VALID), outcome)
        if eligible is not None:
            outcome = torch.where(eligible.to(score_maps.device), outcome, int(Outcome.GATED))
        return outcome

    def __call__(
        self,
        inputs: Modalities,
        score_maps: Tensor,
        masks: Tensor,
        nominal_threshold: float,
        seeds: Tensor,
        eligible: Tensor | None = None,
    ) -> Refinement:
        """Refine one batch.

        Args:
            inputs: The batch's modalities (``image`` ``(B, C, H', W')``, optional ``depth_map``), handed to the
                feature source.
            score_maps: ``(B, H, W)`` normalized anomaly maps.
            masks: ``(B, H, W)`` current (thresholded) masks, kept where refinement does not run.
            nominal_threshold: The normalized nominal pixel threshold (0.5 after anomalib's PostProcessor).
            seeds: ``(B,)`` per-image seeds.
            eligible: ``(B,)`` bool, images that may be refined (gating); all when ``None``.

        Returns:
            The :class:`Refinement` of the batch.
        """
        batch_size, height, width = score_maps.shape
        score_maps = score_maps.float()
        with stage("pseudo_labels"):
            labels = self.labeler(score_maps, nominal_threshold)
        with stage("draw"):
            pixels = self.draw(labels, seeds)
            outcome = self.screen(score_maps, pixels, eligible)
        masks = masks.reshape(batch_size, height, width).bool()
        if not bool((outcome == Outcome.REFINED).any()):
            unrefined = torch.full_like(score_maps, float("nan"))
            masks = self.fall_back(score_maps, masks, outcome, nominal_threshold)
            return Refinement(masks, outcome, pixels.num_positives, pixels.num_negatives, unrefined)

        with stage("features"):
            feature_maps = self.features(inputs)
        with stage("standardize"):
            pyramid = FeaturePyramid(feature_maps, max_channels=self.max_channels)
        with stage("sample"):
            training_features = pyramid.sample(flat_to_grid(pixels.index, height, width))
        with stage("fit"):
            fitting = pixels.valid & (outcome == Outcome.REFINED)[:, None]
            decision = self.classifier.fit(training_features, pixels.targets, fitting)

        outcome = torch.where((outcome == Outcome.REFINED) & ~decision.fitted, int(Outcome.FIT_FAILED), outcome)
        refined = outcome == Outcome.REFINED
        with stage("score_map"):
            decision_map = decision.score_map(pyramid, (height, width)).float()
            decision_map = torch.where(refined[:, None, None], decision_map, float("nan"))
        with stage("self_check"):
            supported = self.self_check(Evidence(score_maps, labels, decision_map, nominal_threshold))
        outcome = torch.where(refined & ~supported.to(refined.device), int(Outcome.SELF_CHECK_FAILED), outcome)
        refined = outcome == Outcome.REFINED
        decision_map = torch.where(refined[:, None, None], decision_map, float("nan"))
        masks = torch.where(refined[:, None, None], decision_map > 0, masks)
        masks = self.fall_back(score_maps, masks, outcome, nominal_threshold)
        return Refinement(masks, outcome, pixels.num_positives, pixels.num_negatives, decision_map)

    def fall_back(self, score_maps: Tensor, masks: Tensor, outcome: Tensor, nominal_threshold: float) -> Tensor:
        """``masks`` with the fallback mask on the images the refinement chose not to replace.

        Those are the images without a confident defect and those that failed the self-check; gated images and
        images that could not be refined (too few negatives or finite scores, a failed fit) keep their mask.
        """
        falling_back = torch.isin(outcome, outcome.new_tensor(FALLBACK_OUTCOMES))
        if not bool(falling_back.any()):
            return masks
        with stage("fallback"):
            replaced = self.fallback(score_maps[falling_back], masks[falling_back], nominal_threshold)
        masks = masks.clone()
        masks[falling_back] = replaced.to(masks.device, torch.bool)
        return masks
