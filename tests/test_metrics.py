"""Metric definitions against hand-computed values."""

import torch
from anomalib.data import ImageBatch

from anomalib_tts.metrics import IoU, MeanPerImageF1, f1_score, iou_score
from anomalib_tts.tools.evaluation import segmentation_scores


def _batch(pred: list, gt: list) -> ImageBatch:
    pred_tensor, gt_tensor = torch.tensor(pred, dtype=torch.bool), torch.tensor(gt, dtype=torch.bool)
    return ImageBatch(image=torch.zeros(len(pred), 3, 2, 2), pred_mask=pred_tensor, gt_mask=gt_tensor)


PRED = [[[1, 1], [0, 0]], [[0, 0], [0, 0]], [[1, 0], [0, 0]], [[0, 0], [0, 0]]]
GT = [[[1, 0], [0, 0]], [[0, 1], [1, 0]], [[0, 0], [0, 0]], [[0, 0], [0, 0]]]


def test_per_image_f1_counts_defective_images_only_by_default() -> None:
    metric = MeanPerImageF1()
    metric.update(_batch(PRED, GT))
    # image 1: tp 1, pred 2, gt 1 -> 2/3; image 2: empty prediction of a defect -> 0
    assert torch.isclose(metric.compute(), torch.tensor((2 / 3 + 0) / 2))


def test_per_image_f1_over_all_images_scores_empty_on_empty_as_one() -> None:
    metric = MeanPerImageF1(defective_only=False)
    metric.update(_batch(PRED, GT))
    # image 3: false positive on a defect-free image -> 0; image 4: both empty -> 1
    assert torch.isclose(metric.compute(), torch.tensor((2 / 3 + 0 + 0 + 1) / 4))


def test_per_image_f1_accumulates_over_batches() -> None:
    metric = MeanPerImageF1()
    metric.update(_batch(PRED[:1], GT[:1]))
    metric.update(_batch(PRED[1:], GT[1:]))
    assert torch.isclose(metric.compute(), torch.tensor(1 / 3))


def test_iou_is_pooled_over_pixels() -> None:
    metric = IoU()
    metric.update(_batch(PRED, GT))
    # pooled: intersection 1; union = predicted 3 + truth 3 - 1 = 5
    assert torch.isclose(metric.compute(), torch.tensor(1 / 5))


def test_functional_scores() -> None:
    pred = torch.tensor(PRED, dtype=torch.bool)
    gt = torch.tensor(GT, dtype=torch.bool)
    assert torch.allclose(f1_score(pred, gt), torch.tensor([2 / 3, 0.0, 0.0, 1.0]))
    assert torch.allclose(iou_score(pred, gt), torch.tensor([0.5, 0.0, 0.0, 1.0]))
    scores = segmentation_scores(pred, gt, torch.tensor([1, 0, 1, 0]).bool(), torch.tensor([1, 1, 0, 0]).bool())
    assert abs(scores["pixel_f1_all"] - 2 * 1 / (3 + 3)) < 1e-6
    assert abs(scores["pixel_f1_defective"] - 2 * 1 / (2 + 3)) < 1e-6
    assert abs(scores["mean_f1_defective"] - 1 / 3) < 1e-6
    assert abs(scores["mean_iou_defective"] - 0.25) < 1e-6
    assert abs(scores["image_f1"] - 0.5) < 1e-6


def test_the_refinement_and_the_metrics_do_not_import_the_study_code(tmp_path) -> None:
    """``anomalib_tts.tools`` (``compare``, ``demo``, their scores and baselines) serves the commands and examples
    only: the library, its doors and its metrics import none of it."""
    from tests.helpers import python_result

    library = (
        "anomalib_tts.pipeline", "anomalib_tts.adapter", "anomalib_tts.deploy", "anomalib_tts.metrics",
        "anomalib_tts.lightning.callback", "anomalib_tts.lightning.factory", "anomalib_tts.lightning.writer",
    )  # fmt: skip
    code = (
        f"import sys; import {', '.join(library)}; import anomalib_tts; anomalib_tts.TestTimeSegmentation; "
        "result = sorted(name for name in sys.modules if name.startswith('anomalib_tts'))"
    )
    imported = python_result(code, tmp_path)
    assert set(library) <= set(imported)  # the check below looks at a process that did import the library
    assert [name for name in imported if name.startswith("anomalib_tts.tools")] == []
