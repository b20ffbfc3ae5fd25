"""The batched classifiers separate separable data, per image, deterministically."""

import itertools

import pytest
import torch

from anomalib_tts.pipeline.classifiers import CLASSIFIERS, Decision, LinearSVM, LogisticRegression, balanced_weights
from anomalib_tts.pipeline.features.pyramid import FeaturePyramid, random_projection
from anomalib_tts.pipeline.solvers import SOLVERS, Solver


def _problems(batch: int = 3, samples: int = 200, channels: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image has its own separating direction, so a shared model would fail."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(batch, samples, channels, generator=generator)
    directions = torch.randn(batch, channels, generator=generator)
    margins = torch.einsum("bnc,bc->bn", features, directions) + 0.3
    labels = torch.where(margins > 0, 1, -1)
    features = features + 0.5 * labels[..., None] * directions[:, None, :] / directions.norm(dim=1)[:, None, None]
    return features, labels


@pytest.mark.parametrize("name", ["svm", "logistic"])
def test_separates_each_image_with_its_own_model(name: str) -> None:
    features, labels = _problems()
    decision = CLASSIFIERS.get(name)(max_iter=300).fit(features, labels, torch.ones_like(labels, dtype=torch.bool))
    accuracy = ((decision.scores(features) > 0) == (labels > 0)).float().mean(dim=1)
    assert decision.fitted.all()
    assert (accuracy > 0.97).all(), accuracy


def test_invalid_samples_are_ignored() -> None:
    features, labels = _problems(batch=1)
    valid = torch.ones_like(labels, dtype=torch.bool)
    poisoned = features.clone()
    poisoned[0, :20] = 1e3  # would dominate the fit if it counted
    valid[0, :20] = False
    clean = LinearSVM().fit(features[:, 20:], labels[:, 20:], valid[:, 20:])
    masked = LinearSVM().fit(poisoned, labels, valid)
    assert torch.allclose(clean.weight, masked.weight, atol=1e-5)


def test_one_class_input_is_reported_not_fitted() -> None:
    features, _ = _problems(batch=2)
    labels = torch.ones(2, features.shape[1], dtype=torch.long)
    labels[1, ::2] = -1
    decision = LinearSVM().fit(features, labels, torch.ones_like(labels, dtype=torch.bool))
    assert decision.fitted.tolist() == [False, True]
    assert (decision.weight[0] == 0).all()


def test_non_finite_features_give_an_unfitted_model() -> None:
    features, labels = _problems(batch=2)
    features[0, 0, 0] = float("nan")
    decision = LinearSVM().fit(features, labels, torch.ones_like(labels, dtype=torch.bool))
    assert decision.fitted.tolist() == [False, True]


def test_fit_is_deterministic() -> None:
    features, labels = _problems()
    valid = torch.ones_like(labels, dtype=torch.bool)
    first = LinearSVM().fit(features, labels, valid)
    second = LinearSVM().fit(features.clone(), labels.clone(), valid)
    assert torch.equal(first.weight, second.weight)
    assert torch.equal(first.bias, second.bias)


def test_balanced_weights_give_each_class_half() -> None:
    labels = torch.tensor([[1, -1, -1, -1, 1]])
    valid = torch.tensor([[True, True, True, True, False]])
    weights, both = balanced_weights(labels, valid)
    assert torch.allclose(weights, torch.tensor([[0.5, 1 / 6, 1 / 6, 1 / 6, 0.0]]))
    assert both.tolist() == [True]


@pytest.mark.parametrize(
    ("kwargs", "argument"), [({"l2": 0}, "l2"), ({"max_iter": 0}, "max_iter"), ({"tolerance": -1e-6}, "tolerance")]
)
def test_invalid_arguments(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        LinearSVM(**kwargs)


def _objective(classifier, decision, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    weights, _ = balanced_weights(labels, torch.ones_like(labels, dtype=torch.bool))
    margins = labels * decision.scores(features)
    return (weights * classifier.loss(margins)).sum(dim=1) + classifier.l2 / 2 * decision.weight.square().sum(dim=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["svm", "logistic"])
def test_newton_reaches_the_optimum_gradient_descent_approaches(name: str) -> None:
    features, labels = _problems(samples=300)
    labels[:, ::7] *= -1  # not separable: the optimum has active samples on both sides
    valid = torch.ones_like(labels, dtype=torch.bool)
    newton = CLASSIFIERS.get(name)(solver="newton", max_iter=30)
    gradient = CLASSIFIERS.get(name)(solver="gradient", max_iter=5000)
    newton_objective = _objective(newton, newton.fit(features, labels, valid), features, labels)
    gradient_objective = _objective(gradient, gradient.fit(features, labels, valid), features, labels)
    assert (newton_objective <= gradient_objective * (1 + 1e-4)).all(), (newton_objective, gradient_objective)
    assert torch.allclose(newton_objective, gradient_objective, rtol=1e-3)


@pytest.mark.parametrize("solver", ["bound", "accelerated"])
@pytest.mark.parametrize("name", ["svm", "logistic"])
def test_bound_newton_solvers_reach_the_exact_newton_optimum(name: str, solver: str) -> None:
    features, labels = _problems(samples=300)
    labels[:, ::7] *= -1
    valid = torch.ones_like(labels, dtype=torch.bool)
    newton = CLASSIFIERS.get(name)(solver="newton", max_iter=30)
    bounded = CLASSIFIERS.get(name)(solver=solver, max_iter=2000)
    newton_objective = _objective(newton, newton.fit(features, labels, valid), features, labels)
    bounded_objective = _objective(bounded, bounded.fit(features, labels, valid), features, labels)
    assert torch.allclose(newton_objective, bounded_objective, rtol=1e-4), (newton_objective, bounded_objective)


def _correlated_problems(batch: int = 3, samples: int = 400, channels: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardized features of low rank plus noise, one direction separating the classes: like a backbone's."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.where(torch.rand(batch, samples, generator=generator) > 0.7, 1, -1)
    factors = torch.randn(batch, samples, 4, generator=generator)
    factors[..., 0] += 4.0 * labels
    features = factors @ torch.randn(batch, 4, channels, generator=generator)
    features = features + 0.3 * torch.randn(batch, samples, channels, generator=generator)
    return (features - features.mean(dim=1, keepdim=True)) / features.std(dim=1, keepdim=True), labels


def test_accelerated_bound_newton_needs_fewer_steps_than_bound_newton_on_logistic_regression() -> None:
    features, labels = _correlated_problems()
    valid = torch.ones_like(labels, dtype=torch.bool)
    newton = LogisticRegression(solver="newton", max_iter=30, tolerance=0.0)
    optimum = _objective(newton, newton.fit(features, labels, valid), features, labels)

    def steps_to_optimum(solver: str) -> int:
        for steps in range(1, 200):
            classifier = LogisticRegression(solver=solver, max_iter=steps, tolerance=0.0)
            objective = _objective(classifier, classifier.fit(features, labels, valid), features, labels)
            if (objective <= optimum * (1 + 1e-5)).all():
                return steps
        raise AssertionError(solver)

    accelerated, bound = steps_to_optimum("accelerated"), steps_to_optimum("bound")
    assert accelerated < 0.75 * bound, (accelerated, bound)


def test_a_looser_tolerance_stops_earlier_near_the_same_optimum() -> None:
    features, labels = _correlated_problems()
    valid = torch.ones_like(labels, dtype=torch.bool)
    steps = {}

    def counting(tolerance: float) -> LogisticRegression:
        classifier = LogisticRegression(tolerance=tolerance)
        original = classifier.gradient

        def gradient(*args):
            steps[tolerance] = steps.get(tolerance, 0) + 1
            return original(*args)

        classifier.gradient = gradient
        return classifier

    tight, loose = counting(1e-12), counting(1e-4)
    tight_objective = _objective(tight, tight.fit(features, labels, valid), features, labels)
    loose_objective = _objective(loose, loose.fit(features, labels, valid), features, labels)
    assert steps[1e-4] < steps[1e-12]
    assert (loose_objective >= tight_objective * (1 - 1e-6)).all()
    assert (loose_objective - tight_objective <= 1e-4).all()  # on these problems it stops within 1e-4 of the optimum


def test_bound_newton_never_increases_the_objective() -> None:
    features, labels = _problems(samples=300)
    labels[:, ::5] *= -1
    valid = torch.ones_like(labels, dtype=torch.bool)
    objectives = [
        _objective(classifier, classifier.fit(features, labels, valid), features, labels)
        for classifier in (LogisticRegression(solver="bound", max_iter=steps) for steps in (1, 2, 4, 8, 16))
    ]
    for earlier, later in itertools.pairwise(objectives):
        assert (later <= earlier * (1 + 1e-6)).all(), (earlier, later)


@pytest.mark.parametrize(
    ("classifier", "solver"),
    [
        (LinearSVM, "newton"),
        (LinearSVM, "gradient"),
        (LogisticRegression, "bound"),
        (LogisticRegression, "accelerated"),
        (LogisticRegression, "newton"),
    ],
)
def test_an_image_gets_the_same_model_whatever_its_batchmates(classifier: type, solver: str) -> None:
    features, labels = _problems(batch=3, samples=600)
    labels[2, ::3] *= -1  # a batchmate that keeps many samples active for many steps
    valid = torch.ones_like(labels, dtype=torch.bool)
    alone = classifier(solver=solver).fit(features[:1], labels[:1], valid[:1])
    together = classifier(solver=solver).fit(features, labels, valid)
    if classifier is LinearSVM:
        assert torch.equal(alone.weight[0], together.weight[0])
        assert torch.equal(alone.bias[0], together.bias[0])
    else:  # the sigmoid's vectorized loop rounds the last elements of a tensor differently: float noise only
        assert torch.allclose(alone.weight[0], together.weight[0], rtol=1e-5, atol=1e-7)
        assert torch.allclose(alone.bias[0], together.bias[0], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(together.weight[0], together.weight[2], rtol=0.1)  # the batchmate is a different problem


def test_unknown_solver_is_rejected() -> None:
    with pytest.raises(ValueError, match="solver"):
        LinearSVM(solver="lbfgs")


@pytest.mark.parametrize(
    ("classifier", "channels", "expected"),
    [
        (LinearSVM, 8, "newton"),
        (LinearSVM, 600, "gradient"),
        (LogisticRegression, 8, "accelerated"),
        (LogisticRegression, 600, "gradient"),
    ],
)
def test_auto_solver_picks_a_newton_variant_for_narrow_features_only(
    classifier: type, channels: int, expected: str
) -> None:
    features, labels = _problems(batch=1, samples=100, channels=channels)
    valid = torch.ones_like(labels, dtype=torch.bool)
    auto = classifier().fit(features, labels, valid)
    chosen = classifier(solver=expected).fit(features, labels, valid)
    assert torch.equal(auto.weight, chosen.weight)


@pytest.mark.parametrize("classifier", [LinearSVM, LogisticRegression])
def test_projection_fits_wide_features_in_a_fixed_subspace(classifier: type) -> None:
    features, labels = _problems(batch=2, samples=400, channels=64)
    valid = torch.ones_like(labels, dtype=torch.bool)
    projected = classifier(projection=16).fit(features, labels, valid)
    assert projected.weight.shape == (2, 64)  # mapped back to the original channels
    matrix = random_projection(64, 16, torch.device("cpu"))
    in_subspace = classifier().fit(features @ matrix, labels, valid)
    assert torch.allclose(projected.weight, in_subspace.weight @ matrix.T, atol=1e-5)
    assert torch.allclose(projected.bias, in_subspace.bias, atol=1e-5)
    accuracy = ((projected.scores(features) > 0) == (labels > 0)).float().mean()
    assert accuracy > 0.65  # a quarter of the channels keeps much of each image's separating direction
    assert torch.equal(projected.weight, classifier(projection=16).fit(features, labels, valid).weight)


def test_projection_wider_than_the_features_changes_nothing() -> None:
    features, labels = _problems(batch=2, samples=200, channels=8)
    valid = torch.ones_like(labels, dtype=torch.bool)
    plain = LogisticRegression().fit(features, labels, valid)
    wide = LogisticRegression(projection=8).fit(features, labels, valid)
    assert torch.equal(plain.weight, wide.weight)


def test_invalid_projection_is_rejected() -> None:
    with pytest.raises(ValueError, match="projection"):
        LogisticRegression(projection=0)


class _ScoresOnly(Decision):
    """A decision with no score map of its own: the default scores every pixel's upsampled features."""

    def __init__(self, linear) -> None:
        self.linear = linear
        self.fitted = linear.fitted

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear.scores(features)


def test_the_default_score_map_of_any_decision_equals_the_linear_projection() -> None:
    generator = torch.Generator().manual_seed(3)
    pyramid = FeaturePyramid(
        [torch.randn(2, 5, 8, 6, generator=generator), torch.randn(2, 7, 4, 3, generator=generator)]
    )
    features, labels = _problems(batch=2, samples=100, channels=12)
    linear = LogisticRegression().fit(features, labels, torch.ones_like(labels, dtype=torch.bool))
    size = (31, 17)
    dense = _ScoresOnly(linear).score_map(pyramid, size)
    assert dense.shape == (2, *size)
    assert torch.allclose(dense, linear.score_map(pyramid, size), atol=1e-4)


def test_a_solver_added_to_the_table_is_accepted_and_used(monkeypatch: pytest.MonkeyPatch) -> None:
    steps_taken = []

    def bound_recorded(classifier, problem, steps):
        steps_taken.append(steps)
        return SOLVERS["bound"].minimize(classifier, problem, steps)

    monkeypatch.setitem(SOLVERS, "recorded", Solver(bound_recorded, default_steps=7))
    features, labels = _problems(batch=2, samples=100)
    valid = torch.ones_like(labels, dtype=torch.bool)
    decision = LogisticRegression(solver="recorded").fit(features, labels, valid)
    assert steps_taken == [7]
    assert torch.equal(
        decision.weight, LogisticRegression(solver="bound", max_iter=7).fit(features, labels, valid).weight
    )
