"""Trace estimation compared with other libraries (issue 22): the numbers of docs/comparison.rst.

Same problems, equal budgets, one thread. The problems are the six test spectra of
``linop_trace._testing`` (``test_matrix(spectrum, 1000, seed=0)``: flat, poly, slowexp,
fastexp, smallstep, bigstep), dense float64 n = 1,000; each library gets the matrix in its
own array type (ours: the NumPy array; traceax and matfree: a JAX array; curvlinops: a
torch tensor). Every library runs with its own default probes; a method's budget is the
same on every side (Hutch++: 3 * (m // 3), XTrace: 2 * (m // 2), as curvlinops requires).
XNysTrace gets the matrix declared symmetric positive semidefinite (ours: the tags;
traceax: lineax's tags; matfree's XNysTrace assumes it).

* :func:`accuracy`: relative error ``|est - tr| / |tr|`` over ``NUM_SEEDS`` probe seeds
  at m = 20, 100, 300, and whether the reported 95% interval held the true trace. Ours:
  ``Estimate.ci(0.95)``; traceax (XTrace, XNysTrace: ``info["std.err"]``) and matfree (its
  standard error): value +- 1.96 standard errors; the others report no interval.
* :func:`time_over_floor`: at m = 100, the estimator's time over the time of its budget's
  products (one ``A @ Z`` with the budget's columns, in the same library; jitted for JAX),
  interleaved (floor, estimator, ...), best of 3 each.
* :func:`indefinite`: XNysTrace (PSD only) given an indefinite operator declared PSD:
  whether each library raises (which exception) or returns a number (its error).

Peers are optional; a peer that is not installed gives ``n/a`` (``NotImplementedError``
in ``setup``). ``tools/comparison_page.py`` calls these functions directly and writes the
page.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import math
from collections.abc import Callable
from typing import Any

import numpy as np

import linop_trace
from linop_trace._testing import SPECTRA, eigenvalues, haar_orthogonal, test_matrix

from ._common import interleaved_best, pin_threads

SIZE = 1000
BUDGETS = (20, 100, 300)
NUM_SEEDS = 20
TIME_BUDGET = 100
TIME_REPEATS = 3
#: Normal quantile of a two-sided 95% interval (for peers that report a standard error).
Z95 = 1.959963984540054
PSD = ("symmetric", "positive_semidefinite")
OURS = "linop_trace"
PEERS = ("traceax", "matfree", "curvlinops")

#: (library, method) rows; a library with no such estimator has no row.
ROWS = (
    (OURS, "hutchinson"),
    (OURS, "hutch++"),
    (OURS, "xtrace"),
    (OURS, "xnystrace"),
    ("traceax", "hutchinson"),
    ("traceax", "hutch++"),
    ("traceax", "xtrace"),
    ("traceax", "xnystrace"),
    ("matfree", "hutchinson"),
    ("matfree", "xtrace"),
    ("matfree", "xnystrace"),
    ("curvlinops", "hutchinson"),
    ("curvlinops", "hutch++"),
    ("curvlinops", "xtrace"),
)
LABELS = [f"{library} {method}" for library, method in ROWS]

#: Indefinite test operators (n = 1,000, Haar eigenvectors, seed 0):
#: ``alternating``: eigenvalues (-1)^i (i + 1)^-2 (the largest is negative);
#: ``shifted``: linspace(-1, 3, n) (a quarter of the eigenvalues negative, none dominant).
INDEFINITE = ("alternating", "shifted")
INDEFINITE_ROWS = ((OURS, "xnystrace"), ("traceax", "xnystrace"), ("matfree", "xnystrace"))


def available(library: str) -> bool:
    """Whether ``library`` (and the array library it runs on) is installed."""
    needs = {OURS: [], "traceax": ["jax", "lineax"], "matfree": ["jax"], "curvlinops": ["torch"]}
    names = [library, *needs[library]] if library != OURS else []
    return all(importlib.util.find_spec(name) is not None for name in names)


def version(library: str) -> str | None:
    """The installed version of ``library`` (its distribution), or None."""
    distribution = {OURS: "linop_trace", "curvlinops": "curvlinops-for-pytorch"}.get(
        library, library
    )
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def budget(method: str, m: int) -> int:
    """The method's budget at m: what every library can spend exactly."""
    if method == "hutch++":
        return 3 * (m // 3)
    if method == "xtrace":
        return 2 * (m // 2)
    return m


def indefinite_matrix(name: str, n: int = SIZE) -> np.ndarray:
    """One of :data:`INDEFINITE` (symmetric, not PSD)."""
    if name == "alternating":
        values = eigenvalues("poly", n) * (-1.0) ** np.arange(n)
    elif name == "shifted":
        values = np.linspace(-1.0, 3.0, n)
    else:
        raise ValueError(name)
    q = haar_orthogonal(n, np.random.default_rng(0))
    a = (q * values) @ q.T
    return (a + a.T) / 2


# ------------------------------------------------------------------ the libraries' calls
# estimator(library, method, m) -> f(matrix in the library's array type, seed)
#                                   -> (value, standard error or None)


def convert(library: str, A: np.ndarray) -> Any:
    """``A`` in the array type the library works on."""
    if library == OURS:
        return A
    if library in ("traceax", "matfree"):
        import jax

        jax.config.update("jax_enable_x64", True)
        return jax.numpy.asarray(A)
    if library == "curvlinops":
        import torch

        return torch.as_tensor(A)
    raise ValueError(library)


@functools.cache
def estimator(library: str, method: str, m: int) -> Callable[[Any, int], tuple[float, Any]]:
    """The library's estimate of ``method`` with budget ``m``, as a function of (A, seed)."""
    if not available(library):
        raise NotImplementedError(f"{library} is not installed")
    k = budget(method, m)
    return {OURS: _ours, "traceax": _traceax, "matfree": _matfree, "curvlinops": _curvlinops}[
        library
    ](method, k)


def _ours(method: str, k: int) -> Callable[[Any, int], tuple[float, Any]]:
    def run(A: Any, seed: int) -> tuple[float, Any]:
        operator = linop_trace.aslinearoperator(A, tags=PSD) if method == "xnystrace" else A
        estimate = linop_trace.trace(operator, method=method, num_matvecs=k, seed=seed)
        low, high = estimate.ci(0.95)
        return float(estimate.value), (float(low), float(high))

    return run


def _interval(value: float, stderr: Any) -> tuple[float, float] | None:
    if stderr is None:
        return None
    return value - Z95 * float(stderr), value + Z95 * float(stderr)


def _traceax(method: str, k: int) -> Callable[[Any, int], tuple[float, Any]]:
    import jax
    import lineax as lx
    import traceax as tx

    estimator = {
        "hutchinson": tx.HutchinsonEstimator,
        "hutch++": tx.HutchPlusPlusEstimator,
        "xtrace": tx.XTraceEstimator,
        "xnystrace": tx.XNysTraceEstimator,
    }[method]()
    tags = (lx.symmetric_tag, lx.positive_semidefinite_tag) if method == "xnystrace" else ()

    @jax.jit
    def compiled(key: Any, matrix: Any) -> Any:
        value, info = estimator.estimate(key, lx.MatrixLinearOperator(matrix, tags), k)
        return value, info.get("std.err")

    def run(A: Any, seed: int) -> tuple[float, Any]:
        value, stderr = compiled(jax.random.key(seed), A)
        value = float(value)
        return value, _interval(value, stderr)

    return run


def _matfree(method: str, k: int) -> Callable[[Any, int], tuple[float, Any]]:
    import jax
    import jax.numpy as jnp
    from matfree import stochtrace

    like = jnp.zeros(SIZE, dtype=jnp.float64)
    if method == "hutchinson":
        estimate = stochtrace.estimator_monte_carlo_mean_and_sem(
            stochtrace.monte_carlo_trace(), stochtrace.sampler_normal(like, num=k)
        )
    elif method == "xtrace":  # two products of k / 2 columns
        estimate = stochtrace.estimator_leave_one_out_mean_and_sem(
            stochtrace.leave_one_out_xtrace(), stochtrace.sampler_sphere(like, num=k // 2)
        )
    elif method == "xnystrace":  # one product of k columns
        estimate = stochtrace.estimator_leave_one_out_mean_and_sem(
            stochtrace.leave_one_out_xnystrace(), stochtrace.sampler_sphere(like, num=k)
        )
    else:
        raise NotImplementedError(f"matfree has no {method}")

    def matvec(vector: Any, matrix: Any) -> Any:
        return matrix @ vector

    compiled = jax.jit(lambda key, matrix: estimate(matvec, key, matrix))

    def run(A: Any, seed: int) -> tuple[float, Any]:
        value, stderr = compiled(jax.random.key(seed), A)
        value = float(value)
        return value, _interval(value, stderr)

    return run


def _curvlinops(method: str, k: int) -> Callable[[Any, int], tuple[float, Any]]:
    import curvlinops
    import torch

    function = {
        "hutchinson": curvlinops.hutchinson_trace,
        "hutch++": curvlinops.hutchpp_trace,
        "xtrace": curvlinops.xtrace,
    }.get(method)
    if function is None:
        raise NotImplementedError(f"curvlinops has no {method}")

    def run(A: Any, seed: int) -> tuple[float, Any]:
        torch.manual_seed(seed)  # curvlinops draws from torch's global generator
        return float(function(A, num_matvecs=k)), None

    return run


# ------------------------------------------------------------------------ measurements


def accuracy(
    rows: tuple[tuple[str, str], ...] = ROWS,
    spectra: tuple[str, ...] = SPECTRA,
    budgets: tuple[int, ...] = BUDGETS,
    num_seeds: int = NUM_SEEDS,
    n: int = SIZE,
) -> dict[str, Any]:
    """``{"label|spectrum|m": {"median", "coverage" (None: no interval), "seeds"}}``."""
    pin_threads()
    out: dict[str, Any] = {}
    for spectrum in spectra:
        A = test_matrix(spectrum, n, seed=0)
        truth = float(np.trace(A))
        converted: dict[str, Any] = {}
        for library, method in rows:
            if not available(library):
                continue
            if library not in converted:
                converted[library] = convert(library, A)
                pin_threads()  # (torch may just have been imported)
            for m in budgets:
                run = estimator(library, method, m)
                errors, covered, intervals = [], 0, 0
                for seed in range(num_seeds):
                    value, interval = run(converted[library], seed)
                    errors.append(abs(value - truth) / abs(truth))
                    if interval is not None:
                        intervals += 1
                        covered += int(interval[0] <= truth <= interval[1])
                out[f"{library} {method}|{spectrum}|{m}"] = {
                    "median": float(np.median(errors)),
                    "coverage": covered / intervals if intervals else None,
                    "seeds": num_seeds,
                    "budget": budget(method, m),
                }
    return out


def _floor(library: str, A: Any, k: int) -> Callable[[], Any]:
    """The budget's products in ``library``: one ``A @ Z`` with ``k`` columns."""
    if library == OURS:
        Z = np.random.default_rng(0).standard_normal((A.shape[0], k))
        return lambda: A @ Z
    if library in ("traceax", "matfree"):
        import jax

        Z = jax.random.normal(jax.random.key(0), (A.shape[0], k), dtype=A.dtype)
        product = jax.jit(lambda matrix, block: matrix @ block)
        return lambda: product(A, Z).block_until_ready()
    import torch

    Z = torch.randn(A.shape[0], k, dtype=A.dtype, generator=torch.Generator().manual_seed(0))
    return lambda: A @ Z


def time_over_floor(
    rows: tuple[tuple[str, str], ...] = ROWS,
    m: int = TIME_BUDGET,
    n: int = SIZE,
    repeats: int = TIME_REPEATS,
) -> dict[str, Any]:
    """``{label: {"seconds", "floor_seconds", "ratio"}}`` at budget m, flat spectrum."""
    pin_threads()
    A = test_matrix("flat", n, seed=0)
    out: dict[str, Any] = {}
    for library, method in rows:
        if not available(library):
            continue
        matrix = convert(library, A)
        pin_threads()
        run = estimator(library, method, m)
        floor = _floor(library, matrix, budget(method, m))
        run(matrix, 0)  # compile (JAX) and warm up
        floor()
        floor_seconds, seconds = interleaved_best(
            [floor, functools.partial(run, matrix, 0)], repeats=repeats
        )
        out[f"{library} {method}"] = {
            "seconds": seconds,
            "floor_seconds": floor_seconds,
            "ratio": seconds / floor_seconds,
        }
    return out


def indefinite(
    rows: tuple[tuple[str, str], ...] = INDEFINITE_ROWS,
    operators: tuple[str, ...] = INDEFINITE,
    m: int = TIME_BUDGET,
    num_seeds: int = NUM_SEEDS,
) -> dict[str, Any]:
    """``{"label|operator": {"raised", "nonfinite", "exceptions", "median"}}`` (the median
    relative error of the finite values returned)."""
    pin_threads()
    out: dict[str, Any] = {}
    for name in operators:
        A = indefinite_matrix(name)
        truth = float(np.trace(A))
        for library, method in rows:
            if not available(library):
                continue
            matrix = convert(library, A)
            run = estimator(library, method, m)
            errors, exceptions, nonfinite = [], {}, 0
            for seed in range(num_seeds):
                try:
                    value, _ = run(matrix, seed)
                except Exception as error:  # noqa: BLE001 (recording what each library does)
                    kind = f"{type(error).__module__}.{type(error).__name__}"
                    exceptions.setdefault(kind, str(error).splitlines()[0][:160])
                    continue
                if math.isfinite(value):
                    errors.append(abs(value - truth) / abs(truth))
                else:
                    nonfinite += 1
            out[f"{library} {method}|{name}"] = {
                "raised": num_seeds - len(errors) - nonfinite,
                "nonfinite": nonfinite,
                "seeds": num_seeds,
                "exceptions": exceptions,
                "median": float(np.median(errors)) if errors else None,
                "trace": truth,
            }
    return out


# ------------------------------------------------------------------------ benchmarks


def _require(label: str) -> None:
    library = label.split()[0]
    if not available(library):
        raise NotImplementedError(f"{library} is not installed")


class TrackAccuracy:
    """Median relative error over NUM_SEEDS seeds, and 95%-interval coverage (n/a: no
    interval), per spectrum, row and m."""

    params = (list(SPECTRA), LABELS, list(BUDGETS))
    param_names = ["spectrum", "row", "m"]
    timeout = 900

    def setup_cache(self) -> dict[str, Any]:
        return accuracy()

    def setup(self, cache: dict[str, Any], spectrum: str, row: str, m: int) -> None:
        _require(row)
        self.result = cache[f"{row}|{spectrum}|{m}"]

    def track_median_relative_error(
        self, cache: dict[str, Any], spectrum: str, row: str, m: int
    ) -> float:
        return self.result["median"]

    track_median_relative_error.unit = "relative error"

    def track_coverage_95(self, cache: dict[str, Any], spectrum: str, row: str, m: int) -> float:
        if self.result["coverage"] is None:
            raise NotImplementedError("no interval reported")
        return self.result["coverage"]

    track_coverage_95.unit = "fraction"


class TrackTimeOverFloor:
    """The estimator's time over its budget's products at m = 100, interleaved, best of 3."""

    params = (LABELS,)
    param_names = ["row"]
    timeout = 300

    def setup(self, row: str) -> None:
        _require(row)
        library, method = row.split()
        self.result = time_over_floor(rows=((library, method),))[row]

    def track_ratio(self, row: str) -> float:
        return self.result["ratio"]

    track_ratio.unit = "time / floor"


class TrackIndefinite:
    """XNysTrace on an indefinite operator declared PSD, over NUM_SEEDS seeds at m = 100:
    how many seeds raised, and the median relative error of the values returned."""

    params = (list(INDEFINITE), [f"{library} {method}" for library, method in INDEFINITE_ROWS])
    param_names = ["operator", "row"]
    timeout = 300

    def setup(self, operator: str, row: str) -> None:
        _require(row)
        library, method = row.split()
        self.result = indefinite(rows=((library, method),), operators=(operator,))[
            f"{row}|{operator}"
        ]

    def track_raised_fraction(self, operator: str, row: str) -> float:
        return self.result["raised"] / self.result["seeds"]

    track_raised_fraction.unit = "fraction of seeds"

    def track_median_relative_error(self, operator: str, row: str) -> float:
        if self.result["median"] is None:
            raise NotImplementedError("raised on every seed")
        return self.result["median"]

    track_median_relative_error.unit = "relative error"
