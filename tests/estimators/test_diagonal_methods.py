"""What the diagonal methods (Hutchinson, Diag++, XDiag) share: exact cases, unbiasedness,
coverage, calls and columns, two-sided deflation, the adjoint, adaptive stopping."""

from __future__ import annotations

import math
from types import SimpleNamespace

import array_api_compat.numpy as npx
import numpy as np
import pytest
from _diagonal_helpers import Counting
from conftest import numpy_of
from scipy import stats

import linop_trace as lt
from linop_trace._testing import test_matrix
from linop_trace.estimators import DiagPlusPlus, EstimationRequest, XDiag
from linop_trace.estimators._adaptive import Progress, grow_diagonal


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


def _hermitian(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    C = rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))
    return C + C.conj().T


def test_a_hermitian_operators_estimates_are_real(backend):
    """A complex operator tagged Hermitian has a real trace and diagonal: its estimates
    were complex (the diagonal's imaginary part as large as the error), and ``ci()``
    refused them. Now real, every method: Hutchinson's diagonal is the real part of the
    untagged estimate from the same products, its stderr that of the real part alone."""
    A = _hermitian(40, 0)
    tagged = lt.aslinearoperator(backend.matrix(A), tags=("hermitian",))
    real = np.asarray(numpy_of(backend.matrix(np.ones(1)))).dtype  # (float32 or float64)
    for quantity, method in [
        ("trace", "hutchinson"),
        ("trace", "hutch++"),
        ("trace", "xtrace"),
        ("trace", "exact"),
        ("diagonal", "hutchinson"),
        ("diagonal", "diag++"),
        ("diagonal", "xdiag"),
        ("diagonal", "exact"),
    ]:
        est = getattr(lt, quantity)(tagged, method=method, num_matvecs=30, seed=0)
        assert numpy_of(est.value).dtype == real, (quantity, method)
        low, high = est.ci()
        assert np.all(numpy_of(low) <= numpy_of(high))
    plain = lt.aslinearoperator(backend.matrix(A))
    general = lt.diagonal(plain, method="hutchinson", num_matvecs=30, seed=0)
    hermitian = lt.diagonal(tagged, method="hutchinson", num_matvecs=30, seed=0)
    np.testing.assert_allclose(
        numpy_of(hermitian.value), numpy_of(general.value).real, rtol=1e-10, atol=1e-10
    )
    assert np.all(numpy_of(hermitian.stderr) < numpy_of(general.stderr))


def test_a_hermitian_sum_with_exact_terms_is_real(backend):
    """A Hermitian operator plus exact terms (``H + 2 I``: the sum is Hermitian) gave a
    complex estimate (the exact part added after the implicit part's real one), and so
    did a sum of exact terms alone."""
    A = _hermitian(40, 1)
    matrix = backend.matrix(A)
    H = lt.aslinearoperator(matrix, tags=("hermitian",))
    shifted = H + 2 * lt.identity(40, like=H)
    for quantity, method, reference in [
        (lt.trace, "hutchinson", np.trace(A).real + 80),
        (lt.trace, "auto", np.trace(A).real + 80),
        (lt.diagonal, "hutchinson", np.diag(A).real + 2),
        (lt.diagonal, "auto", np.diag(A).real + 2),
    ]:
        est = quantity(shifted, method=method, num_matvecs=30, seed=0)
        assert not np.iscomplexobj(numpy_of(est.value)), (quantity, method)
        low, high = est.ci()
        assert np.all(numpy_of(low) <= numpy_of(high))
        if method == "auto":  # (auto on stored matrices: exact)
            np.testing.assert_allclose(numpy_of(est.value), reference, rtol=1e-10)
    assert np.iscomplexobj(numpy_of(lt.row_sums(shifted).value))  # (row sums stay complex)


@pytest.mark.stats
@pytest.mark.parametrize("method", ["hutchinson", "diag++", "xdiag"])
def test_a_hermitian_operators_diagonal_intervals_cover(method):
    """Fraction of (entry, seed) pairs whose 95 % interval covers d_i for a complex
    Hermitian 40 x 40 matrix at m = 30, 300 seeds: measured 0.950 (hutchinson), 0.950
    (diag++), 0.959 (xdiag; 0.955 before its variance estimate's second-order
    correction); with the imaginary noise in the stderr it was 0.99. The seeds' mean
    fraction has a standard error of about 0.0015: [0.935, 0.965] is ten of them from
    0.95 and four from 0.959."""
    A = _hermitian(40, 0)
    operator = lt.aslinearoperator(A, tags=("hermitian",))
    d = np.diag(A).real
    fractions = []
    for seed in range(300):
        low, high = lt.diagonal(operator, method=method, num_matvecs=30, seed=seed).ci(0.95)
        fractions.append(np.mean((low <= d) & (d <= high)))
    assert 0.935 <= np.mean(fractions) <= 0.965, np.mean(fractions)


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


# ---------------------------------------------------------------------- batching
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


# ----------------------------------------------- two-sided deflation, the adjoint
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
    more.setdefault("matmat", SimpleNamespace(scale=None))  # (products not scaled)
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

    counter = SimpleNamespace(columns=4, check_now=lambda: None, scale=None)

    class Request(SimpleNamespace):
        columns = property(lambda self: self.matmat.columns)
        blocks = EstimationRequest.blocks

    request = Request(
        rtol=None, atol=target, confidence=0.95, cap=100, block_size=64, matmat=counter, xp=npx
    )
    assert grow_diagonal(request, sums, draw) is True
    assert blocks == [4]
