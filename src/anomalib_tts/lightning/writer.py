"""Writes each predicted mask as a PNG whose path mirrors the input image's, for ``anomalib predict``."""

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch import Tensor
from typing_extensions import override

from anomalib_tts.data import TolerantPredictDataset, write_skipped_report
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

    Each mask is written to a temporary file first and then renamed, so a run stopped midway leaves whole masks
    only. Over :class:`~anomalib_tts.TolerantPredictDataset` (``--data anomalib_tts.TolerantPredictDataset
    --data.path <folder>``), files that cannot be decoded are skipped by the dataset, and at the end of the predict
    epoch the writer lists them in ``<output_dir>/skipped.csv`` (``path,reason``; written at the end of every such
    run, the header alone when nothing was skipped, so the report always describes the last run) and counts them in
    its summary line. Over anomalib's own datasets nothing is skipped and no report is written.

    Args:
        output_dir: Folder for the masks; ``None`` writes to ``<trainer.default_root_dir>/masks``.
        input_size: Resize each mask (nearest neighbour) to the size of its input image file, so it overlays the
            original; ``False`` keeps the model's resolution. Exact when the pre-processor only resizes.
        skip_existing: Resume an interrupted run: an image whose mask file exists keeps it. Over a
            ``TolerantPredictDataset`` those images are not loaded nor run through the model (the writer hands
            them to the dataset's ``skip`` at the start of ``predict``); over another dataset, or a ``DataLoader``
            whose worker processes started before that, they are predicted but their masks are not written again.

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

    def __init__(self, output_dir: str | None = None, input_size: bool = True, skip_existing: bool = False) -> None:
        super().__init__(write_interval="batch")
        if output_dir is not None and not str(output_dir).strip():
            msg = "output_dir must be a folder path or None, got an empty string"
            raise ValueError(msg)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.input_size = input_size
        self.skip_existing = skip_existing
        self._written = 0
        self._kept = 0  # masks of an earlier run left as they are (skip_existing)
        self._not_loaded = 0  # of those, the images the dataset did not even load
        self._predicted: set[str] = set()

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        place_callback(trainer, self)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """With ``skip_existing``, hand the images whose masks exist to each ``TolerantPredictDataset``'s ``skip``."""
        self._not_loaded = 0
        if not self.skip_existing:
            return
        for loader, dataset in _tolerant_datasets(trainer):
            share = {str(path) for path in dataset.pending()}
            done = {str(path) for path in dataset.image_filenames if self.target(path, trainer).exists()}
            dataset.skip |= done
            self._not_loaded += len(share & done)
            if done and getattr(loader, "num_workers", 0) > 0:
                logger.warning(
                    "MaskWriter: the DataLoader's workers started before the writer could tell them which %d masks "
                    "exist; those images are predicted again, their masks are kept",
                    len(done),
                )

    @override
    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._written = 0
        self._kept = 0
        self._predicted = set()

    @override
    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_predict_epoch_end(trainer, pl_module)
        output_dir = self.output_dir or Path(trainer.default_root_dir) / "masks"
        summary = f"MaskWriter: wrote {self._written} masks to {output_dir.resolve()}"
        if self.skip_existing:
            summary += f"; kept {self._not_loaded + self._kept} masks of an earlier run"
        datasets = list(_tolerant_datasets(trainer))
        if datasets:
            skipped = _gather(self.skipped_files(trainer))
            summary += f"; skipped {len(skipped)} unreadable files"
            if getattr(trainer, "is_global_zero", True):
                report = write_skipped_report(output_dir, skipped)
                summary += f" (listed in {report.resolve()})"
        logger.info(summary)

    def skipped_files(self, trainer: Trainer) -> dict[str, str]:
        """``{path: reason}`` of the files the predict datasets of ``trainer`` skipped (this process's share).

        The datasets keep what they skipped where they load; what a ``DataLoader``'s worker processes skipped
        is found here as the files no batch brought, checked again in this process for the reason.
        """
        skipped: dict[str, str] = {}
        for loader, dataset in _tolerant_datasets(trainer):
            skipped.update(dataset.skipped)
            if getattr(loader, "num_workers", 0) > 0:
                for path in dataset.pending():
                    if str(path) not in self._predicted and str(path) not in skipped:
                        reason = dataset.check(path)
                        if reason is not None:
                            skipped[str(path)] = reason
        return skipped

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
            self._predicted.add(str(path))
            if self.skip_existing and self.target(path, trainer).exists():
                self._kept += 1
                continue
            self.write(mask, path, trainer)
            self._written += 1

    def write(self, mask: Tensor, input_path: str, trainer: Trainer | None = None) -> Path:
        """Save one ``(H, W)`` bool mask for the image at ``input_path``; returns the file written.

        ``trainer`` gives the default folder and the dataset's name; outside Lightning (``None``) ``output_dir`` must
        be set.
        """
        target = self.target(input_path, trainer)
        target.parent.mkdir(parents=True, exist_ok=True)
        size = _image_size(input_path) if self.input_size else None
        if size is not None and size != tuple(mask.shape):
            mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0] > 0.5
        partial = target.with_name(f".{target.name}.partial")  # renamed when whole: no half-written mask on a stop
        Image.fromarray(mask.numpy().astype(np.uint8) * np.uint8(255)).save(partial, format="PNG")
        os.replace(partial, target)
        return target

    def target(self, input_path: str | Path, trainer: Trainer | None = None) -> Path:
        """The file the mask of the image at ``input_path`` is written to (see :meth:`write` for ``trainer``)."""
        from anomalib.utils.path import generate_output_filename

        if self.output_dir is None and trainer is None:
            msg = "MaskWriter.write without a trainer needs output_dir"
            raise ValueError(msg)
        output_dir = self.output_dir or Path(trainer.default_root_dir) / "masks"
        datamodule = getattr(trainer, "datamodule", None)
        return generate_output_filename(
            input_path=input_path,
            output_path=output_dir,
            dataset_name=getattr(datamodule, "name", None),
            category=getattr(datamodule, "category", None),
            mkdir=False,
        ).with_suffix(".png")


def _image_size(path: str) -> tuple[int, int] | None:
    """``(height, width)`` of an image file from its header, ``None`` if it cannot be read."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError):
        return None
    return height, width


def _tolerant_datasets(trainer: Trainer) -> Iterator[tuple[Any, TolerantPredictDataset]]:
    """``(loader, dataset)`` for each predict ``DataLoader`` of ``trainer`` over a ``TolerantPredictDataset``."""
    loaders = getattr(trainer, "predict_dataloaders", None)
    if loaders is None:
        return
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    elif not isinstance(loaders, list | tuple):
        loaders = [loaders]
    for loader in loaders:
        dataset = getattr(loader, "dataset", None)
        if isinstance(dataset, TolerantPredictDataset):
            yield loader, dataset


def _gather(skipped: dict[str, str]) -> dict[str, str]:
    """The skipped files of every process of a distributed run (each lists its share), this one's otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return skipped
    shares: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, skipped)
    return {path: reason for share in shares for path, reason in (share or {}).items()}
