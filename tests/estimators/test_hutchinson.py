"""Hutchinson's trace estimator: variance, unbiasedness, coverage, batching, adaptivity,
the Frobenius norm, gradients."""

from __future__ import annotations

import math

import array_api_compat.numpy as npx
import numpy as np
import pytest
from conftest import numpy_of
from scipy import stats

import linop_trace as lt
from linop_trace._stats import edgeworth_quantile, sample_mean, shape_statistics
from linop_trace._testing import test_matrix
from linop_trace.estimators._hutchinson import hutchinson_samples


def sample_shape(samples, xp):
    skew, kurt = shape_statistics(samples, xp)
    return float(skew), float(kurt)


def naive_samples(A, Z):
    return np.array([Z[:, j].conj() @ A @ Z[:, j] for j in range(Z.shape[1])])


@pytest.mark.parametrize("seed", range(3))
def test_samples_match_naive_reference(seed):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((30, 30))
    Z = rng.choice([-1.0, 1.0], size=(30, 7))
    np.testing.assert_allclose(
        hutchinson_samples(lambda X: A @ X, Z, npx),
        naive_samples(A, Z),
        rtol=1e-12,
        atol=1e-12,
    )
    C = A + 1j * rng.standard_normal((30, 30))
    W = np.exp(2j * np.pi * rng.random((30, 7)))
    np.testing.assert_allclose(
        hutchinson_samples(lambda X: C @ X, W, npx),
        naive_samples(C, W),
        rtol=1e-12,
        atol=1e-12,
    )


# -------------------------------------------------------------- per-probe variance
def variance_with_error(samples):
    """Sample variance and its standard error sqrt((mu4 - var^2) / N) from the samples."""
    deviation = samples - samples.mean()
    variance = deviation.var()
    return variance, math.sqrt(((deviation**4).mean() - variance**2) / samples.size)


NUM_PROBES = 40000


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_per_probe_variance_matches_theory(probe):
    rng = np.random.default_rng(11)
    A = rng.standard_normal((25, 25))
    S = (A + A.T) / 2
    # Gaussian: Var z^T A z = 2 ||S||_F^2; Rademacher: 2 sum_{i != j} S_ij^2 (Avron-Toledo)
    if probe == "gaussian":
        theory = 2 * np.sum(S**2)
    else:
        theory = 2 * (np.sum(S**2) - np.sum(np.diag(S) ** 2))
    est = lt.trace(A, method=lt.estimators.Hutchinson(probe=probe), num_matvecs=NUM_PROBES, seed=3)
    variance, error = variance_with_error(numpy_of(est.info["samples"]))
    # 5 standard errors of the sample variance (two-sided p ~ 6e-7)
    assert abs(variance - theory) < 5 * error, (variance, theory, error)
    assert est.num_matvecs == NUM_PROBES


def test_rademacher_is_exact_on_diagonal_and_unchanged_by_shift(backend):
    d = np.arange(1.0, 41.0)
    est = lt.trace(backend.matrix(np.diag(d)), method="hutchinson", num_matvecs=8, seed=0)
    assert float(est) == pytest.approx(d.sum(), rel=1e-14)
    # every sample is the trace: no spread, and the standard error is the rounding of a
    # blocked sum of n = 40 terms, eps (sqrt(b) + sqrt(n / b)) |mean| with blocks of b = 32
    eps = np.finfo(np.float64).eps
    rounding = eps * (math.sqrt(32) + math.sqrt(40 / 32)) * d.sum()
    assert float(numpy_of(est.stderr)) == pytest.approx(rounding, rel=1e-9, abs=0)
    rng = np.random.default_rng(2)
    A = rng.standard_normal((40, 40))
    plain = lt.trace(backend.matrix(A), method="hutchinson", num_matvecs=50, seed=5)
    shifted = lt.trace(
        backend.matrix(A + 7.0 * np.eye(40)), method="hutchinson", num_matvecs=50, seed=5
    )
    # z^T (A + cI) z = z^T A z + c n for +-1 probes: same spread, value shifted by c n
    assert float(shifted) - float(plain) == pytest.approx(7.0 * 40, rel=1e-12)
    assert float(numpy_of(shifted.stderr)) == pytest.approx(float(numpy_of(plain.stderr)), rel=1e-9)


def test_interval_of_a_diagonal_matrix_covers_its_rounded_trace():
    # Rademacher samples of a diagonal matrix are all tr(A) in exact arithmetic; rounded,
    # they differ from the exactly rounded sum by a few ulps. Before the rounding floor
    # the standard error was 0.0 and every one of these 40 intervals missed the trace
    d = np.random.default_rng(0).uniform(1.0, 3.0, 200)
    A = lt.LinearOperator.from_callable(matmat=lambda X: d[:, None] * X, shape=(200, 200))
    truth = math.fsum(d)
    for seed in range(40):
        low, high = lt.trace(A, method="hutchinson", num_matvecs=20, seed=seed).ci()
        assert low <= truth <= high
        assert high - low < 1e-11 * truth  # (an interval of rounding, not of sampling)


def test_backends_agree_with_their_own_samples(backend):
    A = test_matrix("poly", 50, seed=1)
    est = lt.trace(backend.matrix(A), method="hutchinson", num_matvecs=30, seed=2, block_size=7)
    samples = numpy_of(est.info["samples"])
    assert samples.shape == (30,) and est.num_matvecs == 30
    np.testing.assert_allclose(float(est), samples.mean(), rtol=1e-12)
    np.testing.assert_allclose(
        float(numpy_of(est.stderr)), samples.std(ddof=1) / math.sqrt(30), rtol=1e-10
    )


# -------------------------------------------------------------------- statistics
@pytest.mark.stats
def test_unbiased_across_seeds():
    A = test_matrix("poly", 60, seed=3)
    values = np.array(
        [float(lt.trace(A, method="hutchinson", num_matvecs=10, seed=s)) for s in range(500)]
    )
    se = values.std(ddof=1) / math.sqrt(values.size)
    # the mean of 500 i.i.d. estimates is within 4 standard errors of tr(A)
    assert abs(values.mean() - np.trace(A)) < 4 * se


@pytest.mark.stats
@pytest.mark.parametrize("spectrum", ["flat", "poly"])
def test_coverage_of_the_95_percent_interval(spectrum):
    """Counts of 1000 seeded runs (n=300, m=60), target 930-970: flat 951, poly 935.

    With the plain t quantile: flat 949, poly 921. On the poly (i^-2) spectrum the samples
    are chi-square-like (skewness ~2.4, excess kurtosis ~9), the mean and the std are
    positively correlated and the t-interval covers 92.1 %; the second-order (Edgeworth)
    shape correction of the quantile brings it to 93.5 %. sd of the count: 6.9.
    """
    A = test_matrix(spectrum, 300, seed=0)
    truth = np.trace(A)
    covered = 0
    for seed in range(1000):
        low, high = lt.trace(A, method="hutchinson", num_matvecs=60, seed=seed).ci(0.95)
        covered += low <= truth <= high
    assert 930 <= covered <= 970, covered


def test_edgeworth_quantile():
    t = stats.t.ppf(0.975, 59)
    assert edgeworth_quantile(t, 0.95, 60, None, None) == t
    assert edgeworth_quantile(t, 0.95, 60, 0.0, 0.0) == t
    assert edgeworth_quantile(t, 0.95, 60, 2.0, 6.0) > t  # skewed samples widen it
    assert edgeworth_quantile(t, 0.95, 60, 0.0, 50.0) == pytest.approx(stats.norm.ppf(0.975))
    rng = np.random.default_rng(0)
    skew, kurt = sample_shape(rng.chisquare(1, 200000), npx)
    assert skew == pytest.approx(math.sqrt(8), rel=0.05) and kurt == pytest.approx(12, rel=0.15)
    # the small-sample corrections: scipy's unbiased G1 and G2, same sample, m = 10
    x = rng.chisquare(2, 10)
    skew, kurt = sample_shape(x, npx)
    assert skew == pytest.approx(stats.skew(x, bias=False), rel=1e-12)
    assert kurt == pytest.approx(stats.kurtosis(x, bias=False), rel=1e-12)
    # the correction written out (Hall 1992): t - z [K (z^2 - 3) / 12
    #                                               - S^2 (z^4 + 2 z^2 - 3) / 18] / m
    z = stats.norm.ppf(0.975)
    for skewness, kurtosis in ((2.0, 6.0), (0.0, 6.0), (1.0, -1.0)):
        shape = kurtosis * (z**2 - 3) / 12 - skewness**2 * (z**4 + 2 * z**2 - 3) / 18
        expected = max(t - z * shape / 60, z)
        assert edgeworth_quantile(t, 0.95, 60, skewness, kurtosis) == pytest.approx(
            expected, rel=1e-12
        )


@pytest.mark.parametrize("m", [5, 8])
def test_reported_quantile_is_the_shape_corrected_t_of_its_samples(m):
    est = lt.trace(test_matrix("poly", 60, seed=2), method="hutchinson", num_matvecs=m, seed=1)
    x = numpy_of(est.info["samples"])
    base = stats.t.ppf(0.975, m - 1)
    skew, kurt = stats.skew(x, bias=False), stats.kurtosis(x, bias=False)
    assert est.dof == m - 1
    assert est.quantile(0.95) == pytest.approx(
        edgeworth_quantile(base, 0.95, m, skew, kurt), rel=1e-10
    )
    # the kernel's sample mean of the same samples gives the same interval
    again = sample_mean(est.info["samples"], npx).estimate(m, "hutchinson")
    assert again.quantile(0.95) == pytest.approx(est.quantile(0.95), rel=1e-12)


def test_adaptive_hutchinson_doubles_its_probes_within_the_cap():
    op, log = counting_operator(test_matrix("flat", 80, seed=0))
    widths = []
    matmat = op.matmat
    est = lt.trace(
        lt.LinearOperator.from_callable(
            matvec=op.matvec,
            matmat=lambda X: (widths.append(X.shape[1]), matmat(X))[1],
            shape=op.shape,
            dtype=op.dtype,
        ),
        method="hutchinson",
        num_matvecs=10,
        rtol=1e-9,
        max_matvecs=150,
        block_size=1000,
        seed=0,
    )
    assert widths == [10, 10, 20, 40, 70]  # doubling the probes so far, then the cap
    assert est.converged is False and est.num_matvecs == 150


# ---------------------------------------------------------------------- batching
def counting_operator(A):
    log = {"calls": 0, "columns": 0}

    def matmat(X):
        log["calls"] += 1
        log["columns"] += X.shape[1]
        return A @ X

    op = lt.LinearOperator.from_callable(
        matvec=lambda x: A @ x, matmat=matmat, shape=A.shape, dtype=A.dtype
    )
    return op, log


@pytest.mark.parametrize(("m", "block"), [(50, 16), (50, 50), (50, 100), (7, 1), (64, 8)])
def test_probe_blocks(m, block):
    op, log = counting_operator(test_matrix("flat", 80, seed=0))
    est = lt.trace(op, method="hutchinson", num_matvecs=m, block_size=block, seed=0)
    assert log["calls"] == math.ceil(m / block)
    assert log["columns"] == m == est.num_matvecs


# ---------------------------------------------------------------------- adaptive
def test_adaptive_meets_tolerance_and_counts():
    A = test_matrix("flat", 200, seed=0)
    op, log = counting_operator(A)
    est = lt.trace(op, method="hutchinson", num_matvecs=10, rtol=5e-3, max_matvecs=5000, seed=1)
    assert est.converged is True
    assert est.quantile(0.95) * float(est.stderr) <= 5e-3 * abs(float(est))
    assert est.num_matvecs == log["columns"] and est.num_matvecs > 10
    est = lt.trace(A, method="hutchinson", num_matvecs=10, rtol=1e-7, max_matvecs=80, seed=1)
    assert est.converged is False and est.num_matvecs == 80


@pytest.mark.stats
def test_adaptive_coverage():
    """Sequential stopping at rtol=4e-3 from 10 probes: 379 of 400 runs covered (94.8 %)."""
    A = test_matrix("flat", 300, seed=0)
    truth = np.trace(A)
    covered = 0
    for seed in range(400):
        est = lt.trace(
            A, method="hutchinson", num_matvecs=10, rtol=4e-3, max_matvecs=3000, seed=seed
        )
        assert est.converged
        low, high = est.ci(0.95)
        covered += low <= truth <= high
    assert 372 <= covered <= 388, covered


# -------------------------------------------------------------- Frobenius norm
def test_frobenius_norm_squared_every_backend(backend):
    rng = np.random.default_rng(4)
    A = rng.standard_normal((30, 20))
    est = lt.frobenius_norm_squared(backend.matrix(A), num_matvecs=40, seed=0, block_size=15)
    samples = numpy_of(est.info["samples"])
    assert est.num_matvecs == 40 and samples.shape == (40,)
    np.testing.assert_allclose(float(est), samples.mean(), rtol=1e-12)
    # per-probe variance for Rademacher: 2 sum_{i != j} (A^T A)_ij^2; 5 standard errors
    B = A.T @ A
    sd = math.sqrt(2 * (np.sum(B**2) - np.sum(np.diag(B) ** 2)) / 40)
    assert abs(float(est) - np.sum(A**2)) < 5 * sd
    # a sample mean: dof m - 1, stderr std / sqrt(m), the t interval of its samples
    assert est.dof == 39
    stderr = samples.std(ddof=1) / math.sqrt(40)
    np.testing.assert_allclose(float(est.stderr), stderr, rtol=1e-10)
    half = edgeworth_quantile(
        stats.t.ppf(0.975, 39),
        0.95,
        40,
        stats.skew(samples, bias=False),
        stats.kurtosis(samples, bias=False),
    )
    np.testing.assert_allclose(
        est.ci(0.95), (float(est) - half * stderr, float(est) + half * stderr), rtol=1e-10
    )


@pytest.mark.stats
def test_frobenius_norm_squared_of_a_complex_operator():
    # ||A||_F^2 = tr(A^H A) is real: unit-modulus probes z^H A^H A z = |A z|^2
    rng = np.random.default_rng(8)
    A = rng.standard_normal((30, 30)) + 1j * rng.standard_normal((30, 30))
    values = np.array(
        [float(lt.frobenius_norm_squared(A, num_matvecs=10, seed=s)) for s in range(200)]
    )
    assert abs(values.mean() - np.sum(np.abs(A) ** 2)) < 5 * values.std(ddof=1) / math.sqrt(200)


@pytest.mark.stats
def test_frobenius_norm_squared_unbiased_and_counted():
    rng = np.random.default_rng(5)
    A = rng.standard_normal((25, 25))
    op, log = counting_operator(A)
    est = lt.frobenius_norm_squared(op, num_matvecs=20, seed=0, block_size=8)
    assert (log["calls"], log["columns"], est.num_matvecs) == (3, 20, 20)
    values = np.array(
        [
            float(lt.frobenius_norm_squared(A, num_matvecs=5, seed=s, probe="gaussian"))
            for s in range(400)
        ]
    )
    assert abs(values.mean() - np.sum(A**2)) < 4 * values.std(ddof=1) / math.sqrt(400)


# ------------------------------------------------------------- differentiable estimates
# f(x) = sum x^4 has H = diag(12 x^2); with Rademacher probes z_i^2 = 1, so every sample
# z^T H z equals tr(H) = 12 sum x^2 and so does the estimate, whose gradient is 24 x
# exactly (up to round-off: 1e-12 relative).
X0 = np.linspace(0.5, 1.5, 12)


def _hessian_trace_torch(method: str, num_matvecs: int):
    torch = pytest.importorskip("torch")
    import warnings

    x = torch.tensor(X0, requires_grad=True)
    H = lt.hessian(lambda v: torch.sum(v**4), x, differentiable=True)
    always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch warns once per process otherwise
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*requires_grad.*")
            # (the interval statistics are computed here, from detached copies)
            est = lt.trace(H, method=method, seed=0, num_matvecs=num_matvecs, probe="rademacher")
    finally:
        torch.set_warn_always(always)
    est.value.backward()
    return float(est.value.detach()), x.grad.numpy()


def _hessian_trace_jax(method: str, num_matvecs: int, jit: bool = False):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy

    def value(x):
        H = lt.hessian(lambda v: jnp.sum(v**4), x)
        return lt.trace(H, method=method, seed=0, num_matvecs=num_matvecs, probe="rademacher").value

    grad = jax.jit(jax.grad(value)) if jit else jax.grad(value)
    return float(value(jnp.asarray(X0))), np.asarray(grad(jnp.asarray(X0)))


@pytest.mark.parametrize("library", ["torch", "jax", "jax-jit"])
def test_hutchinson_estimate_is_differentiable(library):
    if library == "torch":
        value, grad = _hessian_trace_torch("hutchinson", 8)
    else:
        value, grad = _hessian_trace_jax("hutchinson", 8, jit=library == "jax-jit")
    assert abs(value - 12 * np.sum(X0**2)) <= 1e-12 * 12 * np.sum(X0**2)
    np.testing.assert_allclose(grad, 24 * X0, rtol=1e-12, atol=0)


def test_adaptive_hutchinson_is_differentiable_on_torch():
    torch = pytest.importorskip("torch")
    x = torch.tensor(X0, requires_grad=True)
    # a non-diagonal Hessian, so the samples spread and the stopping test runs
    H = lt.hessian(
        lambda v: torch.sum(v**4) + torch.sum(v[:-1] * v[1:]) ** 2, x, differentiable=True
    )
    est = lt.trace(H, method="hutchinson", seed=0, rtol=0.05, max_matvecs=64)
    est.value.backward()
    assert est.num_matvecs > 2 and bool(torch.all(torch.isfinite(x.grad)))


def test_rounding_floor_leaves_a_float32_spread_alone():
    # float32 at n = 2^16 on a diagonally dominant matrix: the samples spread (by 1e-5
    # relative) and their spread already holds their rounding, which differs from probe
    # to probe. A floor added whatever the spread (eps sqrt(n) |mean| in quadrature) made
    # the standard error 4.00 and kept this run from converging in 2000 columns, where
    # it converges in its first 32 (found by a review)
    n = 2**16
    d = np.random.default_rng(0).uniform(1.0, 3.0, n).astype(np.float32)
    c = np.float32(0.01)
    A = lt.LinearOperator.from_callable(
        matmat=lambda X: d[:, None] * X + c * (np.roll(X, 1, 0) + np.roll(X, -1, 0)),
        shape=(n, n),
        dtype=np.float32,
    )
    est = lt.trace(A, method="hutchinson", rtol=5e-5, max_matvecs=2000, seed=0)
    assert est.converged and est.num_matvecs == 32
    samples = np.asarray(est.info["samples"], dtype=np.float64)
    plain = samples.std(ddof=1) / math.sqrt(samples.size)
    assert float(est.stderr) == pytest.approx(plain, rel=1e-4)
