"""Test-time training for anomaly segmentation (TTT4AS) for anomalib: per-image refined masks.

The package has three parts:

- :mod:`anomalib_tts.pipeline`: the refinement itself, torch only (score map -> pseudo-labels -> pixel features ->
  per-image classifier -> mask);
- the doors: :mod:`anomalib_tts.lightning` (the callback :class:`TestTimeSegmentation`, ``MaskWriter``, the
  ``anomalib benchmark`` factory) and :mod:`anomalib_tts.deploy` (:class:`SegmentationRefiner`, for exported
  models), both over one adapter from anomalib's batches to the pipeline's inputs, :mod:`anomalib_tts.adapter`,
  and both reading folders with :class:`TolerantPredictDataset` (:mod:`anomalib_tts.data`), which skips the files
  it cannot decode;
- :mod:`anomalib_tts.tools`: the ``anomalib-tts`` command (``demo``, ``compare``) and what it measures with.

Names are imported on first use, so that ``import anomalib_tts`` (and Lightning's callback factory, which imports
it for every ``Trainer``) costs nothing.
"""

import importlib
from typing import Any

_EXPORTS = {
    "anomalib_tts.lightning.callback": ("TestTimeSegmentation",),
    "anomalib_tts.lightning.writer": ("MaskWriter",),
    "anomalib_tts.data": ("TolerantPredictDataset",),
    "anomalib_tts.deploy": ("SegmentationRefiner",),
    "anomalib_tts.adapter": ("BatchRefiner", "ModelFeatures"),
    "anomalib_tts.pipeline": (
        "CLASSIFIERS",
        "FALLBACKS",
        "FEATURES",
        "LABELERS",
        "OFFLINE_BACKBONE",
        "SELF_CHECKS",
        "BoundedGrowth",
        "Decision",
        "Evidence",
        "FallbackMask",
        "FeaturePyramid",
        "FeatureSource",
        "FixedThreshold",
        "GeometryFeatures",
        "ImageFeatures",
        "LinearClassifier",
        "LinearDecision",
        "LinearSVM",
        "LogisticRegression",
        "Modalities",
        "NoCheck",
        "NominalAware",
        "Outcome",
        "PeakRelative",
        "PercentilePeaks",
        "PixelClassifier",
        "PseudoLabeler",
        "PseudoLabels",
        "RefinedMasks",
        "RefinementInputs",
        "RefinementPipeline",
        "RgbdFeatures",
        "RobustNominal",
        "SelfCheck",
        "StableThreshold",
        "StackedFeatures",
        "ThresholdMask",
        "TimmFeatures",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)  # noqa: PLE0604, PLE0605 (the names of _EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        msg = f"module 'anomalib_tts' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
