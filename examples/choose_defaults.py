"""Choose the self-check and the fallback mask by their worst case over the evaluation sets, and check it.

For every dataset of the given ``anomalib-tts compare`` configs, the model is tested once (its checkpoint
loaded as ``compare`` does), every image is refined once with the configs' first refinement and no self-check,
and each candidate setting is scored on that same fit: a self-check and a fallback act after the fit, so a
candidate's masks are exactly those the callback would write with it. The realistic baselines are the rows a
user would pick instead (anomalib's threshold, mean + 3 std and max of the nominal validation pixels, SuperADD,
MEBin); the oracle threshold is the ceiling. A candidate's margin on a set is its mean per-image F1 over the
defective images minus the best realistic baseline's; a candidate whose pooled pixel F1 falls more than 0.01
below anomalib's threshold on a set does not qualify there. The default is the candidate with the best worst
margin; the leave-one-set-out check chooses on all sets but one and scores the choice on the one left out.
Nor does a candidate qualify on a set where it raises more false alarms (defect-free images with a non-empty
mask) than the most alarming realistic baseline: mean F1 over defective images cannot see false alarms, and a
low fallback floor buys a few hundredths of it with a mask on nearly every good image.

    HF_HUB_CACHE=../shared/weights/hf-hub HF_HUB_OFFLINE=1 python examples/choose_defaults.py \\
        configs/compare.yaml configs/compare_pcb512.yaml --sets metal_plate metal_plate_mixed magnetic_tile \\
        magnetic_tile_mixed pcb@512 pcb_mixed@512

Per-set results are kept in ``--output`` (a set already there is not measured again).
"""

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from anomalib_tts.pipeline.fallbacks import StableThreshold
from anomalib_tts.pipeline.refinement import Outcome
from anomalib_tts.tools.compare import (
    BASELINES,
    MEBIN_ROW,
    RefinementSpec,
    mebin_recorded,
    parse_config,
    recorded_batches,
    run_model,
)

REALISTIC = (
    "anomalib threshold",
    "mean + 3 std of nominal val. pixels",
    "max of nominal val. pixels",
    "SuperADD (p95 x 1.421 of nominal val. pixels)",
    MEBIN_ROW,
)
GROWTHS = (None, 2.0, 3.0, 4.0, 5.0, 6.0)  # None: no self-check
FLOORS = (None, 0.25, 0.3, 0.35, 0.4, 0.5)  # None: anomalib's mask; else StableThreshold(floor)
POOLED_TOLERANCE = 0.01


def candidate_name(growth: float | None, floor: float | None) -> str:
    check = "no self-check" if growth is None else f"growth <= {growth:g}"
    fallback = "anomalib's mask" if floor is None else f"stable threshold from {floor:g}"
    return f"{check}, else {fallback}"


def measure(config, dataset) -> dict[str, dict[str, float]]:
    """Scores of every baseline and candidate on one dataset: name -> compare's metrics."""
    model_spec = config.models[0]
    model, run = run_model(config, model_spec, dataset)
    records, maps = run.recorder.records, run.score_maps
    scores = {name: records.scores(maps > threshold_of(run)) for name, threshold_of in BASELINES.items()}
    scores[MEBIN_ROW] = records.scores(mebin_recorded(run, config.batch_size))

    spec = config.refinements[0]
    refiner = RefinementSpec(spec.name, {**spec.args, "self_check": "none", "fallback": "threshold"}).build()
    device = next(model.parameters(), torch.empty(0)).device
    model.eval()
    refiner.bind(model)
    refined, decisions, growth_ratio = [], [], []
    for batch in recorded_batches(run, config.batch_size, device):
        score_maps = batch.anomaly_map.reshape(-1, *batch.anomaly_map.shape[-2:]).float()
        labels = refiner.pipeline.pseudo_labels(score_maps, refiner.nominal_threshold)
        result = refiner.refine_batch(batch)
        refined.append(result.outcome.cpu() == Outcome.REFINED)
        decisions.append((result.decision > 0).cpu())
        mask_area = (result.decision > 0).flatten(1).sum(dim=1).float()
        growth_ratio.append((mask_area / labels.positive.flatten(1).sum(dim=1).clamp(min=1)).cpu())
    refiner.release()
    refined, decisions, growth_ratio = torch.cat(refined), torch.cat(decisions), torch.cat(growth_ratio)

    anomalib_masks = records.stacked("pred_masks").reshape(maps.shape).bool()
    fallbacks = {None: anomalib_masks}
    for floor in FLOORS[1:]:
        fallbacks[floor] = torch.cat(
            [StableThreshold(floor=floor)(maps[first : first + 16], None, 0.5) for first in range(0, len(maps), 16)]
        )
    for growth in GROWTHS:
        supported = refined if growth is None else refined & (growth_ratio <= growth)
        for floor, fallback in fallbacks.items():
            masks = torch.where(supported[:, None, None], decisions, fallback)
            scores[candidate_name(growth, floor)] = records.scores(masks)
    return scores


def margins(results: dict[str, dict], candidate: str) -> dict[str, float]:
    """Per set: the candidate's mean F1 minus the best realistic baseline's; ``-inf`` if its pooled F1 fails."""
    out = {}
    for name, scores in results.items():
        best = max(scores[baseline]["mean_f1_defective"] for baseline in REALISTIC)
        pooled_floor = scores["anomalib threshold"]["pixel_f1_all"] - POOLED_TOLERANCE
        alarm_cap = max(scores[baseline]["false_alarm_rate"] for baseline in REALISTIC)
        row = scores[candidate]
        qualifies = row["pixel_f1_all"] >= pooled_floor and not row["false_alarm_rate"] > alarm_cap + 1e-9
        out[name] = row["mean_f1_defective"] - best if qualifies else -math.inf
    return out


def report(results: dict[str, dict]) -> None:
    candidates = [candidate_name(growth, floor) for growth in GROWTHS for floor in FLOORS]
    sets = list(results)
    print("mean F1 (defective) / pixel F1 (all) / false alarms; (fails): pooled F1 or false alarms out of bounds\n")
    print("| candidate | worst margin | " + " | ".join(sets) + " |")
    print("|---|---|" + "---|" * len(sets))
    ranked = sorted(candidates, key=lambda candidate: -min(margins(results, candidate).values()))
    for candidate in ranked:
        margin = margins(results, candidate)
        cells = [
            "{mean_f1_defective:.3f} / {pixel_f1_all:.3f} / {false_alarm_rate:.2f}".format(**results[s][candidate])
            + (" (fails)" if margin[s] == -math.inf else "")
            for s in sets
        ]
        print(f"| {candidate} | {min(margin.values()):+.3f} | " + " | ".join(cells) + " |")
    best = {s: max(REALISTIC, key=lambda b: results[s][b]["mean_f1_defective"]) for s in sets}
    print(
        "\nbest realistic baseline: "
        + ", ".join(f"{s}: {best[s]} {results[s][best[s]]['mean_f1_defective']:.3f}" for s in sets)
    )
    if len(sets) < 2:
        print("\nleave one set out: needs at least two sets")
        return
    print("\nleave one set out (chosen on the others, margin on the one left out):")
    for left_out in sets:
        rest = {s: results[s] for s in sets if s != left_out}
        chosen = max(candidates, key=lambda candidate: min(margins(rest, candidate).values()))
        print(f"  {left_out}: {chosen}: {margins(results, chosen)[left_out]:+.3f}")


DEFAULT = candidate_name(4.0, 0.4)  # the callback's defaults: BoundedGrowth(4.0), StableThreshold(floor=0.4)
FORMER_DEFAULT = candidate_name(None, None)
TABLE_ROWS = (*REALISTIC, "oracle (best pooled F1 on test)", FORMER_DEFAULT, DEFAULT)


def baseline_table(results: dict[str, dict]) -> None:
    """Each set's baselines, the former default and the default: mean F1 (defective) / pixel F1 (all) / alarms."""
    print("\n| masks | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for row in TABLE_ROWS:
        cells = [
            "{mean_f1_defective:.3f} / {pixel_f1_all:.3f} / {false_alarm_rate:.2f}".format(**results[s][row])
            for s in results
        ]
        label = {FORMER_DEFAULT: "former default (no self-check, anomalib's mask)", DEFAULT: f"**default** ({DEFAULT})"}
        print(f"| {label.get(row, row)} | " + " | ".join(cells) + " |")
    margin = margins(results, DEFAULT)
    print(
        "| default's margin over the best realistic baseline | "
        + " | ".join(f"{margin[s]:+.3f}" for s in results)
        + " |"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help="anomalib-tts compare configs")
    parser.add_argument("--sets", nargs="*", help="dataset names to use (NAME@SIZE for a config's image size)")
    parser.add_argument("--output", default="results/choose_defaults")
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for config_file in args.configs:
        config = parse_config(["--config", config_file])
        for dataset in config.datasets:
            name = dataset.name if config.image_size == 256 else f"{dataset.name}@{config.image_size}"
            if args.sets and name not in args.sets:
                continue
            path = output / f"{name}.json"
            if not path.exists():
                print(f"measuring {name} ...", flush=True)
                path.write_text(json.dumps(measure(config, dataset), indent=1))
            results[name] = json.loads(path.read_text())
    report(results)
    baseline_table(results)


if __name__ == "__main__":
    main()
