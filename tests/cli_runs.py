"""Runs Python (anomalib's CLI) in a subprocess, offline, and returns what it printed."""

import os
import subprocess
import sys
from pathlib import Path


def run_python(*arguments: str, cwd: Path, **environment: str) -> str:
    """``python *arguments`` in ``cwd`` with ``HF_HUB_OFFLINE=1`` and ``environment``; fails the test on an error."""
    completed = subprocess.run(
        [sys.executable, *arguments],
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **environment},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,  # the assertion below shows the output
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    return output


def run_anomalib(*arguments: str, cwd: Path, **environment: str) -> str:
    """``anomalib *arguments`` (the module its entry point runs)."""
    return run_python("-m", "anomalib.cli.cli", *arguments, cwd=cwd, **environment)


# `anomalib predict` as its entry point runs it, then saves what Engine.predict returned and the callback order.
PREDICT_AND_KEEP = """
import sys, torch
from anomalib.cli.cli import AnomalibCLI
cli = AnomalibCLI(args=sys.argv[2:])
predictions = cli.engine.trainer.predict_loop.predictions
torch.save({
    "paths": [path for batch in predictions for path in batch.image_path],
    "pred_masks": torch.cat([batch.pred_mask.reshape(-1, *batch.pred_mask.shape[-2:]) for batch in predictions]),
    "anomaly_maps": torch.cat([batch.anomaly_map.reshape(-1, *batch.anomaly_map.shape[-2:]) for batch in predictions]),
    "callbacks": [type(callback).__name__ for callback in cli.engine.trainer.callbacks],
}, sys.argv[1])
"""
