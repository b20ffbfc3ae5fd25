"""Construction-time validation and the map the callback reads."""

import pytest
import torch
from anomalib.post_processing import PostProcessor

from anomalib_tts import TestTimeSegmentation
from anomalib_tts.callback import unclipped_scores


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"classifier": "forest"}, "forest"),
        ({"pseudo_labels": "magic"}, "magic"),
        ({"gate": "always"}, "gate"),
        ({"stages": ["train"]}, "stages"),
        ({"pseudo_label_args": {"percentile": 99}}, "pseudo_label_args"),
        ({"classifier_args": {"l2": -1.0}}, "l2"),
        ({"max_positives": 0}, "max_positives"),
        ({"backbone": "unknown_net"}, "layers"),
    ],
)
def test_invalid_arguments_fail_at_construction_naming_the_value(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        TestTimeSegmentation(**kwargs)


def test_construction_loads_no_weights() -> None:
    """The backbone is created in setup(), so building the callback (e.g. for --print_config) needs no network."""
    callback = TestTimeSegmentation(backbone="wide_resnet50_2")
    assert callback.refiner.features.rgb._extractor is None


def test_unclipped_scores_match_anomalib_normalization_where_it_does_not_clip() -> None:
    post_processor = PostProcessor()
    post_processor.pixel_min.fill_(10.0)
    post_processor.pixel_max.fill_(30.0)
    post_processor._pixel_threshold.fill_(30.0)
    raw = torch.tensor([[[5.0, 12.0, 25.0, 30.0, 38.0, 60.0]]])
    clipped = post_processor._normalize(
        raw, post_processor.pixel_min, post_processor.pixel_max, post_processor.pixel_threshold
    )
    unclipped = unclipped_scores(raw, post_processor)
    inside = (clipped > 0) & (clipped < 1)
    assert torch.allclose(unclipped[inside], clipped[inside])
    assert unclipped[0, 0, 0] < 0 and unclipped[0, 0, -1] > 1  # information anomalib's clipping drops
    assert unclipped_scores(raw, PostProcessor()) is None  # no statistics yet
