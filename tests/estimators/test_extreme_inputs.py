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


@pytest.mark.parametrize(
    "largest, expected",
    [
        (0.0, 1.0),  # a zero product: nothing to scale (later blocks may not be zero)
        (3.0, 1.0),  # inside 2^+-256: squares and their sums are safe
        (2.0**255, 1.0),
        (2.0**257 * 1.5, 2.0**-257),  # 2^e <= max < 2^(e + 1): max * scale in [1, 2)
        (1e200, 2.0**-664),
        (1e-200, 2.0**665),
        (2.0**300 * (1 - 2.0**-52), 2.0**-299),  # just below a power of two: exact
        (math.nan, 1.0),  # not finite: the product fails its own check
    ],
)
def test_products_are_scaled_by_the_power_of_two_of_their_largest_entry(backend, largest, expected):
    """The rule of the scale that methods which square products apply (float64): 1 in the
    safe range and for a zero or NaN product, else 2^-e with 2^e <= max|product| < 2^(e+1),
    computed on the product's device."""
    if not backend.float64_supported:
        pytest.skip(f"{backend.name} has no float64")
    from linop_trace import _backend as lb
    from linop_trace.estimators._base import _power_of_two_scale

    values = np.array([[largest * 0.25, -largest], [0.0, largest / 3]])
    product = backend.asarray(values)
    xp = lb.array_namespace(product)
    scale = lb.jit(xp, _power_of_two_scale)(xp, product)
    assert scale.shape == ()
    assert float(np.asarray(lb.to_numpy(scale))) == expected


def test_an_infinite_product_gets_a_finite_scale(backend):
    """inf has no exponent to bring to 1: the scale stays finite and non-zero (the product
    fails its finiteness check; the scale must not turn its finite entries into NaN)."""
    from linop_trace import _backend as lb
    from linop_trace.estimators._base import _power_of_two_scale

    product = backend.asarray(np.array([[1.0, math.inf], [2.0, 3.0]]))
    xp = lb.array_namespace(product)
    scale = float(np.asarray(lb.to_numpy(lb.jit(xp, _power_of_two_scale)(xp, product))))
    assert 0 < scale < math.inf
