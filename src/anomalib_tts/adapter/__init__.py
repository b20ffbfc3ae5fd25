"""The one adapter between anomalib and the pipeline: batches and predictions in, refined masks out."""

from anomalib_tts.adapter.batches import (
    BatchFields,
    BatchRefiner,
    RefinementStats,
    check_post_processor,
    post_processor_normalization,
    raw_anomaly_maps,
    unclipped_scores,
)
from anomalib_tts.adapter.model_features import ModelFeatures

__all__ = [
    "BatchFields",
    "BatchRefiner",
    "ModelFeatures",
    "RefinementStats",
    "check_post_processor",
    "post_processor_normalization",
    "raw_anomaly_maps",
    "unclipped_scores",
]
