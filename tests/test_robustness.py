"""Unusual input never crashes a run and never loses a mask: bad maps, shapes, channels, arguments, dtypes,
determinism, checkpoints and 2-process DDP."""

import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from anomalib.data import ImageBatch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.pytorch import LightningModule, Trainer

from anomalib_tts.lightning.callback import TestTimeSegmentation
from anomalib_tts.pipeline.classifiers import LinearSVM
from anomalib_tts.pipeline.fallbacks import StableThreshold
from anomalib_tts.pipeline.features import FeatureSource, Modalities, TimmFeatures
from anomalib_tts.pipeline.features.geometry import RgbdFeatures
from anomalib_tts.pipeline.labelers import LABELERS, NominalAware, PeakRelative
from anomalib_tts.pipeline.refinement import FALLBACK_OUTCOMES, Outcome, RefinementInputs, RefinementPipeline
from tests.helpers import small_features

from . import ddp_run
from .conftest import make_datamodule, make_padim

DDP_SCRIPT = Path(ddp_run.__file__)
LOGGER = "anomalib_tts"  # the package's loggers: the adapter warns about images, the callback logs its summary


def _scene(batch: int, image_size: tuple[int, int], map_size: tuple[int, int] | None = None, seed: int = 0):
    """Images with a bright rectangle per image, and score maps (of ``map_size``) peaking on it."""
    height, width = map_size or image_size
    generator = torch.Generator().manual_seed(seed)
    images = 0.3 * torch.rand(batch, 3, *image_size, generator=generator)
    maps = 0.1 * torch.rand(batch, height, width, generator=generator)
    for index in range(batch):
        top, left = (index * 3) % max(height // 2, 1), (index * 5) % max(width // 2, 1)
        maps[index, top : top + max(height // 4, 4), left : left + max(width // 4, 4)] = 0.9
        image_top, image_left = top * image_size[0] // height, left * image_size[1] // width
        images[index, :, image_top : image_top + image_size[0] // 4, image_left : image_left + image_size[1] // 4] = 0.9
    return images, maps


def _batch(images: torch.Tensor, maps: torch.Tensor, paths: list[str] | None = None) -> ImageBatch:
    return ImageBatch(image=images, anomaly_map=maps, pred_mask=maps > 0.5, image_path=paths)


def _paths(count: int) -> list[str]:
    return [f"images/{index:03d}.png" for index in range(count)]


SMALL_CAPS = {"max_positives": 100, "max_negatives": 100}


def _callback(**kwargs) -> TestTimeSegmentation:
    """A callback on the shared random-weight backbone, with small caps to keep the fits fast."""
    options = {**SMALL_CAPS, **kwargs}
    return TestTimeSegmentation(features=small_features(), **options)


# --- score maps with NaN / inf, constant maps, too few confident pixels ---------------------------------------


@pytest.mark.parametrize("name", sorted(LABELERS))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_pixels_are_never_labeled_by_any_recipe(name: str, value: float) -> None:
    _, maps = _scene(2, (32, 32))
    maps[:, ::3] = value
    maps[:, :, 20] = value  # also across the defect
    labels = LABELERS.get(name)()(maps, nominal_threshold=0.5)
    bad = ~torch.isfinite(maps)
    assert not (labels.positive & bad).any()
    assert not (labels.negative & bad).any()


def test_a_map_with_few_finite_pixels_keeps_its_mask_and_the_warning_names_the_image(
    caplog: pytest.LogCaptureFixture,
) -> None:
    images, maps = _scene(3, (32, 32))
    maps[0] = float("nan")
    maps[0, 4:8, 4:6] = 0.9  # 8 finite pixels: fewer than min_positives + min_negatives
    maps[1, ::2] = float("inf")  # half the pixels invalid, enough remain
    callback = _callback()
    batch = _batch(images, maps, _paths(3))
    original = batch.pred_mask.clone()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = callback.refine_batch(batch)
    assert result.outcome.tolist() == [Outcome.FEW_VALID, Outcome.REFINED, Outcome.REFINED]
    assert torch.equal(batch.pred_mask[0], original[0])
    assert callback.stats.outcomes["few_valid"] == 1
    assert "images/000.png" in caplog.text and "few_valid" in caplog.text
    assert "images/001.png" not in caplog.text


def test_images_kept_for_one_reason_warn_once_per_epoch_and_the_summary_counts_them_all(
    caplog: pytest.LogCaptureFixture,
) -> None:
    callback = _callback()
    trainer, module = Trainer(logger=False), LightningModule()

    def epoch(first: int) -> str:
        """Two batches of 3 images; two of each batch have too few finite pixels. Returns what was logged."""
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=LOGGER):
            callback.on_predict_epoch_start(trainer, module)
            for batch_start in (first, first + 3):
                images, maps = _scene(3, (32, 32), seed=batch_start)
                maps[:2] = float("nan")
                paths = [f"images/{index:03d}.png" for index in range(batch_start, batch_start + 3)]
                callback.refine_batch(_batch(images, maps, paths))
            callback.refine_batch(SimpleNamespace(anomaly_map=None))
            callback.refine_batch(SimpleNamespace(anomaly_map=None))
            callback.on_predict_epoch_end(trainer, module)
        return caplog.text

    logged = epoch(first=0)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2  # one for few_valid (naming the first image), one for the batches without maps
    assert "images/000.png (few_valid)" in warnings[0] and "summary line" in warnings[0]
    assert "no anomaly_map" in warnings[1]
    assert "refined 2 of 6 images (refined: 2, few_valid: 4)" in logged
    logged = epoch(first=10)  # a new epoch warns again, naming its own first image
    assert "images/010.png (few_valid)" in logged and "images/011.png" not in logged
    assert sum(record.levelno == logging.WARNING for record in caplog.records) == 2


def test_refinement_in_a_validate_run_logs_its_own_summary_line(caplog: pytest.LogCaptureFixture) -> None:
    from lightning.pytorch.trainer.states import TrainerFn

    callback = _callback(stages=("validate",), calibrate=False)
    trainer, module = Trainer(logger=False), LightningModule()
    callback.stats.images = 99  # left from an earlier run
    trainer.state.fn = TrainerFn.VALIDATING
    images, maps = _scene(2, (32, 32))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        callback.on_validation_epoch_start(trainer, module)
        callback.on_validation_batch_end(trainer, module, _batch(images, maps, _paths(2)), None, 0)
        callback.on_validation_epoch_end(trainer, module)
    assert "refined 2 of 2 images" in caplog.text
    caplog.clear()
    trainer.state.fn = TrainerFn.FITTING  # validation inside fit: neither refined nor summarized
    with caplog.at_level(logging.INFO, logger=LOGGER):
        callback.on_validation_epoch_start(trainer, module)
        callback.on_validation_batch_end(trainer, module, _batch(images, maps, _paths(2)), None, 0)
        callback.on_validation_epoch_end(trainer, module)
    assert callback.stats.images == 2 and not caplog.text


def _constant(maps: torch.Tensor) -> torch.Tensor:
    return torch.full_like(maps, 0.4)


def _faint(maps: torch.Tensor) -> torch.Tensor:
    return maps * 0.1  # peak below the nominal floor


def _flat_top(maps: torch.Tensor) -> torch.Tensor:
    return 0.7 + 0.01 * maps  # everything above the nominal threshold: no pixel confidently normal


FALLBACK_METRIC = {Outcome.FEW_POSITIVES: "tts_images_fallback", Outcome.FEW_NEGATIVES: "tts_images_kept"}


def _assert_fallback_or_kept(
    outcome: Outcome, mask: torch.Tensor, original: torch.Tensor, fallback: torch.Tensor
) -> None:
    """No confident defect: the fallback's mask; no confident normal: the mask the image came with."""
    assert not torch.equal(fallback, original)  # the scene tells the two apart
    assert torch.equal(mask, fallback if outcome == Outcome.FEW_POSITIVES else original)


@pytest.mark.parametrize(
    ("recipe", "transform", "outcome"),
    [
        ("relative", _constant, Outcome.FEW_POSITIVES),
        ("relative", _faint, Outcome.FEW_POSITIVES),
        ("percentile", _constant, Outcome.FEW_NEGATIVES),  # a constant map is all "peak": nothing left normal
        ("nominal", _faint, Outcome.FEW_POSITIVES),
        ("nominal", _flat_top, Outcome.FEW_NEGATIVES),
    ],
)
def test_maps_without_a_confident_defect_get_the_fallback_and_without_a_confident_normal_keep_their_mask(
    recipe: str, transform, outcome: Outcome, caplog: pytest.LogCaptureFixture
) -> None:
    images, maps = _scene(2, (32, 32))
    maps[0] = transform(maps[0])
    callback = _callback(pseudo_labels=recipe)
    batch = _batch(images, maps, _paths(2))
    batch.pred_mask[0] = False
    batch.pred_mask[0, :, :5] = True  # anomalib's mask: a stripe that neither the map nor MEBin would give
    original = batch.pred_mask.clone()
    result = callback.refine_batch(batch)
    assert result.outcome.tolist() == [outcome, Outcome.REFINED]
    fallback = StableThreshold()(maps[:1], original[:1], 0.5)[0]
    _assert_fallback_or_kept(outcome, batch.pred_mask[0], original[0], fallback)
    assert callback.stats.outcomes[outcome.name.lower()] == 1
    assert callback.stats.as_metrics()[FALLBACK_METRIC[outcome]] == 1
    with caplog.at_level(logging.INFO, logger=LOGGER):
        callback.on_predict_epoch_end(Trainer(logger=False), LightningModule())
    assert f"refined 1 of 2 images (refined: 1, {outcome.name.lower()}: 1)" in caplog.text


def _drifted(maps: torch.Tensor) -> torch.Tensor:
    """The maps risen unevenly above anomalib's threshold around their defects, which stay the highest."""
    shading = torch.linspace(0.55, 0.69, maps.shape[-1]).expand_as(maps)
    return torch.where(maps > 0.5, 0.95, shading)


@pytest.mark.parametrize(
    ("argument", "outcome"), [("min_positives", Outcome.FEW_POSITIVES), ("min_negatives", Outcome.FEW_NEGATIVES)]
)
def test_fewer_confident_pixels_than_the_minimum_give_the_fallback_or_keep_the_mask(
    argument: str, outcome: Outcome
) -> None:
    images, maps = _scene(2, (32, 32))
    maps = _drifted(maps)  # anomalib's mask (> 0.5): every pixel; the stable threshold's: the defect
    callback = _callback(max_positives=1000, max_negatives=1000, **{argument: 1000})  # more than a 32 x 32 map offers
    batch = _batch(images, maps, _paths(2))
    original = batch.pred_mask.clone()
    assert original.all()
    result = callback.refine_batch(batch)
    assert result.outcome.tolist() == [outcome, outcome]
    fallback = StableThreshold()(maps, original, 0.5)
    for index in range(2):
        _assert_fallback_or_kept(outcome, batch.pred_mask[index], original[index], fallback[index])
    assert callback.stats.outcomes[outcome.name.lower()] == 2
    metrics = callback.stats.as_metrics()
    assert (metrics["tts_images_fallback"], metrics["tts_images_kept"]) == (
        (2, 0) if outcome == Outcome.FEW_POSITIVES else (0, 2)
    )


# --- shapes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "image_size", "map_size"),
    [
        (1, (64, 64), (64, 64)),
        (32, (32, 48), (32, 48)),
        (2, (48, 96), (96, 48)),  # non-square, transposed aspect
        (2, (64, 96), (23, 37)),  # map smaller than the image
        (2, (32, 32), (100, 80)),  # map larger than the image
        (2, (257, 311), (257, 311)),  # odd sizes
    ],
)
def test_any_batch_size_and_map_size_gives_masks_of_the_map_shape(
    batch: int, image_size: tuple[int, int], map_size: tuple[int, int]
) -> None:
    images, maps = _scene(batch, image_size, map_size)
    callback = _callback()
    batch_data = _batch(images, maps, _paths(batch))
    result = callback.refine_batch(batch_data)
    assert batch_data.pred_mask.shape == (batch, *map_size)
    assert batch_data.pred_mask.dtype == torch.bool
    assert bool(result.refined.all())  # every image went through features, fit and projection


# --- image channels -------------------------------------------------------------------------------------------


def test_grayscale_and_rgba_images_give_the_features_of_their_rgb_version() -> None:
    features = small_features()
    gray = torch.rand(2, 1, 32, 32)
    rgb = torch.rand(2, 3, 32, 32)
    rgba = torch.cat((rgb, torch.rand(2, 1, 32, 32)), dim=1)
    for given_images, expected_images in ((gray, gray.expand(-1, 3, -1, -1)), (rgba, rgb)):
        for level, expected in zip(
            features(Modalities(given_images)), features(Modalities(expected_images)), strict=True
        ):
            assert torch.equal(level, expected)
    with pytest.raises(ValueError, match="channels"):
        features(Modalities(torch.rand(2, 2, 32, 32)))


def test_normalization_is_decided_per_image_not_per_batch() -> None:
    features = small_features()
    raw = torch.rand(1, 3, 32, 32)  # in [0, 1]: normalized by the provider
    normalized = torch.randn(1, 3, 32, 32)  # already normalized
    alone = features(Modalities(raw))
    together = features(Modalities(torch.cat((raw, normalized))))
    for level_alone, level_together in zip(alone, together, strict=True):
        assert torch.allclose(level_alone[0], level_together[0], atol=1e-5)


def _write_images(source: Path, target: Path) -> list[Path]:
    """Grayscale, RGBA, non-square RGB and plain copies of the generated test images, with no masks."""
    from PIL import Image

    target.mkdir(parents=True)
    defective = sorted(path for path in source.rglob("test/*/*.png") if path.parent.name != "good")[:4]
    conversions = (("L", None), ("RGBA", None), ("RGB", (160, 96)), ("RGB", None))
    written = []
    for index, (path, (mode, size)) in enumerate(zip(defective, conversions, strict=True)):
        image = Image.open(path).convert(mode)
        if size is not None:
            image = image.resize(size)
        written.append(target / f"{index}_{mode}.png")
        image.save(written[-1])
    return written


@pytest.mark.slow
def test_predict_on_a_folder_without_masks_with_grayscale_and_rgba_files(
    synthetic_root: Path, padim_checkpoint: Path, tmp_path: Path
) -> None:
    from anomalib.engine import Engine

    written = _write_images(synthetic_root, tmp_path / "folder")
    callback = TestTimeSegmentation(features="model")
    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, callbacks=[callback])
    predictions = engine.predict(make_padim(), data_path=tmp_path / "folder", ckpt_path=padim_checkpoint)
    assert callback.stats.images == len(written)
    assert sum(callback.stats.outcomes.values()) == len(written)
    assert callback.stats.refined > 0
    for batch in predictions:
        assert batch.gt_mask is None
        assert batch.pred_mask.dtype == torch.bool
        assert batch.pred_mask.shape[-2:] == batch.anomaly_map.shape[-2:]


# --- models the callback cannot work with, invalid arguments --------------------------------------------------


def _setup(callback: TestTimeSegmentation, model: LightningModule, stage: str = "test") -> None:
    callback.setup(Trainer(logger=False, enable_checkpointing=False, callbacks=[callback]), model, stage)


def test_a_model_without_post_processor_fails_at_setup_saying_what_to_use() -> None:
    callback = _callback()
    model = make_padim()
    model.post_processor = None
    with pytest.raises(ValueError, match=r"PostProcessor.*post_processor=True"):
        _setup(callback, model)
    _setup(callback, model, stage="fit")  # training with the callback attached is not refused


def test_a_model_without_timm_extractor_and_model_features_fails_at_setup_saying_what_to_use() -> None:
    from anomalib.post_processing import PostProcessor

    model = LightningModule()
    model.post_processor = PostProcessor()
    with pytest.raises(ValueError, match=r"backbone='wide_resnet50_2'"):
        _setup(TestTimeSegmentation(features="model"), model)


@pytest.mark.parametrize(
    ("build", "named"),
    [
        (lambda: LinearSVM(max_iter=2.5), "max_iter"),
        (lambda: LinearSVM(power_iter=20.5), "power_iter"),
        (lambda: LinearSVM(projection=64.5), "projection"),
        (lambda: NominalAware(peak_window=3.5), "peak_window"),
        (lambda: LABELERS.get("percentile")(neighbourhood=3.0), "neighbourhood"),
    ],
)
def test_integer_options_of_the_components_must_be_integers(build, named: str) -> None:
    with pytest.raises(ValueError, match=f"{named} must be an integer"):
        build()


def test_stages_given_as_one_name_is_that_stage() -> None:
    assert TestTimeSegmentation(features="geometry", stages="test").stages == ("test",)
    assert TestTimeSegmentation(features="geometry", stages="validate").stages == ("validate",)
    assert TestTimeSegmentation.from_init_args({"features": "geometry", "stages": "test"}).stages == ("test",)  # YAML


@pytest.mark.parametrize("disabled", ["enable_normalization", "enable_thresholding"])
def test_a_post_processor_without_normalization_or_thresholding_fails_at_setup_naming_the_option(disabled: str) -> None:
    """Raw maps have no known scale, and without a threshold there is nothing to refine from: refused, not guessed."""
    from anomalib.post_processing import PostProcessor

    model = make_padim()
    model.post_processor = PostProcessor(**{disabled: False})
    with pytest.raises(ValueError, match=rf"{disabled}=False.*keep {disabled}=True"):
        _setup(_callback(), model)
    _setup(_callback(), model, stage="fit")  # training with the callback attached is not refused


@pytest.mark.slow
def test_validate_resets_and_logs_the_statistics_as_test_does(
    synthetic_root: Path, padim_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from anomalib.engine import Engine

    callback = TestTimeSegmentation(features="model", stages=["validate"], calibrate=False)
    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, callbacks=[callback])
    datamodule = make_datamodule(synthetic_root)
    counted, logged = [], []
    for _ in range(2):
        with caplog.at_level(logging.INFO, logger=LOGGER):
            metrics = engine.validate(make_padim(), datamodule=datamodule, ckpt_path=padim_checkpoint)[0]
        counted.append(callback.stats.images)
        logged.append(sum(metrics[f"tts_images_{kind}"] for kind in ("refined", "fallback", "kept")))
    images = len(datamodule.val_data)
    assert counted == [images, images]  # counted afresh in every run
    assert logged == [images, images]
    assert caplog.text.count(f"of {images} images") == 2


def test_an_unknown_layer_raises_at_setup_listing_the_layers_on_offer() -> None:
    callback = TestTimeSegmentation(features=TimmFeatures("resnet18", layers=["layer2", "layer9"], pre_trained=False))
    with pytest.raises(ValueError, match=r"layers.*layer9.*layer1"):
        _setup(callback, make_padim())


# --- batches that do not fit together, images of other dtypes -----------------------------------------------


def _plain_batch(images: torch.Tensor | None, maps: torch.Tensor, **fields) -> SimpleNamespace:
    """A batch as a plain object: its fields reach the callback as they are, unvalidated by anomalib."""
    defaults = {"pred_mask": maps > 0.5, "image_path": _paths(maps.shape[0]), "depth_map": None}
    return SimpleNamespace(image=images, anomaly_map=maps, **{**defaults, **fields})


@pytest.mark.parametrize("field", ["image", "depth_map", "pred_mask", "image_path"])
def test_batch_fields_that_disagree_in_batch_size_raise_naming_them(field: str) -> None:
    images, maps = _scene(3, (32, 32))
    depth_maps = torch.rand(3, 3, 32, 32)
    fields = {"image": images[:2], "depth_map": depth_maps[:2], "pred_mask": maps[:2] > 0.5, "image_path": _paths(2)}
    fields[field] = {"image": images, "depth_map": depth_maps, "pred_mask": maps > 0.5, "image_path": _paths(3)}[field]
    callback = TestTimeSegmentation(features=RgbdFeatures(small_features()), max_positives=100, max_negatives=100)
    with pytest.raises(ValueError, match=rf"disagree in batch size \(anomaly_map 2, .*{field} 3"):
        callback.refine_batch(SimpleNamespace(anomaly_map=maps[:2], **fields))


def test_a_batch_without_images_raises_naming_the_missing_input() -> None:
    _, maps = _scene(2, (32, 32))
    with pytest.raises(ValueError, match=r"batch\.image is None.*pass the model's input images"):
        _callback().refine_batch(_plain_batch(None, maps))


def test_uint8_images_are_scaled_like_float_images() -> None:
    images, maps = _scene(3, (32, 32))
    eight_bit = (images * 255).round().to(torch.uint8)

    def refined_masks(batch) -> torch.Tensor:
        assert bool(_callback().refine_batch(batch).refined.all())
        return batch.pred_mask

    expected = refined_masks(_batch(eight_bit.float() / 255, maps, _paths(3)))
    assert torch.equal(refined_masks(_plain_batch(eight_bit, maps)), expected)
    assert torch.equal(refined_masks(_batch(eight_bit, maps, _paths(3))), expected)  # ImageBatch casts to 0-255 floats
    with pytest.raises(ValueError, match=r"dtype torch\.int64.*uint8"):
        _callback().refine_batch(_plain_batch(eight_bit.long(), maps))


def test_minimums_above_the_pixels_of_the_map_raise_naming_them() -> None:
    images, maps = _scene(2, (64, 64), map_size=(16, 16))
    callback = _callback(max_negatives=1000, min_negatives=300)
    with pytest.raises(ValueError, match=r"min_positives \+ min_negatives \(10 \+ 300\) exceed the 256 pixels"):
        callback.refine_batch(_batch(images, maps, _paths(2)))


# --- determinism ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_paths", [True, False], ids=["seeded-by-path", "seeded-by-content"])
def test_same_images_give_identical_masks_again_and_in_any_batch_order(with_paths: bool) -> None:
    images, maps = _scene(5, (48, 48), seed=3)
    paths = _paths(5) if with_paths else None
    callback = _callback(max_positives=20, max_negatives=30)  # small caps: the sampled subsets matter

    def refine(order: list[int]) -> torch.Tensor:
        batch = _batch(images[order], maps[order], [paths[i] for i in order] if paths else None)
        callback.refine_batch(batch)
        return batch.pred_mask

    first = refine(list(range(5)))
    assert torch.equal(first, refine(list(range(5))))
    order = [4, 1, 3, 0, 2]
    in_two_batches = torch.cat((refine(order[:2]), refine(order[2:])))
    assert torch.equal(in_two_batches, first[order])


# --- checkpoints ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_checkpoint_written_with_the_callback_loads_with_and_without_it(
    synthetic_root: Path, padim_checkpoint: Path, tmp_path: Path
) -> None:
    from anomalib.engine import Engine

    def engine(name: str, callbacks: list) -> Engine:
        return Engine(default_root_dir=tmp_path / name, logger=False, enable_progress_bar=False, callbacks=callbacks)

    training = engine("fit", [TestTimeSegmentation(features="model")])
    training.fit(make_padim(), datamodule=make_datamodule(synthetic_root))
    written = tmp_path / "with_callback.ckpt"
    training.trainer.save_checkpoint(written)

    with_callback = torch.load(written, map_location="cpu", weights_only=False)
    without_callback = torch.load(padim_checkpoint, map_location="cpu", weights_only=False)
    assert with_callback["state_dict"].keys() == without_callback["state_dict"].keys()
    # the callback adds its calibration, as plain data, beside the callbacks' states anomalib saves anyway
    saved = with_callback.get("callbacks", {})
    assert saved.keys() - without_callback.get("callbacks", {}).keys() == {"TestTimeSegmentation"}
    calibration = saved["TestTimeSegmentation"]["calibration"]
    assert calibration["choice"] in calibration["scores"]
    assert "TestTimeSegmentation" not in str(with_callback.get("hyper_parameters", {}))

    make_padim().load_state_dict(with_callback["state_dict"], strict=True)  # loads into a model without it
    testing = TestTimeSegmentation(features="model")
    tested = engine("refined", [testing]).test(  # and into a run with it, which uses the saved choice
        make_padim(), datamodule=make_datamodule(synthetic_root), ckpt_path=written
    )
    assert testing.calibration is not None and testing.calibration.to_dict() == calibration
    assert tested[0]["tts_images_refined"] + tested[0]["tts_images_fallback"] > 0


# --- dtypes and devices ---------------------------------------------------------------------------------------


class _Cast(FeatureSource):
    """The images, rounded to ``feature_dtype`` and handed over as ``provided_dtype``."""

    def __init__(self, feature_dtype: torch.dtype, provided_dtype: torch.dtype) -> None:
        self.feature_dtype, self.provided_dtype = feature_dtype, provided_dtype

    def __call__(self, inputs: Modalities) -> list[torch.Tensor]:
        return [inputs.image.to(self.feature_dtype).to(self.provided_dtype)]


class _Float32Spy(LinearSVM):
    """Records the dtype the classifier is fitted in."""

    dtypes: list[torch.dtype]

    def fit(self, features: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor):
        self.dtypes.append(features.dtype)
        return super().fit(features, labels, valid)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_maps_and_features_are_refined_in_float32(device: str, dtype: torch.dtype) -> None:
    images, maps = _scene(3, (32, 32), seed=5)
    images, maps = images.to(device), maps.to(device)

    def refine(score_maps: torch.Tensor, feature_dtype: torch.dtype, provided_dtype: torch.dtype) -> torch.Tensor:
        classifier = _Float32Spy()
        classifier.dtypes = []
        pipeline = RefinementPipeline(
            PeakRelative(), _Cast(feature_dtype, provided_dtype), classifier, "none", "threshold", **SMALL_CAPS
        )
        seeds = torch.arange(3, device=device)
        result = pipeline(RefinementInputs(Modalities(images), score_maps, score_maps > 0.5, seeds))
        assert classifier.dtypes == [torch.float32]
        assert bool(result.refined.all())
        assert result.masks.dtype == torch.bool and result.masks.device.type == device
        return result.masks

    # low-precision maps and features give exactly what their values in float32 give
    assert torch.equal(refine(maps.to(dtype), dtype, dtype), refine(maps.to(dtype).float(), dtype, torch.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_the_callback_runs_on_the_batch_device_with_half_precision_images(device: str) -> None:
    images, maps = _scene(2, (32, 32))
    batch = _batch(images.to(device), maps.to(device), _paths(2))
    batch.image = batch.image.half()
    result = _callback().refine_batch(batch)
    assert bool(result.refined.all())
    assert batch.pred_mask.device.type == device


# --- property test --------------------------------------------------------------------------------------------


@st.composite
def _finite_batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    batch = draw(st.integers(1, 3))
    height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    style = draw(st.sampled_from(["uniform", "constant", "blob", "huge"]))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    maps = torch.rand(batch, height, width, generator=generator)
    if style == "constant":
        maps = torch.full_like(maps, draw(st.floats(-1e3, 1e3)))
    elif style == "blob":
        maps[:, : max(height // 3, 1), : max(width // 3, 1)] += 1.0
    elif style == "huge":
        maps = (maps - 0.5) * draw(st.sampled_from([1e-30, 1e10, 3e38]))
    images = torch.rand(batch, 3, draw(st.integers(8, 48)), draw(st.integers(8, 48)), generator=generator)
    return images, maps, draw(st.permutations(range(batch)))


def _agree(masks: torch.Tensor, expected: torch.Tensor, decision: torch.Tensor) -> bool:
    """Equal masks, but at pixels whose decision value is float rounding away from 0 (logistic regression)."""
    return bool(((masks == expected) | (decision.abs() < 1e-5)).all())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_finite_batches())
def test_property_masks_are_a_function_of_each_image_alone_and_unrefined_images_keep_theirs(
    data: tuple[torch.Tensor, torch.Tensor, list[int]],
) -> None:
    """Whatever the maps: bool masks of the map's shape, the classifier's decision where an image is refined, the
    fallback's mask of the image alone where it has no confident defect or fails the self-check, the original
    mask elsewhere, and each image's mask the same in any batch order and alone."""
    images, maps, order = data
    paths = _paths(maps.shape[0])
    callback = _callback()
    batch = _batch(images, maps, paths)
    if maps.shape[1] * maps.shape[2] < 20:  # min_positives + min_negatives: no image of this size can be refined
        with pytest.raises(ValueError, match="min_positives"):
            callback.refine_batch(batch)
        return
    original = batch.pred_mask.clone()
    result = callback.refine_batch(batch)
    masks = batch.pred_mask
    assert masks.shape == maps.shape
    assert masks.dtype == torch.bool
    refined = result.refined
    fallen_back = torch.isin(result.outcome, torch.tensor(FALLBACK_OUTCOMES))
    kept = ~refined & ~fallen_back
    assert torch.equal(masks[kept], original[kept])
    assert torch.equal(masks[refined], result.decision[refined] > 0)
    fallback = callback.pipeline.fallback(maps.float()[fallen_back], original[fallen_back], 0.5)
    assert torch.equal(masks[fallen_back], fallback)

    permuted = _batch(images[order], maps[order], [paths[index] for index in order])
    permuted_result = callback.refine_batch(permuted)
    assert torch.equal(permuted_result.outcome, result.outcome[order])
    assert _agree(permuted.pred_mask, masks[order], permuted_result.decision.nan_to_num(1.0))

    alone = _batch(images[:1], maps[:1], paths[:1])
    alone_result = callback.refine_batch(alone)
    assert torch.equal(alone_result.outcome, result.outcome[:1])
    assert _agree(alone.pred_mask, masks[:1], alone_result.decision.nan_to_num(1.0))


# --- distributed ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _even_root(source: Path, target: Path) -> Path:
    """The generated dataset with one good test image left out, so 2 ranks split it without padding."""
    category = target / "texture"
    shutil.copytree(source / "texture", category)
    goods = sorted((category / "test" / "good").glob("*.png"))
    goods[0].unlink()
    assert len(list(category.rglob("test/*/*.png"))) % 2 == 0
    return target


def _run_ddp_script(root: Path, checkpoint: Path, out: Path) -> None:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(DDP_SCRIPT), str(root), str(checkpoint), str(out), "--devices", "2"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-4000:]


@pytest.mark.slow
def test_two_process_ddp_refines_each_image_once_with_the_single_process_results(
    synthetic_root: Path, padim_checkpoint: Path, tmp_path: Path
) -> None:
    """Masks agree up to float noise: anomalib's own maps differ in the last digits with the batch composition."""
    root = _even_root(synthetic_root, tmp_path / "data")
    (tmp_path / "single").mkdir()
    for stage in ("test", "predict"):
        ddp_run.run(stage, root, padim_checkpoint, tmp_path / "single", devices=1)
    _run_ddp_script(root, padim_checkpoint, tmp_path / "ddp")
    for stage in ("test", "predict"):
        single = torch.load(tmp_path / "single" / f"{stage}_rank0.pt", weights_only=False)
        ranks = [torch.load(tmp_path / "ddp" / f"{stage}_rank{rank}.pt", weights_only=False) for rank in (0, 1)]
        ddp_paths = ranks[0]["paths"] + ranks[1]["paths"]
        assert sorted(ddp_paths) == sorted(single["paths"])  # each image on exactly one rank, none twice
        assert ranks[0]["refined"] > 0 and ranks[1]["refined"] > 0  # both ranks refined their own images
        assert ranks[0]["refined"] + ranks[1]["refined"] == single["refined"]
        ddp_masks = dict(zip(ddp_paths, torch.cat((ranks[0]["masks"], ranks[1]["masks"])), strict=True))
        for path, mask in zip(single["paths"], single["masks"], strict=True):
            assert (ddp_masks[path] == mask).float().mean() > 0.999, path
    single_metrics = torch.load(tmp_path / "single" / "test_rank0.pt", weights_only=False)["metrics"]
    ddp_metrics = torch.load(tmp_path / "ddp" / "test_rank0.pt", weights_only=False)["metrics"]
    single_f1, ddp_f1 = single_metrics["pixel_F1Score"], ddp_metrics["pixel_F1Score"]
    print(f"pixel_F1Score: single process {single_f1:.4f}, DDP {ddp_f1:.4f}")
    tolerances = {"image_AUROC": 1e-6, "tts_images_refined": 0, "tts_mean_positives": 0.5, "pixel_F1Score": 1e-3}
    for name, tolerance in tolerances.items():
        assert ddp_metrics[name] == pytest.approx(single_metrics[name], abs=tolerance), name
