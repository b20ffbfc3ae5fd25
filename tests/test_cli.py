"""``anomalib test`` / ``anomalib predict`` with the callback from a config in ``configs/``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _anomalib(*arguments: str, cwd: Path) -> str:
    command = [sys.executable, "-m", "anomalib.cli.cli", *arguments]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    return output


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.stem)
def test_every_config_parses(config: Path, tmp_path: Path) -> None:
    printed = _anomalib("test", "--config", str(config), "--print_config", cwd=tmp_path)
    assert "anomalib_tts.TestTimeSegmentation" in printed


def test_anomalib_test_and_predict_run_the_callback(synthetic_root: Path, padim_checkpoint: Path, tmp_path: Path) -> None:
    overrides = [
        "--config", str(CONFIGS / "padim.yaml"),
        "--model.init_args.pre_trained", "false",
        "--data.root", str(synthetic_root),
        "--data.category", "texture",
        "--data.num_workers", "0",
        "--ckpt_path", str(padim_checkpoint),
        "--default_root_dir", str(tmp_path / "results"),
    ]  # fmt: skip
    tested = _anomalib("test", *overrides, cwd=tmp_path)
    assert "tts_images_refined" in tested
    assert "pixel_F1Score" in tested

    predicted = _anomalib("predict", *overrides, cwd=tmp_path)
    assert "test-time segmentation: refined" in predicted
    assert len(list((tmp_path / "results").rglob("images/**/*.png"))) >= 15
