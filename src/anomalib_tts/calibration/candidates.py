"""The binarizations a calibration chooses among: refinement settings, per-image and global thresholds.

A :class:`Candidate` is a name, a family and a JSON-able set of ``overrides`` of the pipeline's components, so that
the choice can be saved with the model (a checkpoint, a file) and rebuilt without validation data by
:func:`build_pipeline`. A component in ``overrides`` is ``[registered name, {init args}]``; ``"image_features"``
(a weight) stacks :class:`~anomalib_tts.pipeline.ImageFeatures` next to the configured feature source.

Global-threshold candidates carry a ``statistic`` of the nominal pixel scores (:data:`THRESHOLD_STATISTICS`): the
calibration computes it from the good images and saves the threshold it gives as a ``FixedThreshold`` fallback with
refinement off.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from anomalib_tts.pipeline import (
    FALLBACKS,
    LABELERS,
    SELF_CHECKS,
    FeatureSource,
    ImageFeatures,
    RefinementPipeline,
    StackedFeatures,
)

Overrides = dict[str, Any]
PIXEL_SAMPLE = 20000  # pixels per image that a percentile reads (anomalib's SuperADD samples too)


def _mean_plus_3_std(pixels: Tensor) -> float:
    values = pixels.double()
    return float(values.mean() + 3 * values.std(unbiased=False))


def _superadd(pixels: Tensor) -> float:
    values = pixels.flatten().float()
    rank = int((values.numel() - 1) * 0.95)
    return float(values.kthvalue(rank + 1).values) * 1.421


THRESHOLD_STATISTICS: dict[str, Callable[[Tensor], float]] = {
    "max": lambda pixels: float(pixels.max()),
    "mean + 3 std": _mean_plus_3_std,
    "superadd": _superadd,
}
"""Raw threshold of nominal pixel scores, by name: anomalib's own (their maximum, with a nominal-only validation
set), mean + 3 std, SuperADD's 95th percentile x 1.421."""


@dataclass(frozen=True)
class Candidate:
    """One binarization the calibration scores.

    Attributes:
        name: Its name in the scores and the logs.
        family: ``"refinement"``, ``"per-image threshold"`` or ``"global threshold"``.
        overrides: The pipeline's components that differ from the configured ones (see the module docstring).
        statistic: For a global threshold, the name of its statistic in :data:`THRESHOLD_STATISTICS`; for a
            refinement, the global threshold that gates it: its ``overrides`` are written for maps on which that
            threshold sits at 0.5 (:func:`gated_overrides` moves them to where it sits).
    """

    name: str
    family: str
    overrides: Overrides = field(default_factory=dict)
    statistic: str | None = None


REFINEMENT = "refinement"
PER_IMAGE = "per-image threshold"
GLOBAL = "global threshold"
STABLE = ["stable", {}]
ANOMALIB = ["threshold", {}]
AT_GATE = ["fixed", {"threshold": 0.5}]  # the gate's threshold, on the scale where it sits at 0.5
GROWTH = ["growth", {"max_growth": 4.0}]
NO_CHECK = ["none", {}]
CORE = ["relative", {"positive_fraction": 0.75}]
GATED = ["relative", {"floor_margin": 0.0}]  # positives only above the gate
GATED_CORE = ["relative", {"positive_fraction": 0.75, "floor_margin": 0.0}]
CORE_ABOVE = {"pseudo_labels": GATED_CORE, "self_check": NO_CHECK, "fallback": AT_GATE, "image_features": 1.0}

DEFAULT_CANDIDATES = (
    Candidate("anomalib's threshold", GLOBAL, {"refine": False, "fallback": ANOMALIB}, "max"),
    Candidate("mean + 3 std of nominal pixels", GLOBAL, {"refine": False}, "mean + 3 std"),
    Candidate("SuperADD (p95 x 1.421 of nominal pixels)", GLOBAL, {"refine": False}, "superadd"),
    Candidate("stable threshold per image", PER_IMAGE, {"refine": False, "fallback": STABLE}),
    Candidate("refined", REFINEMENT, {}),  # the components as configured
    Candidate("refined + image features", REFINEMENT, {"image_features": 1.0}),
    Candidate(
        "refined from the core + image features",
        REFINEMENT,
        {"pseudo_labels": CORE, "self_check": NO_CHECK, "fallback": STABLE, "image_features": 1.0},
    ),
    Candidate(
        "refined + image features, above anomalib's threshold",
        REFINEMENT,
        {"pseudo_labels": GATED, "self_check": GROWTH, "fallback": AT_GATE, "image_features": 1.0},
        "max",
    ),
    Candidate("refined from the core + image features, above anomalib's threshold", REFINEMENT, CORE_ABOVE, "max"),
    Candidate("refined from the core + image features, above mean + 3 std", REFINEMENT, CORE_ABOVE, "mean + 3 std"),
    Candidate("refined from the core + image features, above SuperADD", REFINEMENT, CORE_ABOVE, "superadd"),
)
"""What the callback chooses among by default: anomalib's threshold and the global thresholds a user would pick
instead, MEBin's stable threshold per image (the fallback alone), the refinement as configured (``"refined"``: by
default the ``relative`` recipe, the growth check and the stable-threshold fallback) and with the image's own
features beside the configured ones, and refinement from the map's confident core with the image's features, on
every image whose map stands out or only above one of the global thresholds (a gate: which images get a mask is that
threshold's choice, the mask's shape the refinement's). Positives from the core are not held to the growth check:
they are meant to grow to the defect around them."""

_REGISTRIES = {"pseudo_labels": LABELERS, "self_check": SELF_CHECKS, "fallback": FALLBACKS}


def _component(name: str, spec: Any) -> Any:
    registry = _REGISTRIES[name]
    if not (isinstance(spec, list | tuple) and len(spec) == 2 and isinstance(spec[1], dict)):
        msg = f"{name} in a candidate's overrides must be [registered name, {{init args}}], got {spec!r}"
        raise ValueError(msg)
    return registry.get(spec[0])(**spec[1])


def build_pipeline(
    base: RefinementPipeline, overrides: Overrides, features: FeatureSource | None = None
) -> RefinementPipeline:
    """``base`` with ``overrides`` applied; the feature source (or ``features``, where given) and the classifier
    are ``base``'s own objects.

    Example:
        >>> from anomalib_tts.pipeline import TimmFeatures
        >>> base = RefinementPipeline(features=TimmFeatures("resnet18", pre_trained=False))
        >>> pipeline = build_pipeline(base, {"self_check": ["none", {}], "image_features": 0.5})
        >>> type(pipeline.self_check).__name__, [type(s).__name__ for s in pipeline.features.sources]
        ('NoCheck', ['TimmFeatures', 'ImageFeatures'])
    """
    unknown = sorted(set(overrides) - {*_REGISTRIES, "refine", "image_features"})
    if unknown:
        msg = f"unknown overrides {unknown}: a candidate may set {sorted({*_REGISTRIES, 'refine', 'image_features'})}"
        raise ValueError(msg)
    components = {name: _component(name, overrides[name]) for name in _REGISTRIES if name in overrides}
    features = base.features if features is None else features
    if overrides.get("image_features"):
        features = StackedFeatures([features, ImageFeatures()], [1.0, float(overrides["image_features"])])
    return RefinementPipeline(
        pseudo_labels=components.get("pseudo_labels", base.pseudo_labels),
        features=features,
        classifier=base.classifier,
        self_check=components.get("self_check", base.self_check),
        fallback=components.get("fallback", base.fallback),
        max_positives=base.max_positives,
        max_negatives=base.max_negatives,
        min_positives=base.min_positives,
        min_negatives=base.min_negatives,
        max_channels=base.max_channels,
        refine=bool(overrides.get("refine", base.refine)),
    )


def pixel_sample(raw_maps: Tensor, seed: int = 0) -> Tensor:
    """``(N, S)``: up to :data:`PIXEL_SAMPLE` pixels of each raw map, the same positions for every map."""
    flat = raw_maps.flatten(1)
    if flat.shape[1] <= PIXEL_SAMPLE:
        return flat
    index = torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(seed))[:PIXEL_SAMPLE]
    return flat[:, index.to(flat.device)]


def gated_overrides(overrides: Overrides, threshold: float) -> Overrides:
    """A gated refinement's ``overrides`` (written for its gate at 0.5) for a gate at ``threshold``.

    Moving the gate from 0.5 to ``threshold`` is the same as shifting every map by ``0.5 - threshold``: the
    ``relative`` recipe's floor and sure margin move with it, the fixed threshold becomes ``threshold``.

    Example:
        >>> gated_overrides({"pseudo_labels": ["relative", {"floor_margin": 0.0}], "fallback": ["fixed", {"threshold":
        ...     0.5}]}, 0.4)
        {'pseudo_labels': ['relative', {'floor_margin': -0.1, 'sure_margin': -0.1}], 'fallback': ['fixed', {'threshold': 0.4}]}
    """
    shift = round(threshold - 0.5, 6)
    moved = dict(overrides)
    name, args = overrides["pseudo_labels"]
    if name != "relative":
        msg = f"a gated refinement takes the 'relative' recipe, got {name!r}"
        raise ValueError(msg)
    margin = round(args.get("floor_margin", -0.35) + shift, 6)
    moved["pseudo_labels"] = [
        name,
        {**args, "floor_margin": margin, "sure_margin": round(args.get("sure_margin", 0.0) + shift, 6)},
    ]
    fallback_name, fallback_args = overrides["fallback"]
    moved["fallback"] = [fallback_name, {**fallback_args, "threshold": round(fallback_args["threshold"] + shift, 6)}]
    return moved
