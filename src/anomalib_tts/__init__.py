"""Test-time training for anomaly segmentation (TTT4AS) as an anomalib callback."""

from anomalib_tts.callback import TestTimeSegmentation
from anomalib_tts.classifiers import CLASSIFIERS, LinearSVM, LogisticRegression
from anomalib_tts.features import FEATURES, FeaturePyramid, ModelFeatures, TimmFeatures
from anomalib_tts.geometry import GeometryFeatures, RgbdFeatures
from anomalib_tts.offline import OFFLINE_BACKBONE
from anomalib_tts.offline import register as _register_offline_backbone
from anomalib_tts.pseudo_labels import LABELERS, NominalAware, PercentilePeaks, PseudoLabels, RobustNominal
from anomalib_tts.refiner import Outcome, Refinement, TestTimeRefiner
from anomalib_tts.writer import MaskWriter

__all__ = [
    "CLASSIFIERS",
    "FEATURES",
    "LABELERS",
    "OFFLINE_BACKBONE",
    "FeaturePyramid",
    "GeometryFeatures",
    "LinearSVM",
    "LogisticRegression",
    "MaskWriter",
    "ModelFeatures",
    "NominalAware",
    "Outcome",
    "PercentilePeaks",
    "PseudoLabels",
    "Refinement",
    "RgbdFeatures",
    "RobustNominal",
    "TestTimeRefiner",
    "TestTimeSegmentation",
    "TimmFeatures",
]
__version__ = "0.1.0"

_register_offline_backbone()  # the timm name OFFLINE_BACKBONE, for anomalib models and the callback alike
