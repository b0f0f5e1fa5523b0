"""``method="auto"`` against the method it ends up running (issue 17: within 1.05x).

On an operator known only through its products, ``trace(A, method="auto",
num_matvecs=100)`` spends part of its budget on a first block of probes, predicts the
variance of Hutchinson and of XTrace from it and finishes with the better method, reusing
those products. Its cost should be the chosen method's cost: the choice itself is a few
reductions over products the method needs anyway.

``TrackAutoOverMethod.track_ratio`` runs auto once in ``setup``, reads ``estimate.method``
and times auto against ``trace(A, method=<that method>)`` with the same budget, seed and
probes (sphere: auto's default for traces, passed to both), interleaved, best of 7 each.
The operator: ``LinearOperator.from_callable(matmat=lambda X: M @ X)`` over a dense
float64 4,000 x 4,000 ``linop_trace._testing.test_matrix`` (NumPy, torch, JAX; one
thread). Its spectrum decides the method: ``flat`` (linspace(1, 3, n)) makes auto pick
Hutchinson, ``poly`` (i^-2) XTrace.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import linop_trace

from ._common import BACKENDS, get_backend, interleaved_best, pin_threads

SIZE = 4000
NUM_MATVECS = 100
SPECTRA = ["flat", "poly"]
PROBE = "sphere"


def _matrices() -> dict[str, np.ndarray]:
    """The two test matrices, built once per asv run (~10 s each on one core)."""
    from linop_trace._testing import test_matrix

    return {spectrum: test_matrix(spectrum, SIZE, seed=0) for spectrum in SPECTRA}


_matrices.timeout = 300  # type: ignore[attr-defined]


class _AutoAgainstMethod:
    params = (BACKENDS, SPECTRA)
    param_names = ["backend", "spectrum"]
    timeout = 300
    setup_cache = staticmethod(_matrices)

    def setup(self, matrices: dict[str, np.ndarray], backend_name: str, spectrum: str) -> None:
        pin_threads()  # first: JAX must see one CPU before it creates its client
        backend = get_backend(backend_name, "cpu")
        pin_threads()  # (again: torch was just imported)
        M = backend.dense(matrices[spectrum])
        operator = linop_trace.LinearOperator.from_callable(
            matmat=lambda X: M @ X, shape=M.shape, like=M
        )

        def run(method: str) -> Any:
            estimate = linop_trace.trace(
                operator, method=method, num_matvecs=NUM_MATVECS, seed=0, probe=PROBE
            )
            backend.sync(estimate.value)
            return estimate

        self.chosen = run("auto").method
        self.auto = lambda: run("auto")
        self.method = lambda: run(self.chosen)
        self.method()  # warm up (JAX's per-shape compilation)
        self.auto()


class TrackAutoOverMethod(_AutoAgainstMethod):
    """auto's time / the time of the method it chose, interleaved, best of 7 each."""

    def track_ratio(self, matrices: dict[str, np.ndarray], backend_name: str, spectrum: str):
        method, auto = interleaved_best([self.method, self.auto])
        return auto / method

    track_ratio.unit = "auto time / chosen method time"


class TimeAutoAndMethod(_AutoAgainstMethod):
    """The two sides as plain asv timings, for history."""

    def time_auto(self, matrices: dict[str, np.ndarray], backend_name: str, spectrum: str):
        self.auto()

    def time_chosen_method(
        self, matrices: dict[str, np.ndarray], backend_name: str, spectrum: str
    ) -> None:
        self.method()
