"""Folders holding files that cannot be decoded, and resuming a stopped run.

``TolerantPredictDataset`` skips what it cannot decode (one warning per file), ``MaskWriter`` lists the skipped
files in ``skipped.csv`` and, with ``skip_existing``, leaves the masks of an earlier run; the deploy script does
the same. The slow tests run anomalib's real CLI and the deploy script on the folder of the issue: two defective
images, a grayscale, a 16x16, a 1600x1200 and an RGBA PNG, a text file, a PNG cut off after 3,000 bytes and an
empty ``.png``.
"""

import csv
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from anomalib.data import PredictDataset
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import Resize

from anomalib_tts import MaskWriter, TolerantPredictDataset
from anomalib_tts.data import SKIPPED_REPORT, write_skipped_report
from tests.helpers import run_anomalib, run_python
from tests.test_deploy import EXAMPLE, _example, exported_padim  # noqa: F401 (exported_padim: a fixture)

from .conftest import CONFIGS

BAD = ("cut.png", "empty.png")  # a PNG cut off after 3,000 bytes and an empty one
READABLE = ("defect_a.png", "defect_b.png", "gray.png", "large.png", "rgba.png", "tiny.png")


def make_folder(folder: Path, defects: list[Path], good: Path, large: tuple[int, int] = (1600, 1200)) -> Path:
    """The folder of the issue, from two defective images and a good one (``large``: the large image's size)."""
    folder.mkdir(parents=True)
    shutil.copy(defects[0], folder / "defect_a.png")
    shutil.copy(defects[1], folder / "defect_b.png")
    image = Image.open(good).convert("RGB")
    image.convert("L").save(folder / "gray.png")
    image.resize((16, 16)).save(folder / "tiny.png")
    image.resize(large).save(folder / "large.png")
    image.convert("RGBA").save(folder / "rgba.png")
    (folder / "notes.txt").write_text("not an image\n")
    whole = (folder / "large.png").read_bytes()
    assert len(whole) > 3000
    (folder / "cut.png").write_bytes(whole[:3000])
    (folder / "empty.png").write_bytes(b"")
    return folder


def issue_folder(folder: Path, synthetic_root: Path) -> Path:
    """The folder of the issue from the generated dataset's test images (two defective ones, a good one)."""
    test = synthetic_root / "texture" / "test"
    defects = sorted(path for path in test.rglob("*.png") if path.parent.name != "good")
    return make_folder(folder, [defects[0], defects[-1]], min((test / "good").glob("*.png")))


def small_folder(folder: Path) -> Path:
    """The same kinds of files, from random 64 px images (for the tests that run no model)."""
    generator = np.random.default_rng(0)
    sources = []
    for name in ("source_a.png", "source_b.png", "source_c.png"):
        path = folder.parent / name
        Image.fromarray(generator.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        sources.append(path)
    return make_folder(folder, sources[:2], sources[2], large=(320, 240))


@contextmanager
def bad_files_aside(folder: Path) -> Iterator[None]:
    """The bad files moved out of ``folder`` meanwhile: the readable images alone, at the same paths."""
    aside = folder.parent / f"{folder.name}-aside"
    aside.mkdir()
    for name in BAD:
        (folder / name).rename(aside / name)
    try:
        yield
    finally:
        for name in BAD:
            (aside / name).rename(folder / name)
        aside.rmdir()


def read_report(folder: Path) -> dict[str, str]:
    with (folder / SKIPPED_REPORT).open(newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["path", "reason"]
    return dict(rows[1:])


def masks_of(folder: Path) -> dict[str, np.ndarray]:
    return {path.relative_to(folder).as_posix(): np.array(Image.open(path)) for path in sorted(folder.rglob("*.png"))}


def mtimes(folder: Path) -> dict[str, int]:
    return {path.relative_to(folder).as_posix(): path.stat().st_mtime_ns for path in folder.rglob("*.png")}


def warned(output: str, path: Path) -> int:
    """How many warning records of ``output`` (log lines) name ``path`` as skipped."""
    return sum(f"skipped {path}: cannot read it as an image" in line for line in output.splitlines())


# Unit tests: the dataset and the writer, no model.


def test_truncated_and_empty_files_are_skipped_with_one_warning_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = small_folder(tmp_path / "incoming")
    dataset, reference = TolerantPredictDataset(folder), PredictDataset(folder)
    assert dataset.image_filenames == reference.image_filenames  # the same listing, in the same order (no .txt)
    readable = [index for index, path in enumerate(reference.image_filenames) if path.name not in BAD]

    with caplog.at_level(logging.WARNING, logger="anomalib_tts.data"):
        batches = list(DataLoader(dataset, batch_size=4, collate_fn=dataset.collate_fn))
        list(DataLoader(dataset, batch_size=4, collate_fn=dataset.collate_fn))  # a second pass warns no more
    assert [len(batch.image_path) for batch in batches] == [4, 2]  # full batches of readable images
    assert [path for batch in batches for path in batch.image_path] == [
        str(reference.image_filenames[index]) for index in readable
    ]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2
    for name, why in zip(BAD, ("image file is truncated", "cannot identify image file"), strict=True):
        assert sum(str(folder / name) in message for message in warnings) == 1, warnings
        assert why in dataset.skipped[str(folder / name)]
    assert list(dataset.skipped) == [str(folder / name) for name in BAD]

    items = list(dataset)  # readable images load as anomalib's PredictDataset loads them
    assert len(items) == len(readable)
    for item, index in zip(items, readable, strict=True):
        expected = reference[index]
        assert type(item) is type(expected) and item.image_path == expected.image_path
        assert torch.equal(item.image, expected.image), item.image_path
    resized = TolerantPredictDataset(folder, Resize((32, 32)))
    assert torch.equal(next(iter(resized)).image, PredictDataset(folder, Resize((32, 32)))[readable[0]].image)
    assert TolerantPredictDataset.check(folder / "cut.png") == "OSError: image file is truncated"
    assert TolerantPredictDataset.check(folder / "gray.png") is None


def test_files_to_skip_are_not_loaded_and_loader_workers_share_the_files(tmp_path: Path) -> None:
    folder = small_folder(tmp_path / "incoming")
    done = [str(folder / "defect_a.png"), str(folder / "tiny.png")]
    dataset = TolerantPredictDataset(folder, skip=done)
    assert len(dataset) == len(dataset.image_filenames) - 2
    loaded = [item.image_path for item in dataset]
    assert sorted(loaded) == sorted(str(folder / name) for name in READABLE if str(folder / name) not in done)

    dataset = TolerantPredictDataset(folder)
    loader = DataLoader(dataset, batch_size=2, collate_fn=dataset.collate_fn, num_workers=2)
    paths = [path for batch in loader for path in batch.image_path]
    assert sorted(paths) == sorted(str(folder / name) for name in READABLE)  # each image once
    writer = MaskWriter(output_dir=str(tmp_path / "masks"))
    writer._predicted = set(paths)
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), datamodule=None, predict_dataloaders=[loader])
    skipped = writer.skipped_files(trainer)  # skipped in the workers, found again here
    assert sorted(skipped) == [str(folder / name) for name in BAD]


def _predict(writer: MaskWriter, dataset: TolerantPredictDataset, root: Path) -> list[str]:
    """MaskWriter's hooks in the order of ``trainer.predict`` over ``dataset``; returns the images predicted."""
    loader = DataLoader(dataset, batch_size=2, collate_fn=dataset.collate_fn)
    trainer = SimpleNamespace(
        default_root_dir=str(root), datamodule=None, predict_dataloaders=[loader], is_global_zero=True
    )
    writer.on_predict_start(trainer, None)
    writer.on_predict_epoch_start(trainer, None)
    predicted = []
    for batch_idx, batch in enumerate(loader):
        masks = torch.zeros(len(batch.image_path), 1, 8, 8, dtype=torch.bool)
        masks[:, :, 2:5, 2:6] = True
        writer.write_on_batch_end(trainer, None, SimpleNamespace(pred_mask=masks, image_path=batch.image_path),
                                  None, batch, batch_idx, 0)  # fmt: skip
        predicted += batch.image_path
    writer.on_predict_epoch_end(trainer, None)
    return predicted


def test_mask_writer_reports_skipped_files_and_resumes_without_rewriting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = small_folder(tmp_path / "incoming")
    output = tmp_path / "masks"
    with caplog.at_level(logging.INFO):
        _predict(MaskWriter(output_dir=str(output)), TolerantPredictDataset(folder), tmp_path)
    assert sorted(masks_of(output)) == sorted(f"incoming/{name}" for name in READABLE)
    assert set(read_report(output)) == {str(folder / name) for name in BAD}
    assert "image file is truncated" in read_report(output)[str(folder / "cut.png")]
    assert f"wrote 6 masks to {output.resolve()}; skipped 2 unreadable files" in caplog.text
    assert not list(output.rglob("*.partial"))  # each mask renamed into place once whole

    removed = ["incoming/gray.png", "incoming/tiny.png"]
    for name in removed:
        (output / name).unlink()
    before = mtimes(output)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        predicted = _predict(MaskWriter(output_dir=str(output), skip_existing=True), TolerantPredictDataset(folder),
                             tmp_path)  # fmt: skip
    assert predicted == [str(folder / "gray.png"), str(folder / "tiny.png")]  # the others are not even loaded
    after = mtimes(output)
    assert {name: after[name] for name in before} == before  # nothing written again
    assert sorted(after) == sorted(f"incoming/{name}" for name in READABLE)
    assert "wrote 2 masks" in caplog.text and "kept 4 masks of an earlier run" in caplog.text
    assert set(read_report(output)) == {str(folder / name) for name in BAD}  # still unreadable: listed again

    # over a dataset that cannot skip (anomalib's own), the writer still keeps what exists
    writer = MaskWriter(output_dir=str(output), skip_existing=True)
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), datamodule=None, predict_dataloaders=None)
    writer.on_predict_epoch_start(trainer, None)
    masks = torch.ones(1, 8, 8, dtype=torch.bool)
    writer.write_on_batch_end(trainer, None, SimpleNamespace(pred_mask=masks, image_path=[str(folder / "gray.png")]),
                              None, None, 0, 0)  # fmt: skip
    assert mtimes(output) == after and writer._kept == 1


def test_the_report_is_written_when_nothing_was_skipped(tmp_path: Path) -> None:
    report = write_skipped_report(tmp_path / "masks", {})
    assert report == tmp_path / "masks" / SKIPPED_REPORT
    assert read_report(tmp_path / "masks") == {}


# The real CLI and the deploy script.


@pytest.fixture(scope="module")
def cli_runs(synthetic_root: Path, padim_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``anomalib predict`` (configs/padim.yaml, random weights) with ``TolerantPredictDataset`` on the folder of
    the issue, then with anomalib's own ``--data <folder>`` on the same folder without its two bad files."""
    work = tmp_path_factory.mktemp("bad_files_cli")
    folder = issue_folder(work / "incoming", synthetic_root)
    common = ["predict", "--config", str(CONFIGS / "padim.yaml"), "--model.init_args.pre_trained", "false",
              "--ckpt_path", str(padim_checkpoint)]  # fmt: skip
    output = run_anomalib(  # fails the test unless the exit code is 0
        *common, "--data", "anomalib_tts.TolerantPredictDataset", "--data.path", str(folder),
        "--default_root_dir", str(work / "bad"), cwd=work,
    )  # fmt: skip
    with bad_files_aside(folder):
        run_anomalib(*common, "--data", str(folder), "--default_root_dir", str(work / "clean"), cwd=work)
    return {
        "folder": folder,
        "output": output,
        "masks": next((work / "bad").rglob("masks")),
        "clean": next((work / "clean").rglob("masks")),
        "checkpoint": padim_checkpoint,
    }


@pytest.mark.slow
def test_anomalib_predict_skips_the_unreadable_files_and_refines_every_other_image(cli_runs: dict) -> None:
    folder, output = cli_runs["folder"], cli_runs["output"]
    masks, clean = masks_of(cli_runs["masks"]), masks_of(cli_runs["clean"])
    assert sorted(masks) == sorted(f"incoming/{name}" for name in READABLE)  # one mask per readable image
    assert masks.keys() == clean.keys()
    for name, mask in masks.items():  # equal to anomalib's run over the readable images alone
        assert np.array_equal(mask, clean[name]), name
    assert masks["incoming/defect_a.png"].any() and masks["incoming/defect_b.png"].any()  # not all empty
    assert masks["incoming/large.png"].shape == (1200, 1600) and masks["incoming/tiny.png"].shape == (16, 16)
    for name in BAD:
        assert warned(output, folder / name) == 1, output[-3000:]
    assert set(read_report(cli_runs["masks"])) == {str(folder / name) for name in BAD}
    assert "skipped 2 unreadable files" in output and "wrote 6 masks" in output


@pytest.mark.slow
def test_anomalib_predict_resumes_without_rewriting_the_masks_it_has(cli_runs: dict, tmp_path: Path) -> None:
    """A second run with ``skip_existing: true`` (and the dataset by ``class_path`` in the YAML) predicts the two
    images whose masks are missing, and leaves the others as they are."""
    output = tmp_path / "masks"
    shutil.copytree(cli_runs["masks"], output)
    removed = ["incoming/defect_b.png", "incoming/tiny.png"]
    for name in removed:
        (output / name).unlink()
    (output / SKIPPED_REPORT).unlink()
    before = mtimes(output)
    config = yaml.safe_load((CONFIGS / "padim.yaml").read_text())
    config["data"] = {
        "class_path": "anomalib_tts.TolerantPredictDataset",
        "init_args": {"path": str(cli_runs["folder"])},
    }
    (writer,) = [entry for entry in config["trainer"]["callbacks"] if entry["class_path"] == "anomalib_tts.MaskWriter"]
    writer["init_args"] = {"output_dir": str(output), "skip_existing": True}
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(config))

    printed = run_anomalib(
        "predict", "--config", str(tmp_path / "resume.yaml"), "--model.init_args.pre_trained", "false",
        "--ckpt_path", str(cli_runs["checkpoint"]), "--default_root_dir", str(tmp_path / "results"), cwd=tmp_path,
    )  # fmt: skip
    assert "of 2 images" in printed  # the refinement's summary: the model ran on the two missing images only
    assert "wrote 2 masks" in printed and "kept 4 masks of an earlier run" in printed
    after = mtimes(output)
    assert {name: after[name] for name in before} == before
    masks, clean = masks_of(output), masks_of(cli_runs["clean"])
    assert masks.keys() == clean.keys()
    for name in removed:
        assert np.array_equal(masks[name], clean[name]), name
    assert set(read_report(output)) == {str(cli_runs["folder"] / name) for name in BAD}


@pytest.mark.slow
def test_deploy_script_skips_the_unreadable_files_and_resumes(
    synthetic_root: Path,
    exported_padim: Path,  # noqa: F811 (the fixture imported from test_deploy)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = issue_folder(tmp_path / "incoming", synthetic_root)
    arguments = [str(exported_padim), str(folder), "--config", str(CONFIGS / "padim.yaml")]
    # run_python fails the test unless the exit code is 0
    output = run_python(
        str(EXAMPLE), *arguments, "--output", str(tmp_path / "bad"), cwd=tmp_path, TRUST_REMOTE_CODE="1"
    )
    for name in BAD:
        assert warned(output, folder / name) == 1, output[-3000:]
    assert set(read_report(tmp_path / "bad")) == {str(folder / name) for name in BAD}
    assert "skipped 2 unreadable files" in output

    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    with bad_files_aside(folder):
        _example().main([*arguments, "--output", str(tmp_path / "clean")])
    masks, clean = masks_of(tmp_path / "bad"), masks_of(tmp_path / "clean")
    assert sorted(masks) == sorted(f"incoming/{name}" for name in READABLE) == sorted(clean)
    for name, mask in masks.items():
        assert np.array_equal(mask, clean[name]), name

    removed = ["incoming/defect_a.png", "incoming/large.png"]
    for name in removed:
        (tmp_path / "bad" / name).unlink()
    before = mtimes(tmp_path / "bad")
    predicted = _example().main([*arguments, "--output", str(tmp_path / "bad"), "--skip-existing"])
    assert sorted(predicted) == [str(folder / "defect_a.png"), str(folder / "large.png")]  # the missing ones only
    after = mtimes(tmp_path / "bad")
    assert {name: after[name] for name in before} == before
    for name in removed:
        assert np.array_equal(np.array(Image.open(tmp_path / "bad" / name)), clean[name]), name
