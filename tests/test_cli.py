"""``anomalib test`` / ``anomalib predict`` with the callback from a config in ``configs/``."""

from pathlib import Path

import yaml

from tests.cli_runs import run_anomalib

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _with_segmentation_metrics(config: Path, path: Path) -> Path:
    """``config`` whose model's Evaluator also reports this package's metrics, set in YAML as a user would."""
    content = yaml.safe_load(config.read_text())
    pixel_fields = {"fields": ["pred_mask", "gt_mask"], "prefix": "pixel_"}
    content["model"]["init_args"]["evaluator"] = {
        "class_path": "anomalib.metrics.Evaluator",
        "init_args": {
            "test_metrics": [
                {"class_path": "anomalib.metrics.F1Score", "init_args": pixel_fields},
                {"class_path": "anomalib_tts.metrics.IoU", "init_args": pixel_fields},
                {"class_path": "anomalib_tts.metrics.MeanPerImageF1"},
            ]
        },
    }
    path.write_text(yaml.safe_dump(content))
    return path


def test_anomalib_test_and_predict_run_the_callback(
    synthetic_root: Path, padim_checkpoint: Path, tmp_path: Path
) -> None:
    overrides = [
        "--config", str(_with_segmentation_metrics(CONFIGS / "padim.yaml", tmp_path / "padim.yaml")),
        "--model.init_args.pre_trained", "false",
        "--data.root", str(synthetic_root),
        "--data.category", "texture",
        "--data.num_workers", "0",
        "--ckpt_path", str(padim_checkpoint),
        "--default_root_dir", str(tmp_path / "results"),
    ]  # fmt: skip
    tested = run_anomalib("test", *overrides, cwd=tmp_path)
    assert "tts_images_refined" in tested
    assert "pixel_F1Score" in tested
    assert "pixel_IoU" in tested and "MeanPerImageF1" in tested

    predicted = run_anomalib("predict", *overrides, cwd=tmp_path)
    assert "test-time segmentation: refined" in predicted
    assert len(list((tmp_path / "results").rglob("images/**/*.png"))) >= 15
    assert len(list((tmp_path / "results").rglob("masks/**/*.png"))) == 15  # MaskWriter, from a datamodule
