"""Shared fixtures: a generated MVTec-layout dataset and a PaDiM fitted on it once per session."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPOSITORY = Path(__file__).resolve().parents[1]
CONFIGS = REPOSITORY / "configs"
SHARED = REPOSITORY.parent / "shared"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<root>/texture``: 20 train, 5 good and 10 defective test images of 128 px brick texture."""
    from anomalib_tts.tools.data import make_mvtec_dataset

    root = tmp_path_factory.mktemp("synthetic")
    make_mvtec_dataset(root, category="texture", n_train=20, n_test_good=5, n_test_defect=10, image_size=128)
    return root


def make_datamodule(root: Path, batch_size: int = 8):
    from anomalib.data import MVTecAD

    return MVTecAD(
        root=root,
        category="texture",
        val_split_mode="from_train",
        val_split_ratio=0.2,
        train_batch_size=batch_size,
        eval_batch_size=batch_size,
        num_workers=0,
        seed=0,
    )


def make_padim():
    from anomalib.models import Padim

    return Padim(backbone="resnet18", layers=["layer1", "layer2", "layer3"], pre_trained=False)


@pytest.fixture(scope="session")
def padim_checkpoint(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PaDiM (random resnet18, like ``configs/padim.yaml`` offline) fitted on the synthetic dataset."""
    from anomalib.engine import Engine

    workdir = tmp_path_factory.mktemp("padim")
    engine = Engine(default_root_dir=workdir, logger=False, enable_progress_bar=False)
    engine.fit(make_padim(), datamodule=make_datamodule(synthetic_root))
    checkpoint = workdir / "padim.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    return checkpoint


@pytest.fixture(scope="session")
def folder_predictions(synthetic_root: Path, padim_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``anomalib predict`` with ``configs/padim.yaml`` (random weights) on the synthetic test images, as a folder.

    Returns ``images`` (the folder), ``returned`` (what Engine.predict returned: ``paths``, ``pred_masks``,
    ``anomaly_maps``, and the trainer's ``callbacks`` in order) and ``masks`` (the folder MaskWriter wrote).
    """
    import torch

    from tests.helpers import PREDICT_AND_KEEP, run_python

    workdir = tmp_path_factory.mktemp("folder_predictions")
    images = synthetic_root / "texture" / "test"
    arguments = [
        "predict", "--config", str(CONFIGS / "padim.yaml"), "--model.init_args.pre_trained", "false",
        "--ckpt_path", str(padim_checkpoint), "--data", str(images), "--default_root_dir", str(workdir / "results"),
    ]  # fmt: skip
    run_python("-c", PREDICT_AND_KEEP, str(workdir / "predictions.pt"), *arguments, cwd=workdir)
    return {
        "images": images,
        "returned": torch.load(workdir / "predictions.pt"),
        "masks": next((workdir / "results").rglob("masks")),
    }
