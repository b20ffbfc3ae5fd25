"""The feature pyramid reads and projects features exactly like full-resolution upsampling would."""

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_tts.adapter import ModelFeatures
from anomalib_tts.pipeline.features import FeaturePyramid, Modalities, TimmFeatures
from anomalib_tts.pipeline.features.pyramid import channel_budget, flat_to_grid


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


def _with_a_level_of_few_positions() -> list[torch.Tensor]:
    """``_levels()`` plus a level of 20 channels on 3 x 2 positions: its features span at most 6 dimensions."""
    return [*_levels(), torch.randn(2, 20, 3, 2, generator=torch.Generator().manual_seed(2))]


def _sampled(pyramid: FeaturePyramid) -> torch.Tensor:
    size = (24, 18)
    return pyramid.sample(flat_to_grid(torch.arange(size[0] * size[1]).expand(2, -1), *size))


def test_a_level_with_fewer_positions_than_channels_is_reduced_without_loss() -> None:
    full = FeaturePyramid(_with_a_level_of_few_positions())
    reduced = FeaturePyramid(_with_a_level_of_few_positions(), max_channels=18)
    assert reduced.channels == [5, 7, 6]
    full_features, reduced_features = _sampled(full), _sampled(reduced)
    # coordinates in an orthonormal basis of the level's span: every inner product between pixels is kept
    assert torch.allclose(
        reduced_features @ reduced_features.transpose(1, 2), full_features @ full_features.transpose(1, 2), atol=1e-3
    )


def test_reduced_levels_keep_their_dominant_direction() -> None:
    generator = torch.Generator().manual_seed(3)
    direction = torch.randn(1, 30, 1, 1, generator=generator)
    level = torch.randn(2, 1, 8, 8, generator=generator) * direction + 0.01 * torch.randn(
        2, 30, 8, 8, generator=generator
    )
    full, reduced = FeaturePyramid([level]), FeaturePyramid([level], max_channels=1)
    full_features, reduced_features = _sampled(full), _sampled(reduced)
    kept = reduced_features.square().sum() / full_features.square().sum()
    assert 0.99 < kept <= 1.0 + 1e-5


def test_projection_of_reduced_levels_equals_classifying_their_upsampled_features() -> None:
    pyramid = FeaturePyramid(_with_a_level_of_few_positions(), max_channels=12)
    weight = torch.randn(2, pyramid.num_channels, generator=torch.Generator().manual_seed(1))
    size = (31, 17)
    expected = torch.einsum("bchw,bc->bhw", _upsampled(pyramid, size), weight)
    assert torch.allclose(pyramid.project(weight, size), expected, atol=1e-4)


def test_reduced_features_of_an_image_do_not_depend_on_its_batchmates() -> None:
    levels = _with_a_level_of_few_positions()
    alone = FeaturePyramid([level[:1] for level in levels], max_channels=12)
    together = FeaturePyramid(levels, max_channels=12)
    for level_alone, level_together in zip(alone.levels, together.levels, strict=True):
        assert torch.allclose(level_alone[0], level_together[0], atol=1e-6)


def test_features_narrower_than_max_channels_are_kept() -> None:
    pyramid = FeaturePyramid(_levels(), max_channels=12)
    assert pyramid.channels == [5, 7]
    assert torch.equal(_sampled(pyramid), _sampled(FeaturePyramid(_levels())))


@pytest.mark.parametrize(
    ("channels", "ranks", "total"),
    [
        ([512, 1024], [1024, 256], 256),
        ([16, 24, 40, 112, 320], [16384, 4096, 1024, 256, 64], 128),
        ([3, 3, 3], [9, 9, 9], 4),
        ([3, 3, 3], [9, 9, 9], 2),
    ],
)
def test_the_channel_budget_is_spent_within_each_levels_channels_and_rank(channels, ranks, total: int) -> None:
    budget = channel_budget(channels, ranks, total)
    assert sum(budget) == max(total, len(channels))
    assert all(1 <= dim <= min(channel, rank) for dim, channel, rank in zip(budget, channels, ranks, strict=True))


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
