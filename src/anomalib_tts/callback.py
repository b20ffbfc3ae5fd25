"""The Lightning callback that plugs test-time refinement into anomalib's test and predict loops."""

import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from typing_extensions import Self, override

from anomalib_tts.checks import FALLBACKS, SELF_CHECKS, FallbackMask, SelfCheck
from anomalib_tts.classifiers import CLASSIFIERS, PixelClassifier
from anomalib_tts.features import FEATURES, FeatureSource, ModelFeatures, TimmFeatures
from anomalib_tts.geometry import RgbdFeatures
from anomalib_tts.placement import place_callback, remove_callbacks
from anomalib_tts.pseudo_labels import LABELERS, PseudoLabeler
from anomalib_tts.refiner import DEFAULT_MAX_CHANNELS, Outcome, Refinement, TestTimeRefiner
from anomalib_tts.registry import Registry
from anomalib_tts.sampling import content_seeds, path_seeds
from anomalib_tts.validation import as_stages, batch_inputs, check_post_processor

logger = logging.getLogger(__name__)

DEFAULT_PSEUDO_LABELS = "relative"  # chosen by examples/choose_pseudo_labels.py, see docs/studies.md
DEFAULT_FEATURES = "rgbd"  # WideResNet-50 (the paper's), with geometric features where a batch has a depth_map
DEFAULT_CLASSIFIER = "logistic"  # chosen on both real datasets of docs/studies.md
DEFAULT_SELF_CHECK = "growth"  # chosen by worst case over six evaluation sets, examples/choose_defaults.py
DEFAULT_FALLBACK = "stable"
T = TypeVar("T")
STAGES = ("test", "predict", "validate")
WARNED_OUTCOMES = (Outcome.FEW_NEGATIVES, Outcome.FIT_FAILED, Outcome.FEW_VALID)  # should have refined, could not


@dataclass
class RefinementStats:
    """Counters of one epoch, reduced over the batches the callback saw."""

    images: int = 0
    seconds: float = 0.0
    outcomes: dict[str, int] = field(default_factory=lambda: {outcome.name.lower(): 0 for outcome in Outcome})
    positives: int = 0
    negatives: int = 0

    def summed_over_processes(self, trainer: Trainer, device: torch.device) -> "RefinementStats":
        """The counters of all processes of a distributed run added up (this one alone otherwise)."""
        names = list(self.outcomes)
        counts = [self.images, self.positives, self.negatives, *self.outcomes.values()]
        totals = trainer.strategy.reduce(
            torch.tensor([*counts, self.seconds], dtype=torch.float64, device=device), reduce_op="sum"
        ).tolist()
        images, positives, negatives, *outcomes, seconds = totals
        return RefinementStats(
            images=int(images),
            seconds=seconds,
            outcomes={name: int(count) for name, count in zip(names, outcomes, strict=True)},
            positives=int(positives),
            negatives=int(negatives),
        )

    def update(self, result: Refinement, seconds: float) -> None:
        """Add one batch."""
        counts = torch.bincount(result.outcome, minlength=len(Outcome)).tolist()
        for outcome, count in zip(Outcome, counts, strict=False):
            self.outcomes[outcome.name.lower()] += count
        refined = result.refined
        self.positives += int(result.num_positives[refined].sum())
        self.negatives += int(result.num_negatives[refined].sum())
        self.images += result.outcome.numel()
        self.seconds += seconds

    @property
    def refined(self) -> int:
        """Images whose mask was replaced."""
        return self.outcomes["refined"]

    def as_metrics(self) -> dict[str, float]:
        """Flat numbers for ``pl_module.log``."""
        refined = max(self.refined, 1)
        return {
            "tts_images_refined": float(self.refined),
            "tts_images_kept": float(self.images - self.refined),
            "tts_images_self_check_failed": float(self.outcomes["self_check_failed"]),
            "tts_mean_positives": self.positives / refined,
            "tts_mean_negatives": self.negatives / refined,
            "tts_seconds_per_image": self.seconds / max(self.images, 1),
        }


def unclipped_scores(raw: Tensor, post_processor: Any) -> Tensor | None:
    """``raw`` normalized like anomalib's PostProcessor does, without clipping; ``None`` if it has no statistics."""
    names = ("pixel_threshold", "pixel_min", "pixel_max")
    if post_processor is None or not all(hasattr(post_processor, name) for name in names):
        return None
    threshold, low, high = (getattr(post_processor, name).to(raw.device).float() for name in names)
    if not bool(torch.isfinite(threshold) & torch.isfinite(low) & torch.isfinite(high) & (high > low)):
        return None
    return (raw.float() - threshold) / (high - low) + 0.5


class RawMapKeeper(Callback):
    """Keeps a reference to each batch's raw anomaly map; placed right before the PostProcessor.

    anomalib's PostProcessor clips its normalized maps to ``[0, 1]``; with a nominal-only validation set most
    normal pixels of a test image end up exactly at 0 (and strong defects at 1), which hides the image's own
    score distribution. The refinement reads the raw map instead and normalizes it the same way, unclipped
    (:meth:`take_unclipped`).
    """

    def __init__(self) -> None:
        self.raw: Tensor | None = None

    def place_before(self, trainer: Any, post_processor: Any) -> bool:
        """Move this keeper right before ``post_processor`` in ``trainer.callbacks``.

        Returns:
            ``False``, with the keeper out of the list, when the model has no PostProcessor among the callbacks.
        """
        if post_processor is None:
            remove_callbacks(trainer, [self])
            return False
        return place_callback(trainer, self, before=post_processor)

    def take_unclipped(self, post_processor: Any, shape: torch.Size) -> Tensor | None:
        """The kept raw map normalized by :func:`unclipped_scores` (and forgotten), if it has ``shape``.

        Returns:
            ``None`` when no map was kept for this batch, it has another shape, or the PostProcessor has no
            statistics.
        """
        raw, self.raw = self.raw, None
        if raw is None or raw.shape != shape:
            return None
        return unclipped_scores(raw, post_processor)

    def _keep(self, outputs: Any) -> None:
        self.raw = getattr(outputs, "anomaly_map", None)

    @override
    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any, **kwargs: Any
    ) -> None:
        self._keep(outputs)

    @override
    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any, **kwargs: Any
    ) -> None:
        self._keep(outputs)


class TestTimeSegmentation(Callback):
    """Replaces anomalib's thresholded ``pred_mask`` by a per-image classifier trained at test time (TTT4AS).

    For each image, confidently defective and confidently normal pixels are taken from the normalized score
    map (the pseudo-label recipe), pixel features of the batch are read at those pixels (the feature source), a
    classifier is fitted on them (all images of a batch at once, on the batch's device), and every pixel is
    classified. The callback places itself right after the model's PostProcessor, so anomalib's Evaluator,
    Visualizer and returned predictions all see the refined masks. A self-check keeps a refined mask only where the
    image's own evidence supports it; images without a confident defect or failing the check get the fallback
    mask (by default MEBin's per-image stable threshold), images that cannot be refined (too few normal pixels)
    keep anomalib's.

    Each of the five components is a registered name or an object; in YAML, ``class_path`` + ``init_args``, so
    that ``--print_config`` lists its options.

    Args:
        pseudo_labels: Pseudo-label recipe (:mod:`anomalib_tts.pseudo_labels`): ``"relative"`` (default,
            ``PeakRelative``), ``"robust"``, ``"nominal"``, ``"percentile"`` (the paper's), or a recipe object.
        features: Pixel-feature source (:mod:`anomalib_tts.features`): ``"rgbd"`` (default, ``RgbdFeatures()``: a
            WideResNet-50 as in the paper, with geometric features of the batch's ``depth_map`` where it has one),
            ``"model"`` (``ModelFeatures``: the anomalib model's own ``TimmFeatureExtractor`` output, no second
            forward pass), ``"timm"``, ``"geometry"``, or a source object (e.g. ``TimmFeatures(backbone=...)``).
        classifier: Per-image classifier (:mod:`anomalib_tts.classifiers`): ``"logistic"`` (default,
            ``LogisticRegression``, chosen on both real datasets of docs/studies.md), ``"svm"`` (``LinearSVM``, squared
            hinge, the paper's), or a classifier object.
        self_check: Whether an image's own evidence supports its refined mask (:mod:`anomalib_tts.checks`):
            ``"growth"`` (default, ``BoundedGrowth``: the refined mask at most 4x its positive pseudo-labels),
            ``"none"``, or a check object. An image that fails it is counted (``tts_self_check_failed``) and gets
            the fallback mask.
        fallback: The mask of every image without a confident defect or failing the self-check (gated images and
            images that cannot be refined keep anomalib's): ``"stable"`` (default,
            ``StableThreshold``: MEBin's stable threshold, as anomalib's ``MEBinPostProcessor`` but swept from 0.4
            to the image's own peak), ``"threshold"`` (``ThresholdMask``: the mask anomalib made), or an object.
        gate: ``"none"`` refines every image whose map has confident defect pixels; ``"pred_label"`` refines
            only images anomalib labels anomalous (the others keep anomalib's mask).
        max_positives: Cap on positives sampled per image.
        max_negatives: Cap on negatives sampled per image.
        min_positives: Fewer confident positives: the image keeps its mask.
        min_negatives: Fewer confident negatives: the image keeps its mask.
        max_channels: Pixel features wider than this are reduced to this many channels before the fit, each level
            to its dominant channel subspace (WideResNet-50's 1536 channels by default; ``features="model"`` with
            PatchCore's usual EfficientNet layers are narrower and left as they are); ``None`` fits on every
            channel. See docs/speed.md for what it saves and what it changes in the masks.
        stages: Loops to refine in, among ``"test"``, ``"predict"`` and ``"validate"`` (one name alone is one
            stage).
        pseudo_label_args: Deprecated: keyword arguments of a recipe given by name; pass the recipe object.
        classifier_args: Deprecated: keyword arguments of a classifier given by name; pass the classifier object.
        backbone: Deprecated, with ``layers``, ``pre_trained``, ``weights``, ``geometry`` and
            ``geometry_weight``: they configure the default feature source; pass ``features`` instead
            (``"model"``, ``TimmFeatures(backbone, layers, pre_trained, weights)``,
            ``RgbdFeatures(rgb, geometry_weight=..., expect_depth=True)``).
        layers: Deprecated, see ``backbone``.
        pre_trained: Deprecated, see ``backbone``.
        weights: Deprecated, see ``backbone``.
        geometry: Deprecated, see ``backbone``: ``"auto"`` (``RgbdFeatures``), ``"on"`` (``RgbdFeatures`` with
            ``expect_depth=True``), ``"off"`` (the RGB source alone).
        geometry_weight: Deprecated, see ``backbone``.

    Example:
        >>> from anomalib.engine import Engine
        >>> from anomalib.models import Patchcore
        >>> from anomalib_tts.classifiers import LinearSVM
        >>> callback = TestTimeSegmentation(features="model", classifier=LinearSVM(l2=0.5))
        >>> type(callback.refiner.features).__name__, callback.refiner.classifier.l2
        ('ModelFeatures', 0.5)
        >>> engine = Engine(callbacks=[callback])  # doctest: +SKIP
        >>> engine.test(Patchcore(), datamodule=datamodule)  # doctest: +SKIP

        In an anomalib YAML::

            trainer:
              callbacks:
                - class_path: anomalib_tts.TestTimeSegmentation
                  init_args:
                    pseudo_labels:
                      class_path: anomalib_tts.PeakRelative
                      init_args:
                        positive_fraction: 0.5
                    features:
                      class_path: anomalib_tts.ModelFeatures
                    classifier:
                      class_path: anomalib_tts.LogisticRegression
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        pseudo_labels: str | PseudoLabeler = DEFAULT_PSEUDO_LABELS,
        features: str | FeatureSource = DEFAULT_FEATURES,
        classifier: str | PixelClassifier = DEFAULT_CLASSIFIER,
        self_check: str | SelfCheck = DEFAULT_SELF_CHECK,
        fallback: str | FallbackMask = DEFAULT_FALLBACK,
        gate: Literal["none", "pred_label"] = "none",
        max_positives: int = 1000,
        max_negatives: int = 1000,
        min_positives: int = 10,
        min_negatives: int = 10,
        max_channels: int | None = DEFAULT_MAX_CHANNELS,
        stages: str | Sequence[str] = ("test", "predict"),
        pseudo_label_args: dict[str, Any] | None = None,
        classifier_args: dict[str, Any] | None = None,
        backbone: str | None = None,
        layers: Sequence[str] | None = None,
        pre_trained: bool | None = None,
        weights: str | None = None,
        geometry: Literal["auto", "off", "on"] | None = None,
        geometry_weight: float | None = None,
    ) -> None:
        super().__init__()
        if gate not in {"none", "pred_label"}:
            msg = f"gate must be 'none' or 'pred_label', got {gate!r}"
            raise ValueError(msg)
        stages = as_stages(stages, STAGES)
        feature_options = {
            "backbone": backbone,
            "layers": layers,
            "pre_trained": pre_trained,
            "weights": weights,
            "geometry": geometry,
            "geometry_weight": geometry_weight,
        }
        given = {name: value for name, value in feature_options.items() if value is not None}
        if given:
            if features != DEFAULT_FEATURES:
                msg = f"{sorted(given)} configure the default feature source; with features={features!r} leave them out"
                raise ValueError(msg)
            features = _features_from_deprecated_options(**feature_options)
        self.refiner = TestTimeRefiner(
            _component(LABELERS, pseudo_labels, pseudo_label_args, "pseudo_label_args"),
            FEATURES.create(features),
            _component(CLASSIFIERS, classifier, classifier_args, "classifier_args"),
            max_positives=max_positives,
            max_negatives=max_negatives,
            min_positives=min_positives,
            min_negatives=min_negatives,
            self_check=SELF_CHECKS.create(self_check),
            fallback=FALLBACKS.create(fallback),
            max_channels=max_channels,
        )
        self.gate = gate
        self.stages = stages
        self.nominal_threshold = 0.5
        self.stats = RefinementStats()
        self._warned: set[str] = set()  # reasons already warned about this epoch
        self._post_processor: Any = None
        self._raw_maps = RawMapKeeper()

    @classmethod
    def from_init_args(cls, init_args: Mapping[str, Any]) -> Self:
        """The callback ``init_args`` describe, built as anomalib's CLI builds a ``trainer.callbacks`` entry.

        Components may be registered names, objects, or ``class_path`` + ``init_args`` mappings (jsonargparse
        instantiates them, and checks every value against the signatures).

        Raises:
            ValueError: An argument does not fit; the message names it.

        Example:
            >>> callback = TestTimeSegmentation.from_init_args(
            ...     {"classifier": {"class_path": "anomalib_tts.LinearSVM", "init_args": {"l2": 0.5}}}
            ... )
            >>> type(callback.refiner.classifier).__name__, callback.refiner.classifier.l2
            ('LinearSVM', 0.5)
        """
        from argparse import ArgumentError

        from jsonargparse import ArgumentParser

        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, "callback")
        try:
            return parser.instantiate_classes(parser.parse_object({"callback": dict(init_args)})).callback
        except ArgumentError as error:
            raise ValueError(str(error)) from error

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage in self.stages:
            check_post_processor(getattr(pl_module, "post_processor", None) or None, type(pl_module).__name__)
        self._place_after_post_processor(trainer, pl_module)
        self.bind(pl_module)

    def bind(self, pl_module: LightningModule | None) -> None:
        """Read the pixel threshold of the model's PostProcessor and set up the feature source for the model.

        ``setup`` calls it in a Lightning run; outside one (:class:`anomalib_tts.deploy.SegmentationRefiner`) it is
        called with the model the maps come from, or ``None`` (maps normalized around 0.5, no model features).
        """
        self._post_processor = getattr(pl_module, "post_processor", None) or None
        if self._post_processor is not None and hasattr(self._post_processor, "normalized_pixel_threshold"):
            self.nominal_threshold = float(self._post_processor.normalized_pixel_threshold)
        self.refiner.features.setup(pl_module)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.refiner.features.teardown()

    def _place_after_post_processor(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Move this callback right after the PostProcessor (else before the Evaluator / Visualizer, else last)."""
        from anomalib.metrics import Evaluator
        from anomalib.visualization import Visualizer

        post_processor = getattr(pl_module, "post_processor", None)
        if self._raw_maps.place_before(trainer, post_processor):
            place_callback(trainer, self, after=post_processor)
        elif not place_callback(trainer, self, before=(Evaluator, Visualizer)):
            place_callback(trainer, self)

    def remove_from(self, trainer: Trainer) -> None:
        """Take this callback and the raw-map keeper it placed out of ``trainer.callbacks``; release its features."""
        self.refiner.features.teardown()
        remove_callbacks(trainer, [self, self._raw_maps])

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_epoch()

    @override
    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_epoch()

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._refines_validation(trainer):
            self._start_epoch()

    def _start_epoch(self) -> None:
        self.stats = RefinementStats()
        self._warned = set()

    def _refines_validation(self, trainer: Trainer) -> bool:
        """Validation is refined in ``trainer.validate`` only, never in the validation epochs of ``fit``."""
        return "validate" in self.stages and trainer.state.fn == "validate"

    @override
    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any, **kwargs: Any
    ) -> None:
        if "test" in self.stages:
            self.refine_batch(outputs)

    @override
    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any, **kwargs: Any
    ) -> None:
        if "predict" in self.stages:
            self.refine_batch(outputs)

    @override
    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any, **kwargs: Any
    ) -> None:
        if self._refines_validation(trainer):
            self._raw_maps.raw = outputs.anomaly_map  # validation maps are not normalized by the PostProcessor
            self.refine_batch(outputs)

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_metrics(trainer, pl_module)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._refines_validation(trainer):
            self._log_metrics(trainer, pl_module)

    def _log_metrics(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # summed before the ratios are taken, so a distributed run logs what a single process would
        for name, value in self.stats.summed_over_processes(trainer, pl_module.device).as_metrics().items():
            pl_module.log(name, value)
        self._log_summary()

    @override
    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_summary()

    def _log_summary(self) -> None:
        logger.info(
            "test-time segmentation: refined %d of %d images (%s), %.1f ms per image",
            self.stats.refined,
            self.stats.images,
            ", ".join(f"{name}: {count}" for name, count in self.stats.outcomes.items() if count),
            1000 * self.stats.seconds / max(self.stats.images, 1),
        )

    def refine_batch(self, batch: Any) -> Refinement | None:
        """Refine ``batch.pred_mask`` in place from ``batch.anomaly_map`` and ``batch.image``.

        ``uint8`` images (or float images holding 0-255 values) are scaled to ``[0, 1]`` first, like float images.

        Returns:
            The batch's :class:`Refinement`, or ``None`` when the batch carries no anomaly map.

        Raises:
            ValueError: The batch's fields do not fit together (missing ``image``, batch sizes that disagree, maps
                smaller than ``min_positives + min_negatives``); the message names them.
        """
        anomaly_map: Tensor | None = getattr(batch, "anomaly_map", None)
        if anomaly_map is None:
            self._warn_once(
                "no_anomaly_map", "test-time segmentation: a batch has no anomaly_map; masks left as they are"
            )
            return None
        start = time.perf_counter()
        gated = self.gate == "pred_label"
        inputs = batch_inputs(
            batch, anomaly_map, self.refiner.min_positives, self.refiner.min_negatives, reads_pred_label=gated
        )
        unclipped = self._raw_maps.take_unclipped(self._post_processor, anomaly_map.shape)
        anomaly_map = anomaly_map if unclipped is None else unclipped
        score_maps = anomaly_map.reshape(anomaly_map.shape[0], *anomaly_map.shape[-2:])
        original = batch.pred_mask if batch.pred_mask is not None else score_maps > self.nominal_threshold
        paths = getattr(batch, "image_path", None)
        seeds = path_seeds(paths, score_maps.device) if paths else content_seeds(score_maps)
        eligible = None
        if gated and getattr(batch, "pred_label", None) is not None:
            eligible = batch.pred_label.reshape(-1).bool()

        result = self.refiner(inputs, score_maps, original, self.nominal_threshold, seeds, eligible)
        batch.pred_mask = result.masks.reshape(original.shape)
        self.stats.update(result, time.perf_counter() - start)
        self._warn_kept(result, paths)
        return result

    def _warn_kept(self, result: Refinement, paths: Sequence[str] | None) -> None:
        """Warn where refinement should have run but could not: once per reason and epoch, naming the first image.

        The epoch's summary line (logged at its end) counts every image of each reason.
        """
        unexpected = torch.isin(result.outcome, result.outcome.new_tensor(WARNED_OUTCOMES))
        for index in unexpected.nonzero()[:, 0].tolist():
            reason = Outcome(int(result.outcome[index])).name.lower()
            name = paths[index] if paths else f"image {index} of a batch"
            self._warn_once(
                reason,
                f"test-time segmentation kept anomalib's mask for {name} ({reason}); further images kept for this "
                "reason are counted in the summary line at the end of the epoch",
            )

    def _warn_once(self, reason: str, message: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            logger.warning(message)


def _component(registry: Registry[T], component: Any, deprecated_args: dict[str, Any] | None, argument: str) -> T:
    """A component from its name or itself; ``deprecated_args`` (a ``*_args`` dict) go with a name only."""
    if deprecated_args is None:
        return registry.create(component)
    if not isinstance(component, str):
        msg = f"{argument} goes with a {registry.kind} given by name; pass the arguments to {component!r} itself"
        raise ValueError(msg)
    cls = registry.get(component)
    warnings.warn(
        f"{argument} is deprecated: pass the {registry.kind} as an object, e.g. {cls.__name__}(**{deprecated_args!r}) "
        f"(in YAML: class_path: anomalib_tts.{cls.__name__} with init_args)",
        DeprecationWarning,
        stacklevel=3,
    )
    try:
        return cls(**deprecated_args)
    except TypeError as error:
        msg = f"{argument} does not fit {cls.__name__}: {error}"
        raise ValueError(msg) from error


def _features_from_deprecated_options(
    backbone: str | None,
    layers: Sequence[str] | None,
    pre_trained: bool | None,
    weights: str | None,
    geometry: str | None,
    geometry_weight: float | None,
) -> FeatureSource:
    """The feature source the deprecated ``backbone`` ... ``geometry_weight`` arguments described."""
    geometry = geometry or "auto"
    if geometry not in {"auto", "off", "on"}:
        msg = f"geometry must be 'auto', 'off' or 'on', got {geometry!r}"
        raise ValueError(msg)
    rgb: FeatureSource
    if backbone == "model":
        rgb, replacement = ModelFeatures(), "'model'"
    else:
        rgb = TimmFeatures(
            backbone=backbone or "wide_resnet50_2",
            layers=layers,
            pre_trained=True if pre_trained is None else pre_trained,
            weights=weights,
        )
        replacement = f"TimmFeatures(backbone={rgb.backbone!r}, layers={list(rgb.layers)!r}, ...)"
    features: FeatureSource = rgb
    if geometry != "off":
        weight = 1.0 if geometry_weight is None else geometry_weight
        features = RgbdFeatures(rgb, geometry_weight=weight, expect_depth=geometry == "on")
        replacement = f"RgbdFeatures({replacement}, geometry_weight={weight}, expect_depth={geometry == 'on'})"
    warnings.warn(
        "backbone, layers, pre_trained, weights, geometry and geometry_weight are deprecated: pass "
        f"features={replacement} (in YAML: class_path + init_args; features='model' on data without depth maps)",
        DeprecationWarning,
        stacklevel=3,
    )
    return features
