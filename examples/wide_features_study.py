#!/usr/bin/env python
"""What the fast defaults change in the masks: the default fit against the exact fit, on real features.

For each cached category (the ``scores.pt`` of ``examples/fit_and_cache.py``: PatchCore maps, images, ground
truth), every test image is refined with the callback's default pipeline three times, on the same features,
pseudo-labels and training pixels:

- ``default``: the defaults (features wider than ``max_channels`` = 256 reduced to their dominant subspaces,
  ``LogisticRegression``'s ``auto`` solver with its default steps);
- ``projected, exact``: the same projection, the fit run to convergence (Newton steps);
- ``exact``: every channel, the fit run to convergence: the reference;
- ``random projection, exact``: every channel multiplied by a fixed random Gaussian matrix down to
  ``max_channels`` (``LogisticRegression(projection=...)``), the fit run to convergence: the reduction the
  dominant subspaces replaced.

With ``--layers`` left out, the features are ``tf_efficientnet_lite0``'s five stages (``blocks.0``, ``.1``, ``.2``,
``.4``, ``.6``: 512 channels, the widest real features available without network access here), so the projection
applies; ``--layers blocks.2 blocks.4`` (PatchCore's own, 152 channels) isolates the solver. The table gives the
share of pixels whose mask differs from the exact fit's, the images with any differing pixel, pooled pixel F1 over
all images and mean F1 over defective images (docs/studies/results.md's numbers).

    HF_HUB_CACHE=../shared/weights/hf-hub HF_HUB_OFFLINE=1 python examples/wide_features_study.py \\
        results/cache/metal_plate/scores.pt results/cache/magnetic_tile/scores.pt results/cache/pcb/scores.pt
"""

import argparse
from pathlib import Path

import torch
from choose_pseudo_labels import Precomputed, cached_levels, unclipped_maps

from anomalib_tts.pipeline.classifiers import LogisticRegression
from anomalib_tts.pipeline.features import Modalities
from anomalib_tts.pipeline.features import pyramid as features_module
from anomalib_tts.pipeline.refinement import DEFAULT_MAX_CHANNELS, RefinementInputs, RefinementPipeline
from anomalib_tts.pipeline.sampling import path_seeds
from anomalib_tts.tools.evaluation import segmentation_scores

ALL_STAGES = ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]
CONVERGED = LogisticRegression(solver="newton", max_iter=50, tolerance=1e-12)


def variants(features: Precomputed, max_channels: int) -> dict[str, RefinementPipeline]:
    """The callback's defaults, and the same with the exact fit (projected, then on every channel)."""
    return {
        "default": RefinementPipeline(features=features, max_channels=max_channels),
        "projected, exact": RefinementPipeline(features=features, classifier=CONVERGED, max_channels=max_channels),
        "exact": RefinementPipeline(features=features, classifier=CONVERGED, max_channels=None),
        "random projection, exact": RefinementPipeline(
            features=features,
            classifier=LogisticRegression(solver="newton", max_iter=50, tolerance=1e-12, projection=max_channels),
            max_channels=None,
        ),
    }


def refine_all(pipeline: RefinementPipeline, cache: dict, maps: torch.Tensor, features: Precomputed, batch: int):
    """Masks of every cached test image."""
    seeds = path_seeds(cache["image_path"])
    masks = []
    for first in range(0, maps.shape[0], batch):
        index = slice(first, first + batch)
        features.index = index
        inputs = RefinementInputs(Modalities(cache["image"][index]), maps[index], maps[index] > 0.5, seeds[index])
        result = pipeline(inputs)
        masks.append(result.masks)
    return torch.cat(masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("caches", type=Path, nargs="+", help="scores.pt files of examples/fit_and_cache.py")
    parser.add_argument("--layers", nargs="+", default=ALL_STAGES, help="tf_efficientnet_lite0 layers")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-channels", type=int, default=DEFAULT_MAX_CHANNELS, help="the default's max_channels")
    parser.add_argument(
        "--subspace-iterations", type=int, default=features_module.SUBSPACE_ITERATIONS, help="see principal_coordinates"
    )
    arguments = parser.parse_args()
    features_module.SUBSPACE_ITERATIONS = arguments.subspace_iterations

    rows = []
    for path in arguments.caches:
        cache = torch.load(path, weights_only=False)
        features = Precomputed(cached_levels(cache, arguments.layers))
        channels = sum(level.shape[1] for level in features.levels)
        maps, _ = unclipped_maps(cache)
        refined = {
            name: refine_all(pipeline, cache, maps, features, arguments.batch_size)
            for name, pipeline in variants(features, arguments.max_channels).items()
        }
        exact = refined["exact"]
        for name, masks in refined.items():
            scores = segmentation_scores(masks, cache["gt_mask"], cache["pred_label"], cache["gt_label"])
            differ = masks != exact
            rows.append(
                f"| {path.parent.name} | {channels} | {name} | {float(differ.float().mean()):.1e} | "
                f"{int(differ.flatten(1).any(dim=1).sum())}/{masks.shape[0]} | {scores['pixel_f1_all']:.4f} | "
                f"{scores['mean_f1_defective']:.4f} |"
            )
            print(rows[-1], flush=True)
    print(
        f"\ntf_efficientnet_lite0 {' + '.join(arguments.layers)}, batch {arguments.batch_size}, max_channels "
        f"{arguments.max_channels}, {arguments.subspace_iterations} subspace iteration(s)\n"
    )
    print(
        "| category | channels | fit | pixels differing from exact | images differing | pooled F1 | mean F1 (defective) |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
