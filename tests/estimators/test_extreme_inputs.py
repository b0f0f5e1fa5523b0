"""Extreme scales and tolerances: estimates scale with the operator, never crash.

Every estimate, standard error and dof is homogeneous in the operator: A -> c A multiplies
trace and diagonal estimates and their stderr by c (Frobenius by c^2) and leaves the dof
alone, for c far from 1 too. The shape statistics (skewness, kurtosis), Satterthwaite's
dof and the variance are computed from deviations over their largest one, so c = 1e80
(whose squared deviations overflow) or 1e-85 (which underflow) gave OverflowError,
ZeroDivisionError or a NaN dof before.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import linop_trace as lt
from linop_trace.estimators._hutchpp import predicted_residual_probes

SCALES = [1e-85, 1e-45, 1e80, 1e120]


def _operator(M: np.ndarray) -> lt.LinearOperator:
    # a matvec operator: method="auto" would compute a dense matrix's answer exactly
    return lt.LinearOperator.from_callable(
        matvec=lambda x: M @ x, rmatvec=lambda x: M.T @ x, shape=M.shape
    )


def _matrix() -> np.ndarray:
    B = np.random.default_rng(0).standard_normal((50, 50))
    return B @ B.T / 50


@pytest.mark.parametrize(
    "quantity, method",
    [
        ("trace", "hutchinson"),
        ("trace", "hutch++"),
        ("trace", "na-hutch++"),
        ("trace", "xtrace"),
        ("trace", "auto"),
        ("diagonal", "hutchinson"),
        ("diagonal", "diag++"),
        ("diagonal", "xdiag"),
    ],
)
def test_estimates_are_homogeneous_in_the_operator(quantity, method):
    M = _matrix()
    function = getattr(lt, quantity)
    base = function(_operator(M), method=method, num_matvecs=20, seed=0)
    for scale in SCALES:
        est = function(_operator(scale * M), method=method, num_matvecs=20, seed=0)
        np.testing.assert_allclose(np.asarray(est.value) / scale, base.value, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(est.stderr) / scale, base.stderr, rtol=1e-12)
        assert est.dof == base.dof and est.num_matvecs == base.num_matvecs


def test_frobenius_norm_squared_is_homogeneous_of_degree_two():
    M = _matrix()
    base = lt.frobenius_norm_squared(M, num_matvecs=20, seed=0)
    for scale in SCALES:
        est = lt.frobenius_norm_squared(scale * M, num_matvecs=20, seed=0)
        np.testing.assert_allclose(float(est.value) / scale**2, float(base.value), rtol=1e-12)
        np.testing.assert_allclose(float(est.stderr) / scale**2, float(base.stderr), rtol=1e-12)
        assert est.dof == base.dof


def test_hutchpp_adaptive_with_a_zero_or_tiny_tolerance_spends_its_cap():
    # rtol = 0 asks for an infinite number of residual probes (it raised OverflowError),
    # atol = 1e-300 squared underflows (ZeroDivisionError): both spend max_matvecs and
    # report converged=False, as Hutchinson and XTrace do
    A = np.diag(np.linspace(1.0, 2.0, 200))
    for options in ({"rtol": 0.0}, {"atol": 1e-300}):
        est = lt.trace(_operator(A), method="hutch++", max_matvecs=90, seed=0, **options)
        assert est.converged is False and est.num_matvecs == 90
        assert abs(float(est) - np.trace(A)) <= 5 * float(est.stderr)


def test_predicted_residual_probes_beyond_any_count_is_infinite():
    assert predicted_residual_probes(1.0, 1e-300, 0.95) == math.inf
    assert predicted_residual_probes(1e300, 1e-10, 0.95) == math.inf
    assert predicted_residual_probes(1.0, 0.0, 0.95) == math.inf
    # homogeneous: the count depends on sigma / target only
    assert predicted_residual_probes(4e-200, 2e-100, 0.95) == pytest.approx(
        predicted_residual_probes(4.0, 2.0, 0.95), rel=1e-12
    )


def test_xnystrace_on_a_sketch_that_would_overflow_is_computed_at_unit_scale():
    # Omega^H A Omega of 1e300 I overflows: it was an UnboundLocalError (NaN on JAX), then
    # a FloatingPointError naming the cause; the products scaled by a power of two near
    # their largest entry (issue 18) give the trace itself, 5e300 (exact for c I)
    op = lt.aslinearoperator(1e300 * np.eye(5), tags=("positive_semidefinite",))
    estimate = lt.trace(op, method="xnystrace", num_matvecs=4, seed=0)
    assert float(estimate) == pytest.approx(5e300, rel=1e-12)
    low, high = estimate.ci()
    assert 0 < high - low < 1e-12 * 5e300
