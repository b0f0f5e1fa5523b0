"""The one-thread BLAS cap around the library's own small host algebra (issue 19).

With more BLAS threads than free cores, every threaded call waits for threads the
scheduler has not run yet: the small calls of an estimator (thin QR of (n, k) sketches,
k x k solves) then take milliseconds instead of microseconds. The library caps NumPy's
and SciPy's BLAS at one thread around those calls (``linop_trace._backend.one_blas_thread``),
never around the operator's products.

Oversubscription is made by construction, not by loading the machine: the process gets
``threads`` BLAS threads (threadpoolctl) or torch threads (``torch.set_num_threads``);
8 is more than the cores of a small CI machine. Each ``track_`` ratio times the same
call without the cap and with it, interleaved in one process (best of 5 each), so a
change of the machine's load moves both sides alike:

- ``TrackSmallAlgebra.track_speedup``: one library routine at the sizes of an m = 100
  budget at n = 2000 (uncapped time / capped time). At ``threads = 1`` the cap changes
  no thread count, so the ratio is its own cost (below 1 by the cost of entering it).
- ``TrackEstimators.track_speedup``: a whole NumPy estimate on a dense n = 2000 matrix
  at m = 100; the operator's products run with ``threads`` threads either way.
- ``TrackCapCost.track_microseconds``: entering and leaving the cap once.

torch rows of ``TrackSmallAlgebra``: the library does not cap torch; their "capped" side
is a ``torch.set_num_threads(1)`` made here around the same call, the evidence for that
choice (torch's pool degrades far less than OpenBLAS's, and with 2 threads on 2 cores the
cap loses).

The processes are not pinned to one CPU (``pin_threads`` would itself oversubscribe);
compare ratios, not times, across runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import linop_trace

from ._common import NUM_MATVECS, get_backend, interleaved_best

SIZE = 2000
REPEATS = 5
THREADS = [1, 2, 8]
BACKENDS = ["numpy", "torch"]

Routine = Callable[[Any, Any, Any, dict[str, Any]], Any]

#: label: function of (backend package, estimators' linalg module, xp, arrays). Sizes:
#: XTrace's sketch at m = 100 (50 columns), one 25-column extension, Hutch++'s
#: 34-column basis, XNysTrace's 100 x 100 core.
ROUTINES: dict[str, Routine] = {
    "thin_qr (2000, 50)": lambda b, la, xp, a: b.thin_qr(xp, a["sketch"]),
    "orthonormal_factors (2000, 50)": lambda b, la, xp, a: la.orthonormal_factors(a["sketch"], xp),
    "extend_basis (2000, 50 + 25)": lambda b, la, xp, a: la.extend_basis(a["Q"], a["fresh"], xp),
    "project_out (2000, 34)": lambda b, la, xp, a: la.project_out(a["Q34"], a["block34"], xp),
    "regularized_inverse_h (50, 50)": lambda b, la, xp, a: la.regularized_inverse_h(a["R"], xp),
    "solve (100, 100)": lambda b, la, xp, a: b.solve(xp, a["spd"], a["square"]),
}

#: label: (method, tags) at m = NUM_MATVECS.
ESTIMATORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "xtrace": ("xtrace", ()),
    "xnystrace": ("xnystrace", ("symmetric", "positive_semidefinite")),
    "hutch++": ("hutch++", ()),
}


class _Threads:
    """``threads`` host threads for the backend during a benchmark, and both sides of
    each ratio: the call as the library runs it, and without the cap."""

    def set_threads(self, backend_name: str, threads: int) -> None:
        from linop_trace._backend import _linalg

        self.backend = get_backend(backend_name, "cpu")
        self.linalg = _linalg
        self.cap = _linalg._NUMPY_CAP
        self.restore: Callable[[], None]
        if backend_name == "numpy":
            import scipy.linalg  # noqa: F401  (loads SciPy's OpenBLAS: limited below too)
            from threadpoolctl import threadpool_limits

            limiter = threadpool_limits(limits=threads, user_api="blas")
            self.restore = limiter.restore_original_limits
        else:
            import torch

            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            self.restore = lambda: torch.set_num_threads(before)

    def teardown(self, *params: Any) -> None:
        self.linalg._NUMPY_CAP = self.cap
        self.restore()

    def sides(self, call: Callable[[], Any]) -> list[Callable[[], Any]]:
        """``[uncapped, capped]`` versions of ``call``."""
        if self.backend.name == "numpy":
            none = contextlib.nullcontext()

            def uncapped() -> Any:
                self.linalg._NUMPY_CAP = none
                try:
                    return call()
                finally:
                    self.linalg._NUMPY_CAP = self.cap

            return [uncapped, call]
        import torch

        def capped() -> Any:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return call()
            finally:
                torch.set_num_threads(threads)

        return [call, capped]

    def speedup(self) -> float:
        uncapped, capped = interleaved_best(self.calls, REPEATS)
        return uncapped / capped


def _arrays(convert: Callable[[np.ndarray], Any]) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    sketch = rng.standard_normal((SIZE, 50))
    basis = np.linalg.qr(sketch)[0]
    square = rng.standard_normal((100, 100))
    arrays = {
        "sketch": sketch,
        "Q": basis,
        "fresh": rng.standard_normal((SIZE, 25)),
        "Q34": basis[:, :34].copy(),
        "block34": rng.standard_normal((SIZE, 34)),
        "R": np.linalg.qr(rng.standard_normal((50, 50)))[1],
        "spd": square @ square.T + 100 * np.eye(100),
        "square": square,
    }
    return {name: convert(value) for name, value in arrays.items()}


class TrackSmallAlgebra(_Threads):
    """One small routine of the library: uncapped time / capped time."""

    params = (BACKENDS, list(ROUTINES), THREADS)
    param_names = ["backend", "routine", "threads"]
    timeout = 900

    def setup(self, backend_name: str, routine: str, threads: int) -> None:
        self.set_threads(backend_name, threads)
        from linop_trace import _backend
        from linop_trace.estimators import _linalg as estimator_linalg

        arrays = _arrays(self.backend.dense)
        xp = _backend.array_namespace(arrays["sketch"])
        function = ROUTINES[routine]
        self.calls = self.sides(lambda: function(_backend, estimator_linalg, xp, arrays))
        for call in self.calls:  # warm up (the cap's one scan of the loaded libraries)
            call()

    def track_speedup(self, backend_name: str, routine: str, threads: int) -> float:
        return self.speedup()

    track_speedup.unit = "uncapped time / capped time"


class TrackEstimators(_Threads):
    """A whole NumPy estimate (dense n = 2000, m = 100): uncapped time / capped time."""

    params = (["numpy"], list(ESTIMATORS), THREADS)
    param_names = ["backend", "method", "threads"]
    timeout = 900

    def setup(self, backend_name: str, method: str, threads: int) -> None:
        self.set_threads(backend_name, threads)
        from linop_trace._testing import test_matrix

        name, tags = ESTIMATORS[method]
        matrix = self.backend.dense(test_matrix("poly", SIZE, seed=0))
        operator = linop_trace.aslinearoperator(matrix, tags=tags)

        def estimate() -> Any:
            value = linop_trace.trace(operator, method=name, num_matvecs=NUM_MATVECS, seed=0)
            return self.backend.sync(value.value)

        self.calls = self.sides(estimate)
        for call in self.calls:
            call()

    def track_speedup(self, backend_name: str, method: str, threads: int) -> float:
        return self.speedup()

    track_speedup.unit = "uncapped time / capped time"


class TrackCapCost:
    """Microseconds to enter and leave the library's cap once, with 2 BLAS threads to
    cap (``threads = 1``: the check that finds nothing to change)."""

    params = [1, 2]
    param_names = ["threads"]

    def setup(self, threads: int) -> None:
        self.threads = _Threads()
        self.threads.set_threads("numpy", threads)
        from linop_trace._backend import one_blas_thread

        self.cap = one_blas_thread(np)

    def teardown(self, threads: int) -> None:
        self.threads.teardown()

    def track_microseconds(self, threads: int) -> float:
        best = float("inf")
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(1000):
                with self.cap:
                    pass
            best = min(best, (time.perf_counter() - start) / 1000)
        return best * 1e6

    track_microseconds.unit = "microseconds"
