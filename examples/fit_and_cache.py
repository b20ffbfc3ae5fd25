#!/usr/bin/env python
"""Fit anomalib's PatchCore once per category, cache it, and dump score maps for binarization studies.

For an MVTec-AD-layout category (``<root>/<category>/{train,test,ground_truth}``) this script

1. fits ``anomalib.models.Patchcore`` with an ``anomalib.engine.Engine`` (validation split carved from
   ``train/good``, so validation holds nominal images only -- the realistic case), and saves the checkpoint
   to ``<out-dir>/<category>/model.ckpt``; if that file already exists, fitting is skipped and the checkpoint
   is restored instead (``engine.test(..., ckpt_path=...)``);
2. runs ``engine.test`` to record anomalib's own test metrics;
3. re-runs inference manually on every test image and on every nominal validation image, and collects the
   raw PatchCore anomaly maps (``model.model(image)`` in eval mode, i.e. before the ``PostProcessor``) and the
   post-processed outputs (``model.post_processor(raw)``, i.e. exactly the normalisation/thresholding anomalib
   applies in ``on_test_batch_end``);
4. saves everything as ``<out-dir>/<category>/scores.pt`` and prints a short summary.

Stored tensors (N = number of test images, H = W = ``--image-size``):

* ``image``            uint8 (N, 3, H, W): the image *after* the pre-processor's resize but *before* its ImageNet
  ``Normalize``; the model input is ``(image / 255 - norm_mean) / norm_std`` (up to uint8 rounding).
* ``anomaly_map_raw``  float32 (N, H, W): PatchCore distance map (``PatchcoreModel.forward`` output, eval mode).
* ``anomaly_map``      float32 (N, H, W): anomalib's normalised map (min-max around the pixel threshold, clamped
  to [0, 1]), identical to what ``engine.test``/``engine.predict`` yield.
* ``pred_mask``        bool (N, H, W): anomalib's mask, ``anomaly_map > 1 - pixel_sensitivity`` (0.5), i.e.
  ``anomaly_map_raw > pixel_threshold``.
* ``pred_score_raw``, ``pred_score``, ``pred_label``, ``gt_label``, ``gt_mask`` (bool (N, H, W), at map
  resolution: the dataset resizes the mask together with the image, nearest-neighbour), ``image_path``.
* ``val_*``: the same raw quantities for the nominal validation images plus summary statistics.

Example::

    python examples/fit_and_cache.py --dataset-root /work/shared/datasets --category metal_plate
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-root", type=Path, required=True, help="folder holding <category>/ (MVTec AD layout)")
    parser.add_argument("--category", required=True, help="e.g. metal_plate or magnetic_tile")
    parser.add_argument("--out-dir", type=Path, default=Path("results/cache"))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=["blocks.2", "blocks.4"])
    parser.add_argument("--coreset-sampling-ratio", type=float, default=0.02)
    parser.add_argument("--val-split-ratio", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=0)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0915
    args = parse_args(argv)
    dataset_root = args.dataset_root.resolve()

    # Offline ImageNet weights (must be set before timm / huggingface_hub are imported).
    os.environ.setdefault("HF_HUB_CACHE", str((dataset_root / ".." / "weights" / "hf-hub").resolve()))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import anomalib
    import torch
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Patchcore
    from lightning.pytorch import seed_everything
    from torchvision.transforms.v2 import Resize

    from anomalib_tts.metrics import f1_score
    from anomalib_tts.tools.evaluation import oracle_threshold

    def pooled_f1(pred: torch.Tensor, gt: torch.Tensor) -> float:
        return float(f1_score(pred.flatten(), gt.flatten()))

    logging.getLogger("anomalib").setLevel(logging.WARNING)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    size = (args.image_size, args.image_size)
    cat_dir = args.out_dir / args.category
    cat_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = cat_dir / "model.ckpt"
    scores_path = cat_dir / "scores.pt"

    seed_everything(args.seed, workers=True)

    def build_model() -> Patchcore:
        # Patchcore's default pre-processor is Resize(256) + ImageNet Normalize; make the size explicit.
        pre_processor = Patchcore.configure_pre_processor(image_size=size)
        return Patchcore(
            backbone=args.backbone,
            layers=list(args.layers),
            pre_trained=True,
            coreset_sampling_ratio=args.coreset_sampling_ratio,
            pre_processor=pre_processor,
            visualizer=False,  # no image dumps during engine.test
        )

    # The dataset must resize (images differ in size in magnetic_tile, so they cannot be collated otherwise).
    # The Engine would append the model's Resize to the dataset augmentations anyway once a trainer is attached;
    # passing the identical Resize here makes manual iteration over the dataloaders independent of that.
    datamodule = MVTecAD(
        root=dataset_root,
        category=args.category,
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_workers=args.num_workers,
        augmentations=Resize(size, antialias=True),
        val_split_mode="from_train",
        val_split_ratio=args.val_split_ratio,
        seed=args.seed,
    )

    model = build_model()
    engine = Engine(default_root_dir=args.out_dir / "runs", logger=False, enable_progress_bar=False)

    timings: dict[str, float] = {}
    cached = ckpt_path.exists()
    if cached:
        print(f"[{args.category}] loading cached checkpoint {ckpt_path}")
        t0 = time.perf_counter()
        test_results = engine.test(model=model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        timings["test_s"] = time.perf_counter() - t0
    else:
        print(
            f"[{args.category}] fitting PatchCore ({args.backbone} {args.layers}, "
            f"coreset {args.coreset_sampling_ratio})"
        )
        t0 = time.perf_counter()
        engine.fit(model=model, datamodule=datamodule)
        timings["fit_s"] = time.perf_counter() - t0
        engine.trainer.save_checkpoint(ckpt_path)
        print(f"[{args.category}] fit took {timings['fit_s']:.1f} s; checkpoint saved to {ckpt_path}")
        t0 = time.perf_counter()
        test_results = engine.test(model=model, datamodule=datamodule, verbose=False)
        timings["test_s"] = time.perf_counter() - t0
    metrics = {k: float(v) for k, v in (test_results[0] if test_results else {}).items()}

    # ---------------------------------------------------------------------------------------------------------------
    # Manual inference: raw maps (before PostProcessor) and post-processed outputs.
    # ---------------------------------------------------------------------------------------------------------------
    model.eval()
    model.cpu()
    pre = model.pre_processor
    post = model.post_processor
    normalize = [t for t in pre.transform.transforms if type(t).__name__ == "Normalize"]
    norm_mean = torch.tensor(normalize[0].mean) if normalize else torch.zeros(3)
    norm_std = torch.tensor(normalize[0].std) if normalize else torch.ones(3)
    memory_bank_shape = tuple(model.model.memory_bank.shape)
    assert memory_bank_shape[0] > 0, "memory bank is empty -- checkpoint not restored?"

    def run(dataloader, keep_images: bool) -> dict:
        out: dict[str, list] = {
            k: []
            for k in (
                "image",
                "anomaly_map_raw",
                "pred_score_raw",
                "anomaly_map",
                "pred_score",
                "pred_mask",
                "pred_label",
                "gt_mask",
                "gt_label",
                "image_path",
            )
        }
        with torch.no_grad():
            for batch in dataloader:
                image01 = batch.image  # float [0, 1], already resized by the dataset augmentation
                # same call as PreProcessor.on_test_batch_start (Resize is a no-op here, then Normalize)
                x, gt_mask = pre.transform(image01, batch.gt_mask)
                raw = model.model(x)  # InferenceBatch(pred_score, anomaly_map); eval mode -> no memory-bank update
                proc = post(raw)  # normalised + thresholded, as anomalib's PostProcessor does at test time
                if keep_images:
                    out["image"].append((image01 * 255).round().clamp(0, 255).to(torch.uint8))
                out["anomaly_map_raw"].append(raw.anomaly_map.reshape(len(x), *x.shape[-2:]).float())
                out["pred_score_raw"].append(raw.pred_score.reshape(-1).float())
                out["anomaly_map"].append(proc.anomaly_map.reshape(len(x), *x.shape[-2:]).float())
                out["pred_score"].append(proc.pred_score.reshape(-1).float())
                out["pred_mask"].append(proc.pred_mask.reshape(len(x), *x.shape[-2:]).bool())
                out["pred_label"].append(proc.pred_label.reshape(-1).bool())
                out["gt_mask"].append(gt_mask.reshape(len(x), *gt_mask.shape[-2:]).bool())
                out["gt_label"].append(batch.gt_label.reshape(-1).bool())
                out["image_path"].extend(str(p) for p in batch.image_path)
        return {k: (v if k == "image_path" else torch.cat(v)) for k, v in out.items() if v}

    t0 = time.perf_counter()
    test = run(datamodule.test_dataloader(), keep_images=True)
    val = run(datamodule.val_dataloader(), keep_images=False)
    timings["collect_s"] = time.perf_counter() - t0
    assert test["gt_mask"].shape == test["anomaly_map_raw"].shape, (
        test["gt_mask"].shape,
        test["anomaly_map_raw"].shape,
    )
    assert not val["gt_label"].any(), "validation split unexpectedly contains defective images"

    vraw = val["anomaly_map_raw"]
    val_stats = {
        "pixel_mean": vraw.mean().item(),
        "pixel_std": vraw.std().item(),
        "pixel_max": vraw.max().item(),
        "image_score_max": val["pred_score_raw"].max().item(),
        "n_images": len(val["image_path"]),
    }
    post_buffers = {
        "pixel_min": post.pixel_min.item(),
        "pixel_max": post.pixel_max.item(),
        "pixel_threshold": post.pixel_threshold.item(),
        "image_min": post.image_min.item(),
        "image_max": post.image_max.item(),
        "image_threshold": post.image_threshold.item(),
        "normalized_pixel_threshold": float(post.normalized_pixel_threshold),
        "normalized_image_threshold": float(post.normalized_image_threshold),
    }

    # ---------------------------------------------------------------------------------------------------------------
    # Summary
    # ---------------------------------------------------------------------------------------------------------------
    defective = test["gt_label"]
    gt_d = test["gt_mask"][defective]
    raw_d = test["anomaly_map_raw"][defective]
    pred_a = test["pred_mask"][defective]
    thr_b = val_stats["pixel_mean"] + 3 * val_stats["pixel_std"]
    pred_b = raw_d > thr_b
    thr_c = oracle_threshold(raw_d, gt_d)
    pred_c = raw_d > thr_c
    summary = {
        "n_test": len(test["image_path"]),
        "n_test_defective": int(defective.sum()),
        "n_test_good": int((~defective).sum()),
        "n_val_good": val_stats["n_images"],
        "anomalib_metrics": metrics,
        "pooled_f1_defective": {
            "a_anomalib_pred_mask": pooled_f1(pred_a, gt_d),
            "b_mean_plus_3std": pooled_f1(pred_b, gt_d),
            "c_oracle": pooled_f1(pred_c, gt_d),
        },
        "mean_per_image_f1_defective": {
            "a_anomalib_pred_mask": float(f1_score(pred_a, gt_d).mean()),
            "b_mean_plus_3std": float(f1_score(pred_b, gt_d).mean()),
            "c_oracle": float(f1_score(pred_c, gt_d).mean()),
        },
        "thresholds_raw": {
            "a_anomalib_pixel_threshold": post_buffers["pixel_threshold"],
            "b_mean_plus_3std": thr_b,
            "c_oracle": thr_c,
        },
        # sanity check against engine.test: pixel F1 pooled over ALL test images, as anomalib's pixel_F1Score
        "check_pixel_f1_all_images_from_dump": pooled_f1(test["pred_mask"], test["gt_mask"]),
        "defect_pixel_fraction": gt_d.float().mean().item(),
        "timings_s": timings,
        "from_cache": cached,
    }

    record = {
        # per test image, stacked along dim 0
        **{k: v for k, v in test.items()},
        # nominal validation images
        "val_anomaly_map_raw": val["anomaly_map_raw"],
        "val_pred_score_raw": val["pred_score_raw"],
        "val_image_path": val["image_path"],
        "val_stats": val_stats,
        "post_processor": post_buffers,
        "metrics": metrics,
        "summary": summary,
        "norm_mean": norm_mean,
        "norm_std": norm_std,
        "image_note": "uint8 image after pre-processor Resize, before ImageNet Normalize; "
        "model input = (image/255 - norm_mean[:,None,None]) / norm_std[:,None,None]",
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "anomalib_version": anomalib.__version__,
            "torch_version": torch.__version__,
            "memory_bank_shape": list(memory_bank_shape),
            "checkpoint": str(ckpt_path),
        },
    }
    torch.save(record, scores_path)

    print(f"[{args.category}] saved {scores_path}")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
