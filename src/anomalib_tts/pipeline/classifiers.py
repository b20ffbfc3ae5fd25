"""Per-image classifiers, fitted for all images of a batch at once, and the decisions they return.

A classifier's ``fit`` takes the features sampled at each image's pseudo-labeled pixels and returns a
:class:`Decision`: one model per image, which scores any features (:meth:`Decision.scores`) and every pixel of a
feature pyramid (:meth:`Decision.score_map`). Any model fits this protocol (a nearest-prototype or small MLP
classifier is one class); the linear ones here return a :class:`LinearDecision`, whose score map is projected at
each feature level's own resolution.

The linear classifiers solve, for every image ``b`` independently but in one batched tensor program,

    min_{w, c}  sum_i a_bi * loss(y_bi * (x_bi . w + c)) + l2 / 2 * |w|^2

with class-balanced sample weights ``a`` (each class sums to 1/2). The solvers (:mod:`anomalib_tts.pipeline.solvers`) are
batched, without autograd or randomness (the same input always gives the same model; whatever else is in the
batch, the same model bit for bit with the SVM, and up to the last float bit of the vectorized sigmoid with
logistic regression). ``"auto"`` (default) takes the classifier's own choice (``newton`` for the SVM,
``accelerated`` bound-Newton steps for logistic regression) up to ``NEWTON_MAX_CHANNELS`` channels, gradient
descent above.

Wide features (e.g. WideResNet-50's 1536 channels) reach the classifier already projected to 256 channels by
default (the pipeline's ``max_channels``, :class:`~anomalib_tts.pipeline.features.pyramid.FeaturePyramid`). A
classifier's own ``projection`` does the same on the sampled features only, and maps the model back to every
channel.
"""

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from anomalib_tts.pipeline.devices import device_constant
from anomalib_tts.pipeline.features.pyramid import FeaturePyramid, flat_to_grid, random_projection
from anomalib_tts.pipeline.registry import Registry
from anomalib_tts.pipeline.solvers import SOLVERS, LinearProblem, row_times
from anomalib_tts.pipeline.validation import check_count

DEFAULT_TOLERANCE = 1e-6  # Newton decrement at which an image stops
NEWTON_MAX_CHANNELS = 512
DENSE_SCORING_VALUES = 2**24  # feature values the default Decision.score_map reads at once (64 MB of float32)


class Decision(ABC):
    """The models a classifier fitted, one per image of a batch.

    Subclasses set ``fitted`` and implement :meth:`scores`; :meth:`score_map` then scores every pixel of a
    feature pyramid (bilinearly upsampled features, read in chunks of pixels). A classifier may return a new
    decision object from ``fit`` or, being fitted, itself.

    Attributes:
        fitted: ``(B,)`` bool; ``False`` where an image got no usable model (it keeps its mask).

    Example:
        >>> class AboveMean(Decision):  # the standardized first channel: above the image's mean is defective
        ...     def __init__(self, fitted: Tensor) -> None:
        ...         self.fitted = fitted
        ...     def scores(self, features: Tensor) -> Tensor:
        ...         return features[..., 0]
        >>> pyramid = FeaturePyramid([torch.arange(16.0).reshape(1, 1, 4, 4)])
        >>> (AboveMean(torch.tensor([True])).score_map(pyramid, (4, 4)) > 0).sum().item()  # the lower two rows
        8
    """

    fitted: Tensor

    @abstractmethod
    def scores(self, features: Tensor) -> Tensor:
        """Decision values of ``(B, N, C)`` features -> ``(B, N)``; positive means defective."""

    def score_map(self, pyramid: FeaturePyramid, size: tuple[int, int]) -> Tensor:
        """Decision value at every pixel of a ``size`` map -> ``(B, *size)``.

        The default scores the pyramid's features sampled at every pixel centre (equal to bilinearly upsampled
        features), a chunk of pixels at a time; a subclass may compute the same faster.
        """
        height, width = size
        level = pyramid.levels[0]
        batch_size = level.shape[0]
        chunk = max(1, DENSE_SCORING_VALUES // max(batch_size * pyramid.num_channels, 1))
        pixels = torch.arange(height * width, device=level.device)
        values = [
            self.scores(pyramid.sample(flat_to_grid(part.expand(batch_size, -1), height, width)))
            for part in pixels.split(chunk)
        ]
        return torch.cat(values, dim=1).reshape(batch_size, height, width)


@dataclass
class LinearDecision(Decision):
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
        return row_times(self.weight, features.float().transpose(1, 2)) + self.bias[:, None]

    def score_map(self, pyramid: FeaturePyramid, size: tuple[int, int]) -> Tensor:
        """Decision value at every pixel of a ``size`` map -> ``(B, *size)``, projected at each level's resolution."""
        return pyramid.project(self.weight, size) + self.bias[:, None, None]


class PixelClassifier(ABC):
    """Base of the per-image classifiers: a new classifier is one subclass (in YAML: its ``class_path``)."""

    @abstractmethod
    def fit(self, features: Tensor, labels: Tensor, valid: Tensor) -> Decision:
        """Fit one model per image on ``(B, N, C)`` features, ``(B, N)`` labels in {+1, -1}, ``(B, N)`` validity.

        Invalid samples must not count; an image whose model cannot be used is marked in ``Decision.fitted``.
        """


CLASSIFIERS: Registry[PixelClassifier] = Registry("classifier", methods=("fit",))


@functools.lru_cache(maxsize=16)
def _penalty(dim: int, device: torch.device) -> Tensor:
    """``(dim,)`` ones, 0 for the bias (the last parameter, not regularized); made once per size and device."""
    return device_constant((1.0,) * (dim - 1) + (0.0,), torch.float32, device)


def balanced_weights(labels: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Sample weights where each class of each image sums to 1/2, and whether both classes are present."""
    positive = (labels > 0) & valid
    negative = (labels < 0) & valid
    num_positive = positive.sum(dim=1, keepdim=True)
    num_negative = negative.sum(dim=1, keepdim=True)
    weights = positive / (2 * num_positive.clamp(min=1)) + negative / (2 * num_negative.clamp(min=1))
    return weights.float(), (num_positive[:, 0] > 0) & (num_negative[:, 0] > 0)


class LinearClassifier(PixelClassifier):
    """Base of the linear classifiers: the batched solvers of :data:`SOLVERS`; a subclass gives the loss.

    A subclass sets ``curvature`` and ``narrow_solver`` and implements :meth:`loss`, :meth:`loss_derivative` and
    :meth:`loss_curvature`; its :meth:`fit` returns a :class:`LinearDecision`.

    Args:
        l2: L2 penalty on the weights (not the bias), > 0, against class weights that sum to 1 (the default,
            1.0, was chosen on two real datasets).
        solver: ``"auto"`` or a name of :data:`SOLVERS` (``"newton"``, ``"bound"``, ``"accelerated"``,
            ``"gradient"``).
        max_iter: Most steps; ``None`` takes the solver's ``default_steps`` (Newton 10, bound and accelerated 50,
            gradient 200).
        power_iter: Power-iteration steps for the gradient solver's step size.
        tolerance: The Newton-type solvers stop an image once its Newton decrement ``-g . d`` (about twice what
            the next step could still gain, the objective being a weighted mean of losses) falls to this; lower
            runs more steps.
        projection: Fit on sampled features projected to this many channels (fixed random matrix) when they are
            wider; ``None`` (default) fits on the channels it is given. The pipeline's ``max_channels`` (256 by
            default) projects the feature maps themselves, which is cheaper; this option is for classifiers used
            on their own.
    """

    curvature: float  # upper bound of the loss's second derivative (gradient step size, bound solver)
    narrow_solver: str  # what "auto" picks up to NEWTON_MAX_CHANNELS channels

    def __init__(
        self,
        l2: float = 1.0,
        solver: str = "auto",
        max_iter: int | None = None,
        power_iter: int = 20,
        projection: int | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
    ) -> None:
        if l2 <= 0:
            msg = f"l2 must be > 0, got {l2}"
            raise ValueError(msg)
        if not tolerance >= 0:
            msg = f"tolerance must be >= 0 (0 runs every step), got {tolerance}"
            raise ValueError(msg)
        if solver != "auto" and solver not in SOLVERS:
            msg = f"solver must be 'auto' or one of {sorted(SOLVERS)}, got {solver!r}"
            raise ValueError(msg)
        self.l2 = l2
        self.solver = solver
        self.max_iter = None if max_iter is None else check_count("max_iter", max_iter)
        self.power_iter = check_count("power_iter", power_iter)
        self.projection = None if projection is None else check_count("projection", projection)
        self.tolerance = tolerance

    def loss(self, margins: Tensor) -> Tensor:
        """Loss at ``margins = y * f``."""
        raise NotImplementedError

    def loss_derivative(self, margins: Tensor) -> Tensor:
        """d loss / d margin."""
        raise NotImplementedError

    def loss_curvature(self, margins: Tensor) -> Tensor:
        """d^2 loss / d margin^2 (generalized where the loss has a kink)."""
        raise NotImplementedError

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
        # X^T is what the feature sampler produces contiguously; X is only ever read as its transposed view
        features_t = features.transpose(1, 2)
        projection = None
        if self.projection is not None and features.shape[2] > self.projection:
            projection = random_projection(features.shape[2], self.projection, features.device)
            features_t = torch.matmul(projection.T, features_t)
        transposed = torch.cat((features_t, torch.ones_like(features_t[:, :1])), dim=1)
        augmented = transposed.transpose(1, 2)
        penalty = _penalty(augmented.shape[2], features.device)
        name = self.solver
        if name == "auto":
            name = self.narrow_solver if features_t.shape[1] <= NEWTON_MAX_CHANNELS else "gradient"
        solver = SOLVERS[name]
        params = solver.minimize(
            self, LinearProblem(augmented, transposed, signs, weights, penalty), self.max_iter or solver.default_steps
        )

        fitted = fitted & torch.isfinite(params).all(dim=1)
        params = torch.where(fitted[:, None], params, torch.zeros_like(params))
        weight = params[:, :-1] if projection is None else params[:, :-1] @ projection.T
        return LinearDecision(weight=weight, bias=params[:, -1], fitted=fitted)

    def objective(self, margins: Tensor, params: Tensor, weights: Tensor, penalty: Tensor) -> Tensor:
        """Objective for ``margins (..., N)`` and ``params (..., C)`` whose leading dims broadcast."""
        return (weights * self.loss(margins)).sum(dim=-1) + self.l2 / 2 * (penalty * params.square()).sum(dim=-1)

    def gradient(self, problem: LinearProblem, margins: Tensor, params: Tensor) -> Tensor:
        """Gradient of the objective at ``params``, whose margins ``y * (X params)`` are ``margins``.

        ``margins (B, N)`` and ``params (B, C)``, or both as ``(B, 1, ...)`` rows (a ``(B, 1, C)`` gradient).
        """
        if margins.dim() == 3:
            return torch.addcmul(
                torch.bmm(problem.signed_weight_rows * self.loss_derivative(margins), problem.augmented),
                problem.penalty,
                params,
                value=self.l2,
            )
        return torch.addcmul(
            row_times(problem.signed_weights * self.loss_derivative(margins), problem.augmented),
            problem.penalty,
            params,
            value=self.l2,
        )


@CLASSIFIERS.register("svm")
class LinearSVM(LinearClassifier):
    """Linear SVM with squared hinge loss and L2 penalty (the paper's classifier).

    Takes the arguments of every linear classifier here (``l2``, ``solver``, ``max_iter``, ``power_iter``,
    ``projection``, ``tolerance``), described on :class:`LinearClassifier`.

    Example:
        >>> features = torch.tensor([[[2.0], [1.0], [-1.0], [-2.0]]])
        >>> labels = torch.tensor([[1, 1, -1, -1]])
        >>> decision = LinearSVM().fit(features, labels, torch.ones(1, 4, dtype=torch.bool))
        >>> (decision.scores(features) > 0).tolist()
        [[True, True, False, False]]
    """

    curvature = 2.0
    narrow_solver = "newton"  # the bound counts every sample; the hinge's curvature only the active ones

    def loss(self, margins: Tensor) -> Tensor:
        return (1 - margins).clamp(min=0).square()

    def loss_derivative(self, margins: Tensor) -> Tensor:
        return -2 * (1 - margins).clamp(min=0)

    def loss_curvature(self, margins: Tensor) -> Tensor:
        return 2.0 * (margins < 1)


@CLASSIFIERS.register("logistic")
class LogisticRegression(LinearClassifier):
    """L2-regularized logistic regression.

    Takes the arguments of every linear classifier here (``l2``, ``solver``, ``max_iter``, ``power_iter``,
    ``projection``, ``tolerance``), described on :class:`LinearClassifier`.

    Example:
        >>> features = torch.tensor([[[2.0], [1.0], [-1.0], [-2.0]]])
        >>> labels = torch.tensor([[1, 1, -1, -1]])
        >>> decision = LogisticRegression().fit(features, labels, torch.ones(1, 4, dtype=torch.bool))
        >>> (decision.scores(features) > 0).tolist()
        [[True, True, False, False]]
    """

    curvature = 0.25
    narrow_solver = "accelerated"

    def loss(self, margins: Tensor) -> Tensor:
        return torch.nn.functional.softplus(-margins)

    def loss_derivative(self, margins: Tensor) -> Tensor:
        return -torch.sigmoid(-margins)

    def loss_curvature(self, margins: Tensor) -> Tensor:
        return torch.sigmoid(margins) * torch.sigmoid(-margins)
