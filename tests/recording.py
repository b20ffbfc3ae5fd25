"""A TestTimeSegmentation that also saves anomalib's and its own masks, for the tests that run anomalib's CLI.

It runs inside the CLI's subprocess (named by ``class_path`` in a YAML), where the test cannot reach the callback;
at the end of the test it writes a ``torch.save`` file to ``$RECORDING_PATH``: the masks, the run's metrics, and
the class and call counts of its three components.
"""

import os
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from anomalib_tts import TestTimeSegmentation


class RecordingTestTimeSegmentation(TestTimeSegmentation):
    """Keeps each test batch's thresholded mask, refined mask and ground truth; saves them when the test ends."""

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
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        components = {
            "pseudo_labels": self.refiner.labeler,
            "features": self.refiner.features,
            "classifier": self.refiner.classifier,
        }
        torch.save(
            {
                **{name: torch.cat(masks) for name, masks in self.recorded.items()},
                "metrics": {name: float(value) for name, value in trainer.callback_metrics.items()},
                "components": {
                    name: {
                        "class": f"{type(component).__module__}.{type(component).__qualname__}",
                        **{key: value for key, value in vars(component).items() if isinstance(value, int | list)},
                    }
                    for name, component in components.items()
                },
            },
            os.environ["RECORDING_PATH"],
        )
