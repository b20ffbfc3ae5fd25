"""Per-image classifiers, fitted for all images of a batch at once.

Each classifier solves, for every image ``b`` independently but in one batched tensor program,

    min_{w, c}  sum_i a_bi * loss(y_bi * (x_bi . w + c)) + l2 / 2 * |w|^2

with class-balanced sample weights ``a`` (each class sums to 1/2), by Nesterov-accelerated gradient descent
with a fixed number of steps of size ``1 / L`` (``L`` from a batched power iteration). No autograd, no
randomness: the same input always gives the same model.
"""

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from anomalib_tts.features import FeaturePyramid
from anomalib_tts.registry import Registry


@dataclass
class LinearDecision:
    """A fitted linear model per image.

    Attributes:
        weight: ``(B, C)``.
        bias: ``(B,)``.
        fitted: ``(B,)`` bool; ``False`` where the image had a single class or the fit was not finite.
    """

    weight: Tensor
    bias: Tensor
    fitted: Tensor

    def scores(self, features: Tensor) -> Tensor:
        """Decision values of ``(B, N, C)`` features -> ``(B, N)``; positive means defective."""
        return _row_times(self.weight, features.float().transpose(1, 2)) + self.bias[:, None]

    def score_map(self, pyramid: FeaturePyramid, size: tuple[int, int]) -> Tensor:
        """Decision value at every pixel of a ``size`` map -> ``(B, *size)``."""
        return pyramid.project(self.weight, size) + self.bias[:, None, None]


class PixelClassifier(Protocol):
    """Protocol of a per-image classifier."""

    def fit(self, features: Tensor, labels: Tensor, valid: Tensor) -> LinearDecision:
        """Fit one model per image on ``(B, N, C)`` features, ``(B, N)`` labels in {+1, -1}, ``(B, N)`` validity."""
        ...


CLASSIFIERS: Registry[PixelClassifier] = Registry("classifier")


def balanced_weights(labels: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Sample weights where each class of each image sums to 1/2, and whether both classes are present."""
    positive = (labels > 0) & valid
    negative = (labels < 0) & valid
    num_positive = positive.sum(dim=1, keepdim=True)
    num_negative = negative.sum(dim=1, keepdim=True)
    weights = positive / (2 * num_positive.clamp(min=1)) + negative / (2 * num_negative.clamp(min=1))
    return weights.float(), (num_positive[:, 0] > 0) & (num_negative[:, 0] > 0)


def _row_times(vectors: Tensor, matrices: Tensor) -> Tensor:
    """``(B, K) @ (B, K, M) -> (B, M)``.

    Both products the solver needs are written in this row-vector form, on ``X`` and on a contiguous copy of
    ``X^T``: on CPU, a batched row-vector product is about ten times faster than the matrix-column one.
    """
    return torch.bmm(vectors[:, None, :], matrices)[:, 0]


class _LinearClassifier:
    """Shared batched solver; subclasses give the loss derivative and its curvature bound."""

    curvature: float

    def __init__(self, l2: float = 1e-3, max_iter: int = 200, power_iter: int = 20) -> None:
        if l2 <= 0:
            msg = f"l2 must be > 0, got {l2}"
            raise ValueError(msg)
        if max_iter < 1:
            msg = f"max_iter must be >= 1, got {max_iter}"
            raise ValueError(msg)
        self.l2 = l2
        self.max_iter = max_iter
        self.power_iter = power_iter

    def loss_derivative(self, margins: Tensor) -> Tensor:
        """d loss / d margin at ``margins = y * f``."""
        raise NotImplementedError

    def _lipschitz(self, augmented: Tensor, transposed: Tensor, weights: Tensor) -> Tensor:
        """Largest eigenvalue of ``X^T diag(a) X`` per image (power iteration), times the loss curvature."""
        vector = torch.ones(augmented.shape[0], augmented.shape[2], device=augmented.device)
        vector = vector / vector.norm(dim=1, keepdim=True)
        eigenvalue = torch.ones(augmented.shape[0], device=augmented.device)
        for _ in range(self.power_iter):
            product = _row_times(weights * _row_times(vector, transposed), augmented)
            eigenvalue = product.norm(dim=1)
            vector = product / eigenvalue.clamp(min=1e-12)[:, None]
        return self.curvature * eigenvalue * 1.1 + self.l2

    def fit(self, features: Tensor, labels: Tensor, valid: Tensor) -> LinearDecision:
        """Fit one model per image; see the module docstring for the objective.

        Args:
            features: ``(B, N, C)`` float features.
            labels: ``(B, N)`` +1 (defective) / -1 (normal).
            valid: ``(B, N)`` bool, which samples exist.

        Returns:
            The fitted :class:`LinearDecision`.
        """
        features = features.float()
        signs = labels.float()
        weights, fitted = balanced_weights(labels, valid)
        augmented = torch.cat((features, torch.ones_like(features[..., :1])), dim=2)
        transposed = augmented.transpose(1, 2).contiguous()
        step = 1.0 / self._lipschitz(augmented, transposed, weights)
        penalty = torch.ones(augmented.shape[2], device=features.device)
        penalty[-1] = 0.0  # the bias is not regularized

        params = torch.zeros(augmented.shape[0], augmented.shape[2], device=features.device)
        momentum_point = params
        momentum = 1.0
        for _ in range(self.max_iter):
            margins = signs * _row_times(momentum_point, transposed)
            grad_f = weights * signs * self.loss_derivative(margins)
            gradient = _row_times(grad_f, augmented) + self.l2 * penalty * momentum_point
            updated = momentum_point - step[:, None] * gradient
            next_momentum = (1 + (1 + 4 * momentum**2) ** 0.5) / 2
            momentum_point = updated + ((momentum - 1) / next_momentum) * (updated - params)
            params, momentum = updated, next_momentum

        fitted = fitted & torch.isfinite(params).all(dim=1)
        params = torch.where(fitted[:, None], params, torch.zeros_like(params))
        return LinearDecision(weight=params[:, :-1], bias=params[:, -1], fitted=fitted)


@CLASSIFIERS.register("svm")
class LinearSVM(_LinearClassifier):
    """Linear SVM with squared hinge loss and L2 penalty (the paper's classifier).

    Args:
        l2: L2 penalty on the weights (not the bias), > 0.
        max_iter: Number of accelerated gradient steps.
        power_iter: Power-iteration steps for the step size.

    Example:
        >>> features = torch.tensor([[[2.0], [1.0], [-1.0], [-2.0]]])
        >>> labels = torch.tensor([[1, 1, -1, -1]])
        >>> decision = LinearSVM().fit(features, labels, torch.ones(1, 4, dtype=torch.bool))
        >>> (decision.scores(features) > 0).tolist()
        [[True, True, False, False]]
    """

    curvature = 2.0

    def loss_derivative(self, margins: Tensor) -> Tensor:
        return -2 * (1 - margins).clamp(min=0)


@CLASSIFIERS.register("logistic")
class LogisticRegression(_LinearClassifier):
    """L2-regularized logistic regression.

    Args:
        l2: L2 penalty on the weights (not the bias), > 0.
        max_iter: Number of accelerated gradient steps.
        power_iter: Power-iteration steps for the step size.

    Example:
        >>> features = torch.tensor([[[2.0], [1.0], [-1.0], [-2.0]]])
        >>> labels = torch.tensor([[1, 1, -1, -1]])
        >>> decision = LogisticRegression().fit(features, labels, torch.ones(1, 4, dtype=torch.bool))
        >>> (decision.scores(features) > 0).tolist()
        [[True, True, False, False]]
    """

    curvature = 0.25

    def loss_derivative(self, margins: Tensor) -> Tensor:
        return -torch.sigmoid(-margins)
