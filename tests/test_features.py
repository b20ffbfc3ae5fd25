"""The feature pyramid reads and projects features exactly like full-resolution upsampling would."""

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_tts.features import FeaturePyramid, Modalities, ModelFeatures, TimmFeatures, flat_to_grid


def _levels() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [3 + 2 * torch.randn(2, 5, 8, 6, generator=generator), torch.randn(2, 7, 4, 3, generator=generator)]


def _upsampled(pyramid: FeaturePyramid, size: tuple[int, int]) -> torch.Tensor:
    return torch.cat(
        [F.interpolate(level, size=size, mode="bilinear", align_corners=False) for level in pyramid.levels], dim=1
    )


def test_levels_are_standardized_per_image_and_channel() -> None:
    pyramid = FeaturePyramid(_levels())
    for level in pyramid.levels:
        assert torch.allclose(level.mean(dim=(2, 3)), torch.zeros(level.shape[:2]), atol=1e-5)
        assert torch.allclose(level.std(dim=(2, 3), unbiased=False), torch.ones(level.shape[:2]), atol=1e-4)


def test_sampling_at_pixel_centres_equals_full_resolution_upsampling() -> None:
    pyramid = FeaturePyramid(_levels())
    size = (24, 18)
    full = _upsampled(pyramid, size)  # (B, C, H, W)
    indices = torch.tensor([[0, 5, 17, 200, 431], [1, 2, 3, 100, 300]])
    sampled = pyramid.sample(flat_to_grid(indices, *size))
    expected = full.flatten(2).gather(2, indices[:, None].expand(-1, full.shape[1], -1)).transpose(1, 2)
    assert torch.allclose(sampled, expected, atol=1e-5)


def test_projection_equals_classifying_upsampled_features() -> None:
    pyramid = FeaturePyramid(_levels())
    weight = torch.randn(2, pyramid.num_channels, generator=torch.Generator().manual_seed(1))
    size = (31, 17)  # odd, non-square, not a multiple of the feature grid
    expected = torch.einsum("bchw,bc->bhw", _upsampled(pyramid, size), weight)
    assert torch.allclose(pyramid.project(weight, size), expected, atol=1e-4)


def test_timm_features_need_layers_for_unknown_backbones() -> None:
    with pytest.raises(ValueError, match="layers"):
        TimmFeatures(backbone="some_new_net")


def test_timm_features_random_weights_shapes() -> None:
    features = TimmFeatures(backbone="resnet18", pre_trained=False)
    maps = features(Modalities(torch.rand(2, 3, 64, 64)))
    assert [tuple(level.shape) for level in maps] == [(2, 128, 8, 8), (2, 256, 4, 4)]


def test_model_features_reuse_the_model_pass() -> None:
    from anomalib.models.components.feature_extractors import TimmFeatureExtractor

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.extractor = TimmFeatureExtractor("resnet18", ["layer1"], pre_trained=False)
            self.calls = 0

        def forward(self, images: torch.Tensor) -> dict:
            self.calls += 1
            return self.extractor(images)

    model = Model()
    features = ModelFeatures()
    features.setup(model)
    features.teardown()  # Lightning tears callbacks down after fit, then sets them up again for test
    features.setup(model)
    images = torch.rand(2, 3, 32, 32)
    expected = model(images)["layer1"]
    calls = []
    model.extractor.register_forward_hook(lambda *args: calls.append(1))
    reused = features(Modalities(images))
    assert torch.equal(reused[0], expected)
    assert not calls  # no second pass
    features.teardown()


def test_model_features_explain_what_to_use_without_an_extractor() -> None:
    with pytest.raises(ValueError, match="wide_resnet50_2"):
        ModelFeatures().setup(nn.Linear(2, 2))
