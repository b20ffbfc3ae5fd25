"""Deterministic, batched sampling of pixel sets.

Random draws come from a counter-based hash of ``(image seed, stream, pixel index)`` computed with integer
tensor ops on the batch's device. The draw for an image therefore depends only on that image's seed, never
on the batch it arrived in, and needs no generator state and no host-device copy. On CPU the same keys are
computed with NumPy's unsigned 32-bit arithmetic, for the candidate pixels only, and the largest are selected
with a partial sort instead of ``topk`` over every pixel: the same pixels in the same order, at a fraction of the
cost.
"""

import functools
import numbers
import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from anomalib_tts.pipeline.devices import device_constant, host_reads_are_free, to_device

_MASK32 = 0xFFFFFFFF
_HASH_MULTIPLIER = 0x45D9F3B
_STREAM_OFFSET = 0x9E37


def _hash32(values: Tensor) -> Tensor:
    """Integer hash (Wellons' lowbias32 constants); int64 in, int64 in ``[0, 2**32)`` out, no overflow."""
    values = values & _MASK32  # a new tensor: the rest works on it in place, with no tensor allocated per step
    values ^= values >> 16
    values *= _HASH_MULTIPLIER
    values &= _MASK32
    values ^= values >> 16
    values *= _HASH_MULTIPLIER
    values &= _MASK32
    values ^= values >> 16
    return values


def _hash32_numpy(values: np.ndarray) -> np.ndarray:
    """:func:`_hash32` of ``uint32`` values, in place: unsigned 32-bit products wrap, so no masking is needed."""
    multiplier = np.uint32(_HASH_MULTIPLIER)
    shift = np.uint32(16)
    values ^= values >> shift
    values *= multiplier
    values ^= values >> shift
    values *= multiplier
    values ^= values >> shift
    return values


def _hash32_int(value: int) -> int:
    """:func:`_hash32` of one Python integer."""
    value &= _MASK32
    for step in range(3):
        value ^= value >> 16
        if step < 2:
            value = (value * _HASH_MULTIPLIER) & _MASK32
    return value


Streams = int | Sequence[int] | Tensor


def _hashed_streams(stream: Streams, seeds: Tensor) -> int | Tensor:
    """``_hash32(stream + offset)`` for every row: a Python int for one stream, a tensor for one per row.

    Streams given as Python integers are hashed here, on the host; a sequence of them becomes a constant made once
    per device, so no row needs a copy from host memory or a dozen kernels to hash its stream.
    """
    if isinstance(stream, numbers.Integral):
        return _hash32_int(int(stream) + _STREAM_OFFSET)
    if isinstance(stream, Tensor):
        return _hash32(stream.to(device=seeds.device, dtype=torch.int64) + _STREAM_OFFSET).expand_as(seeds)
    hashed = tuple(_hash32_int(int(value) + _STREAM_OFFSET) for value in stream)
    return device_constant(hashed, torch.int64, seeds.device).expand_as(seeds)


def _row_hashes(seeds: Tensor, stream: Streams) -> Tensor:
    """The per-row part of :func:`random_keys`: one hash of each ``(seed, stream)``."""
    return _hash32(_hash32(seeds) ^ _hashed_streams(stream, seeds))


def random_keys(seeds: Tensor, stream: Streams, num_keys: int) -> Tensor:
    """Pseudo-random int64 keys in ``[1, 2**32]``, one row per seed.

    Args:
        seeds: ``(B,)`` integer seeds, one per image.
        stream: Separates independent draws for the same image (positives, negatives, ...); an int for every
            row, or ``B`` integers (a sequence or a tensor), one per row.
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
        >>> torch.equal(per_row, random_keys(torch.tensor([0, 0]), (0, 1), 4))
        True
    """
    seeds = seeds.to(torch.int64)
    row = _row_hashes(seeds, stream)
    return _hash32(row[:, None] ^ _hashed_indices(num_keys, seeds.device)[None, :]).add_(1)


@functools.lru_cache(maxsize=8)
def _hashed_indices(num_keys: int, device: torch.device) -> Tensor:
    """``_hash32(0 .. num_keys - 1)``: the same for every image and stream of a map size, so computed once."""
    return _hash32(torch.arange(num_keys, device=device, dtype=torch.int64))


@functools.lru_cache(maxsize=8)
def _hashed_indices_numpy(num_keys: int) -> np.ndarray:
    """:func:`_hashed_indices` as ``uint32`` NumPy values (read-only)."""
    hashed = _hash32_numpy(np.arange(num_keys, dtype=np.uint32))
    hashed.flags.writeable = False
    return hashed


def _sample_on_host(candidates: Tensor, max_samples: int, seeds: Tensor, stream: Streams) -> tuple[Tensor, Tensor]:
    """:func:`sample_pixels` on CPU: the keys of each row's candidates only, the largest by a partial sort.

    The keys are :func:`random_keys`' (their ``uint32`` hash, before its ``+ 1``), so the same pixels are drawn in
    the same order, largest key first. Two candidates of a row with equal keys (a 32-bit hash collision) come
    in order of their pixel index, largest first; slots without a drawn pixel hold index 0.
    """
    batch_size, num_pixels = candidates.shape
    num_samples = min(max_samples, num_pixels)
    seeds = seeds.to(torch.int64)
    # _row_hashes in NumPy: a few operations on B values, each far cheaper than a torch dispatch
    mask = np.int64(_MASK32)
    hashed_seeds = _hash32_numpy((seeds.numpy() & mask).astype(np.uint32))
    if isinstance(stream, Tensor):
        streams = (stream.cpu().to(torch.int64).expand_as(seeds).numpy() + _STREAM_OFFSET) & mask
        hashed_streams = _hash32_numpy(streams.astype(np.uint32))
    else:
        single = isinstance(stream, numbers.Integral)
        hashed = [_hash32_int(int(stream) + _STREAM_OFFSET)] if single else _hashed_stream_list(stream)
        hashed_streams = np.broadcast_to(np.asarray(hashed, dtype=np.uint32), (batch_size,))
    rows = _hash32_numpy(hashed_seeds ^ hashed_streams)
    hashed_indices = _hashed_indices_numpy(num_pixels)
    chosen = candidates.numpy()
    indices = np.zeros((batch_size, num_samples), dtype=np.int64)
    valid = np.zeros((batch_size, num_samples), dtype=bool)
    for row in range(batch_size):
        pixels = np.flatnonzero(chosen[row])
        keys = hashed_indices[pixels]  # a new array: hashed in place
        keys ^= rows[row]
        _hash32_numpy(keys)
        if pixels.size > num_samples:
            top = np.argpartition(keys, pixels.size - num_samples)[pixels.size - num_samples :]
            pixels, keys = pixels[top], keys[top]
        order = np.lexsort((pixels, keys))[::-1]  # largest key first; equal keys: largest pixel index first
        indices[row, : pixels.size] = pixels[order]
        valid[row, : pixels.size] = True
    return torch.from_numpy(indices), torch.from_numpy(valid)


def _hashed_stream_list(stream: Sequence[int]) -> list[int]:
    return [_hash32_int(int(value) + _STREAM_OFFSET) for value in stream]


def sample_pixels(candidates: Tensor, max_samples: int, seeds: Tensor, stream: Streams) -> tuple[Tensor, Tensor]:
    """Draw up to ``max_samples`` pixels uniformly without replacement from each row's candidate set.

    Args:
        candidates: ``(B, N)`` bool, the pixels that may be drawn (flattened maps).
        max_samples: Cap on the set size.
        seeds: ``(B,)`` per-row seeds.
        stream: Independent stream id (use a different one per set); one per row as ``B`` integers (a sequence
            or a tensor), so that
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
    if host_reads_are_free(candidates) and candidates.dtype == torch.bool:
        return _sample_on_host(candidates, max_samples, seeds.cpu(), stream)
    keys = random_keys(seeds, stream, candidates.shape[1])
    keys = torch.where(candidates, keys, torch.zeros_like(keys))
    values, indices = keys.topk(min(max_samples, candidates.shape[1]), dim=1)
    return indices, values > 0


def path_seeds(paths: Sequence[str], device: torch.device | str = "cpu") -> Tensor:
    """Seeds from image file names (CRC-32), stable across runs, processes and batch orders."""
    return to_device(torch.tensor([zlib.crc32(str(path).encode()) for path in paths], dtype=torch.int64), device)


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
