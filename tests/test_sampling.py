"""Sampling is deterministic per image and independent of the batch an image arrives in."""

import torch

from anomalib_tts.sampling import content_seeds, path_seeds, sample_pixels


def test_samples_come_from_the_candidates_and_respect_the_cap() -> None:
    candidates = torch.rand(4, 500, generator=torch.Generator().manual_seed(0)) > 0.5
    indices, valid = sample_pixels(candidates, 100, torch.arange(4), stream=0)
    assert indices.shape == (4, 100)
    assert valid.all()
    assert candidates.gather(1, indices).all()
    assert all(len(set(row.tolist())) == 100 for row in indices)


def test_small_candidate_sets_are_taken_whole() -> None:
    candidates = torch.zeros(1, 50, dtype=torch.bool)
    candidates[0, [3, 7, 11]] = True
    indices, valid = sample_pixels(candidates, 10, torch.tensor([5]), stream=0)
    assert sorted(indices[valid].tolist()) == [3, 7, 11]


def test_draw_depends_on_the_image_seed_not_the_batch() -> None:
    candidates = torch.ones(3, 1000, dtype=torch.bool)
    seeds = torch.tensor([11, 22, 33])
    indices, _ = sample_pixels(candidates, 20, seeds, stream=1)
    reordered, _ = sample_pixels(candidates[[2, 0, 1]], 20, seeds[[2, 0, 1]], stream=1)
    alone, _ = sample_pixels(candidates[1:2], 20, seeds[1:2], stream=1)
    assert torch.equal(indices[[2, 0, 1]], reordered)
    assert torch.equal(indices[1:2], alone)
    other_stream, _ = sample_pixels(candidates, 20, seeds, stream=2)
    assert not torch.equal(indices, other_stream)
    assert not torch.equal(indices[0], indices[1])


def test_draw_is_roughly_uniform() -> None:
    candidates = torch.ones(200, 10, dtype=torch.bool)
    indices, _ = sample_pixels(candidates, 1, torch.arange(200), stream=0)
    counts = torch.bincount(indices[:, 0], minlength=10)
    assert counts.min() > 5


def test_seeds_are_stable_and_distinct() -> None:
    assert torch.equal(path_seeds(["a.png", "b.png"]), path_seeds(["a.png", "b.png"]))
    assert path_seeds(["a.png"]) != path_seeds(["b.png"])
    maps = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(content_seeds(maps), content_seeds(maps.clone()))
    assert content_seeds(maps)[0] != content_seeds(maps)[1]
    maps[0, 0, 0] = float("nan")
    assert (content_seeds(maps) >= 0).all()
