#!/usr/bin/env python
"""Refine a deployed anomalib model's masks outside Lightning: ``TorchInferencer`` on a folder, then the refiner.

Export a fitted model with anomalib's torch export, then refine its predictions on a folder of images:

    anomalib export --config configs/padim.yaml --ckpt_path <model.ckpt> --export_type torch --export_root exported
    TRUST_REMOTE_CODE=1 python examples/deploy_refinement.py exported/weights/torch/model.pt <folder> \\
        --config configs/padim.yaml --output deployed-masks

The refinement's options come from the ``TestTimeSegmentation`` entry of ``--config`` (the init args ``anomalib
predict`` reads from the same file), else the callback's defaults. One PNG per image is written as ``MaskWriter``
writes it in ``anomalib predict`` (255 = anomalous, at the image's size, at the path the visualizer uses), so the
two folders hold equal masks for the same images and weights (``tests/test_deploy.py`` checks it).
``TorchInferencer`` unpickles the exported file: set ``TRUST_REMOTE_CODE=1`` for files you trust.

The folder is read with ``anomalib_tts.TolerantPredictDataset``, as ``anomalib predict --data
anomalib_tts.TolerantPredictDataset`` reads it: a file that cannot be decoded (cut off, empty, not an image) is
skipped with one warning naming it, listed in ``<output>/skipped.csv`` (``path,reason``; header only when none),
and the run goes on. ``--skip-existing`` resumes a stopped run: the images whose mask file exists are not loaded
nor predicted, and their masks are left as they are.
"""

import argparse
from pathlib import Path

import yaml
from torch import Tensor


def refinement_options(config: Path | None) -> dict:
    """The init args of the config's ``TestTimeSegmentation`` entry under ``trainer.callbacks`` (``{}`` without)."""
    if config is None:
        return {}
    callbacks = (yaml.safe_load(config.read_text()).get("trainer") or {}).get("callbacks") or []
    entries = [entry for entry in callbacks if str(entry.get("class_path", "")).endswith("TestTimeSegmentation")]
    if not entries:
        msg = f"{config} lists no anomalib_tts.TestTimeSegmentation under trainer.callbacks"
        raise SystemExit(msg)
    return entries[0].get("init_args") or {}


def refine_folder(
    model_file: Path,
    folder: Path,
    options: dict,
    output: Path,
    device: str = "cpu",
    skip_existing: bool = False,
) -> dict[str, Tensor]:
    """Predict and refine every readable image below ``folder``; write the masks under ``output``; return them by
    path (the images predicted in this run).

    The images are listed, loaded and named as ``anomalib predict --data <folder>`` does (``TolerantPredictDataset``
    is anomalib's ``PredictDataset`` that skips unreadable files): a name seeds the choice of each image's training
    pixels. With ``skip_existing``, images whose mask file exists under ``output`` are not loaded.
    """
    from anomalib.deploy import TorchInferencer

    from anomalib_tts import MaskWriter, SegmentationRefiner, TolerantPredictDataset
    from anomalib_tts.data import write_skipped_report

    inferencer = TorchInferencer(model_file, device=device)
    refiner = SegmentationRefiner.from_init_args(options, inferencer.model)
    writer = MaskWriter(output_dir=str(output))
    dataset = TolerantPredictDataset(folder)
    if skip_existing:
        dataset.skip = {str(path) for path in dataset.image_filenames if writer.target(path).exists()}
    masks = {}
    for item in dataset:  # the image as read from its file: what inferencer.predict(path) reads
        prediction = refiner.predict(inferencer, item.image, image_path=item.image_path)
        masks[item.image_path] = prediction.pred_mask.reshape(prediction.pred_mask.shape[-2:]).cpu()
        writer.write(masks[item.image_path], item.image_path)
    report = write_skipped_report(output, dataset.skipped)
    stats = refiner.stats
    print(
        f"refined {stats.refined} of {stats.images} images; masks written to {output.resolve()}"
        + (f"; kept {len(dataset.skip)} masks of an earlier run" if skip_existing else "")
        + f"; skipped {len(dataset.skipped)} unreadable files (listed in {report.resolve()})"
    )
    return masks


def main(argv: list[str] | None = None) -> dict[str, Tensor]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="the .pt file of anomalib's torch export")
    parser.add_argument("folder", type=Path, help="a folder of images (searched recursively)")
    parser.add_argument("--config", type=Path, help="an anomalib YAML whose TestTimeSegmentation entry to use")
    parser.add_argument("--output", type=Path, default=Path("deployed-masks"), help="where the masks go")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, xpu or auto (TorchInferencer's)")
    parser.add_argument(
        "--skip-existing", action="store_true", help="resume: leave the images whose mask exists in --output"
    )
    arguments = parser.parse_args(argv)
    options = refinement_options(arguments.config)
    return refine_folder(
        arguments.model, arguments.folder, options, arguments.output, arguments.device, arguments.skip_existing
    )


if __name__ == "__main__":
    main()
