"""The package's layers: the pipeline is torch only, and Lightning's callback factory costs a Trainer nothing."""

import ast
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import anomalib_tts
from tests.helpers import python_result

from .conftest import REPOSITORY

PIPELINE = REPOSITORY / "src" / "anomalib_tts" / "pipeline"
CALIBRATION = REPOSITORY / "src" / "anomalib_tts" / "calibration"
FACTORY = "anomalib_tts.lightning.factory:callbacks_from_environment"
FACTORY_GROUP = "lightning.pytorch.callbacks_factory"


def _is_forbidden(module: str) -> bool:
    """Lightning (``lightning*``, ``pytorch_lightning*``) or anomalib (``anomalib``, ``anomalib.*``; not
    ``anomalib_tts``)."""
    top = module.split(".")[0]
    return top.startswith(("lightning", "pytorch_lightning")) or top == "anomalib"


def forbidden_imports(source: str) -> list[str]:
    """Lightning and anomalib modules that ``source`` imports anywhere: at the top, inside functions or classes,
    by ``import``, ``from ... import`` or ``importlib.import_module("...")``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if _is_forbidden(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _is_forbidden(node.module):
            found.append(node.module)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and _is_forbidden(node.args[0].value)
        ):
            found.append(node.args[0].value)
    return found


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import lightning.pytorch as pl", ["lightning.pytorch"]),
        ("import torch, pytorch_lightning", ["pytorch_lightning"]),
        ("def f():\n    from anomalib.models import Padim\n", ["anomalib.models"]),
        ("class A:\n    def g(self):\n        import anomalib\n", ["anomalib"]),
        ("from lightning import Trainer", ["lightning"]),
        ("import importlib\nimportlib.import_module('anomalib.data')", ["anomalib.data"]),
        ("from anomalib_tts.pipeline import RefinementPipeline\nimport anomalib_tts", []),
        ("import lightning_fabric.utilities", ["lightning_fabric.utilities"]),
        ("from . import sampling\nfrom .features import source\nimport flightning", []),
    ],
)
def test_the_import_check_finds_every_form_of_import(source: str, expected: list[str]) -> None:
    assert forbidden_imports(source) == expected


def test_no_module_of_the_pipeline_or_the_calibration_imports_lightning_or_anomalib() -> None:
    files = sorted([*PIPELINE.rglob("*.py"), *CALIBRATION.rglob("*.py")])
    assert Path(anomalib_tts.__file__).parent / "pipeline" == PIPELINE  # the files of the package under test
    assert {"refinement.py", "labelers.py", "classifiers.py", "backbone.py", "geometry.py", "calibrate.py"} <= {
        path.name for path in files
    }
    offending = {
        str(path.relative_to(PIPELINE.parent)): found
        for path in files
        if (found := forbidden_imports(path.read_text(encoding="utf-8")))
    }
    assert offending == {}


def test_importing_the_pipeline_loads_no_lightning_or_anomalib(tmp_path: Path) -> None:
    code = (
        "import sys; import anomalib_tts.pipeline, anomalib_tts.calibration; "
        "from anomalib_tts.pipeline import RefinementPipeline; RefinementPipeline(features='timm'); "
        "result = sorted(sys.modules)"
    )
    modules = python_result(code, tmp_path)
    assert {"anomalib_tts.pipeline", "anomalib_tts.pipeline.refinement", "anomalib_tts.calibration", "torch"} <= set(
        modules
    )
    assert [module for module in modules if _is_forbidden(module)] == []


def test_the_callback_factory_is_the_registered_entry_point() -> None:
    """So that the next test sees the factory run in every Trainer (and cannot pass by its absence)."""
    (entry,) = [entry for entry in entry_points(group=FACTORY_GROUP) if entry.value.startswith("anomalib_tts")]
    assert entry.value == FACTORY
    assert callable(entry.load())


def test_a_trainer_without_anomalib_tts_config_imports_the_factory_only(tmp_path: Path) -> None:
    code = (
        "import os, sys; os.environ.pop('ANOMALIB_TTS_CONFIG', None)\n"
        "from lightning.pytorch import Trainer\n"
        "trainer = Trainer(accelerator='cpu', logger=False, enable_checkpointing=False, enable_progress_bar=False)\n"
        "result = {'modules': sorted(name for name in sys.modules if name.startswith('anomalib_tts')), "
        "'callbacks': [type(callback).__module__ for callback in trainer.callbacks]}"
    )
    printed = python_result(code, tmp_path)
    assert printed["modules"] == ["anomalib_tts", "anomalib_tts.lightning", "anomalib_tts.lightning.factory"]
    assert not any(module.startswith("anomalib_tts") for module in printed["callbacks"])
