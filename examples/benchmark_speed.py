#!/usr/bin/env python
"""Time and memory of the refinement next to the model's own test step, measured in one process.

For each image size, PatchCore is fitted once on the category's ``train/good`` images. Then, for each batch
size, the same test batches go through the model's test step (anomalib's pre-processing, forward and
post-processing: what ``Engine.test`` runs per batch, without data loading and metrics) and right after it
through the refinement, each timed on its own. Peak memory is the process's resident set size on CPU (sampled
every 0.5 ms by a thread) and ``torch.cuda.max_memory_allocated`` on GPU, measured in two passes of their own
(the model alone, then with the refinement) before the timed pass, so that the sampling thread does not slow
what is timed. The table prints, per image, the model's time, the refinement's time, their ratio, the model's
peak and the peak of test with refinement relative to it.

Each row also counts, per image, what the refinement asks of the host, from one more pass under
``torch.profiler`` (not timed): ``ops``, the torch operators it dispatches from Python (``aten::`` events not nested
in another ``aten::`` event: each costs a dispatch, and on a GPU at least one kernel launch); ``reads``, the values
it reads back to Python (``aten::_local_scalar_dense``, what ``.item()``, ``int()``, ``float()`` and ``bool()`` of a
tensor run, plus top-level ``aten::resolve_conj``, what ``.tolist()`` and ``.numpy()`` run on a CPU tensor); on a
GPU also ``syncs``, the host's waits for the device (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``,
``cudaEventSynchronize``), and ``launches``, the kernel launches (``cudaLaunchKernel``, ``cuLaunchKernel`` and their
``Ex`` forms, ``cudaGraphLaunch``). Only events inside the refinement's range are counted, not the model's step.
``--stages`` prints, from the same profiled pass, where the refinement's time goes per image (the refiner's
``tts.*`` ranges); on a GPU these are the times of the host code that launches each stage. ``--threads`` sets
torch's CPU threads. ``--accelerator-path`` runs that profiled pass on the code paths an accelerator takes, also on
a CPU (:func:`anomalib_tts.pipeline.devices.accelerator_path`: no shortcut that reads a value back), so that its
``reads`` are what a GPU would wait for, as far as a CPU can see them (operators that synchronise only on a GPU,
such as ``nonzero``, read nothing on a CPU).

``--check-masks`` also refines every test image twice, with the default layout (the linear model projected at
each feature level's resolution, only the score map upsampled) and with an unoptimized one that classifies the
bilinearly upsampled features of every pixel, and prints how far the masks differ.

    HF_HUB_CACHE=../shared/weights/hf-hub HF_HUB_OFFLINE=1 python examples/benchmark_speed.py \\
        --dataset-root ../shared/datasets --category metal_plate --check-masks

Without ``--dataset-root`` a small generated dataset is used; ``--random-weights`` times without pretrained
weights (e.g. WideResNet-50 on a machine without network access: ``--backbone wide_resnet50_2 --layers layer2
layer3``).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import gc
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.models import Patchcore
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor
from torchvision.transforms.v2 import Resize

from anomalib_tts.adapter import ModelFeatures
from anomalib_tts.lightning.callback import RawMapKeeper, TestTimeSegmentation
from anomalib_tts.metrics import f1_score
from anomalib_tts.pipeline import RefinementInputs, RefinementPipeline
from anomalib_tts.pipeline.classifiers import Decision, LinearDecision, LogisticRegression, PixelClassifier
from anomalib_tts.pipeline.devices import accelerator_path
from anomalib_tts.pipeline.features import FeatureSource, Modalities, TimmFeatures
from anomalib_tts.pipeline.refinement import STAGE_PREFIX
from anomalib_tts.pipeline.sampling import path_seeds


class DenseDecision(Decision):
    """A fitted linear model that scores every pixel the way any classifier's decision can: on the bilinearly
    upsampled features (the default :meth:`Decision.score_map`), instead of projecting at feature resolution."""

    def __init__(self, linear: LinearDecision) -> None:
        self.linear = linear
        self.fitted = linear.fitted

    def scores(self, features: Tensor) -> Tensor:
        return self.linear.scores(features)


class DenseScoring:
    """The same classifier, whose decisions score full-resolution features: the unoptimized reference."""

    def __init__(self, classifier: PixelClassifier) -> None:
        self.classifier = classifier

    def fit(self, features: Tensor, labels: Tensor, valid: Tensor) -> Decision:
        return DenseDecision(self.classifier.fit(features, labels, valid))


class PeakMemory:
    """Peak memory of the process: CUDA allocations on GPU, resident set size (sampled by a thread) on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._sampling = False
        self._thread: threading.Thread | None = None

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self._page

    def _sample(self) -> None:
        while self._sampling:
            self.peak = max(self.peak, self.current())
            time.sleep(0.0005)

    def __enter__(self) -> PeakMemory:
        self.peak = self.current()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._sampling = True
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
        else:
            self._sampling = False
            assert self._thread is not None
            self._thread.join()
            self.peak = max(self.peak, self.current())


@dataclass
class Row:
    image_size: int
    batch_size: int
    refine_backbone: str
    model_ms: float
    refine_ms: float
    model_peak_mb: float
    with_refinement_peak_mb: float
    stage_ms: dict[str, float] = field(default_factory=dict)
    counts: HostCounts | None = None

    def cells(self) -> list[str]:
        counts = self.counts or HostCounts()
        on_gpu = counts.on_gpu
        return [
            str(self.image_size),
            str(self.batch_size),
            self.refine_backbone,
            f"{self.model_ms:.1f}",
            f"{self.refine_ms:.1f}",
            f"{100 * self.refine_ms / self.model_ms:.0f}%",
            f"{self.model_peak_mb:.0f}",
            f"{self.with_refinement_peak_mb / self.model_peak_mb:.2f}x",
            f"{counts.ops:.0f}",
            f"{counts.reads:.1f}",
            f"{counts.syncs:.1f}" if on_gpu else "-",
            f"{counts.launches:.0f}" if on_gpu else "-",
        ]


HEADER = [
    "size",
    "batch",
    "refine backbone",
    "model ms/img",
    "refine ms/img",
    "refine/model",
    "model peak MB",
    "peak with refinement",
    "ops/img",
    "reads/img",
    "syncs/img",
    "launches/img",
]
REFINEMENT_RANGE = "benchmark.refinement"
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
READ_EVENTS = ("aten::_local_scalar_dense",)
TOP_LEVEL_READ_EVENTS = ("aten::resolve_conj",)  # all that .tolist() and .numpy() dispatch on a CPU tensor


@dataclass
class HostCounts:
    """What the refinement asks of the host per image (see the module docstring for what each counts)."""

    ops: float = 0.0
    reads: float = 0.0
    syncs: float = 0.0
    launches: float = 0.0
    on_gpu: bool = False


def _aten_nested(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def refinement_ranges(events):
    """``event -> bool``: whether a profiled event starts inside one of the refinement's (timed) ranges."""
    ranges = sorted(
        (event.time_range.start, event.time_range.end) for event in events if event.name == REFINEMENT_RANGE
    )
    starts = [start for start, _ in ranges]

    def inside(event) -> bool:
        index = bisect.bisect_right(starts, event.time_range.start) - 1
        return index >= 0 and event.time_range.start < ranges[index][1]

    return inside


def host_counts(events, images: int, on_gpu: bool) -> HostCounts:
    """Count the profiled ``events`` that lie inside the refinement's ranges, per image."""
    inside = refinement_ranges(events)
    counts = HostCounts(on_gpu=on_gpu)
    for event in events:
        name = event.name
        if name == REFINEMENT_RANGE or not inside(event):
            continue
        if name in SYNC_EVENTS:
            counts.syncs += 1
        elif name in LAUNCH_EVENTS:
            counts.launches += 1
        elif name.startswith("aten::"):
            if name in READ_EVENTS:
                counts.reads += 1
            if not _aten_nested(event):
                counts.ops += 1
                if name in TOP_LEVEL_READ_EVENTS:
                    counts.reads += 1
    for name in ("ops", "reads", "syncs", "launches"):
        setattr(counts, name, getattr(counts, name) / max(images, 1))
    return counts


def fit_model(arguments: argparse.Namespace, root: Path, image_size: int, workdir: Path) -> tuple[Patchcore, MVTecAD]:
    datamodule = MVTecAD(
        root=root,
        category=arguments.category,
        train_batch_size=16,
        eval_batch_size=8,
        num_workers=0,
        augmentations=Resize((image_size, image_size), antialias=True),  # some datasets mix image sizes
        val_split_mode="from_train",
        val_split_ratio=0.2,
        seed=0,
    )
    if arguments.checkpoint is not None:
        model = Patchcore.load_from_checkpoint(arguments.checkpoint, map_location="cpu")
    else:
        model = Patchcore(
            backbone=arguments.backbone,
            layers=arguments.layers,
            pre_trained=not arguments.random_weights,
            coreset_sampling_ratio=arguments.coreset_sampling_ratio,
            pre_processor=Patchcore.configure_pre_processor(image_size=(image_size, image_size)),
        )
        engine = Engine(default_root_dir=workdir, logger=False, enable_progress_bar=False, accelerator=arguments.device)
        engine.fit(model, datamodule=datamodule)
    datamodule.setup("test")
    return model, datamodule


def attach(model: Patchcore, callback: TestTimeSegmentation) -> SimpleNamespace:
    """Set the callback up as ``Engine.test`` would; returns a stand-in trainer holding the callback order."""
    trainer = SimpleNamespace(callbacks=[model.pre_processor, model.post_processor])
    callback.setup(trainer, model, "test")
    return trainer


def make_callback(arguments: argparse.Namespace, refine_backbone: str) -> TestTimeSegmentation:
    classifier = LogisticRegression(**(arguments.classifier_args or {}))
    if refine_backbone == "model":
        return TestTimeSegmentation(features="model", classifier=classifier)
    layers = arguments.layers if refine_backbone == arguments.backbone else None
    features = TimmFeatures(backbone=refine_backbone, layers=layers, pre_trained=not arguments.random_weights)
    return TestTimeSegmentation(features=features, classifier=classifier)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_step(model: Patchcore, trainer: SimpleNamespace, batch, index: int):
    """What ``Engine.test`` runs for a batch: pre-processing, the test step and the hooks up to the refinement."""
    model.pre_processor.on_test_batch_start(trainer, model, batch, index)
    outputs = model.test_step(batch, index)
    for callback in trainer.callbacks[1:-1]:
        callback.on_test_batch_end(trainer, model, outputs, batch, index)
    return outputs


def run_batches(model: Patchcore, trainer: SimpleNamespace, loader, device: torch.device, num_batches: int):
    """Yield ``(model_seconds, refine_seconds, images)`` per batch; the first batch warms up and is skipped."""
    refinement = trainer.callbacks[-1]
    for index, batch in enumerate(loader):
        if index > num_batches:
            return
        batch = move_data_to_device(batch, device)
        with torch.inference_mode():
            synchronize(device)
            start = time.perf_counter()
            outputs = model_step(model, trainer, batch, index)
            synchronize(device)
            middle = time.perf_counter()
            # what profiled_pass counts: the timed batches' refinement, not the warm-up's
            with torch.profiler.record_function(REFINEMENT_RANGE if index > 0 else "benchmark.warm_up"):
                refinement.on_test_batch_end(trainer, model, outputs, batch, index)
                synchronize(device)
            end = time.perf_counter()
        if index > 0:
            yield middle - start, end - middle, outputs.image.shape[0]


def measure(
    arguments: argparse.Namespace,
    model: Patchcore,
    datamodule: MVTecAD,
    image_size: int,
    batch_size: int,
    refine_backbone: str,
    device: torch.device,
) -> Row:
    callback = make_callback(arguments, refine_backbone)
    trainer = attach(model, callback)
    datamodule.eval_batch_size = batch_size
    num_batches = max(1, arguments.images // batch_size)
    gc.collect()
    # the model alone first: memory the allocator keeps from it serves the refinement too, as it would in a run
    model_only, with_refinement = PeakMemory(device), PeakMemory(device)
    callback.stages = ()
    with model_only:
        for _ in run_batches(model, trainer, datamodule.test_dataloader(), device, num_batches):
            pass
    callback.stages = ("test",)
    with with_refinement:
        for _ in run_batches(model, trainer, datamodule.test_dataloader(), device, num_batches):
            pass
    # timed apart from the memory passes: on CPU their sampling thread takes the interpreter lock every 0.5 ms,
    # which slows the refinement's many small operations more than the model's few large ones
    model_seconds = refine_seconds = 0.0
    images = 0
    for step_seconds, refinement_seconds, batch_images in run_batches(
        model, trainer, datamodule.test_dataloader(), device, num_batches
    ):
        model_seconds += step_seconds
        refine_seconds += refinement_seconds
        images += batch_images
    row = Row(
        image_size,
        batch_size,
        refine_backbone,
        1000 * model_seconds / max(images, 1),
        1000 * refine_seconds / max(images, 1),
        model_only.peak / 2**20,
        with_refinement.peak / 2**20,
    )
    counting = accelerator_path() if arguments.accelerator_path else contextlib.nullcontext()
    with counting:
        row.stage_ms, row.counts = profiled_pass(model, trainer, datamodule, device, num_batches)
    return row


def profiled_pass(
    model: Patchcore, trainer: SimpleNamespace, datamodule: MVTecAD, device: torch.device, num_batches: int
) -> tuple[dict[str, float], HostCounts]:
    """One more pass of the timed batches under ``torch.profiler``: milliseconds per image in each ``tts.*`` range
    of the refiner, and the refinement's :class:`HostCounts`."""
    images = 0
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        for _, _, batch_images in run_batches(model, trainer, datamodule.test_dataloader(), device, num_batches):
            images += batch_images
    events = profile.events()
    inside = refinement_ranges(events)
    totals: dict[str, float] = {}
    for event in events:
        if event.name.startswith(STAGE_PREFIX) and inside(event):
            name = event.name.removeprefix(STAGE_PREFIX)
            totals[name] = totals.get(name, 0.0) + event.cpu_time_total / 1000 / max(images, 1)
    return totals, host_counts(events, images, device.type == "cuda")


class FixedFeatures(FeatureSource):
    """Hands both refiners the very same feature maps."""

    def __init__(self) -> None:
        self.maps: list[Tensor] = []

    def __call__(self, inputs: Modalities) -> list[Tensor]:
        return self.maps


def check_masks(model: Patchcore, datamodule: MVTecAD, device: torch.device) -> None:
    """Refine every test image with the default and the full-resolution layout; print how the masks differ."""
    defaults = RefinementPipeline(features="model", self_check="none", fallback="threshold")
    model_features = ModelFeatures()
    model_features.setup(model)
    features = FixedFeatures()
    refiners = [
        RefinementPipeline(
            defaults.pseudo_labels,
            features,
            classifier,
            self_check="none",
            fallback="threshold",
            max_positives=defaults.max_positives,
            max_negatives=defaults.max_negatives,
        )
        for classifier in (defaults.classifier, DenseScoring(defaults.classifier))
    ]
    raw_maps = RawMapKeeper()
    trainer = SimpleNamespace(callbacks=[model.pre_processor, raw_maps, model.post_processor, None])
    datamodule.eval_batch_size = 8
    masks: list[list[Tensor]] = [[], []]
    truth = []
    for index, batch in enumerate(datamodule.test_dataloader()):
        batch = move_data_to_device(batch, device)
        with torch.inference_mode():
            outputs = model_step(model, trainer, batch, index)
            maps = raw_maps.take_unclipped(model.post_processor, outputs.anomaly_map.shape)
            maps = maps.reshape(maps.shape[0], *maps.shape[-2:])
            features.maps = model_features(Modalities(outputs.image))  # the test step's own features, from the hook
            seeds = path_seeds(outputs.image_path, device)
            for refiner, kept in zip(refiners, masks, strict=True):
                inputs = RefinementInputs(Modalities(outputs.image), maps, outputs.pred_mask, seeds)
                kept.append(refiner(inputs).masks.cpu())
        truth.append(outputs.gt_mask.cpu())
    model_features.teardown()
    first, second, gt = (torch.cat(kept).flatten(1) for kept in (*masks, truth))
    optimized_f1, unoptimized_f1 = (float(f1_score(kept.flatten(), gt.flatten())) for kept in (first, second))
    print(
        f"masks over {first.shape[0]} test images: {int((first != second).any(dim=1).sum())} images differ, "
        f"{float((first != second).float().mean()):.2e} of pixels; pooled F1 {optimized_f1:.4f} (optimized) vs "
        f"{unoptimized_f1:.4f} (full resolution)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-root", type=Path, help="folder holding <category>/ (MVTec AD layout)")
    parser.add_argument("--category", default="metal_plate")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=["blocks.2", "blocks.4"])
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--checkpoint", type=Path, help="a fitted PatchCore (one image size) instead of fitting")
    parser.add_argument("--coreset-sampling-ratio", type=float, default=0.02)
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--refine-backbones", nargs="+", default=["model", "tf_efficientnet_lite0"])
    parser.add_argument("--images", type=int, default=32, help="timed images per configuration (after warm-up)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--check-masks", action="store_true", help="compare with the full-resolution path")
    parser.add_argument("--stages", action="store_true", help="also print the refinement's time per stage")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--accelerator-path",
        action="store_true",
        help="profile (count) the refinement on the code paths of an accelerator, also on CPU",
    )
    parser.add_argument(
        "--classifier-args",
        type=json.loads,
        default=None,
        help="arguments of the callback's LogisticRegression, e.g. '{\"projection\": 256}'",
    )
    arguments = parser.parse_args()
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)
    device = torch.device("cuda" if arguments.device != "cpu" and torch.cuda.is_available() else "cpu")

    with tempfile.TemporaryDirectory() as workdir:
        root = arguments.dataset_root
        if root is None:
            from anomalib_tts.tools.data import make_mvtec_dataset

            root = Path(workdir) / "data"
            make_mvtec_dataset(root, category=arguments.category, n_train=40, n_test_good=16, n_test_defect=48)
        rows = []
        for image_size in arguments.image_sizes:
            model, datamodule = fit_model(arguments, root, image_size, Path(workdir) / f"fit{image_size}")
            model = model.to(device).eval()
            if arguments.check_masks and image_size == arguments.image_sizes[0]:
                check_masks(model, datamodule, device)
            for batch_size in arguments.batch_sizes:
                for refine_backbone in arguments.refine_backbones:
                    rows.append(measure(arguments, model, datamodule, image_size, batch_size, refine_backbone, device))
                    print(" | ".join(rows[-1].cells()), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    data = arguments.category if arguments.dataset_root is not None else "a generated dataset"
    print(f"\n{arguments.backbone} PatchCore on {data}, {name}\n")
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")
    if arguments.stages:
        names = list(dict.fromkeys(name for row in rows for name in row.stage_ms))
        print("\nrefinement stages, ms per image (torch.profiler ranges; the first three columns as above)\n")
        print("| size | batch | refine backbone | " + " | ".join(names) + " |")
        print("|" + "---|" * (3 + len(names)))
        for row in rows:
            cells = [f"{row.stage_ms.get(name, 0.0):.2f}" for name in names]
            print(f"| {row.image_size} | {row.batch_size} | {row.refine_backbone} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
