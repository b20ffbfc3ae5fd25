"""Writes each predicted mask as a PNG whose path mirrors the input image's, for ``anomalib predict``."""

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch import Tensor
from typing_extensions import override

from anomalib_tts.lightning.placement import place_callback

logger = logging.getLogger(__name__)


class MaskWriter(BasePredictionWriter):
    """Saves the final ``pred_mask`` of every predicted image as a black/white PNG (255 = anomalous).

    The writer moves itself to the end of the trainer's callbacks in ``setup()``, after the model's
    PostProcessor and after :class:`~anomalib_tts.TestTimeSegmentation`, so with the refinement in the config it
    writes the refined masks, the same ones ``anomalib predict`` returns and draws in its images. A mask is saved
    under ``output_dir`` at the path anomalib's image visualizer uses for the same input (the part of the input
    path below the dataset root), with the suffix ``.png``: ``.../test/crack/003.jpg`` -> ``<output_dir>/test/
    crack/003.png``.

    Args:
        output_dir: Folder for the masks; ``None`` writes to ``<trainer.default_root_dir>/masks``.
        input_size: Resize each mask (nearest neighbour) to the size of its input image file, so it overlays the
            original; ``False`` keeps the model's resolution. Exact when the pre-processor only resizes.

    Example:
        >>> from anomalib.engine import Engine
        >>> from anomalib_tts import TestTimeSegmentation
        >>> engine = Engine(callbacks=[TestTimeSegmentation(), MaskWriter("results/masks")])  # doctest: +SKIP
        >>> engine.predict(model, data_path="images/", ckpt_path="model.ckpt")  # doctest: +SKIP

        In an anomalib YAML::

            trainer:
              callbacks:
                - class_path: anomalib_tts.TestTimeSegmentation
                - class_path: anomalib_tts.MaskWriter
                  init_args:
                    output_dir: results/masks
    """

    def __init__(self, output_dir: str | None = None, input_size: bool = True) -> None:
        super().__init__(write_interval="batch")
        if output_dir is not None and not str(output_dir).strip():
            msg = "output_dir must be a folder path or None, got an empty string"
            raise ValueError(msg)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.input_size = input_size
        self._written = 0

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        place_callback(trainer, self)

    @override
    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._written = 0

    @override
    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_predict_epoch_end(trainer, pl_module)
        output_dir = self.output_dir or Path(trainer.default_root_dir) / "masks"
        logger.info("MaskWriter: wrote %d masks to %s", self._written, output_dir.resolve())

    @override
    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        masks: Tensor | None = getattr(prediction, "pred_mask", None)
        if masks is None:
            logger.warning("MaskWriter: the predictions of batch %d have no pred_mask; nothing written", batch_idx)
            return
        masks = masks.reshape(-1, *masks.shape[-2:]).bool().cpu()
        paths = getattr(prediction, "image_path", None) or [f"batch{batch_idx}_{i}.png" for i in range(len(masks))]
        for mask, path in zip(masks, paths, strict=True):
            self.write(mask, path, trainer)
        self._written += len(masks)

    def write(self, mask: Tensor, input_path: str, trainer: Trainer | None = None) -> Path:
        """Save one ``(H, W)`` bool mask for the image at ``input_path``; returns the file written.

        ``trainer`` gives the default folder and the dataset's name; outside Lightning (``None``) ``output_dir`` must
        be set.
        """
        from anomalib.utils.path import generate_output_filename

        if self.output_dir is None and trainer is None:
            msg = "MaskWriter.write without a trainer needs output_dir"
            raise ValueError(msg)
        output_dir = self.output_dir or Path(trainer.default_root_dir) / "masks"
        datamodule = getattr(trainer, "datamodule", None)
        target = generate_output_filename(
            input_path=input_path,
            output_path=output_dir,
            dataset_name=getattr(datamodule, "name", None),
            category=getattr(datamodule, "category", None),
        ).with_suffix(".png")
        size = _image_size(input_path) if self.input_size else None
        if size is not None and size != tuple(mask.shape):
            mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0] > 0.5
        Image.fromarray(mask.numpy().astype(np.uint8) * np.uint8(255)).save(target)
        return target


def _image_size(path: str) -> tuple[int, int] | None:
    """``(height, width)`` of an image file from its header, ``None`` if it cannot be read."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError):
        return None
    return height, width
