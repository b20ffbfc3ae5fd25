"""One helper places every callback of the package in the trainer's list."""

from types import SimpleNamespace

import pytest

from anomalib_tts.lightning.callback import RawMapKeeper
from anomalib_tts.lightning.placement import place_callback, remove_callbacks


class Evaluator:
    pass


def _trainer(*callbacks: object) -> SimpleNamespace:
    return SimpleNamespace(callbacks=list(callbacks))


def test_a_callback_moves_before_or_after_its_anchor_once() -> None:
    pre, post, mine = object(), object(), object()
    trainer = _trainer(mine, pre, post)
    assert place_callback(trainer, mine, after=pre)
    assert trainer.callbacks == [pre, mine, post]
    assert place_callback(trainer, mine, before=pre)
    assert trainer.callbacks == [mine, pre, post]


def test_a_class_anchor_matches_its_first_instance_and_no_anchor_means_last() -> None:
    first, second, mine = Evaluator(), Evaluator(), object()
    trainer = _trainer(first, mine, second)
    assert place_callback(trainer, mine, before=(Evaluator,))
    assert trainer.callbacks == [mine, first, second]
    assert place_callback(trainer, mine)
    assert trainer.callbacks == [first, second, mine]


def test_a_missing_anchor_leaves_the_callback_out_and_says_so() -> None:
    pre, mine = object(), object()
    trainer = _trainer(mine, pre)
    assert not place_callback(trainer, mine, after=object())
    assert trainer.callbacks == [pre]
    with pytest.raises(ValueError, match="before or after"):
        place_callback(trainer, mine, before=pre, after=pre)


def test_the_raw_map_keeper_goes_right_before_the_post_processor_or_out() -> None:
    keeper, pre, post = RawMapKeeper(), object(), object()
    trainer = _trainer(pre, post, keeper)
    assert keeper.place_before(trainer, post)
    assert trainer.callbacks == [pre, keeper, post]
    assert not keeper.place_before(trainer, None)
    assert trainer.callbacks == [pre, post]
    remove_callbacks(trainer, [pre])
    assert trainer.callbacks == [post]
