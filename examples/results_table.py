#!/usr/bin/env python
"""The README's results table from the ``results.csv`` files of ``anomalib-tts compare`` runs.

Per evaluation set: the calibrated default (mean per-image F1 over defective images / ``pixel_F1Score`` pooled over
all images / false alarms on defect-free images), every realistic baseline (anomalib's threshold, mean + 3 std,
max of the nominal pixels, SuperADD, MEBin, the stable threshold per image alone), the oracle threshold as the
ceiling, the default's margin over the best realistic baseline, and the calibration's choice, time and rank
correlation. A last block checks the targets: margin >= -0.01 on every set and > 0 on at least five of eight,
pooled F1 at most 0.01 below anomalib's, false alarms at most 0.25 or the lowest baseline's.

    python examples/results_table.py results/compare/results.csv results/compare_pcb512/results.csv
"""

import argparse
import csv
import math
from collections import defaultdict

REALISTIC = (
    "anomalib threshold",
    "mean + 3 std of nominal val. pixels",
    "max of nominal val. pixels",
    "SuperADD (p95 x 1.421 of nominal val. pixels)",
    "MEBin (per-image threshold)",
    "stable threshold per image (the refinement's fallback alone)",
)
SHORT = {
    "anomalib threshold": "anomalib's threshold",
    "mean + 3 std of nominal val. pixels": "mean + 3 std",
    "max of nominal val. pixels": "max of nominal",
    "SuperADD (p95 x 1.421 of nominal val. pixels)": "SuperADD",
    "MEBin (per-image threshold)": "MEBin",
    "stable threshold per image (the refinement's fallback alone)": "fallback alone (stable threshold)",
    "oracle (best pooled F1 on test)": "oracle threshold (ceiling)",
}


def cell(row: dict) -> str:
    return f"{float(row['mean_f1_defective']):.3f} / {float(row['pixel_f1_all']):.3f} / {float(row['false_alarm_rate']):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results.csv files of anomalib-tts compare")
    arguments = parser.parse_args()
    sets: dict[str, dict[str, dict]] = defaultdict(dict)
    for path in arguments.results:
        with open(path, newline="") as file:
            for row in csv.DictReader(file):
                masks = row["masks"].removesuffix(" (chosen)")
                sets[row["dataset"]][masks] = row
    for rows in sets.values():  # runs before the fallback had a row of its own: its candidate row is the same masks
        if "candidate: stable threshold per image" in rows:
            rows.setdefault(REALISTIC[-1], rows["candidate: stable threshold per image"])
    names = list(sets)
    calibrated = {
        name: next(row for key, row in rows.items() if key.startswith("calibrated: default"))
        for name, rows in sets.items()
    }
    print("| masks | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key in (*REALISTIC, "oracle (best pooled F1 on test)"):
        print(
            f"| {SHORT[key]} | "
            + " | ".join(cell(sets[name][key]) if key in sets[name] else "-" for name in names)
            + " |"
        )
    uncalibrated = "refined: uncalibrated default"
    print(
        "| refined, not calibrated (`calibrate: false`) | "
        + " | ".join(cell(sets[name][uncalibrated]) if uncalibrated in sets[name] else "-" for name in names)
        + " |"
    )
    print("| **calibrated default** | " + " | ".join(f"**{cell(calibrated[name])}**" for name in names) + " |")
    margins, checks = {}, defaultdict(list)
    for name in names:
        rows = sets[name]
        best = max(REALISTIC, key=lambda key: float(rows[key]["mean_f1_defective"]) if key in rows else -math.inf)
        mine = calibrated[name]
        margins[name] = float(mine["mean_f1_defective"]) - float(rows[best]["mean_f1_defective"])
        pooled = float(mine["pixel_f1_all"]) - float(rows["anomalib threshold"]["pixel_f1_all"])
        alarm_cap = max(0.25, min(float(rows[key]["false_alarm_rate"]) for key in REALISTIC if key in rows))
        checks["margin >= -0.01"].append(margins[name] >= -0.01)
        checks["pooled F1 >= anomalib's - 0.01"].append(pooled >= -0.01)
        checks["false alarms <= max(0.25, lowest baseline's)"].append(
            float(mine["false_alarm_rate"]) <= alarm_cap + 1e-9
        )
        checks["margin > 0"].append(margins[name] > 0)
    print("| margin over the best realistic baseline | " + " | ".join(f"{margins[name]:+.3f}" for name in names) + " |")
    print(
        "| calibration's choice | "
        + " | ".join(calibrated[name]["masks"].split("(chose ", 1)[-1].removesuffix(")") for name in names)
        + " |"
    )
    print(
        "| rank correlation, synthetic vs real (Spearman) | "
        + " | ".join(
            f"{float(calibrated[name]['rank_correlation']):.2f}" if calibrated[name].get("rank_correlation") else "-"
            for name in names
        )
        + " |"
    )
    print(
        "| calibration time (s) / the model's validation epoch (s) | "
        + " | ".join(
            f"{float(calibrated[name]['calibration_seconds']):.0f} / {float(calibrated[name]['validation_seconds']):.0f}"
            if calibrated[name].get("calibration_seconds")
            else "-"
            for name in names
        )
        + " |"
    )
    print()
    for check, passed in checks.items():
        print(f"- {check}: {sum(passed)} of {len(passed)} sets")


if __name__ == "__main__":
    main()
