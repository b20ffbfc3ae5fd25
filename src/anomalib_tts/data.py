"""A predict dataset for folders that may hold files no decoder can read: :class:`TolerantPredictDataset`.

anomalib's ``PredictDataset`` lists the images of a folder and decodes each one as a batch asks for it: one file
cut off while a camera was writing it (``OSError: image file is truncated``) ends ``anomalib predict`` and loses the
masks of every image after it. This dataset lists and loads the same images the same way, skips the files that do
not decode (one warning each) and keeps them in :attr:`TolerantPredictDataset.skipped`, which ``MaskWriter`` (and
any other caller of :func:`write_skipped_report`) writes to ``skipped.csv`` beside the masks.
"""

import csv
import logging
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from anomalib.data import ImageBatch, ImageItem
from anomalib.data.utils import get_image_filenames, read_image
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms.v2 import Transform

logger = logging.getLogger(__name__)

__all__ = ["SKIPPED_REPORT", "TolerantPredictDataset", "write_skipped_report"]

SKIPPED_REPORT = "skipped.csv"  # the report's file name, in the folder of the masks

# What decoding a damaged or unfinished file raises (PIL, its PNG/zlib decoders, a file gone or not yet readable).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error, Image.DecompressionBombError)


class TolerantPredictDataset(IterableDataset):
    """anomalib's ``PredictDataset`` that skips the files it cannot decode instead of ending the run.

    The images are listed as anomalib lists them (``get_image_filenames``: the same files, in the same order; files
    without an image extension, e.g. ``notes.txt``, are not listed), loaded with anomalib's ``read_image`` (RGB,
    float in ``[0, 1]``; grayscale and RGBA files are converted) and the ``transform``, and yielded as the same
    ``ImageItem`` with its ``image_path``: a readable image gives the item, hence the prediction and the refined
    mask, that ``PredictDataset`` gives.

    How a file is skipped: the dataset is iterable, and checks each file as it loads it. A file whose decoding
    fails (truncated, empty, not an image, gone, unreadable) is logged once (a warning naming it and why), kept
    in :attr:`skipped`, and the next file is loaded in its place, so every batch holds readable images only
    (``batch_size`` of them; the last one fewer). There is no second decode (the load is the check), no empty
    batch for the model, no repeated image, and a file that a camera finishes writing after the run started is
    read as it is when its turn comes. A map-style dataset cannot skip an index: returning ``None`` leaves a batch
    that may be empty, returning another image predicts it twice, and checking every file up front decodes each
    image twice and still fails on a file that changes in between.

    Usage: ``anomalib predict --data anomalib_tts.TolerantPredictDataset --data.path <folder>`` (or in YAML,
    ``data: {class_path: anomalib_tts.TolerantPredictDataset, init_args: {path: <folder>}}``); anomalib's CLI and
    ``Engine.predict(dataset=...)`` wrap a dataset in a ``DataLoader`` with its :attr:`collate_fn`.

    Resuming: files in :attr:`skip` are neither loaded nor yielded, so the model never sees them. The set is read
    when the first item is asked for, not when the iterator is made, so ``MaskWriter(skip_existing=True)`` can fill
    it in ``on_predict_start`` (Lightning makes the loader's iterator just before that hook). ``len()`` counts the
    files to try, so a progress bar's total includes files that turn out unreadable or done.

    Several loader processes (``DataLoader(num_workers=n)``) and several devices share the files out (every n-th
    file to each, no file twice); :attr:`skipped` then fills in the worker processes, and ``MaskWriter`` finds the
    files that no batch brought and asks :meth:`check` why. Workers copy the dataset when they start, before
    ``on_predict_start``: there ``skip`` must be given up front (the writer still leaves existing masks unwritten).

    Args:
        path: An image file or a folder of images (searched recursively), as ``PredictDataset``'s.
        transform: Applied to each image, as ``PredictDataset``'s (``None``: the model's PreProcessor resizes).
        image_size: Kept for ``PredictDataset``'s signature (which does not use it either).
        skip: Files not to load at all (as listed: ``str(path)``), e.g. the images whose masks an earlier run wrote:
            ``MaskWriter(skip_existing=True)`` sets it at the start of ``anomalib predict``.

    Attributes:
        image_filenames: Every file listed, skipped ones included.
        skip: The files not loaded (a set of ``str``).
        skipped: ``{path: reason}`` of the files that could not be decoded, in the order met.

    Example:
        >>> from torch.utils.data import DataLoader
        >>> dataset = TolerantPredictDataset("incoming/")  # doctest: +SKIP
        >>> for batch in DataLoader(dataset, batch_size=4, collate_fn=dataset.collate_fn):  # doctest: +SKIP
        ...     ...  # readable images only
        >>> dataset.skipped  # doctest: +SKIP
        {'incoming/cam2_0412.png': 'OSError: image file is truncated'}
    """

    def __init__(
        self,
        path: str | Path,
        transform: Transform | None = None,
        image_size: int | tuple[int, int] = (256, 256),
        skip: Iterable[str | Path] | None = None,
    ) -> None:
        super().__init__()
        self.image_filenames: list[Path] = get_image_filenames(path)
        self.transform = transform
        self.image_size = image_size
        self.skip: set[str] = {str(name) for name in skip or ()}
        self.skipped: dict[str, str] = {}

    def pending(self) -> list[Path]:
        """The files this process loads, in order: those not in :attr:`skip`, this device's share of them."""
        rank, world = _process_share()
        files = [path for path in self.image_filenames if str(path) not in self.skip]
        return files[rank::world]

    def __len__(self) -> int:
        """How many files this process loads at most (the files that turn out unreadable are not yielded)."""
        return len(self.pending())

    def __iter__(self) -> Iterator[ImageItem]:
        """The readable images of :meth:`pending` (this loader process's share of them), in order."""
        files = self.pending()
        worker = get_worker_info()
        if worker is not None:
            files = files[worker.id :: worker.num_workers]
        for path in files:
            item = self.load(path)
            if item is not None:
                yield item

    def load(self, path: str | Path) -> ImageItem | None:
        """The item of ``path`` as ``PredictDataset`` builds it, or ``None`` (logged and kept in :attr:`skipped`)
        when the file cannot be decoded."""
        try:
            image = read_image(path, as_tensor=True)  # PIL decodes the whole file here (convert("RGB"))
        except DECODE_ERRORS as error:
            self._skip(str(path), _reason(error))
            return None
        if self.transform:
            image = self.transform(image)
        return ImageItem(image=image, image_path=str(path))

    @staticmethod
    def check(path: str | Path) -> str | None:
        """Why ``path`` cannot be decoded (``"OSError: image file is truncated"``), ``None`` if it can."""
        try:
            with Image.open(path) as image:
                image.convert("RGB")  # read_image's decode, without its copy to an array
        except DECODE_ERRORS as error:
            return _reason(error)
        return None

    def _skip(self, path: str, reason: str) -> None:
        if path not in self.skipped:
            logger.warning("skipped %s: cannot read it as an image (%s)", path, reason)
        self.skipped[path] = reason

    @property
    def collate_fn(self) -> Callable:
        """``ImageBatch.collate``, as ``PredictDataset``'s."""
        return ImageBatch.collate


def write_skipped_report(folder: str | Path, skipped: dict[str, str]) -> Path:
    """Write ``<folder>/skipped.csv``: a header ``path,reason`` and one row per skipped file; returns its path.

    Written at the end of every run, also when nothing was skipped (the header alone), so the file beside the masks
    always describes the last run, never an earlier one's.
    """
    report = Path(folder) / SKIPPED_REPORT
    report.parent.mkdir(parents=True, exist_ok=True)
    with report.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "reason"])
        writer.writerows(sorted(skipped.items()))
    return report


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".strip().rstrip(":")


def _process_share() -> tuple[int, int]:
    """``(rank, world size)`` of a distributed run (each device predicts every world-size-th file), else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
