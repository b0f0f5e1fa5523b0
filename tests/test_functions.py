"""The public functions (trace, diagonal, ...): the arguments they check, the budgets they
allow, whatever the method."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import numpy_of

import linop_trace as lt
from linop_trace._testing import test_matrix


# --------------------------------------------------------------------- arguments
@pytest.mark.parametrize("quantity", [lt.trace, lt.diagonal])
def test_non_square_operator(backend, quantity):
    A = backend.matrix(np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"square operator, got shape \(3, 4\)"):
        quantity(A, method="exact")


def test_empty_operator_has_zero_trace(backend):
    A = backend.matrix(np.zeros((0, 0)))
    est = lt.trace(A)
    assert float(est) == 0.0 and est.num_matvecs == 0
    assert tuple(lt.diagonal(A).value.shape) == (0,)


def test_bad_tolerance_and_confidence():
    with pytest.raises(ValueError, match="`rtol` must be a non-negative number"):
        lt.trace(np.eye(200), method="hutchinson", rtol=-1)
    for level in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"`confidence` must lie in \(0, 1\)"):
            lt.trace(np.eye(200), method="hutchinson", rtol=0.1, confidence=level)
    with pytest.raises(ValueError, match=r"`confidence` must lie in \(0, 1\)"):
        lt.trace(np.eye(200), method="hutchinson", rtol=0.1, confidence=1.5)
    with pytest.raises(ValueError, match="does not support rtol/atol"):
        lt.trace(np.eye(200), method="exact", rtol=0.1)


def test_the_interval_defaults_to_the_calls_confidence(backend):
    """``ci()`` gave a 95% interval after ``confidence=0.99`` (the level the adaptive run
    met its tolerance at), and an empty operator took ``confidence=7``."""
    A = backend.matrix(test_matrix("flat", 60, seed=0))
    for quantity in (lt.trace, lt.diagonal):
        est = quantity(A, method="hutchinson", num_matvecs=20, seed=0, confidence=0.99)
        assert est.confidence == 0.99
        assert np.allclose(np.asarray(est.ci()), np.asarray(est.ci(0.99)))
        assert est.quantile() == est.quantile(0.99) > est.quantile(0.95)
        refined = est.refine(A, num_matvecs=10)
        assert refined.confidence == 0.99
        assert refined.quantile() == refined.quantile(0.99)
        assert quantity(A, method="hutchinson", num_matvecs=20, seed=0).confidence == 0.95
    with pytest.raises(ValueError, match=r"`confidence` must lie in \(0, 1\), got 7"):
        lt.trace(backend.matrix(np.zeros((0, 0))), confidence=7)
    with pytest.raises(ValueError, match=r"`confidence` must lie in \(0, 1\)"):
        lt.diagonal(A, method="exact", confidence=1.5)


@pytest.mark.parametrize("name", ["rtol", "atol"])
def test_a_bool_is_not_a_tolerance(name):
    """``rtol=True`` was taken as a tolerance of 1."""
    with pytest.raises(ValueError, match=f"`{name}` must be a non-negative number, got True"):
        lt.trace(np.eye(3), method="hutchinson", seed=0, **{name: True})
    with pytest.raises(ValueError, match="`confidence` must lie in"):
        lt.trace(np.eye(3), method="hutchinson", seed=0, rtol=0.1, confidence=True)


def test_counts_must_be_positive_ints():
    with pytest.raises(ValueError, match="`block_size` must be >= 1, got 0"):
        lt.trace(np.eye(200), method="hutchinson", block_size=0)
    with pytest.raises(TypeError, match="`num_matvecs` must be an int, got bool"):
        lt.trace(np.eye(200), method="hutchinson", num_matvecs=True)


# ----------------------------------------------------------------------- budgets
def test_budget_too_small_is_named():
    with pytest.raises(
        ValueError, match="method 'hutchinson' needs num_matvecs >= 2, got num_matvecs=1"
    ):
        lt.trace(np.eye(200), method="hutchinson", num_matvecs=1)
    with pytest.raises(TypeError, match="`num_matvecs` must be an int"):
        lt.trace(np.eye(200), method="hutchinson", num_matvecs=2.5)


def test_budget_cap_without_tolerance_is_honoured_or_refused():
    est = lt.trace(np.eye(200), method="hutchinson", max_matvecs=10, seed=0)
    assert est.num_matvecs == 10
    with pytest.raises(ValueError, match="`max_matvecs`=10 is smaller than `num_matvecs`=50"):
        lt.trace(np.eye(200), method="hutchinson", num_matvecs=50, max_matvecs=10)


# ------------------------------------- runaway budgets (reliability audit, item 7)
def test_a_budget_beyond_the_cap_is_refused_at_once(backend, monkeypatch):
    """``num_matvecs=10**12`` on a 40 x 40 matrix ran for hours, then out of memory."""
    A = backend.matrix(test_matrix("flat", 40, seed=0))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"exceeds the cap.*method='exact'"):
        lt.trace(A, method="hutchinson", num_matvecs=10**12, seed=0)
    with pytest.raises(ValueError, match="exceeds the cap"):
        lt.diagonal(A, method="hutchinson", rtol=1e-9, max_matvecs=10**12, seed=0)
    assert time.perf_counter() - start < 5.0
    # auto computes exactly when n <= its budget, whatever the budget
    assert lt.trace(A, num_matvecs=10**12).method == "exact"
    # the cap itself, max(100 n, floor): with the floor lowered, 100 n = 4000 exactly
    monkeypatch.setattr(lt._functions, "BUDGET_CAP_FLOOR", 100)
    lt.trace(A, method="hutchinson", num_matvecs=4000, seed=0)
    with pytest.raises(ValueError, match=r"max\(100 n, 100\) = 4000"):
        lt.trace(A, method="hutchinson", num_matvecs=4001, seed=0)


@pytest.mark.parametrize(("method", "cap"), [("hutchinson", 3), ("diag++", 5)])
def test_a_tolerance_with_a_small_cap_starts_within_it(method, cap):
    """With rtol and no num_matvecs, the first round (twice the method's minimum) is kept
    within max_matvecs: a valid cap below it was refused ("max_matvecs=3 is smaller than
    num_matvecs=4", a budget the caller never gave)."""
    A = np.random.default_rng(0).standard_normal((30, 30))
    estimate = lt.diagonal(A + A.T, method=method, rtol=1e-9, max_matvecs=cap, seed=0)
    assert estimate.num_matvecs <= cap
    assert estimate.converged is False


def test_estimates_deep_copy_and_pickle(backend):
    """A refinable estimate could be neither deep-copied nor pickled (its diagonal sums
    held the array module, its continuation a local function); ``float`` of a complex
    estimate dropped the imaginary part on NumPy (a warning) and spoke of overflow on
    torch."""
    import copy
    import pickle

    values = test_matrix("flat", 40, seed=0)
    A = backend.matrix(values)
    try:
        pickle.loads(pickle.dumps(A))
    except Exception:
        pytest.skip(f"{backend.name} arrays do not pickle")
    for quantity, method in [
        (lt.trace, "hutchinson"),
        (lt.trace, "hutch++"),
        (lt.diagonal, "hutchinson"),
        (lt.trace, "xtrace"),
        (lt.diagonal, "xdiag"),
    ]:
        est = quantity(A, method=method, num_matvecs=20, seed=0)
        duplicate, unpickled = copy.deepcopy(est), pickle.loads(pickle.dumps(est))
        if est._resume is not None:  # (a shallow copy refines, as before __getstate__)
            assert copy.copy(est).refine(A, num_matvecs=2).num_matvecs == est.num_matvecs + 2
        for other in (duplicate, unpickled):
            np.testing.assert_array_equal(numpy_of(other.value), numpy_of(est.value))
            np.testing.assert_array_equal(numpy_of(other.stderr), numpy_of(est.stderr))
            assert other.num_matvecs == est.num_matvecs and other.method == est.method
        if method in ("hutchinson", "hutch++"):
            np.testing.assert_array_equal(
                numpy_of(duplicate.refine(A, num_matvecs=10).value),
                numpy_of(est.refine(A, num_matvecs=10).value),
            )
            with pytest.raises(ValueError, match="rebuilt from its arrays"):
                unpickled.refine(A, num_matvecs=10)
    complex_estimate = lt.trace(backend.matrix(values * (1 + 1j)), method="exact")
    with pytest.raises(TypeError, match="complex estimate: use complex"):
        float(complex_estimate)
    assert complex(complex_estimate) == pytest.approx(np.trace(values) * (1 + 1j))


def test_frobenius_interval_of_a_diagonal_matrix_covers_its_rounded_value():
    # |D z|^2 = sum d_i^2 for every Rademacher z: no spread, and the samples are one
    # rounded sum of n = 200 squares. The standard error was 0.0 and all 40 intervals
    # missed; it is now that sum's rounding, eps sqrt(n) mean |z^H A^H A z|
    d = np.random.default_rng(0).uniform(1.0, 3.0, 200)
    A = lt.LinearOperator.from_callable(matmat=lambda X: d[:, None] * X, shape=(200, 200))
    truth = float(np.sum(np.square(d), dtype=np.longdouble))
    for seed in range(40):
        low, high = lt.frobenius_norm_squared(A, num_matvecs=20, seed=seed).ci()
        assert low <= truth <= high
        assert high - low < 1e-11 * truth
