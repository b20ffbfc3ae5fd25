"""Where a callback sits in ``trainer.callbacks``: Lightning runs each batch hook in that order.

anomalib adds the model's PreProcessor, PostProcessor, Evaluator and Visualizer to the callbacks; what a callback
sees of a batch (raw or normalized maps, thresholded or refined masks) depends on where it sits among them.
:func:`place_callback` moves one callback to a given place; every callback of this package that needs one uses
it in its ``setup``.

Example:
    >>> from types import SimpleNamespace
    >>> trainer = SimpleNamespace(callbacks=["pre_processor", "post_processor", "evaluator", "mine"])
    >>> place_callback(trainer, "mine", after="post_processor")
    True
    >>> trainer.callbacks
    ['pre_processor', 'post_processor', 'mine', 'evaluator']
    >>> place_callback(trainer, "mine", before="no such callback"), trainer.callbacks
    (False, ['pre_processor', 'post_processor', 'evaluator'])
"""

from collections.abc import Iterable
from typing import Any

Anchor = object | type | tuple[type, ...]
"""A callback of the list (matched by identity), or a class / tuple of classes (its first instance in the list)."""


def _matches(candidate: object, anchor: Anchor) -> bool:
    if isinstance(anchor, type) or (isinstance(anchor, tuple) and all(isinstance(kind, type) for kind in anchor)):
        return isinstance(candidate, anchor)
    return candidate is anchor


def remove_callbacks(trainer: Any, callbacks: Iterable[object]) -> None:
    """Take ``callbacks`` (matched by identity) out of ``trainer.callbacks``."""
    dropped = {id(callback) for callback in callbacks}
    trainer.callbacks = [callback for callback in trainer.callbacks if id(callback) not in dropped]


def place_callback(
    trainer: Any, callback: object, *, before: Anchor | None = None, after: Anchor | None = None
) -> bool:
    """Move ``callback`` right before or right after the first callback ``before`` / ``after`` matches, or last.

    Args:
        trainer: Anything with a ``callbacks`` list (a Lightning ``Trainer``).
        callback: The callback to move; it need not be in the list yet.
        before: Put it right before the first callback this matches (see :data:`Anchor`).
        after: Put it right after the first callback this matches.

    Returns:
        ``True`` when the callback was placed (always, without an anchor: it goes last); ``False`` when nothing in
        the list matches the anchor, and the callback is then left out of the list.

    Raises:
        ValueError: Both ``before`` and ``after`` are given.
    """
    if before is not None and after is not None:
        msg = "place_callback takes before or after, not both"
        raise ValueError(msg)
    remove_callbacks(trainer, [callback])
    callbacks = list(trainer.callbacks)
    anchor = before if before is not None else after
    if anchor is None:
        trainer.callbacks = [*callbacks, callback]
        return True
    positions = [index for index, candidate in enumerate(callbacks) if _matches(candidate, anchor)]
    if not positions:
        trainer.callbacks = callbacks
        return False
    callbacks.insert(positions[0] + (0 if before is not None else 1), callback)
    trainer.callbacks = callbacks
    return True
