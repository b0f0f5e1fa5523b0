"""Our estimates against the peer libraries' at equal budgets, side by side (issue 17).

Each cell is ours / peer: the time of ``linop_trace.trace`` (or ``diagonal``) over the
time of the peer's estimator for the same quantity, with the same number of operator
applications and the same kind of probes, on the same matrix in the same library, timed
in one process, interleaved (peer, ours, peer, ...), best of 7 each, one thread. The
target is ours / peer <= 1.0 in every cell.

The peers, each optional (a cell whose peer is not installed is ``n/a``; ``pip install
-c constraints.txt -e ".[peers]"`` installs them all):

* traceax (JAX, on lineax operators): ``HutchinsonEstimator``, ``HutchPlusPlusEstimator``,
  ``XTraceEstimator``, ``XNysTraceEstimator``.
* matfree (JAX): ``matfree.stochtrace``'s Monte Carlo trace and diagonal (with their
  standard error, as ours reports one), and its leave-one-out XTrace, XNysTrace and XDiag.
* curvlinops (torch): ``hutchinson_trace``, ``hutchpp_trace``, ``xtrace``,
  ``hutchinson_diag``, ``xdiag``.

The JAX peers run as their documentation shows them: the whole estimator under
``jax.jit``, with the matrix an argument of the compiled function (not a constant folded
into it), compiled before timing. Ours runs as a user calls it, on the JAX or torch array
(``TrackOursOverPeer``), and for the JAX rows also inside the user's own ``jax.jit``, as
the peer runs (``TrackOursJittedOverPeer``).

Budgets: m = 100 at n = 4,000 and m = 20 at n = 200, dense float64 symmetric positive
definite (``_common.dense_psd``); Hutch++ rows use 3 * (m // 3) on both sides (traceax
spends that many, curvlinops requires a multiple of 3). Probes: each row gives ours the
peer's probe kind (traceax and matfree: Rademacher for Hutchinson, Hutch++ and XDiag,
sphere for XTrace and XNysTrace; curvlinops: Rademacher everywhere). XNysTrace gets the
matrix tagged symmetric positive semidefinite on both sides (lineax's tag for traceax);
every other row gets it untagged, so ours and the peer both run the general algorithm
(XDiag with an adjoint product).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import linop_trace

from ._common import dense_psd, get_backend, interleaved_best, pin_threads, require_method

#: n -> the budget m (the issue's sizes).
BUDGETS = {200: 20, 4000: 100}

PSD = ("symmetric", "positive_semidefinite")


@dataclass(frozen=True)
class Cell:
    """One row of the table: the peer's library and estimator against our method."""

    peer: str  # the distribution's import name
    library: str  # the array library both sides run on
    quantity: str  # "trace" or "diagonal"
    method: str  # ours
    probe: str  # ours, the peer's kind of probe
    multiple_of: int = 1  # the budget rounded down to a multiple of this


CELLS = {
    "traceax hutchinson": Cell("traceax", "jax", "trace", "hutchinson", "rademacher"),
    "traceax hutch++": Cell("traceax", "jax", "trace", "hutch++", "rademacher", 3),
    "traceax xtrace": Cell("traceax", "jax", "trace", "xtrace", "sphere", 2),
    "traceax xnystrace": Cell("traceax", "jax", "trace", "xnystrace", "sphere"),
    "matfree hutchinson": Cell("matfree", "jax", "trace", "hutchinson", "rademacher"),
    "matfree xtrace": Cell("matfree", "jax", "trace", "xtrace", "sphere", 2),
    "matfree xnystrace": Cell("matfree", "jax", "trace", "xnystrace", "sphere"),
    "matfree diagonal hutchinson": Cell("matfree", "jax", "diagonal", "hutchinson", "rademacher"),
    "matfree xdiag": Cell("matfree", "jax", "diagonal", "xdiag", "rademacher", 2),
    "curvlinops hutchinson": Cell("curvlinops", "torch", "trace", "hutchinson", "rademacher"),
    "curvlinops hutch++": Cell("curvlinops", "torch", "trace", "hutch++", "rademacher", 3),
    "curvlinops xtrace": Cell("curvlinops", "torch", "trace", "xtrace", "rademacher", 2),
    "curvlinops diagonal hutchinson": Cell(
        "curvlinops", "torch", "diagonal", "hutchinson", "rademacher"
    ),
    "curvlinops xdiag": Cell("curvlinops", "torch", "diagonal", "xdiag", "rademacher", 2),
}


def _matrices() -> dict[int, np.ndarray]:
    """The test matrices, built once per asv run (n = 4,000 takes ~10 s on one core)."""
    return {n: dense_psd(n) for n in BUDGETS}


_matrices.timeout = 300  # type: ignore[attr-defined]


# ------------------------------------------------------------------ the peers' calls


def _traceax(label: str, A: Any, budget: int) -> Callable[[], Any]:
    import jax
    import lineax as lx
    import traceax as tx

    estimators = {
        "traceax hutchinson": tx.HutchinsonEstimator(),
        "traceax hutch++": tx.HutchPlusPlusEstimator(),
        "traceax xtrace": tx.XTraceEstimator(),
        "traceax xnystrace": tx.XNysTraceEstimator(),
    }
    estimator = estimators[label]
    tags = (lx.symmetric_tag, lx.positive_semidefinite_tag) if "xnystrace" in label else ()

    @jax.jit
    def estimate(key: Any, matrix: Any) -> Any:
        return estimator.estimate(key, lx.MatrixLinearOperator(matrix, tags), budget)

    key = jax.random.key(0)
    return lambda: jax.block_until_ready(estimate(key, A))


def _matfree(label: str, A: Any, budget: int) -> Callable[[], Any]:
    import jax
    import jax.numpy as jnp
    from matfree import stochtrace

    like = jnp.zeros(A.shape[0], dtype=A.dtype)
    if label == "matfree hutchinson":
        estimate = stochtrace.estimator_monte_carlo_mean_and_sem(
            stochtrace.monte_carlo_trace(), stochtrace.sampler_signs(like, num=budget)
        )
    elif label == "matfree diagonal hutchinson":
        estimate = stochtrace.estimator_monte_carlo_mean_and_sem(
            stochtrace.monte_carlo_diagonal(), stochtrace.sampler_signs(like, num=budget)
        )
    elif label == "matfree xtrace":  # two products of m / 2 columns
        estimate = stochtrace.estimator_leave_one_out_mean_and_sem(
            stochtrace.leave_one_out_xtrace(), stochtrace.sampler_sphere(like, num=budget // 2)
        )
    elif label == "matfree xnystrace":  # one product of m columns
        estimate = stochtrace.estimator_leave_one_out_mean_and_sem(
            stochtrace.leave_one_out_xnystrace(), stochtrace.sampler_sphere(like, num=budget)
        )
    elif label == "matfree xdiag":  # A Omega and A^T Q, m / 2 columns each
        estimate = stochtrace.estimator_leave_one_out_mean_and_sem(
            stochtrace.leave_one_out_xdiag(), stochtrace.sampler_signs(like, num=budget // 2)
        )
    else:
        raise ValueError(label)

    def matvec(vector: Any, matrix: Any) -> Any:
        return matrix @ vector

    compiled = jax.jit(lambda key, matrix: estimate(matvec, key, matrix))
    key = jax.random.key(0)
    return lambda: jax.block_until_ready(compiled(key, A))


def _curvlinops(label: str, A: Any, budget: int) -> Callable[[], Any]:
    import curvlinops

    functions = {
        "curvlinops hutchinson": curvlinops.hutchinson_trace,
        "curvlinops hutch++": curvlinops.hutchpp_trace,
        "curvlinops xtrace": curvlinops.xtrace,
        "curvlinops diagonal hutchinson": curvlinops.hutchinson_diag,
        "curvlinops xdiag": curvlinops.xdiag,
    }
    function = functions[label]
    return lambda: function(A, num_matvecs=budget)  # torch on the CPU: synchronous


PEERS = {"traceax": _traceax, "matfree": _matfree, "curvlinops": _curvlinops}


# ------------------------------------------------------------------------ benchmarks


class _OursAgainstPeer:
    params = (list(BUDGETS), list(CELLS))
    param_names = ["n", "cell"]
    timeout = 300
    setup_cache = staticmethod(_matrices)

    def setup(self, matrices: dict[int, np.ndarray], n: int, label: str) -> None:
        pin_threads()  # first: JAX must see one CPU before it creates its client
        cell = CELLS[label]
        if importlib.util.find_spec(cell.peer) is None:
            raise NotImplementedError(f"{cell.peer} is not installed")
        require_method(cell.method, cell.quantity)
        backend = get_backend(cell.library, "cpu")
        pin_threads()  # (again: torch was just imported)
        self.backend = backend
        budget = BUDGETS[n] - BUDGETS[n] % cell.multiple_of
        A = backend.dense(matrices[n])
        tags = PSD if cell.method == "xnystrace" else ()
        operator = linop_trace.aslinearoperator(A, tags=tags)
        function = getattr(linop_trace, cell.quantity)

        def ours() -> Any:
            estimate = function(
                operator, method=cell.method, num_matvecs=budget, seed=0, probe=cell.probe
            )
            return backend.sync(estimate.value)

        self.ours = ours
        self.ours_jitted = None
        if cell.library == "jax":
            import jax

            @jax.jit
            def inside(matrix: Any, key: Any) -> Any:  # as the peer runs: one jitted call
                operator = linop_trace.aslinearoperator(matrix, tags=tags)
                estimate = function(
                    operator, method=cell.method, num_matvecs=budget, seed=key, probe=cell.probe
                )
                return estimate.value

            key = jax.random.key(0)
            self.ours_jitted = lambda: inside(A, key).block_until_ready()
            self.ours_jitted()  # compile
        self.peer = PEERS[cell.peer](label, A, budget)
        self.peer()  # compile the peer's program, warm up ours
        self.ours()


class TrackOursOverPeer(_OursAgainstPeer):
    """Our time / the peer's, interleaved, best of 7 each (target <= 1.0)."""

    def track_ratio(self, matrices: dict[int, np.ndarray], n: int, label: str) -> float:
        peer, ours = interleaved_best([self.peer, self.ours])
        return ours / peer

    track_ratio.unit = "our time / peer time"


class TrackOursJittedOverPeer(_OursAgainstPeer):
    """JAX rows only: our whole call inside the user's ``jax.jit``, exactly as the peer's
    estimator runs, over the peer's time (target <= 1.0). The eager row above adds our
    Python and dispatch, a fixed cost per call that matters at small n."""

    def setup(self, matrices: dict[int, np.ndarray], n: int, label: str) -> None:
        if CELLS[label].library != "jax":
            raise NotImplementedError("not a JAX row")
        super().setup(matrices, n, label)

    def track_ratio(self, matrices: dict[int, np.ndarray], n: int, label: str) -> float:
        peer, ours = interleaved_best([self.peer, self.ours_jitted])
        return ours / peer

    track_ratio.unit = "our jitted time / peer time"


class TimePeers(_OursAgainstPeer):
    """The two sides as plain asv timings, for history: whether a ratio moved with ours or
    with a new release of the peer (n = 4,000 only, to keep the module to minutes)."""

    params = ([4000], list(CELLS))
    repeat = (1, 5, 5.0)

    def time_ours(self, matrices: dict[int, np.ndarray], n: int, label: str) -> None:
        self.ours()

    def time_peer(self, matrices: dict[int, np.ndarray], n: int, label: str) -> None:
        self.peer()
