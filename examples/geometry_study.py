"""RGB vs RGB + geometry refinement on generated MVTec 3D-AD-layout data (RGB PNG, XYZ TIFF with missing points).

Two measurements, printed as JSON:

* ``simulated``: grooves that exist only in the point cloud, and a detector that sees each groove slightly blurred
  (Gaussian, sigma 1 px) at a level anomalib's global threshold does not fit (0.45 + 0.4 x, noise 0.02). The
  same pseudo-labels are refined with the RGB backbone's features alone and with geometric features next to
  them; mean per-image F1 of the threshold and of both refinements.
* ``patchcore``: PatchCore fitted on ``train/good`` of a dataset whose bumps, dents and grooves also darken the
  RGB image, then ``Engine.test`` on the ``MVTec3D`` datamodule with anomalib's masks, the callback with
  ``geometry="off"`` and with ``geometry="on"``.

    HF_HUB_CACHE=../shared/weights/hf-hub HF_HUB_OFFLINE=1 python examples/geometry_study.py --out-dir results/geometry
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from anomalib.engine import Engine
from anomalib.models import Patchcore
from torchvision.transforms.functional import gaussian_blur

from anomalib_tts import TestTimeSegmentation
from anomalib_tts.metrics import f1_score
from anomalib_tts.pipeline.classifiers import LogisticRegression
from anomalib_tts.pipeline.features import Modalities, TimmFeatures
from anomalib_tts.pipeline.features.geometry import GeometryFeatures, RgbdFeatures
from anomalib_tts.pipeline.labelers import LABELERS
from anomalib_tts.pipeline.refinement import RefinementInputs, RefinementPipeline
from anomalib_tts.tools.data import MVTec3D, make_mvtec3d_dataset
from anomalib_tts.tools.evaluation import MaskRecorder

CATEGORY = "texture3d"


def simulated(arguments: argparse.Namespace, root: Path) -> dict[str, float]:
    """Refinement of geometry-only grooves from simulated detector maps, RGB features alone vs with geometry."""
    make_mvtec3d_dataset(root, CATEGORY, n_train=1, n_test_good=0, n_test_defect=arguments.images,
                         image_size=arguments.image_size, defect_kinds=("groove",))  # fmt: skip
    datamodule = MVTec3D(root=root, category=CATEGORY, eval_batch_size=arguments.images, num_workers=0)
    datamodule.setup()
    batch = next(iter(datamodule.test_dataloader()))
    truth = batch.gt_mask.bool()
    blurred = gaussian_blur(truth.float()[:, None], [7, 7], [1.0, 1.0])[:, 0]
    noise = 0.02 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(0))
    score_maps = 0.45 + 0.4 * blurred / blurred.amax(dim=(1, 2), keepdim=True) + noise
    rgb = TimmFeatures(arguments.backbone, layers=arguments.layers, pre_trained=not arguments.random_weights)
    refiner = RefinementPipeline(
        LABELERS.get("relative")(), RgbdFeatures(rgb), LogisticRegression(), self_check="none", fallback="threshold"
    )
    seeds = torch.arange(len(truth))
    rgbd = Modalities(batch.image, batch.depth_map)
    rgb_only = refiner(RefinementInputs(Modalities(batch.image), score_maps, score_maps > 0.5, seeds)).masks
    with_geometry = refiner(RefinementInputs(rgbd, score_maps, score_maps > 0.5, seeds)).masks
    start = time.perf_counter()
    GeometryFeatures()(rgbd)
    geometry_ms = 1000 * (time.perf_counter() - start) / len(truth)
    return {
        "threshold": float(f1_score(score_maps > 0.5, truth).mean()),
        "refined_rgb": float(f1_score(rgb_only, truth).mean()),
        "refined_rgb_geometry": float(f1_score(with_geometry, truth).mean()),
        "geometry_features_ms_per_image": geometry_ms,
    }


def patchcore(arguments: argparse.Namespace, root: Path) -> dict[str, dict[str, float]]:
    """PatchCore through ``Engine.test`` on the MVTec3D datamodule: anomalib's masks, refined without/with geometry."""
    make_mvtec3d_dataset(root, CATEGORY, n_train=20, n_test_good=5, n_test_defect=15, image_size=arguments.image_size,
                         geometry_only_defects=False, defect_kinds=("bump", "dent", "groove"))  # fmt: skip
    size = (arguments.image_size, arguments.image_size)
    model = Patchcore(backbone=arguments.backbone, layers=arguments.layers, pre_trained=not arguments.random_weights,
                      coreset_sampling_ratio=0.1, pre_processor=Patchcore.configure_pre_processor(image_size=size),
                      visualizer=False)  # fmt: skip
    datamodule = MVTec3D(root=root, category=CATEGORY, num_workers=0, seed=0)
    Engine(default_root_dir=arguments.out_dir / "fit", logger=False).fit(model, datamodule=datamodule)
    results = {}
    for name, geometry in (
        ("threshold (anomalib)", None),
        ("refined, geometry off", "off"),
        ("refined, geometry on", "on"),
    ):
        recorder = MaskRecorder()
        callbacks = [recorder]
        if geometry is not None:
            features = "model" if geometry == "off" else RgbdFeatures("model", expect_depth=True)
            callbacks.insert(0, TestTimeSegmentation(features=features))
        engine = Engine(default_root_dir=arguments.out_dir / "test", logger=False, callbacks=callbacks)
        (reported,) = engine.test(model, datamodule=datamodule)
        results[name] = {**recorder.records.scores(), "anomalib_pixel_F1Score": reported["pixel_F1Score"]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("results/geometry"))
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=["blocks.2", "blocks.4"])
    parser.add_argument("--random-weights", action="store_true", help="no pretrained backbone weights")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=16, help="defective images in the simulated study")
    arguments = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as first, tempfile.TemporaryDirectory() as second:
        results = {"simulated": simulated(arguments, Path(first)), "patchcore": patchcore(arguments, Path(second))}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
