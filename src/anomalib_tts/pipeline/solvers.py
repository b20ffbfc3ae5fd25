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

from anomalib_tts.pipeline.devices import device_constant, host_reads_are_free

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
    return host_reads_are_free(tensor)


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

    @functools.cached_property
    def signed_weight_rows(self) -> Tensor:
        """``signed_weights`` as ``(B, 1, N)`` rows, for gradients at ``(B, 1, N)`` margins."""
        return self.signed_weights[:, None]

    @functools.cached_property
    def sign_rows(self) -> Tensor:
        """``signs`` as ``(B, 1, N)`` rows."""
        return self.signs[:, None]


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
    step_sizes = device_constant(NEWTON_STEP_SIZES, augmented.dtype, augmented.device)[None, :, None]
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
    if _scalar_reads_are_free(factor):
        return torch.cholesky_inverse(factor), info
    # cholesky_inverse reads its error codes back (a wait for the device); two triangular products read nothing
    eye = _identity(factor.shape[-1], factor.dtype, factor.device)
    lower_inverse = torch.linalg.solve_triangular(factor, eye, upper=False)
    return lower_inverse.mT @ lower_inverse, info


@functools.lru_cache(maxsize=16)
def _identity(dim: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.eye(dim, dtype=dtype, device=device)


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


@functools.lru_cache(maxsize=16)
def _extrapolations(steps: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """FISTA's extrapolation after ``k`` steps without a restart, for ``k`` in ``0 .. steps - 1`` (made once per
    device: a tensor made from Python values on an accelerator is a copy that waits for its queue)."""
    momenta = [1.0]
    for _ in range(steps):
        momenta.append((1 + (1 + 4 * momenta[-1] ** 2) ** 0.5) / 2)
    return torch.tensor([(now - 1) / after for now, after in itertools.pairwise(momenta)], dtype=dtype, device=device)


def accelerated_bound_steps(classifier: "LinearClassifier", problem: LinearProblem, steps: int) -> Tensor:
    """Bound-Newton steps with Nesterov momentum, restarted per image whenever a step goes uphill.

    The bound makes the objective 1-smooth in the metric of ``X^T diag(a) X`` (times the loss's curvature bound),
    so each step is :func:`bound_newton_steps`' step taken from an extrapolated point, at the same cost per step.
    The momentum is reset for an image whose gradient at the extrapolated point opposes its last move (gradient
    restart, O'Donoghue and Candes 2015). It reaches the same optimum in fewer steps than the plain bound solver.

    Each image's state is kept as ``(B, 1, ...)`` rows and its scalars as ``(B, 1, 1)``, so that every product is
    one batched matrix product and nothing is reshaped within a step; the last move (``updated - params``) serves
    both the restart test and the next extrapolation. At batch 1 the cost of a step is the number of operations it
    dispatches (each a kernel launch on a GPU), not their arithmetic: about 30 per step.
    """
    augmented, transposed = problem.augmented, problem.transposed
    batch_size, num_samples, dim = augmented.shape
    inverse, info = _inverse_bound(classifier, problem)
    extrapolations = _extrapolations(steps, augmented.dtype, augmented.device)  # looked up per image by its age
    signs = problem.sign_rows
    age = torch.zeros(batch_size, 1, 1, dtype=torch.int64, device=augmented.device)
    params = move = augmented.new_zeros(batch_size, 1, dim)
    margins = margin_move = augmented.new_zeros(batch_size, 1, num_samples)
    moving = (info == 0)[:, None, None]
    for iteration in range(steps):
        extrapolation = extrapolations[age]
        point = torch.addcmul(params, extrapolation, move)
        point_margins = torch.addcmul(margins, extrapolation, margin_move)
        gradient = classifier.gradient(problem, point_margins, point)
        direction = torch.bmm(gradient, inverse).neg_()
        updated = torch.where(moving, point + direction, params)
        updated_margins = torch.where(
            moving, torch.addcmul(point_margins, signs, torch.bmm(direction, transposed)), margins
        )
        # this step was its last
        moving = moving & ((gradient * direction).sum(dim=2, keepdim=True) < -classifier.tolerance)
        move, margin_move = updated - params, updated_margins - margins
        uphill = (gradient * move).sum(dim=2, keepdim=True) > 0
        age = torch.where(uphill, 0, age + 1)
        params, margins = updated, updated_margins
        if _all_stopped(moving, iteration):
            break
    return torch.where((info != 0)[:, None], torch.full_like(params[:, 0], float("nan")), params[:, 0])


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
