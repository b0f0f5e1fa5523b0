"""The numbers the documentation cites: variance, accuracy and interval coverage.

``track_*`` benchmarks return a measured number (with its ``unit``) rather than a time, so
asv keeps their history per commit and a regression in accuracy shows up like a slowdown.
Everything is seeded, so a change of value means a change of code (or of the BLAS).

* ``TrackHutchinsonVariance``: Hutchinson's per-probe variance on a 20 x 20 Gaussian
  matrix A and on A + 5 I, measured over 200,000 probes, against theory
  (S = (A + A^T) / 2): ``2 ||S||_F^2`` for Gaussian probes, ``2 sum_{i != j} S_ij^2`` for
  Rademacher probes. The shift adds ``2 (10 tr(S) + 25 n)`` to the Gaussian variance and
  nothing to the Rademacher one.
* ``TrackTraceAccuracy`` / ``TrackDiagonalAccuracy``: over 200 seeds, at m = 100 matvecs, on
  the standard test spectra (n = 1000: flat linspace(3, 1), poly i^-2, slowexp 0.9^i;
  linop_trace._testing), the median relative error of each method and the coverage of its
  95% interval (fraction of seeds - for diagonals, of seed x entry pairs - whose interval
  holds the truth). The matrices are passed as arrays (no tags), so Diag++ and XDiag are
  the one-sided estimators of their papers; the labels ``diag++ (symmetric)`` and
  ``xdiag (symmetric)`` run them on the same matrices tagged symmetric, where their
  default is the two-sided form.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import linop_trace

from ._common import DIAGONAL_METHODS, NUM_MATVECS, TRACE_METHODS, pin_threads, require_method

SPECTRA = ["flat", "poly", "slowexp"]
#: label -> (registered method, operator tags)
SYMMETRIC_LABELS = {
    "diag++ (symmetric)": ("diag++", ("symmetric",)),
    "xdiag (symmetric)": ("xdiag", ("symmetric",)),
}
DIAGONAL_LABELS = [*DIAGONAL_METHODS, *SYMMETRIC_LABELS]
SIZE = 1000
NUM_SEEDS = 200
VARIANCE_PROBES = 200_000


def _theoretical_variance(A: np.ndarray, probe: str) -> float:
    """Per-probe variance of z^T A z (Avron and Toledo 2011), S the symmetric part of A."""
    S = (A + A.T) / 2
    if probe == "gaussian":
        return 2.0 * float(np.sum(S**2))
    if probe == "rademacher":
        return 2.0 * float(np.sum(S**2) - np.sum(np.diag(S) ** 2))
    raise ValueError(probe)


class TrackHutchinsonVariance:
    """Empirical vs theoretical variance of one Hutchinson sample, by probe and shift."""

    params = (["gaussian", "rademacher"], [0.0, 5.0])
    param_names = ["probe", "shift"]
    timeout = 300

    def setup(self, probe: str, shift: float) -> None:
        pin_threads()
        rng = np.random.default_rng(0)
        A = rng.standard_normal((20, 20)) + shift * np.eye(20)
        estimate = linop_trace.trace(
            A, method="hutchinson", probe=probe, num_matvecs=VARIANCE_PROBES, seed=1
        )
        # stderr is the sample standard deviation over sqrt(m)
        self.empirical = float(estimate.stderr) ** 2 * VARIANCE_PROBES
        self.theoretical = _theoretical_variance(A, probe)

    def track_variance_ratio(self, probe: str, shift: float) -> float:
        return self.empirical / self.theoretical

    track_variance_ratio.unit = "empirical/theoretical"

    def track_empirical_variance(self, probe: str, shift: float) -> float:
        return self.empirical

    track_empirical_variance.unit = "variance per probe"

    def track_theoretical_variance(self, probe: str, shift: float) -> float:
        return self.theoretical

    track_theoretical_variance.unit = "variance per probe"


def _truths() -> dict[str, tuple[np.ndarray, float, np.ndarray]]:
    from linop_trace._testing import test_matrix

    matrices = {}
    for spectrum in SPECTRA:
        A = test_matrix(spectrum, SIZE, seed=0)
        matrices[spectrum] = (A, float(np.trace(A)), np.diag(A).copy())
    return matrices


def _run(quantity: str, methods: list[str]) -> dict[tuple[str, str], dict[str, float]]:
    """Median relative error and interval coverage of every available method."""
    pin_threads()
    available = linop_trace.available_methods(quantity)
    results: dict[tuple[str, str], dict[str, float]] = {}
    for spectrum, (A, true_trace, true_diagonal) in _truths().items():
        for label in methods:
            method, tags = SYMMETRIC_LABELS.get(label, (label, ()))
            if method not in available:
                continue
            operator = linop_trace.aslinearoperator(A, tags=tags) if tags else A
            errors, covered, counted = [], 0, 0
            for seed in range(NUM_SEEDS):
                estimate = getattr(linop_trace, quantity)(
                    operator, method=method, num_matvecs=NUM_MATVECS, seed=seed
                )
                value = np.asarray(estimate.value)
                if quantity == "trace":
                    errors.append(abs(float(value) - true_trace) / abs(true_trace))
                    truth: Any = true_trace
                else:
                    errors.append(
                        float(np.linalg.norm(value - true_diagonal) / np.linalg.norm(true_diagonal))
                    )
                    truth = true_diagonal
                if estimate.stderr is not None:
                    low, high = estimate.ci(0.95)
                    inside = (np.asarray(low) <= truth) & (truth <= np.asarray(high))
                    covered += int(np.sum(inside))
                    counted += int(np.size(inside))
            results[(spectrum, label)] = {
                "median_relative_error": float(np.median(errors)),
                "coverage": covered / counted if counted else float("nan"),
            }
    return results


class _Accuracy:
    quantity = "trace"
    timeout = 900

    def setup(self, cache: dict, spectrum: str, method: str) -> None:
        require_method(SYMMETRIC_LABELS.get(method, (method,))[0], self.quantity)
        if (spectrum, method) not in cache:
            raise NotImplementedError(f"{method!r} was not registered when the cache was built")
        self.result = cache[(spectrum, method)]

    def track_median_relative_error(self, cache: dict, spectrum: str, method: str) -> float:
        return self.result["median_relative_error"]

    track_median_relative_error.unit = "relative error"

    def track_coverage_95(self, cache: dict, spectrum: str, method: str) -> float:
        if self.result["coverage"] != self.result["coverage"]:  # NaN: no stderr
            raise NotImplementedError(f"{method!r} reports no error estimate")
        return self.result["coverage"]

    track_coverage_95.unit = "fraction covered"


class TrackTraceAccuracy(_Accuracy):
    """Trace estimators at m = 100, n = 1000, 200 seeds."""

    quantity = "trace"
    params = (SPECTRA, TRACE_METHODS)
    param_names = ["spectrum", "method"]

    def setup_cache(self) -> dict:
        return _run("trace", TRACE_METHODS)

    setup_cache.timeout = 900


class TrackDiagonalAccuracy(_Accuracy):
    """Diagonal estimators at m = 100, n = 1000, 200 seeds."""

    quantity = "diagonal"
    params = (SPECTRA, DIAGONAL_LABELS)
    param_names = ["spectrum", "method"]

    def setup_cache(self) -> dict:
        return _run("diagonal", DIAGONAL_LABELS)

    setup_cache.timeout = 900
