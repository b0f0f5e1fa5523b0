"""XDiag, the exchangeable diagonal estimator: the literal leave-one-out reference, its
pseudo-values, stderr and dof, row blocks, every backend, probes and coverage."""

from __future__ import annotations

import math

import array_api_compat.numpy as npx
import numpy as np
import pytest
from _diagonal_helpers import random_problem
from conftest import numpy_of

import linop_trace as lt
from linop_trace._stats import median_dof
from linop_trace._testing import test_matrix
from linop_trace.estimators._xdiag import xdiag_core


# ------------------------------------------------------------------ naive references
def naive_exchangeable(A, W, j, left_out, two_sided=False):
    """Probe j as a Hutchinson probe of what the sketch of Y without columns ``left_out``
    leaves: diag(P A) + conj(w_j) (I - P) A w_j, or for self-adjoint A the two-sided
    diag(P A + A P - P A P) + conj(w_j) (I - P) A (I - P) w_j."""
    Q, _ = np.linalg.qr(np.delete(A @ W, left_out, axis=1))
    P = Q @ Q.conj().T
    Pc = np.eye(A.shape[0]) - P
    if two_sided:
        return np.diag(P @ A + A @ P - P @ A @ P) + W[:, j].conj() * (Pc @ A @ Pc @ W[:, j])
    return np.diag(P @ A) + W[:, j].conj() * (Pc @ A @ W[:, j])


def naive_xdiag(A, W, two_sided=False):
    """The literal exchangeable estimator: s QR factorizations, one per left-out probe."""
    s = W.shape[1]
    return np.mean([naive_exchangeable(A, W, i, [i], two_sided) for i in range(s)], axis=0)


def naive_xdiag_pseudo_values(A, W, two_sided=False):
    """p_i = d^(i) + sum_{j != i} (d^(j) - d_j^(i)), d_j^(i) with probes i and j left out of
    the sketch: s (s - 1) literal QR factorizations."""
    s = W.shape[1]
    single = np.stack([naive_exchangeable(A, W, j, [j], two_sided) for j in range(s)], axis=1)
    pseudo = single.copy()
    for i in range(s):
        for j in range(s):
            if j != i:
                pseudo[:, i] += single[:, j] - naive_exchangeable(A, W, j, [i, j], two_sided)
    return single, pseudo


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("seed", range(2))
def test_xdiag_core_matches_literal_leave_one_out(seed, complex_):
    A, rng = random_problem(seed, complex_=complex_)
    W = rng.choice([-1.0, 1.0], size=(30, 8))
    if complex_:
        W = np.exp(2j * np.pi * rng.random((30, 8)))
    out = xdiag_core(lambda X: A @ X, lambda X: A.conj().T @ X, W, npx)
    np.testing.assert_allclose(out.value, naive_xdiag(A, W), rtol=1e-10, atol=1e-11)
    H = A + A.conj().T
    for two_sided in (False, True):
        out = xdiag_core(lambda X: H @ X, None, W, npx, two_sided)
        expected = naive_xdiag(H, W, two_sided)
        np.testing.assert_allclose(out.value, expected, rtol=1e-10, atol=1e-11)
    with pytest.raises(ValueError, match="two-sided XDiag needs a self-adjoint operator"):
        xdiag_core(lambda X: A @ X, lambda X: A.conj().T @ X, W, npx, two_sided=True)


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize(
    ("self_adjoint", "two_sided"), [(False, False), (True, False), (True, True)]
)
def test_xdiag_pseudo_values_and_stderr_match_literal_pairs(complex_, self_adjoint, two_sided):
    A, rng = random_problem(5, n=20, complex_=complex_)
    if self_adjoint:
        A = A + A.conj().T
    W = np.exp(2j * np.pi * rng.random((20, 7))) if complex_ else rng.choice([-1.0, 1.0], (20, 7))
    adjoint = None if self_adjoint else (lambda X: A.conj().T @ X)
    out = xdiag_core(lambda X: A @ X, adjoint, W, npx, two_sided=two_sided, samples=True)
    assert out.two_sided is two_sided
    single, pseudo = naive_xdiag_pseudo_values(A, W, two_sided)
    scale = np.abs(pseudo).max()
    np.testing.assert_allclose(out.estimates, single, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(out.pseudo_values, pseudo, rtol=0, atol=1e-12 * scale)
    np.testing.assert_array_equal(out.value, out.estimates.mean(1))
    # stderr^2 = max(C + min(J - C, C) / (s - 2), sum |d - dbar|^2) / (s (s - 1)), with
    # C = sum Re conj(d - dbar)(p - pbar) and J = sum |p - pbar|^2 (s = 7)
    dev = single - single.mean(1, keepdims=True)
    pdev = pseudo - pseudo.mean(1, keepdims=True)
    c = np.real(dev.conj() * pdev)
    j = np.abs(pdev) ** 2
    cross, jack = c.sum(1), j.sum(1)
    capped = jack - cross > cross
    honest = cross + np.minimum(jack - cross, cross) / 5
    square = (np.abs(dev) ** 2).sum(1)
    np.testing.assert_allclose(out.stderr**2, np.maximum(honest, square) / 42, rtol=1e-10)
    np.testing.assert_allclose(out.stderr_plain**2, square / 42, rtol=1e-12)
    # dof: per entry Satterthwaite's 2 s mean(u)^2 / var(u) of the per-probe terms u it
    # uses (((s - 3) c + j) / (s - 2), or (s - 1) c / (s - 2) where capped, or the squares
    # where floored), clipped to [2, s - 1]; the lower median, rounded down
    products = np.where(capped[:, None], 6 * c, 4 * c + j) / 5
    products = np.where((honest < square)[:, None], np.abs(dev) ** 2, products)
    mean, spread = products.mean(1), products.var(1, ddof=1)
    dofs = np.clip(2 * 7 * mean**2 / spread, 2, 6)
    assert float(out.dof) == math.floor(np.sort(dofs)[(dofs.size - 1) // 2])
    # the production path (no (n, s) samples) gives the same numbers
    lean = xdiag_core(lambda X: A @ X, adjoint, W, npx, two_sided=two_sided)
    assert lean.estimates is None and lean.pseudo_values is None
    for key in ("value", "stderr", "stderr_plain", "low_rank_diagonal"):
        np.testing.assert_allclose(getattr(lean, key), getattr(out, key), rtol=1e-13, atol=1e-15)
    assert float(lean.dof) == float(out.dof)


@pytest.mark.stats
def test_xdiag_variance_estimate_is_unbiased_where_the_sketch_captures_nothing():
    """On c I the sketch captures nothing: each d^(i) is a function of probe pairs (a
    degenerate second-order U-statistic, _stats.second_order_sum), and the sample
    covariance of the d^(i) with their pseudo-values alone has (s - 2) / (s - 1) = 13 / 14
    = 0.929 of the variance (s = 15). The second-order correction makes it unbiased.
    Pooled over the 400 entries and 200 seeds, E[stderr^2] / MSE measured 0.990 - 1.007 on
    four disjoint blocks of 200 seeds (0.922 - 0.938 without the correction): a standard
    deviation of about 0.007, so [0.965, 1.035], half the gap to 0.929 on either side,
    is 5 of them from both."""
    n = 400
    A = 1.1 * np.eye(n)
    operator = lt.LinearOperator.from_callable(
        matmat=lambda X: A @ X, shape=A.shape, tags=("symmetric",)
    )
    values, variances = [], []
    for seed in range(200):
        est = lt.diagonal(operator, method="xdiag", num_matvecs=30, seed=seed)
        assert est.info["num_probes"] == 15
        values.append(numpy_of(est.value))
        variances.append(numpy_of(est.stderr) ** 2)
    ratio = np.mean(variances) / np.mean((np.array(values) - 1.1) ** 2)
    assert 0.965 <= ratio <= 1.035, ratio


def test_xdiag_reports_the_lower_median_dof_rounded_down():
    assert float(median_dof(np.array([5.5, 2.5, 4.5, 3.5]), npx, 9)) == 3  # lower median 3.5
    assert float(median_dof(np.array([6.9, 2.0, 4.2]), npx, 9)) == 4
    assert float(median_dof(np.array([7.0]), npx, 7)) == 7
    assert float(median_dof(np.array([2.0, 2.0, 2.0]), npx, 2)) == 2  # s = 3: dof 2 only
    assert math.isnan(float(median_dof(np.array([np.nan, np.nan, 3.0]), npx, 9)))


@pytest.mark.parametrize("count", [1, 2, 511, 512, 1024])
def test_counted_median_dof_equals_the_sorted_one(count):
    """The median counted against the integers 2 .. s - 1 is the sorted lower median
    rounded down, on dofs that sit on, just below and between the integers."""
    rng = np.random.default_rng(count)
    for largest in (2, 3, 9, 49, 500):
        on_grid = rng.integers(2, largest + 1, size=count).astype(float)
        dofs = np.where(
            rng.random(count) < 0.5,
            on_grid,
            np.clip(on_grid - rng.choice([1e-12, 0.5], size=count), 2, largest),
        )
        expected = math.floor(np.sort(dofs)[(count - 1) // 2])
        assert float(median_dof(dofs, npx, largest)) == expected


@pytest.mark.parametrize("two_sided", [False, True])
def test_xdiag_pseudo_values_every_backend(backend, two_sided):
    """The pure core on each library agrees with NumPy on the same probes (the two-sided
    variant on a symmetric matrix, through its forward product only)."""
    A, rng = random_problem(7, n=30)
    if two_sided:
        A = A + A.T
    W = rng.choice([-1.0, 1.0], (30, 9))
    adjoint = None if two_sided else (lambda X: A.T @ X)
    expected = xdiag_core(lambda X: A @ X, adjoint, W, npx, samples=True)
    Ab, AbT = backend.asarray(A), backend.asarray(A.T)
    adjoint_b = None if two_sided else (lambda X: AbT @ X)
    out = xdiag_core(lambda X: Ab @ X, adjoint_b, backend.asarray(W), backend.xp, samples=True)
    assert out.two_sided is expected.two_sided is two_sided
    for key in ("value", "pseudo_values", "stderr", "stderr_plain"):
        np.testing.assert_allclose(
            numpy_of(getattr(out, key)), getattr(expected, key), rtol=1e-10, atol=1e-12
        )
    assert float(numpy_of(out.dof)) == float(expected.dof)


@pytest.mark.parametrize("two_sided", [False, True])
def test_xdiag_row_blocks_match_one_block(backend, monkeypatch, two_sided):
    """The (n, s) algebra done in row blocks (uneven last block, dof entries every 7th row
    across block borders) equals the same algebra done at once."""
    from linop_trace.estimators import _xdiag

    A, rng = random_problem(11, n=40)
    if two_sided:
        A = A + A.T
    W = rng.choice([-1.0, 1.0], (40, 9))
    Ab, AbT = backend.asarray(A), backend.asarray(A.T)
    adjoint = None if two_sided else (lambda X: AbT @ X)
    monkeypatch.setattr(_xdiag, "DOF_ENTRIES", 6)  # every ceil(40 / 6) = 7th entry

    def run():
        return xdiag_core(lambda X: Ab @ X, adjoint, backend.asarray(W), backend.xp, samples=True)

    whole = run()
    monkeypatch.setattr(_xdiag, "CHUNK_ENTRIES", 1)
    monkeypatch.setattr(_xdiag, "CHUNK_ROWS_MIN", 9)  # blocks of 9, 9, 9, 9, 4 rows
    blocks = run()
    keys = ("estimates", "pseudo_values", "low_rank_diagonal", "value", "stderr", "stderr_plain")
    for key in keys:
        np.testing.assert_allclose(
            numpy_of(getattr(blocks, key)), numpy_of(getattr(whole, key)), rtol=1e-12, atol=1e-13
        )
    assert float(numpy_of(blocks.dof)) == float(numpy_of(whole.dof))
    # without the (n, s) samples (what XDiag asks for): the same numbers, in blocks too
    lean = xdiag_core(lambda X: Ab @ X, adjoint, backend.asarray(W), backend.xp)
    assert lean.pseudo_values is None
    for key in ("low_rank_diagonal", "value", "stderr", "stderr_plain"):
        np.testing.assert_allclose(
            numpy_of(getattr(lean, key)), numpy_of(getattr(whole, key)), rtol=1e-12, atol=1e-13
        )
    assert float(numpy_of(lean.dof)) == float(numpy_of(whole.dof))


def test_xdiag_uses_floor_half_and_refuses_other_probes():
    est = lt.diagonal(test_matrix("poly", 50), method="xdiag", num_matvecs=31, seed=0)
    assert est.num_matvecs == 30 and est.info["num_probes"] == 15
    with pytest.raises(ValueError, match="xdiag.*Rademacher.*probe='gaussian'"):
        lt.diagonal(np.eye(10), method="xdiag", num_matvecs=10, probe="gaussian")


# -------------------------------------------------------------------- statistics
@pytest.mark.stats
@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize("spectrum", ["flat", "poly"])
def test_xdiag_elementwise_coverage_honest_and_plain(spectrum, two_sided):
    """Fraction of (entry, seed) pairs whose 95 % interval covers d_i, n=300, m=60 (s=30), 400
    seeds. Honest stderr (cross jackknife corrected to second order, t with the median
    Satterthwaite dof), measured: one-sided (the paper's estimates, untagged matrix) 0.9454
    (flat), 0.9543 (poly); two-sided (tagged symmetric) 0.9418, 0.9667. The plain
    std(d^(i))/sqrt(s) with 1.96: 0.853, 0.902 one-sided; 0.858, 0.934 two-sided. The
    standard error of these means over the seeds (entries within a seed are correlated, so
    from the spread of the 400 per-seed fractions) is 0.0005-0.0008: [0.93, 0.97] is more
    than 6 of them from every honest measurement. The plain interval covers less than the honest one by 0.031-0.088, the
    difference of two means over the same seeds (its standard error below 0.001): 0.02 is
    over 10 of them below the smallest."""
    A = test_matrix(spectrum, 300, seed=0)
    d = np.diag(A)
    operator = lt.aslinearoperator(A, tags=("symmetric",) if two_sided else ())
    honest, plain = [], []
    for seed in range(400):
        est = lt.diagonal(operator, method="xdiag", num_matvecs=60, seed=seed)
        assert est.info["two_sided"] is two_sided
        low, high = est.ci(0.95)
        honest.append(np.mean((low <= d) & (d <= high)))
        plain.append(np.mean(np.abs(est.value - d) <= 1.959964 * est.info["stderr_plain"]))
        assert 2 <= est.dof <= 29
    assert 0.93 <= np.mean(honest) <= 0.97, np.mean(honest)
    assert np.mean(honest) - np.mean(plain) > 0.02, (np.mean(honest), np.mean(plain))
