"""Hutchinson's diagonal estimator (Bekas et al.): the naive reference, running sums over
blocks, the per-entry variance, samples on every backend, probe blocks."""

from __future__ import annotations

import array_api_compat.numpy as npx
import numpy as np
import pytest
from _diagonal_helpers import Counting, naive_bekas, random_problem
from conftest import numpy_of

import linop_trace as lt
from linop_trace._stats import RatioSums
from linop_trace._testing import test_matrix
from linop_trace.estimators._hutchinson import (
    diagonal_hutchinson_core,
    diagonal_hutchinson_samples,
)


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
    # the ratio estimator's standard error (Var(y | x) proportional to x), written out
    ratio = naive_bekas(A, Z)
    num, den = Z.conj() * (A @ Z), np.abs(Z) ** 2
    expected = np.sqrt(np.sum(np.abs(num - ratio[:, None] * den) ** 2 / den, 1) / 8 / den.sum(1))
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
    stderr: the residual sum about the first block's shift is exact."""
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


def test_backends_agree_with_their_samples(backend):
    A = test_matrix("poly", 40, seed=2)
    est = lt.diagonal(backend.matrix(A), method="hutchinson", num_matvecs=30, seed=3, block_size=8)
    assert est.num_matvecs == 30 and est.dof == 29
    error = np.abs(numpy_of(est.value) - np.diag(A))
    assert np.all(error <= 6 * numpy_of(est.stderr))


# ---------------------------------------------------------------------- batching
def test_hutchinson_diagonal_blocks():
    counting = Counting(test_matrix("poly", 100, seed=0))
    est = lt.diagonal(counting.op, method="hutchinson", num_matvecs=50, block_size=16, seed=0)
    assert counting.forward == 4 and est.num_matvecs == counting.columns == 50


@pytest.mark.stats
@pytest.mark.parametrize(
    ("method", "probe", "budget"),
    [("hutchinson", "gaussian", 5), ("hutchinson", "sphere", 5), ("diag++", "gaussian", 12)],
)
def test_interval_coverage_with_probes_of_varying_length(method, probe, budget):
    """Entrywise 95% intervals with Gaussian and sphere probes, few of them (n = 40,
    400 seeds). The ratio estimator's stderr makes (d_i - a_ii) / se_i Student-t with
    k - 1 degrees of freedom for Gaussian probes; the delta method's covered 0.869
    (Hutchinson, k = 5) and 0.860 (Diag++'s residual). Tolerance: the coverage of 400
    seeds has sd sqrt(0.95 * 0.05 / 400) = 0.011 even if a seed's 40 entries all agreed;
    3 sd below 0.95 is 0.917."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((40, 40)) + 3 * np.eye(40)
    truth = np.diag(A)
    covered = []
    for seed in range(400):
        estimate = lt.diagonal(A, method=method, num_matvecs=budget, seed=seed, probe=probe)
        low, high = estimate.ci(0.95)
        covered.append(np.mean((low <= truth) & (truth <= high)))
    assert np.mean(covered) >= 0.917
