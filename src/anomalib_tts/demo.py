"""The main job: fit an anomalib model, test it with and without refinement, print pixel F1 before/after.

Runs on any MVTec-layout folder, or on a small dataset generated at run time from texture images that
scikit-image ships (no download). Without network access it says so, explains how to provide pretrained
weights, and continues with the offline option it was given (a local weights file, or random weights, labelled
as such in its output).
"""

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from anomalib_tts.evaluation import MaskRecorder


@dataclass
class DemoConfig:
    """Options of the main job (see ``anomalib-tts demo --help``)."""

    dataset_root: Path | None = None
    category: str = "texture"
    output: Path = Path("results/anomalib-tts-demo")
    backbone: str = "wide_resnet50_2"
    layers: tuple[str, ...] | None = None
    weights: Path | None = None
    image_size: int = 256
    coreset_sampling_ratio: float = 0.02
    batch_size: int = 16
    pseudo_labels: str | None = None


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers, checked once so an offline run fails fast instead of retrying."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def resolve_weights(config: DemoConfig) -> tuple[bool, str]:
    """Decide how the backbone gets its weights: ``(pre_trained, label for the output)``."""
    from anomalib_tts.features import MissingWeightsError, create_backbone, default_layers

    if config.weights is not None:
        return False, f"local weights file {config.weights}"
    if not hub_reachable() and os.environ.get("HF_HUB_OFFLINE") != "1":
        os.environ["HF_HUB_OFFLINE"] = "1"  # use the local cache only, without retries
    try:
        create_backbone(config.backbone, config.layers or default_layers(config.backbone), pre_trained=True)
    except MissingWeightsError as error:
        print(f"\nNOTE: {error}\n")
        print("Continuing with RANDOM backbone weights: the numbers below show the mechanics, not real quality.\n")
        return False, "RANDOM weights (pretrained ones could not be loaded)"
    return True, "pretrained (ImageNet)"


def run_demo(config: DemoConfig) -> dict[str, dict[str, float]]:
    """Fit PatchCore, test it without and with :class:`TestTimeSegmentation`, print and return the scores."""
    import torch
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Patchcore

    from anomalib_tts import TestTimeSegmentation
    from anomalib_tts.data import make_mvtec_dataset
    from anomalib_tts.features import default_layers, load_weights

    output = config.output.resolve()
    if config.dataset_root is None:
        root = output / "dataset"
        make_mvtec_dataset(root, category=config.category, n_train=40, n_test_good=10, n_test_defect=30, image_size=256)
        print(f"Generated a synthetic dataset (scikit-image textures, synthetic defects) in {root / config.category}")
    else:
        root = config.dataset_root
    pre_trained, weights_label = resolve_weights(config)
    layers = list(config.layers or default_layers(config.backbone))

    def model() -> Patchcore:
        patchcore = Patchcore(
            backbone=config.backbone,
            layers=layers,
            pre_trained=pre_trained,
            coreset_sampling_ratio=config.coreset_sampling_ratio,
            pre_processor=Patchcore.configure_pre_processor(image_size=(config.image_size, config.image_size)),
        )
        if config.weights is not None:
            load_weights(patchcore.model.feature_extractor, config.weights, config.backbone)
        return patchcore

    datamodule = MVTecAD(
        root=root,
        category=config.category,
        val_split_mode="from_train",
        val_split_ratio=0.2,
        train_batch_size=config.batch_size,
        eval_batch_size=config.batch_size,
        num_workers=0,
        seed=0,
    )
    torch.manual_seed(0)
    engine = Engine(default_root_dir=output / "fit", logger=False)
    engine.fit(fitted := model(), datamodule=datamodule)
    checkpoint = output / "model.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    del fitted

    options = {"pseudo_labels": config.pseudo_labels} if config.pseudo_labels else {}
    runs = {
        "threshold (anomalib)": [],
        "refined (anomalib-tts)": [TestTimeSegmentation(features="model", **options)],
    }
    scores: dict[str, dict[str, float]] = {}
    image_dirs = {}
    for name, callbacks in runs.items():
        recorder = MaskRecorder()
        run_dir = output / ("threshold" if not callbacks else "refined")
        engine = Engine(default_root_dir=run_dir, logger=False, callbacks=[*callbacks, recorder])
        reported = engine.test(model(), datamodule=datamodule, ckpt_path=checkpoint)[0]
        scores[name] = recorder.records.scores()
        scores[name]["anomalib_pixel_F1Score"] = float(reported["pixel_F1Score"])
        image_dirs[name] = sorted({path.parent for path in run_dir.rglob("images/**/*.png")})

    print(f"\nPatchCore ({config.backbone}, {weights_label}) on {root / config.category}")
    columns = ["anomalib_pixel_F1Score", "pixel_f1_defective", "mean_f1_defective", "mean_iou_defective", "image_f1"]
    print(f"{'':26}" + "".join(f"{column:>24}" for column in columns))
    for name, values in scores.items():
        print(f"{name:26}" + "".join(f"{values[column]:>24.3f}" for column in columns))
    for name, folders in image_dirs.items():
        print(f"Overlay images ({name}): {', '.join(str(folder) for folder in folders) or 'none written'}")
    return scores
