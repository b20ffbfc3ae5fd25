"""How far one refinement setting can serve two datasets at once: a grid of settings against every threshold line.

Reads the ``scores.pt`` caches that ``examples/fit_and_cache.py`` writes, refines every test image of each with
a grid of ``relative`` recipe settings, and cuts each fit's decision values (``Refinement.decision``) at several
offsets instead of 0 (a negative offset grows every mask, a positive one shrinks it). For every setting it
prints pixel F1 pooled over all images (anomalib's ``pixel_F1Score``) and mean per-image F1 over the defective
images on each dataset, then counts the settings that meet each line of the project's acceptance:

- ``keeps anomalib``: pooled F1 at least anomalib's own threshold's;
- ``beats mean F1``: mean per-image F1 above the best realistic threshold's (anomalib's, mean + 3 std);
- ``beats pooled F1``: pooled F1 above the best realistic threshold's.

``--diagnose`` adds, per defect type (test folder) of each dataset, the share of the defect pixels, the
precision of the default's positives, the precision / recall of the default's and the mean + 3 std masks, and the
ceiling of per-image thresholds (each defective image cut at its own best threshold: it looks at the ground
truth), on the score map and on the default classifier's decision values.

    HF_HUB_CACHE=../shared/weights/hf-hub HF_HUB_OFFLINE=1 python examples/tradeoff_study.py \\
        --caches results/cache/metal_plate/scores.pt results/cache/magnetic_tile/scores.pt --diagnose
"""

import argparse
import itertools
from pathlib import Path

import torch
from choose_pseudo_labels import Precomputed, cached_levels, refine_all, unclipped_maps

from anomalib_tts.pipeline.labelers import PeakRelative
from anomalib_tts.tools.evaluation import oracle_threshold, segmentation_scores

LINES = ("keeps anomalib", "beats mean F1", "beats pooled F1")


class Dataset:
    """One cache: unclipped normalized maps, ground truth, features, and the threshold baselines' scores."""

    def __init__(self, path: Path, batch_size: int) -> None:
        cache = torch.load(path, weights_only=False)
        self.name = path.parent.name
        self.cache = cache
        self.batch_size = batch_size
        self.features = Precomputed(cached_levels(cache))
        self.maps, self.sigma3 = unclipped_maps(cache)
        self.truth = cache["gt_mask"].bool().reshape(self.maps.shape)
        self.defect_types = [Path(image_path).parent.name for image_path in cache["image_path"]]
        self.baselines = {"anomalib": self.score(cache["pred_mask"]), "mean+3std": self.score(self.maps > self.sigma3)}

    def score(self, masks: torch.Tensor) -> dict[str, float]:
        return segmentation_scores(masks, self.cache["gt_mask"], self.cache["pred_label"], self.cache["gt_label"])

    def refine(self, recipe_args: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks kept where an image is not refined, and the decision values (``nan`` there)."""
        masks, decisions, _, _ = refine_all(
            self.cache, self.maps, self.features, "relative", recipe_args, self.batch_size, "logistic", {}
        )
        return masks, decisions

    def lines_met(self, scores: dict[str, float]) -> tuple[bool, bool, bool]:
        realistic = self.baselines.values()
        return (
            scores["pixel_f1_all"] >= self.baselines["anomalib"]["pixel_f1_all"],
            scores["mean_f1_defective"] > max(b["mean_f1_defective"] for b in realistic),
            scores["pixel_f1_all"] > max(b["pixel_f1_all"] for b in realistic),
        )


def precision_recall(masks: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    hits = int((masks & truth).sum())
    return hits / max(int(masks.sum()), 1), hits / max(int(truth.sum()), 1)


def best_cuts(values: torch.Tensor, truth: torch.Tensor, images: list[int], fallback: torch.Tensor) -> torch.Tensor:
    """``fallback`` with each of ``images`` replaced by ``values`` cut at that image's best threshold."""
    masks = fallback.clone()
    for index in images:
        masks[index] = values[index] > oracle_threshold(values[index], truth[index])
    return masks


def diagnose(data: Dataset, masks: torch.Tensor, decision: torch.Tensor) -> None:
    defective = data.truth.flatten(1).any(dim=1)
    empty = torch.zeros_like(data.truth)
    best = data.score(best_cuts(data.maps, data.truth, torch.nonzero(defective).flatten().tolist(), empty))
    print(
        f"\n{data.name}: each defective image's map cut at its own best threshold (ground truth; normal images "
        f"empty): pooled F1 {best['pixel_f1_all']:.3f}, mean F1 {best['mean_f1_defective']:.3f}"
    )
    refined = torch.nonzero(defective & ~torch.isnan(decision).flatten(1).all(dim=1)).flatten().tolist()
    by_map = data.score(best_cuts(data.maps, data.truth, refined, masks))["pixel_f1_all"]
    by_decision = data.score(best_cuts(decision, data.truth, refined, masks))["pixel_f1_all"]
    print(
        f"  the same on the {len(refined)} refined defective images only (the default's masks elsewhere): pooled F1 "
        f"{by_map:.3f} cutting the score map, {by_decision:.3f} cutting the classifier's decision values"
    )
    positives = PeakRelative()(data.maps, 0.5).positive
    print(f"  {'defect type':12} {'images':>6} {'defect px':>9}  positives P   default P / R   mean+3std P / R")
    total = int(data.truth.sum())
    for defect_type in sorted(set(data.defect_types)):
        chosen = torch.tensor([name == defect_type for name in data.defect_types])
        truth = data.truth[chosen]
        positive_precision, _ = precision_recall(positives[chosen], truth)
        default = precision_recall(masks[chosen], truth)
        sigma3 = precision_recall(data.maps[chosen] > data.sigma3, truth)
        print(
            f"  {defect_type:12} {int(chosen.sum()):6} {int(truth.sum()) / max(total, 1):9.1%}  {positive_precision:11.2f}"
            f"   {default[0]:5.2f} / {default[1]:.2f}   {sigma3[0]:9.2f} / {sigma3[1]:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caches", type=Path, nargs="+", required=True)
    parser.add_argument("--positive-fractions", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--negative-fractions", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.4])
    parser.add_argument("--offsets", type=float, nargs="+", default=[-1.0, -0.5, 0.0, 0.5, 1.0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--diagnose", action="store_true", help="per defect type, for the default setting")
    arguments = parser.parse_args()
    datasets = [Dataset(path, arguments.batch_size) for path in arguments.caches]
    for data in datasets:
        for name, scores in data.baselines.items():
            print(
                f"{data.name:14} {name:10} pixel F1 (all) {scores['pixel_f1_all']:.3f}  "
                f"mean F1 (defective) {scores['mean_f1_defective']:.3f}"
            )

    header = "  ".join(f"{data.name + ' all / mean':>26}" for data in datasets)
    print(f"\n{'positive / negative fraction, offset':38}{header}")
    met = {(data.name, line): 0 for data in datasets for line in LINES}
    every, settings = 0, 0
    for positive, negative in itertools.product(arguments.positive_fractions, arguments.negative_fractions):
        if negative >= positive:
            continue
        recipe_args = {"positive_fraction": positive, "negative_fraction": negative}
        refined = [data.refine(recipe_args) for data in datasets]
        for offset in arguments.offsets:
            settings += 1
            cells, all_lines = [], True
            for data, (masks, decision) in zip(datasets, refined, strict=True):
                scores = data.score(torch.where(torch.isnan(decision), masks, decision > offset))
                lines = data.lines_met(scores)
                all_lines &= all(lines)
                for line, ok in zip(LINES, lines, strict=True):
                    met[data.name, line] += ok
                marks = "".join("+" if ok else "." for ok in lines)
                cells.append(f"{scores['pixel_f1_all']:.3f} / {scores['mean_f1_defective']:.3f} {marks}")
            every += all_lines
            print(f"{positive:.2f} / {negative:.2f}, {offset:+.1f}{'':22}" + "  ".join(f"{c:>26}" for c in cells))
    print(f"\nmarks: + / . for {', '.join(LINES)}")
    for (name, line), count in met.items():
        print(f"{name:14} {line:16} {count:3} of {settings} settings")
    print(f"every line on every dataset: {every} of {settings} settings")

    if arguments.diagnose:
        for data in datasets:
            diagnose(data, *data.refine({}))


if __name__ == "__main__":
    main()
