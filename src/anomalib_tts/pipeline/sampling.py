"""Deterministic, batched sampling of pixel sets.

Random draws come from a counter-based hash of ``(image seed, stream, pixel index)`` computed with integer
tensor ops on the batch's device. The draw for an image therefore depends only on that image's seed, never
on the batch it arrived in, and needs no generator state and no host-device copy.
"""

import functools
import zlib
from collections.abc import Sequence

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def _hash32(values: Tensor) -> Tensor:
    """Integer hash (Wellons' lowbias32 constants); int64 in, int64 in ``[0, 2**32)`` out, no overflow."""
    values = values & _MASK32  # a new tensor: the rest works on it in place, with no tensor allocated per step
    values ^= values >> 16
    values *= 0x45D9F3B
    values &= _MASK32
    values ^= values >> 16
    values *= 0x45D9F3B
    values &= _MASK32
    values ^= values >> 16
    return values


def random_keys(seeds: Tensor, stream: int | Tensor, num_keys: int) -> Tensor:
    """Pseudo-random int64 keys in ``[1, 2**32]``, one row per seed.

    Args:
        seeds: ``(B,)`` integer seeds, one per image.
        stream: Separates independent draws for the same image (positives, negatives, ...); an int for every
            row, or ``(B,)`` integers, one per row.
        num_keys: Number of keys per image.

    Returns:
        ``(B, num_keys)`` int64 tensor on the seeds' device.

    Example:
        >>> keys = random_keys(torch.tensor([0, 1]), stream=0, num_keys=4)
        >>> keys.shape, bool((keys >= 1).all())
        (torch.Size([2, 4]), True)
        >>> per_row = random_keys(torch.tensor([0, 0]), torch.tensor([0, 1]), 4)  # one stream per row
        >>> torch.equal(per_row[1], random_keys(torch.tensor([0]), 1, 4)[0])
        True
    """
    seeds = seeds.to(torch.int64)
    streams = torch.as_tensor(stream, dtype=torch.int64, device=seeds.device).expand_as(seeds)
    row = _hash32(_hash32(seeds) ^ _hash32(streams + 0x9E37))
    return _hash32(row[:, None] ^ _hashed_indices(num_keys, seeds.device)[None, :]).add_(1)


@functools.lru_cache(maxsize=8)
def _hashed_indices(num_keys: int, device: torch.device) -> Tensor:
    """``_hash32(0 .. num_keys - 1)``: the same for every image and stream of a map size, so computed once."""
    return _hash32(torch.arange(num_keys, device=device, dtype=torch.int64))


def sample_pixels(candidates: Tensor, max_samples: int, seeds: Tensor, stream: int | Tensor) -> tuple[Tensor, Tensor]:
    """Draw up to ``max_samples`` pixels uniformly without replacement from each row's candidate set.

    Args:
        candidates: ``(B, N)`` bool, the pixels that may be drawn (flattened maps).
        max_samples: Cap on the set size.
        seeds: ``(B,)`` per-row seeds.
        stream: Independent stream id (use a different one per set); one per row as a ``(B,)`` tensor, so that
            several sets of the same images are drawn in one selection.

    Returns:
        ``(indices, valid)``, both ``(B, K)`` with ``K = min(max_samples, N)``: flat pixel indices and whether
        each slot holds a drawn pixel (rows with fewer candidates than ``K`` have invalid slots). The pixels come
        in the order of their keys, so the first ``k`` of a draw are the draw with ``max_samples = k``.

    Example:
        >>> candidates = torch.tensor([[True, False, True, True], [False, False, False, True]])
        >>> indices, valid = sample_pixels(candidates, 2, torch.tensor([3, 4]), stream=0)
        >>> valid.sum(dim=1).tolist()
        [2, 1]
        >>> bool(candidates.gather(1, indices)[valid].all())
        True
    """
    keys = random_keys(seeds, stream, candidates.shape[1])
    keys = torch.where(candidates, keys, torch.zeros_like(keys))
    values, indices = keys.topk(min(max_samples, candidates.shape[1]), dim=1)
    return indices, values > 0


def path_seeds(paths: Sequence[str], device: torch.device | str = "cpu") -> Tensor:
    """Seeds from image file names (CRC-32), stable across runs, processes and batch orders."""
    return torch.tensor([zlib.crc32(str(path).encode()) for path in paths], dtype=torch.int64, device=device)


def content_seeds(maps: Tensor) -> Tensor:
    """Seeds from the content of each map, for batches that carry no file names.

    Args:
        maps: ``(B, H, W)`` float score maps; non-finite values are ignored.

    Returns:
        ``(B,)`` int64 seeds computed on the maps' device.
    """
    flat = maps.flatten(1).float()
    finite = torch.isfinite(flat)
    quantized = torch.where(finite, flat.clamp(-1e3, 1e3) * 1024, torch.zeros_like(flat)).round().to(torch.int64)
    weights = _hash32(torch.arange(flat.shape[1], device=maps.device, dtype=torch.int64)) & 0xFFFF
    return _hash32((quantized & 0xFFFFF) * weights).sum(dim=1) & _MASK32
