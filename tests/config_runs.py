"""``anomalib train``, ``test`` and ``predict`` for several configs in one interpreter, as anomalib's CLI runs them.

Each run of ``RUNS.json`` is ``{"name", "arguments", "train_arguments"}``: ``arguments`` go to all three
subcommands, ``train_arguments`` to ``train`` only; ``test`` and ``predict`` load the checkpoint ``train`` wrote.
What each run did is saved to ``OUT.json``: the checkpoint, the test metrics, how many images were predicted and
how many of their masks differ from anomalib's threshold, or the error that stopped it.

    python tests/config_runs.py OUT.json RUNS.json
"""

import json
import sys
import time
import traceback
from typing import Any


def run(arguments: list[str], train_arguments: list[str]) -> dict[str, Any]:
    """Train, test and predict with one config; returns what happened."""
    from anomalib.cli.cli import AnomalibCLI

    done: dict[str, Any] = {"seconds": {}}
    start = time.perf_counter()
    trained = AnomalibCLI(args=["train", *arguments, *train_arguments])
    checkpoint = trained.engine.trainer.checkpoint_callback.best_model_path
    done["checkpoint"] = checkpoint
    done["seconds"]["train"] = time.perf_counter() - start

    start = time.perf_counter()
    tested = AnomalibCLI(args=["test", *arguments, "--ckpt_path", checkpoint])
    done["test"] = {name: float(value) for name, value in tested.engine.trainer.callback_metrics.items()}
    done["seconds"]["test"] = time.perf_counter() - start

    start = time.perf_counter()
    predicted = AnomalibCLI(args=["predict", *arguments, "--ckpt_path", checkpoint])
    batches = predicted.engine.trainer.predict_loop.predictions
    done["predicted"] = sum(len(batch.image_path) for batch in batches)
    done["changed_in_predict"] = sum(
        int(not mask.bool().equal(anomaly_map > 0.5))  # anomalib's own mask: normalized map > 0.5
        for batch in batches
        for mask, anomaly_map in zip(
            batch.pred_mask.reshape(-1, *batch.pred_mask.shape[-2:]),
            batch.anomaly_map.reshape(-1, *batch.anomaly_map.shape[-2:]),
            strict=True,
        )
    )
    done["seconds"]["predict"] = time.perf_counter() - start
    return done


def main(output: str, runs_file: str) -> None:
    from anomalib.loggers import configure_logger

    configure_logger()  # as the `anomalib` command does: the callbacks' log lines are printed
    results = {}
    with open(runs_file) as file:
        runs = json.load(file)
    for entry in runs:
        try:
            results[entry["name"]] = run(entry["arguments"], entry["train_arguments"])
        except (Exception, SystemExit):  # jsonargparse exits on an argument it rejects
            results[entry["name"]] = {"error": traceback.format_exc()[-4000:]}
        with open(output, "w") as file:
            json.dump(results, file)


if __name__ == "__main__":
    main(*sys.argv[1:])
