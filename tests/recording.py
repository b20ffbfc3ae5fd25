"""A TestTimeSegmentation that also saves anomalib's and its own masks, for the ``anomalib benchmark`` test.

It runs inside the benchmark's subprocess (named by ``class_path`` in the YAML that ``ANOMALIB_TTS_CONFIG`` points
to), where the test cannot reach the callback; it writes ``torch.save`` files to ``$RECORDING_PATH``.
"""

import os
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from anomalib_tts import TestTimeSegmentation


class RecordingTestTimeSegmentation(TestTimeSegmentation):
    """Keeps each test batch's thresholded mask, refined mask and ground truth; saves them at the epoch's end."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.recorded: dict[str, list[torch.Tensor]] = {"thresholded": [], "refined": [], "gt": []}

    @override
    def refine_batch(self, batch: Any) -> Any:
        self.recorded["thresholded"].append(batch.pred_mask.bool().cpu().clone())
        result = super().refine_batch(batch)
        self.recorded["refined"].append(batch.pred_mask.bool().cpu().clone())
        self.recorded["gt"].append(batch.gt_mask.bool().cpu().clone())
        return result

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_test_epoch_end(trainer, pl_module)
        torch.save({name: torch.cat(masks) for name, masks in self.recorded.items()}, os.environ["RECORDING_PATH"])
