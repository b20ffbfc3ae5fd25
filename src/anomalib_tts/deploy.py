"""Test-time segmentation outside Lightning: refine the masks of a deployed anomalib model.

A deployed model runs through anomalib's ``TorchInferencer`` (or ``OpenVINOInferencer``), not through a Lightning
loop. :class:`SegmentationRefiner` hands an image (or batch) and its anomaly map to the same pipeline and adapter
as the callback (:class:`~anomalib_tts.adapter.BatchRefiner`), with the same options, defaults and checks, and
returns the masks.

The adapter reads the raw map where it has one: anomalib's PostProcessor normalizes each map around the pixel
threshold and clips it to ``[0, 1]``, which hides an image's own score distribution; in a Lightning run the
callback keeps the raw map from before the PostProcessor. An inferencer returns the clipped map only, so:

- :meth:`SegmentationRefiner.predict` runs ``TorchInferencer.predict`` and keeps the model's input and raw map
  during that forward pass (a hook on the torch model): its masks equal the callback's in ``anomalib predict``
  for the same images and weights.
- Called on tensors, the refiner reads ``raw_anomaly_map`` where given (normalized unclipped with the statistics
  of the model's PostProcessor, which anomalib's torch export keeps), else the clipped ``anomaly_map``; with the
  clipped map alone, masks can differ from the callback's on images whose map is clipped.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from anomalib_tts.adapter import BatchFields, BatchRefiner, RefinementStats
from anomalib_tts.calibration import Calibration, build_pipeline
from anomalib_tts.pipeline import RefinementPipeline

LIGHTNING_OPTIONS = ("stages", "calibrate", "calibration_images")  # callback options that concern its loops only
CALLBACK_STATE_KEY = "TestTimeSegmentation"  # where a Lightning checkpoint keeps the callback's state


def read_calibration(path: str | Path) -> Calibration | None:
    """The calibration saved in a Lightning checkpoint of a run with the callback, or in a JSON file
    (:meth:`Calibration.to_dict`); ``None`` when the checkpoint holds none.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    import json

    path = Path(path)
    if not path.is_file():
        msg = f"no calibration file at {path}"
        raise FileNotFoundError(msg)
    if path.suffix == ".json":
        return Calibration.from_dict(json.loads(path.read_text(encoding="utf-8")))
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # a checkpoint of the user's own run
    state = (checkpoint.get("callbacks") or {}).get(CALLBACK_STATE_KEY) or {}
    saved = state.get("calibration")
    return None if saved is None else Calibration.from_dict(saved)


__all__ = ["SegmentationRefiner"]


class SegmentationRefiner:
    """Refines the masks of images and their anomaly maps as :class:`~anomalib_tts.TestTimeSegmentation` does,
    outside Lightning.

    Args:
        model: The anomalib model the maps come from, e.g. ``TorchInferencer(path).model`` (anomalib's torch export
            saves the whole model, its PostProcessor included). Its PostProcessor gives the pixel threshold and the
            statistics that normalize a raw map; ``ModelFeatures`` (``features="model"``) reads its feature
            extractor. ``None``: maps are taken as normalized around a pixel threshold of 0.5 (anomalib's), and the
            feature source must not need a model.
        pipeline: The refinement pipeline, e.g. ``RefinementPipeline(features="model")``; ``None``: its defaults.
            :meth:`from_init_args` builds it from the ``init_args`` of a config's callback entry.
        gate: As the callback's: ``"pred_label"`` refines only images anomalib labels anomalous.
        calibration: The choice a calibration made for this model's data (the callback's, saved in the checkpoint
            of ``anomalib train``: :func:`read_calibration`); ``None``: the pipeline as given.

    Attributes:
        refiner: The adapter that runs the pipeline; its statistics (``stats``) count the images refined since the
            refiner was built, and it warns once per reason an image keeps its mask.

    Raises:
        ValueError: The feature source cannot run on ``model`` (e.g. ``ModelFeatures`` without a model).

    Example:
        >>> from anomalib_tts.pipeline import TimmFeatures
        >>> refiner = SegmentationRefiner(
        ...     pipeline=RefinementPipeline(features=TimmFeatures(backbone="resnet18", pre_trained=False))
        ... )
        >>> image = torch.rand(3, 64, 64)
        >>> anomaly_map = torch.rand(64, 64) * 0.3
        >>> anomaly_map[16:32, 16:32] = 0.9
        >>> mask = refiner(image, anomaly_map, image_path="part_017.png")
        >>> mask.shape, mask.dtype, refiner.stats.refined
        (torch.Size([64, 64]), torch.bool, 1)

        On a deployed model (anomalib's torch export; ``TorchInferencer`` needs ``TRUST_REMOTE_CODE=1``)::

            inferencer = TorchInferencer("weights/torch/model.pt", device="cpu")
            refiner = SegmentationRefiner(inferencer.model, RefinementPipeline(features="model"))
            prediction = refiner.predict(inferencer, "parts/017.png")  # prediction.pred_mask: the refined mask
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        pipeline: RefinementPipeline | None = None,
        gate: Literal["none", "pred_label"] = "none",
        calibration: Calibration | None = None,
    ) -> None:
        if model is not None and not isinstance(model, nn.Module):
            msg = f"model must be an anomalib model (torch.nn.Module), e.g. TorchInferencer(path).model, got {model!r}"
            raise ValueError(msg)
        self.model = model
        pipeline = pipeline if pipeline is not None else RefinementPipeline()
        if calibration is not None and calibration.overrides:
            pipeline = build_pipeline(pipeline, calibration.overrides)
        self.calibration = calibration
        self.refiner = BatchRefiner(pipeline, gate)
        self.refiner.bind(model)

    @classmethod
    def from_init_args(
        cls, init_args: Mapping[str, Any], model: nn.Module | None = None, calibration: Calibration | None = None
    ) -> "SegmentationRefiner":
        """The refiner of a config's ``TestTimeSegmentation`` entry (its ``init_args``; the options of Lightning's
        loops are ignored), with the ``calibration`` of the model's checkpoint where given.

        Raises:
            ValueError: An argument does not fit; the message names it.

        Example:
            >>> refiner = SegmentationRefiner.from_init_args(
            ...     {"features": {"class_path": "anomalib_tts.TimmFeatures", "init_args": {"backbone": "resnet18",
            ...      "pre_trained": False}}, "stages": ["predict"]}
            ... )
            >>> refiner.refiner.pipeline.features.backbone
            'resnet18'
        """
        refiner = BatchRefiner.from_init_args(init_args, ignore=LIGHTNING_OPTIONS)
        return cls(model, refiner.pipeline, refiner.gate, calibration)

    @property
    def stats(self) -> RefinementStats:
        """What happened to the images refined since this refiner was built."""
        return self.refiner.stats

    def __call__(
        self,
        image: Tensor | np.ndarray,
        anomaly_map: Tensor | np.ndarray,
        *,
        raw_anomaly_map: Tensor | np.ndarray | None = None,
        pred_mask: Tensor | np.ndarray | None = None,
        pred_label: Tensor | np.ndarray | None = None,
        image_path: str | Path | Sequence[str | Path] | None = None,
        depth_map: Tensor | np.ndarray | None = None,
    ) -> Tensor:
        """Refined masks of ``image`` from its ``anomaly_map``, on the image's device.

        Args:
            image: ``(C, H', W')`` image or ``(B, C, H', W')`` batch as the model saw it (after its PreProcessor:
                the features are computed on it, at its size).
            anomaly_map: Its normalized map(s), ``(H, W)``, ``(B, H, W)`` or ``(B, 1, H, W)``, as anomalib's
                PostProcessor returns them (an inferencer's ``prediction.anomaly_map``).
            raw_anomaly_map: The model's raw map(s) before the PostProcessor, of the same shape: read instead of
                ``anomaly_map``, normalized unclipped, when the model's PostProcessor has statistics.
            pred_mask: anomalib's masks, kept by images that cannot be refined; default ``anomaly_map`` above the
                pixel threshold.
            pred_label: anomalib's image labels, read by ``gate="pred_label"``.
            image_path: The images' file names (one per image): they seed the choice of training pixels, as in
                ``anomalib predict``; without them the seeds come from the maps' content.
            depth_map: ``(B, 3, H, W)`` organized point clouds, for ``RgbdFeatures``.

        Returns:
            ``(H, W)`` bool mask for one image, ``(B, H, W)`` for a batch.

        Raises:
            ValueError: The shapes do not fit together, or ``image_path`` does not name each image once.
        """
        images = torch.as_tensor(image)
        if images.dim() not in (3, 4):
            msg = f"image must be (C, H, W) or (B, C, H, W), got shape {tuple(images.shape)}"
            raise ValueError(msg)
        single = images.dim() == 3
        images = images[None] if single else images
        maps = _as_maps(anomaly_map, images.shape[0], "anomaly_map").to(images.device)
        raw = None
        if raw_anomaly_map is not None:
            raw = _as_maps(raw_anomaly_map, images.shape[0], "raw_anomaly_map").to(images.device)
            if raw.shape != maps.shape:
                msg = f"raw_anomaly_map {tuple(raw.shape)} and anomaly_map {tuple(maps.shape)} differ in shape"
                raise ValueError(msg)
        if pred_mask is not None:
            pred_mask = torch.as_tensor(pred_mask, device=images.device)
            if pred_mask.numel() != maps.numel():
                msg = f"pred_mask {tuple(pred_mask.shape)} does not fit anomaly_map {tuple(maps.shape)}"
                raise ValueError(msg)
            pred_mask = pred_mask.reshape(maps.shape).bool()
        fields = BatchFields(
            image=images,
            anomaly_map=maps,
            pred_mask=pred_mask,
            pred_label=None if pred_label is None else torch.as_tensor(pred_label, device=images.device),
            image_path=_as_paths(image_path, images.shape[0]),
            depth_map=None if depth_map is None else torch.as_tensor(depth_map, device=images.device),
        )
        masks = self.refiner.refine(fields, raw_anomaly_map=raw).masks
        return masks[0] if single else masks

    def refine_prediction(self, prediction: Any, image_path: str | Path | Sequence[str | Path] | None = None) -> Tensor:
        """Refined masks of an inferencer's prediction: ``TorchInferencer``'s ``ImageBatch`` or ``OpenVINOInferencer``'s
        ``NumpyImageBatch`` (channels last).

        Reads the prediction's clipped map (an exported model returns no other), and its image resized to the map's
        size (bilinear, as anomalib's exported PreProcessor resizes). The masks are those of the callback up to what
        clipping and the resizing change; :meth:`predict` gives the callback's masks exactly from a ``TorchInferencer``.

        Args:
            prediction: What ``inferencer.predict`` returned.
            image_path: The images' file names (seeds); default the prediction's ``image_path``.

        Returns:
            ``(B, H, W)`` bool masks.
        """
        channels_last = isinstance(prediction.image, np.ndarray)
        image = torch.as_tensor(prediction.image).float()
        image = image[None] if image.dim() == 3 else image
        anomaly_map = torch.as_tensor(prediction.anomaly_map)
        pred_mask = None if prediction.pred_mask is None else torch.as_tensor(prediction.pred_mask)
        if channels_last:
            image = image.permute(0, 3, 1, 2)
            anomaly_map = anomaly_map[..., 0] if anomaly_map.shape[-1] == 1 else anomaly_map
            pred_mask = pred_mask[..., 0] if pred_mask is not None and pred_mask.shape[-1] == 1 else pred_mask
        size = anomaly_map.shape[-2:]
        if image.shape[-2:] != size:
            image = torch.nn.functional.interpolate(image, size=tuple(size), mode="bilinear", align_corners=False)
        pred_label = getattr(prediction, "pred_label", None)
        return self(
            image,
            anomaly_map.reshape(image.shape[0], *size),
            pred_mask=pred_mask,
            pred_label=None if pred_label is None else torch.as_tensor(pred_label).reshape(-1),
            image_path=image_path if image_path is not None else getattr(prediction, "image_path", None),
        )

    def predict(self, inferencer: Any, image: Any, image_path: str | Path | None = None) -> Any:
        """``inferencer.predict(image)`` with the refined mask as its ``pred_mask``: the callback's mask.

        The model's input image and raw map are kept during the inferencer's forward pass, so the refinement
        reads what the callback reads in ``anomalib predict``: the masks are equal for the same images and weights
        (images at the model's input size: anomalib's exported PreProcessor resizes without antialiasing, the
        Lightning one with).

        Args:
            inferencer: anomalib's ``TorchInferencer`` of this refiner's model (``inferencer.model``).
            image: What ``inferencer.predict`` takes: a file path, PIL image, array or tensor.
            image_path: The image's name for the seeds; default ``str(image)`` for a path (``anomalib predict``
                names images by their path as its folder dataset lists them).

        Returns:
            The inferencer's ``ImageBatch``, its ``pred_mask`` refined.

        Raises:
            ValueError: ``inferencer`` does not run this refiner's model (an ``OpenVINOInferencer`` holds no torch
                model: use :meth:`refine_prediction` on its predictions).
        """
        model = getattr(inferencer, "model", None)
        if self.model is None or model is not self.model or not isinstance(getattr(model, "model", None), nn.Module):
            msg = (
                "predict needs the TorchInferencer of this refiner's model (SegmentationRefiner(inferencer.model)); "
                "for another inferencer use refine_prediction(prediction)"
            )
            raise ValueError(msg)
        kept: dict[str, Tensor] = {}

        def keep(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            del module
            kept["image"], kept["raw"] = inputs[0], output.anomaly_map

        handle = model.model.register_forward_hook(keep)
        try:
            prediction = inferencer.predict(image)
        finally:
            handle.remove()
        if image_path is None and isinstance(image, str | Path):
            image_path = str(image)
        masks = self(
            kept["image"],
            prediction.anomaly_map,
            raw_anomaly_map=kept["raw"],
            pred_mask=prediction.pred_mask,
            pred_label=prediction.pred_label,
            image_path=image_path,
        )
        prediction.pred_mask = masks.reshape(prediction.anomaly_map.shape)
        return prediction


def _as_maps(maps: Tensor | np.ndarray, batch_size: int, name: str) -> Tensor:
    """``(B, H, W)`` float maps from ``(H, W)``, ``(B, H, W)`` or ``(B, 1, H, W)``."""
    given = torch.as_tensor(maps)
    maps = given[:, 0] if given.dim() == 4 and given.shape[1] == 1 else given[None] if given.dim() == 2 else given
    if maps.dim() != 3 or maps.shape[0] != batch_size:
        msg = f"{name} must be (H, W), (B, H, W) or (B, 1, H, W) with B = {batch_size} images, got {tuple(given.shape)}"
        raise ValueError(msg)
    return maps.float()


def _as_paths(image_path: str | Path | Sequence[str | Path] | None, batch_size: int) -> list[str] | None:
    if image_path is None:
        return None
    paths = [str(image_path)] if isinstance(image_path, str | Path) else [str(path) for path in image_path]
    if len(paths) != batch_size:
        msg = f"image_path names {len(paths)} images, the batch holds {batch_size}"
        raise ValueError(msg)
    return paths
