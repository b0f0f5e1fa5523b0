"""Each estimator against its own floor, side by side in one process (issue 3's speed target).

The floor of a method is the time its own operator calls take: the same number of calls
with the same column counts (``A Omega`` then ``A Q``: two calls of 50 columns for XTrace
and XDiag at m = 100, one of 100 for Hutchinson), through the same operator, in the same
library, on the same device. Everything else an estimator does (drawing probes, QR
factorizations, the leave-one-out algebra, the error estimate) is overhead, and the target
is ``estimator / floor <= 1.15`` on a dense float64 n = 4000 operator at m = 100.

``TrackOverhead.track_ratio`` measures both in one call, interleaved (floor, estimator,
floor, ...), and returns the ratio of the best times, so a machine whose load changes
between two separate timings cannot move the ratio much. ``time_estimator`` and
``time_floor`` are the same two timings as ordinary asv timings, for history.

The operator: A = G G^T / k + I with G an n x k Gaussian (k = 200), dense, symmetric
positive definite, tagged as such where the method asks (NA-Hutch++ and XDiag use the
symmetry to spend one product instead of two transposes; XNysTrace needs PSD).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np

import linop_trace

from ._common import BACKENDS, NUM_MATVECS, get_backend, pin_threads, sync_estimate

SIZE = 4000
REPEATS = 7

PSD = ("symmetric", "positive_semidefinite")

#: label: (quantity, method, tags, options); options {} is the registered method, else the
#: estimator built with these arguments. The Rademacher rows of XTrace and XNysTrace show
#: what their default sphere probes (Gaussian draws, needed by the improved normalization)
#: cost on top of the algebra. On symmetric operators Diag++ and XDiag deflate both sides
#: by default; the one-sided XDiag row is the paper's estimator on the same operator.
CASES: dict[str, tuple[str, str, tuple[str, ...], dict[str, Any]]] = {
    "hutchinson": ("trace", "hutchinson", (), {}),
    "hutch++": ("trace", "hutch++", (), {}),
    "na-hutch++": ("trace", "na-hutch++", (), {}),
    "na-hutch++ (symmetric)": ("trace", "na-hutch++", ("symmetric",), {}),
    "xtrace": ("trace", "xtrace", (), {}),
    "xtrace (rademacher)": ("trace", "xtrace", (), {"probe": "rademacher"}),
    "xnystrace": ("trace", "xnystrace", PSD, {}),
    "xnystrace (rademacher)": ("trace", "xnystrace", PSD, {"probe": "rademacher"}),
    "diagonal hutchinson": ("diagonal", "hutchinson", (), {}),
    "diag++": ("diagonal", "diag++", (), {}),
    "diag++ (symmetric)": ("diagonal", "diag++", ("symmetric",), {}),
    "xdiag": ("diagonal", "xdiag", (), {}),
    "xdiag (symmetric)": ("diagonal", "xdiag", ("symmetric",), {}),
    "xdiag (symmetric, one-sided)": ("diagonal", "xdiag", ("symmetric",), {"two_sided": False}),
}


@functools.lru_cache(maxsize=1)
def _matrix(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    k = 200
    G = rng.standard_normal((n, k))
    A = G @ G.T / k
    A[np.diag_indices(n)] += 1.0
    return A


def _call_pattern(operator: Any, quantity: str, method: Any) -> list[tuple[str, int]]:
    """The (kind, columns) of every operator call the method makes at m = NUM_MATVECS."""
    calls: list[tuple[str, int]] = []

    def forward(X: Any) -> Any:
        calls.append(("matmat", int(X.shape[1])))
        return operator.matmat(X)

    def adjoint(X: Any) -> Any:
        calls.append(("rmatmat", int(X.shape[1])))
        return operator.rmatmat(X)

    recorder = linop_trace.LinearOperator.from_callable(
        matmat=forward,
        rmatmat=adjoint,
        shape=operator.shape,
        dtype=operator.dtype,
        like=operator.matmat(linop_trace.rademacher(operator, 1, seed=0)),
        tags=operator.tags,
    )
    getattr(linop_trace, quantity)(recorder, method=method, num_matvecs=NUM_MATVECS, seed=0)
    return calls


def _estimator(method: str, options: dict[str, Any]) -> Any:
    """The registered name, or its estimator class built with ``options``."""
    if not options:
        return method
    from linop_trace.estimators import DiagPlusPlus, XDiag, XNysTrace, XTrace

    classes = {"xtrace": XTrace, "xnystrace": XNysTrace, "xdiag": XDiag, "diag++": DiagPlusPlus}
    return classes[method](**options)


class TrackOverhead:
    """Estimator time / floor time (the method's own operator calls), best of 7 each."""

    params = (BACKENDS, list(CASES))
    param_names = ["backend", "case"]
    timeout = 600

    def setup(self, backend_name: str, case: str) -> None:
        pin_threads()
        self.backend = get_backend(backend_name, "cpu")
        quantity, method, tags, options = CASES[case]
        self.operator = linop_trace.aslinearoperator(self.backend.dense(_matrix(SIZE)), tags=tags)
        self.function = getattr(linop_trace, quantity)
        self.method = _estimator(method, options)
        pattern = _call_pattern(self.operator, quantity, self.method)
        self.blocks = [
            (kind, linop_trace.rademacher(self.operator, width, seed=1)) for kind, width in pattern
        ]
        self.time_floor(backend_name, case)  # warm up (JAX compilation, caches)
        self.time_estimator(backend_name, case)

    def time_estimator(self, backend_name: str, case: str) -> None:
        estimate = self.function(self.operator, method=self.method, num_matvecs=NUM_MATVECS, seed=0)
        sync_estimate(self.backend, estimate)

    def time_floor(self, backend_name: str, case: str) -> None:
        for kind, block in self.blocks:
            self.backend.sync(getattr(self.operator, kind)(block))

    def track_ratio(self, backend_name: str, case: str) -> float:
        floor, estimator = [], []
        for _ in range(REPEATS):
            start = time.perf_counter()
            self.time_floor(backend_name, case)
            floor.append(time.perf_counter() - start)
            start = time.perf_counter()
            self.time_estimator(backend_name, case)
            estimator.append(time.perf_counter() - start)
        return min(estimator) / min(floor)

    track_ratio.unit = "estimator time / floor time"
