"""Choose the binarization for one dataset from its good images alone.

:func:`calibrate` pastes synthetic defects with exact masks into the nominal validation images
(:class:`~anomalib_tts.calibration.defects.SyntheticDefects`), scores them with the model, binarizes the maps with
every :class:`~anomalib_tts.calibration.candidates.Candidate`, and chooses the candidate with the best mean per-image
F1 over the defective images among those that raise no more false alarms on the good images than anomalib's own
threshold does there, or than a cap; a threshold replaces the best refinement only where it is clearly better
(:class:`Objective`). Nothing of a test set is read, so every test set is a held-out set for it.

Each good image is scored as a test image would be: anomalib normalizes maps with statistics of the validation
images (with good images only, its pixel threshold is their highest pixel score), and a test image is never among
them. So every good image, and every defective image made from it, is normalized with the statistics of the
*other* good images (leave one out), and the global thresholds are taken from the other images' pixels too. Without
that, the image that holds the highest score would define the threshold it is then tested against, and no
threshold would ever raise a false alarm.
"""

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from anomalib_tts.calibration.candidates import (
    DEFAULT_CANDIDATES,
    GLOBAL,
    REFINEMENT,
    THRESHOLD_STATISTICS,
    Candidate,
    Overrides,
    build_pipeline,
    gated_overrides,
    pixel_sample,
)
from anomalib_tts.calibration.defects import GoodVariations, SyntheticDefects
from anomalib_tts.pipeline import FeatureSource, Modalities, RefinementInputs, RefinementPipeline

logger = logging.getLogger(__name__)

MIN_GOOD_IMAGES = 3
FEW_GOOD_IMAGES = 10  # below this, a warning: one good image more or less flagged moves the false alarms a lot


class TooFewImagesError(ValueError):
    """Not enough good images to calibrate on."""


@dataclass(frozen=True)
class Normalization:
    """anomalib's PostProcessor's pixel statistics, raw scale: a map is normalized as
    ``(raw - threshold) / (high - low) + 0.5``."""

    threshold: float
    low: float
    high: float

    def __call__(self, raw: Tensor) -> Tensor:
        """``raw`` on the normalized scale, unclipped."""
        return (raw.float() - self.threshold) / max(self.high - self.low, 1e-12) + 0.5


@dataclass(frozen=True)
class Objective:
    """What the calibration maximizes, and the bounds a candidate must keep to be chosen.

    Args:
        false_alarm_cap: A candidate may flag at most this share of the good images, or as many as anomalib's
            threshold flags on them, whichever is higher (with good images varied as a line varies them, every
            binarization flags more of them than of the test's good images: the comparison with anomalib's own
            threshold on the same images is what holds).
        pooled_tolerance: A candidate's pixel F1 pooled over all images may fall at most this much below anomalib's
            threshold's; ``None`` does not bound it.
        switch_margin: A threshold (global or per image) is chosen over the best eligible refinement only when its
            mean F1 is higher by more than this many standard errors of their paired per-image difference: the
            top candidates on the synthetic defects are often within a few hundredths of each other, where their
            order says little about the real defects, and refinement is what the product is for (0: the best
            mean F1 wins).
    """

    false_alarm_cap: float = 0.25
    pooled_tolerance: float | None = None
    switch_margin: float = 2.0


@dataclass
class Calibration:
    """The binarization chosen for a dataset, and what every candidate scored on its synthetic defects.

    Attributes:
        choice: The chosen candidate's name.
        overrides: The pipeline's components to rebuild it (see :func:`build_pipeline`).
        scores: Per candidate: ``mean_f1`` (mean per-image F1 over the defective images), ``mean_f1_seen`` (the
            same over the defects the model sees: its map is above anomalib's threshold somewhere inside them; not
            used by the choice), ``pooled_f1`` (over all images), ``false_alarm_rate`` (share of good images with a non-empty mask), ``eligible`` (1.0 when it
            kept the objective's bounds).
        good_images: Good images it pasted defects into and counted false alarms on (their varied copies count as
            good images too, for the false alarms).
        synthetic_images: Defective images made from them.
        seconds: How long it took.
    """

    choice: str
    overrides: Overrides
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    good_images: int = 0
    synthetic_images: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON), for a checkpoint or a file."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        """The calibration :meth:`to_dict` wrote."""
        return cls(**data)

    def ranking(self) -> list[str]:
        """The candidates from best to worst mean F1 on the synthetic defects."""
        return sorted(self.scores, key=lambda name: -self.scores[name]["mean_f1"])

    def summary(self) -> str:
        """Lines for the log: the choice, then every candidate's scores."""
        lines = [
            (
                f"calibration on {self.good_images} good images and {self.synthetic_images} synthetic defective ones "
                f"({self.seconds:.1f} s): chose {self.choice!r}"
            )
        ]
        for name in self.ranking():
            row = self.scores[name]
            mark = "*" if name == self.choice else ("" if row["eligible"] else " (out of bounds)")
            lines.append(
                f"  {mark:1s} {name}: mean F1 {row['mean_f1']:.3f}, pooled F1 {row['pooled_f1']:.3f}, "
                f"false alarms {row['false_alarm_rate']:.2f}"
            )
        return "\n".join(lines)


class PrecomputedFeatures(FeatureSource):
    """Hands every candidate the feature maps computed once for the batch (set ``maps`` before each batch)."""

    def __init__(self) -> None:
        self.maps: list[Tensor] = []

    def __call__(self, inputs: Modalities) -> list[Tensor]:
        return self.maps


def _leave_one_out(values: Tensor, reduce: Callable[[Tensor], Tensor]) -> Tensor:
    """``(N,)``: ``reduce`` over all values but the i-th, for each i (``values`` ``(N,)``)."""
    count = values.shape[0]
    others = ~torch.eye(count, dtype=torch.bool, device=values.device)
    return torch.stack([reduce(values[others[index]]) for index in range(count)])


def _f1(masks: Tensor, truth: Tensor) -> Tensor:
    dims = tuple(range(1, masks.dim()))
    overlap = (masks & truth).sum(dim=dims).double()
    total = (masks.sum(dim=dims) + truth.sum(dim=dims)).double()
    return torch.where(total > 0, 2 * overlap / total.clamp(min=1), torch.ones_like(total))


def _per_image_f1(masks: Tensor, truth: Tensor, good: Tensor) -> Tensor:
    """F1 of each defective image's mask."""
    return _f1(masks[~good], truth[~good])


def _scores(masks: Tensor, truth: Tensor, good: Tensor, seen: Tensor, per_image: Tensor) -> dict[str, float]:
    """The candidate's row of :attr:`Calibration.scores`; ``per_image`` is :func:`_per_image_f1` of ``masks``."""
    pooled = _f1(masks.flatten()[None], truth.flatten()[None])[0]
    seen_defects = seen[~good]
    return {
        "mean_f1": float(per_image.mean()),
        "mean_f1_seen": float(per_image[seen_defects].mean()) if bool(seen_defects.any()) else float("nan"),
        "pooled_f1": float(pooled),
        "false_alarm_rate": float(masks[good].flatten(1).any(dim=1).float().mean()),
    }


def calibrate(
    base: RefinementPipeline,
    images: Tensor,
    raw_maps: Tensor,
    score_images: Callable[[Tensor], Tensor],
    normalization: Normalization,
    candidates: Sequence[Candidate] = DEFAULT_CANDIDATES,
    defects: SyntheticDefects | None = None,
    variations: GoodVariations | None = None,
    synthetic_images: int = 48,
    max_good_images: int = 24,
    objective: Objective | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> Calibration:
    """Choose among ``candidates`` on synthetic defects pasted into the good ``images``.

    Args:
        base: The configured pipeline; candidates override its components (its feature source is set up).
        images: ``(N, C, H, W)`` good images as the model sees them (after its pre-processor).
        raw_maps: ``(N, H, W)`` the model's raw anomaly maps of ``images``.
        score_images: The model: ``(B, C, H, W)`` images -> ``(B, H, W)`` raw anomaly maps.
        normalization: anomalib's PostProcessor's pixel statistics.
        candidates: What to choose among.
        defects: The synthetic defects; ``None``: ``SyntheticDefects`` with as many versions of each good image as
            make about ``synthetic_images`` (at least one, at most eight per image).
        variations: Varied copies of the good images, counted with them for the false alarms; ``None``: none (the
            false alarms are counted on the good images alone: varied copies made the refinements' false alarms
            look several times higher than on good test images).
        synthetic_images: About how many defective images to make, when ``defects`` is ``None``.
        max_good_images: Defects are pasted into (and false alarms counted on) at most this many of the good
            images, spread evenly over them; the statistics of the normalization and the global thresholds come from
            all of them.
        objective: The bounds of the choice; ``None``: :class:`Objective`'s defaults.
        seed: Seed of the defects.
        batch_size: Images per pass of the model and the pipeline.
        progress: Called with ``(done, total)`` batches as it goes.

    Returns:
        The :class:`Calibration`.

    Raises:
        TooFewImagesError: Fewer than :data:`MIN_GOOD_IMAGES` good images.
    """
    start = time.perf_counter()
    count = images.shape[0]
    if count < MIN_GOOD_IMAGES:
        msg = (
            f"calibration needs at least {MIN_GOOD_IMAGES} good validation images, got {count}: give the datamodule a "
            "larger validation split of good images (e.g. val_split_ratio), or turn calibration off"
        )
        raise TooFewImagesError(msg)
    if count < FEW_GOOD_IMAGES:
        logger.warning(
            "calibration on only %d good validation images: its count of false alarms is coarse; a larger validation "
            "split of good images (e.g. val_split_ratio) makes the choice surer",
            count,
        )
    objective = objective or Objective()
    used = torch.linspace(0, count - 1, min(count, max_good_images)).round().long().unique()
    if defects is None:
        defects = SyntheticDefects(per_image=min(8, max(1, math.ceil(synthetic_images / len(used)))))
    if variations is None:
        variations = GoodVariations(per_image=0)
    raw_maps = raw_maps.reshape(count, *raw_maps.shape[-2:]).float()
    normalizers = _held_out_normalizations(raw_maps, normalization)
    thresholds = _held_out_thresholds(raw_maps, normalizers, candidates)

    chosen_images = images[used.to(images.device)]
    made = defects(chosen_images, seed=seed)
    varied = variations(chosen_images, seed=seed + 1)
    all_images = torch.cat((chosen_images, varied.images, made.images))
    sources = used[torch.cat((torch.arange(len(used)), varied.sources.cpu(), made.sources.cpu()))]
    empty = torch.zeros(len(used), *raw_maps.shape[-2:], dtype=torch.bool)
    truth = torch.cat((empty, varied.masks.cpu(), made.masks.cpu()))
    good = torch.arange(all_images.shape[0]) < len(used) + varied.images.shape[0]

    shared = PrecomputedFeatures()
    pipelines = {
        candidate.name: build_pipeline(base, candidate.overrides, features=shared)
        for candidate in candidates
        if candidate.family != GLOBAL
    }
    masks: dict[str, list[Tensor]] = {candidate.name: [] for candidate in candidates}
    seen: list[Tensor] = []
    batches = range(0, all_images.shape[0], batch_size)
    if progress is not None:
        progress(0, len(batches))
    for done, first in enumerate(batches):
        batch_images = all_images[first : first + batch_size]
        batch_sources = sources[first : first + batch_size]
        # the model first, then the features: a source that reuses the model's own features reads this pass
        raw = score_images(batch_images).reshape(batch_images.shape[0], *raw_maps.shape[-2:]).float()
        modalities = Modalities(batch_images)
        shared.maps = list(base.features(modalities))
        maps = torch.stack([normalizers[int(source)](map_) for map_, source in zip(raw, batch_sources, strict=True)])
        seeds = torch.arange(first, first + maps.shape[0], device=maps.device)
        inputs = RefinementInputs(modalities, maps, maps > 0.5, seeds)
        batch_truth = truth[first : first + batch_size].to(maps.device)
        seen.append((torch.where(batch_truth, maps, -math.inf).flatten(1).amax(dim=1) > 0.5).cpu())
        for candidate in candidates:
            if candidate.family == GLOBAL:
                cut = thresholds[candidate.name][batch_sources].to(maps.device)
                result = maps > cut[:, None, None]
            elif candidate.statistic is not None:  # gated: shift each map so that its gate sits at 0.5
                shift = (thresholds[candidate.name][batch_sources].to(maps.device) - 0.5)[:, None, None]
                shifted = RefinementInputs(modalities, maps - shift, maps - shift > 0.5, seeds)
                result = pipelines[candidate.name](shifted).masks
            else:
                result = pipelines[candidate.name](inputs).masks
            masks[candidate.name].append(result.bool().cpu())
        if progress is not None:
            progress(done + 1, len(batches))

    seen_all = torch.cat(seen)
    masks_all = {name: torch.cat(kept) for name, kept in masks.items()}
    per_image = {name: _per_image_f1(kept, truth, good) for name, kept in masks_all.items()}
    scores = {name: _scores(kept, truth, good, seen_all, per_image[name]) for name, kept in masks_all.items()}
    choice = _choose(scores, candidates, objective, per_image)
    chosen = next(candidate for candidate in candidates if candidate.name == choice)
    return Calibration(
        choice=choice,
        overrides=candidate_overrides(chosen, raw_maps, normalization),
        scores=scores,
        good_images=len(used),
        synthetic_images=int(made.images.shape[0]),
        seconds=time.perf_counter() - start,
    )


def _nominal_only(raw_maps: Tensor, normalization: Normalization) -> bool:
    """Whether the PostProcessor's threshold is the highest good pixel (anomalib's, with good images only)."""
    highest = float(raw_maps.max())
    return math.isclose(normalization.threshold, highest, rel_tol=1e-5, abs_tol=1e-6) and math.isclose(
        normalization.high, highest, rel_tol=1e-5, abs_tol=1e-6
    )


def _held_out_normalizations(raw_maps: Tensor, normalization: Normalization) -> list[Normalization]:
    """Per good image, the normalization the other good images would have given (see the module docstring).

    Where the PostProcessor's statistics are not those of good images alone (its threshold is not their highest
    pixel), they are used as they are for every image.
    """
    if not _nominal_only(raw_maps, normalization):
        return [normalization] * raw_maps.shape[0]
    peaks = raw_maps.flatten(1).amax(dim=1).double()
    lows = raw_maps.flatten(1).amin(dim=1).double()
    highest = _leave_one_out(peaks, torch.max)
    lowest = _leave_one_out(lows, torch.min)
    return [Normalization(float(high), float(low), float(high)) for high, low in zip(highest, lowest, strict=True)]


def _held_out_thresholds(
    raw_maps: Tensor, normalizers: Sequence[Normalization], candidates: Sequence[Candidate]
) -> dict[str, Tensor]:
    """Per candidate with a statistic (a global threshold, or a refinement's gate), ``(N,)`` normalized thresholds:
    each image's from the other images' pixels."""
    sample = pixel_sample(raw_maps).cpu()
    count = raw_maps.shape[0]
    thresholds = {}
    for candidate in candidates:
        if candidate.statistic is None:
            continue
        statistic = THRESHOLD_STATISTICS[candidate.statistic or "max"]
        values = []
        for index in range(count):
            others = torch.cat((sample[:index], sample[index + 1 :]))
            raw = torch.tensor(normalizers[index].threshold if candidate.statistic == "max" else statistic(others))
            values.append(float(normalizers[index](raw)))
        thresholds[candidate.name] = torch.tensor(values)
    return thresholds


def _choose(
    scores: dict[str, dict[str, float]],
    candidates: Sequence[Candidate],
    objective: Objective,
    per_image: dict[str, Tensor] | None = None,
) -> str:
    """The eligible candidate with the best mean F1 (the first on ties), where a threshold must beat the best eligible
    refinement by ``objective.switch_margin`` standard errors of their paired per-image F1 difference (``per_image``;
    without it, the best mean F1 wins); marks ``eligible`` in ``scores``."""
    reference = next(
        (candidate.name for candidate in candidates if candidate.family == GLOBAL and candidate.statistic == "max"),
        None,
    )
    reference_alarms = scores[reference]["false_alarm_rate"] if reference else 0.0
    alarm_cap = max(objective.false_alarm_cap, reference_alarms)
    bounded = reference is not None and objective.pooled_tolerance is not None
    pooled_floor = scores[reference]["pooled_f1"] - objective.pooled_tolerance if bounded else -math.inf
    best: dict[bool, str] = {}  # per family kind (refinement or not), the eligible candidate with the best mean F1
    for candidate in candidates:
        row = scores[candidate.name]
        row["eligible"] = float(row["false_alarm_rate"] <= alarm_cap + 1e-9 and row["pooled_f1"] >= pooled_floor)
        refines = candidate.family == REFINEMENT
        if row["eligible"] and (refines not in best or row["mean_f1"] > scores[best[refines]]["mean_f1"]):
            best[refines] = candidate.name
    if not best:
        return reference or candidates[0].name
    if len(best) == 1:
        return next(iter(best.values()))
    refined, threshold = best[True], best[False]
    if scores[threshold]["mean_f1"] <= scores[refined]["mean_f1"]:
        return refined
    if per_image is None or objective.switch_margin <= 0:
        return threshold
    difference = (per_image[threshold] - per_image[refined]).double()
    error = float(difference.std() / math.sqrt(difference.numel())) if difference.numel() > 1 else 0.0
    return threshold if float(difference.mean()) > objective.switch_margin * error else refined


def candidate_overrides(candidate: Candidate, raw_maps: Tensor, normalization: Normalization) -> Overrides:
    """The overrides that rebuild ``candidate``; a global threshold or a gate is computed from every good image."""
    if candidate.statistic is None:
        return dict(candidate.overrides)
    if candidate.statistic == "max":
        threshold = 0.5 if _nominal_only(raw_maps, normalization) else float(normalization(raw_maps.max()))
    else:
        raw = THRESHOLD_STATISTICS[candidate.statistic](pixel_sample(raw_maps).cpu())
        threshold = float(normalization(torch.tensor(raw)))
    if candidate.family != GLOBAL:
        return gated_overrides(candidate.overrides, threshold)
    if candidate.statistic == "max":
        return dict(candidate.overrides)
    return {**candidate.overrides, "refine": False, "fallback": ["fixed", {"threshold": threshold}]}
