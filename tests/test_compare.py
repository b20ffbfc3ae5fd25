"""The compare command: baselines against hand-computed values, and a tiny end-to-end run on generated data."""

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from anomalib_tts.metrics import f1_score
from anomalib_tts.calibration import DEFAULT_CANDIDATES
from anomalib_tts.tools.compare import (
    BASELINES,
    COLUMNS,
    EXTRA_COLUMNS,
    FALLBACK_ROW,
    MEBIN_ROW,
    CompareConfig,
    DatasetSpec,
    ModelSpec,
    RecordedRun,
    RefinementSpec,
    refine_recorded,
    run_model,
)
from anomalib_tts.tools.evaluation import NominalPixelStats, oracle_threshold, segmentation_scores
from tests.conftest import CONFIGS

PADIM = {"backbone": "resnet18", "layers": ["layer1", "layer2", "layer3"], "pre_trained": False}


def test_oracle_threshold_is_the_best_cut_between_distinct_scores() -> None:
    scores = torch.tensor([0.9, 0.9, 0.5, 0.1])
    truth = torch.tensor([True, False, True, False])
    # cuts: top 2 (the tie goes together): F1 2*1/(2+2) = 0.5; top 3: 2*2/(3+2) = 0.8; all 4: 2*2/(4+2) = 0.667
    threshold = oracle_threshold(scores, truth)
    assert torch.equal(scores > threshold, torch.tensor([True, True, True, False]))
    assert torch.isclose(f1_score(scores > threshold, truth), torch.tensor(0.8))


def test_oracle_threshold_edge_cases() -> None:
    scores = torch.tensor([[0.2, 0.4], [0.6, 0.8]])
    assert oracle_threshold(scores, torch.zeros(2, 2, dtype=torch.bool)) == float("inf")  # nothing to find
    everything = oracle_threshold(scores, torch.ones(2, 2, dtype=torch.bool))
    assert bool((scores > everything).all())
    assert oracle_threshold(scores, torch.tensor([[False, False], [False, True]])) == pytest.approx(0.6)


def test_nominal_pixel_stats_over_batches() -> None:
    stats = NominalPixelStats()
    for values in ([1.0, 3.0], [2.0, 6.0]):  # one validation image of 1 x 2 pixels per batch
        batch = SimpleNamespace(image=torch.zeros(1, 3, 1, 2), anomaly_map=torch.tensor([[values]]))
        stats.on_validation_batch_end(None, None, batch)  # type: ignore[arg-type]
    # pixels 1, 3, 2, 6: mean 3, variance (4 + 0 + 1 + 9) / 4 = 3.5, maximum 6
    assert stats.mean == pytest.approx(3.0)
    assert stats.std == pytest.approx(3.5**0.5)
    assert stats.maximum == pytest.approx(6.0)
    assert sorted(stats.pixels.tolist()) == [1.0, 2.0, 3.0, 6.0]  # kept for the SuperADD percentile


def _run_with(nominal: NominalPixelStats, maps: torch.Tensor, gt: torch.Tensor) -> RecordedRun:
    # anomalib's normalization: (raw - threshold) / (max - min) + 0.5, with threshold 2, min 0, max 4
    post_processor = SimpleNamespace(
        pixel_threshold=torch.tensor(2.0),
        pixel_min=torch.tensor(0.0),
        pixel_max=torch.tensor(4.0),
        normalized_pixel_threshold=torch.tensor(0.5),
    )
    recorder = SimpleNamespace(score_maps=[maps], records=SimpleNamespace(stacked=lambda name: gt))
    return RecordedRun(recorder, nominal, post_processor, model_seconds_per_image=0.0)  # type: ignore[arg-type]


def test_baseline_thresholds_against_hand_computed_values() -> None:
    nominal = NominalPixelStats()
    nominal.total, nominal.total_squares, nominal.count = 4.0, 5.0, 4  # mean 1, std 0.5
    nominal.maximum = 3.0
    nominal.batches = [torch.arange(1, 201, dtype=torch.float32) / 100]  # 0.01..2: 95th percentile 1.9
    maps = torch.tensor([[[0.1, 0.7], [0.8, 0.9]]])
    gt = torch.tensor([[[False, False], [True, True]]])
    run = _run_with(nominal, maps, gt)
    thresholds = {name: threshold_of(run) for name, threshold_of in BASELINES.items()}
    assert thresholds["anomalib threshold"] == pytest.approx(0.5)
    assert thresholds["mean + 3 std of nominal val. pixels"] == pytest.approx((2.5 - 2) / 4 + 0.5)
    assert thresholds["max of nominal val. pixels"] == pytest.approx((3.0 - 2) / 4 + 0.5)
    assert thresholds["SuperADD (p95 x 1.421 of nominal val. pixels)"] == pytest.approx((1.9 * 1.421 - 2) / 4 + 0.5)
    assert thresholds["oracle (best pooled F1 on test)"] == pytest.approx(0.7)  # exactly the two defect pixels


def test_image_f1_from_masks_counts_non_empty_masks() -> None:
    pred = torch.tensor([[[1, 0]], [[0, 0]], [[0, 1]], [[0, 0]]], dtype=torch.bool)
    gt = torch.tensor([[[1, 0]], [[1, 0]], [[0, 0]], [[0, 0]]], dtype=torch.bool)
    labels = gt.flatten(1).any(dim=1)
    # mask says defective for images 0 and 2; truth: 0 and 1 -> tp 1, predicted 2, actual 2 -> F1 0.5
    scores = segmentation_scores(pred, gt, labels, labels)
    assert scores["image_f1_mask"] == pytest.approx(0.5)
    assert scores["false_alarm_rate"] == pytest.approx(0.5)  # of the defect-free images 2 and 3, image 2 has a mask


def test_config_rejects_bad_arguments_by_name() -> None:
    models, datasets = [ModelSpec("padim", "Padim")], [DatasetSpec("root", "texture")]
    with pytest.raises(ValueError, match="panels"):
        CompareConfig(models=models, datasets=datasets, panels=-1)
    with pytest.raises(ValueError, match="refinements must have distinct names"):
        CompareConfig(models=models, datasets=datasets, refinements=[RefinementSpec(), RefinementSpec()])
    with pytest.raises(ValueError, match="unknown models"):
        CompareConfig(models=models, datasets=[DatasetSpec("root", "texture", checkpoints={"patchcore": "x"})])
    with pytest.raises(ValueError, match="refinement 'bad'"):
        RefinementSpec("bad", {"pseudo_labels": "no such recipe"}).build()


def test_a_refinement_setting_builds_the_adapter_the_callback_runs() -> None:
    from anomalib_tts.adapter import BatchRefiner

    spec = RefinementSpec("svm", {"classifier": "svm", "gate": "pred_label", "max_positives": 50, "stages": "test"})
    refiner = spec.build()  # the callback's stages do not concern recorded maps
    assert isinstance(refiner, BatchRefiner)
    assert (type(refiner.pipeline.classifier).__name__, refiner.pipeline.max_positives) == ("LinearSVM", 50)
    assert refiner.gate == "pred_label"


def test_shipped_config_parses_with_overrides() -> None:
    from anomalib_tts.tools.compare import parse_config

    config = parse_config(["--config", str(CONFIGS / "compare.yaml"), "--panels", "2"])
    assert config.panels == 2
    categories = ["metal_plate", "magnetic_tile", "cookie"]
    assert [dataset.name for dataset in config.datasets] == [
        f"{c}{kind}" for c in categories for kind in ("", "_mixed")
    ]
    at_512 = parse_config(["--config", str(CONFIGS / "compare_pcb512.yaml")])
    assert (at_512.image_size, [dataset.name for dataset in at_512.datasets]) == (512, ["pcb", "pcb_mixed"])
    for shipped in (config, at_512):
        assert all(set(dataset.checkpoints) == {"patchcore"} for dataset in shipped.datasets)
        assert shipped.refinements[0].name == "default" and shipped.refinements[0].calibrated
        assert [refinement.calibrated for refinement in shipped.refinements[1:]] == [False] * 3
        for refinement in shipped.refinements:
            refinement.build()  # a ValueError naming the setting if its args do not fit the callback


@pytest.fixture(scope="module")
def compared(synthetic_root: Path, padim_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``anomalib-tts compare`` on the generated dataset: one entry loads a checkpoint, the other fits."""
    from anomalib_tts.tools.cli import main

    output = tmp_path_factory.mktemp("compare")
    config = output / "compare.yaml"
    config.write_text(
        f"""
output: {output}
image_size: 256
batch_size: 8
panels: 3
models:
  - name: padim
    model: Padim
    args: {PADIM}
datasets:
  - {{root: {synthetic_root}, category: texture, name: loaded, checkpoints: {{padim: {padim_checkpoint}}}}}
  - {{root: {synthetic_root}, category: texture, name: fitted}}
refinements:
  - {{name: model features, args: {{features: model, calibration_images: 8}}}}
  - {{name: as configured, args: {{features: model, calibrate: false}}}}
"""
    )
    main(["compare", "--config", str(config)])
    return output


@pytest.mark.slow
def test_compare_writes_every_row_and_column(compared: Path) -> None:
    with (compared / "results.csv").open() as file:
        reader = csv.DictReader(file)
        rows = list(reader)
    assert reader.fieldnames == [*COLUMNS, *EXTRA_COLUMNS]
    candidates = [f"candidate: {candidate.name}" for candidate in DEFAULT_CANDIDATES]
    expected = [
        *BASELINES,
        MEBIN_ROW,
        FALLBACK_ROW,
        *candidates,
        "calibrated: model features",
        "refined: as configured",
    ]
    found = [(row["dataset"], row["masks"].removesuffix(" (chosen)").split(" (chose ")[0]) for row in rows]
    assert found == [(name, masks) for name in ("loaded", "fitted") for masks in expected]
    markdown = (compared / "results.md").read_text()
    assert all(f"| {row['dataset']} | {row['masks']} |" in markdown for row in rows)
    assert (compared / "checkpoints" / "fitted" / "padim.ckpt").exists()  # fitted once, saved for the next run

    for dataset in ("loaded", "fitted"):
        by_masks = {row["masks"]: row for row in rows if row["dataset"] == dataset}
        realistic = [masks for masks in BASELINES if not masks.startswith("oracle")]  # MEBin is not one threshold
        oracle = float(by_masks["oracle (best pooled F1 on test)"]["pixel_f1_all"])
        assert all(float(by_masks[masks]["pixel_f1_all"]) <= oracle + 1e-6 for masks in realistic)
        # a nominal-only validation split: anomalib's F1-adaptive threshold is the highest nominal pixel score
        assert by_masks["anomalib threshold"]["pixel_f1_all"] == by_masks["max of nominal val. pixels"]["pixel_f1_all"]
        assert 0 < int(by_masks["refined: as configured"]["images_refined"]) <= 15
        assert 0 <= float(by_masks[MEBIN_ROW]["false_alarm_rate"]) <= 1
        (calibrated,) = [row for masks, row in by_masks.items() if masks.startswith("calibrated: model features")]
        chosen = [masks for masks in by_masks if masks.endswith(" (chosen)")]
        assert chosen == [f"candidate: {calibrated['masks'].split('(chose ', 1)[1][:-1]} (chosen)"]
        # the chosen candidate's masks on the test images are the calibrated setting's
        assert by_masks[chosen[0]]["mean_f1_defective"] == calibrated["mean_f1_defective"]
        assert -1 <= float(calibrated["rank_correlation"]) <= 1 and float(calibrated["calibration_seconds"]) > 0
        assert all(row["synthetic_mean_f1"] for masks, row in by_masks.items() if masks.startswith("candidate: "))


@pytest.mark.slow
def test_compare_writes_panels(compared: Path) -> None:
    for dataset in ("loaded", "fitted"):
        panels = sorted((compared / "panels" / dataset / "padim").glob("*.png"))
        assert len(panels) == 3
        assert {panel.name.split("_")[1] for panel in panels} == {"defect", "good"}  # spread over the test set


@pytest.mark.slow
def test_refinement_of_recorded_maps_equals_the_callback_in_the_test_loop(
    synthetic_root: Path, padim_checkpoint: Path, tmp_path: Path
) -> None:
    from anomalib.engine import Engine

    from anomalib_tts.lightning.callback import TestTimeSegmentation
    from anomalib_tts.tools.compare import make_datamodule
    from anomalib_tts.tools.evaluation import MaskRecorder

    dataset = DatasetSpec(str(synthetic_root), "texture", checkpoints={"padim": str(padim_checkpoint)})
    model_spec = ModelSpec("padim", "Padim", PADIM)
    config = CompareConfig(models=[model_spec], datasets=[dataset], output=str(tmp_path), batch_size=4)
    refinement = RefinementSpec("model features", {"features": "model", "calibrate": False})
    model, run = run_model(config, model_spec, dataset)
    offline, _ = refine_recorded(refinement.build(), model, run, config.batch_size)

    recorder = MaskRecorder()
    callback = TestTimeSegmentation.from_init_args(refinement.args)  # the callback of the same setting
    engine = Engine(callbacks=[callback, recorder], default_root_dir=tmp_path, logger=False)
    engine.test(model_spec.build(256), datamodule=make_datamodule(config, dataset), ckpt_path=padim_checkpoint)
    in_loop = recorder.records.stacked("pred_masks")
    assert not torch.equal(in_loop, run.recorder.records.stacked("pred_masks"))  # refinement changed masks
    assert torch.equal(offline, in_loop)
