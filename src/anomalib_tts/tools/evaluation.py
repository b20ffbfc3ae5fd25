"""Scores of recorded masks and threshold baselines, for ``anomalib-tts compare``, the demo and the examples.

:class:`MaskRecorder` is a callback that keeps what anomalib finally reports for every test image (the masks
the Evaluator scores, the ground truth, the labels); :func:`segmentation_scores` turns that into the numbers
``anomalib-tts compare`` reports; :func:`oracle_threshold` and :class:`NominalPixelStats` give the thresholds the refinement
is compared with. The refinement and the Evaluator metrics (:mod:`anomalib_tts.metrics`) do not import this
module.
"""

from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from anomalib_tts.lightning.placement import place_callback
from anomalib_tts.metrics import f1_score, iou_score


@dataclass
class Records:
    """Per-image results of a test run, on the CPU.

    Attributes:
        pred_masks: ``(N, H, W)`` bool, the final masks.
        gt_masks: ``(N, H, W)`` bool.
        anomaly_maps: ``(N, H, W)`` float, the normalized maps (kept only when asked).
        pred_labels: ``(N,)`` bool.
        gt_labels: ``(N,)`` bool.
        paths: Image paths.
    """

    pred_masks: list[Tensor] = field(default_factory=list)
    gt_masks: list[Tensor] = field(default_factory=list)
    anomaly_maps: list[Tensor] = field(default_factory=list)
    pred_labels: list[Tensor] = field(default_factory=list)
    gt_labels: list[Tensor] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    def stacked(self, name: str) -> Tensor:
        """All batches of one field, concatenated."""
        return torch.cat(getattr(self, name))

    def scores(self, pred_masks: Tensor | None = None) -> dict[str, float]:
        """:func:`segmentation_scores` of the recorded masks, or of ``pred_masks`` for the same images."""
        masks = self.stacked("pred_masks") if pred_masks is None else pred_masks
        return segmentation_scores(masks, *(self.stacked(name) for name in ("gt_masks", "pred_labels", "gt_labels")))


class MaskRecorder(Callback):
    """Records the final masks of every test/predict batch (it moves itself after every other callback).

    Args:
        keep_maps: Also keep the normalized anomaly maps.
    """

    def __init__(self, keep_maps: bool = False) -> None:
        self.keep_maps = keep_maps
        self.records = Records()

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        place_callback(trainer, self)

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.records = Records()

    @override
    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any, **kwargs: Any
    ) -> None:
        self.record(outputs)

    @override
    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any, **kwargs: Any
    ) -> None:
        self.record(outputs)

    def record(self, batch: Any) -> None:
        """Keep one batch."""
        size = batch.anomaly_map.shape[-2:]
        count = batch.anomaly_map.shape[0]
        self.records.pred_masks.append(batch.pred_mask.reshape(count, *size).bool().cpu())
        if batch.gt_mask is not None:
            self.records.gt_masks.append(batch.gt_mask.reshape(count, *size).bool().cpu())
        if self.keep_maps:
            self.records.anomaly_maps.append(batch.anomaly_map.reshape(count, *size).float().cpu())
        self.records.pred_labels.append(batch.pred_label.reshape(count).bool().cpu())
        if batch.gt_label is not None:
            self.records.gt_labels.append(batch.gt_label.reshape(count).bool().cpu())
        self.records.paths.extend(batch.image_path or [""] * count)


def segmentation_scores(
    pred_masks: Tensor, gt_masks: Tensor, pred_labels: Tensor, gt_labels: Tensor
) -> dict[str, float]:
    """The numbers ``anomalib-tts compare`` reports.

    Returns:
        ``pixel_f1_all`` (pooled over all images: anomalib's ``pixel_F1Score``), ``pixel_f1_defective`` (pooled
        over defective images), ``mean_f1_defective`` and ``mean_iou_defective`` (per image, averaged over
        defective images), ``image_f1`` (of ``pred_labels``), ``image_f1_mask`` (an image counts as
        predicted defective when its mask is not empty) and ``false_alarm_rate`` (the share of defect-free
        images whose mask is not empty; ``nan`` without one).
    """
    defective = gt_masks.flatten(1).any(dim=1)
    flagged = pred_masks.flatten(1).any(dim=1)
    return {
        "pixel_f1_all": float(f1_score(pred_masks.flatten(), gt_masks.flatten())),
        "pixel_f1_defective": float(f1_score(pred_masks[defective].flatten(), gt_masks[defective].flatten())),
        "mean_f1_defective": float(f1_score(pred_masks[defective], gt_masks[defective]).mean()),
        "mean_iou_defective": float(iou_score(pred_masks[defective], gt_masks[defective]).mean()),
        "image_f1": float(f1_score(pred_labels, gt_labels)),
        "image_f1_mask": float(f1_score(flagged, gt_labels)),
        "false_alarm_rate": float(flagged[~defective].float().mean()) if bool((~defective).any()) else float("nan"),
    }


def oracle_threshold(scores: Tensor, truth: Tensor) -> float:
    """The threshold ``t`` whose masks ``scores > t`` have the best F1 pooled over all pixels of ``truth``.

    The ceiling of any single global threshold on these images (it looks at their ground truth). Ties are cut
    only between distinct scores; ``inf`` (predict nothing) when ``truth`` is empty, ``-inf`` when predicting
    every pixel is best.

    Example:
        >>> scores = torch.tensor([0.9, 0.8, 0.7, 0.2])
        >>> round(oracle_threshold(scores, torch.tensor([True, True, False, False])), 4)  # the top two
        0.7
        >>> oracle_threshold(scores, torch.tensor([True, True, False, True]))  # all four: F1 6/7 > 4/5 (top two)
        -inf
    """
    values, order = torch.sort(scores.flatten().float(), descending=True)
    hits = truth.flatten()[order].cumsum(dim=0, dtype=torch.int64)
    del order
    positives = int(hits[-1]) if hits.numel() else 0
    if positives == 0:
        return float("inf")
    predicted = torch.arange(1, values.numel() + 1, dtype=torch.float64)
    f1 = 2 * hits.double() / (predicted + positives)
    cut = torch.ones_like(values, dtype=torch.bool)
    cut[:-1] = values[:-1] != values[1:]
    best = int(torch.argmax(torch.where(cut, f1, -1.0)))
    return float(values[best + 1]) if best + 1 < values.numel() else float("-inf")


class NominalPixelStats(Callback):
    """Mean, standard deviation, maximum and all raw pixel scores of the validation images (nominal only), and the
    images with their raw maps (what a calibration reads).

    Run ``engine.validate`` with it to get the "mean + k std", "max of nominal" and SuperADD threshold baselines.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.total_squares = 0.0
        self.count = 0
        self.maximum = float("-inf")
        self.batches: list[Tensor] = []
        self.images: list[Tensor] = []
        self.maps: list[Tensor] = []

    @override
    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any, **kwargs: Any
    ) -> None:
        maps = outputs.anomaly_map.double()
        self.total += float(maps.sum())
        self.total_squares += float((maps**2).sum())
        self.count += maps.numel()
        self.maximum = max(self.maximum, float(maps.max()))
        self.batches.append(outputs.anomaly_map.detach().float().flatten().cpu())
        self.images.append(outputs.image.detach().float().cpu())
        self.maps.append(outputs.anomaly_map.detach().float().reshape(maps.shape[0], *maps.shape[-2:]).cpu())

    @property
    def pixels(self) -> Tensor:
        """Every raw pixel score seen, flat."""
        return torch.cat(self.batches) if self.batches else torch.empty(0)

    @property
    def mean(self) -> float:
        """Mean raw pixel score."""
        return self.total / max(self.count, 1)

    @property
    def std(self) -> float:
        """Standard deviation of the raw pixel scores."""
        return max(self.total_squares / max(self.count, 1) - self.mean**2, 0.0) ** 0.5


def normalized_threshold(raw_threshold: float, post_processor: Any) -> float:
    """A raw pixel threshold expressed on the PostProcessor's normalized scale."""
    from anomalib_tts.adapter import unclipped_scores

    normalized = unclipped_scores(torch.tensor(raw_threshold), post_processor)
    if normalized is None:
        msg = "the PostProcessor has no pixel statistics yet (run validation first)"
        raise ValueError(msg)
    return float(normalized)
