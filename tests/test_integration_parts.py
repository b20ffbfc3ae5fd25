"""MaskWriter and the callbacks factory, in process (the CLI runs are in test_anomalib_cli.py, the factory's entry point
and what it costs a Trainer in test_layers.py)."""

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_tts import MaskWriter, TestTimeSegmentation
from anomalib_tts.lightning.factory import (
    CONFIG_VARIABLE,
    ConfiguredCallbackGuard,
    callbacks_from_environment,
    load_callback,
)
from tests.conftest import CONFIGS


def _trainer(root: Path, callbacks: list | None = None) -> SimpleNamespace:
    return SimpleNamespace(default_root_dir=str(root), datamodule=None, callbacks=callbacks or [])


def _input_image(path: Path, size: tuple[int, int]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((*size, 3), dtype=np.uint8)).save(path)
    return str(path)


def _read(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path))) > 127


def test_mask_writer_mirrors_the_input_path_and_keeps_the_mask(tmp_path: Path) -> None:
    masks = torch.rand(2, 1, 32, 48, generator=torch.Generator().manual_seed(0)) > 0.7
    paths = [
        _input_image(tmp_path / "images" / "test" / "crack" / "003.jpg", (32, 48)),
        _input_image(tmp_path / "images" / "test" / "good" / "003.png", (32, 48)),
    ]
    writer = MaskWriter(output_dir=str(tmp_path / "masks"))
    predictions = SimpleNamespace(pred_mask=masks, image_path=paths)
    writer.write_on_batch_end(_trainer(tmp_path), None, predictions, None, None, 0, 0)

    written = sorted((tmp_path / "masks").rglob("*.png"))
    assert [path.relative_to(tmp_path / "masks").as_posix() for path in written] == ["crack/003.png", "good/003.png"]
    assert torch.equal(_read(written[0]), masks[0, 0])
    assert torch.equal(_read(written[1]), masks[1, 0])


def test_mask_writer_resizes_to_the_input_image_unless_told_not_to(tmp_path: Path) -> None:
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[:8, 8:] = True  # top-right quarter
    path = _input_image(tmp_path / "in" / "part" / "a.png", (64, 32))

    resized = _read(MaskWriter(output_dir=str(tmp_path / "big")).write(mask, path, _trainer(tmp_path)))
    assert resized.shape == (64, 32)
    assert resized[:32, 16:].all() and not resized[32:].any() and not resized[:, :16].any()

    kept = _read(MaskWriter(output_dir=str(tmp_path / "small"), input_size=False).write(mask, path, _trainer(tmp_path)))
    assert torch.equal(kept, mask)


def test_mask_writer_defaults_to_the_trainer_folder_and_moves_itself_last(tmp_path: Path) -> None:
    writer = MaskWriter()
    refinement = TestTimeSegmentation(features="model")
    trainer = _trainer(tmp_path, [writer, refinement, "post_processor", "visualizer"])
    module = SimpleNamespace(predict_step=lambda batch, batch_idx: None)
    writer.setup(trainer, module, "predict")
    assert trainer.callbacks[-1] is writer
    assert trainer.callbacks.count(writer) == 1

    target = writer.write(torch.ones(4, 4, dtype=torch.bool), str(tmp_path / "data" / "x" / "b.bmp"), trainer)
    assert target == tmp_path / "masks" / "x" / "b.png"  # no input file: model resolution
    assert _read(target).shape == (4, 4)


def test_mask_writer_warns_on_predictions_without_masks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        writer = MaskWriter(output_dir=str(tmp_path))
        writer.write_on_batch_end(_trainer(tmp_path), None, SimpleNamespace(), None, None, 3, 0)
    assert "no pred_mask" in caplog.text
    assert not list(tmp_path.rglob("*.png"))


def test_mask_writer_says_how_many_masks_it_wrote_and_where(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    writer = MaskWriter(output_dir=str(tmp_path / "masks"))
    trainer = _trainer(tmp_path)
    paths = [str(tmp_path / "in" / f"{index}.png") for index in range(3)]
    with caplog.at_level(logging.INFO):
        writer.on_predict_epoch_start(trainer, None)
        for batch_idx, batch_paths in enumerate((paths[:2], paths[2:])):
            predictions = SimpleNamespace(pred_mask=torch.ones(len(batch_paths), 4, 4) > 0, image_path=batch_paths)
            writer.write_on_batch_end(trainer, None, predictions, None, None, batch_idx, 0)
        writer.on_predict_epoch_end(trainer, None)
    assert f"wrote 3 masks to {(tmp_path / 'masks').resolve()}" in caplog.text
    assert len(list((tmp_path / "masks").rglob("*.png"))) == 3


def test_mask_writer_rejects_an_empty_folder_name() -> None:
    with pytest.raises(ValueError, match="output_dir"):
        MaskWriter(output_dir=" ")


def test_factory_adds_nothing_unless_the_variable_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_VARIABLE, raising=False)
    assert callbacks_from_environment() == []
    monkeypatch.setenv(CONFIG_VARIABLE, "  ")
    assert callbacks_from_environment() == []


@pytest.mark.parametrize(
    "text",
    [
        "features: model\nmax_positives: 321\ngate: pred_label\n",
        (
            "class_path: anomalib_tts.TestTimeSegmentation\n"
            "init_args:\n  features: model\n  max_positives: 321\n  gate: pred_label\n"
        ),
    ],
    ids=["init_args", "class_path"],
)
def test_factory_builds_the_callback_the_file_describes(
    text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tts.yaml"
    path.write_text(text)
    monkeypatch.setenv(CONFIG_VARIABLE, str(path))
    callback, guard = callbacks_from_environment()
    assert isinstance(callback, TestTimeSegmentation)
    assert (callback.pipeline.max_positives, callback.refiner.gate) == (321, "pred_label")
    assert isinstance(guard, ConfiguredCallbackGuard) and guard.callback is callback


def test_the_benchmark_refinement_config_loads() -> None:
    callback = load_callback(CONFIGS / "benchmark" / "refinement.yaml")
    assert type(callback) is TestTimeSegmentation


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        ("backbone: [model\n", ValueError, "not valid YAML"),
        ("- backbone\n", ValueError, "mapping"),
        ("bakcbone: model\n", ValueError, "bakcbone"),
        ("gate: sometimes\n", ValueError, "gate"),
        ("class_path: torch.nn.Linear\n", ValueError, "subclass"),
        ("class_path: anomalib_tts.NoSuchCallback\n", ValueError, "cannot be imported"),
        ("class_path: anomalib_tts.TestTimeSegmentation\nbackbone: model\n", ValueError, "backbone"),
    ],
)
def test_factory_errors_name_the_file(
    text: str, error: type, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "broken_refinement.yaml"
    path.write_text(text)
    monkeypatch.setenv(CONFIG_VARIABLE, str(path))
    with pytest.raises(error, match=message) as raised:
        callbacks_from_environment()
    assert "broken_refinement.yaml" in str(raised.value)


def test_factory_names_a_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_VARIABLE, str(tmp_path / "absent.yaml"))
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        callbacks_from_environment()


def test_guard_drops_the_environment_callback_when_the_trainer_already_refines(tmp_path: Path) -> None:
    configured = TestTimeSegmentation(features="model")
    added = TestTimeSegmentation(features="model")
    guard = ConfiguredCallbackGuard(added)
    trainer = _trainer(tmp_path, [configured, "post_processor", added, guard])
    guard.setup(trainer, None, "test")
    assert trainer.callbacks == [configured, "post_processor"]


def test_guard_keeps_the_environment_callback_when_it_is_the_only_one(tmp_path: Path) -> None:
    added = TestTimeSegmentation(features="model")
    guard = ConfiguredCallbackGuard(added)
    trainer = _trainer(tmp_path, ["post_processor", added, guard])
    guard.setup(trainer, None, "test")
    assert trainer.callbacks == ["post_processor", added]


@pytest.mark.parametrize("model_name", ["Fastflow", "EfficientAd"])
def test_models_without_a_timm_feature_extractor_need_a_timm_backbone(model_name: str) -> None:
    """Why configs/fastflow.yaml and configs/efficient_ad.yaml name a timm backbone instead of ``features: model``."""
    import anomalib.models

    model_class = getattr(anomalib.models, model_name)
    model = model_class(pre_trained=False) if model_name == "Fastflow" else model_class()
    with pytest.raises(ValueError, match="TimmFeatureExtractor"):
        TestTimeSegmentation(features="model").pipeline.features.setup(model)


def test_mask_writer_writes_outside_lightning_into_its_output_dir(tmp_path: Path) -> None:
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1:3, 1:3] = True
    written = MaskWriter(output_dir=str(tmp_path / "masks"), input_size=False).write(mask, str(tmp_path / "in/a.jpg"))
    assert written.suffix == ".png" and written.is_relative_to(tmp_path / "masks")
    assert (np.array(Image.open(written)) > 127).tolist() == mask.tolist()
    with pytest.raises(ValueError, match="needs output_dir"):
        MaskWriter().write(mask, str(tmp_path / "in/a.jpg"))
