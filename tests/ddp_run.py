"""Test and predict a PaDiM checkpoint with the callback on ``--devices`` CPU processes (DDP over gloo).

Lightning's DDP launcher re-executes this command once per extra rank, so it must run as a script. Every rank
writes ``OUT/{stage}_rank{rank}.pt``: the image paths it saw, their final masks and anomaly maps, how many it
refined, and (for ``test``) the metrics the run reported.

    python tests/ddp_run.py DATASET_ROOT PADIM.ckpt OUT --devices 2
"""

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomalib_tts import TestTimeSegmentation  # noqa: E402
from anomalib_tts.tools.evaluation import MaskRecorder  # noqa: E402
from tests.conftest import make_datamodule, make_padim  # noqa: E402


def distributable_padim() -> Any:
    """The test suite's PaDiM without its ``devices=1`` trainer argument (fitting is single-device, inference
    is not)."""
    padim = make_padim()

    class DistributablePadim(type(padim)):
        @property
        def trainer_arguments(self) -> dict[str, Any]:
            return {key: value for key, value in super().trainer_arguments.items() if key != "devices"}

    padim.__class__ = DistributablePadim
    return padim


def run(stage: str, root: Path, checkpoint: Path, out: Path, devices: int) -> None:
    """One ``engine.test`` or ``engine.predict`` run; each rank saves what it refined."""
    from anomalib.engine import Engine

    callback = TestTimeSegmentation(features="model", calibrate=False)  # the refinement itself, identical across ranks
    recorder = MaskRecorder(keep_maps=True)
    engine = Engine(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        default_root_dir=out / stage,
        logger=False,
        enable_progress_bar=False,
        callbacks=[callback, recorder],
    )
    run_stage = engine.test if stage == "test" else engine.predict
    metrics = run_stage(distributable_padim(), datamodule=make_datamodule(root), ckpt_path=checkpoint)
    records = recorder.records
    torch.save(
        {
            "paths": records.paths,
            "masks": records.stacked("pred_masks"),
            "maps": records.stacked("anomaly_maps"),
            "refined": callback.stats.refined,
            "metrics": metrics[0] if stage == "test" else {},
        },
        out / f"{stage}_rank{engine.trainer.global_rank}.pt",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for stage in ("test", "predict"):
        run(stage, args.root, args.checkpoint, args.out, args.devices)


if __name__ == "__main__":
    main()
