"""The refinement pipeline, pure torch: score map -> pseudo-labels -> pixel features -> classifier -> mask.

:class:`RefinementPipeline` runs the stages on one batch of :class:`RefinementInputs` and returns
:class:`RefinedMasks`. It knows nothing of Lightning or anomalib: the doors (the Lightning callback, deployment)
turn their batches into its inputs through one adapter, :mod:`anomalib_tts.adapter`.
"""

from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor

from anomalib_tts.pipeline.checks import SELF_CHECKS, Evidence, SelfCheck
from anomalib_tts.pipeline.classifiers import CLASSIFIERS, PixelClassifier
from anomalib_tts.pipeline.devices import device_constant, host_reads_are_free, to_device
from anomalib_tts.pipeline.fallbacks import FALLBACKS, FallbackMask
from anomalib_tts.pipeline.features import FEATURES, FeaturePyramid, FeatureSource, Modalities
from anomalib_tts.pipeline.features.pyramid import flat_to_grid
from anomalib_tts.pipeline.labelers import LABELERS, PseudoLabeler, PseudoLabels
from anomalib_tts.pipeline.sampling import sample_pixels
from anomalib_tts.pipeline.validation import check_count

DEFAULT_PSEUDO_LABELS = "relative"
DEFAULT_FEATURES = "rgbd"  # WideResNet-50 (the paper's), with geometric features where a batch has a depth_map
DEFAULT_CLASSIFIER = "logistic"
DEFAULT_SELF_CHECK = "growth"
DEFAULT_FALLBACK = "stable"
DEFAULT_MAX_CHANNELS = 256
POSITIVE_STREAM = 1
NEGATIVE_STREAM = 2


class Outcome(IntEnum):
    """What happened to one image."""

    REFINED = 0  # the classifier's mask replaced the image's mask
    GATED = 1  # not eligible (e.g. anomalib's pred_label is normal): keeps its mask
    FEW_POSITIVES = 2  # no confident defect: gets the fallback mask
    FEW_NEGATIVES = 3  # too few confidently normal pixels: keeps its mask
    FIT_FAILED = 4  # the classifier produced no finite model: keeps its mask
    FEW_VALID = 5  # too few finite scores in the map (NaN/inf) to label both classes: keeps its mask
    SELF_CHECK_FAILED = 6  # fitted, but its own evidence does not support the refined mask: gets the fallback mask
    NOT_REFINED = 7  # refinement is off (``refine=False``): gets the fallback mask


FALLBACK_OUTCOMES = (Outcome.FEW_POSITIVES, Outcome.SELF_CHECK_FAILED, Outcome.NOT_REFINED)  # get the fallback mask
STAGE_PREFIX = "tts."


def stage(name: str) -> torch.profiler.record_function:
    """Marks one stage of the pipeline for ``torch.profiler`` (a range named ``tts.<name>``)."""
    return torch.profiler.record_function(STAGE_PREFIX + name)


@dataclass
class RefinementInputs:
    """One batch as the pipeline reads it.

    Attributes:
        modalities: The batch's images (``(B, C, H', W')``, scaled to ``[0, 1]`` or normalized) and depth maps,
            handed to the feature source.
        score_maps: ``(B, H, W)`` anomaly maps normalized so that the nominal pixel threshold sits at
            ``nominal_threshold`` (anomalib's PostProcessor's scale), not clipped.
        masks: ``(B, H, W)`` bool, the images' current masks, kept where the pipeline does not replace them.
        seeds: ``(B,)`` int64 per-image seeds of the training-pixel draw.
        nominal_threshold: The normalized nominal pixel threshold (0.5 after anomalib's PostProcessor).
        eligible: ``(B,)`` bool, images that may be refined (gating); all when ``None``.
    """

    modalities: Modalities
    score_maps: Tensor
    masks: Tensor
    seeds: Tensor
    nominal_threshold: float = 0.5
    eligible: Tensor | None = None


@dataclass
class RefinedMasks:
    """What the pipeline made of a batch.

    Attributes:
        masks: ``(B, H, W)`` bool: the refined mask where ``outcome == REFINED``, the fallback mask where it is
            ``FEW_POSITIVES`` or ``SELF_CHECK_FAILED``, the input mask elsewhere.
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
        """``(B,)`` bool, images whose mask the classifier's replaced."""
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


class RefinementPipeline:
    """Refines a batch of binary masks from its score maps and modalities.

    The stages, in order: the pseudo-label recipe labels each map, :meth:`draw` samples training pixels from the
    labels, :meth:`screen` decides which images can be refined, the feature source computes the batch's features,
    the classifier fits one model per image on the features at the drawn pixels, the fitted decision labels
    every pixel of the images it fitted, and the self-check decides which of those refined masks to keep. Images
    without a confident defect and those that fail the self-check get the fallback mask; the others that could
    not be refined keep their mask.

    Each component is a registered name (a new instance with default arguments) or an object.

    Args:
        pseudo_labels: Pseudo-label recipe (:data:`~anomalib_tts.pipeline.labelers.LABELERS`): ``"relative"``
            (``PeakRelative``), ``"robust"``, ``"nominal"``, ``"percentile"`` (the paper's), or a recipe object.
        features: Pixel-feature source (:data:`~anomalib_tts.pipeline.features.FEATURES`): ``"rgbd"``
            (``RgbdFeatures()``: a WideResNet-50 as in the paper, with geometric features of the batch's
            ``depth_map`` where it has one), ``"model"`` (the anomalib model's own feature extractor), ``"timm"``,
            ``"geometry"``, or a source object (e.g. ``TimmFeatures(backbone=...)``).
        classifier: Per-image classifier (:data:`~anomalib_tts.pipeline.classifiers.CLASSIFIERS`): ``"logistic"``
            (``LogisticRegression``), ``"svm"`` (``LinearSVM``, squared hinge, the paper's), or a classifier object.
        self_check: Whether an image's own evidence supports its refined mask
            (:data:`~anomalib_tts.pipeline.checks.SELF_CHECKS`): ``"growth"`` (``BoundedGrowth``: the refined mask
            at most 4x its positive pseudo-labels), ``"none"``, or a check object.
        fallback: The mask of the images without a confident defect or failing the self-check
            (:data:`~anomalib_tts.pipeline.fallbacks.FALLBACKS`): ``"stable"`` (``StableThreshold``: MEBin's stable
            threshold, swept from 0.4 to the image's own peak), ``"threshold"`` (``ThresholdMask``: the mask the
            image came with), or an object.
        max_positives: Cap on the positives sampled per image.
        max_negatives: Cap on the negatives sampled per image.
        min_positives: Fewer confident positives than this: no confident defect (the fallback mask).
        min_negatives: Fewer confident negatives than this: the image keeps its mask.
        max_channels: Features wider than this are reduced to this many channels, each level to its dominant
            channel subspace (:class:`~anomalib_tts.pipeline.features.pyramid.FeaturePyramid`), before the fit;
            ``None`` fits on every channel.
        refine: ``False`` fits nothing: every eligible image gets the fallback mask (a per-image or global
            threshold chosen instead of refinement, e.g. by a calibration).

    Example:
        >>> from anomalib_tts.pipeline.classifiers import LinearSVM
        >>> from anomalib_tts.pipeline.features.source import FeatureSource
        >>> class Colour(FeatureSource):
        ...     def __call__(self, inputs: Modalities) -> list[Tensor]:
        ...         return [inputs.image]
        >>> images = torch.rand(2, 3, 32, 32)
        >>> maps = torch.rand(2, 32, 32) * 0.3
        >>> maps[0, 8:16, 8:16] = 0.9
        >>> pipeline = RefinementPipeline("nominal", Colour(), LinearSVM(), self_check="none")
        >>> result = pipeline(RefinementInputs(Modalities(images), maps, maps > 0.5, seeds=torch.tensor([0, 1])))
        >>> result.outcome.tolist()  # the second map has no confident defect
        [0, 2]
    """

    def __init__(
        self,
        pseudo_labels: str | PseudoLabeler = DEFAULT_PSEUDO_LABELS,
        features: str | FeatureSource = DEFAULT_FEATURES,
        classifier: str | PixelClassifier = DEFAULT_CLASSIFIER,
        self_check: str | SelfCheck = DEFAULT_SELF_CHECK,
        fallback: str | FallbackMask = DEFAULT_FALLBACK,
        max_positives: int = 1000,
        max_negatives: int = 1000,
        min_positives: int = 10,
        min_negatives: int = 10,
        max_channels: int | None = DEFAULT_MAX_CHANNELS,
        refine: bool = True,
    ) -> None:
        max_positives = check_count("max_positives", max_positives)
        max_negatives = check_count("max_negatives", max_negatives)
        min_positives = check_count("min_positives", min_positives)
        min_negatives = check_count("min_negatives", min_negatives)
        if min_positives > max_positives or min_negatives > max_negatives:
            msg = "min_positives/min_negatives must not exceed max_positives/max_negatives"
            raise ValueError(msg)
        self.pseudo_labels = LABELERS.create(pseudo_labels)
        self.features = FEATURES.create(features)
        self.classifier = CLASSIFIERS.create(classifier)
        self.self_check = SELF_CHECKS.create(self_check)
        self.fallback = FALLBACKS.create(fallback)
        self.max_positives = max_positives
        self.max_negatives = max_negatives
        self.min_positives = min_positives
        self.min_negatives = min_negatives
        self.max_channels = None if max_channels is None else check_count("max_channels", max_channels)
        self.refine = bool(refine)

    def draw(self, labels: PseudoLabels, seeds: Tensor) -> TrainingPixels:
        """Sample up to the caps of positives and negatives per image (seeded per image, see ``sampling``).

        Both sets of every image are drawn in one selection (a row per set), each from its own stream.
        """
        batch_size = seeds.shape[0]
        index, valid = sample_pixels(
            torch.cat((labels.positive.flatten(1), labels.negative.flatten(1))),
            max(self.max_positives, self.max_negatives),
            seeds.repeat(2),
            (POSITIVE_STREAM,) * batch_size + (NEGATIVE_STREAM,) * batch_size,  # hashed on the host
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
        needed = self.min_positives + self.min_negatives
        # on CPU, a finite sum of the whole batch is the usual case: every score finite, no count needed
        enough = score_maps[0].numel() >= needed
        if not (enough and host_reads_are_free(score_maps) and bool(torch.isfinite(score_maps.sum()))):
            num_valid = torch.isfinite(score_maps).flatten(1).sum(dim=1)
            outcome = torch.where(num_valid < needed, int(Outcome.FEW_VALID), outcome)
        if eligible is not None:
            outcome = torch.where(eligible.to(score_maps.device), outcome, int(Outcome.GATED))
        return outcome

    def __call__(self, inputs: RefinementInputs) -> RefinedMasks:
        """Refine one batch."""
        score_maps = inputs.score_maps.float()
        batch_size, height, width = score_maps.shape
        threshold = inputs.nominal_threshold
        if not self.refine:
            return self.fall_back_all(inputs)
        with stage("pseudo_labels"):
            labels = self.pseudo_labels(score_maps, threshold)
        with stage("draw"):
            pixels = self.draw(labels, inputs.seeds)
            outcome = self.screen(score_maps, pixels, inputs.eligible)
        masks = inputs.masks.reshape(batch_size, height, width).bool()
        if not bool((outcome == Outcome.REFINED).any()):
            unrefined = torch.full_like(score_maps, float("nan"))
            masks = self.fall_back(score_maps, masks, outcome, threshold)
            return RefinedMasks(masks, outcome, pixels.num_positives, pixels.num_negatives, unrefined)

        with stage("features"):
            feature_maps = self.features(inputs.modalities)
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
            supported = self.self_check(Evidence(score_maps, labels, decision_map, threshold))
        outcome = torch.where(refined & ~supported.to(refined.device), int(Outcome.SELF_CHECK_FAILED), outcome)
        refined = outcome == Outcome.REFINED
        decision_map = torch.where(refined[:, None, None], decision_map, float("nan"))
        masks = torch.where(refined[:, None, None], decision_map > 0, masks)
        masks = self.fall_back(score_maps, masks, outcome, threshold)
        return RefinedMasks(masks, outcome, pixels.num_positives, pixels.num_negatives, decision_map)

    def fall_back_all(self, inputs: RefinementInputs) -> RefinedMasks:
        """The fallback mask for every eligible image (``refine=False``); gated images keep their mask."""
        score_maps = inputs.score_maps.float()
        batch_size = score_maps.shape[0]
        outcome = torch.full((batch_size,), int(Outcome.NOT_REFINED), dtype=torch.int64, device=score_maps.device)
        if inputs.eligible is not None:
            outcome = torch.where(inputs.eligible.to(score_maps.device), outcome, int(Outcome.GATED))
        masks = inputs.masks.reshape(score_maps.shape).bool()
        masks = self.fall_back(score_maps, masks, outcome, inputs.nominal_threshold)
        none = torch.zeros(batch_size, dtype=torch.int64, device=score_maps.device)
        return RefinedMasks(masks, outcome, none, none, torch.full_like(score_maps, float("nan")))

    def fall_back(self, score_maps: Tensor, masks: Tensor, outcome: Tensor, nominal_threshold: float) -> Tensor:
        """``masks`` with the fallback mask on the images the pipeline chose not to replace.

        Those are the images without a confident defect and those that failed the self-check; gated images and
        images that could not be refined (too few negatives or finite scores, a failed fit) keep their mask.
        """
        falling_back = torch.isin(outcome, device_constant(tuple(FALLBACK_OUTCOMES), torch.int64, outcome.device))
        if self.fallback.on_device and not host_reads_are_free(outcome):  # no read: the whole batch, kept where due
            with stage("fallback"):
                replaced = self.fallback(score_maps, masks, nominal_threshold).to(masks.device, torch.bool)
            return torch.where(falling_back[:, None, None], replaced, masks)
        # which images fall back, read once (free on CPU; on an accelerator the one wait before host work such as
        # MEBin's sweep); they are then addressed by index, which reads nothing more
        chosen = falling_back.cpu()
        if not bool(chosen.any()):
            return masks
        index = to_device(chosen.nonzero()[:, 0], masks.device)
        with stage("fallback"):
            replaced = self.fallback(score_maps.index_select(0, index), masks.index_select(0, index), nominal_threshold)
        return masks.index_copy(0, index, replaced.to(masks.device, torch.bool))
