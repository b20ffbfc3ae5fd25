"""Compare anomalib's thresholds with test-time refinement on the same score maps, in one command.

For every anomalib model x MVTec-layout category of a YAML config, the model is fitted once (or loaded from a
checkpoint), validated on a nominal-only split (for the baselines' statistics) and tested once with
``Engine.test``, which records its score maps, images and ground truth. Every binarization is then scored on
those same maps:

- threshold baselines: anomalib's own (F1-adaptive on the validation split), mean + 3 std and maximum of the
  nominal validation pixel scores, anomalib 2.7's ``SuperADDPostProcessor`` threshold (95th percentile of those
  scores x 1.421), and the oracle threshold (best pixel F1 pooled over the test set itself: the ceiling of any
  single global threshold, not a usable method);
- anomalib 2.7's ``MEBinPostProcessor`` masks (a threshold per image, from the stability of its connected
  components), on the test batches as anomalib's test loop sees them, and the refinement's fallback alone (MEBin's
  stable threshold swept over each image's own range);
- each refinement setting of the config, run by the callback's pipeline and adapter
  (:class:`~anomalib_tts.adapter.BatchRefiner`) on the recorded maps and images (no second pass of the model).

It prints a table and writes ``results.csv``, ``results.md`` and per-image panels (image | score map |
anomalib's mask | refined masks | ground truth) under the output folder.

Example:
    ::

        python -m anomalib_tts.compare --config configs/compare.yaml
        anomalib-tts compare --config configs/compare.yaml --output results/my-run --panels 4
"""

import csv
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from anomalib_tts.adapter import BatchFields, BatchRefiner, post_processor_normalization, raw_anomaly_maps
from anomalib_tts.calibration import (
    DEFAULT_CANDIDATES,
    Calibration,
    Normalization,
    PrecomputedFeatures,
    build_pipeline,
    calibrate,
    candidate_overrides,
)
from anomalib_tts.deploy import LIGHTNING_OPTIONS
from anomalib_tts.lightning.callback import RawMapKeeper
from anomalib_tts.pipeline import StableThreshold
from anomalib_tts.tools.baselines import mebin_masks, superadd_threshold
from anomalib_tts.tools.evaluation import MaskRecorder, NominalPixelStats, normalized_threshold, oracle_threshold

METRICS = (
    "pixel_f1_all",
    "pixel_f1_defective",
    "mean_f1_defective",
    "mean_iou_defective",
    "image_f1",
    "image_f1_mask",
    "false_alarm_rate",
)
COLUMNS = ("model", "dataset", "masks", "threshold", *METRICS, "synthetic_mean_f1", "images_refined", "ms_per_image")
EXTRA_COLUMNS = ("model_ms_per_image", "calibration_seconds", "validation_seconds", "rank_correlation")  # in the csv
HEADERS = {
    "model": "model",
    "dataset": "dataset",
    "masks": "masks",
    "threshold": "threshold",
    "pixel_f1_all": "pixel F1 (all)",
    "pixel_f1_defective": "pixel F1 (defective)",
    "mean_f1_defective": "mean F1 (defective)",
    "mean_iou_defective": "mean IoU (defective)",
    "image_f1": "image F1 (label)",
    "image_f1_mask": "image F1 (mask)",
    "false_alarm_rate": "false alarms (good images)",
    "synthetic_mean_f1": "mean F1 (synthetic defects)",
    "images_refined": "images refined",
    "ms_per_image": "refinement ms/image",
}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class ModelSpec:
    """An anomalib model of the grid.

    Args:
        name: Its name in the results and in :attr:`DatasetSpec.checkpoints`.
        model: anomalib model class name (``Patchcore``, ``padim``, ... as ``anomalib.models.get_model`` takes).
        args: Keyword arguments of the model; its pre-processor is set from :attr:`CompareConfig.image_size`.

    Example:
        >>> ModelSpec(name="patchcore", model="Patchcore", args={"coreset_sampling_ratio": 0.02}).model
        'Patchcore'
    """

    name: str
    model: str = "Patchcore"
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(bool(self.name), "ModelSpec.name must not be empty")

    def build(self, image_size: int) -> Any:
        """A fresh model whose pre-processor resizes to ``image_size``; ``ValueError`` if ``args`` do not fit."""
        from anomalib.models import get_model

        try:
            model = get_model(self.model, **self.args, visualizer=False)
        except (TypeError, ModuleNotFoundError) as error:
            msg = f"model {self.name!r}: model={self.model!r} with args={self.args} cannot be built: {error}"
            raise ValueError(msg) from error
        model.pre_processor = model.configure_pre_processor(image_size=(image_size, image_size))
        return model


@dataclass
class DatasetSpec:
    """An MVTec-layout category: ``<root>/<category>/{train/good, test/<defect>, ground_truth/<defect>}``.

    Args:
        root: Folder that holds the category folder.
        category: Category folder name.
        name: Its name in the results (default: the category).
        checkpoints: Checkpoint file per model name; a model without one, or whose file does not exist yet, is
            fitted and saved there (default: ``<output>/checkpoints/<dataset>/<model>.ckpt``).

    Example:
        >>> DatasetSpec(root="datasets", category="metal_plate").name
        'metal_plate'
    """

    root: str
    category: str
    name: str | None = None
    checkpoints: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(bool(self.category), "DatasetSpec.category must not be empty")
        self.name = self.name or self.category


@dataclass
class RefinementSpec:
    """A refinement setting: init args of ``TestTimeSegmentation``, as under ``trainer.callbacks`` in YAML.

    Args:
        name: Its name in the results.
        args: e.g. ``{"pseudo_labels": "percentile", "features": "model", "classifier": {"class_path":
            "anomalib_tts.LinearSVM", "init_args": {"l2": 0.5}}}`` (``stages`` is ignored).

    Example:
        >>> RefinementSpec(name="paper recipe", args={"pseudo_labels": "percentile"}).build().gate
        'none'
    """

    name: str = "default"
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(bool(self.name), "RefinementSpec.name must not be empty")

    @property
    def calibrated(self) -> bool:
        """Whether the callback would calibrate this setting on the good images (its ``calibrate`` argument)."""
        return bool(self.args.get("calibrate", True))

    def build(self) -> BatchRefiner:
        """The refiner of this setting; ``ValueError`` naming the setting if ``args`` do not fit."""
        try:
            return BatchRefiner.from_init_args(self.args, ignore=LIGHTNING_OPTIONS)
        except (TypeError, ValueError) as error:
            msg = f"refinement {self.name!r}: args={self.args} do not fit TestTimeSegmentation: {error}"
            raise ValueError(msg) from error


@dataclass
class CompareConfig:
    """What to compare and where to write it (``configs/compare.yaml`` is an example).

    Args:
        models: anomalib models.
        datasets: MVTec-layout categories.
        refinements: Refinement settings (default: one, the callback's defaults).
        output: Run folder for results, panels, fitted checkpoints and anomalib's run files.
        image_size: Images, maps and masks are resized to ``image_size`` x ``image_size``.
        val_split_ratio: Share of ``train/good`` held out as the nominal-only validation split.
        batch_size: Batch size of fitting, testing and refinement.
        num_workers: Data loader workers.
        seed: Seed of the split and of fitting.
        panels: Images per model x dataset drawn as PNG panels (0: none).

    Example:
        >>> config = CompareConfig(models=[ModelSpec("padim", "Padim")], datasets=[DatasetSpec("data", "bottle")])
        >>> [refinement.name for refinement in config.refinements]
        ['default']
    """

    models: list[ModelSpec]
    datasets: list[DatasetSpec]
    refinements: list[RefinementSpec] = field(default_factory=lambda: [RefinementSpec()])
    output: str = "results/compare"
    image_size: int = 256
    val_split_ratio: float = 0.2
    batch_size: int = 16
    num_workers: int = 0
    seed: int = 0
    panels: int = 8

    def __post_init__(self) -> None:
        for argument in ("models", "datasets", "refinements"):
            names = [spec.name for spec in getattr(self, argument)]
            _require(bool(names), f"{argument} must not be empty")
            _require(len(set(names)) == len(names), f"{argument} must have distinct names, got {names}")
        model_names = {model.name for model in self.models}
        for dataset in self.datasets:
            unknown = sorted(set(dataset.checkpoints) - model_names)
            _require(not unknown, f"checkpoints of dataset {dataset.name!r} name unknown models {unknown}")
        _require(self.image_size >= 1, f"image_size must be >= 1, got {self.image_size}")
        _require(0 < self.val_split_ratio < 1, f"val_split_ratio must be in (0, 1), got {self.val_split_ratio}")
        _require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _require(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        _require(self.panels >= 0, f"panels must be >= 0, got {self.panels}")


class ScoreMapRecorder(MaskRecorder):
    """Records the final masks and, for refinement, the model's input images and unclipped normalized maps.

    anomalib's PostProcessor clips its normalized maps to ``[0, 1]``; a :class:`RawMapKeeper` placed right
    before it keeps each raw map, which is normalized here without the clipping (what the callback reads).
    """

    def __init__(self) -> None:
        super().__init__()
        self.raw_maps = RawMapKeeper()
        self.post_processor: Any = None
        self.images: list[Tensor] = []
        self.score_maps: list[Tensor] = []

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.post_processor = getattr(pl_module, "post_processor", None)
        if not self.raw_maps.place_before(trainer, self.post_processor):
            msg = f"comparing needs the model's PostProcessor among the callbacks; {type(pl_module).__name__} has none"
            raise ValueError(msg)

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_test_epoch_start(trainer, pl_module)
        self.images, self.score_maps = [], []

    @override
    def record(self, batch: Any) -> None:
        super().record(batch)
        count, size = batch.anomaly_map.shape[0], batch.anomaly_map.shape[-2:]
        score_maps = self.raw_maps.take_unclipped(self.post_processor, batch.anomaly_map.shape)
        if score_maps is None:
            msg = "comparing needs each batch's raw anomaly map and the PostProcessor's statistics; this batch has none"
            raise ValueError(msg)
        self.score_maps.append(score_maps.reshape(count, *size).cpu())
        self.images.append(batch.image.float().cpu())


@dataclass
class RecordedRun:
    """One model's test run on one dataset, recorded, with what the baselines need.

    Attributes:
        recorder: The recorded masks, labels, paths, images and unclipped normalized score maps.
        nominal: Raw pixel statistics of the nominal validation images.
        post_processor: The model's fitted PostProcessor (its normalization and threshold).
        model_seconds_per_image: Wall time of ``Engine.test`` per test image.
        validation_seconds: Wall time of ``Engine.validate`` on the nominal validation images.
    """

    recorder: ScoreMapRecorder
    nominal: NominalPixelStats
    post_processor: Any
    model_seconds_per_image: float
    validation_seconds: float = 0.0

    @property
    def score_maps(self) -> Tensor:
        """``(N, H, W)`` normalized maps, unclipped (anomalib's pixel threshold is at 0.5)."""
        return torch.cat(self.recorder.score_maps)

    @property
    def anomalib_threshold(self) -> float:
        """anomalib's pixel threshold on the normalized scale."""
        return float(self.post_processor.normalized_pixel_threshold)

    def normalized(self, raw_threshold: float) -> float:
        """A raw pixel threshold on the normalized scale of :attr:`score_maps`."""
        return normalized_threshold(raw_threshold, self.post_processor)


BASELINES: dict[str, Callable[[RecordedRun], float]] = {
    "anomalib threshold": lambda run: run.anomalib_threshold,
    "mean + 3 std of nominal val. pixels": lambda run: run.normalized(run.nominal.mean + 3 * run.nominal.std),
    "max of nominal val. pixels": lambda run: run.normalized(run.nominal.maximum),
    "SuperADD (p95 x 1.421 of nominal val. pixels)": lambda run: run.normalized(superadd_threshold(run.nominal.pixels)),
    "oracle (best pooled F1 on test)": lambda run: oracle_threshold(
        run.score_maps, run.recorder.records.stacked("gt_masks")
    ),
}
"""Threshold baselines: name -> threshold on the normalized scale (masks are ``score_maps > threshold``)."""


MEBIN_ROW = "MEBin (per-image threshold)"
FALLBACK_ROW = "stable threshold per image (the refinement's fallback alone)"


def mebin_recorded(run: RecordedRun, batch_size: int) -> Tensor:
    """``MEBinPostProcessor``'s masks of the recorded test images, batch by batch as the test loop saw them.

    MEBin reads the PostProcessor's normalized maps, clipped to ``[0, 1]``, and sweeps each batch's range of
    peaks (its masks depend on the batch), so the recorded maps are clipped and cut into the same batches.
    """
    maps = run.score_maps.clamp(0, 1)
    return torch.cat([mebin_masks(maps[first : first + batch_size]) for first in range(0, maps.shape[0], batch_size)])


def make_datamodule(config: CompareConfig, dataset: DatasetSpec) -> Any:
    """anomalib's ``MVTecAD`` for ``dataset`` with a nominal-only validation split carved from ``train/good``."""
    from anomalib.data import MVTecAD
    from torchvision.transforms.v2 import Resize

    return MVTecAD(
        root=dataset.root,
        category=dataset.category,
        val_split_mode="from_train",
        val_split_ratio=config.val_split_ratio,
        seed=config.seed,
        train_batch_size=config.batch_size,
        eval_batch_size=config.batch_size,
        num_workers=config.num_workers,
        augmentations=Resize((config.image_size, config.image_size), antialias=True),  # image sizes may vary
    )


def checkpoint_path(config: CompareConfig, model: ModelSpec, dataset: DatasetSpec) -> Path:
    """Where the fitted ``model`` for ``dataset`` is read from, or saved to after fitting."""
    given = dataset.checkpoints.get(model.name)
    return Path(given) if given else Path(config.output) / "checkpoints" / str(dataset.name) / f"{model.name}.ckpt"


def run_model(config: CompareConfig, model_spec: ModelSpec, dataset: DatasetSpec) -> tuple[Any, RecordedRun]:
    """Fit (or load) the model, validate it (nominal statistics) and test it once, recording everything."""
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    datamodule = make_datamodule(config, dataset)
    checkpoint = checkpoint_path(config, model_spec, dataset)
    workdir = Path(config.output) / "runs" / str(dataset.name) / model_spec.name
    options = {"default_root_dir": workdir, "logger": False, "enable_progress_bar": False}
    model = model_spec.build(config.image_size)
    if not checkpoint.exists():
        seed_everything(config.seed, verbose=False)
        engine = Engine(**options)
        engine.fit(model, datamodule=datamodule)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        engine.trainer.save_checkpoint(checkpoint)

    nominal, recorder = NominalPixelStats(), ScoreMapRecorder()
    engine = Engine(callbacks=[nominal, recorder], **options)
    start = time.perf_counter()
    engine.validate(model, datamodule=datamodule, ckpt_path=checkpoint, verbose=False)
    validation_seconds = time.perf_counter() - start
    start = time.perf_counter()
    engine.test(model, datamodule=datamodule, ckpt_path=checkpoint, verbose=False)
    seconds = time.perf_counter() - start
    images = len(recorder.records.paths)
    return model, RecordedRun(recorder, nominal, model.post_processor, seconds / max(images, 1), validation_seconds)


def recorded_batches(run: RecordedRun, batch_size: int, device: torch.device) -> Iterator[Any]:
    """The recorded test images as anomalib batches again, with unclipped maps and anomalib's masks."""
    from anomalib.data import ImageBatch

    records = run.recorder.records
    images, maps = torch.cat(run.recorder.images), run.score_maps
    masks, labels = records.stacked("pred_masks"), records.stacked("pred_labels")
    for first in range(0, maps.shape[0], batch_size):
        index = slice(first, first + batch_size)
        yield ImageBatch(
            image=images[index].to(device),
            anomaly_map=maps[index].to(device),
            pred_mask=masks[index].to(device),
            pred_label=labels[index].to(device),
            image_path=records.paths[index],
        )


def refine_recorded(
    refiner: BatchRefiner, model: Any, run: RecordedRun, batch_size: int
) -> tuple[Tensor, dict[str, Any]]:
    """Refine every recorded test image with ``refiner``, as the callback would have in the test loop.

    The adapter the callback runs refines the recorded batches (their maps are already unclipped); with
    ``features: model`` the features come from the model's own extractor, run on the recorded images.

    Returns:
        ``(N, H, W)`` bool masks, and ``images_refined`` and ``ms_per_image``.
    """
    device = next(model.parameters(), torch.empty(0)).device
    model.eval()
    refiner.bind(model)
    refiner.reset()
    masks = []
    for batch in recorded_batches(run, batch_size, device):
        refiner.refine_batch(batch)
        masks.append(batch.pred_mask.reshape(batch.anomaly_map.shape).bool().cpu())
    refiner.release()
    stats = refiner.stats
    return torch.cat(masks), {
        "images_refined": stats.refined,
        "ms_per_image": 1000 * stats.seconds / max(stats.images, 1),
    }


def calibrate_recorded(
    refiner: BatchRefiner, model: Any, run: RecordedRun, config: CompareConfig, **options: Any
) -> Calibration:
    """Calibrate ``refiner``'s pipeline on the recorded nominal validation images, as the callback does.

    Synthetic defects are pasted into those images and scored by the model; the test images are not read.
    ``options`` go to :func:`~anomalib_tts.calibration.calibrate` (``defects``, ``objective``, ...).
    """
    device = next(model.parameters(), torch.empty(0)).device
    model.eval()
    refiner.bind(model)
    statistics = post_processor_normalization(run.post_processor)
    if statistics is None:
        msg = "calibrating needs the PostProcessor's pixel statistics (run validation first)"
        raise ValueError(msg)
    images = torch.cat(run.nominal.images).to(device)
    maps = torch.cat(run.nominal.maps)
    calibration = calibrate(
        refiner.pipeline,
        images,
        maps,
        lambda batch: raw_anomaly_maps(model, batch.to(device)),
        Normalization(*statistics),
        **{"seed": config.seed, "batch_size": config.batch_size, **options},
    )
    refiner.release()
    return calibration


def candidate_rows(
    refiner: BatchRefiner, calibration: Calibration, model: Any, run: RecordedRun, config: CompareConfig
) -> tuple[list[dict[str, Any]], float]:
    """Every candidate of the calibration scored on the test images, and the rank correlation of their mean F1
    on the synthetic defects with their mean F1 on the test images (Spearman).

    The candidates share one computation of the features per batch.
    """
    records = run.recorder.records
    statistics = post_processor_normalization(run.post_processor)
    assert statistics is not None
    nominal_maps = torch.cat(run.nominal.maps)
    shared = PrecomputedFeatures()
    normalization = Normalization(*statistics)
    pipelines = {
        candidate.name: build_pipeline(
            refiner.pipeline, candidate_overrides(candidate, nominal_maps, normalization), features=shared
        )
        for candidate in DEFAULT_CANDIDATES
    }
    device = next(model.parameters(), torch.empty(0)).device
    model.eval()
    refiner.bind(model)
    masks: dict[str, list[Tensor]] = {name: [] for name in pipelines}
    for batch in recorded_batches(run, config.batch_size, device):
        inputs = refiner.inputs(BatchFields.of(batch))
        shared.maps = list(refiner.pipeline.features(inputs.modalities))
        for name, pipeline in pipelines.items():
            masks[name].append(pipeline(inputs).masks.cpu())
    refiner.release()
    rows, synthetic, real = [], [], []
    for name, kept in masks.items():
        scores = records.scores(torch.cat(kept))
        label = f"candidate: {name}" + (" (chosen)" if name == calibration.choice else "")
        rows.append({"masks": label, "synthetic_mean_f1": calibration.scores[name]["mean_f1"], **scores})
        synthetic.append(calibration.scores[name]["mean_f1"])
        real.append(scores["mean_f1_defective"])
    return rows, spearman(synthetic, real)


def spearman(first: Sequence[float], second: Sequence[float]) -> float:
    """Spearman's rank correlation of two sequences (ties get their mean rank); ``nan`` below two values.

    Example:
        >>> spearman([0.1, 0.5, 0.3], [1.0, 3.0, 2.0]), spearman([1, 2, 3], [3, 2, 1])
        (1.0, -1.0)
    """
    if len(first) < 2:
        return float("nan")

    def ranks(values: Sequence[float]) -> Tensor:
        tensor = torch.tensor(values, dtype=torch.float64)
        order = tensor.argsort()
        result = torch.empty_like(tensor)
        result[order] = torch.arange(len(values), dtype=torch.float64)
        for value in tensor.unique():  # ties share their mean rank
            tied = tensor == value
            result[tied] = result[tied].mean()
        return result

    a, b = ranks(first), ranks(second)
    a, b = a - a.mean(), b - b.mean()
    denominator = float((a.square().sum() * b.square().sum()).sqrt())
    return float((a * b).sum()) / denominator if denominator > 0 else float("nan")


def panel_indices(count: int, panels: int) -> list[int]:
    """``panels`` test images spread evenly over the (sorted) test set, so every defect type shows up.

    Example:
        >>> panel_indices(10, 3)
        [0, 4, 9]
    """
    if panels <= 0 or count == 0:
        return []
    return sorted({round(position) for position in torch.linspace(0, count - 1, min(panels, count)).tolist()})


MASK_STYLE = {"cmap": "gray", "vmin": 0, "vmax": 1}


def write_panels(folder: Path, run: RecordedRun, refined: dict[str, Tensor], indices: Sequence[int]) -> list[Path]:
    """One PNG per image: image | score map | anomalib's mask | each refined mask | ground truth."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    records = run.recorder.records
    maps, gt_masks, anomalib_masks = run.score_maps, records.stacked("gt_masks"), records.stacked("pred_masks")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index in indices:
        path = Path(records.paths[index])
        height, width = maps.shape[-2:]
        image = Image.open(path).convert("RGB").resize((width, height))
        columns = [
            ("image", image, {}),
            ("score map (image range)", maps[index], {"cmap": "jet"}),
            ("anomalib threshold", anomalib_masks[index], MASK_STYLE),
            *((f"refined: {name}", masks[index], MASK_STYLE) for name, masks in refined.items()),
            ("ground truth", gt_masks[index], MASK_STYLE),
        ]
        figure, axes = plt.subplots(1, len(columns), figsize=(2.6 * len(columns), 2.9))
        for axis, (title, picture, style) in zip(axes, columns, strict=True):
            axis.imshow(picture if isinstance(picture, Image.Image) else picture.float().numpy(), **style)
            axis.set_title(title, fontsize=8)
            axis.axis("off")
        figure.suptitle(f"{path.parent.name}/{path.name}", fontsize=9)
        figure.tight_layout()
        target = folder / f"{index:04d}_{path.parent.name}_{path.stem}.png"
        figure.savefig(target, dpi=80)
        plt.close(figure)
        written.append(target)
    return written


def compare_one(
    config: CompareConfig, model_spec: ModelSpec, dataset: DatasetSpec, advance: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Rows of one model x dataset: every baseline, then every refinement setting, on the same test run."""
    advance(f"{dataset.name} / {model_spec.name}: fit or load, validate, test")
    model, run = run_model(config, model_spec, dataset)
    records = run.recorder.records
    maps = run.score_maps
    names = {"model": model_spec.name, "dataset": dataset.name}
    rows = []
    for name, threshold_of in BASELINES.items():
        threshold = threshold_of(run)
        rows.append({**names, "masks": name, "threshold": threshold, **records.scores(maps > threshold)})
    rows.append({**names, "masks": MEBIN_ROW, **records.scores(mebin_recorded(run, config.batch_size))})
    alone = StableThreshold()(maps, maps > run.anomalib_threshold, run.anomalib_threshold)
    rows.append({**names, "masks": FALLBACK_ROW, **records.scores(alone)})
    refined: dict[str, Tensor] = {}
    candidates_measured = False
    for spec in config.refinements:
        advance(f"{dataset.name} / {model_spec.name}: refinement {spec.name}")
        refiner = spec.build()
        label = f"refined: {spec.name}"
        extra: dict[str, Any] = {}
        if spec.calibrated:
            calibration = calibrate_recorded(refiner, model, run, config)
            refiner = BatchRefiner(build_pipeline(refiner.pipeline, calibration.overrides), refiner.gate)
            label = f"calibrated: {spec.name} (chose {calibration.choice})"
            extra = {"calibration_seconds": calibration.seconds, "validation_seconds": run.validation_seconds}
            if not candidates_measured:
                candidates_measured = True
                found, correlation = candidate_rows(spec.build(), calibration, model, run, config)
                extra["rank_correlation"] = correlation
                rows.extend({**names, **row} for row in found)
        refined[spec.name], timing = refine_recorded(refiner, model, run, config.batch_size)
        if timing["images_refined"] == 0 and not label.startswith("calibrated"):
            label += " (no image refined: the fallback's masks)"
        rows.append({**names, "masks": label, **records.scores(refined[spec.name]), **timing, **extra})
    folder = Path(config.output) / "panels" / str(dataset.name) / model_spec.name
    write_panels(folder, run, refined, panel_indices(len(records.paths), config.panels))
    for row in rows:
        row["model_ms_per_image"] = 1000 * run.model_seconds_per_image
    return rows


def run_compare(config: CompareConfig) -> list[dict[str, Any]]:
    """Run the whole grid with a progress bar, write ``results.csv`` / ``results.md`` after every model x dataset,
    print the table.

    Returns:
        One dict per row of the table (keys :data:`COLUMNS`, plus ``model_ms_per_image``).
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    steps = len(config.models) * len(config.datasets) * (1 + len(config.refinements))
    output = Path(config.output)
    rows: list[dict[str, Any]] = []
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    with Progress(*columns, TimeElapsedColumn()) as progress:
        task = progress.add_task("comparing", total=steps)
        started = False

        def advance(description: str) -> None:
            nonlocal started
            progress.update(task, description=description, advance=1 if started else 0)
            started = True

        for dataset in config.datasets:
            for model_spec in config.models:
                rows.extend(compare_one(config, model_spec, dataset, advance))
                write_results(output, rows)  # after every model x dataset: a stopped run keeps what it measured
        progress.update(task, description="done", completed=steps)
    print_table(rows)
    print(f"Results: {output / 'results.csv'}, {output / 'results.md'}; panels under {output / 'panels'}")
    return rows


def _cell(row: dict[str, Any], column: str, digits: int = 3) -> str:
    value = row.get(column)
    if value is None:
        return "-"
    if column == "images_refined":
        return f"{int(value)}"
    if column == "ms_per_image":
        return f"{value:.0f}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_results(output: Path, rows: Sequence[dict[str, Any]]) -> None:
    """``results.csv`` and ``results.md`` under ``output``, replaced by the rows measured so far."""
    write_csv(output / "results.csv", rows)
    (output / "results.md").write_text(markdown_table(rows))


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """All rows, every column (empty where a column does not apply), full precision."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[*COLUMNS, *EXTRA_COLUMNS], restval="")
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The table as Markdown, with the model's own test time per image and the calibrations under it.

    Example:
        >>> print(markdown_table([{"model": "m", "dataset": "d", "masks": "x", "pixel_f1_all": 0.5}]).splitlines()[2])
        | m | d | x | - | 0.500 | - | - | - | - | - | - | - | - | - |
    """
    lines = ["| " + " | ".join(HEADERS[column] for column in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row, column) for column in COLUMNS) + " |" for row in rows]
    timings = {(row["model"], row["dataset"]): row["model_ms_per_image"] for row in rows if "model_ms_per_image" in row}
    if timings:
        lines.append("")
        lines += [
            f"- {model} on {dataset}: the model's test step took {ms:.0f} ms per image"
            for (model, dataset), ms in timings.items()
        ]
    lines += [
        f"- {row['model']} on {row['dataset']}: calibration took {row['calibration_seconds']:.0f} s; rank correlation "
        f"(Spearman) of the candidates' mean F1 on the synthetic defects with their mean F1 on the test images: "
        f"{row['rank_correlation']:.2f}"
        for row in rows
        if "rank_correlation" in row
    ]
    return "\n".join(lines) + "\n"


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    """The table on the console (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="binary masks: thresholds vs. test-time refinement")
    for column in COLUMNS:
        table.add_column(HEADERS[column], justify="left" if column in {"model", "dataset", "masks"} else "right")
    for row in rows:
        table.add_row(*(_cell(row, column) for column in COLUMNS))
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a log file: no wrapping of the cells
    console.print(table)


def parse_config(argv: Sequence[str] | None = None) -> CompareConfig:
    """A :class:`CompareConfig` from ``--config FILE.yaml`` and command-line overrides (jsonargparse)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="anomalib-tts compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of the options below")
    parser.add_class_arguments(CompareConfig, as_group=False)
    arguments = parser.instantiate_classes(parser.parse_args(list(argv) if argv is not None else None))
    return CompareConfig(**{name: value for name, value in vars(arguments).items() if name != "config"})


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Entry point of ``python -m anomalib_tts.compare`` and ``anomalib-tts compare``."""
    return run_compare(parse_config(argv))


if __name__ == "__main__":
    main()
