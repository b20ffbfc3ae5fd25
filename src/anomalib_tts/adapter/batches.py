"""From an anomalib batch, or a deployed model's prediction, to the pipeline's inputs and back.

Both doors drive the pipeline through :class:`BatchRefiner`: the Lightning callback with each test or predict
batch, :class:`~anomalib_tts.deploy.SegmentationRefiner` with an inferencer's predictions. It reads a batch's fields
(:class:`BatchFields`), checks that they fit together, normalizes the raw anomaly map as anomalib's PostProcessor
does but without clipping (:func:`unclipped_scores`), seeds each image by its file name, gates on ``pred_label``
where asked, runs the pipeline, counts what happened (:class:`RefinementStats`) and warns once per reason an image
could not be refined.

Why the raw map: anomalib's PostProcessor normalizes each map around the pixel threshold and clips it to ``[0, 1]``;
with a validation set of good parts only, most normal pixels end up exactly at 0 and strong defects at 1, which hides
the image's own score distribution.
"""

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from torch import Tensor, nn

from anomalib_tts.adapter.model_features import ModelFeatures
from anomalib_tts.pipeline import Modalities, Outcome, RefinedMasks, RefinementInputs, RefinementPipeline
from anomalib_tts.pipeline.sampling import content_seeds, path_seeds

logger = logging.getLogger(__name__)

GATES = ("none", "pred_label")
WARNED_OUTCOMES = (Outcome.FEW_NEGATIVES, Outcome.FIT_FAILED, Outcome.FEW_VALID)  # should have refined, could not
KEPT_OUTCOMES = (Outcome.GATED, *WARNED_OUTCOMES)  # images that keep the mask they came with
__all__ = ["BatchFields", "BatchRefiner", "ModelFeatures", "RefinementStats", "unclipped_scores"]


@dataclass
class BatchFields:
    """The fields of an anomalib batch the refinement reads (``ImageBatch``, ``Depth batch``, a prediction).

    Attributes:
        image: ``(B, C, H', W')`` model input images.
        anomaly_map: ``(B, H, W)`` or ``(B, 1, H, W)`` maps as the PostProcessor leaves them.
        pred_mask: anomalib's masks, kept by images that cannot be refined; ``None``: the map above the threshold.
        pred_label: anomalib's image labels, read by ``gate="pred_label"``.
        image_path: One file name per image: it seeds the choice of training pixels.
        depth_map: ``(B, 3, H, W)`` organized point clouds, for geometric features.
    """

    image: Tensor | None
    anomaly_map: Tensor
    pred_mask: Tensor | None = None
    pred_label: Tensor | None = None
    image_path: Sequence[str] | None = None
    depth_map: Tensor | None = None

    @classmethod
    def of(cls, batch: Any) -> "BatchFields":
        """The fields of an anomalib batch (or any object with them; missing ones are ``None``)."""
        return cls(**{name.name: getattr(batch, name.name, None) for name in fields(cls)})


def unclipped_scores(raw: Tensor, post_processor: Any) -> Tensor | None:
    """``raw`` normalized like anomalib's PostProcessor does, without clipping; ``None`` if it has no statistics."""
    names = ("pixel_threshold", "pixel_min", "pixel_max")
    if post_processor is None or not all(hasattr(post_processor, name) for name in names):
        return None
    threshold, low, high = (getattr(post_processor, name).to(raw.device).float() for name in names)
    if not bool(torch.isfinite(threshold) & torch.isfinite(low) & torch.isfinite(high) & (high > low)):
        return None
    return (raw.float() - threshold) / (high - low) + 0.5


def raw_anomaly_maps(model: nn.Module, images: Tensor) -> Tensor:
    """``(B, H, W)`` raw anomaly maps of an anomalib model for images as its pre-processor leaves them.

    Runs the model's ``validation_step`` (what anomalib's validation loop runs, before the PostProcessor) in eval
    mode without gradients, so any anomalib model scores the images as it scored its validation images.
    """
    from anomalib.data import ImageBatch

    batch = ImageBatch(image=images, gt_label=torch.zeros(images.shape[0], dtype=torch.bool, device=images.device))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model.validation_step(batch, 0)
    finally:
        model.train(was_training)
    maps = output.anomaly_map
    return maps.reshape(maps.shape[0], *maps.shape[-2:]).float()


def post_processor_normalization(post_processor: Any) -> tuple[float, float, float] | None:
    """The PostProcessor's raw pixel ``(threshold, min, max)``, or ``None`` where it has no finite statistics."""
    names = ("pixel_threshold", "pixel_min", "pixel_max")
    if post_processor is None or not all(hasattr(post_processor, name) for name in names):
        return None
    values = tuple(float(getattr(post_processor, name)) for name in names)
    if not all(torch.isfinite(torch.tensor(values))) or values[2] <= values[1]:
        return None
    return values


def check_post_processor(post_processor: Any, model_name: str) -> None:
    """``ValueError`` unless ``post_processor`` normalizes the maps and thresholds them, as the refinement needs.

    The pseudo-label recipes read maps normalized so that anomalib's pixel threshold sits at 0.5; without
    normalization the maps are raw scores of any scale, and without thresholding there is no pixel threshold
    (and anomalib writes no ``pred_mask`` to keep).
    """
    leave_out = "or leave TestTimeSegmentation out of the run"
    if post_processor is None:
        msg = (
            f"TestTimeSegmentation reads the normalized maps and pixel threshold of the model's PostProcessor; "
            f"{model_name} has none: keep post_processor=True (the default) or pass a PostProcessor(), {leave_out}"
        )
        raise ValueError(msg)
    name = type(post_processor).__name__
    if getattr(post_processor, "enable_normalization", True) is False:
        msg = (
            f"TestTimeSegmentation reads maps normalized around anomalib's pixel threshold (0.5); the {name} of "
            f"{model_name} has enable_normalization=False, so its maps are raw scores whose scale the pseudo-label "
            f"recipes cannot read: keep enable_normalization=True (the default), {leave_out}"
        )
        raise ValueError(msg)
    if getattr(post_processor, "enable_thresholding", True) is False:
        msg = (
            f"TestTimeSegmentation refines from anomalib's pixel threshold; the {name} of {model_name} has "
            f"enable_thresholding=False, so there is no threshold and anomalib writes no pred_mask: keep "
            f"enable_thresholding=True (the default), {leave_out}"
        )
        raise ValueError(msg)


def scaled_images(image: Tensor) -> Tensor:
    """8-bit images scaled to ``[0, 1]`` like float images: ``uint8``, or float holding whole numbers up to 255.

    anomalib's batches cast ``uint8`` images to float without scaling them, so 8-bit data is recognized by its
    values too: an image (decided per image) whose values are all whole numbers in ``[0, 255]``, at least one
    above 1. Normalized and ``[0, 1]`` images are returned as they are.

    Raises:
        ValueError: ``image`` has another integer or a boolean dtype.

    Example:
        >>> scaled_images(torch.tensor([[[[0, 51, 255]]]], dtype=torch.uint8))
        tensor([[[[0.0000, 0.2000, 1.0000]]]])
        >>> scaled_images(torch.tensor([[[[0.0, 51.0, 255.0]]], [[[-1.5, 0.2, 2.0]]]]))
        tensor([[[[ 0.0000,  0.2000,  1.0000]]],
        <BLANKLINE>
        <BLANKLINE>
                [[[-1.5000,  0.2000,  2.0000]]]])
    """
    if image.dtype == torch.uint8:
        return image.float() / 255
    if not image.is_floating_point():
        msg = (
            f"batch.image has dtype {image.dtype}: pass float images (as anomalib's pre-processor leaves them) or "
            "uint8 images (0-255)"
        )
        raise ValueError(msg)
    flat = image.flatten(1)
    low, high = flat.amin(dim=1), flat.amax(dim=1)  # on CPU much faster than aminmax(dim=1)
    candidates = (low >= 0) & (high > 1) & (high <= 255)
    if not bool(candidates.any()):
        return image
    eight_bit = candidates & (flat == flat.round()).all(dim=1)
    return torch.where(eight_bit[:, None, None, None], image / 255, image)


def _shape(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else f"a {type(value).__name__}"


def check_fields(fields: BatchFields, min_positives: int, min_negatives: int, reads_pred_label: bool = False) -> None:
    """``ValueError`` naming the fields of a batch that do not fit together.

    Args:
        fields: The batch's fields.
        min_positives: The pipeline's minimum of positives per image.
        min_negatives: The pipeline's minimum of negatives per image.
        reads_pred_label: ``pred_label`` is read too (gating).

    Raises:
        ValueError: A field is missing or has the wrong shape, the fields disagree in batch size, or the maps
            have fewer pixels than ``min_positives + min_negatives``; the message names them.
    """
    anomaly_map = fields.anomaly_map
    if (
        not isinstance(anomaly_map, Tensor)
        or anomaly_map.ndim not in {3, 4}
        or anomaly_map.shape[1:-2]
        not in {
            torch.Size(),
            torch.Size([1]),
        }
    ):
        msg = f"batch.anomaly_map must be a (B, H, W) or (B, 1, H, W) tensor, got {_shape(anomaly_map)}"
        raise ValueError(msg)
    image = fields.image
    if image is None:
        msg = (
            "the batch has no image (batch.image is None): the refinement computes its pixel features from the "
            "images; pass the model's input images, (B, C, H, W), as batch.image"
        )
        raise ValueError(msg)
    if not isinstance(image, Tensor) or image.ndim != 4 or image[0, 0].numel() == 0:
        msg = f"batch.image must be a (B, C, H, W) tensor with H, W > 0, got {_shape(image)}"
        raise ValueError(msg)

    sizes = {"anomaly_map": anomaly_map.shape[0], "image": image.shape[0]}
    depth_map = fields.depth_map
    if isinstance(depth_map, Tensor) and depth_map.ndim == 4:  # other shapes are warned about and left unused
        sizes["depth_map"] = depth_map.shape[0]
    pred_mask = fields.pred_mask
    if pred_mask is not None:
        sizes["pred_mask"] = pred_mask.shape[0] if pred_mask.ndim else 1
    paths = fields.image_path
    if paths:
        sizes["image_path"] = len(paths)
    pred_label = fields.pred_label
    if reads_pred_label and pred_label is not None:
        sizes["pred_label"] = pred_label.numel()
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {size}" for name, size in sizes.items())
        msg = (
            f"the batch's fields disagree in batch size ({listed}): each must hold one entry per image; pass "
            "fields of the same batch"
        )
        raise ValueError(msg)
    if pred_mask is not None and pred_mask.numel() != anomaly_map.numel():
        msg = (
            f"batch.pred_mask ({_shape(pred_mask)}) does not fit batch.anomaly_map ({_shape(anomaly_map)}): "
            "it must have the map's size"
        )
        raise ValueError(msg)

    height, width = anomaly_map.shape[-2:]
    if min_positives + min_negatives > height * width:
        msg = (
            f"min_positives + min_negatives ({min_positives} + {min_negatives}) exceed the {height * width} pixels "
            f"of the batch's {height}x{width} anomaly maps: no image could be refined; lower them"
        )
        raise ValueError(msg)


@dataclass
class RefinementStats:
    """What happened to the images refined since the last reset (one epoch in Lightning), counted per outcome."""

    images: int = 0
    seconds: float = 0.0
    outcomes: dict[str, int] = field(default_factory=lambda: {outcome.name.lower(): 0 for outcome in Outcome})
    positives: int = 0
    negatives: int = 0

    def update(self, result: RefinedMasks, seconds: float) -> None:
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
        """Images whose mask the classifier's replaced."""
        return self.outcomes["refined"]

    def count(self, outcomes: Sequence[Outcome]) -> int:
        """Images with any of ``outcomes``."""
        return sum(self.outcomes[outcome.name.lower()] for outcome in outcomes)

    def as_metrics(self) -> dict[str, float]:
        """Flat numbers to log: images refined, given the fallback mask, kept with their mask, and the rest.

        Example:
            >>> stats = RefinementStats(images=4, outcomes={"refined": 2, "few_positives": 1, "gated": 1})
            >>> {name: value for name, value in stats.as_metrics().items() if name.startswith("tts_images")}
            {'tts_images_refined': 2.0, 'tts_images_fallback': 1.0, 'tts_images_kept': 1.0, 'tts_images_self_check_failed': 0.0}
        """
        refined = max(self.refined, 1)
        outcomes = {name: self.outcomes.get(name, 0) for name in (outcome.name.lower() for outcome in Outcome)}
        fallback = outcomes["few_positives"] + outcomes["self_check_failed"]
        return {
            "tts_images_refined": float(outcomes["refined"]),
            "tts_images_fallback": float(fallback),
            "tts_images_kept": float(self.images - outcomes["refined"] - fallback),
            "tts_images_self_check_failed": float(outcomes["self_check_failed"]),
            "tts_mean_positives": self.positives / refined,
            "tts_mean_negatives": self.negatives / refined,
            "tts_seconds_per_image": self.seconds / max(self.images, 1),
        }

    def summary(self) -> str:
        """One line for the log.

        Example:
            >>> RefinementStats(images=3, seconds=0.3, outcomes={"refined": 2, "few_positives": 1}).summary()
            'test-time segmentation: refined 2 of 3 images (refined: 2, few_positives: 1), 100.0 ms per image'
        """
        counts = ", ".join(f"{name}: {count}" for name, count in self.outcomes.items() if count)
        return (
            f"test-time segmentation: refined {self.refined} of {self.images} images ({counts}), "
            f"{1000 * self.seconds / max(self.images, 1):.1f} ms per image"
        )


class BatchRefiner:
    """Runs a :class:`~anomalib_tts.pipeline.RefinementPipeline` on anomalib batches and deployed predictions.

    Args:
        pipeline: The pipeline; ``None``: ``RefinementPipeline()`` with its defaults.
        gate: ``"none"`` refines every image whose map has confident defect pixels; ``"pred_label"`` refines only
            images anomalib labels anomalous (the others keep anomalib's mask).

    Attributes:
        nominal_threshold: anomalib's pixel threshold on the normalized scale (0.5, or the PostProcessor's).
        stats: What happened to the images refined since :meth:`reset`.

    Example:
        >>> from anomalib_tts.pipeline import TimmFeatures
        >>> refiner = BatchRefiner(RefinementPipeline(features=TimmFeatures("resnet18", pre_trained=False)))
        >>> refiner.bind(None)  # maps normalized around 0.5, no model
        >>> anomaly_map = torch.rand(1, 64, 64) * 0.3
        >>> anomaly_map[0, 16:32, 16:32] = 0.9
        >>> fields = BatchFields(torch.rand(1, 3, 64, 64), anomaly_map, image_path=["part_017.png"])
        >>> result = refiner.refine(fields)
        >>> result.masks.shape, refiner.stats.refined
        (torch.Size([1, 64, 64]), 1)
    """

    def __init__(
        self, pipeline: RefinementPipeline | None = None, gate: Literal["none", "pred_label"] = "none"
    ) -> None:
        if gate not in GATES:
            msg = f"gate must be 'none' or 'pred_label', got {gate!r}"
            raise ValueError(msg)
        self.pipeline = pipeline if pipeline is not None else RefinementPipeline()
        self.gate = gate
        self.nominal_threshold = 0.5
        self.post_processor: Any = None
        self.stats = RefinementStats()
        self._warned: set[str] = set()

    @classmethod
    def from_init_args(cls, init_args: Mapping[str, Any], ignore: Sequence[str] = ()) -> "BatchRefiner":
        """The refiner that ``init_args`` describe: the pipeline's arguments and ``gate``, as a YAML writes them.

        Components may be registered names, objects, or ``class_path`` + ``init_args`` mappings (jsonargparse
        instantiates them, and checks every value against the signatures).

        Args:
            init_args: The arguments.
            ignore: Names in ``init_args`` that belong to something else (the callback's ``stages``): skipped.

        Raises:
            ValueError: An argument does not fit; the message names it.

        Example:
            >>> refiner = BatchRefiner.from_init_args({"classifier": "svm", "gate": "pred_label", "stages": "test"},
            ...                                       ignore=["stages"])
            >>> type(refiner.pipeline.classifier).__name__, refiner.gate
            ('LinearSVM', 'pred_label')
        """
        from argparse import ArgumentError

        from jsonargparse import ArgumentParser

        options = {name: value for name, value in init_args.items() if name not in ignore}
        gate = options.pop("gate", "none")
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(RefinementPipeline, "pipeline")
        try:
            pipeline = parser.instantiate_classes(parser.parse_object({"pipeline": options})).pipeline
        except ArgumentError as error:
            raise ValueError(str(error)) from error
        return cls(pipeline, gate)

    def bind(self, model: nn.Module | None) -> None:
        """Read the pixel threshold and normalization of ``model``'s PostProcessor and set up the feature source.

        Args:
            model: The anomalib model the maps come from; ``None``: maps normalized around 0.5, no model features.

        Raises:
            ValueError: The feature source cannot run on ``model`` (e.g. ``ModelFeatures`` without a model).
        """
        self.post_processor = getattr(model, "post_processor", None) or None
        self.nominal_threshold = 0.5
        if self.post_processor is not None and hasattr(self.post_processor, "normalized_pixel_threshold"):
            self.nominal_threshold = float(self.post_processor.normalized_pixel_threshold)
        self.pipeline.features.setup(model)

    def release(self) -> None:
        """Release what the feature source holds (e.g. the hook of ``ModelFeatures`` on the model)."""
        self.pipeline.features.teardown()

    def reset(self) -> None:
        """Start counting (and warning) afresh."""
        self.stats = RefinementStats()
        self._warned = set()

    def inputs(self, fields: BatchFields, raw_anomaly_map: Tensor | None = None) -> RefinementInputs:
        """The pipeline's inputs for a batch.

        Args:
            fields: The batch's fields.
            raw_anomaly_map: The model's raw map of the same shape as ``fields.anomaly_map``, read instead of it,
                normalized without clipping, when the PostProcessor has statistics.

        Raises:
            ValueError: The fields do not fit together (missing ``image``, batch sizes that disagree, maps smaller
                than ``min_positives + min_negatives``, a raw map of another shape); the message names them.
        """
        gated = self.gate == "pred_label"
        check_fields(fields, self.pipeline.min_positives, self.pipeline.min_negatives, reads_pred_label=gated)
        anomaly_map = fields.anomaly_map
        if raw_anomaly_map is not None:
            if raw_anomaly_map.shape != anomaly_map.shape:
                msg = f"the raw anomaly map {tuple(raw_anomaly_map.shape)} and anomaly_map {tuple(anomaly_map.shape)} differ"
                raise ValueError(msg)
            unclipped = unclipped_scores(raw_anomaly_map, self.post_processor)
            anomaly_map = anomaly_map if unclipped is None else unclipped
        score_maps = anomaly_map.reshape(anomaly_map.shape[0], *anomaly_map.shape[-2:])
        masks = fields.pred_mask if fields.pred_mask is not None else score_maps > self.nominal_threshold
        paths = fields.image_path
        eligible = None
        if gated and fields.pred_label is not None:
            eligible = fields.pred_label.reshape(-1).bool()
        assert fields.image is not None
        return RefinementInputs(
            modalities=Modalities(image=scaled_images(fields.image), depth_map=fields.depth_map),
            score_maps=score_maps,
            masks=masks.reshape(score_maps.shape),
            seeds=path_seeds(paths, score_maps.device) if paths else content_seeds(score_maps),
            nominal_threshold=self.nominal_threshold,
            eligible=eligible,
        )

    def refine(self, fields: BatchFields, raw_anomaly_map: Tensor | None = None) -> RefinedMasks:
        """Refine a batch's masks (see :meth:`inputs` for the arguments); counted in :attr:`stats`."""
        start = time.perf_counter()
        result = self.pipeline(self.inputs(fields, raw_anomaly_map))
        self.stats.update(result, time.perf_counter() - start)
        self._warn_kept(result, fields.image_path)
        return result

    def refine_batch(self, batch: Any, raw_anomaly_map: Tensor | None = None) -> RefinedMasks | None:
        """Replace ``batch.pred_mask`` by the refined masks (in its shape, or ``(B, H, W)`` when it has none).

        Returns:
            The batch's :class:`~anomalib_tts.pipeline.RefinedMasks`, or ``None`` when the batch carries no anomaly
            map (a warning, once).
        """
        fields = BatchFields.of(batch)
        if fields.anomaly_map is None:
            self._warn_once(
                "no_anomaly_map", "test-time segmentation: a batch has no anomaly_map; masks left as they are"
            )
            return None
        result = self.refine(fields, raw_anomaly_map)
        shape = fields.pred_mask.shape if fields.pred_mask is not None else result.masks.shape
        batch.pred_mask = result.masks.reshape(shape)
        return result

    def _warn_kept(self, result: RefinedMasks, paths: Sequence[str] | None) -> None:
        """Warn where refinement should have run but could not: once per reason, naming the first image.

        The summary line (:meth:`RefinementStats.summary`) counts every image of each reason.
        """
        unexpected = torch.isin(result.outcome, result.outcome.new_tensor(WARNED_OUTCOMES))
        for index in unexpected.nonzero()[:, 0].tolist():
            reason = Outcome(int(result.outcome[index])).name.lower()
            name = paths[index] if paths else f"image {index} of a batch"
            self._warn_once(
                reason,
                f"test-time segmentation kept anomalib's mask for {name} ({reason}); further images kept for this "
                "reason are counted in the summary line",
            )

    def _warn_once(self, reason: str, message: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            logger.warning(message)
