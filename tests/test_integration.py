"""The callback inside a real anomalib Engine: placement, what the Evaluator scores, saved images."""

from pathlib import Path

import pytest
import torch

from anomalib_tts import TestTimeSegmentation
from anomalib_tts.checks import Evidence, SelfCheck

from .conftest import make_datamodule, make_padim

pytestmark = pytest.mark.slow  # every test reads one PaDiM test run with and without the callback


class RecordingSegmentation(TestTimeSegmentation):
    """Keeps every mask the callback writes, with the ground truth, to recompute the metric."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.written: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def refine_batch(self, batch):
        result = super().refine_batch(batch)
        self.written.append((batch.pred_mask.clone(), batch.gt_mask.clone(), result.refined.clone()))
        return result


def _pooled_f1(pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> float:
    predicted = torch.cat([masks.flatten() for masks, _, _ in pairs])
    truth = torch.cat([gt.flatten() for _, gt, _ in pairs])
    true_positives = (predicted & truth).sum()
    return float(2 * true_positives / (predicted.sum() + truth.sum()))


@pytest.fixture(scope="module")
def tested(synthetic_root: Path, padim_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from anomalib.engine import Engine

    results = {}
    for name, callbacks in (("plain", []), ("refined", [RecordingSegmentation(features="model")])):
        root = tmp_path_factory.mktemp(name)
        engine = Engine(default_root_dir=root, logger=False, enable_progress_bar=False, callbacks=callbacks)
        metrics = engine.test(make_padim(), datamodule=make_datamodule(synthetic_root), ckpt_path=padim_checkpoint)
        results[name] = {"metrics": metrics[0], "root": root, "callbacks": callbacks, "trainer": engine.trainer}
    return results


def test_callback_sits_right_after_the_post_processor(tested: dict) -> None:
    names = [type(callback).__name__ for callback in tested["refined"]["trainer"].callbacks]
    position = names.index("RecordingSegmentation")
    assert names[position - 1] == "PostProcessor"
    assert position < names.index("Evaluator")
    assert position < names.index("ImageVisualizer")


def test_evaluator_scores_the_masks_the_callback_wrote(tested: dict) -> None:
    callback = tested["refined"]["callbacks"][0]
    reported = tested["refined"]["metrics"]["pixel_F1Score"]
    assert sum(refined.sum() for _, _, refined in callback.written) > 0
    assert reported == pytest.approx(_pooled_f1(callback.written), abs=1e-5)
    assert reported != pytest.approx(tested["plain"]["metrics"]["pixel_F1Score"], abs=1e-4)


def test_refinement_statistics_are_logged(tested: dict) -> None:
    metrics = tested["refined"]["metrics"]
    callback = tested["refined"]["callbacks"][0]
    assert metrics["tts_images_refined"] == sum(int(refined.sum()) for _, _, refined in callback.written)
    assert metrics["tts_images_refined"] + metrics["tts_images_kept"] == 15


def test_overlay_images_are_saved(tested: dict) -> None:
    images = list(Path(tested["refined"]["root"]).rglob("images/**/*.png"))
    assert len(images) == 15


class EvenPositiveCount(SelfCheck):
    """A check that passes about half of the images, whatever their data: those with an even count of positives."""

    def __call__(self, evidence: Evidence) -> torch.Tensor:
        return evidence.labels.positive.flatten(1).sum(dim=1) % 2 == 0


class MaskHistory(TestTimeSegmentation):
    """Keeps anomalib's mask and the written mask of every image, with its outcome."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def refine_batch(self, batch):
        anomalib_masks = batch.pred_mask.clone()
        result = super().refine_batch(batch)
        self.history.append((anomalib_masks, batch.pred_mask.clone(), result.outcome.clone()))
        return result


def test_an_image_failing_the_self_check_keeps_anomalibs_mask_and_is_counted(
    synthetic_root: Path, padim_checkpoint: Path, tmp_path: Path
) -> None:
    from anomalib.engine import Engine

    from anomalib_tts.refiner import Outcome

    callback = MaskHistory(features="model", self_check=EvenPositiveCount(), fallback="threshold")
    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, callbacks=[callback])
    metrics = engine.test(make_padim(), datamodule=make_datamodule(synthetic_root), ckpt_path=padim_checkpoint)[0]
    anomalib_masks, written, outcome = (torch.cat(parts) for parts in zip(*callback.history, strict=True))
    failed = outcome == Outcome.SELF_CHECK_FAILED
    assert 0 < int(failed.sum()) < len(outcome)
    assert bool((written[failed] == anomalib_masks[failed]).all())
    assert bool((written[outcome == Outcome.REFINED] != anomalib_masks[outcome == Outcome.REFINED]).any())
    assert metrics["tts_images_self_check_failed"] == int(failed.sum())
    assert metrics["tts_images_refined"] == int((outcome == Outcome.REFINED).sum())
