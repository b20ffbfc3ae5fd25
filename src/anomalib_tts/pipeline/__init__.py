"""The refinement pipeline, torch only: score map -> pseudo-labels -> pixel features -> classifier -> mask.

One module per stage, each with a base class and a registry, so a new recipe, feature source, classifier,
self-check or fallback is one subclass: :mod:`~anomalib_tts.pipeline.labelers`, :mod:`~anomalib_tts.pipeline.sampling`,
:mod:`~anomalib_tts.pipeline.features`, :mod:`~anomalib_tts.pipeline.classifiers` (with
:mod:`~anomalib_tts.pipeline.solvers`), :mod:`~anomalib_tts.pipeline.checks`, :mod:`~anomalib_tts.pipeline.fallbacks`
(with :mod:`~anomalib_tts.pipeline.thresholds`), run in order by :class:`RefinementPipeline`. Nothing here imports
Lightning or anomalib.
"""

from anomalib_tts.pipeline.checks import SELF_CHECKS, BoundedGrowth, Evidence, NoCheck, SelfCheck
from anomalib_tts.pipeline.classifiers import (
    CLASSIFIERS,
    Decision,
    LinearClassifier,
    LinearDecision,
    LinearSVM,
    LogisticRegression,
    PixelClassifier,
)
from anomalib_tts.pipeline.fallbacks import FALLBACKS, FallbackMask, FixedThreshold, StableThreshold, ThresholdMask
from anomalib_tts.pipeline.features import (
    FEATURES,
    OFFLINE_BACKBONE,
    FeaturePyramid,
    FeatureSource,
    GeometryFeatures,
    ImageFeatures,
    MissingWeightsError,
    Modalities,
    RgbdFeatures,
    StackedFeatures,
    TimmFeatures,
    WeightedMaps,
)
from anomalib_tts.pipeline.labelers import (
    LABELERS,
    NominalAware,
    PeakRelative,
    PercentilePeaks,
    PseudoLabeler,
    PseudoLabels,
    RobustNominal,
)
from anomalib_tts.pipeline.refinement import Outcome, RefinedMasks, RefinementInputs, RefinementPipeline
from anomalib_tts.pipeline.registry import Registry

__all__ = [
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
    "MissingWeightsError",
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
    "Registry",
    "RgbdFeatures",
    "RobustNominal",
    "SelfCheck",
    "StableThreshold",
    "StackedFeatures",
    "ThresholdMask",
    "TimmFeatures",
    "WeightedMaps",
]
