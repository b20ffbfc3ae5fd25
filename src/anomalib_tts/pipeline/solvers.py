"""The batched solvers of the linear classifiers: one table, :data:`SOLVERS`, from which ``solver`` picks.

Each solver minimizes, for every image of a batch independently but in one tensor program, the objective of a
:class:`~anomalib_tts.pipeline.classifiers.LinearClassifier` (its loss, derivative and curvature), with no autograd
and no randomness.
"""

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from anomalib_tts.pipeline.classifiers import LinearClassifier

GRAM_CHUNK = 256
ACCELERATOR_CHECK_STEPS = 8  # solver steps between convergence checks on an accelerator
NEWTON_STEP_SIZES = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.0)
BIAS_JITTER = 1e-6  # keeps the Hessian definite when no sample is active (the bias is not regularized)


def row_times(vectors: Tensor, matrices: Tensor) -> Tensor:
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


def newton_steps(classifier: "LinearClassifier", problem: LinearProblem, steps: int) -> Tensor:
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
        margin_slope = signs * row_times(direction, transposed)
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


def _inverse_bound(classifier: "LinearClassifier", problem: LinearProblem) -> tuple[Tensor, Tensor]:
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


def bound_newton_steps(classifier: "LinearClassifier", problem: LinearProblem, steps: int) -> Tensor:
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
        direction = -row_times(gradient, inverse)
        moving = moving & (-(gradient * direction).sum(dim=1) > classifier.tolerance)
        direction = torch.where(moving[:, None], direction, torch.zeros_like(direction))
        params = params + direction
        margins = margins + signs * row_times(direction, transposed)
        if _all_stopped(moving, iteration):
            break
    return torch.where((info != 0)[:, None], torch.full_like(params, float("nan")), params)


def accelerated_bound_steps(classifier: "LinearClassifier", problem: LinearProblem, steps: int) -> Tensor:
    """Bound-Newton steps with Nesterov momentum, restarted per image whenever a step goes uphill.

    The bound makes the objective 1-smooth in the metric of ``X^T diag(a) X`` (times the loss's curvature bound),
    so each step is :func:`bound_newton_steps`' step taken from an extrapolated point, at the same cost per step.
    The momentum is reset for an image whose gradient at the extrapolated point opposes its last move (gradient
    restart, O'Donoghue and Candes 2015). It reaches the same optimum in fewer steps than the plain bound solver.
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
        direction = -row_times(gradient, inverse)
        updated = torch.where(moving[:, None], point + direction, params)
        updated_margins = torch.where(
            moving[:, None], torch.addcmul(point_margins, signs, row_times(direction, transposed)), margins
        )
        moving = moving & ((gradient * direction).sum(dim=1) < -classifier.tolerance)  # this step was its last
        uphill = (gradient * (updated - params)).sum(dim=1) > 0
        age = torch.where(uphill, 0, age + 1)
        previous, previous_margins = params, margins
        params, margins = updated, updated_margins
        if _all_stopped(moving, iteration):
            break
    return torch.where((info != 0)[:, None], torch.full_like(params, float("nan")), params)


def accelerated_gradient_steps(classifier: "LinearClassifier", problem: LinearProblem, steps: int) -> Tensor:
    """Nesterov-accelerated gradient descent, a fixed number of steps of size ``1 / L`` (``L`` from a batched
    power iteration); ``N * C`` per step, for wide features (thousands of channels)."""
    augmented, transposed, signs = problem.augmented, problem.transposed, problem.signs
    step = 1.0 / _lipschitz(classifier, problem)
    params = torch.zeros(augmented.shape[0], augmented.shape[2], device=augmented.device)
    momentum_point = params
    momentum = 1.0
    for _ in range(steps):
        margins = signs * row_times(momentum_point, transposed)
        gradient = classifier.gradient(problem, margins, momentum_point)
        updated = momentum_point - step[:, None] * gradient
        next_momentum = (1 + (1 + 4 * momentum**2) ** 0.5) / 2
        momentum_point = updated + ((momentum - 1) / next_momentum) * (updated - params)
        params, momentum = updated, next_momentum
    return params


def _lipschitz(classifier: "LinearClassifier", problem: LinearProblem) -> Tensor:
    """Largest eigenvalue of ``X^T diag(a) X`` per image (power iteration), times the loss curvature."""
    augmented, transposed, weights = problem.augmented, problem.transposed, problem.weights
    vector = torch.ones(augmented.shape[0], augmented.shape[2], device=augmented.device)
    vector = vector / vector.norm(dim=1, keepdim=True)
    eigenvalue = torch.ones(augmented.shape[0], device=augmented.device)
    for _ in range(classifier.power_iter):
        product = row_times(weights * row_times(vector, transposed), augmented)
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

    minimize: Callable[["LinearClassifier", "LinearProblem", int], Tensor]
    default_steps: int


SOLVERS: dict[str, Solver] = {
    "newton": Solver(newton_steps, default_steps=10),
    "bound": Solver(bound_newton_steps, default_steps=50),
    "accelerated": Solver(accelerated_bound_steps, default_steps=50),
    "gradient": Solver(accelerated_gradient_steps, default_steps=200),
}
"""The linear classifiers' solvers by name (their ``solver`` argument); ``"auto"`` picks among them."""
