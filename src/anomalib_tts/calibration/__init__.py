"""Choose each dataset's binarization on its good images: synthetic defects, candidates, the choice."""

from anomalib_tts.calibration.calibrate import (
    MIN_GOOD_IMAGES,
    Calibration,
    Normalization,
    Objective,
    PrecomputedFeatures,
    TooFewImagesError,
    calibrate,
    candidate_overrides,
)
from anomalib_tts.calibration.candidates import DEFAULT_CANDIDATES, Candidate, build_pipeline
from anomalib_tts.calibration.defects import DefectiveImages, GoodVariations, SyntheticDefects

__all__ = [
    "DEFAULT_CANDIDATES",
    "MIN_GOOD_IMAGES",
    "Calibration",
    "Candidate",
    "DefectiveImages",
    "GoodVariations",
    "Normalization",
    "Objective",
    "PrecomputedFeatures",
    "SyntheticDefects",
    "TooFewImagesError",
    "build_pipeline",
    "calibrate",
    "candidate_overrides",
]
