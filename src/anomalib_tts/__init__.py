"""Test-time training for anomaly segmentation (TTT4AS) as an anomalib callback."""

from anomalib_tts.callback import TestTimeSegmentation
from anomalib_tts.checks import (
    FALLBACKS,
    SELF_CHECKS,
    BoundedGrowth,
    Evidence,
    FallbackMask,
    NoCheck,
    SelfCheck,
    StableThreshold,
    ThresholdMask,
)
from anomalib_tts.classifiers import (
    CLASSIFIERS,
    Decision,
    LinearClassifier,
    LinearDecision,
    LinearSVM,
    LogisticRegression,
    PixelClassifier,
)
from anomalib_tts.deploy import SegmentationRefiner
from anomalib_tts.features import FEATURES, FeaturePyramid, FeatureSource, Modalities, ModelFeatures, TimmFeatures
from anomalib_tts.geometry import GeometryFeatures, RgbdFeatures
from anomalib_tts.offline import OFFLINE_BACKBONE
from anomalib_tts.offline import register as _register_offline_backbone
from anomalib_tts.pseudo_labels import (
    LABELERS,
    NominalAware,
    PeakRelative,
    PercentilePeaks,
    PseudoLabeler,
    PseudoLabels,
    RobustNominal,
)
from anomalib_tts.refiner import Outcome, Refinement, TestTimeRefiner
from anomalib_tts.writer import MaskWriter

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
    "GeometryFeatures",
    "LinearClassifier",
    "LinearDecision",
    "LinearSVM",
    "LogisticRegression",
    "MaskWriter",
    "Modalities",
    "ModelFeatures",
    "NoCheck",
    "NominalAware",
    "Outcome",
    "PeakRelative",
    "PercentilePeaks",
    "PixelClassifier",
    "PseudoLabeler",
    "PseudoLabels",
    "Refinement",
    "RgbdFeatures",
    "RobustNominal",
    "SegmentationRefiner",
    "SelfCheck",
    "StableThreshold",
    "TestTimeRefiner",
    "TestTimeSegmentation",
    "ThresholdMask",
    "TimmFeatures",
]
__version__ = "0.1.0"

_register_offline_backbone()  # the timm name OFFLINE_BACKBONE, for anomalib models and the callback alike
