"""Hutch++ and NA-Hutch++: naive references, exactness, unbiasedness, coverage, batching."""

from __future__ import annotations

import math

import array_api_compat.numpy as npx
import numpy as np
import pytest
from conftest import numpy_of
from scipy import stats

import linop_trace as lt
from linop_trace._stats import edgeworth_quantile
from linop_trace._testing import test_matrix
from linop_trace.estimators._hutchpp import deflated_samples, hutchpp_core, hutchpp_split
from linop_trace.estimators._na_hutchpp import na_hutchpp_core, na_hutchpp_split


# ------------------------------------------------------------------ naive references
def naive_hutchpp(A, S, G):
    Q, _ = np.linalg.qr(A @ S)
    G = G - Q @ (Q.conj().T @ G)
    return np.trace(Q.conj().T @ A @ Q) + np.trace(G.conj().T @ A @ G) / G.shape[1]


def naive_na_hutchpp(A, R, S, G):
    Z, W = A @ R, S.conj().T @ A
    core = np.linalg.pinv(S.conj().T @ Z)
    low_rank = np.trace(core @ W @ Z)
    residual = np.diag(G.conj().T @ A @ G) - np.diag(G.conj().T @ Z @ core @ W @ G)
    return low_rank + residual.mean()


def random_inputs(n, widths, seed, complex_=False):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    blocks = [rng.choice([-1.0, 1.0], size=(n, w)) for w in widths]
    if complex_:
        A = A + 1j * rng.standard_normal((n, n))
        blocks = [b * np.exp(2j * np.pi * rng.random(b.shape)) for b in blocks]
    return A, blocks


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_hutchpp_core_matches_naive_reference(seed, complex_):
    A, (S, G) = random_inputs(40, (7, 6), seed, complex_)
    result = hutchpp_core(lambda X: A @ X, S, G, npx)
    low_rank, samples = result.low_rank_trace, result.residual.samples
    value = low_rank + np.mean(samples)
    np.testing.assert_allclose(
        value, naive_hutchpp(A, S, G), rtol=1e-12, atol=1e-12 * np.abs(A).sum()
    )


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_na_hutchpp_core_matches_naive_reference(seed, complex_):
    A, (R, S, G) = random_inputs(40, (5, 10, 15), seed, complex_)
    expected = naive_na_hutchpp(A, R, S, G)
    # general A: S^H A from the adjoint product; symmetric A: one stacked product
    result = na_hutchpp_core(lambda X: A @ X, lambda X: A.conj().T @ X, R, S, G, npx)
    low_rank, samples = result.low_rank_trace, result.residual.samples
    np.testing.assert_allclose(low_rank + samples.mean(), expected, rtol=1e-10)
    H = A + A.conj().T
    result = na_hutchpp_core(lambda X: H @ X, None, R, S, G, npx)
    low_rank, samples = result.low_rank_trace, result.residual.samples
    np.testing.assert_allclose(low_rank + samples.mean(), naive_na_hutchpp(H, R, S, G), rtol=1e-10)


def test_deflated_samples_continue_the_residual():
    A, (S, G, G2) = random_inputs(30, (5, 4, 6), 3)
    result = hutchpp_core(lambda X: A @ X, S, G, npx)
    Q = result.basis
    more = deflated_samples(lambda X: A @ X, Q, G2, npx)
    P = np.eye(30) - Q @ Q.T
    np.testing.assert_allclose(more, np.diag(G2.T @ P @ A @ P @ G2), rtol=1e-12, atol=1e-12)
    # the core's own samples are those of its residual probes G, offset by tr(Q^H A Q)
    np.testing.assert_allclose(
        result.residual.samples, np.diag(G.T @ P @ A @ P @ G), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(
        float(result.residual.value),
        np.trace(Q.T @ A @ Q) + np.mean(np.diag(G.T @ P @ A @ P @ G)),
        rtol=1e-12,
    )


@pytest.mark.parametrize("m", [3, 4, 5, 20, 60, 99, 100, 300])
def test_budget_splits_never_exceed_the_budget(m):
    sketch, residual = hutchpp_split(m)
    assert sketch >= 1 and residual >= 1 and 2 * sketch + residual == m
    right, left, residual = na_hutchpp_split(m)
    assert min(right, left, residual) >= 1 and right + left + residual == m
    assert hutchpp_split(100) == (34, 32) and hutchpp_split(20) == (7, 6)
    # NA-Hutch++: 1/6, 1/3, 1/2 (the left sketch twice the right one)
    assert na_hutchpp_split(60) == (10, 20, 30) and na_hutchpp_split(12) == (2, 4, 6)


# ------------------------------------------------------------ every backend: exactness
def test_exact_when_rank_fits_in_the_sketch(backend):
    # rank 6 <= Hutch++ sketch (10 at m=30) and <= NA-Hutch++ right sketch (6 at m=36):
    # the deflated remainder is zero, so the estimate is exact and the residual samples vanish.
    rng = np.random.default_rng(0)
    U = rng.standard_normal((50, 6))
    A = U @ rng.standard_normal((6, 50))  # not symmetric: Hutch++ is still exact
    est = lt.trace(backend.matrix(A), method="hutch++", num_matvecs=30, seed=1)
    assert est.num_matvecs == 30 and est.method == "hutch++"
    np.testing.assert_allclose(float(est), np.trace(A), rtol=1e-11)
    assert float(numpy_of(est.stderr)) < 1e-10 * np.abs(A).sum()
    S = U @ U.T
    for tags in [(), ("symmetric",)]:
        op = lt.aslinearoperator(backend.matrix(S), tags=tags)
        est = lt.trace(op, method="na-hutch++", num_matvecs=36, seed=2)
        assert est.num_matvecs == 36
        np.testing.assert_allclose(float(est), np.trace(S), rtol=1e-10)


def test_agrees_with_numpy_on_every_backend(backend):
    # same probes => same estimate; probes differ between libraries, so compare to a
    # reference computed from the estimate's own residual samples and low-rank part.
    A = test_matrix("poly", 60, seed=3)
    est = lt.trace(backend.matrix(A), method="hutch++", num_matvecs=21, seed=4)
    samples = numpy_of(est.info["samples"])
    assert samples.shape == (7,)
    low = float(numpy_of(est.info["low_rank_trace"]))
    np.testing.assert_allclose(float(est), low + samples.mean(), rtol=1e-12)
    np.testing.assert_allclose(
        float(numpy_of(est.stderr)), samples.std(ddof=1) / math.sqrt(7), rtol=1e-10
    )
    # deflation leaves less than Hutchinson's error on a decaying spectrum
    assert abs(float(est) - np.trace(A)) < 0.05 * np.trace(A)


def test_complex_hermitian_low_rank_is_exact():
    rng = np.random.default_rng(5)
    U = rng.standard_normal((40, 4)) + 1j * rng.standard_normal((40, 4))
    A = U @ U.conj().T
    for method in ("hutch++", "na-hutch++"):
        est = lt.trace(A, method=method, num_matvecs=30, seed=0)
        np.testing.assert_allclose(complex(est), np.trace(A), rtol=1e-11)


def test_budget_below_minimum_is_refused():
    with pytest.raises(
        ValueError, match=r"method 'hutch\+\+' needs num_matvecs >= 3, got num_matvecs=2"
    ):
        lt.trace(np.eye(10), method="hutch++", num_matvecs=2)
    with pytest.raises(ValueError, match=r"method 'na-hutch\+\+' needs num_matvecs >= 4"):
        lt.trace(np.eye(10), method="na-hutch++", num_matvecs=3)


# --------------------------------------------------------------------------- batching
class Counting:
    """A symmetric dense operator that counts its forward and adjoint calls and columns."""

    def __init__(self, A, tags=("symmetric",)):
        self.A, self.calls, self.columns, self.adjoint_calls = A, 0, 0, 0
        self.op = lt.LinearOperator.from_callable(
            matvec=lambda x: A @ x,
            matmat=self._matmat,
            rmatmat=self._rmatmat,
            shape=A.shape,
            dtype=A.dtype,
            tags=tags,
        )

    def _matmat(self, X):
        self.calls += 1
        self.columns += X.shape[1]
        return self.A @ X

    def _rmatmat(self, X):
        self.adjoint_calls += 1
        self.columns += X.shape[1]
        return self.A.T @ X


@pytest.mark.parametrize("m", [3, 30, 100])
def test_hutchpp_makes_two_calls_and_counts_columns(m):
    counting = Counting(test_matrix("flat", 120, seed=0))
    est = lt.trace(counting.op, method="hutch++", num_matvecs=m, seed=0)
    # sketch product, then [Q, deflated probes] stacked: 2 calls, exactly m columns
    assert counting.calls == 2 and counting.columns == m == est.num_matvecs


def test_hutchpp_blocks_respect_block_size():
    counting = Counting(test_matrix("flat", 120, seed=0))
    est = lt.trace(counting.op, method="hutch++", num_matvecs=60, seed=0, block_size=25)
    # sketch 20 -> 1 call; [Q (20), G (20)] = 40 columns -> 2 calls
    assert counting.calls == 3 and counting.columns == 60 == est.num_matvecs


def test_na_hutchpp_single_pass():
    counting = Counting(test_matrix("flat", 120, seed=0))
    est = lt.trace(counting.op, method="na-hutch++", num_matvecs=60, seed=0)
    assert (
        counting.calls == 1
        and counting.adjoint_calls == 0
        and est.num_matvecs == 60 == counting.columns
    )
    untagged = Counting(test_matrix("flat", 120, seed=0), tags=())
    est = lt.trace(untagged.op, method="na-hutch++", num_matvecs=60, seed=0)
    # no symmetry tag: S^H A through the adjoint, one forward and one adjoint call
    assert (untagged.calls, untagged.adjoint_calls) == (
        1,
        1,
    ) and est.num_matvecs == 60 == untagged.columns


# ------------------------------------------------------------------------- statistics
@pytest.mark.stats
def test_hutchpp_is_unbiased_across_seeds():
    A = test_matrix("flat", 80, seed=1)  # flat: the residual carries most of the trace
    values = np.array(
        [float(lt.trace(A, method="hutch++", num_matvecs=12, seed=s)) for s in range(400)]
    )
    # the mean of 400 i.i.d. estimates is within 4 standard errors (two-sided p ~ 6e-5)
    se = values.std(ddof=1) / math.sqrt(values.size)
    assert abs(values.mean() - np.trace(A)) < 4 * se


@pytest.mark.stats
def test_na_hutchpp_is_unbiased_across_seeds():
    A = test_matrix("poly", 80, seed=2)
    tagged = lt.aslinearoperator(A, tags=("symmetric",))
    values = np.array(
        [float(lt.trace(tagged, method="na-hutch++", num_matvecs=24, seed=s)) for s in range(400)]
    )
    se = values.std(ddof=1) / math.sqrt(values.size)
    assert abs(values.mean() - np.trace(A)) < 4 * se


COVERAGE_RUNS = 1000


def coverage_count(A, method, runs=COVERAGE_RUNS, **options):
    """How many of ``runs`` seeded 95 % intervals contain tr(A)."""
    truth = np.trace(A)
    covered = 0
    for seed in range(runs):
        low, high = lt.trace(A, method=method, seed=seed, **options).ci(0.95)
        covered += low <= truth <= high
    return covered


@pytest.mark.stats
@pytest.mark.parametrize("spectrum", ["flat", "poly"])
@pytest.mark.parametrize("method", ["hutch++", "na-hutch++"])
def test_coverage_of_the_95_percent_interval(method, spectrum):
    """Counts of 1000 seeded runs (n=300, m=60), target 930-970:

    ===========  =====  =====
    method        flat   poly
    ===========  =====  =====
    hutch++        950    951   (plain t quantile: 949, 946)
    na-hutch++     951    960
    ===========  =====  =====

    (Hutchinson: tests/estimators/test_hutchinson.py.) With p = 0.95 the count has sd
    sqrt(1000 * .95 * .05) = 6.9, so a correct interval lands in [930, 970] except with
    probability ~0.4 %.
    """
    covered = coverage_count(test_matrix(spectrum, 300, seed=0), method, num_matvecs=60)
    assert 930 <= covered <= 970, covered


@pytest.mark.stats
@pytest.mark.parametrize("m", [200, 290])
def test_na_hutchpp_float32_intervals_hold_where_the_sketches_capture_A(m):
    """float32, exponentially decaying spectrum (n = 300): the sketches capture A to
    rounding. The low-rank trace was formed as tr((S^H Z)^+ (W Z)), whose l x r product
    W Z rounds at eps |W| |Z| in every entry, amplified by the small singular values:
    errors up to 5e-4 of the trace against standard errors of 1e-5, 72 and 74 of 80
    intervals missing. Projected onto the singular directions first, the errors are
    1.5e-5 and 4e-6 and 4 and 0 of 80 miss. At 95% coverage, 9 misses or more of 80
    have probability 1.8%: at most 8."""
    A = test_matrix("fastexp", 300, seed=0)
    truth = np.trace(A)
    operator = lt.aslinearoperator(A.astype(np.float32), tags=("symmetric",))
    misses = 0
    for seed in range(80):
        low, high = lt.trace(operator, method="na-hutch++", num_matvecs=m, seed=seed).ci(0.95)
        misses += not low <= truth <= high
    assert misses <= 8, misses


@pytest.mark.parametrize("library", ["jax", "torch"])
@pytest.mark.parametrize("matrix", ["zero", "ones"])
def test_na_hutchpp_gradient_is_finite_where_singular_values_repeat(matrix, library):
    """NA-Hutch++'s value comes from an SVD of S^H Z, whose backward pass divides by the
    gaps between singular values: on the zero operator and a matrix of ones (repeated
    singular values) jax.grad and torch's backward were NaN in every entry. The value is
    differentiated as the pseudo-inverse form instead; d tr(A) / dA = I, and at m = 60 of
    n = 100 the estimate's gradient is I plus the probes' noise: finite, trace near n.
    (One library per case: each test session installs one of them.)"""
    n = 100
    values = np.zeros((n, n)) if matrix == "zero" else np.ones((n, n))
    options = {"method": "na-hutch++", "num_matvecs": 60, "seed": 0}
    if library == "jax":
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)

        def value(M):
            return lt.trace(lt.aslinearoperator(M, tags=("symmetric",)), **options).value

        gradient = np.asarray(jax.grad(value)(jax.numpy.asarray(values)))
    else:
        torch = pytest.importorskip("torch")
        M = torch.tensor(values, requires_grad=True)
        lt.trace(lt.aslinearoperator(M, tags=("symmetric",)), **options).value.backward()
        gradient = M.grad.numpy()
    assert np.all(np.isfinite(gradient)) and abs(np.trace(gradient) - n) < 0.2 * n


def test_na_hutchpp_torch_forward_mode_and_func_transforms_take_the_gradient_form():
    """On torch the pseudo-inverse form must give every derivative, not only reverse
    mode: forward-mode AD went through the SVD (a NaN tangent on the zero operator) and
    torch.func.grad raised. d tr(B(t) B(t)^T) / dt for B(t) = t B0 three ways agree (to
    rounding: one pseudo-inverse form), and with B0 = 0 the tangent is 0."""
    torch = pytest.importorskip("torch")
    import torch.autograd.forward_ad as forward_ad

    base = torch.as_tensor(np.random.default_rng(3).standard_normal((40, 40)))

    def value(t, scale=1.0):
        B = base * scale * t
        operator = lt.aslinearoperator(B @ B.T, tags=("symmetric",))
        return lt.trace(operator, method="na-hutch++", num_matvecs=24, seed=0).value

    t = torch.tensor(1.3, dtype=torch.float64)
    reverse = torch.func.grad(value)(t)
    forward = torch.func.jvp(value, (t,), (torch.ones_like(t),))[1]
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(t, torch.ones_like(t))
        tangent = forward_ad.unpack_dual(value(dual)).tangent
    for other in (forward, tangent):
        assert float(other) == pytest.approx(float(reverse), rel=1e-12)
    zero = torch.func.jvp(lambda x: value(x, 0.0), (t,), (torch.ones_like(t),))[1]
    assert float(zero) == 0.0


# ----------------------------------------------------------------------------- adaptive
def test_adaptive_hutchpp_meets_the_tolerance():
    A = test_matrix("flat", 200, seed=4)
    est = lt.trace(A, method="hutch++", num_matvecs=30, rtol=2e-3, max_matvecs=2000, seed=0)
    assert est.converged is True and 30 < est.num_matvecs <= 2000
    half = est.quantile(0.95) * float(est.stderr)
    assert half <= 2e-3 * abs(float(est))
    assert est.info["num_residual_probes"] == est.num_matvecs - 2 * est.info["sketch_size"]


def test_adaptive_hutchpp_reports_failure_within_budget():
    A = test_matrix("flat", 200, seed=4)
    est = lt.trace(A, method="hutch++", num_matvecs=30, rtol=1e-6, max_matvecs=100, seed=0)
    assert est.converged is False and est.num_matvecs == 100


def test_adaptive_hutchpp_stops_at_once_when_exact():
    rng = np.random.default_rng(0)
    U = rng.standard_normal((100, 3))
    est = lt.trace(U @ U.T, method="hutch++", num_matvecs=12, atol=1e-8, seed=0)
    assert est.converged is True and est.num_matvecs == 12


@pytest.mark.stats
def test_adaptive_hutchpp_coverage():
    """A-Hutch++ stopping at rtol=4e-3 from a 30-column start (mean budget ~240 columns,
    was ~310 with the fixed sketch): measured 382 of 400 runs covered (95.5 %); the band
    372-388 is 93 %-97 %. More in tests/estimators/test_adaptive_hutchpp.py."""
    A = test_matrix("flat", 300, seed=0)
    truth = np.trace(A)
    covered = 0
    for seed in range(400):
        est = lt.trace(A, method="hutch++", num_matvecs=30, rtol=4e-3, max_matvecs=3000, seed=seed)
        assert est.converged
        low, high = est.ci(0.95)
        covered += low <= truth <= high
    assert 372 <= covered <= 388, covered


def test_quantile_is_t_with_shape_correction():
    A = test_matrix("flat", 100, seed=0)
    est = lt.trace(A, method="hutch++", num_matvecs=9, seed=0)
    assert est.dof == 2  # 3 residual samples: too few for a shape correction
    assert est.quantile(0.95) == pytest.approx(stats.t.ppf(0.975, 2))
    est = lt.trace(test_matrix("poly", 300, seed=0), method="hutch++", num_matvecs=60, seed=0)
    assert est.dof == 19 and est.skewness is not None
    expected = edgeworth_quantile(stats.t.ppf(0.975, 19), 0.95, 20, est.skewness, est.kurtosis)
    assert est.quantile(0.95) == pytest.approx(expected)
