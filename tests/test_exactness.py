"""``computes_exactly``: the answer before the run agrees with what the run does."""

from __future__ import annotations

import numpy as np
import pytest

import linop_trace
from linop_trace import DEFAULT_MAX_MATVECS, DEFAULT_NUM_MATVECS, computes_exactly

N = 60


def implicit(backend, values: np.ndarray) -> linop_trace.LinearOperator:
    """``values`` known only through products: no stored diagonal."""
    matrix = backend.asarray(values)
    return linop_trace.LinearOperator.from_callable(
        matvec=lambda x: matrix @ x, matmat=lambda X: matrix @ X, shape=values.shape, like=matrix
    )


def test_defaults_are_the_budgets_an_estimate_spends():
    identity = linop_trace.LinearOperator.from_callable(
        matvec=lambda x: x, matmat=lambda X: X, shape=(5000, 5000)
    )
    # Gaussian probes on the identity: chi-square samples, so rtol=0 is never met
    options = {"method": "hutchinson", "seed": 0, "probe": "gaussian"}
    assert linop_trace.trace(identity, **options).num_matvecs == DEFAULT_NUM_MATVECS
    adaptive = linop_trace.trace(identity, rtol=0.0, **options)
    assert adaptive.num_matvecs == DEFAULT_MAX_MATVECS and adaptive.converged is False


@pytest.mark.parametrize("quantity", ["trace", "diagonal"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"num_matvecs": N - 1},
        {"num_matvecs": N},
        {"num_matvecs": 2 * N},
        {"method": "hutchinson", "num_matvecs": 2 * N},
        {"method": "exact", "num_matvecs": 2},
        {"rtol": 0.01, "max_matvecs": N - 1},
        {"rtol": 0.01, "max_matvecs": N},
        {"atol": 1.0},  # the default cap, 1000 > N
        {"max_matvecs": N},  # a cap alone is the budget
    ],
)
def test_the_answer_is_what_the_estimate_does(backend, quantity, options):
    values = np.random.default_rng(1).standard_normal((N, N))
    function = getattr(linop_trace, quantity)
    for operator in (implicit(backend, values), backend.matrix(values)):
        answer = computes_exactly(operator, quantity, **options)
        estimate = function(operator, seed=0, **options)
        assert answer == (estimate.method == "exact"), (options, estimate.method)
        stored = not isinstance(operator, linop_trace.LinearOperator)
        if stored:  # a dense or sparse matrix: auto reads its diagonal at any budget
            assert answer == (options.get("method", "auto") in ("auto", "exact"))


def test_refuses_what_the_estimate_refuses():
    with pytest.raises(ValueError, match="square"):
        computes_exactly(np.ones((3, 4)))
    with pytest.raises(ValueError, match="unknown method"):
        computes_exactly(np.eye(3), method="no-such-method")
    with pytest.raises(ValueError, match="max_matvecs"):
        computes_exactly(np.eye(3), num_matvecs=10, max_matvecs=5, rtol=0.1)
    with pytest.raises(ValueError, match="quantity"):
        computes_exactly(np.eye(3), "rowsums")


@pytest.mark.parametrize("method", ["xnystrace", "na-hutch++", "xtrace"])
@pytest.mark.parametrize("num_matvecs", [N - 1, N, 2 * N])
def test_the_sketches_answer_what_they_do(backend, method, num_matvecs):
    # from a budget of n they compute exactly (their full sketches round by their
    # conditioning); computes_exactly answered False there before
    factor = np.random.default_rng(2).standard_normal((N, N))
    matrix = backend.asarray(factor @ factor.T)
    operator = linop_trace.LinearOperator.from_callable(
        matmat=lambda X: matrix @ X,
        shape=(N, N),
        like=matrix,
        tags=("symmetric", "positive_semidefinite"),
    )
    answer = computes_exactly(operator, method=method, num_matvecs=num_matvecs)
    estimate = linop_trace.trace(operator, method=method, num_matvecs=num_matvecs, seed=0)
    assert answer == (estimate.method == "exact") == (num_matvecs >= N)
