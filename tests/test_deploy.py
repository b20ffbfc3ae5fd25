"""Refinement outside Lightning (``anomalib_tts.deploy``): the callback's masks from tensors and from inferencers."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from anomalib.data import ImageBatch
from anomalib.post_processing import PostProcessor
from PIL import Image
from torch import nn

from anomalib_tts.adapter import BatchFields, BatchRefiner, unclipped_scores
from anomalib_tts.deploy import SegmentationRefiner
from anomalib_tts.lightning.callback import TestTimeSegmentation
from anomalib_tts.pipeline import RefinementPipeline
from tests.helpers import python_result, small_features

from .conftest import CONFIGS, REPOSITORY, make_padim

EXAMPLE = REPOSITORY / "examples" / "deploy_refinement.py"
SMALL = {"max_positives": 100, "max_negatives": 100}  # small caps keep the fits fast


def _pipeline(**options) -> RefinementPipeline:
    """The pipeline on the shared random-weight backbone, as the callbacks of these tests build it."""
    return RefinementPipeline(features=small_features(), **SMALL, **options)


def _callback(**options) -> TestTimeSegmentation:
    return TestTimeSegmentation(features=small_features(), **SMALL, **options)


def _scene(batch: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and normalized maps with one confident rectangle per image."""
    generator = torch.Generator().manual_seed(seed)
    images = 0.3 * torch.rand(batch, 3, size, size, generator=generator)
    maps = 0.3 * torch.rand(batch, size, size, generator=generator)
    for index in range(batch):
        corner = 2 + 3 * index
        maps[index, corner : corner + 8, corner : corner + 10] = 0.9
        images[index, :, corner : corner + 8, corner : corner + 10] += 0.5
    return images, maps


def _post_processor(threshold: float, low: float, high: float) -> PostProcessor:
    post_processor = PostProcessor()
    post_processor._pixel_threshold.fill_(threshold)  # the statistics of a fitted model
    post_processor.pixel_min.fill_(low)
    post_processor.pixel_max.fill_(high)
    return post_processor


def test_tensors_in_masks_out_equal_the_callbacks_refine_batch() -> None:
    images, maps = _scene(3)
    paths = [f"parts/{index}.png" for index in range(3)]
    batch = ImageBatch(image=images, anomaly_map=maps, pred_mask=maps > 0.5, image_path=paths)
    callback = _callback()
    callback.refine_batch(batch)

    refiner = SegmentationRefiner(pipeline=_pipeline())
    masks = refiner(images, maps[:, None], image_path=paths)  # (B, 1, H, W) maps, as anomalib's batches hold them
    assert masks.shape == (3, 32, 32) and masks.dtype == torch.bool
    assert torch.equal(masks, batch.pred_mask)
    assert not torch.equal(masks, maps > 0.5)  # refined, not the threshold
    single = refiner(images[1], maps[1], image_path=paths[1])  # one image: (C, H, W) and (H, W) in, (H, W) out
    assert single.shape == (32, 32) and torch.equal(single, masks[1])
    assert refiner.stats.refined == 4  # the callback's statistics, over both calls
    assert refiner.stats is refiner.refiner.stats and isinstance(refiner.refiner, BatchRefiner)


def test_raw_map_is_normalized_unclipped_with_the_models_post_processor_statistics() -> None:
    images, maps = _scene(2)
    maps[:, 18:30, 18:30] = 0.4  # unclipped 0.1: a negative once the map is clipped (its median falls to 0), not before
    post_processor = _post_processor(threshold=30.0, low=10.0, high=20.0)
    raw = 30.0 + 10.0 * (maps - 0.5) * 4  # normalized: 0.5 + 4 (maps - 0.5), the values spread past [0, 1]
    model = nn.Module()
    model.post_processor = post_processor
    refiner = SegmentationRefiner(model, _pipeline())
    clipped = unclipped_scores(raw, post_processor).clamp(0, 1)  # what an inferencer returns

    from_raw = refiner(images, clipped, raw_anomaly_map=raw, image_path=["a.png", "b.png"])
    from_unclipped = SegmentationRefiner(pipeline=_pipeline())(
        images, unclipped_scores(raw, post_processor), image_path=["a.png", "b.png"]
    )
    assert torch.equal(from_raw, from_unclipped)
    from_clipped = refiner(images, clipped, image_path=["a.png", "b.png"])
    assert not torch.equal(from_raw, from_clipped)  # clipping changes the pseudo-labels


def test_the_pixel_threshold_comes_from_the_models_post_processor() -> None:
    model = nn.Module()
    model.post_processor = SimpleNamespace(normalized_pixel_threshold=torch.tensor(0.4))  # normalizing around 0.4
    assert SegmentationRefiner(model, _pipeline()).refiner.nominal_threshold == pytest.approx(0.4)
    assert SegmentationRefiner(pipeline=_pipeline()).refiner.nominal_threshold == 0.5  # no model: anomalib's


def test_arrays_of_an_openvino_prediction_are_refined_like_tensors() -> None:
    images, maps = _scene(2)
    numpy_prediction = SimpleNamespace(
        image=images.permute(0, 2, 3, 1).numpy(),  # NumpyImageBatch: channels last
        anomaly_map=maps[..., None].numpy(),
        pred_mask=(maps > 0.5)[..., None].numpy(),
        pred_label=np.array([True, True]),
        image_path=None,
    )
    refiner = SegmentationRefiner(pipeline=_pipeline())
    expected = refiner(images, maps, pred_mask=maps > 0.5, image_path=["a.png", "b.png"])
    assert torch.equal(refiner.refine_prediction(numpy_prediction, image_path=["a.png", "b.png"]), expected)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda refine: refine(torch.rand(32, 32), torch.rand(32, 32)), r"image must be \(C, H, W\)"),
        (lambda refine: refine(torch.rand(2, 3, 32, 32), torch.rand(3, 32, 32)), "B = 2 images, got"),
        (lambda refine: refine(torch.rand(3, 32, 32), torch.rand(2, 2, 32, 32)), r"anomaly_map must be \(H, W\)"),
        (
            lambda refine: refine(torch.rand(3, 32, 32), torch.rand(32, 32), raw_anomaly_map=torch.rand(16, 16)),
            "raw_anomaly_map",
        ),
        (lambda refine: refine(torch.rand(3, 32, 32), torch.rand(32, 32), pred_mask=torch.ones(8, 8)), "pred_mask"),
        (
            lambda refine: refine(torch.rand(2, 3, 32, 32), torch.rand(2, 32, 32), image_path="one.png"),
            "image_path names 1 images, the batch holds 2",
        ),
    ],
)
def test_inputs_that_do_not_fit_fail_naming_them(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(SegmentationRefiner(pipeline=_pipeline()))


def test_options_are_the_callbacks_and_model_features_need_a_model() -> None:
    with pytest.raises(ValueError, match="unknown classifier 'nonsense'"):
        SegmentationRefiner.from_init_args({"classifier": "nonsense"})
    with pytest.raises(ValueError, match="gate must be 'none' or 'pred_label'"):
        SegmentationRefiner(pipeline=_pipeline(), gate="always")
    with pytest.raises(ValueError, match="ModelFeatures needs an anomalib model"):
        SegmentationRefiner(pipeline=RefinementPipeline(features="model"))
    with pytest.raises(ValueError, match="ModelFeatures needs an anomalib model"):
        SegmentationRefiner.from_init_args({"features": "model"})
    with pytest.raises(ValueError, match="model must be an anomalib model"):
        SegmentationRefiner("model.pt")
    refiner = SegmentationRefiner(make_padim(), RefinementPipeline(features="model"))
    with pytest.raises(ValueError, match="TorchInferencer of this refiner's model"):
        refiner.predict(SimpleNamespace(model=make_padim()), "image.png")


def test_from_init_args_takes_a_configs_callback_entry_and_ignores_its_lightning_options() -> None:
    """The same init args build the same pipeline and gate as the callback, whose ``stages`` do not apply here."""
    init_args = {
        "pseudo_labels": {"class_path": "anomalib_tts.NominalAware", "init_args": {"positive_margin": 0.2}},
        "features": {
            "class_path": "anomalib_tts.TimmFeatures",
            "init_args": {"backbone": "resnet18", "pre_trained": False},
        },
        "classifier": "svm",
        "fallback": "threshold",
        "gate": "pred_label",
        "max_negatives": 321,
        "stages": ["predict"],
    }
    refiner = SegmentationRefiner.from_init_args(init_args)
    callback = TestTimeSegmentation.from_init_args(init_args)
    for built in (refiner.refiner, callback.refiner):
        pipeline = built.pipeline
        assert (type(pipeline.pseudo_labels).__name__, pipeline.pseudo_labels.positive_margin) == ("NominalAware", 0.2)
        assert (pipeline.features.backbone, type(pipeline.classifier).__name__) == ("resnet18", "LinearSVM")
        assert (type(pipeline.fallback).__name__, pipeline.max_negatives) == ("ThresholdMask", 321)
        assert built.gate == "pred_label"
    assert refiner.model is None


def test_refining_tensors_builds_no_callback_and_no_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refiner drives the adapter on the tensors' fields: no TestTimeSegmentation, no batch object."""

    def refuse(*args, **kwargs):
        raise AssertionError("SegmentationRefiner built a callback or went through a batch")

    images, maps = _scene(2)
    expected = SegmentationRefiner(pipeline=_pipeline())(images, maps, image_path=["a.png", "b.png"])
    monkeypatch.setattr(TestTimeSegmentation, "__init__", refuse)
    monkeypatch.setattr(BatchRefiner, "refine_batch", refuse)  # the path of batch objects (the callback's)
    monkeypatch.setattr(BatchFields, "of", refuse)  # reading a batch object's fields
    monkeypatch.setattr(ImageBatch, "__init__", refuse)
    with pytest.raises(AssertionError, match="built a callback"):
        TestTimeSegmentation()  # the patch is in place
    refiner = SegmentationRefiner(pipeline=_pipeline())
    assert torch.equal(refiner(images, maps, image_path=["a.png", "b.png"]), expected)
    assert refiner.stats.refined == 2


def test_refining_tensors_imports_nothing_of_the_lightning_door(tmp_path: Path) -> None:
    code = """
import sys, torch
from anomalib_tts.deploy import SegmentationRefiner
from anomalib_tts.pipeline import RefinementPipeline, TimmFeatures
features = TimmFeatures("resnet18", layers=["layer1"], pre_trained=False)
refiner = SegmentationRefiner(pipeline=RefinementPipeline(features=features, max_positives=100, max_negatives=100))
maps = 0.3 * torch.rand(2, 32, 32)
maps[:, 4:12, 4:14] = 0.9
refiner(torch.rand(2, 3, 32, 32), maps, image_path=["a.png", "b.png"])
result = {"refined": refiner.stats.refined, "modules": sorted(sys.modules)}
"""
    printed = python_result(code, tmp_path)
    assert printed["refined"] == 2  # the refiner did run
    assert "anomalib_tts.deploy" in printed["modules"]
    assert "anomalib_tts.lightning.callback" not in printed["modules"]
    assert [name for name in printed["modules"] if name.startswith("anomalib_tts.lightning")] == []


def _example():
    spec = importlib.util.spec_from_file_location("deploy_refinement", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _png(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


@pytest.fixture(scope="module")
def exported_padim(padim_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``padim_checkpoint`` through anomalib's torch export: the ``.pt`` file ``TorchInferencer`` loads."""
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine

    root = tmp_path_factory.mktemp("exported")
    engine = Engine(default_root_dir=root, logger=False, enable_progress_bar=False)
    return engine.export(make_padim(), ExportType.TORCH, export_root=root, ckpt_path=padim_checkpoint)


@pytest.mark.slow
def test_torch_inferencer_on_a_folder_refines_to_the_masks_of_anomalib_predict(
    folder_predictions: dict, exported_padim: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example script on the exported model equals the callback in ``anomalib predict`` (configs/padim.yaml)."""
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # TorchInferencer unpickles the exported file
    output = tmp_path / "deployed-masks"
    masks = _example().main(
        [str(exported_padim), str(folder_predictions["images"]), "--config", str(CONFIGS / "padim.yaml")]
        + ["--output", str(output)]
    )
    returned = folder_predictions["returned"]

    assert list(masks) == returned["paths"]  # the same images, named alike (the names seed the sampling)
    thresholded = returned["anomaly_maps"] > 0.5
    assert not torch.equal(returned["pred_masks"].bool(), thresholded)  # the callback refined masks
    for path, mask, callback_mask in zip(masks, masks.values(), returned["pred_masks"], strict=True):
        assert torch.equal(mask, callback_mask.bool()), path
    written = sorted(path.relative_to(output) for path in output.rglob("*.png"))
    assert written == sorted(
        path.relative_to(folder_predictions["masks"]) for path in folder_predictions["masks"].rglob("*.png")
    )
    for relative in written:  # MaskWriter's files from `anomalib predict`, byte for byte in pixels
        assert np.array_equal(_png(output / relative), _png(folder_predictions["masks"] / relative)), relative


def test_example_reads_the_callbacks_options_from_a_config(tmp_path: Path) -> None:
    example = _example()
    options = example.refinement_options(CONFIGS / "padim.yaml")
    assert options["features"] == {"class_path": "anomalib_tts.ModelFeatures"}
    assert example.refinement_options(None) == {}
    (tmp_path / "none.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": []}}))
    with pytest.raises(SystemExit, match="lists no anomalib_tts.TestTimeSegmentation"):
        example.refinement_options(tmp_path / "none.yaml")


needs_openvino = pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("openvino", "onnx", "onnxscript")),
    reason="OpenVINO export needs openvino, onnx and onnxscript: pip install 'anomalib[openvino]' onnxscript",
)


@pytest.mark.slow
@needs_openvino
def test_openvino_predictions_refine_close_to_the_torch_inferencers(
    folder_predictions: dict, exported_padim: Path, padim_checkpoint: Path, tmp_path: Path, monkeypatch
) -> None:
    """OpenVINO returns the clipped map only: its refined masks are those of the clipped torch map, up to numerics."""
    from anomalib.deploy import ExportType, OpenVINOInferencer, TorchInferencer
    from anomalib.engine import Engine

    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    monkeypatch.chdir(tmp_path)  # OpenVINO writes its compiled-model cache into the working directory
    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    exported = engine.export(make_padim(), ExportType.OPENVINO, export_root=tmp_path, ckpt_path=padim_checkpoint)
    openvino, torch_inferencer = OpenVINOInferencer(exported, device="CPU"), TorchInferencer(exported_padim)
    from_openvino = SegmentationRefiner(pipeline=_pipeline())
    from_torch = SegmentationRefiner(torch_inferencer.model, _pipeline())
    agreement, refined = [], 0
    for path in folder_predictions["returned"]["paths"]:
        prediction = openvino.predict(path)
        masks = from_openvino.refine_prediction(prediction, image_path=path)
        reference = from_torch.refine_prediction(torch_inferencer.predict(path), image_path=path)
        agreement.append(float((masks == reference).float().mean()))
        refined += int(not np.array_equal(masks.numpy(), prediction.pred_mask[..., 0]))
    print(f"OpenVINO vs torch refined masks: pixel agreement min {min(agreement):.4f}, mean {np.mean(agreement):.4f}")
    assert refined > 0
    assert min(agreement) > 0.97  # 0.987 at the least, measured here (OpenVINO's maps differ by up to 0.01)
