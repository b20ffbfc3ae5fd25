"""The callback inside a real anomalib Engine: placement, what the Evaluator scores, saved images."""

from pathlib import Path

import pytest
import torch

from anomalib_tts.pipeline.checks import Evidence, SelfCheck
from anomalib_tts.pipeline.refinement import FALLBACK_OUTCOMES, Outcome
from tests.helpers import RecordingSegmentation, pooled_f1

from .conftest import make_datamodule, make_padim

pytestmark = pytest.mark.slow  # every test fits or tests PaDiM in an Engine


@pytest.fixture(scope="module")
def tested(synthetic_root: Path, padim_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from anomalib.engine import Engine

    results = {}
    for name, callbacks in (("plain", []), ("refined", [RecordingSegmentation(features="model", calibrate=False)])):
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
    assert int((callback.stacked("outcome") == Outcome.REFINED).sum()) > 0
    assert not torch.equal(callback.stacked("after"), callback.stacked("before"))
    assert reported == pytest.approx(pooled_f1(callback.stacked("after"), callback.stacked("gt")), abs=1e-5)
    assert reported != pytest.approx(tested["plain"]["metrics"]["pixel_F1Score"], abs=1e-4)


def test_refinement_statistics_are_logged(tested: dict) -> None:
    metrics = tested["refined"]["metrics"]
    outcome = tested["refined"]["callbacks"][0].stacked("outcome")
    assert len(outcome) == 15
    kept = (Outcome.GATED, Outcome.FEW_NEGATIVES, Outcome.FIT_FAILED, Outcome.FEW_VALID)  # their input mask stays
    assert metrics["tts_images_refined"] == int((outcome == Outcome.REFINED).sum()) > 0
    assert metrics["tts_images_fallback"] == int(torch.isin(outcome, torch.tensor(FALLBACK_OUTCOMES)).sum())
    assert metrics["tts_images_kept"] == int(torch.isin(outcome, torch.tensor(kept)).sum())
    assert metrics["tts_images_self_check_failed"] == int((outcome == Outcome.SELF_CHECK_FAILED).sum())
    assert metrics["tts_images_refined"] + metrics["tts_images_fallback"] + metrics["tts_images_kept"] == 15


def test_overlay_images_are_saved(tested: dict) -> None:
    images = list(Path(tested["refined"]["root"]).rglob("images/**/*.png"))
    assert len(images) == 15


class EvenPositiveCount(SelfCheck):
    """A check that passes about half of the images, whatever their data: those with an even count of positives."""

    def __call__(self, evidence: Evidence) -> torch.Tensor:
        return evidence.labels.positive.flatten(1).sum(dim=1) % 2 == 0


def test_an_image_failing_the_self_check_gets_the_threshold_fallback_anomalibs_mask_and_is_counted(
    synthetic_root: Path, padim_checkpoint: Path, tmp_path: Path
) -> None:
    from anomalib.engine import Engine

    callback = RecordingSegmentation(
        features="model", self_check=EvenPositiveCount(), fallback="threshold", calibrate=False
    )
    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, callbacks=[callback])
    metrics = engine.test(make_padim(), datamodule=make_datamodule(synthetic_root), ckpt_path=padim_checkpoint)[0]
    anomalib_masks, written, outcome = (callback.stacked(name) for name in ("before", "after", "outcome"))
    failed = outcome == Outcome.SELF_CHECK_FAILED
    assert 0 < int(failed.sum()) < len(outcome)
    assert bool((written[failed] == anomalib_masks[failed]).all())
    assert bool((written[outcome == Outcome.REFINED] != anomalib_masks[outcome == Outcome.REFINED]).any())
    assert metrics["tts_images_self_check_failed"] == int(failed.sum())
    assert metrics["tts_images_refined"] == int((outcome == Outcome.REFINED).sum())
