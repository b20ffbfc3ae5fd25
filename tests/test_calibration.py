"""The calibration: synthetic defects with exact masks, held-out scoring, the choice, and where it is kept."""

import math

import pytest
import torch
import torch.nn.functional as F

from anomalib_tts.calibration import (
    DEFAULT_CANDIDATES,
    Calibration,
    Candidate,
    Normalization,
    Objective,
    SyntheticDefects,
    TooFewImagesError,
    build_pipeline,
    calibrate,
)
from anomalib_tts.calibration.calibrate import _choose, _held_out_normalizations
from anomalib_tts.calibration.candidates import GLOBAL, PER_IMAGE, REFINEMENT
from anomalib_tts.pipeline import FixedThreshold, ImageFeatures, RefinementPipeline, StableThreshold, StackedFeatures


def good_images(count: int = 4, size: int = 48, seed: int = 0) -> torch.Tensor:
    """Smooth random textures, normalized like a pre-processor leaves them."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, size // 8, size // 8, generator=generator)
    images = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    images = images + 0.05 * torch.rand(count, 3, size, size, generator=generator)
    return (images - 0.45) / 0.25


class BlurredDeviation:
    """A stand-in model: how far each pixel is from its image's smooth version, blurred into a blob."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        smooth = F.avg_pool2d(images, 9, stride=1, padding=4, count_include_pad=False)
        deviation = (images - smooth).abs().mean(dim=1, keepdim=True)
        return F.avg_pool2d(deviation, 7, stride=1, padding=3, count_include_pad=False)[:, 0]


def normalization_of(maps: torch.Tensor) -> Normalization:
    """anomalib's statistics with good images only: the threshold is the highest pixel."""
    return Normalization(float(maps.max()), float(maps.min()), float(maps.max()))


# --- the synthetic defects


def test_defect_masks_are_exactly_the_changed_pixels() -> None:
    images = good_images()
    made = SyntheticDefects(per_image=5)(images, seed=3)
    original = images[made.sources]
    change = (made.images - original).abs() / original.flatten(2).std(dim=2)[..., None, None]
    assert torch.equal(made.masks, change.amax(dim=1) >= 0.5)
    assert torch.equal((made.images != original).any(dim=1), made.masks)
    assert bool(made.masks.flatten(1).any(dim=1).all())  # every defective image has a defect
    assert made.sources.tolist() == [index for index in range(4) for _ in range(5)]


def test_defects_are_deterministic_under_a_seed_and_vary_with_it() -> None:
    images = good_images()
    first, again, other = (SyntheticDefects(per_image=3)(images, seed=seed) for seed in (7, 7, 8))
    assert torch.equal(first.images, again.images) and torch.equal(first.masks, again.masks)
    assert not torch.equal(first.masks, other.masks)


def test_defects_span_small_and_large_areas() -> None:
    made = SyntheticDefects(per_image=20, min_area=0.0005, max_area=0.05)(good_images(size=128), seed=0)
    areas = made.masks.flatten(1).float().mean(dim=1)
    assert float(areas.min()) < 0.003 and float(areas.max()) > 0.02


def test_defect_options_are_checked() -> None:
    with pytest.raises(ValueError, match="areas"):
        SyntheticDefects(min_area=0.1, max_area=0.01)
    with pytest.raises(ValueError, match="per_image"):
        SyntheticDefects(per_image=0)


# --- held-out scoring


def test_each_good_image_is_normalized_by_the_others() -> None:
    maps = torch.stack([torch.full((4, 4), value) for value in (1.0, 2.0, 5.0)])
    maps[:, 0, 0] = 0.0
    held_out = _held_out_normalizations(maps, normalization_of(maps))
    assert [normalizer.threshold for normalizer in held_out] == [5.0, 5.0, 2.0]
    assert float(held_out[2](torch.tensor(5.0))) > 0.5  # the highest image is above the others' threshold
    assert float(held_out[0](torch.tensor(1.0))) < 0.5
    # statistics that are not those of good images alone are used as they are
    given = Normalization(3.0, 0.0, 5.0)
    assert _held_out_normalizations(maps, given) == [given] * 3


def test_anomalib_threshold_raises_a_false_alarm_on_the_image_with_the_highest_score() -> None:
    """Held out, the good image that set anomalib's threshold is above the others': one false alarm in four."""
    images = good_images()
    maps = BlurredDeviation()(images)
    candidates = [Candidate("anomalib's threshold", GLOBAL, {"refine": False, "fallback": ["threshold", {}]}, "max")]
    calibration = calibrate(
        RefinementPipeline(features=ImageFeatures()), images, maps, BlurredDeviation(), normalization_of(maps),
        candidates=candidates, defects=SyntheticDefects(per_image=2),
    )  # fmt: skip
    assert calibration.scores["anomalib's threshold"]["false_alarm_rate"] == pytest.approx(0.25)


# --- the choice


def test_the_best_candidate_within_the_bounds_is_chosen() -> None:
    candidates = [
        Candidate("anomalib", GLOBAL, statistic="max"),
        Candidate("loud", REFINEMENT),
        Candidate("good", REFINEMENT),
        Candidate("coarse", PER_IMAGE),
    ]
    scores = {
        "anomalib": {"mean_f1": 0.30, "pooled_f1": 0.50, "false_alarm_rate": 0.10},
        "loud": {"mean_f1": 0.90, "pooled_f1": 0.60, "false_alarm_rate": 0.60},  # flags most good images
        "good": {"mean_f1": 0.60, "pooled_f1": 0.55, "false_alarm_rate": 0.20},
        "coarse": {"mean_f1": 0.70, "pooled_f1": 0.40, "false_alarm_rate": 0.00},  # pooled F1 far below anomalib's
    }
    assert _choose(scores, candidates, Objective(pooled_tolerance=0.01)) == "good"
    assert [scores[name]["eligible"] for name in ("anomalib", "loud", "good", "coarse")] == [1.0, 0.0, 1.0, 0.0]
    assert _choose(scores, candidates, Objective()) == "coarse"  # pooled F1 unbounded by default
    assert _choose(scores, candidates, Objective(false_alarm_cap=0.7)) == "loud"
    scores["anomalib"]["false_alarm_rate"] = 0.65  # as many alarms as anomalib's threshold raises are allowed
    assert _choose(scores, candidates, Objective()) == "loud"


def test_a_threshold_replaces_the_best_refinement_only_when_clearly_better() -> None:
    candidates = [Candidate("anomalib", GLOBAL, statistic="max"), Candidate("refined", REFINEMENT)]
    refined = torch.tensor([0.2, 0.8, 0.3, 0.7, 0.4, 0.6, 0.5, 0.5])

    def choose(threshold: torch.Tensor, margin: float = 2.0) -> str:
        per_image = {"anomalib": threshold, "refined": refined}
        scores = {
            name: {"mean_f1": float(f1.mean()), "pooled_f1": 0.5, "false_alarm_rate": 0.0}
            for name, f1 in per_image.items()
        }
        return _choose(scores, candidates, Objective(switch_margin=margin), per_image)

    noisy = refined + torch.tensor([0.3, -0.2, 0.3, -0.2, 0.3, -0.2, 0.0, 0.0])  # +0.0375 on average, by chance
    assert choose(noisy) == "refined"
    assert choose(noisy, margin=0.0) == "anomalib"
    assert choose(refined + 0.05) == "anomalib"  # better on every image
    assert choose(refined - 0.05) == "refined"


def test_calibration_chooses_the_best_eligible_candidate_of_its_own_scores() -> None:
    """Every default candidate is scored on the same synthetic defects; the choice is the best one in bounds."""
    images = good_images(count=4, size=48)
    maps = BlurredDeviation()(images)
    calibration = calibrate(
        RefinementPipeline(features=ImageFeatures(windows=(3,))), images, maps, BlurredDeviation(),
        normalization_of(maps), defects=SyntheticDefects(per_image=2), seed=1, objective=Objective(switch_margin=0.0),
    )  # fmt: skip
    assert set(calibration.scores) == {candidate.name for candidate in DEFAULT_CANDIDATES}
    eligible = {name: row for name, row in calibration.scores.items() if row["eligible"]}
    assert calibration.choice == max(eligible, key=lambda name: eligible[name]["mean_f1"])
    assert calibration.good_images == 4 and calibration.synthetic_images == 8
    assert calibration.summary().splitlines()[0].endswith(f"chose {calibration.choice!r}")


def test_too_few_good_images_is_a_clear_error() -> None:
    images = good_images(count=2)
    maps = BlurredDeviation()(images)
    with pytest.raises(TooFewImagesError, match="at least 3 good validation images, got 2"):
        calibrate(
            RefinementPipeline(features=ImageFeatures()), images, maps, BlurredDeviation(), normalization_of(maps)
        )


# --- the saved choice


def test_a_calibration_survives_plain_data_and_rebuilds_its_pipeline() -> None:
    calibration = Calibration(
        "mean + 3 std of nominal pixels", {"refine": False, "fallback": ["fixed", {"threshold": 0.42}]}, {}, 4, 32, 1.0
    )
    restored = Calibration.from_dict(calibration.to_dict())
    assert restored == calibration
    pipeline = build_pipeline(RefinementPipeline(features=ImageFeatures()), restored.overrides)
    assert not pipeline.refine and isinstance(pipeline.fallback, FixedThreshold) and pipeline.fallback.threshold == 0.42


def test_build_pipeline_stacks_image_features_and_keeps_the_configured_objects() -> None:
    base = RefinementPipeline(features=ImageFeatures(windows=(3,)), classifier="svm")
    pipeline = build_pipeline(base, {"image_features": 0.5, "fallback": ["stable", {"floor": 0.3}]})
    assert isinstance(pipeline.features, StackedFeatures) and pipeline.features.sources[0] is base.features
    assert pipeline.features.weights == [1.0, 0.5] and pipeline.classifier is base.classifier
    assert isinstance(pipeline.fallback, StableThreshold) and pipeline.fallback.floor == 0.3
    with pytest.raises(ValueError, match="unknown overrides"):
        build_pipeline(base, {"classifier": ["svm", {}]})


def test_callback_state_keeps_the_choice() -> None:
    from anomalib_tts import TestTimeSegmentation

    callback = TestTimeSegmentation(features=ImageFeatures())
    calibration = Calibration("fixed", {"refine": False, "fallback": ["fixed", {"threshold": 0.3}]}, {}, 4, 8, 0.1)
    callback.use_calibration(calibration)
    restored = TestTimeSegmentation(features=ImageFeatures())
    restored.load_state_dict(callback.state_dict())
    assert restored.calibration == calibration
    assert not restored.pipeline.refine and math.isclose(restored.pipeline.fallback.threshold, 0.3)
    assert restored.configured.refine  # the configured pipeline is kept, to rebuild from


def test_a_gate_moved_to_a_threshold_equals_the_maps_shifted_to_it() -> None:
    """Calibration scores a gated refinement on maps shifted so that each image's gate sits at 0.5; the saved
    overrides move the gate instead: both give the same masks."""
    from anomalib_tts.calibration.candidates import CORE_ABOVE, gated_overrides
    from anomalib_tts.pipeline import Modalities, RefinementInputs

    images = good_images(count=3, size=32)
    maps = BlurredDeviation()(images)
    maps = (maps - maps.min()) / (maps.max() - maps.min())
    maps[0, 8:14, 8:14] += 0.8
    base = RefinementPipeline(features=ImageFeatures(windows=(3,)))
    seeds = torch.arange(3)
    for gate in (0.35, 0.5, 0.7):
        moved = build_pipeline(base, gated_overrides(CORE_ABOVE, gate))
        shifted = build_pipeline(base, CORE_ABOVE)
        direct = moved(RefinementInputs(Modalities(images), maps, maps > 0.5, seeds))
        via_shift = shifted(RefinementInputs(Modalities(images), maps - (gate - 0.5), maps - (gate - 0.5) > 0.5, seeds))
        assert torch.equal(direct.masks, via_shift.masks) and torch.equal(direct.outcome, via_shift.outcome)
        assert bool(direct.masks.any())


# --- through anomalib


@pytest.mark.slow
def test_anomalib_train_calibrates_and_anomalib_test_reuses_the_saved_choice(synthetic_root, tmp_path) -> None:
    """``anomalib train`` calibrates at the end of validation and saves the choice in the checkpoint; ``anomalib
    test`` from that checkpoint refines with the same choice, without calibrating again."""
    from tests.conftest import CONFIGS
    from tests.helpers import python_result, run_anomalib

    common = [
        "--config", str(CONFIGS / "padim.yaml"), "--model.init_args.pre_trained", "false",
        "--data.root", str(synthetic_root), "--data.category", "texture", "--data.num_workers", "0",
        "--default_root_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    output = run_anomalib("train", *common, "--trainer.max_epochs", "1", cwd=tmp_path)
    (checkpoint,) = (tmp_path / "run").rglob("*.ckpt")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["callbacks"]["TestTimeSegmentation"]
    calibration = Calibration.from_dict(saved["calibration"])
    assert calibration.choice in {candidate.name for candidate in DEFAULT_CANDIDATES}
    assert f"chose {calibration.choice!r}" in output
    code = f"""
from anomalib.cli.cli import AnomalibCLI
from anomalib_tts import TestTimeSegmentation
cli = AnomalibCLI(args={["test", *common, "--ckpt_path", str(checkpoint)]!r})
(callback,) = [c for c in cli.engine.trainer.callbacks if isinstance(c, TestTimeSegmentation)]
result = {{"choice": callback.calibration.choice, "overrides": callback.calibration.overrides,
          "refine": callback.pipeline.refine, "images": callback.stats.images}}
"""
    tested = python_result(code, cwd=tmp_path)
    assert (tested["choice"], tested["overrides"]) == (calibration.choice, calibration.overrides)
    assert tested["refine"] == calibration.overrides.get("refine", True) and tested["images"] == 15


@pytest.mark.slow
def test_a_checkpoint_without_calibration_is_calibrated_at_the_start_of_test(synthetic_root, tmp_path, caplog) -> None:
    """The callback added only at test time calibrates on the datamodule's validation images before the first
    batch, and says so."""
    import logging

    from anomalib.engine import Engine

    from anomalib_tts import TestTimeSegmentation
    from tests.conftest import make_datamodule, make_padim

    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    engine.fit(make_padim(), datamodule=make_datamodule(synthetic_root))  # no callback: no calibration saved
    checkpoint = tmp_path / "plain.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    callback = TestTimeSegmentation(features="model", calibration_images=8)
    tester = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, callbacks=[callback])
    with caplog.at_level(logging.INFO, logger="anomalib_tts"):
        tester.test(make_padim(), datamodule=make_datamodule(synthetic_root), ckpt_path=checkpoint)
    assert callback.calibration is not None and f"chose {callback.calibration.choice!r}" in caplog.text
    assert callback.stats.images == 15
