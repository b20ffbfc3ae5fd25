"""A pseudo-label recipe, a feature source and a non-linear classifier written outside the package, one class each.

``tests/test_anomalib_cli.py`` configures them by ``class_path`` in the YAML of a real ``anomalib test`` run.
Each counts its calls, so that the run can show it was used.
"""

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalib_tts import Decision, FeatureSource, Modalities, PixelClassifier, PseudoLabeler, PseudoLabels
from anomalib_tts.pipeline.labelers import masked_quantile


class QuantileBands(PseudoLabeler):
    """Positives: each map's top ``top`` share of pixels, if above the nominal threshold; negatives: below its
    ``bottom`` quantile."""

    def __init__(self, top: float = 0.02, bottom: float = 0.5) -> None:
        if not 0 < top < bottom < 1:
            msg = f"top and bottom must satisfy 0 < top < bottom < 1, got top={top}, bottom={bottom}"
            raise ValueError(msg)
        self.top = top
        self.bottom = bottom
        self.calls = 0

    def __call__(self, score_maps: Tensor, nominal_threshold: float) -> PseudoLabels:
        self.calls += 1
        valid = torch.isfinite(score_maps)
        high = masked_quantile(score_maps, valid, 1 - self.top).clamp(min=nominal_threshold)
        low = masked_quantile(score_maps, valid, self.bottom)
        positive = valid & (score_maps > high[:, None, None])
        negative = valid & (score_maps < low[:, None, None]) & ~positive
        return PseudoLabels(positive=positive, negative=negative)


class ColourContrast(FeatureSource):
    """The image's colour and its difference to the mean colour of a ``window`` x ``window`` neighbourhood."""

    def __init__(self, window: int = 7) -> None:
        if window < 1 or window % 2 == 0:
            msg = f"window must be a positive odd number of pixels, got {window}"
            raise ValueError(msg)
        self.window = window
        self.setups = 0
        self.calls = 0
        self.depth_maps_seen: list[bool] = []

    def setup(self, model: nn.Module | None) -> None:
        self.setups += 1

    def __call__(self, inputs: Modalities) -> list[Tensor]:
        self.calls += 1
        self.depth_maps_seen.append(inputs.depth_map is not None)
        image = inputs.image.float()
        local = F.avg_pool2d(image, self.window, stride=1, padding=self.window // 2, count_include_pad=False)
        return [image, image - local]


class NearestPrototype(PixelClassifier, Decision):
    """Every drawn pixel is a prototype of its class; a pixel is defective when its nearest defective prototype is
    nearer than its nearest normal one. Non-linear; ``fit`` returns a fitted copy, its own :class:`Decision`."""

    def __init__(self) -> None:
        self.calls = 0
        self.prototypes = self.positive = self.negative = self.fitted = torch.empty(0)

    def fit(self, features: Tensor, labels: Tensor, valid: Tensor) -> "NearestPrototype":
        self.calls += 1
        fitted = copy.copy(self)
        fitted.prototypes = features.float()
        fitted.positive = valid & (labels > 0)
        fitted.negative = valid & (labels < 0)
        fitted.fitted = fitted.positive.any(dim=1) & fitted.negative.any(dim=1)
        return fitted

    def scores(self, features: Tensor) -> Tensor:
        distances = torch.cdist(features.float(), self.prototypes)
        far = torch.full_like(distances, float("inf"))
        nearest_normal = torch.where(self.negative[:, None], distances, far).amin(dim=2)
        nearest_defect = torch.where(self.positive[:, None], distances, far).amin(dim=2)
        return (nearest_normal - nearest_defect).nan_to_num(0.0)
