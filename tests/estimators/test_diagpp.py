"""Diag++: the naive reference, its residual samples, and its products with A and A^H."""

from __future__ import annotations

import array_api_compat.numpy as npx
import numpy as np
import pytest
from _diagonal_helpers import naive_bekas, random_problem

import linop_trace as lt
from linop_trace._testing import test_matrix
from linop_trace.estimators import DiagPlusPlus
from linop_trace.estimators._diagpp import diagpp_core, diagpp_residual_samples


def naive_diagpp(A, S, G, two_sided=False):
    Q, _ = np.linalg.qr(A @ S)
    P = Q @ Q.conj().T
    Pc = np.eye(A.shape[0]) - P
    if two_sided:
        return np.diag(P @ A + A @ P - P @ A @ P) + naive_bekas(Pc @ A @ Pc, G)
    return np.diag(P @ A) + naive_bekas(Pc @ A, G)


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize(
    ("self_adjoint", "two_sided"), [(False, False), (True, False), (True, True)]
)
@pytest.mark.parametrize("probe", ["rademacher", "gaussian", "steinhaus"])
def test_diagpp_core_matches_naive_reference(complex_, self_adjoint, two_sided, probe):
    if probe == "steinhaus" and not complex_:
        pytest.skip("unit-modulus probes are complex")
    A, rng = random_problem(2, complex_=complex_)
    if self_adjoint:
        A = A + A.conj().T
    S = rng.choice([-1.0, 1.0], size=(30, 6))
    if probe == "rademacher":
        G = rng.choice([-1.0, 1.0], size=(30, 8))
    elif probe == "steinhaus":
        G = np.exp(2j * np.pi * rng.random((30, 8)))
    else:  # complex Gaussian probes on complex operators (conj(g) * (R g) / |g|^2)
        G = rng.standard_normal((30, 8)) + (1j * rng.standard_normal((30, 8)) if complex_ else 0)
    adjoint = None if self_adjoint else (lambda X: A.conj().T @ X)
    low, y, x, Q, Z, Zp = diagpp_core(lambda X: A @ X, adjoint, S, G, npx, two_sided=two_sided)
    assert (Zp is not None) is two_sided
    expected = naive_diagpp(A, S, G, two_sided)
    np.testing.assert_allclose(low + y.sum(1) / x.sum(1), expected, rtol=1e-10, atol=1e-11)
    # further residual samples (adaptive growth) see the same residual operator
    y2, x2 = diagpp_residual_samples(lambda X: A @ X, Q, Z, G, npx, residual_basis=Zp)
    np.testing.assert_allclose(y2, y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(x2, x, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- batching
def test_diagpp_with_an_adjoint_needs_two_calls():
    # A [S, G] in one forward call, then A^H Q: 2 calls (was 3), same 60 columns
    A = test_matrix("poly", 100, seed=0)
    calls = {"forward": 0, "adjoint": 0, "columns": 0}

    def counted(kind, M):
        def product(X):
            calls[kind] += 1
            calls["columns"] += X.shape[1]
            return M @ X

        return product

    op = lt.LinearOperator.from_callable(
        matvec=lambda x: A @ x,
        matmat=counted("forward", A),
        rmatmat=counted("adjoint", A.T),
        shape=A.shape,
    )
    est = lt.diagonal(op, method="diag++", num_matvecs=60, seed=0)
    assert (calls["forward"], calls["adjoint"]) == (1, 1)
    assert est.num_matvecs == calls["columns"] == 60
    # the same draws as the self-adjoint path (sketch first, then residual probes), there
    # with the paper's one-sided deflation
    symmetric = lt.LinearOperator.from_callable(
        matvec=lambda x: A @ x, shape=A.shape, tags=("symmetric",)
    )
    one_sided = DiagPlusPlus(two_sided=False)
    reference = lt.diagonal(symmetric, method=one_sided, num_matvecs=60, seed=0)
    np.testing.assert_allclose(est.value, reference.value, rtol=1e-10, atol=1e-12)
