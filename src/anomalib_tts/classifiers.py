"""Per-image classifiers, fitted for all images of a batch at once, and the decisions they return.

A classifier's ``fit`` takes the features sampled at each image's pseudo-labeled pixels and returns a
:class:`Decision`: one model per image, which scores any features (:meth:`Decision.scores`) and every pixel of a
feature pyramid (:meth:`Decision.score_map`). Any model fits this protocol (a nearest-prototype or small MLP
classifier is one class); the linear ones here return a :class:`LinearDecision`, whose score map is projected at
each feature level's own resolution.

The linear classifiers solve, for every image ``b`` independently but in one batched tensor program,

    min_{w, c}  sum_i a_bi * loss(y_bi * (x_bi . w + c)) + l2 / 2 * |w|^2

with class-balanced sample weights ``a`` (each class sums to 1/2). The solvers, listed in :data:`SOLVERS`, are
batched, without autograd or randomness (the same input always gives the same model; whatever else is in the
batch, the same model bit for bit with the SVM, and up to the last float bit of the vectorized sigmoid with
logistic regression). ``"auto"`` (default) takes the classifier's own choice (``newton`` for the SVM,
``accelerated`` bound-Newton steps for logistic regression) up to ``NEWTON_MAX_CHANNELS`` channels, gradient
descent above.

Wide features (e.g. WideResNet-50's 1536 channels) reach the classifier already projected to 256 channels by
default (the refiner's ``max_channels``, :class:`~anomalib_tts.features.FeaturePyramid`). A classifier's own
``projection`` does the same on the sampled features only, and maps the model back to every channel.
"""

import functools
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from anomalib_tts.features import FeaturePyramid, flat_to_grid, random_projection
from anomalib_tts.registry import Registry
from anomalib_tts.validation import check_count

GRAM_CHUNK = 256
ACCELERATOR_CHECK_STEPS = 8  # solver steps between convergence checks on an accelerator
NEWTON_STEP_SIZES = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.0)
DEFAULT_TOLERANCE = 1e-6  # Newton decrement at which an image stops; docs/speed.md measures what it changes
BIAS_JITTER = 1e-6  # keeps the Hessian definite when no sample is active (the bias is not regularized)
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
        return _row_times(self.weight, features.float().transpose(1, 2)) + self.bias[:, None]

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

    Both products the solver needs are written in this row-vector form, on ``X^T`` and on its transposed
    view ``X``: on CPU, a batched row-vector product is about ten times faster than the matrix-column one, and
    BLAS reads the transposed view in place.
    """
    return torch.bmm(vectors[:, None, :], matrices)[:, 0]


def _scalar_reads_are_free(tensor: Tensor) -> bool:
    """Shortcuts that read a value back to Python are taken on CPU only; on an accelerator they stall its queue."""
    return tensor.device.type == "cpu"


def _all_stopped(moving: Tensor, iteration: int) -> bool:
    """Whether no image is moving any more: read back after every step on CPU, every ``ACCELERATOR_CHECK_STEPS``
    steps on an accelerator (where a read waits for the queue to drain). Stopped images no longer change, so
    when the loop ends does not change the result."""
    if not _scalar_reads_are_free(moving) and (iteration + 1) % ACCELERATOR_CHECK_STEPS:
        return False
    return not bool(moving.any())


def _weighted_gram(transposed: Tensor, sample_weights: Tensor) -> Tensor:
    """``X^T diag(c) X`` per image from ``X^T`` ``(B, C, N)``, over the samples with ``c > 0`` only.

    With the squared hinge, samples beyond the margin have no curvature; after the first Newton steps they are
    most of them, so the products run on the active samples alone. Samples are taken in index order and summed
    in fixed chunks, so an image's result does not depend on how many samples its batchmates need.
    """
    active = sample_weights > 0
    order = torch.sort(~active, dim=1, stable=True).indices
    needed = int(active.sum(dim=1).max()) if _scalar_reads_are_free(active) else active.shape[1]
    batch_size, dim, _ = transposed.shape
    gram = transposed.new_zeros(batch_size, dim, dim)
    for start in range(0, needed, GRAM_CHUNK):
        index = order[:, start : start + GRAM_CHUNK]
        columns = transposed.gather(2, index[:, None, :].expand(-1, dim, -1))
        weights = torch.where(active.gather(1, index), sample_weights.gather(1, index), 0.0)
        gram = gram + torch.bmm(columns * weights[:, None, :], columns.transpose(1, 2))
    return gram


class LinearClassifier(PixelClassifier):
    """Base of the linear classifiers: the batched solvers of :data:`SOLVERS`; a subclass gives the loss.

    A subclass sets ``curvature`` and ``narrow_solver`` and implements :meth:`loss`, :meth:`loss_derivative` and
    :meth:`loss_curvature`; its :meth:`fit` returns a :class:`LinearDecision`.

    Args:
        l2: L2 penalty on the weights (not the bias), > 0, against class weights that sum to 1 (the default,
            1.0, was chosen on both real datasets of docs/studies.md).
        solver: ``"auto"`` or a name of :data:`SOLVERS` (``"newton"``, ``"bound"``, ``"accelerated"``,
            ``"gradient"``).
        max_iter: Most steps; ``None`` takes the solver's ``default_steps`` (Newton 10, bound and accelerated 50,
            gradient 200).
        power_iter: Power-iteration steps for the gradient solver's step size.
        tolerance: The Newton-type solvers stop an image once its Newton decrement ``-g . d`` (about twice what
            the next step could still gain, the objective being a weighted mean of losses) falls to this; lower
            runs more steps. What the default, 1e-6, changes in the masks against a fit run to convergence is
            measured in docs/speed.md.
        projection: Fit on sampled features projected to this many channels (fixed random matrix) when they are
            wider; ``None`` (default) fits on the channels it is given. The refiner's ``max_channels`` (256 by
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
        penalty = torch.ones(augmented.shape[2], device=features.device)
        penalty[-1] = 0.0  # the bias is not regularized
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

    def gradient(self, problem: "LinearProblem", margins: Tensor, params: Tensor) -> Tensor:
        """Gradient of the objective at ``params``, whose margins ``y * (X params)`` are ``margins``."""
        return torch.addcmul(
            _row_times(problem.signed_weights * self.loss_derivative(margins), problem.augmented),
            problem.penalty,
            params,
            value=self.l2,
        )


@dataclass
class LinearProblem:
    """The batch of fitting problems a solver minimizes (the bias is the last column of the features).

    Attributes:
        augmented: ``(B, N, C + 1)`` features with a column of ones, ``X``.
        transposed: ``(B, C + 1, N)``, ``X^T``, contiguous (``augmented`` is its transposed view).
        signs: ``(B, N)`` labels as +1.0 / -1.0.
        weights: ``(B, N)`` class-balanced sample weights (0 for invalid samples).
        penalty: ``(C + 1,)`` 1 for the weights, 0 for the bias.
    """

    augmented: Tensor
    transposed: Tensor
    signs: Tensor
    weights: Tensor
    penalty: Tensor

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(augmented, transposed, signs, weights, penalty)``."""
        return self.augmented, self.transposed, self.signs, self.weights, self.penalty

    @functools.cached_property
    def signed_weights(self) -> Tensor:
        """``weights * signs``, which every gradient reads."""
        return self.weights * self.signs


def newton_steps(classifier: LinearClassifier, problem: LinearProblem, steps: int) -> Tensor:
    """Damped Newton steps: each solves the ``C x C`` system of the (generalized) Hessian by a batched Cholesky
    factorization, with a step chosen per image among a few halvings.

    It reaches the optimum in a handful of steps; an image stops moving once its Newton decrement is negligible.
    Its cost, ``N * C^2`` per step in matrix products, suits feature sizes up to a few hundred channels, and any
    size on a GPU.
    """
    augmented, transposed, signs, weights, penalty = problem.as_tuple()
    batch_size, _, dim = augmented.shape
    regularizer = torch.diag(classifier.l2 * penalty + BIAS_JITTER)
    step_sizes = augmented.new_tensor(NEWTON_STEP_SIZES)[None, :, None]
    params = augmented.new_zeros(batch_size, dim)
    margins = torch.zeros_like(signs)
    moving = torch.ones(batch_size, dtype=torch.bool, device=augmented.device)
    broken = torch.zeros_like(moving)
    for iteration in range(steps):
        gradient = classifier.gradient(problem, margins, params)
        hessian = _weighted_gram(transposed, weights * classifier.loss_curvature(margins)) + regularizer
        factor, info = torch.linalg.cholesky_ex(hessian)
        direction = -torch.cholesky_solve(gradient[:, :, None], factor)[:, :, 0]
        broken = broken | (info != 0) | ~torch.isfinite(direction).all(dim=1)
        moving = moving & ~broken & (-(gradient * direction).sum(dim=1) > classifier.tolerance)
        direction = torch.where(moving[:, None], direction, torch.zeros_like(direction))
        margin_slope = signs * _row_times(direction, transposed)
        objective = classifier.objective(
            margins[:, None] + step_sizes * margin_slope[:, None],
            params[:, None] + step_sizes * direction[:, None],
            weights[:, None],
            penalty,
        )
        step = step_sizes[0, :, 0][objective.argmin(dim=1)]
        params = params + step[:, None] * direction
        margins = margins + step[:, None] * margin_slope
        if _all_stopped(moving, iteration):
            break
    return torch.where(broken[:, None], torch.full_like(params, float("nan")), params)


def _inverse_bound(classifier: LinearClassifier, problem: LinearProblem) -> tuple[Tensor, Tensor]:
    """The inverse of each image's bound on the Hessian, ``curvature * X^T diag(a) X + l2 * penalty``, and the
    Cholesky factorization's ``info`` (non-zero where it failed).

    The bound stays fixed over the steps, so it is inverted once and each step is one batched product: on a GPU a
    triangular solve per step costs far more than the product. Every sample weighs here, so the Gram matrix is
    one product over all of them (invalid samples weigh 0).
    """
    transposed = problem.transposed
    gram = torch.bmm(transposed * problem.weights[:, None, :], transposed.transpose(1, 2))
    bound = classifier.curvature * gram + torch.diag(classifier.l2 * problem.penalty + BIAS_JITTER)
    factor, info = torch.linalg.cholesky_ex(bound)
    return torch.cholesky_inverse(factor), info


def bound_newton_steps(classifier: LinearClassifier, problem: LinearProblem, steps: int) -> Tensor:
    """Newton steps on a fixed upper bound of the Hessian (the loss's largest curvature times ``X^T diag(a) X``),
    inverted once.

    Each step then costs ``N * C`` and never increases the objective (majorization-minimization). For the
    logistic loss the bound is tight near the solution, so a few dozen such steps cost less than two exact
    Newton steps.
    """
    augmented, transposed, signs = problem.augmented, problem.transposed, problem.signs
    batch_size, _, dim = augmented.shape
    inverse, info = _inverse_bound(classifier, problem)
    params = augmented.new_zeros(batch_size, dim)
    margins = torch.zeros_like(signs)
    moving = info == 0
    for iteration in range(steps):
        gradient = classifier.gradient(problem, margins, params)
        direction = -_row_times(gradient, inverse)
        moving = moving & (-(gradient * direction).sum(dim=1) > classifier.tolerance)
        direction = torch.where(moving[:, None], direction, torch.zeros_like(direction))
        params = params + direction
        margins = margins + signs * _row_times(direction, transposed)
        if _all_stopped(moving, iteration):
            break
    return torch.where((info != 0)[:, None], torch.full_like(params, float("nan")), params)


def accelerated_bound_steps(classifier: LinearClassifier, problem: LinearProblem, steps: int) -> Tensor:
    """Bound-Newton steps with Nesterov momentum, restarted per image whenever a step goes uphill.

    The bound makes the objective 1-smooth in the metric of ``X^T diag(a) X`` (times the loss's curvature bound),
    so each step is :func:`bound_newton_steps`' step taken from an extrapolated point, at the same cost per step.
    The momentum is reset for an image whose gradient at the extrapolated point opposes its last move (gradient
    restart, O'Donoghue and Candes 2015). It reaches the same optimum in fewer steps than the plain bound solver
    (tests/test_classifiers.py).
    """
    augmented, transposed, signs = problem.augmented, problem.transposed, problem.signs
    batch_size, _, dim = augmented.shape
    inverse, info = _inverse_bound(classifier, problem)
    # FISTA's momentum after k steps without a restart, looked up per image by its age
    momenta = [1.0]
    for _ in range(steps):
        momenta.append((1 + (1 + 4 * momenta[-1] ** 2) ** 0.5) / 2)
    extrapolations = augmented.new_tensor([(now - 1) / after for now, after in itertools.pairwise(momenta)])
    age = torch.zeros(batch_size, dtype=torch.int64, device=augmented.device)
    params = previous = augmented.new_zeros(batch_size, dim)
    margins = previous_margins = torch.zeros_like(signs)
    moving = info == 0
    for iteration in range(steps):
        extrapolation = extrapolations[age][:, None]
        point = torch.addcmul(params, extrapolation, params - previous)
        point_margins = torch.addcmul(margins, extrapolation, margins - previous_margins)
        gradient = classifier.gradient(problem, point_margins, point)
        direction = -_row_times(gradient, inverse)
        updated = torch.where(moving[:, None], point + direction, params)
        updated_margins = torch.where(
            moving[:, None], torch.addcmul(point_margins, signs, _row_times(direction, transposed)), margins
        )
        moving = moving & ((gradient * direction).sum(dim=1) < -classifier.tolerance)  # this step was its last
        uphill = (gradient * (updated - params)).sum(dim=1) > 0
        age = torch.where(uphill, 0, age + 1)
        previous, previous_margins = params, margins
        params, margins = updated, updated_margins
        if _all_stopped(moving, iteration):
            break
    return torch.where((info != 0)[:, None], torch.full_like(params, float("nan")), params)


def accelerated_gradient_steps(classifier: LinearClassifier, problem: LinearProblem, steps: int) -> Tensor:
    """Nesterov-accelerated gradient descent, a fixed number of steps of size ``1 / L`` (``L`` from a batched
    power iteration); ``N * C`` per step, for wide features (thousands of channels)."""
    augmented, transposed, signs = problem.augmented, problem.transposed, problem.signs
    step = 1.0 / _lipschitz(classifier, problem)
    params = torch.zeros(augmented.shape[0], augmented.shape[2], device=augmented.device)
    momentum_point = params
    momentum = 1.0
    for _ in range(steps):
        margins = signs * _row_times(momentum_point, transposed)
        gradient = classifier.gradient(problem, margins, momentum_point)
        updated = momentum_point - step[:, None] * gradient
        next_momentum = (1 + (1 + 4 * momentum**2) ** 0.5) / 2
        momentum_point = updated + ((momentum - 1) / next_momentum) * (updated - params)
        params, momentum = updated, next_momentum
    return params


def _lipschitz(classifier: LinearClassifier, problem: LinearProblem) -> Tensor:
    """Largest eigenvalue of ``X^T diag(a) X`` per image (power iteration), times the loss curvature."""
    augmented, transposed, weights = problem.augmented, problem.transposed, problem.weights
    vector = torch.ones(augmented.shape[0], augmented.shape[2], device=augmented.device)
    vector = vector / vector.norm(dim=1, keepdim=True)
    eigenvalue = torch.ones(augmented.shape[0], device=augmented.device)
    for _ in range(classifier.power_iter):
        product = _row_times(weights * _row_times(vector, transposed), augmented)
        eigenvalue = product.norm(dim=1)
        vector = product / eigenvalue.clamp(min=1e-12)[:, None]
    return classifier.curvature * eigenvalue * 1.1 + classifier.l2


@dataclass(frozen=True)
class Solver:
    """A way to minimize a :class:`LinearClassifier`'s objective.

    Attributes:
        minimize: ``(classifier, problem, steps) -> (B, C + 1)`` parameters (weights, then bias); ``nan`` rows for
            images it could not solve.
        default_steps: Steps when the classifier's ``max_iter`` is ``None``.
    """

    minimize: Callable[[LinearClassifier, LinearProblem, int], Tensor]
    default_steps: int


SOLVERS: dict[str, Solver] = {
    "newton": Solver(newton_steps, default_steps=10),
    "bound": Solver(bound_newton_steps, default_steps=50),
    "accelerated": Solver(accelerated_bound_steps, default_steps=50),
    "gradient": Solver(accelerated_gradient_steps, default_steps=200),
}
"""The linear classifiers' solvers by name (their ``solver`` argument); ``"auto"`` picks among them."""


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
