"""Acceptance benchmark: anomalib's masks vs. test-time refinement on real MVTec-layout data.

PatchCore is fitted on ``train/good`` with a nominal-only validation split (a held-out part of ``train/good``),
then ``Engine.test`` runs without and with :class:`anomalib_tts.TestTimeSegmentation`. Prints, per category,
anomalib's ``pixel_F1Score`` (all test images), pooled pixel F1 and mean per-image F1 over the defective test
images, image F1, and the refinement time per image, next to the "mean + 3 std of nominal validation pixels"
threshold.

    HF_HUB_CACHE=../shared/weights/hf-hub HF_HUB_OFFLINE=1 python examples/benchmark_quality.py \
        --dataset-root ../shared/datasets --categories metal_plate magnetic_tile --checkpoints /tmp/tts-checkpoints
"""

import argparse
import json
import time
from pathlib import Path

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.models import Patchcore
from torchvision.transforms.v2 import Resize

from anomalib_tts import TestTimeSegmentation
from anomalib_tts.evaluation import MaskRecorder, NominalPixelStats, normalized_threshold

COLUMNS = ("pixel_f1_all", "pixel_f1_defective", "mean_f1_defective", "mean_iou_defective", "image_f1")


def make_model(arguments: argparse.Namespace) -> Patchcore:
    size = (arguments.image_size, arguments.image_size)
    return Patchcore(
        backbone=arguments.backbone,
        layers=arguments.layers,
        pre_trained=True,
        coreset_sampling_ratio=arguments.coreset_sampling_ratio,
        pre_processor=Patchcore.configure_pre_processor(image_size=size),
        visualizer=False,
    )


def make_datamodule(arguments: argparse.Namespace, category: str) -> MVTecAD:
    return MVTecAD(
        root=arguments.dataset_root,
        category=category,
        val_split_mode="from_train",
        val_split_ratio=0.2,
        seed=0,
        train_batch_size=arguments.batch_size,
        eval_batch_size=arguments.batch_size,
        num_workers=0,
        augmentations=Resize((arguments.image_size, arguments.image_size), antialias=True),  # sizes vary
    )


def run_category(arguments: argparse.Namespace, category: str) -> dict[str, dict[str, float]]:
    checkpoint = arguments.checkpoints / category / "model.ckpt"
    datamodule = make_datamodule(arguments, category)
    workdir = arguments.output / category
    if not checkpoint.exists():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        engine = Engine(default_root_dir=workdir / "fit", logger=False)
        engine.fit(make_model(arguments), datamodule=datamodule)
        engine.trainer.save_checkpoint(checkpoint)

    nominal = NominalPixelStats()
    engine = Engine(default_root_dir=workdir / "validate", logger=False, callbacks=[nominal])
    model = make_model(arguments)
    engine.validate(model, datamodule=datamodule, ckpt_path=checkpoint)
    sigma_bar = normalized_threshold(nominal.mean + 3 * nominal.std, model.post_processor)

    results: dict[str, dict[str, float]] = {}
    recorder = MaskRecorder(keep_maps=True)
    engine = Engine(default_root_dir=workdir / "threshold", logger=False, callbacks=[recorder])
    start = time.perf_counter()
    reported = engine.test(make_model(arguments), datamodule=datamodule, ckpt_path=checkpoint)[0]
    model_seconds = time.perf_counter() - start
    records = recorder.records
    results["threshold (anomalib)"] = {**records.scores(), "anomalib_pixel_F1Score": reported["pixel_F1Score"]}
    results["threshold mean+3std"] = records.scores(records.stacked("anomaly_maps") > sigma_bar)

    callback = TestTimeSegmentation(backbone=arguments.refine_backbone, layers=arguments.layers)
    recorder = MaskRecorder()
    engine = Engine(default_root_dir=workdir / "refined", logger=False, callbacks=[callback, recorder])
    reported = engine.test(make_model(arguments), datamodule=datamodule, ckpt_path=checkpoint)[0]
    results["refined (default)"] = {
        **recorder.records.scores(),
        "anomalib_pixel_F1Score": reported["pixel_F1Score"],
        "ms_per_image": 1000 * callback.stats.seconds / max(callback.stats.images, 1),
        "images_refined": callback.stats.refined,
        "images": callback.stats.images,
    }
    results["threshold (anomalib)"]["test_seconds"] = model_seconds
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-root", type=Path, required=True)
    parser.add_argument("--categories", nargs="+", default=["metal_plate", "magnetic_tile"])
    parser.add_argument("--checkpoints", type=Path, default=Path("results/checkpoints"), help="cache of fitted models")
    parser.add_argument("--output", type=Path, default=Path("results/benchmark_quality"))
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=["blocks.2", "blocks.4"])
    parser.add_argument("--refine-backbone", default="tf_efficientnet_lite0", help="'model' reuses PatchCore's features")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--coreset-sampling-ratio", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=16)
    arguments = parser.parse_args()
    torch.manual_seed(0)

    summary = {category: run_category(arguments, category) for category in arguments.categories}
    for category, results in summary.items():
        print(f"\n{category}")
        print(f"{'':24}{'anomalib_pixel_F1Score':>24}" + "".join(f"{column:>20}" for column in COLUMNS) + f"{'ms/image':>10}")
        for name, values in results.items():
            reported = values.get("anomalib_pixel_F1Score")
            cells = f"{reported:>24.3f}" if reported is not None else f"{'-':>24}"
            timing = f"{values['ms_per_image']:>10.1f}" if "ms_per_image" in values else f"{'-':>10}"
            print(f"{name:24}{cells}" + "".join(f"{values[column]:>20.3f}" for column in COLUMNS) + timing)
    arguments.output.mkdir(parents=True, exist_ok=True)
    (arguments.output / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
