#!/usr/bin/env python
"""How well does a calibration on good images choose? Every candidate on the real test set, against each variant.

For every dataset of the given ``anomalib-tts compare`` configs (``--sets``; ``NAME@SIZE`` picks a dataset of a
config whose ``image_size`` is SIZE), the model is tested once (its checkpoint loaded as ``compare`` loads it) and
the recorded run is cached under ``--output``. Every default candidate of the calibration is scored on the real
test images once (cached too: it does not depend on the calibration). Then each calibration variant (the
synthetic defects and the objective it is run with, :data:`VARIANTS`) calibrates on the nominal validation images
alone, and the script prints, per set and variant, the chosen candidate, its real mean F1 over the defective images
and false alarms, the best realistic baseline's, and the rank correlation (Spearman) of the candidates' synthetic
mean F1 with their real one. The calibration never reads a test label, so every set is a held-out set for it.

    HF_HUB_CACHE=../shared/weights/hf-hub HF_HUB_OFFLINE=1 python examples/calibration_study.py \\
        configs/compare.yaml configs/compare_pcb512.yaml --sets metal_plate cookie pcb@512
"""

import argparse
import json
from pathlib import Path

import torch

from anomalib_tts.calibration import DEFAULT_CANDIDATES, GoodVariations, Objective, SyntheticDefects
from anomalib_tts.tools.compare import (
    BASELINES,
    MEBIN_ROW,
    RecordedRun,
    calibrate_recorded,
    candidate_rows,
    mebin_recorded,
    parse_config,
    run_model,
    spearman,
)

REALISTIC = (
    "anomalib threshold",
    "mean + 3 std of nominal val. pixels",
    "SuperADD (p95 x 1.421 of nominal val. pixels)",
)
VARIANTS: dict[str, dict] = {
    "default": {},
    "pooled bound": {"objective": {"pooled_tolerance": 0.01}},
    "small defects": {"defects": {"max_area": 0.02}},
    "large defects": {"defects": {"min_area": 0.002, "max_area": 0.3}},
    "subtle defects": {"defects": {"strength": (0.7, 2.0), "feather": 3.0}},
    "with variations": {"variations": {"per_image": 2}},  # false alarms counted on varied copies too
}


def select(configs: list[str], names: list[str]) -> list[tuple]:
    """``(config, dataset)`` pairs for ``NAME`` or ``NAME@SIZE``."""
    parsed = [parse_config(["--config", path]) for path in configs]
    chosen = []
    for name in names:
        base, _, size = name.partition("@")
        matches = [
            (config, dataset)
            for config in parsed
            for dataset in config.datasets
            if dataset.name == base and (not size or config.image_size == int(size))
        ]
        if not matches:
            raise SystemExit(f"no dataset {name!r} in {configs}")
        chosen.append(matches[0])
    return chosen


def recorded_run(config, model_spec, dataset, folder: Path) -> tuple:
    """The model and its recorded test run, from ``folder/run.pt`` when an earlier call saved it there."""
    from anomalib_tts.tools.compare import checkpoint_path

    path = folder / "run.pt"
    if not path.exists():
        model, run = run_model(config, model_spec, dataset)
        torch.save(run, path)
        return model, run
    model = model_spec.build(config.image_size)
    state = torch.load(checkpoint_path(config, model_spec, dataset), map_location="cpu", weights_only=False)
    model.load_state_dict(state["state_dict"])
    return model.eval(), torch.load(path, weights_only=False)


def baseline_scores(run: RecordedRun, batch_size: int) -> dict[str, dict[str, float]]:
    records, maps = run.recorder.records, run.score_maps
    scores = {name: records.scores(maps > threshold_of(run)) for name, threshold_of in BASELINES.items()}
    scores[MEBIN_ROW] = records.scores(mebin_recorded(run, batch_size))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--sets", nargs="+", required=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--output", type=Path, default=Path("results/calibration_study"))
    arguments = parser.parse_args()
    summary = {}
    for config, dataset in select(arguments.configs, arguments.sets):
        key = f"{dataset.name}@{config.image_size}"
        folder = arguments.output / key
        folder.mkdir(parents=True, exist_ok=True)
        model_spec = config.models[0]
        model, run = recorded_run(config, model_spec, dataset, folder)
        spec = config.refinements[0]
        real_path = folder / "real.json"
        names = {candidate.name for candidate in DEFAULT_CANDIDATES}
        real = json.loads(real_path.read_text()) if real_path.exists() else {"candidates": {}}
        if not names <= set(real["candidates"]):
            calibration = calibrate_recorded(spec.build(), model, run, config)
            rows, _ = candidate_rows(spec.build(), calibration, model, run, config)
            real = {
                "candidates": {row["masks"].removeprefix("candidate: ").removesuffix(" (chosen)"): row for row in rows},
                "baselines": baseline_scores(run, config.batch_size),
            }
            real_path.write_text(json.dumps(real, indent=1))
        best_name = max(REALISTIC + (MEBIN_ROW,), key=lambda name: real["baselines"][name]["mean_f1_defective"])
        best = real["baselines"][best_name]
        fallback = real["candidates"]["stable threshold per image"]
        best_realistic = max(best["mean_f1_defective"], fallback["mean_f1_defective"])
        print(
            f"\n== {key}: best realistic baseline {best_realistic:.3f} ({best_name}: {best['mean_f1_defective']:.3f}, "
            f"fallback alone {fallback['mean_f1_defective']:.3f}); anomalib pooled "
            f"{real['baselines']['anomalib threshold']['pixel_f1_all']:.3f}"
        )
        for name in [candidate.name for candidate in DEFAULT_CANDIDATES]:
            row = real["candidates"][name]
            print(
                f"   real {row['mean_f1_defective']:.3f} / {row['pixel_f1_all']:.3f} / {row['false_alarm_rate']:.2f}  {name}"
            )
        summary[key] = {}
        for variant in arguments.variants:
            options = VARIANTS[variant]
            variant_path = folder / f"variant_{variant.replace(' ', '_')}.json"
            if variant_path.exists():
                result = json.loads(variant_path.read_text())
            else:
                extra = {}
                if "defects" in options:
                    per_image = min(8, max(1, -(-96 // len(torch.cat(run.nominal.maps)))))
                    extra["defects"] = SyntheticDefects(per_image=per_image, **options["defects"])
                if "objective" in options:
                    extra["objective"] = Objective(**options["objective"])
                if "variations" in options:
                    extra["variations"] = GoodVariations(**options["variations"])
                calibration = calibrate_recorded(spec.build(), model, run, config, **extra)
                names = [candidate.name for candidate in DEFAULT_CANDIDATES]
                synthetic = [calibration.scores[name]["mean_f1"] for name in names]
                actual = [real["candidates"][name]["mean_f1_defective"] for name in names]
                chosen = real["candidates"][calibration.choice]
                result = {
                    "choice": calibration.choice,
                    "mean_f1": chosen["mean_f1_defective"],
                    "pixel_f1_all": chosen["pixel_f1_all"],
                    "false_alarm_rate": chosen["false_alarm_rate"],
                    "spearman": spearman(synthetic, actual),
                    "seconds": calibration.seconds,
                    "synthetic": calibration.scores,
                }
                variant_path.write_text(json.dumps(result, indent=1))
            summary[key][variant] = result
            margin = result["mean_f1"] - best_realistic
            print(
                f"  [{variant}] chose {result['choice']!r}: real {result['mean_f1']:.3f} (margin {margin:+.3f}), "
                f"pooled {result['pixel_f1_all']:.3f}, false alarms {result['false_alarm_rate']:.2f}, "
                f"Spearman {result['spearman']:.2f}, {result['seconds']:.0f} s"
            )
        del model
        torch.cuda.empty_cache()
    (arguments.output / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
