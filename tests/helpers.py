"""What several test files share: a colour feature source, F1 scores, a small backbone, a recording callback, and
running Python (anomalib's CLI) in a subprocess.

``RecordingSegmentation`` also runs inside anomalib's CLI, named by ``class_path: tests.helpers.RecordingSegmentation``
in a YAML (with the repository on ``PYTHONPATH``): there the test cannot reach the callback, so at the end of the
test loop it saves what it recorded to the file named by ``$RECORDING_PATH``.
"""

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from anomalib_tts.lightning.callback import TestTimeSegmentation
from anomalib_tts.pipeline.features import FeatureSource, Modalities, TimmFeatures

RECORDING_VARIABLE = "RECORDING_PATH"


class Colour(FeatureSource):
    """The images themselves as the only feature level."""

    def __call__(self, inputs: Modalities) -> list[Tensor]:
        return [inputs.image]


def pooled_f1(masks: Tensor, truth: Tensor) -> float:
    """F1 of all pixels together (every image's pixels pooled)."""
    true_positives = (masks.bool() & truth.bool()).sum()
    return float(2 * true_positives / (masks.bool().sum() + truth.bool().sum()))


def mean_f1(masks: Tensor, truth: Tensor) -> float:
    """Mean of the per-image F1 over ``(B, H, W)`` masks (every image must have a defect or a predicted pixel)."""
    overlap = (masks & truth).flatten(1).sum(dim=1)
    return float((2 * overlap / (masks.flatten(1).sum(dim=1) + truth.flatten(1).sum(dim=1))).mean())


@cache
def small_features() -> TimmFeatures:
    """One small random-weight backbone (resnet18's ``layer1``) for all tests, built once."""
    return TimmFeatures(backbone="resnet18", layers=["layer1"], pre_trained=False)


class RecordingSegmentation(TestTimeSegmentation):
    """A ``TestTimeSegmentation`` that keeps, for every batch it refines, the masks before and after and more.

    Attributes:
        recorded: Lists, one entry per batch: ``before`` (the mask anomalib wrote), ``after`` (the mask the
            callback wrote), ``outcome`` (each image's :class:`~anomalib_tts.pipeline.Outcome`) and, where the
            batch has it, ``gt`` (the ground truth).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.recorded: dict[str, list[Tensor]] = {"before": [], "after": [], "outcome": [], "gt": []}

    @override
    def refine_batch(self, batch: Any) -> Any:
        before = batch.pred_mask.bool().cpu().clone()
        result = super().refine_batch(batch)
        self.recorded["before"].append(before)
        self.recorded["after"].append(batch.pred_mask.bool().cpu().clone())
        self.recorded["outcome"].append(result.outcome.cpu().clone())
        if getattr(batch, "gt_mask", None) is not None:
            self.recorded["gt"].append(batch.gt_mask.bool().cpu().clone())
        return result

    def stacked(self, name: str) -> Tensor:
        """The records of ``name`` of every batch, concatenated."""
        return torch.cat(self.recorded[name])

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Save the records, the run's metrics and the components' counters to ``$RECORDING_PATH`` (if set)."""
        path = os.environ.get(RECORDING_VARIABLE)
        if not path:
            return
        components = {
            "pseudo_labels": self.pipeline.pseudo_labels,
            "features": self.pipeline.features,
            "classifier": self.pipeline.classifier,
        }
        torch.save(
            {
                **{name: self.stacked(name) for name, records in self.recorded.items() if records},
                "metrics": {name: float(value) for name, value in trainer.callback_metrics.items()},
                "components": {
                    name: {
                        "class": f"{type(component).__module__}.{type(component).__qualname__}",
                        **{key: value for key, value in vars(component).items() if isinstance(value, int | list)},
                    }
                    for name, component in components.items()
                },
            },
            path,
        )


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


def python_result(code: str, cwd: Path, **environment: str) -> Any:
    """Run ``code`` in a fresh interpreter (as :func:`run_python`); it sets ``result``, a JSON value, returned here."""
    path = cwd / "python_result.json"
    run_python("-c", f"{code}\nimport json\njson.dump(result, open({str(path)!r}, 'w'))", cwd=cwd, **environment)
    return json.loads(path.read_text())


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
