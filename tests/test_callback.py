"""Construction-time validation and the map the callback reads."""

import pytest
import torch
from anomalib.post_processing import PostProcessor

from anomalib_tts import (
    LinearSVM,
    LogisticRegression,
    ModelFeatures,
    NominalAware,
    PeakRelative,
    PercentilePeaks,
    RgbdFeatures,
    TestTimeSegmentation,
    TimmFeatures,
)
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
    callback = TestTimeSegmentation(features=RgbdFeatures(TimmFeatures(backbone="wide_resnet50_2")))
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


def test_components_are_taken_by_name_or_as_objects() -> None:
    classifier = LinearSVM(l2=0.5)
    callback = TestTimeSegmentation(
        pseudo_labels="percentile", features=TimmFeatures("resnet18"), classifier=classifier
    )
    assert isinstance(callback.refiner.labeler, PercentilePeaks)
    assert callback.refiner.features.backbone == "resnet18"
    assert callback.refiner.classifier is classifier
    default = TestTimeSegmentation().refiner
    assert (type(default.labeler), type(default.features), type(default.classifier)) == (
        PeakRelative,
        RgbdFeatures,
        LogisticRegression,
    )
    assert isinstance(default.features.rgb, TimmFeatures) and default.features.rgb.backbone == "wide_resnet50_2"


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"features": TimmFeatures}, "instance"),  # the class, not an object
        ({"features": {"class_path": "anomalib_tts.ModelFeatures"}}, "from_init_args"),
        ({"classifier": PeakRelative()}, "fit"),  # a recipe where the classifier goes
        ({"classifier": LinearSVM(), "classifier_args": {"l2": 0.5}}, "classifier_args"),
        ({"features": "model", "backbone": "resnet18"}, "backbone"),
    ],
)
def test_a_component_that_does_not_fit_fails_at_construction_saying_why(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        TestTimeSegmentation(**kwargs)


def test_the_deprecated_arguments_warn_and_build_the_same_components() -> None:
    with pytest.warns(DeprecationWarning, match="pseudo_label_args"):
        recipe = TestTimeSegmentation(pseudo_labels="nominal", pseudo_label_args={"positive_margin": 0.2}).refiner
    assert isinstance(recipe.labeler, NominalAware) and recipe.labeler.positive_margin == 0.2
    with pytest.warns(DeprecationWarning, match="classifier_args"):
        classifier = TestTimeSegmentation(classifier="svm", classifier_args={"solver": "gradient"}).refiner.classifier
    assert isinstance(classifier, LinearSVM) and classifier.solver == "gradient"
    with pytest.warns(DeprecationWarning, match=r"features=RgbdFeatures\('model', geometry_weight=2.0"):
        features = TestTimeSegmentation(backbone="model", geometry="on", geometry_weight=2.0).refiner.features
    assert isinstance(features, RgbdFeatures) and isinstance(features.rgb, ModelFeatures)
    assert (features.geometry_weight, features.expect_depth) == (2.0, True)
    with pytest.warns(DeprecationWarning, match="backbone"):
        features = TestTimeSegmentation(backbone="resnet18", layers=["layer1"], geometry="off").refiner.features
    assert isinstance(features, TimmFeatures) and features.layers == ("layer1",)


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
            "max_positives": 321,
        }
    )
    refiner = callback.refiner
    assert refiner.labeler.positive_fraction == 0.4
    assert isinstance(refiner.features.rgb, ModelFeatures) and refiner.features.geometry.scales == (2, 4)
    assert isinstance(refiner.classifier, LinearSVM) and refiner.max_positives == 321
    with pytest.raises(ValueError, match="FeatureSource"):
        TestTimeSegmentation.from_init_args({"features": {"class_path": "anomalib_tts.LinearSVM"}})


@pytest.mark.parametrize(("given", "expected"), [({}, 256), ({"max_channels": None}, None), ({"max_channels": 64}, 64)])
def test_max_channels_parses_as_a_yaml_config_gives_it(given: dict, expected: int | None) -> None:
    assert TestTimeSegmentation.from_init_args({"features": "model", **given}).refiner.max_channels == expected


def test_the_classifiers_tolerance_parses_from_yaml() -> None:
    classifier = {"class_path": "anomalib_tts.LogisticRegression", "init_args": {"tolerance": 1e-9}}
    assert TestTimeSegmentation.from_init_args({"classifier": classifier}).refiner.classifier.tolerance == 1e-9
