"""The fast paths of the refinement give the masks of a straightforward one, and the accelerator's path reads little.

On CPU the pipeline draws training pixels and selects quantiles with NumPy and runs a leaner solver loop; on an
accelerator it branches on nothing it computed. Both are checked here against straightforward implementations (the
torch selections over every pixel and the solver loop as first written), and the accelerator's path is taken on
CPU (:func:`~anomalib_tts.pipeline.devices.accelerator_path`) to count what it reads back.
"""

import itertools

import pytest
import torch
from torch import Tensor

from anomalib_tts.pipeline import labelers, sampling
from anomalib_tts.pipeline.classifiers import LinearClassifier, LogisticRegression
from anomalib_tts.pipeline.devices import accelerator_path, device_constant
from anomalib_tts.pipeline.features import FeatureSource, Modalities
from anomalib_tts.pipeline.refinement import Outcome, RefinedMasks, RefinementInputs, RefinementPipeline
from anomalib_tts.pipeline.solvers import SOLVERS, LinearProblem, Solver, _inverse_bound, row_times

SIZE = 96


class _Levels(FeatureSource):
    """Two feature levels at 1/4 and 1/8 of the map's resolution, as a backbone's: noise plus the defect's trace."""

    def __call__(self, inputs: Modalities) -> list[Tensor]:
        generator = torch.Generator().manual_seed(3)
        defect = inputs.image[:, :1]
        levels = []
        for channels, stride in ((24, 4), (40, 8)):
            trace = torch.nn.functional.avg_pool2d(defect, stride)
            noise = torch.randn(defect.shape[0], channels, SIZE // stride, SIZE // stride, generator=generator)
            levels.append(noise + 3.0 * trace * torch.randn(1, channels, 1, 1, generator=generator))
        return levels


def _scene(batch: int = 6) -> tuple[Tensor, Tensor, Tensor]:
    """Defects of several sizes under blurred, noisy score maps; the last image has no defect (it falls back)."""
    generator = torch.Generator().manual_seed(0)
    truth = torch.zeros(batch, SIZE, SIZE)
    for index in range(batch - 1):
        top, left, height, width = 10 + 11 * index, 12 + 9 * index, 4 + 3 * index, 3 + 2 * (index % 3)
        truth[index, top : top + height, left : left + width] = 1.0
    blurred = torch.nn.functional.avg_pool2d(truth[:, None], 11, stride=1, padding=5)[:, 0]
    maps = 0.25 * torch.rand(batch, SIZE, SIZE, generator=generator)
    maps = maps + 0.9 * blurred / blurred.flatten(1).amax(dim=1).clamp(min=1e-6)[:, None, None]
    images = torch.cat((truth[:, None], torch.rand(batch, 2, SIZE, SIZE, generator=generator)), dim=1)
    return images, maps, truth > 0


def _refine(pipeline: RefinementPipeline, images: Tensor, maps: Tensor) -> RefinedMasks:
    seeds = torch.arange(100, 100 + maps.shape[0])
    return pipeline(RefinementInputs(Modalities(images), maps, maps > 0.5, seeds))


def _pipeline(**options) -> RefinementPipeline:
    """The product defaults (relative pseudo-labels, logistic regression, growth check, stable fallback)."""
    return RefinementPipeline(features=_Levels(), **options)


def _reference_sample(candidates: Tensor, max_samples: int, seeds: Tensor, stream) -> tuple[Tensor, Tensor]:
    """The draw as a selection over every pixel: the keys of all pixels, the largest ``max_samples`` by ``topk``."""
    keys = sampling.random_keys(seeds, stream, candidates.shape[1])
    keys = torch.where(candidates, keys, torch.zeros_like(keys))
    values, indices = keys.topk(min(max_samples, candidates.shape[1]), dim=1)
    return indices, values > 0


def _reference_quantile(flat: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """Each row's quantile of its valid values by sorting them."""
    rows = []
    for values, valid in zip(flat, mask, strict=True):
        kept = values[valid].sort().values
        rows.append(kept[int((kept.numel() - 1) * quantile)] if kept.numel() else values.new_tensor(float("nan")))
    return torch.stack(rows)


def _reference_accelerated(classifier: LinearClassifier, problem: LinearProblem, steps: int) -> Tensor:
    """The accelerated bound-Newton loop as first written: ``(B, C)`` state, the move recomputed from two states,
    every product through ``row_times``, the extrapolations made from Python values, a read after every step."""
    augmented, transposed, signs = problem.augmented, problem.transposed, problem.signs
    batch_size, _, dim = augmented.shape
    inverse, info = _inverse_bound(classifier, problem)
    momenta = [1.0]
    for _ in range(steps):
        momenta.append((1 + (1 + 4 * momenta[-1] ** 2) ** 0.5) / 2)
    extrapolations = augmented.new_tensor([(now - 1) / after for now, after in itertools.pairwise(momenta)])
    age = torch.zeros(batch_size, dtype=torch.int64)
    params = previous = augmented.new_zeros(batch_size, dim)
    margins = previous_margins = torch.zeros_like(signs)
    moving = info == 0
    for _ in range(steps):
        extrapolation = extrapolations[age][:, None]
        point = torch.addcmul(params, extrapolation, params - previous)
        point_margins = torch.addcmul(margins, extrapolation, margins - previous_margins)
        gradient = classifier.gradient(problem, point_margins, point)
        direction = -row_times(gradient, inverse)
        updated = torch.where(moving[:, None], point + direction, params)
        updated_margins = torch.where(
            moving[:, None], torch.addcmul(point_margins, signs, row_times(direction, transposed)), margins
        )
        moving = moving & ((gradient * direction).sum(dim=1) < -classifier.tolerance)
        uphill = (gradient * (updated - params)).sum(dim=1) > 0
        age = torch.where(uphill, 0, age + 1)
        previous, previous_margins = params, margins
        params, margins = updated, updated_margins
        if not bool(moving.any()):
            break
    return torch.where((info != 0)[:, None], torch.full_like(params, float("nan")), params)


def _same(first: RefinedMasks, second: RefinedMasks) -> None:
    assert torch.equal(first.outcome, second.outcome)
    assert torch.equal(first.masks, second.masks)
    assert torch.equal(first.num_positives, second.num_positives)
    assert torch.equal(first.num_negatives, second.num_negatives)


def test_the_scene_is_refined_and_falls_back() -> None:
    """The scene exercises every stage: refined images, and one without a defect that gets the stable fallback."""
    images, maps, truth = _scene()
    result = _refine(_pipeline(), images, maps)
    assert result.outcome[:-1].eq(Outcome.REFINED).sum() >= 4
    assert result.outcome[-1] == Outcome.FEW_POSITIVES
    assert not torch.equal(result.masks[:-1], (maps > 0.5)[:-1])  # the classifier labeled them, not the threshold
    assert (result.masks & truth)[:-1].sum() >= 0.9 * truth[:-1].sum()  # and kept the defects


@pytest.mark.parametrize("images_taken", [slice(4, 5), slice(None)], ids=["batch 1", "batch 6"])
def test_cpu_fast_paths_give_the_masks_of_the_straightforward_path_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch, images_taken: slice
) -> None:
    """NumPy's draw and quantiles and the lean solver loop change no bit of the masks or the decision values."""
    images, maps, _ = _scene()
    images, maps = images[images_taken], maps[images_taken]
    fast = _refine(_pipeline(), images, maps)
    with monkeypatch.context() as patched:
        patched.setattr(sampling, "_sample_on_host", _reference_sample)
        patched.setattr(labelers, "_masked_quantile_on_host", _reference_quantile)
        patched.setitem(SOLVERS, "accelerated", Solver(_reference_accelerated, default_steps=50))
        reference = _refine(_pipeline(), images, maps)
    assert fast.refined.any()
    _same(fast, reference)
    assert torch.equal(fast.decision.nan_to_num(7.0), reference.decision.nan_to_num(7.0))


def test_the_draw_on_the_host_is_the_draw_over_every_pixel() -> None:
    generator = torch.Generator().manual_seed(5)
    for batch_size, pixels, cap in ((1, 4096, 1000), (3, 1000, 50), (2, 300, 400)):
        candidates = torch.rand(batch_size, pixels, generator=generator) < torch.rand(
            batch_size, 1, generator=generator
        )
        candidates[0] = False  # a row with no candidate
        seeds = torch.randint(-(2**40), 2**40, (batch_size,), generator=generator)
        for stream in (1, tuple(range(batch_size)), torch.arange(batch_size) + 2**33):
            indices, valid = sampling.sample_pixels(candidates, cap, seeds, stream)
            expected_indices, expected_valid = _reference_sample(candidates, cap, seeds, stream)
            assert torch.equal(valid, expected_valid)
            assert torch.equal(indices[valid], expected_indices[expected_valid])


def test_quantiles_on_the_host_are_the_quantiles_of_the_selection() -> None:
    generator = torch.Generator().manual_seed(6)
    values = torch.rand(3, 40, 40, generator=generator)
    for valid in (torch.ones_like(values, dtype=torch.bool), torch.rand(3, 40, 40, generator=generator) > 0.4):
        valid[2] = False
        for quantile in (0.0, 0.3, 0.5, 0.99, 1.0):
            on_host = labelers.masked_quantile(values, valid, quantile)
            with accelerator_path():
                on_accelerator = labelers.masked_quantile(values, valid, quantile)
            expected = _reference_quantile(values.flatten(1), valid.flatten(1), quantile)
            assert torch.equal(on_host.nan_to_num(-1.0), expected.nan_to_num(-1.0)), quantile
            assert torch.equal(on_accelerator.nan_to_num(-1.0), expected.nan_to_num(-1.0)), quantile


def _host_reads(pipeline: RefinementPipeline, images: Tensor, maps: Tensor) -> tuple[RefinedMasks, int, int]:
    """The result, the values read back to Python and the tensors made from Python values during one refinement."""
    _refine(pipeline, images, maps)  # warm-up: constants made once per device
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        result = _refine(pipeline, images, maps)
    names = [event.name for event in profile.events()]
    return result, names.count("aten::_local_scalar_dense"), names.count("aten::lift_fresh")


@pytest.mark.parametrize("fallback", ["stable", "threshold"])
def test_the_accelerator_path_gives_the_same_masks_and_reads_only_what_it_names(fallback: str) -> None:
    """On an accelerator: one read to skip a batch with nothing to refine, one every 8 solver steps, and for a
    fallback that runs on the host (MEBin's sweep) one to pick its images and one copy of its thresholds."""
    images, maps, _ = _scene()
    pipeline = _pipeline(fallback=fallback)
    on_cpu = _refine(pipeline, images, maps)
    counting = LogisticRegression()
    steps: list[int] = []
    original = counting.gradient
    counting.gradient = lambda *args: steps.append(1) or original(*args)
    with accelerator_path():
        result, reads, made = _host_reads(_pipeline(fallback=fallback, classifier=counting), images, maps)
    _same(on_cpu, result)
    refined = result.refined[:, None, None].expand_as(maps)
    assert torch.allclose(result.decision[refined], on_cpu.decision[refined], atol=1e-4)
    solver_steps = len(steps) // 2  # two refinements: the warm-up and the counted one
    assert solver_steps % 8 == 0 or solver_steps == 50  # on an accelerator convergence is read every 8 steps
    assert reads == 1 + solver_steps // 8 + (fallback == "stable"), reads
    assert made == (fallback == "stable")  # MEBin's thresholds, computed on the host, copied to the device once


def test_the_accelerator_path_of_a_batch_with_nothing_to_refine_reads_once() -> None:
    images, maps, _ = _scene()
    with accelerator_path():
        result, reads, made = _host_reads(_pipeline(fallback="threshold"), images[-1:], maps[-1:])
    assert result.outcome.tolist() == [Outcome.FEW_POSITIVES]
    assert (reads, made) == (1, 0)


def test_a_solver_step_dispatches_about_thirty_operations() -> None:
    """At batch 1 a step costs its dispatches (kernel launches on a GPU), not its arithmetic."""
    generator = torch.Generator().manual_seed(7)
    features = torch.randn(1, 400, 32, generator=generator)
    labels = torch.where(features[..., 0] > 0, 1, -1)
    valid = torch.ones_like(labels, dtype=torch.bool)

    def operations(steps: int) -> int:
        classifier = LogisticRegression(max_iter=steps, tolerance=0.0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            classifier.fit(features, labels, valid)
        return sum(1 for event in profile.events() if event.name.startswith("aten::") and _top_level(event))

    per_step = (operations(12) - operations(4)) / 8
    assert per_step <= 32, per_step


def _top_level(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def test_device_constants_are_made_once() -> None:
    first = device_constant((1, 2), torch.int64, torch.device("cpu"))
    assert first is device_constant((1, 2), torch.int64, torch.device("cpu"))
