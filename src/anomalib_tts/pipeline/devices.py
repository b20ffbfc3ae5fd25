"""Where the pipeline may read a value back to Python, and the small constants it keeps on each device.

On CPU a tensor's value can be read (``.item()``, ``bool(tensor)``, ``.numpy()``) for free, and the pipeline takes
shortcuts that depend on it (skip work that no image needs, select with NumPy). On an accelerator such a read
waits for every queued kernel to finish, so the per-batch work there branches on nothing it computed: the same
kernels run whatever the values, and the few reads left are named where they are made.

:func:`accelerator_path` makes CPU tensors take the accelerator's code paths, so that tests and the speed
benchmark can check (and count) on any machine what an accelerator would run.
"""

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

_FORCED_ACCELERATOR_PATH = [False]


def host_reads_are_free(tensor: Tensor) -> bool:
    """Whether shortcuts that read ``tensor``'s values back to Python may be taken: on CPU only.

    Example:
        >>> host_reads_are_free(torch.zeros(1))
        True
        >>> with accelerator_path():
        ...     host_reads_are_free(torch.zeros(1))
        False
    """
    return tensor.device.type == "cpu" and not _FORCED_ACCELERATOR_PATH[0]


@contextlib.contextmanager
def accelerator_path() -> Iterator[None]:
    """Within it, CPU tensors take the code paths of an accelerator (no shortcut reads a value back)."""
    previous = _FORCED_ACCELERATOR_PATH[0]
    _FORCED_ACCELERATOR_PATH[0] = True
    try:
        yield
    finally:
        _FORCED_ACCELERATOR_PATH[0] = previous


@functools.lru_cache(maxsize=64)
def device_constant(values: Sequence[float | int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.tensor(values)`` on ``device``, made once per device and then reused (never write to it).

    Making a tensor from Python values on an accelerator copies it from host memory, and such a copy waits for the
    device's queue; a cached constant is copied once.

    Example:
        >>> device_constant((1.0, 0.5), torch.float32, torch.device("cpu"))
        tensor([1.0000, 0.5000])
    """
    return torch.tensor(tuple(values), dtype=dtype, device=device)


def to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """A CPU ``tensor`` moved to ``device`` without waiting for the device's queue (pinned, non-blocking copy).

    Example:
        >>> to_device(torch.tensor([1, 2]), "cpu")
        tensor([1, 2])
    """
    device = torch.device(device)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
