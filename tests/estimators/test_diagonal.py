"""Diagonal estimators: Hutchinson (Bekas et al.), Diag++ and XDiag."""

from __future__ import annotations

import math
from types import SimpleNamespace

import array_api_compat.numpy as npx
import numpy as np
import pytest
from conftest import numpy_of
from scipy import stats

import linop_trace as lt
from linop_trace._testing import test_matrix
from linop_trace.estimators import DiagPlusPlus, XDiag
from linop_trace.estimators._adaptive import Progress, grow_diagonal
from linop_trace.estimators._diagpp import diagpp_core, diagpp_residual_samples
from linop_trace.estimators._hutchinson import (
    diagonal_hutchinson_core,
    diagonal_hutchinson_samples,
)
from linop_trace.estimators._stats import RatioSums, median_dof
from linop_trace.estimators._xdiag import xdiag_core


# ------------------------------------------------------------------ naive references
def naive_bekas(A, Z):
    return np.sum(Z.conj() * (A @ Z), axis=1) / np.sum(np.abs(Z) ** 2, axis=1)


def naive_diagpp(A, S, G, two_sided=False):
    Q, _ = np.linalg.qr(A @ S)
    P = Q @ Q.conj().T
    Pc = np.eye(A.shape[0]) - P
    if two_sided:
        return np.diag(P @ A + A @ P - P @ A @ P) + naive_bekas(Pc @ A @ Pc, G)
    return np.diag(P @ A) + naive_bekas(Pc @ A, G)


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


def random_problem(seed, n=30, complex_=False):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    if complex_:
        A = A + 1j * rng.standard_normal((n, n))
    return A, rng


@pytest.mark.parametrize("probe", ["rademacher", "gaussian", "steinhaus"])
def test_bekas_core_matches_naive_reference(probe):
    A, rng = random_problem(1, complex_=probe == "steinhaus")
    Z = {
        "rademacher": rng.choice([-1.0, 1.0], size=(30, 9)),
        "gaussian": rng.standard_normal((30, 9)),
        "steinhaus": np.exp(2j * np.pi * rng.random((30, 9))),
    }[probe]
    value, stderr, count = diagonal_hutchinson_core(lambda X: A @ X, Z, npx).estimate()
    assert count == 9
    np.testing.assert_allclose(value, naive_bekas(A, Z), rtol=1e-12, atol=1e-12)
    # delta-method standard error of a ratio of means, written out
    ratio = naive_bekas(A, Z)
    num, den = Z.conj() * (A @ Z), np.abs(Z) ** 2
    expected = np.sqrt(np.sum(np.abs(num - ratio[:, None] * den) ** 2, 1) / 8 / 9) / den.mean(1)
    np.testing.assert_allclose(stderr, expected, rtol=1e-10)
    if probe != "gaussian":  # |z| = 1: the shortcut without denominators agrees
        y1, x1 = diagonal_hutchinson_samples(lambda X: A @ X, Z, npx, unit_modulus=True)
        assert x1 is None
        value1, stderr1, _ = diagonal_hutchinson_core(
            lambda X: A @ X, Z, npx, unit_modulus=True
        ).estimate()
        np.testing.assert_allclose(value1, value, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(stderr1, stderr, rtol=1e-10)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian", "steinhaus"])
def test_ratio_sums_over_blocks_equal_one_pass(probe):
    """Running sums over uneven blocks (O(n) state) give the one-block estimate and its
    delta-method stderr: the residual sum about the first block's shift is exact."""
    A, rng = random_problem(4, complex_=probe == "steinhaus")
    Z = {
        "rademacher": rng.choice([-1.0, 1.0], size=(30, 23)),
        "gaussian": rng.standard_normal((30, 23)),
        "steinhaus": np.exp(2j * np.pi * rng.random((30, 23))),
    }[probe]
    unit = probe != "gaussian"
    whole = diagonal_hutchinson_core(lambda X: A @ X, Z, npx, unit_modulus=unit).estimate()
    sums = RatioSums(npx)
    for start, stop in ((0, 3), (3, 4), (4, 15), (15, 23)):
        sums.add(*diagonal_hutchinson_samples(lambda X: A @ X, Z[:, start:stop], npx, unit))
    value, stderr, count = sums.estimate()
    assert count == 23
    np.testing.assert_allclose(value, whole[0], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(stderr, whole[1], rtol=1e-9)


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
    # stderr^2 = max(sum Re conj(d - dbar)(p - pbar), sum |d - dbar|^2) / (s (s - 1))
    dev = single - single.mean(1, keepdims=True)
    cross = np.real(dev.conj() * (pseudo - pseudo.mean(1, keepdims=True))).sum(1)
    square = (np.abs(dev) ** 2).sum(1)
    np.testing.assert_allclose(out.stderr**2, np.maximum(cross, square) / 42, rtol=1e-10)
    np.testing.assert_allclose(out.stderr_plain**2, square / 42, rtol=1e-12)
    # dof: per entry Satterthwaite's 2 s mean(c)^2 / var(c) of the products c it uses
    # (cross, or squares where floored), clipped to [2, s - 1]; the lower median, rounded down
    products = np.real(dev.conj() * (pseudo - pseudo.mean(1, keepdims=True)))
    products = np.where((cross < square)[:, None], np.abs(dev) ** 2, products)
    mean, spread = products.mean(1), products.var(1, ddof=1)
    dofs = np.clip(2 * 7 * mean**2 / spread, 2, 6)
    assert float(out.dof) == math.floor(np.sort(dofs)[(dofs.size - 1) // 2])
    # the production path (no (n, s) samples) gives the same numbers
    lean = xdiag_core(lambda X: A @ X, adjoint, W, npx, two_sided=two_sided)
    assert lean.estimates is None and lean.pseudo_values is None
    for key in ("value", "stderr", "stderr_plain", "low_rank_diagonal"):
        np.testing.assert_allclose(getattr(lean, key), getattr(out, key), rtol=1e-13, atol=1e-15)
    assert float(lean.dof) == float(out.dof)


def test_xdiag_reports_the_lower_median_dof_rounded_down():
    assert float(median_dof(np.array([5.5, 2.5, 4.5, 3.5]), npx)) == 3  # lower median 3.5
    assert float(median_dof(np.array([6.9, 2.0, 4.2]), npx)) == 4
    assert float(median_dof(np.array([7.0]), npx)) == 7


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


# -------------------------------------------------------------- per-entry variance
NUM_PROBES = 40000


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_per_entry_variance_matches_theory(probe):
    A, rng = random_problem(3, n=15)
    Z = (
        rng.standard_normal((15, NUM_PROBES))
        if probe == "gaussian"
        else rng.choice([-1.0, 1.0], (15, NUM_PROBES))
    )
    y, _ = diagonal_hutchinson_samples(lambda X: A @ X, Z, npx)
    # Var z_i (Az)_i: Gaussian sum_j A_ij^2 + A_ii^2; Rademacher sum_{j != i} A_ij^2
    row = np.sum(A**2, axis=1)
    theory = row + np.diag(A) ** 2 if probe == "gaussian" else row - np.diag(A) ** 2
    deviation = y - y.mean(1, keepdims=True)
    variance = deviation.var(1)
    error = np.sqrt(((deviation**4).mean(1) - variance**2) / NUM_PROBES)
    # every entry within 5 standard errors of its sample variance (15 entries, p ~ 1e-5)
    assert np.all(np.abs(variance - theory) < 5 * error), (variance - theory) / error


# ------------------------------------------------------------- every backend: exact
def test_exact_cases_every_backend(backend):
    d = np.linspace(1.0, 4.0, 40)
    est = lt.diagonal(backend.matrix(np.diag(d)), method="hutchinson", num_matvecs=5, seed=0)
    np.testing.assert_allclose(
        numpy_of(est.value), d, rtol=1e-13
    )  # Rademacher: exact on a diagonal
    rng = np.random.default_rng(0)
    U = rng.standard_normal((40, 5))
    A = U @ rng.standard_normal((5, 40))  # rank 5, not symmetric
    for method in ("diag++", "xdiag"):
        est = lt.diagonal(backend.matrix(A), method=method, num_matvecs=24, seed=1)
        # rank 5 <= Diag++ sketch 8 and < XDiag's s - 1 = 11: exact
        np.testing.assert_allclose(
            numpy_of(est.value), np.diag(A), rtol=1e-9, atol=1e-10 * np.abs(A).max()
        )
        assert est.num_matvecs == 24 and est.method == method
        assert est.value.shape == (40,) and est.stderr.shape == (40,)
    S = U @ U.T
    for method in ("diag++", "xdiag"):
        op = lt.aslinearoperator(backend.matrix(S), tags=("symmetric",))
        est = lt.diagonal(op, method=method, num_matvecs=24, seed=1)
        np.testing.assert_allclose(
            numpy_of(est.value), np.diag(S), rtol=1e-9, atol=1e-10 * np.abs(S).max()
        )


def test_backends_agree_with_their_samples(backend):
    A = test_matrix("poly", 40, seed=2)
    est = lt.diagonal(backend.matrix(A), method="hutchinson", num_matvecs=30, seed=3, block_size=8)
    assert est.num_matvecs == 30 and est.dof == 29
    error = np.abs(numpy_of(est.value) - np.diag(A))
    assert np.all(error <= 6 * numpy_of(est.stderr))


# -------------------------------------------------------------------- statistics
@pytest.mark.stats
@pytest.mark.parametrize("symmetric", [False, True], ids=["general", "two-sided"])
@pytest.mark.parametrize("method", ["hutchinson", "diag++", "xdiag"])
def test_unbiased_across_seeds(method, symmetric):
    A = test_matrix("flat", 40, seed=4) + 0.3 * np.random.default_rng(4).standard_normal((40, 40))
    if symmetric:  # tagged: Diag++ and XDiag deflate both sides
        A = lt.aslinearoperator((A + A.T) / 2, tags=("symmetric",))
    values = np.array(
        [numpy_of(lt.diagonal(A, method=method, num_matvecs=12, seed=s).value) for s in range(600)]
    )
    if symmetric:
        A = A.matmat(np.eye(40))
    z = (values.mean(0) - np.diag(A)) / (values.std(0, ddof=1) / math.sqrt(600))
    # 40 entries: max |z| below 4.5 (per entry two-sided p ~ 7e-6)
    assert np.max(np.abs(z)) < 4.5, np.max(np.abs(z))


@pytest.mark.stats
@pytest.mark.parametrize("spectrum", ["flat", "poly"])
@pytest.mark.parametrize(
    ("method", "tags"),
    [("hutchinson", ()), ("diag++", ()), ("diag++", ("symmetric",))],
    ids=["hutchinson", "diag++", "diag++ two-sided"],
)
def test_elementwise_coverage(method, tags, spectrum):
    """Fraction of (entry, seed) pairs whose 95 % interval covers d_i, n=200, m=60, 200
    seeds: hutchinson flat 0.951, poly 0.951; diag++ flat 0.951, poly 0.949; diag++
    two-sided (tagged symmetric) flat 0.951, poly 0.948. Standard error over the seeds
    0.001: [0.93, 0.97] is 18 of them from every measurement."""
    A = test_matrix(spectrum, 200, seed=0)
    d = np.diag(A)
    operator = lt.aslinearoperator(A, tags=tags)
    fractions = []
    for seed in range(200):
        est = lt.diagonal(operator, method=method, num_matvecs=60, seed=seed)
        assert est.info.get("two_sided", False) is bool(tags)
        low, high = est.ci(0.95)
        fractions.append(np.mean((low <= d) & (d <= high)))
    assert 0.93 <= np.mean(fractions) <= 0.97, np.mean(fractions)


@pytest.mark.stats
@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize("spectrum", ["flat", "poly"])
def test_xdiag_elementwise_coverage_honest_and_plain(spectrum, two_sided):
    """Fraction of (entry, seed) pairs whose 95 % interval covers d_i, n=300, m=60 (s=30), 400
    seeds. Honest stderr (cross jackknife, t with the median Satterthwaite dof), measured:
    one-sided (the paper's estimates, untagged matrix) 0.9407 (flat), 0.9537 (poly);
    two-sided (tagged symmetric) 0.9373, 0.9654. The plain std(d^(i))/sqrt(s) with 1.96:
    0.853, 0.902 one-sided; 0.858, 0.934 two-sided. The standard error of these means over
    the seeds (entries within a seed are correlated, so from the spread of the 400 per-seed
    fractions) is 0.0007-0.0009: [0.93, 0.97] is more than 8 of them from either honest
    measurement. The plain interval covers less than the honest one by 0.031-0.088, the
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


# ---------------------------------------------------------------------- batching
class Counting:
    def __init__(self, A, tags=()):
        self.forward = self.adjoint = self.columns = 0
        self.A = A
        self.op = lt.LinearOperator.from_callable(
            matvec=lambda x: A @ x,
            matmat=self._matmat,
            rmatmat=self._rmatmat,
            shape=A.shape,
            dtype=A.dtype,
            tags=tags,
        )

    def _matmat(self, X):
        self.forward += 1
        self.columns += X.shape[1]
        return self.A @ X

    def _rmatmat(self, X):
        self.adjoint += 1
        self.columns += X.shape[1]
        return self.A.T @ X


@pytest.mark.parametrize(
    ("method", "tags", "calls"),
    [
        ("diag++", ("symmetric",), (2, 0)),  # sketch, then [Q, G] stacked
        ("diag++", (), (1, 1)),  # [sketch, residual probes] stacked, then A^H Q (rmatmat)
        ("xdiag", ("symmetric",), (2, 0)),  # A Omega, then A Q
        ("xdiag", (), (1, 1)),
    ],
)
def test_minimal_calls_and_columns(method, tags, calls):
    counting = Counting(test_matrix("poly", 100, seed=0), tags)
    est = lt.diagonal(counting.op, method=method, num_matvecs=60, seed=0)
    assert (counting.forward, counting.adjoint) == calls
    assert est.num_matvecs == counting.columns == 60


def test_hutchinson_diagonal_blocks():
    counting = Counting(test_matrix("poly", 100, seed=0))
    est = lt.diagonal(counting.op, method="hutchinson", num_matvecs=50, block_size=16, seed=0)
    assert counting.forward == 4 and est.num_matvecs == counting.columns == 50


def test_xdiag_uses_floor_half_and_refuses_other_probes():
    est = lt.diagonal(test_matrix("poly", 50), method="xdiag", num_matvecs=31, seed=0)
    assert est.num_matvecs == 30 and est.info["num_probes"] == 15
    with pytest.raises(ValueError, match="xdiag.*Rademacher.*probe='gaussian'"):
        lt.diagonal(np.eye(10), method="xdiag", num_matvecs=10, probe="gaussian")


@pytest.mark.parametrize(("cls", "name"), [(XDiag, "xdiag"), (DiagPlusPlus, "diag++")])
def test_two_sided_needs_a_self_adjoint_operator(cls, name):
    A = test_matrix("poly", 40)
    with pytest.raises(ValueError, match=cls.__name__ + r"\(two_sided=True\) needs an operator"):
        lt.diagonal(A, method=cls(two_sided=True), num_matvecs=20)
    tagged = lt.aslinearoperator(A, tags=("symmetric",))
    runs = [
        lt.diagonal(tagged, method=cls(two_sided=flag), num_matvecs=20, seed=0)
        for flag in (None, True, False)
    ]
    assert [run.info["two_sided"] for run in runs] == [True, True, False]
    np.testing.assert_array_equal(runs[0].value, runs[1].value)
    assert not np.allclose(runs[0].value, runs[2].value)
    assert lt.diagonal(A, method=name, num_matvecs=20, seed=0).info["two_sided"] is False
    assert repr(cls(two_sided=False)) == f"{cls.__name__}(two_sided=False)"


@pytest.mark.stats
@pytest.mark.parametrize(
    ("cls", "spectrum", "bound"),
    [
        (XDiag, "poly", 0.5),
        (DiagPlusPlus, "poly", 0.4),
        (XDiag, "flat", 0.0),
        (DiagPlusPlus, "flat", 0.0),
    ],
)
def test_two_sided_deflation_is_more_accurate_on_decaying_spectra(cls, spectrum, bound):
    """log(MSE one-sided / MSE two-sided) per seed, same probes, n = 300, m = 60, mean over
    40 seeds above ``bound``. Measured over 100 seeds (mean, per-seed sd): XDiag poly 0.94,
    0.12; Diag++ poly 0.76, 0.18; XDiag flat 0.072, 0.019; Diag++ flat 0.029, 0.020. The
    standard error of a 40-seed mean is sd / sqrt(40) <= 0.029, so every bound is at least
    9 of them below the measurement (flat: two-sided never worse)."""
    A = test_matrix(spectrum, 300, seed=0)
    d = np.diag(A)
    operator = lt.aslinearoperator(A, tags=("symmetric",))
    logs = []
    for seed in range(40):
        errors = [
            np.mean(
                (
                    lt.diagonal(
                        operator, method=cls(two_sided=flag), num_matvecs=60, seed=seed
                    ).value
                    - d
                )
                ** 2
            )
            for flag in (False, True)
        ]
        logs.append(math.log(errors[0] / errors[1]))
    assert np.mean(logs) > bound, np.mean(logs)


def test_missing_adjoint_is_a_clear_error():
    A = test_matrix("poly", 30)
    op = lt.LinearOperator.from_callable(matvec=lambda x: A @ x, shape=A.shape, dtype=A.dtype)
    with pytest.raises(ValueError, match=r"method 'diag\+\+' needs products with A\^H.*symmetric"):
        lt.diagonal(op, method="diag++", num_matvecs=30)
    tagged = lt.LinearOperator.from_callable(
        matvec=lambda x: A @ x, shape=A.shape, dtype=A.dtype, tags=("symmetric",)
    )
    est = lt.diagonal(tagged, method="xdiag", num_matvecs=30, seed=0)
    assert est.num_matvecs == 30


# ---------------------------------------------------------------------- adaptive
@pytest.mark.parametrize("method", ["hutchinson", "diag++"])
def test_adaptive_meets_the_tolerance(method):
    A = test_matrix("flat", 150, seed=1)
    est = lt.diagonal(A, method=method, num_matvecs=30, rtol=0.05, max_matvecs=4000, seed=0)
    assert est.converged is True and est.num_matvecs <= 4000
    half = est.quantile(0.95) * np.max(est.stderr)
    assert half <= 0.05 * np.max(np.abs(est.value))
    probes = est.info["num_probes" if method == "hutchinson" else "num_residual_probes"]
    assert est.dof == probes - 1  # the per-entry samples' t dof
    est = lt.diagonal(A, method=method, num_matvecs=30, rtol=1e-8, max_matvecs=90, seed=0)
    assert est.converged is False and est.num_matvecs == 90
    fixed = lt.diagonal(A, method=method, num_matvecs=30, seed=0)
    probes = fixed.info["num_probes" if method == "hutchinson" else "num_residual_probes"]
    assert fixed.dof == probes - 1


def _request(rtol=None, atol=None, confidence=0.95, **more):
    """The fields of an EstimationRequest that the stopping rule reads."""
    return SimpleNamespace(rtol=rtol, atol=atol, confidence=confidence, **more)


def test_diagonal_tolerance_is_relative_to_the_largest_entry():
    # the one rule: met when the half-width is at most max(atol, rtol * magnitude), the
    # magnitude of a diagonal being max|d| (here 10) and its half-width t * max(stderr)
    half = stats.t.ppf(0.975, 50) * 0.04  # 0.0804
    assert Progress(half, 10.0).met(_request(rtol=1e-2))  # target 0.1
    assert not Progress(half, 10.0).met(_request(rtol=7e-3))  # 0.07
    assert Progress(half, 10.0).met(_request(rtol=1e-3, atol=0.081))
    assert not Progress(half, 10.0).met(_request())  # no tolerance: target 0
    assert not Progress(None, 10.0).met(_request(atol=1.0))  # no error estimate yet


def test_diagonal_growth_tests_the_interval_with_probes_minus_one_dof():
    # four probes whose interval meets the target with 4 dof but not with the right 3:
    # one more block (doubling: 4 probes) is drawn, and then it is met
    target = 0.04 * (stats.t.ppf(0.975, 3) + stats.t.ppf(0.975, 4)) / 2
    blocks = []

    class Sums:
        count = 4

        def estimate(self):
            return np.array([10.0]), np.array([0.04 * math.sqrt(4 / self.count)]), self.count

    sums = Sums()

    def draw(width):
        blocks.append(width)
        sums.count += width
        counter.columns += width

    counter = SimpleNamespace(columns=4, check_now=lambda: None)

    class Request(SimpleNamespace):
        columns = property(lambda self: self.matmat.columns)

    request = Request(
        rtol=None, atol=target, confidence=0.95, cap=100, block_size=64, matmat=counter, xp=npx
    )
    assert grow_diagonal(request, sums, draw) is True
    assert blocks == [4]


def test_complex_low_rank_is_exact_every_backend(backend):
    rng = np.random.default_rng(6)
    U = rng.standard_normal((40, 4)) + 1j * rng.standard_normal((40, 4))
    A = U @ U.conj().T  # Hermitian, rank 4: unit-modulus probes, conjugates everywhere
    for method in ("diag++", "xdiag"):
        est = lt.diagonal(backend.matrix(A), method=method, num_matvecs=24, seed=1)
        np.testing.assert_allclose(numpy_of(est.value), np.diag(A), rtol=1e-10, atol=1e-11)
    for method in ("hutch++", "na-hutch++"):
        est = lt.trace(backend.matrix(A), method=method, num_matvecs=30, seed=1)
        np.testing.assert_allclose(complex(est), np.trace(A), rtol=1e-11)


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
