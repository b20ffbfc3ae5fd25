"""Argument checks of the pipeline's components: a bad value fails when the component is built, naming it."""

from numbers import Integral
from typing import Any


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an ``int``; a ``ValueError`` naming ``name`` unless it is an integer ``>= minimum``.

    Example:
        >>> check_count("max_positives", 10)
        10
        >>> check_count("max_positives", 10.5)
        Traceback (most recent call last):
        ...
        ValueError: max_positives must be an integer >= 1, got 10.5
    """
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        msg = f"{name} must be an integer >= {minimum}, got {value!r}"
        raise ValueError(msg)
    return int(value)


def check_range(name: str, value: float, low: float, high: float) -> None:
    """``ValueError`` naming ``name`` unless ``low <= value <= high``.

    Example:
        >>> check_range("positive_fraction", 1.5, 0.0, 1.0)
        Traceback (most recent call last):
        ...
        ValueError: positive_fraction must lie in [0.0, 1.0], got 1.5
    """
    if not low <= value <= high:
        msg = f"{name} must lie in [{low}, {high}], got {value}"
        raise ValueError(msg)


def check_odd(name: str, value: int) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is a positive odd integer (a window side in pixels)."""
    if check_count(name, value) % 2 == 0:
        msg = f"{name} must be a positive odd number of pixels, got {value}"
        raise ValueError(msg)
