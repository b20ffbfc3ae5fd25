"""Sampling is deterministic per image and independent of the batch an image arrives in."""

import torch

from anomalib_tts.pipeline.sampling import content_seeds, path_seeds, sample_pixels


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
    maps = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    maps[2] = maps[0]
    seeds = content_seeds(maps)
    assert torch.equal(seeds, content_seeds(maps.clone()))
    assert seeds[0] == seeds[2]  # equal maps, equal seeds
    assert seeds[0] != seeds[1]  # different maps, different seeds
    nudged = maps[:1].clone()
    nudged[0, 7, 9] += 0.01  # one pixel changed by a visible amount changes the seed
    assert content_seeds(nudged) != seeds[0]


def test_content_seeds_of_a_map_do_not_depend_on_its_batchmates() -> None:
    maps = torch.rand(4, 16, 16, generator=torch.Generator().manual_seed(1))
    together = content_seeds(maps)
    alone = torch.cat([content_seeds(maps[index : index + 1]) for index in range(4)])
    reordered = content_seeds(maps[[3, 1, 0, 2]])
    assert torch.equal(together, alone)
    assert torch.equal(together[[3, 1, 0, 2]], reordered)
    assert len(set(together.tolist())) == 4


def test_content_seeds_ignore_non_finite_scores() -> None:
    """A NaN or infinite pixel counts as a score of 0: the seed is defined, and the same for every such value."""
    maps = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(2))
    zero = maps.clone()
    zero[0, 3, 4] = 0.0
    assert not torch.equal(content_seeds(zero), content_seeds(maps))  # the pixel's own score counts
    for value in (float("nan"), float("inf"), float("-inf")):
        broken = maps.clone()
        broken[0, 3, 4] = value
        assert torch.equal(content_seeds(broken), content_seeds(zero)), value
