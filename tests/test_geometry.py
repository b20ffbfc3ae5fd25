"""Geometric pixel features from organized point clouds, and RGB + 3D refinement on MVTec 3D-AD-style data."""

import logging
from pathlib import Path

import pytest
import tifffile
import torch
from torchvision.transforms.functional import gaussian_blur

from anomalib_tts.lightning.callback import TestTimeSegmentation
from anomalib_tts.pipeline.classifiers import LogisticRegression
from anomalib_tts.pipeline.features import FeaturePyramid, Modalities, TimmFeatures, WeightedMaps
from anomalib_tts.pipeline.features.geometry import GeometryFeatures, RgbdFeatures, fill_missing, geometric_features
from anomalib_tts.pipeline.labelers import LABELERS
from anomalib_tts.pipeline.refinement import RefinementInputs, RefinementPipeline
from tests.helpers import Colour, mean_f1

GEOMETRY_LOGGER = "anomalib_tts.pipeline.features.geometry"

SIZE = 48
NORMAL, CURVATURE, HEIGHT = slice(0, 3), 3, 4  # channel layout of one scale


def _surface(height: torch.Tensor | None = None, size: int = SIZE) -> torch.Tensor:
    """``(1, 3, size, size)`` organized XYZ of a tilted plane (metres, ~0.5 mm spacing) plus ``height`` in z."""
    rows, columns = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    x, y = columns * 5e-4, rows * 5e-4
    z = 0.6 + 0.2 * x - 0.1 * y + (0.0 if height is None else height)
    return torch.stack((x, y, z))[None]


def _bump(amplitude: float, size: int = SIZE) -> torch.Tensor:
    rows, columns = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    return amplitude * torch.exp(-((rows - size / 2) ** 2 + (columns - size / 2) ** 2) / (2 * 5.0**2))


def test_normals_of_a_tilted_plane_are_the_analytic_normal_everywhere_and_it_has_no_curvature() -> None:
    features = geometric_features(_surface(), (SIZE, SIZE), scales=(1, 3))
    expected = torch.nn.functional.normalize(torch.tensor([-0.2, 0.1, 1.0]), dim=0)
    for scale in range(2):
        block = features[0, 6 * scale : 6 * scale + 6]
        assert torch.allclose(block[NORMAL], expected[:, None, None].expand(3, SIZE, SIZE), atol=1e-4)
        assert block[CURVATURE].abs().max() < 1e-3
        assert block[HEIGHT].abs().max() < 1e-3


def test_curvature_and_height_have_opposite_signs_for_a_bump_and_a_dent() -> None:
    bump = geometric_features(_surface(_bump(1e-3)), (SIZE, SIZE), scales=(4,))[0]
    dent = geometric_features(_surface(_bump(-1e-3)), (SIZE, SIZE), scales=(4,))[0]
    centre = SIZE // 2
    for channel in (CURVATURE, HEIGHT):
        assert bump[channel, centre, centre] * dent[channel, centre, centre] < 0
        corner = bump[channel, :8, :8].abs().max()
        assert bump[channel, centre, centre].abs() > 10 * corner  # the defect stands out from the flat part


def test_features_do_not_depend_on_units_position_or_batch_companions() -> None:
    surface = _surface(_bump(1e-3))
    reference = geometric_features(surface, (SIZE, SIZE))
    in_millimetres = geometric_features(surface * 1000, (SIZE, SIZE))
    moved = geometric_features(surface + torch.tensor([0.1, -0.2, 0.3])[None, :, None, None], (SIZE, SIZE))
    batched = geometric_features(torch.cat((torch.zeros_like(surface), surface * 2)), (SIZE, SIZE))
    for other in (in_millimetres, moved, batched[1:]):
        assert torch.allclose(other, reference, atol=2e-3, rtol=1e-3)


def test_missing_points_zero_or_non_finite_barely_change_the_features() -> None:
    surface = _surface(_bump(1e-3))
    generator = torch.Generator().manual_seed(0)
    missing = torch.rand(SIZE, SIZE, generator=generator) < 0.05
    missing[10:14, 30:36] = True  # a cluster, as real scans have
    holes = surface.clone()
    holes[:, :, missing] = 0.0
    complete = geometric_features(surface, (SIZE, SIZE))
    with_holes = geometric_features(holes, (SIZE, SIZE))
    holes[:, :, missing] = float("nan")
    assert torch.equal(geometric_features(holes, (SIZE, SIZE)), with_holes)
    assert torch.isfinite(with_holes).all()
    for channel in range(complete.shape[1]):
        if complete[0, channel].std() > 1e-3:  # channels that vary on this surface
            pair = torch.stack((complete[0, channel].flatten(), with_holes[0, channel].flatten()))
            assert torch.corrcoef(pair)[0, 1] > 0.9, channel


def test_fill_missing_keeps_measured_points_and_fills_inside_their_range() -> None:
    generator = torch.Generator().manual_seed(1)
    values = torch.rand(2, 3, 20, 17, generator=generator)
    valid = (torch.rand(2, 1, 20, 17, generator=generator) > 0.6).float()
    filled = fill_missing(values, valid)
    assert torch.equal(filled[valid.expand_as(values) > 0], values[valid.expand_as(values) > 0])
    measured = values.masked_fill(valid == 0, float("nan")).flatten(2)
    assert (filled.flatten(2) >= measured.nan_to_num(2.0).amin(dim=2, keepdim=True) - 1e-6).all()
    assert (filled.flatten(2) <= measured.nan_to_num(-1.0).amax(dim=2, keepdim=True) + 1e-6).all()


def test_geometry_is_computed_at_the_image_resolution_with_zeros_for_empty_maps() -> None:
    depth = torch.cat((_surface(_bump(1e-3, size=64), size=64), torch.zeros(1, 3, 64, 64)))
    (level,) = GeometryFeatures(scales=(1, 2))(Modalities(torch.rand(2, 3, 32, 32), depth))
    assert level.shape == (2, 12, 32, 32)
    assert level[0].abs().sum() > 0
    assert not level[1].any()


def test_geometry_weight_scales_the_standardized_geometric_level() -> None:
    maps = RgbdFeatures(Colour(), GeometryFeatures(scales=(2,)), geometry_weight=3.0)(
        Modalities(torch.rand(1, 3, SIZE, SIZE), _surface(_bump(1e-3)))
    )
    assert isinstance(maps, WeightedMaps)
    rgb_level, geometry_level = FeaturePyramid(maps).levels
    assert torch.allclose(rgb_level.std(dim=(2, 3), unbiased=False), torch.ones(1, 3), atol=1e-4)
    assert torch.allclose(geometry_level.std(dim=(2, 3), unbiased=False), torch.full((1, 6), 3.0), atol=1e-3)


@pytest.mark.parametrize(
    ("depth", "expect_depth", "warned"),
    [
        (None, False, False),  # geometry="auto" on a 2-D dataset: nothing to say
        (None, True, True),
        (torch.zeros(2, 3, SIZE, SIZE), False, True),
        (torch.rand(2, 1, SIZE, SIZE), False, True),  # a plain depth image, not organized XYZ
    ],
    ids=["auto-no-depth", "on-no-depth", "all-zero", "not-xyz"],
)
def test_unusable_depth_falls_back_to_rgb_features(
    depth: torch.Tensor | None, expect_depth: bool, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    images = torch.rand(2, 3, SIZE, SIZE)
    with caplog.at_level(logging.WARNING, logger=GEOMETRY_LOGGER):
        maps = RgbdFeatures(Colour(), expect_depth=expect_depth)(Modalities(images, depth))
    assert len(maps) == 1
    assert torch.equal(maps[0], images)
    assert ("RGB features only" in caplog.text) == warned


def test_an_empty_depth_map_in_a_batch_gives_that_image_rgb_features_only(caplog: pytest.LogCaptureFixture) -> None:
    images = torch.rand(2, 3, SIZE, SIZE)
    depth = torch.cat((_surface(_bump(1e-3)), torch.zeros(1, 3, SIZE, SIZE)))
    with caplog.at_level(logging.WARNING, logger=GEOMETRY_LOGGER):
        maps = RgbdFeatures(Colour())(Modalities(images, depth))
    assert "1 of 2 images" in caplog.text
    _, geometry_level = FeaturePyramid(maps).levels
    assert geometry_level[0].abs().sum() > 0
    assert not geometry_level[1].any()  # after standardization: no signal, the classifier sees RGB only


def test_refinement_with_an_all_zero_depth_map_equals_rgb_refinement() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, SIZE, SIZE, generator=generator)
    maps = 0.3 * torch.rand(2, SIZE, SIZE, generator=generator)
    maps[:, 10:20, 10:20] += 0.6
    images[:, 0, 10:20, 10:20] += 1.0
    pipeline = RefinementPipeline(
        "nominal", RgbdFeatures(Colour(), expect_depth=True), LogisticRegression(), "none", "threshold"
    )
    rgb = pipeline(RefinementInputs(Modalities(images), maps, maps > 0.5, torch.arange(2)))
    depth = torch.zeros(2, 3, SIZE, SIZE)
    zero_depth = pipeline(RefinementInputs(Modalities(images, depth), maps, maps > 0.5, torch.arange(2)))
    assert rgb.refined.all()
    assert torch.equal(zero_depth.masks, rgb.masks)
    assert not torch.equal(rgb.masks, maps > 0.5)  # refined, not anomalib's mask


@pytest.mark.parametrize(
    ("factory", "argument"),
    [
        (lambda: RgbdFeatures(Colour(), geometry_weight=0.0), "geometry_weight"),
        (lambda: RgbdFeatures("no_such_source"), "unknown feature source 'no_such_source'"),
        (lambda: GeometryFeatures(scales=[0, 2]), "scales"),
        (lambda: WeightedMaps([torch.zeros(1, 1, 2, 2)], [1.0, 2.0]), "weights"),
    ],
)
def test_invalid_arguments_name_the_argument(factory, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        factory()


# --------------------------------------------------------------------------------------------------------------
# Generated MVTec 3D-AD-layout data: grooves that exist only in the point cloud
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def groove_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<root>/texture3d``: RGB PNG + XYZ TIFF (about 2 % missing points) + masks; grooves invisible in RGB."""
    from anomalib_tts.tools.data import make_mvtec3d_dataset

    root = tmp_path_factory.mktemp("mvtec3d")
    make_mvtec3d_dataset(root, n_train=8, n_test_good=2, n_test_defect=8, image_size=128, defect_kinds=("groove",))
    return root


@pytest.mark.slow
def test_rgb_cannot_refine_a_geometry_only_defect_and_rgb_plus_geometry_can(groove_root: Path) -> None:
    from anomalib.data import MVTec3D

    datamodule = MVTec3D(root=groove_root, category="texture3d", eval_batch_size=16, num_workers=0)
    datamodule.setup()
    batch = next(iter(datamodule.test_dataloader()))
    defective = batch.gt_label.bool()
    images, depth, truth = batch.image[defective], batch.depth_map[defective], batch.gt_mask[defective].bool()
    assert (depth == 0).all(dim=1).float().mean() > 0.01  # the scans have missing points
    # A detector that sees each groove, slightly blurred and at a level the global threshold does not fit
    blurred = gaussian_blur(truth.float()[:, None], [7, 7], [1.0, 1.0])[:, 0]
    noise = 0.02 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(0))
    score_maps = 0.45 + 0.4 * blurred / blurred.amax(dim=(1, 2), keepdim=True) + noise
    thresholded = score_maps > 0.5

    torch.manual_seed(0)  # random backbone weights (no download), the same on every run
    rgb = TimmFeatures("resnet18", pre_trained=False)
    pipeline = RefinementPipeline(
        LABELERS.get("relative")(), RgbdFeatures(rgb), LogisticRegression(), self_check="none", fallback="threshold"
    )
    seeds = torch.arange(len(images))
    rgb_only = pipeline(RefinementInputs(Modalities(images), score_maps, thresholded, seeds))
    with_geometry = pipeline(RefinementInputs(Modalities(images, depth), score_maps, thresholded, seeds))

    assert rgb_only.refined.all() and with_geometry.refined.all()
    threshold_f1, rgb_f1, geometry_f1 = (mean_f1(m, truth) for m in (thresholded, rgb_only.masks, with_geometry.masks))
    print(f"mean per-image F1: threshold {threshold_f1:.3f}, RGB {rgb_f1:.3f}, RGB + geometry {geometry_f1:.3f}")
    assert rgb_f1 < threshold_f1 + 0.05  # RGB features cannot see the grooves: no better than the threshold
    assert geometry_f1 > 0.75
    assert geometry_f1 > max(rgb_f1, threshold_f1) + 0.1


@pytest.mark.slow
def test_anomalib_mvtec3d_depth_maps_reach_the_callback_in_engine_test(
    groove_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from anomalib.data import MVTec3D as AnomalibMVTec3D
    from anomalib.engine import Engine
    from anomalib.models import Padim

    from anomalib_tts.tools.data import MVTec3D

    class RecordingGeometry(GeometryFeatures):
        def __init__(self) -> None:
            super().__init__()
            self.depth_maps: list[torch.Tensor] = []

        def __call__(self, inputs: Modalities) -> list[torch.Tensor]:
            self.depth_maps.append(inputs.depth_map.cpu())
            return super().__call__(inputs)

    arguments = {"root": groove_root, "category": "texture3d", "num_workers": 0, "eval_batch_size": 16}
    model = Padim(
        backbone="resnet18",
        layers=["layer1", "layer2"],
        pre_trained=False,
        pre_processor=Padim.configure_pre_processor(image_size=(128, 128)),
    )
    recorder = RecordingGeometry()
    callback = TestTimeSegmentation(
        features=RgbdFeatures("model", geometry=recorder, expect_depth=True), calibrate=False
    )
    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, callbacks=[callback])
    engine.fit(model, datamodule=MVTec3D(train_batch_size=8, **arguments))  # trains under pandas 3
    with caplog.at_level(logging.WARNING, logger=GEOMETRY_LOGGER):
        engine.test(model, datamodule=AnomalibMVTec3D(**arguments))

    assert callback.stats.images == 10
    assert callback.stats.refined > 0
    assert "RGB features only" not in caplog.text
    (depth_maps,) = recorder.depth_maps  # one test batch
    scans = sorted((groove_root / "texture3d" / "test").glob("*/xyz/*.tiff"))
    expected = torch.stack([torch.from_numpy(tifffile.imread(path)).permute(2, 0, 1) for path in scans])
    assert torch.equal(depth_maps, expected)  # the XYZ files, missing points included, unchanged
