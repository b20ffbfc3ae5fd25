"""Pixel-feature sources and the pyramid that standardizes, reduces and reads their maps."""

from anomalib_tts.pipeline.features.backbone import TimmFeatures
from anomalib_tts.pipeline.features.geometry import GeometryFeatures, RgbdFeatures
from anomalib_tts.pipeline.features.image import ImageFeatures, StackedFeatures
from anomalib_tts.pipeline.features.offline import OFFLINE_BACKBONE, MissingWeightsError
from anomalib_tts.pipeline.features.pyramid import FeaturePyramid
from anomalib_tts.pipeline.features.source import FEATURES, FeatureSource, Modalities, WeightedMaps

__all__ = [
    "FEATURES",
    "OFFLINE_BACKBONE",
    "FeaturePyramid",
    "FeatureSource",
    "GeometryFeatures",
    "ImageFeatures",
    "MissingWeightsError",
    "Modalities",
    "RgbdFeatures",
    "StackedFeatures",
    "TimmFeatures",
    "WeightedMaps",
]
