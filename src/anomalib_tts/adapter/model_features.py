"""The anomalib model's own features as a feature source (no second forward pass)."""

import torch
from torch import Tensor, nn

from anomalib_tts.pipeline.features.source import FEATURES, FeatureSource, Modalities


@FEATURES.register("model")
class ModelFeatures(FeatureSource):
    """Reuses the anomalib model's own ``TimmFeatureExtractor`` output for the same batch (no second pass).

    A forward hook keeps the features the model computed during its forward pass (a Lightning test or predict
    step, an inferencer's ``predict``); the refinement of that batch reads them right after. If the hook has nothing for the batch (e.g. the model was not run on these images),
    the extractor is run once on the images.

    Example:
        >>> from anomalib.models import Padim
        >>> features = ModelFeatures()
        >>> features.setup(Padim(backbone="resnet18", layers=["layer1", "layer2"], pre_trained=False))
        >>> [level.shape[1] for level in features(Modalities(torch.rand(1, 3, 32, 32)))]
        [64, 128]
        >>> features.teardown()
    """

    def __init__(self) -> None:
        self._extractor: nn.Module | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._cached: list[Tensor] | None = None

    def setup(self, model: nn.Module | None) -> None:
        """Hook the model's ``TimmFeatureExtractor``; ``ValueError`` naming what to use when it has none."""
        from anomalib.models.components.feature_extractors import TimmFeatureExtractor

        if model is None:
            msg = "ModelFeatures needs an anomalib model; use TimmFeatures(backbone=...) outside Lightning"
            raise ValueError(msg)
        extractors = [module for module in model.modules() if isinstance(module, TimmFeatureExtractor)]
        if not extractors:
            msg = (
                f"ModelFeatures (features='model') needs an anomalib model with a TimmFeatureExtractor (PatchCore, "
                f"PaDiM, ...); {type(model).__name__} has none: run a timm backbone instead, e.g. "
                "features=TimmFeatures(backbone='wide_resnet50_2')"
            )
            raise ValueError(msg)
        if self._extractor is extractors[0] and self._hook is not None:
            return
        self.teardown()
        self._extractor = extractors[0]
        self._hook = self._extractor.register_forward_hook(self._keep_output)

    def _keep_output(self, module: nn.Module, inputs: tuple[Tensor, ...], output: dict) -> None:
        del module, inputs
        self._cached = list(output.values())

    def teardown(self) -> None:
        """Remove the forward hook."""
        if self._hook is not None:
            self._hook.remove()
        self._hook = None
        self._extractor = None
        self._cached = None

    def __call__(self, inputs: Modalities) -> list[Tensor]:
        if self._extractor is None:
            msg = "ModelFeatures.setup(model) must be called first"
            raise RuntimeError(msg)
        images = inputs.image
        cached, self._cached = self._cached, None
        if cached is not None and cached[0].shape[0] == images.shape[0]:
            return cached
        with torch.no_grad():
            features = list(self._extractor(images).values())
        self._cached = None  # the hook saw this call too; its output must not serve the next batch
        return features
