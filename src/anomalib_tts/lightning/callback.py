"""The Lightning callback that plugs test-time refinement into anomalib's test and predict loops."""

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from typing_extensions import Self, override

from anomalib_tts.adapter import (
    BatchRefiner,
    RefinementStats,
    check_post_processor,
    post_processor_normalization,
    raw_anomaly_maps,
    unclipped_scores,
)
from anomalib_tts.calibration import Calibration, Normalization, TooFewImagesError, build_pipeline, calibrate
from anomalib_tts.lightning.placement import place_callback, remove_callbacks
from anomalib_tts.pipeline import FallbackMask, FeatureSource, PixelClassifier, PseudoLabeler, RefinedMasks, SelfCheck
from anomalib_tts.pipeline.refinement import (
    DEFAULT_CLASSIFIER,
    DEFAULT_FALLBACK,
    DEFAULT_FEATURES,
    DEFAULT_MAX_CHANNELS,
    DEFAULT_PSEUDO_LABELS,
    DEFAULT_SELF_CHECK,
    RefinementPipeline,
)

logger = logging.getLogger(__name__)

STAGES = ("test", "predict", "validate")


def as_stages(stages: str | Sequence[str]) -> tuple[str, ...]:
    """The loops to refine in; one name alone (``"test"``) is one stage.

    Example:
        >>> as_stages("test"), as_stages(["test", "predict"])
        (('test',), ('test', 'predict'))
    """
    stages = (stages,) if isinstance(stages, str) else tuple(stages)
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown:
        msg = f"stages must be among {STAGES} (a name or a list of names), got {unknown}"
        raise ValueError(msg)
    return stages


def summed_over_processes(stats: RefinementStats, trainer: Trainer, device: torch.device) -> RefinementStats:
    """The counters of all processes of a distributed run added up (this one alone otherwise)."""
    names = list(stats.outcomes)
    counts = [stats.images, stats.positives, stats.negatives, *stats.outcomes.values()]
    totals = trainer.strategy.reduce(
        torch.tensor([*counts, stats.seconds], dtype=torch.float64, device=device), reduce_op="sum"
    ).tolist()
    images, positives, negatives, *outcomes, seconds = totals
    return RefinementStats(
        images=int(images),
        seconds=seconds,
        outcomes={name: int(count) for name, count in zip(names, outcomes, strict=True)},
        positives=int(positives),
        negatives=int(negatives),
    )


class RawMapKeeper(Callback):
    """Keeps a reference to each batch's raw anomaly map; placed right before the PostProcessor.

    anomalib's PostProcessor clips its normalized maps to ``[0, 1]``, which hides an image's own score distribution;
    the refinement reads the raw map instead and normalizes it the same way, unclipped (:meth:`take_unclipped`).
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

    def take(self, shape: torch.Size) -> Tensor | None:
        """The kept raw map (and forget it), if it has ``shape``; ``None`` when no such map was kept."""
        raw, self.raw = self.raw, None
        return raw if raw is not None and raw.shape == shape else None

    def take_unclipped(self, post_processor: Any, shape: torch.Size) -> Tensor | None:
        """The kept raw map normalized by :func:`~anomalib_tts.adapter.unclipped_scores` (and forgotten).

        Returns:
            ``None`` when no map of ``shape`` was kept for this batch or the PostProcessor has no statistics.
        """
        raw = self.take(shape)
        return None if raw is None else unclipped_scores(raw, post_processor)

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
    mask (by default MEBin's per-image stable threshold); images that cannot be refined (too few normal pixels)
    keep anomalib's.

    The five components are those of :class:`~anomalib_tts.pipeline.RefinementPipeline`, each a registered name or
    an object; in YAML, ``class_path`` + ``init_args``, so that ``--print_config`` lists its options.

    Args:
        pseudo_labels: Pseudo-label recipe: ``"relative"`` (default, ``PeakRelative``), ``"robust"``,
            ``"nominal"``, ``"percentile"`` (the paper's), or a recipe object.
        features: Pixel-feature source: ``"rgbd"`` (default, ``RgbdFeatures()``: a WideResNet-50 as in the paper,
            with geometric features of the batch's ``depth_map`` where it has one), ``"model"`` (``ModelFeatures``:
            the anomalib model's own ``TimmFeatureExtractor`` output, no second forward pass), ``"timm"``,
            ``"geometry"``, or a source object (e.g. ``TimmFeatures(backbone=...)``).
        classifier: Per-image classifier: ``"logistic"`` (default, ``LogisticRegression``), ``"svm"``
            (``LinearSVM``, squared hinge, the paper's), or a classifier object.
        self_check: Whether an image's own evidence supports its refined mask: ``"growth"`` (default,
            ``BoundedGrowth``: the refined mask at most 4x its positive pseudo-labels), ``"none"``, or a check
            object. An image that fails it is counted (``tts_images_self_check_failed``) and gets the fallback mask.
        fallback: The mask of every image without a confident defect or failing the self-check: ``"stable"``
            (default, ``StableThreshold``: MEBin's stable threshold, as anomalib's ``MEBinPostProcessor`` but swept
            from 0.4 to the image's own peak), ``"threshold"`` (``ThresholdMask``: the mask anomalib made), or an
            object.
        gate: ``"none"`` refines every image whose map has confident defect pixels; ``"pred_label"`` refines
            only images anomalib labels anomalous (the others keep anomalib's mask).
        max_positives: Cap on positives sampled per image.
        max_negatives: Cap on negatives sampled per image.
        min_positives: Fewer confident positives: no confident defect, the image gets the fallback mask.
        min_negatives: Fewer confident negatives: the image keeps anomalib's mask.
        max_channels: Pixel features wider than this are reduced to this many channels before the fit, each level
            to its dominant channel subspace (WideResNet-50's 1536 channels by default; ``features="model"`` with
            PatchCore's usual EfficientNet layers are narrower and left as they are); ``None`` fits on every
            channel.
        stages: Loops to refine in, among ``"test"``, ``"predict"`` and ``"validate"`` (one name alone is one
            stage).
        calibrate: Choose, per dataset, how its masks are made (refinement settings, or a per-image or global
            threshold instead) on synthetic defects pasted into its good validation images
            (:mod:`anomalib_tts.calibration`): at the end of the validation of ``fit`` (``anomalib train``), or,
            where a checkpoint holds no calibration, at the start of ``test`` / ``predict`` from the datamodule's
            validation images. The choice is logged and saved in the checkpoint with the callback's state.
            ``False``: the components as configured, for every dataset.
        calibration_images: About how many synthetic defective images the calibration makes.

    Example:
        >>> from anomalib.engine import Engine
        >>> from anomalib.models import Patchcore
        >>> from anomalib_tts.pipeline import LinearSVM
        >>> callback = TestTimeSegmentation(features="model", classifier=LinearSVM(l2=0.5))
        >>> type(callback.pipeline.features).__name__, callback.pipeline.classifier.l2
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
        calibrate: bool = True,
        calibration_images: int = 48,
    ) -> None:
        super().__init__()
        self.stages = as_stages(stages)
        self.calibrate = bool(calibrate)
        if calibration_images < 1:
            msg = f"calibration_images must be at least 1, got {calibration_images}"
            raise ValueError(msg)
        self.calibration_images = int(calibration_images)
        self.calibration: Calibration | None = None
        pipeline = RefinementPipeline(
            pseudo_labels,
            features,
            classifier,
            self_check,
            fallback,
            max_positives=max_positives,
            max_negatives=max_negatives,
            min_positives=min_positives,
            min_negatives=min_negatives,
            max_channels=max_channels,
        )
        self.configured = pipeline
        self.refiner = BatchRefiner(pipeline, gate)
        self._raw_maps = RawMapKeeper()
        self._nominal: list[tuple[Tensor, Tensor]] = []

    @property
    def pipeline(self) -> RefinementPipeline:
        """The refinement pipeline this callback runs."""
        return self.refiner.pipeline

    @property
    def stats(self) -> RefinementStats:
        """What happened to the images of the current (or last) epoch."""
        return self.refiner.stats

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
            >>> type(callback.pipeline.classifier).__name__, callback.pipeline.classifier.l2
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
    def state_dict(self) -> dict[str, Any]:
        return {"calibration": None if self.calibration is None else self.calibration.to_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("calibration")
        self.use_calibration(None if saved is None else Calibration.from_dict(saved))

    def use_calibration(self, calibration: Calibration | None) -> None:
        """Make masks as ``calibration`` chose (``None``: the components as configured)."""
        self.calibration = calibration
        overrides = {} if calibration is None else calibration.overrides
        self.refiner.pipeline = build_pipeline(self.configured, overrides) if overrides else self.configured

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage in self.stages:
            check_post_processor(getattr(pl_module, "post_processor", None) or None, type(pl_module).__name__)
        self._place_after_post_processor(trainer, pl_module)
        self.refiner.bind(pl_module)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.refiner.release()

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
        self.refiner.release()
        remove_callbacks(trainer, [self, self._raw_maps])

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.refiner.reset()

    @override
    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.refiner.reset()

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._nominal = []
        if self._refines_validation(trainer):
            self.refiner.reset()

    def _calibrates_on_validation(self, trainer: Trainer) -> bool:
        return self.calibrate and trainer.state.fn in {"fit", "validate"} and not trainer.sanity_checking

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
        if self._calibrates_on_validation(trainer):  # before refining: the raw maps of the good images
            self._nominal.append((outputs.image.detach().cpu(), outputs.anomaly_map.detach().float().cpu()))
        if self._refines_validation(trainer):
            self._raw_maps.raw = outputs.anomaly_map  # validation maps are not normalized by the PostProcessor
            self.refine_batch(outputs)

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_metrics(trainer, pl_module)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after the PostProcessor's own hook (it comes first): its statistics are those of this epoch
        if self._calibrates_on_validation(trainer) and self._nominal:
            images, maps = (torch.cat(parts) for parts in zip(*self._nominal, strict=True))
            self._nominal = []
            self.run_calibration(trainer, pl_module, images, maps)
        if self._refines_validation(trainer):
            self._log_metrics(trainer, pl_module)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._calibrate_if_missing(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._calibrate_if_missing(trainer, pl_module)

    def _calibrate_if_missing(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Calibrate on the datamodule's validation images where the checkpoint held no calibration."""
        if not self.calibrate or self.calibration is not None:
            return
        images, maps = nominal_images(trainer, pl_module)
        if images is None:
            logger.info(
                "test-time segmentation: no calibration in the checkpoint and no validation images to calibrate on; "
                "using the configured components (%s)",
                describe(self.configured),
            )
            return
        self.run_calibration(trainer, pl_module, images, maps)

    def run_calibration(self, trainer: Trainer, pl_module: LightningModule, images: Tensor, maps: Tensor) -> None:
        """Calibrate on good ``images`` (as the model sees them) and their raw ``maps``; use and log the choice."""
        statistics = post_processor_normalization(getattr(pl_module, "post_processor", None))
        if statistics is None:
            logger.warning("test-time segmentation: the PostProcessor has no pixel statistics; calibration skipped")
            return
        self.refiner.bind(pl_module)
        device = pl_module.device
        with _progress(trainer, "calibrating test-time segmentation") as advance:
            try:
                calibration = calibrate(
                    self.configured,
                    images.to(device),
                    maps,
                    lambda batch: raw_anomaly_maps(pl_module, batch.to(device)),
                    Normalization(*statistics),
                    synthetic_images=self.calibration_images,
                    progress=advance,
                )
            except TooFewImagesError as error:
                logger.warning(
                    "test-time segmentation: %s; using the configured components (%s)", error, describe(self.configured)
                )
                return
        self.use_calibration(calibration)
        logger.info(calibration.summary())

    def _log_metrics(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # summed before the ratios are taken, so a distributed run logs what a single process would
        for name, value in summed_over_processes(self.stats, trainer, pl_module.device).as_metrics().items():
            pl_module.log(name, value)
        logger.info(self.stats.summary())

    @override
    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger.info(self.stats.summary())

    def refine_batch(self, batch: Any) -> RefinedMasks | None:
        """Refine ``batch.pred_mask`` in place from the batch's raw anomaly map (kept before the PostProcessor)
        and its images.

        Returns:
            The batch's :class:`~anomalib_tts.pipeline.RefinedMasks`, or ``None`` when the batch carries no anomaly
            map.

        Raises:
            ValueError: The batch's fields do not fit together (missing ``image``, batch sizes that disagree, maps
                smaller than ``min_positives + min_negatives``); the message names them.
        """
        anomaly_map = getattr(batch, "anomaly_map", None)
        raw = None if anomaly_map is None else self._raw_maps.take(anomaly_map.shape)
        return self.refiner.refine_batch(batch, raw_anomaly_map=raw)


def describe(pipeline: RefinementPipeline) -> str:
    """One line naming a pipeline's components.

    Example:
        >>> describe(RefinementPipeline(features="timm"))
        'PeakRelative, TimmFeatures, LogisticRegression, BoundedGrowth, StableThreshold'
    """
    parts = (pipeline.pseudo_labels, pipeline.features, pipeline.classifier, pipeline.self_check, pipeline.fallback)
    return ", ".join(type(part).__name__ for part in parts) + ("" if pipeline.refine else " (refinement off)")


def nominal_images(trainer: Trainer, pl_module: LightningModule) -> tuple[Tensor | None, Tensor | None]:
    """The datamodule's validation images as the model sees them and their raw maps; ``(None, None)`` without."""
    datamodule = getattr(trainer, "datamodule", None)
    try:
        loader = datamodule.val_dataloader() if datamodule is not None else None
    except Exception:  # noqa: BLE001 - a datamodule without a validation split raises what it likes
        loader = None
    if loader is None:
        return None, None
    pre_processor = getattr(pl_module, "pre_processor", None)
    transform = getattr(pre_processor, "transform", None)
    images, maps = [], []
    for batch in loader:
        image = batch.image.to(pl_module.device)
        if transform is not None:
            image = transform(image)
        images.append(image.cpu())
        maps.append(raw_anomaly_maps(pl_module, image).cpu())
    if not images:
        return None, None
    return torch.cat(images), torch.cat(maps)


class _progress:  # noqa: N801 - used as a function
    """A progress bar while the calibration runs (hidden where the trainer shows none); yields ``advance``."""

    def __init__(self, trainer: Trainer, description: str) -> None:
        self.enabled = getattr(trainer, "progress_bar_callback", None) is not None
        self.description = description
        self.bar: Any = None

    def __enter__(self) -> Any:
        def advance(done: int, total: int) -> None:
            if not self.enabled:
                return
            if self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=self.description, unit="batch", leave=False)
            self.bar.update(done - self.bar.n)

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
