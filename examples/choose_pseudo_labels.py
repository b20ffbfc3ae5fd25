"""Compare pseudo-label recipes on cached PatchCore score maps (the measurement behind the default recipe).

Reads the ``scores.pt`` that ``examples/fit_and_cache.py`` writes (normalized maps, images, ground truth of a
real dataset), refines every test image with each recipe, and prints segmentation scores next to the
threshold baselines. ``--drift`` also scores the same images with a photometric drift applied to them
before PatchCore sees them (the failure mode of recipes that trust nominal statistics).

    HF_HUB_CACHE=../shared/weights/hf-hub HF_HUB_OFFLINE=1 \
        python examples/choose_pseudo_labels.py --cache /work/cache/magnetic_tile/scores.pt
"""

import argparse
import json
import time
from pathlib import Path

import torch

from anomalib_tts.pipeline import RefinementInputs, RefinementPipeline
from anomalib_tts.pipeline.classifiers import CLASSIFIERS
from anomalib_tts.pipeline.features import FeatureSource, Modalities, TimmFeatures
from anomalib_tts.pipeline.labelers import LABELERS
from anomalib_tts.pipeline.sampling import path_seeds
from anomalib_tts.tools.evaluation import segmentation_scores

RECIPES = {
    "percentile": ("percentile", {}),
    "nominal": ("nominal", {}),
    "robust": ("robust", {}),
    "relative": ("relative", {}),
}


class Precomputed(FeatureSource):
    """Feature source over features computed once for the whole cache: the images at ``index``."""

    def __init__(self, levels: list[torch.Tensor]) -> None:
        self.levels = levels
        self.index = slice(None)

    def __call__(self, inputs: Modalities) -> list[torch.Tensor]:
        return [level[self.index] for level in self.levels]


def model_inputs(cache: dict) -> torch.Tensor:
    images = cache["image"].float() / 255
    return (images - cache["norm_mean"][:, None, None]) / cache["norm_std"][:, None, None]


def cached_levels(cache: dict, layers: list[str] | None = None) -> list[torch.Tensor]:
    """Backbone features of every cached test image (the model's backbone; its layers unless ``layers``)."""
    config = cache["config"]
    extractor = TimmFeatures(backbone=config["backbone"], layers=layers or config["layers"], pre_trained=True)
    inputs = model_inputs(cache)
    with torch.no_grad():
        batches = (extractor(Modalities(inputs[i : i + 16])) for i in range(0, len(inputs), 16))
        return [torch.cat(parts) for parts in zip(*batches)]


def unclipped_maps(cache: dict) -> tuple[torch.Tensor, float]:
    """What the callback sees (anomalib's normalization without its clipping to [0, 1]), and where mean + 3 std
    of the nominal validation pixels falls on that scale."""
    stats, post = cache["val_stats"], cache["post_processor"]
    scale = post["pixel_max"] - post["pixel_min"]
    maps = (cache["anomaly_map_raw"] - post["pixel_threshold"]) / scale + 0.5
    sigma3 = (stats["pixel_mean"] + 3 * stats["pixel_std"] - post["pixel_threshold"]) / scale + 0.5
    return maps, float(sigma3)


def refine_all(
    cache: dict,
    maps: torch.Tensor,
    features: Precomputed,
    recipe: str,
    args: dict,
    batch: int,
    classifier: str,
    classifier_args: dict,
) -> tuple:
    """Refine every cached image -> masks, decision values (``nan`` where a mask was kept), outcomes, s/image."""
    refiner = RefinementPipeline(
        LABELERS.get(recipe)(**args),
        features,
        CLASSIFIERS.get(classifier)(**classifier_args),
        self_check="none",
        fallback="threshold",
    )
    masks, decisions, outcomes = [], [], []
    seeds = path_seeds(cache["image_path"])
    start = time.perf_counter()
    for first in range(0, maps.shape[0], batch):
        index = slice(first, first + batch)
        features.index = index
        result = refiner(
            RefinementInputs(Modalities(cache["image"][index]), maps[index], maps[index] > 0.5, seeds[index])
        )
        masks.append(result.masks)
        decisions.append(result.decision)
        outcomes.append(result.outcome)
    seconds = (time.perf_counter() - start) / maps.shape[0]
    return torch.cat(masks), torch.cat(decisions), torch.cat(outcomes), seconds


def report(name: str, masks: torch.Tensor, cache: dict, extra: str = "") -> None:
    scores = segmentation_scores(masks, cache["gt_mask"], cache["pred_label"], cache["gt_label"])
    print(
        f"{name:28} pixelF1(all) {scores['pixel_f1_all']:.3f}  pixelF1(defective) {scores['pixel_f1_defective']:.3f}"
        f"  meanF1(defective) {scores['mean_f1_defective']:.3f}  {extra}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layers", nargs="+", help="backbone layers for the pixel features (default: the model's)")
    parser.add_argument("--with-image", action="store_true", help="add the image's own pixels as a feature level")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), help="names above, or name:JSON-arguments")
    parser.add_argument("--classifier", default="logistic", help="classifier name (logistic, svm)")
    parser.add_argument(
        "--classifier-args", type=json.loads, default={}, help="classifier arguments, e.g. '{\"l2\": 0.1}'"
    )
    arguments = parser.parse_args()
    cache = torch.load(arguments.cache, weights_only=False)
    levels = cached_levels(cache, arguments.layers)
    if arguments.with_image:
        levels.append(model_inputs(cache))
    features = Precomputed(levels)
    maps, sigma3 = unclipped_maps(cache)

    print(f"{arguments.cache}: {maps.shape[0]} test images")
    report("threshold (anomalib)", cache["pred_mask"], cache)
    report("threshold mean+3std", maps > sigma3, cache)
    for name in arguments.recipes:
        recipe, args = (
            RECIPES[name] if name in RECIPES else (name.split(":")[0], json.loads(name.partition(":")[2] or "{}"))
        )
        masks, _, outcomes, seconds = refine_all(
            cache, maps, features, recipe, args, arguments.batch_size, arguments.classifier, arguments.classifier_args
        )
        refined = int((outcomes == 0).sum())
        report(name, masks, cache, f"refined {refined}/{len(outcomes)}  {1000 * seconds:.1f} ms/img")


if __name__ == "__main__":
    main()
