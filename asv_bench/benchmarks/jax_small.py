"""JAX on the CPU: every estimate over one jitted product with its budget (issue 17).

The floor is what a JAX user compares against: ``jax.jit(lambda A, Z: A @ Z)`` with Z the
same number of columns m as the estimate's budget, compiled and warmed up, timed until
``block_until_ready``. Everything an estimate costs above it (dispatch of each eager
operation, probe draws, QR factorizations, the statistics) is overhead, and at small n
that overhead is most of the time.

``TrackJaxOverFloor.track_ratio`` times the estimate and the floor in one process,
interleaved (floor, estimate, floor, ...), best of 7 each, and returns estimate / floor.
``TrackJaxJittedOverFloor`` does the same with the whole call inside the user's own
``jax.jit``, the way JAX users (and the peers' documentation) run estimators: what is
left above the floor is the estimate's own compiled work (probe draws, statistics).
The issue's targets at n = 512, m = 20: Hutchinson <= 1.2x, every method <= 2x. The same
is measured at n = 200, m = 20 (fixed costs dominate) and at n = 4,000, m = 100 (the
products dominate).

The operator: ``_common.dense_psd(n)``, dense float64 (JAX with x64 enabled) symmetric
positive definite with a flat spectrum, one thread. XNysTrace gets it tagged
``("symmetric", "positive_semidefinite")``; the other methods get it untagged. ``auto``
on the stored array reads the stored diagonal (exact, no products); ``auto (products
only)`` gets the same matrix behind ``LinearOperator.from_callable``, so it estimates.
The cases "(a new seed each call)" pass seeds 0, 1, 2, ... as a user's loop does; the
others pass seed 0 at every call. "(a new array each call)" passes eight arrays of the
same shape and dtype in turn (as a training loop passes its next matrix), and its floor
multiplies the same eight in turn.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

import linop_trace

from ._common import (
    dense_psd,
    get_backend,
    interleaved_best,
    pin_threads,
    require_method,
    sync_estimate,
)

#: n -> the budget m (the issue's sizes).
BUDGETS = {200: 20, 512: 20, 4000: 100}

PSD = ("symmetric", "positive_semidefinite")

#: label: (quantity, method, operator); operator "plain" (the dense array's operator, made
#: once), "array" (the JAX array itself, as most users pass it: an operator is made at
#: every call), "psd" (tagged symmetric positive semidefinite), "products only" (behind
#: from_callable) or "jitted function" (behind from_callable, the function ``jax.jit``-ed).
CASES: dict[str, tuple[str, str, str]] = {
    "hutchinson": ("trace", "hutchinson", "plain"),
    "hutchinson (the array)": ("trace", "hutchinson", "array"),
    "hutchinson (a new array each call)": ("trace", "hutchinson", "new array"),
    "hutchinson (a new seed each call)": ("trace", "hutchinson", "plain"),
    "hutch++": ("trace", "hutch++", "plain"),
    "na-hutch++": ("trace", "na-hutch++", "plain"),
    "xtrace": ("trace", "xtrace", "plain"),
    "xtrace (the array)": ("trace", "xtrace", "array"),
    "xtrace (a new seed each call)": ("trace", "xtrace", "plain"),
    "xnystrace": ("trace", "xnystrace", "psd"),
    "auto": ("trace", "auto", "plain"),
    "hutchinson (products only)": ("trace", "hutchinson", "products only"),
    "hutchinson (a jitted function)": ("trace", "hutchinson", "jitted function"),
    "xtrace (a jitted function)": ("trace", "xtrace", "jitted function"),
    "auto (a jitted function)": ("trace", "auto", "jitted function"),
    "auto (products only)": ("trace", "auto", "products only"),
    "diagonal hutchinson": ("diagonal", "hutchinson", "plain"),
    "diag++": ("diagonal", "diag++", "plain"),
    "xdiag": ("diagonal", "xdiag", "plain"),
    "diagonal auto": ("diagonal", "auto", "plain"),
    "diagonal auto (products only)": ("diagonal", "auto", "products only"),
}


#: Cases whose estimates take seed 0, 1, 2, ... (a loop over seeds, as in a training loop
#: or a study of the estimator's spread); the others take seed 0 at every call.
NEW_SEED_EACH_CALL = {case for case in CASES if case.endswith("(a new seed each call)")}


def _operator(A: Any, kind: str) -> Any:
    """The estimate's operator over the JAX array ``A`` (see ``CASES``)."""
    if kind in ("array", "new array"):
        return A
    if kind == "products only":
        return linop_trace.LinearOperator.from_callable(
            matmat=lambda X: A @ X, shape=A.shape, like=A
        )
    if kind == "jitted function":
        import jax

        return linop_trace.LinearOperator.from_callable(
            matmat=jax.jit(lambda X: A @ X), shape=A.shape, like=A
        )
    return linop_trace.aslinearoperator(A, tags=PSD if kind == "psd" else ())


def _matrices() -> dict[int, np.ndarray]:
    """The test matrices, built once per asv run (n = 4,000 takes ~10 s on one core)."""
    return {n: dense_psd(n) for n in BUDGETS}


_matrices.timeout = 300  # type: ignore[attr-defined]


class _JaxAgainstFloor:
    params = (list(BUDGETS), list(CASES))
    param_names = ["n", "case"]
    timeout = 300
    setup_cache = staticmethod(_matrices)

    def setup(self, matrices: dict[int, np.ndarray], n: int, case: str) -> None:
        pin_threads()  # first: JAX must see one CPU before it creates its client
        backend = get_backend("jax", "cpu")  # (enables float64)
        import jax

        quantity, method, kind = CASES[case]
        require_method(method, quantity)
        self.backend = backend
        self.num_matvecs = BUDGETS[n]
        A = backend.dense(matrices[n])
        self.operator = _operator(A, kind)
        # "new array": eight arrays of A's layout in turn, for the floor too (the next
        # matrix of a training loop; none is in the cache when its product starts)
        arrays = [A * (1 + i / 100) for i in range(8)] if kind == "new array" else [A]
        turns = itertools.cycle(arrays)
        self.function = getattr(linop_trace, quantity)
        self.method = method
        self.seeds = itertools.count() if case in NEW_SEED_EACH_CALL else itertools.repeat(0)
        product = jax.jit(lambda A, Z: A @ Z)
        Z = backend.dense(
            2.0 * np.random.default_rng(1).integers(0, 2, size=(n, self.num_matvecs)) - 1.0
        )
        self.floor_call = lambda: product(next(turns), Z).block_until_ready()
        self.next_operator = (lambda: next(turns)) if kind == "new array" else None
        self.floor_call()  # compile
        self.estimate_call()  # warm up (JAX's per-shape compilation of each operation)
        function, method, budget = self.function, self.method, self.num_matvecs

        @jax.jit
        def inside(matrix: Any, key: Any) -> Any:  # the whole call in the user's jit
            operator = _operator(matrix, kind)
            return function(operator, method=method, num_matvecs=budget, seed=key).value

        key = jax.random.key(0)
        self.jitted_call = lambda: inside(A, key).block_until_ready()
        self.jitted_call()  # compile

    def estimate_call(self) -> Any:
        operator = self.operator if self.next_operator is None else self.next_operator()
        estimate = self.function(
            operator, method=self.method, num_matvecs=self.num_matvecs, seed=next(self.seeds)
        )
        return sync_estimate(self.backend, estimate)


class TrackJaxOverFloor(_JaxAgainstFloor):
    """Estimate time / jitted ``A @ Z`` time, interleaved, best of 7 each."""

    def track_ratio(self, matrices: dict[int, np.ndarray], n: int, case: str) -> float:
        floor, estimate = interleaved_best([self.floor_call, self.estimate_call])
        return estimate / floor

    track_ratio.unit = "estimate time / jitted A @ Z time"


class TrackJaxJittedOverFloor(_JaxAgainstFloor):
    """The same estimate called inside the user's own ``jax.jit`` (as traceax and matfree
    are used: ``jax.jit(lambda A, key: trace(A, ..., seed=key).value)``), over the floor:
    the compiled program alone, without the eager call's Python and dispatch."""

    def track_ratio(self, matrices: dict[int, np.ndarray], n: int, case: str) -> float:
        floor, estimate = interleaved_best([self.floor_call, self.jitted_call])
        return estimate / floor

    track_ratio.unit = "jitted estimate time / jitted A @ Z time"


class TimeJaxEstimate(_JaxAgainstFloor):
    """The estimate alone, as a plain asv timing, for history (n = 512, the target's size;
    every JAX benchmark process pays seconds of import and compilation)."""

    params = ([512], list(CASES))
    repeat = (1, 5, 5.0)

    def time_estimate(self, matrices: dict[int, np.ndarray], n: int, case: str) -> None:
        self.estimate_call()


class TimeJaxFloor:
    """The floor alone (jitted ``A @ Z`` with the budget's m columns), for history."""

    params = [list(BUDGETS)]
    param_names = ["n"]
    setup_cache = staticmethod(_matrices)

    def setup(self, matrices: dict[int, np.ndarray], n: int) -> None:
        pin_threads()
        backend = get_backend("jax", "cpu")
        import jax

        self.A = backend.dense(matrices[n])
        self.Z = backend.dense(
            2.0 * np.random.default_rng(1).integers(0, 2, size=(n, BUDGETS[n])) - 1.0
        )
        self.product = jax.jit(lambda A, Z: A @ Z)
        self.time_floor(matrices, n)

    def time_floor(self, matrices: dict[int, np.ndarray], n: int) -> None:
        self.product(self.A, self.Z).block_until_ready()


#: What a fresh process runs for :class:`TrackJaxAdaptiveCompiles`: the first adaptive
#: estimate on a 300 x 300 operator known by a callable, counting XLA's backend compiles
#: and their seconds (JAX's monitoring events), then printing them as JSON.
_ADAPTIVE_FIRST_CALL = """
import json, sys
import jax
import jax.monitoring
import numpy as np
jax.config.update("jax_enable_x64", True)
import linop_trace
from linop_trace._testing import test_matrix
compiles = []
def listen(event, seconds, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        compiles.append(seconds)
jax.monitoring.register_event_duration_secs_listener(listen)
A = jax.numpy.asarray(test_matrix("flat", 300, seed=0))
operator = linop_trace.LinearOperator.from_callable(matmat=lambda X: A @ X, shape=A.shape, like=A)
function = getattr(linop_trace, sys.argv[1])
rtol = {"trace": 2e-3, "diagonal": 5e-2}[sys.argv[1]]
function(operator, method="hutchinson", num_matvecs=10, rtol=rtol, max_matvecs=5000, seed=0).value
print(json.dumps({"compiles": len(compiles), "seconds": sum(compiles)}))
"""


class TrackJaxAdaptiveCompiles:
    """An adaptive estimate under JAX (``rtol=``) cannot be one compiled program: it reads
    its stopping rule on the host every round, and its block doubles every round. Every
    new block width and sample count compiles its programs anew, and a program with a
    threefry draw takes 0.3 - 1 s to compile on a CPU, so the first call is dominated by
    compilation (9 - 10 s for the trace before the draws came in chunks of the first
    width). Measured in a fresh process (one per sample): the number of XLA backend
    compiles of the first ``trace``/``diagonal(..., method="hutchinson", rtol=...)`` on a
    300 x 300 operator known by a callable, and the seconds they took."""

    params = (["trace", "diagonal"],)
    param_names = ["quantity"]
    timeout = 300
    number = 1
    repeat = 1

    def setup(self, quantity: str) -> None:
        import importlib.util
        import json
        import os
        import subprocess
        import sys

        if importlib.util.find_spec("jax") is None:
            raise NotImplementedError("jax is not installed")
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        done = subprocess.run(
            [sys.executable, "-c", _ADAPTIVE_FIRST_CALL, quantity],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=280,
        )
        self.result = json.loads(done.stdout.strip().splitlines()[-1])

    def track_compiles(self, quantity: str) -> int:
        return int(self.result["compiles"])

    track_compiles.unit = "XLA compiles in the first call"  # type: ignore[attr-defined]

    def track_compile_seconds(self, quantity: str) -> float:
        return float(self.result["seconds"])

    track_compile_seconds.unit = "seconds compiling in the first call"  # type: ignore[attr-defined]
