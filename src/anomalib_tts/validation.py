"""Checks at the boundary: an argument or a batch that would give a wrong mask fails with a message naming it.

The callback checks its arguments when it is built, the model's PostProcessor in ``setup`` and every batch at
the entry of ``refine_batch``, so that a misuse never reaches torch as an unexplained crash or, worse, as masks
computed on the wrong scale.
"""

from collections.abc import Sequence
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


def as_stages(stages: str | Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    """The loops to refine in; one name alone (``"test"``) is one stage.

    Example:
        >>> as_stages("test", ("test", "predict")), as_stages(["test", "predict"], ("test", "predict"))
        (('test',), ('test', 'predict'))
    """
    stages = (stages,) if isinstance(stages, str) else tuple(stages)
    unknown = [stage for stage in stages if stage not in allowed]
    if unknown:
        msg = f"stages must be among {tuple(allowed)} (a name or a list of names), got {unknown}"
        raise ValueError(msg)
    return stages


def check_post_processor(post_processor: Any, model_name: str) -> None:
    """``ValueError`` unless ``post_processor`` normalizes the maps and thresholds them, as the refinement needs.

    The pseudo-label recipes read maps normalized so that anomalib's pixel threshold sits at 0.5; without
    normalization the maps are raw scores of any scale, and without thresholding there is no pixel threshold
    (and anomalib writes no ``pred_mask`` to keep).
    """
    leave_out = "or leave TestTimeSegmentation out of the run"
    if post_processor is None:
        msg = (
            f"TestTimeSegmentation reads the normalized maps and pixel threshold of the model's PostProcessor; "
            f"{model_name} has none: keep post_processor=True (the default) or pass a PostProcessor(), {leave_out}"
        )
        raise ValueError(msg)
    name = type(post_processor).__name__
    if getattr(post_processor, "enable_normalization", True) is False:
        msg = (
            f"TestTimeSegmentation reads maps normalized around anomalib's pixel threshold (0.5); the {name} of "
            f"{model_name} has enable_normalization=False, so its maps are raw scores whose scale the pseudo-label "
            f"recipes cannot read: keep enable_normalization=True (the default), {leave_out}"
        )
        raise ValueError(msg)
    if getattr(post_processor, "enable_thresholding", True) is False:
        msg = (
            f"TestTimeSegmentation refines from anomalib's pixel threshold; the {name} of {model_name} has "
            f"enable_thresholding=False, so there is no threshold and anomalib writes no pred_mask: keep "
            f"enable_thresholding=True (the default), {leave_out}"
        )
        raise ValueError(msg)
