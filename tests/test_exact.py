"""Exact trace, diagonal, row sums and column sums against a dense NumPy reference."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import numpy_of, rtol_for
from scipy import stats
from test_operators import DTYPES, _constructors, random_matrix

import linop_trace as lt


def close(actual, expected, dtype):
    expected = np.asarray(expected)
    np.testing.assert_allclose(
        numpy_of(actual),
        expected,
        rtol=rtol_for(dtype),
        atol=rtol_for(dtype) * max(1.0, np.abs(expected).max(initial=0)),
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_quantities_every_constructor(backend, dtype):
    M = random_matrix((9, 9), dtype, seed=7)
    for name, build in _constructors(backend):
        A = build(M)
        est = lt.trace(A, method="exact")
        close(est.value, np.trace(M), dtype)
        assert est.method == "exact" and float(numpy_of(est.stderr)) == 0.0, name
        assert est.value.ndim == 0
        close(lt.diagonal(A, method="exact").value, np.diag(M), dtype)
        close(lt.diagonal(A, method="exact", block_size=4).value, np.diag(M), dtype)
        rows = lt.row_sums(A)
        close(rows.value, M.sum(axis=1), dtype)
        assert rows.num_matvecs == 1
        cols = lt.col_sums(A)
        close(cols.value, M.sum(axis=0), dtype)
        assert cols.num_matvecs == 1


def test_row_and_col_sums_of_rectangular(backend):
    M = random_matrix((4, 7), "float64")
    A = backend.matrix(M)
    close(lt.row_sums(A).value, M.sum(axis=1), "float64")
    close(lt.col_sums(A).value, M.sum(axis=0), "float64")


@pytest.mark.parametrize("block_size", [1, 3, 9, 50])
def test_identity_walk_counts_columns_and_calls(block_size):
    M = random_matrix((9, 9), "float64")
    calls = []

    def matmat(X):
        calls.append(X.shape[1])
        return M @ X

    A = lt.LinearOperator.from_callable(matmat=matmat, shape=(9, 9))
    est = lt.trace(A, method="exact", block_size=block_size)
    np.testing.assert_allclose(float(est), np.trace(M), rtol=1e-12)
    assert est.num_matvecs == 9 == sum(calls)
    assert len(calls) == -(-9 // block_size)
    assert max(calls) == min(block_size, 9)


def test_stored_diagonal_needs_no_products():
    import scipy.sparse as sp

    M = sp.random(50, 50, density=0.1, random_state=0, format="csr")
    est = lt.diagonal(M, method="exact")
    np.testing.assert_array_equal(est.value, M.diagonal())
    assert est.num_matvecs == 0
    # sums and scalings of stored matrices keep the fast path
    A = lt.aslinearoperator(M)
    est = lt.trace(2 * A - A.T + A.H, method="exact")
    np.testing.assert_allclose(float(est), 2 * M.diagonal().sum(), rtol=1e-12)
    assert est.num_matvecs == 0


def test_auto_is_exact_when_budget_covers_n(backend):
    M = random_matrix((30, 30), "float64")
    A = (
        lt.LinearOperator.from_callable(matmat=lambda X: M @ X, shape=(30, 30))
        if backend.library == "numpy"
        else backend.matrix(M)
    )
    est = lt.trace(A, num_matvecs=30)
    assert est.method == "exact"
    close(est.value, np.trace(M), "float64")


def test_exact_diagonal_of_large_sparse_operator_never_goes_dense():
    """Peak traced memory (tracemalloc sees NumPy's buffers) of the exact diagonal of a
    200,000 x 200,000 sparse matrix, and of the identity-block walk over a products-only
    20,000 x 20,000 operator. A dense n x n float64 array would be 320 GB and 3.2 GB; the
    walk may hold a few (n, 256) blocks (41 MB each), so 200 MB is the bound."""
    import tracemalloc

    import scipy.sparse as sp

    n = 200_000
    main = np.arange(1.0, n + 1.0)
    A = sp.diags([-np.ones(n - 1), main, -np.ones(n - 1)], [-1, 0, 1], format="csr")
    m = 20_000
    B = sp.diags(
        [-np.ones(m - 1), np.arange(1.0, m + 1.0), -np.ones(m - 1)], [-1, 0, 1], format="csr"
    )
    op = lt.LinearOperator.from_callable(matmat=lambda X: B @ X, shape=(m, m))
    tracemalloc.start()
    try:
        assert np.array_equal(lt.diagonal(A, method="exact").value, main)
        _, peak_stored = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        est = lt.trace(op, method="exact", block_size=256)
        _, peak_walk = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert float(est) == m * (m + 1) / 2 and est.num_matvecs == m
    assert peak_stored < 20 * 2**20, peak_stored  # the diagonal itself is 1.6 MB
    assert peak_walk < 200 * 2**20, peak_walk


@pytest.mark.every_session  # each session installs other extras: check it in each
def test_import_does_not_import_torch_or_jax():
    code = "import sys, linop_trace; print(sorted(m for m in ('torch', 'jax', 'cupy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_estimate_interface():
    est = lt.trace(np.diag([1.0, 2.0]), method="exact")
    assert float(est) == 3.0
    assert est.ci(0.99) == (3.0, 3.0)
    # Student-t with the estimate's dof, normal without one (two-sided level)
    with_dof = lt.Estimate(np.float64(1.0), np.float64(2.0), 10, "x", dof=9)
    assert with_dof.quantile(0.9) == pytest.approx(stats.t.ppf(0.95, 9), rel=1e-12)
    assert with_dof.ci(0.9) == pytest.approx(
        (1 - 2 * stats.t.ppf(0.95, 9), 1 + 2 * stats.t.ppf(0.95, 9)), rel=1e-12
    )
    normal = lt.Estimate(np.float64(1.0), np.float64(2.0), 10, "x")
    z = stats.norm.ppf(0.995)
    assert normal.ci(0.99) == pytest.approx((1 - 2 * z, 1 + 2 * z), rel=1e-12)
    assert "method='exact'" in repr(est)


def test_torch_exact_walk_keeps_the_graph_without_a_warning():
    """The exact identity walk copied each diagonal piece with torch.asarray(copy=True),
    which warns that it follows requires_grad only from torch 2.13 on (it dropped the
    graph before); clone keeps it on every supported torch."""
    import warnings

    torch = pytest.importorskip("torch")
    W = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    operator = lt.LinearOperator.from_callable(matmat=lambda X: W @ X, shape=(6, 6), like=W)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = lt.trace(operator, method="exact").value
        diagonal = lt.diagonal(operator, method="exact").value
    value.backward()
    torch.testing.assert_close(W.grad, torch.eye(6, dtype=torch.float64))
    assert diagonal.requires_grad
