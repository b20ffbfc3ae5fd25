"""Construction-time validation, the components the callback builds, and the map it reads."""

import pytest
import torch
from anomalib.post_processing import PostProcessor

from anomalib_tts import (
    BoundedGrowth,
    LinearSVM,
    LogisticRegression,
    ModelFeatures,
    NoCheck,
    PeakRelative,
    PercentilePeaks,
    RgbdFeatures,
    StableThreshold,
    TestTimeSegmentation,
    ThresholdMask,
    TimmFeatures,
)
from anomalib_tts.adapter import BatchRefiner, unclipped_scores


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"classifier": "forest"}, "unknown classifier 'forest'"),
        ({"pseudo_labels": "magic"}, "unknown pseudo-label recipe 'magic'"),
        ({"features": "colour"}, "unknown feature source 'colour'"),
        ({"self_check": "strict"}, "unknown self-check 'strict'"),
        ({"fallback": "empty"}, "unknown fallback mask 'empty'"),
        ({"gate": "always"}, "gate"),
        ({"stages": ["train"]}, "stages"),
        ({"stages": ["fit"]}, "stages"),
        ({"stages": "tset"}, r"stages.*\['tset'\]"),
        ({"max_positives": 0}, "max_positives"),
        ({"max_positives": 10.5}, "max_positives must be an integer"),
        ({"min_negatives": 10.0}, "min_negatives must be an integer"),
        ({"min_positives": True}, "min_positives must be an integer"),
        ({"min_negatives": 50, "max_negatives": 20}, "min_negatives"),
        ({"max_channels": 0}, "max_channels"),
        ({"max_channels": 128.5}, "max_channels must be an integer"),
    ],
)
def test_invalid_arguments_fail_at_construction_naming_the_value(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        TestTimeSegmentation(**kwargs)


def test_construction_loads_no_weights() -> None:
    """The backbone is created in setup(), so building the callback (e.g. for --print_config) needs no network."""
    callback = TestTimeSegmentation(features=RgbdFeatures(TimmFeatures(backbone="wide_resnet50_2")))
    assert isinstance(callback.pipeline.features.rgb, TimmFeatures)
    assert callback.pipeline.features.rgb._extractor is None


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


def test_components_are_taken_by_name_or_as_objects() -> None:
    classifier = LinearSVM(l2=0.5)
    check = BoundedGrowth(max_growth=2.0)
    callback = TestTimeSegmentation(
        pseudo_labels="percentile",
        features=TimmFeatures("resnet18"),
        classifier=classifier,
        self_check=check,
        fallback="threshold",
        gate="pred_label",
    )
    pipeline = callback.pipeline
    assert isinstance(pipeline.pseudo_labels, PercentilePeaks)
    assert pipeline.features.backbone == "resnet18"
    assert pipeline.classifier is classifier
    assert pipeline.self_check is check
    assert isinstance(pipeline.fallback, ThresholdMask)
    assert isinstance(callback.refiner, BatchRefiner) and callback.refiner.pipeline is pipeline
    assert callback.refiner.gate == "pred_label"
    assert callback.stats is callback.refiner.stats
    default = TestTimeSegmentation().pipeline
    assert [type(component) for component in (default.pseudo_labels, default.features, default.classifier)] == [
        PeakRelative,
        RgbdFeatures,
        LogisticRegression,
    ]
    assert [type(default.self_check), type(default.fallback)] == [BoundedGrowth, StableThreshold]
    assert isinstance(default.features.rgb, TimmFeatures) and default.features.rgb.backbone == "wide_resnet50_2"
    assert isinstance(TestTimeSegmentation(self_check="none").pipeline.self_check, NoCheck)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"features": TimmFeatures}, "instance"),  # the class, not an object
        ({"features": {"class_path": "anomalib_tts.ModelFeatures"}}, "from_init_args"),
        ({"classifier": PeakRelative()}, "fit"),  # a recipe where the classifier goes
        ({"self_check": LinearSVM()}, "self-check .* has no __call__"),  # a classifier where the check goes
    ],
)
def test_a_component_that_does_not_fit_fails_at_construction_saying_why(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        TestTimeSegmentation(**kwargs)


def test_from_init_args_builds_nested_components_as_anomalib_cli_does() -> None:
    callback = TestTimeSegmentation.from_init_args(
        {
            "pseudo_labels": {"class_path": "anomalib_tts.PeakRelative", "init_args": {"positive_fraction": 0.4}},
            "features": {
                "class_path": "anomalib_tts.RgbdFeatures",
                "init_args": {
                    "rgb": "model",
                    "geometry": {"class_path": "anomalib_tts.GeometryFeatures", "init_args": {"scales": [2, 4]}},
                },
            },
            "classifier": "svm",
            "self_check": {"class_path": "anomalib_tts.BoundedGrowth", "init_args": {"max_growth": 3.0}},
            "fallback": {"class_path": "anomalib_tts.StableThreshold", "init_args": {"floor": 0.3}},
            "gate": "pred_label",
            "max_positives": 321,
        }
    )
    pipeline = callback.pipeline
    assert pipeline.pseudo_labels.positive_fraction == 0.4
    assert isinstance(pipeline.features.rgb, ModelFeatures) and pipeline.features.geometry.scales == (2, 4)
    assert isinstance(pipeline.classifier, LinearSVM) and pipeline.max_positives == 321
    assert pipeline.self_check.max_growth == 3.0 and pipeline.fallback.floor == 0.3
    assert callback.refiner.gate == "pred_label"
    with pytest.raises(ValueError, match="FeatureSource"):
        TestTimeSegmentation.from_init_args({"features": {"class_path": "anomalib_tts.LinearSVM"}})


@pytest.mark.parametrize(("given", "expected"), [({}, 256), ({"max_channels": None}, None), ({"max_channels": 64}, 64)])
def test_max_channels_parses_as_a_yaml_config_gives_it(given: dict, expected: int | None) -> None:
    assert TestTimeSegmentation.from_init_args({"features": "model", **given}).pipeline.max_channels == expected


def test_the_classifiers_tolerance_parses_from_yaml() -> None:
    classifier = {"class_path": "anomalib_tts.LogisticRegression", "init_args": {"tolerance": 1e-9}}
    assert TestTimeSegmentation.from_init_args({"classifier": classifier}).pipeline.classifier.tolerance == 1e-9
