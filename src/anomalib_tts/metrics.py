"""Segmentation metrics as anomalib metrics, usable in an ``Evaluator`` (Python or YAML ``class_path``), and the
functional scores they are computed with.

Example:
    >>> from anomalib.metrics import Evaluator
    >>> evaluator = Evaluator(test_metrics=[IoU(), MeanPerImageF1()])

    In a YAML::

        model:
          init_args:
            evaluator:
              class_path: anomalib.metrics.Evaluator
              init_args:
                test_metrics:
                  - class_path: anomalib_tts.metrics.MeanPerImageF1
"""

import torch
from anomalib.metrics import AnomalibMetric
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import BinaryJaccardIndex


def f1_score(predicted: Tensor, truth: Tensor) -> Tensor:
    """F1 of bool tensors over their last two dims (per image) or all dims when 1-D; 1.0 when both are empty.

    Example:
        >>> predicted = torch.tensor([[[True, True], [False, False]], [[False, False], [False, False]]])
        >>> f1_score(predicted, torch.tensor([[[True, False], [False, False]], [[False] * 2] * 2])).tolist()
        [0.6666666865348816, 1.0]
    """
    dims = tuple(range(1, predicted.dim())) if predicted.dim() > 1 else (0,)
    true_positives = (predicted & truth).sum(dim=dims).float()
    total = (predicted.sum(dim=dims) + truth.sum(dim=dims)).float()
    return torch.where(total > 0, 2 * true_positives / total.clamp(min=1), torch.ones_like(total))


def iou_score(predicted: Tensor, truth: Tensor) -> Tensor:
    """Intersection over union per image (last two dims); 1.0 when both are empty.

    Example:
        >>> predicted = torch.tensor([[[True, True], [False, False]]])
        >>> iou_score(predicted, torch.tensor([[[True, False], [False, False]]])).tolist()
        [0.5]
    """
    dims = tuple(range(1, predicted.dim()))
    intersection = (predicted & truth).sum(dim=dims).float()
    union = (predicted | truth).sum(dim=dims).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


class IoU(AnomalibMetric, BinaryJaccardIndex):  # type: ignore[misc]
    """Pixel IoU (Jaccard index) of ``pred_mask`` against ``gt_mask``, pooled over all images.

    Example:
        >>> from anomalib.data import ImageBatch
        >>> metric = IoU()
        >>> metric.update(ImageBatch(image=torch.zeros(1, 3, 2, 2), pred_mask=torch.tensor([[[1, 1], [0, 0]]]),
        ...                          gt_mask=torch.tensor([[[1, 0], [0, 0]]])))
        >>> float(metric.compute())
        0.5
    """

    default_fields = ("pred_mask", "gt_mask")


class _PerImageF1(Metric):
    """Mean over images of each image's pixel F1."""

    full_state_update = False

    def __init__(self, defective_only: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.defective_only = defective_only
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch of ``(B, H, W)`` masks."""
        preds = preds.reshape(target.shape[0], -1).bool()
        target = target.reshape(target.shape[0], -1).bool()
        if self.defective_only:
            keep = target.any(dim=1)
            preds, target = preds[keep], target[keep]
        self.total += f1_score(preds, target).double().sum()
        self.count += target.shape[0]

    def compute(self) -> Tensor:
        """The mean per-image F1 (0 when no image counted)."""
        return (self.total / self.count.clamp(min=1)).float()


class MeanPerImageF1(AnomalibMetric, _PerImageF1):  # type: ignore[misc]
    """Mean per-image pixel F1 of ``pred_mask`` against ``gt_mask``.

    By default only images with a defect count (``defective_only=True``); an image where both masks are empty
    scores 1 when it counts.

    Example:
        >>> from anomalib.data import ImageBatch
        >>> metric = MeanPerImageF1()
        >>> pred = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]], [[1, 0], [0, 0]]])
        >>> gt = torch.tensor([[[1, 0], [0, 0]], [[0, 1], [0, 0]], [[0, 0], [0, 0]]])
        >>> metric.update(ImageBatch(image=torch.zeros(3, 3, 2, 2), pred_mask=pred, gt_mask=gt))
        >>> round(float(metric.compute()), 4)  # (2/3 + 0) / 2; the defect-free third image does not count
        0.3333
    """

    default_fields = ("pred_mask", "gt_mask")
