"""The commands on a symmetric matrix file (``logdet``, ``spectrum``, ``eigs``): the file read
and checked to be symmetric, Lanczos run on it behind the progress bar, a report out.

The library's spectral functions take no progress callback: the bar counts the columns
that pass through the operator (:func:`._run.progress`), which for Lanczos is one block of
all probes per step, so it moves once per Lanczos step (per Krylov block for ``eigs``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import _backend as backend
from .._blocks import CPU_BLOCK_BYTES
from .._density import SpectralDensity, spectral_density
from .._eigen import EigenResult, eigenvalues
from .._operators import LinearOperator
from .._spectral import DEFAULT_LANCZOS_STEPS, DEFAULT_NUM_PROBES, logdet
from . import _run
from ._commands import fresh_seed, open_operator, run_bytes
from ._errors import EXIT_OK, PROG, CliError
from ._libraries import default_dtype
from ._plot import require_matplotlib
from ._reading import Declared
from ._report import Result, format_number, plain
from ._threads import limited_threads
from ._writing import PLOT_SUFFIXES, Staged, check_distinct, check_target

__all__ = ["check_symmetric", "run_eigs", "run_logdet", "run_spectrum"]

#: Quantiles of the eigenvalue distribution that ``spectrum`` reports.
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
#: Bins of the histogram that ``spectrum`` prints, and the width of its longest bar.
HISTOGRAM_BINS = 10
BAR_WIDTH = 40
#: Points of the smoothed density in ``spectrum --json`` and its plot.
DENSITY_POINTS = 512
#: What ``eigenvalues`` spends at most without --max-matvecs: max(1000, 50 k), at most 50 n
#: (its docstring); the progress bar's total.
EIGS_DEFAULT_BUDGET, EIGS_BUDGET_PER_VALUE, EIGS_BUDGET_PER_ROW = 1000, 50, 50
#: Options ``logdet --method exact`` leaves unused: (attribute, flag).
EXACT_UNUSED = (
    ("matvecs", "--matvecs"),
    ("lanczos_steps", "--lanczos-steps"),
    ("seed", "--seed"),
    ("probe", "--probe"),
)


# ------------------------------------------------------------------ reading, checking
def check_symmetric(path: Path, matrix: Any, command: str) -> None:
    """CliError unless ``matrix`` (NumPy or SciPy sparse) equals its transpose (conjugate
    transpose when complex) to within sqrt(eps) of its largest entry: Lanczos assumes a
    self-adjoint operator and cannot check it, and on a non-symmetric one returns numbers
    that mean nothing. Sparse: one pass over the stored entries; dense: CPU_BLOCK_BYTES of
    rows at a time, so the check never holds a second n x n array."""
    import scipy.sparse as sp

    values = matrix.data if sp.issparse(matrix) else matrix
    if not np.issubdtype(values.dtype, np.inexact):  # integers and bools, subtracted exactly
        matrix, values = matrix.astype(np.float64), values.astype(np.float64)
    if values.size == 0:
        return
    tolerance = math.sqrt(float(np.finfo(values.dtype).eps))
    worst, where, scale = 0.0, (0, 0), 0.0
    if sp.issparse(matrix):
        scale = float(np.abs(values).max())
        gap = sp.coo_array(abs(matrix - matrix.conj().T))
        if gap.nnz:
            i = int(np.argmax(gap.data))
            worst, where = float(gap.data[i]), (int(gap.row[i]), int(gap.col[i]))
    else:
        n = matrix.shape[0]
        rows = max(1, CPU_BLOCK_BYTES // max(1, n * values.dtype.itemsize))
        for start in range(0, n, rows):
            block = matrix[start : start + rows]
            scale = max(scale, float(np.abs(block).max()))
            gap = np.abs(block - matrix[:, start : start + rows].conj().T)
            i = int(np.argmax(gap))
            if gap.flat[i] > worst:
                row, col = np.unravel_index(i, gap.shape)
                worst, where = float(gap.flat[i]), (start + int(row), int(col))
    if worst > tolerance * scale:
        hermitian = np.iscomplexobj(values)
        kind, transpose = ("Hermitian", "A^H") if hermitian else ("symmetric", "A^T")
        raise CliError(
            f"{path}: {command} needs a {kind} matrix, but |A - {transpose}| is {worst:.3g} at "
            f"entry {where} (largest |A_ij| {scale:.3g}; tolerated: {tolerance:.2g} times that)"
        )


def _open_symmetric(
    args: argparse.Namespace, command: str, work_columns: Callable[[int], int]
) -> tuple[LinearOperator, dict[str, Any]]:
    """The operator of the symmetric matrix file ``args.file`` and its report fields; the
    memory check counts, beyond what reading and holding the matrix take, ``work_columns(n)``
    vectors of n entries that the method holds."""
    path = Path(args.file)

    def need(declared: Declared) -> int:
        compute = np.dtype(args.dtype or default_dtype(declared)).itemsize
        vectors = declared.rows * work_columns(declared.rows) * compute
        return run_bytes(declared, args, "trace", False) + vectors

    matrix, operator, fields = open_operator(args, path, command, need)
    check_symmetric(path, matrix, command)
    return operator, fields


def _lanczos_plan(args: argparse.Namespace, n: int) -> tuple[int, int]:
    """``(steps, budget)`` as :func:`~linop_trace.trace_function` resolves them from the
    options (for the progress bar and the memory estimate; the library checks them)."""
    steps = max(1, min(args.lanczos_steps or DEFAULT_LANCZOS_STEPS, n))
    return steps, args.matvecs or DEFAULT_NUM_PROBES * steps


def _lanczos_columns(args: argparse.Namespace, n: int) -> int:
    """Vectors of n entries stochastic Lanczos quadrature holds: about 6 per probe (the
    probes, two Lanczos vectors, the new one, its product), and for a method that first
    builds a Krylov basis (``slq++``) at most the budget again (the basis, its images)."""
    steps, budget = _lanczos_plan(args, max(n, 1))
    extra = budget if getattr(args, "method", "slq") != "slq" else 0
    return 6 * (budget // steps) + extra


def _lanczos_options(args: argparse.Namespace, seed: int | None) -> dict[str, Any]:
    """The keyword arguments of :func:`~linop_trace.logdet` / :func:`~linop_trace.spectral_density`
    that were given (the library's defaults for the others)."""
    options = {
        "num_matvecs": args.matvecs,
        "lanczos_steps": args.lanczos_steps,
        "seed": seed,
        "probe": args.probe,
        "block_size": args.block_size,
    }
    return {name: value for name, value in options.items() if value is not None}


def _computed(
    args: argparse.Namespace,
    operator: LinearOperator,
    total: int,
    label: str,
    function: Callable[[LinearOperator], Any],
) -> tuple[Any, float]:
    """``function(operator)`` behind the progress bar (``total`` columns planned), in a
    worker thread that Ctrl-C does not wait for, with ``--threads``; and when it started."""
    with limited_threads(args.threads):
        start = time.perf_counter()
        with _run.progress(operator, total, _run.progress_wanted(args.quiet), label) as watched:

            def compute() -> Any:
                with limited_threads(args.threads):  # the worker's own OpenMP limit
                    return function(watched)

            # Lanczos has no partial result to give: Ctrl-C stops at once
            return _run.interruptible(compute, keeps_partial=False), start


# ------------------------------------------------------------------------- logdet
def run_logdet(args: argparse.Namespace) -> int:
    """``linop-trace logdet FILE``: log det A with its interval, standard error and
    quadrature error."""
    exact = args.method == "exact"
    operator, fields = _open_symmetric(
        args, "logdet", lambda n: 3 * n if exact else _lanczos_columns(args, n)
    )
    n = operator.shape[0]
    seed = None if exact else fresh_seed(args.seed)  # nothing random runs on the exact path
    fields["seed"] = seed
    options = {"method": args.method, **_lanczos_options(args, seed)}
    steps, budget = _lanczos_plan(args, n)
    total = budget - budget % steps if args.method == "slq" else budget
    if exact:
        total = n
        if args.block_size is None and _run.progress_wanted(args.quiet):
            options["block_size"] = _run.exact_block_for_progress(n)  # a bar that moves
    import scipy.stats  # noqa: F401 - intervals need it; a slow first import is not the estimate's time

    estimate, start = _computed(
        args, operator, total, "logdet", lambda watched: logdet(watched, **options)
    )
    seconds = _run.elapsed(start, estimate, operator)  # reads the value: its checks run
    result = Result.of("logdet", estimate, seconds, args.confidence, fields)
    info = estimate.info
    if info.get("systematic_error") is not None:
        result.fields["systematic_error"] = plain(backend.to_numpy(info["systematic_error"]))
    if info.get("lanczos_steps") is not None:
        result.fields["lanczos_steps"] = int(info["lanczos_steps"])
        result.fields["probes"] = int(info["num_probes"])
    unused = [flag for name, flag in EXACT_UNUSED if exact and getattr(args, name) is not None]
    if unused:
        result.fields["note"] = (
            f"exact: eigenvalues of the formed matrix ({', '.join(unused)} unused)"
        )
    print(result.json() if args.json else result.text())
    return EXIT_OK


# ----------------------------------------------------------------------- spectrum
def _quantile(values: np.ndarray, cumulative: np.ndarray, fraction: float) -> float:
    """The smallest atom at which the cumulative mass reaches ``fraction``."""
    index = int(np.searchsorted(cumulative, fraction * cumulative[-1], side="left"))
    return float(values[min(index, values.size - 1)])


def _spectrum_fields(density: SpectralDensity, width: float | None) -> dict[str, Any]:
    """What ``spectrum`` reports, NumPy and Python numbers: the range, quantiles, a
    histogram of estimated eigenvalue counts, the atoms and the smoothed density."""
    values, masses = density.atoms()
    order = np.argsort(values)
    cumulative = np.cumsum(masses[order])
    low, high = float(values.min()), float(values.max())
    edges = np.linspace(low, high, HISTOGRAM_BINS + 1) if high > low else np.array([low, high])
    counts, _ = np.histogram(values, bins=edges, weights=masses)
    width = density.default_width() if width is None else width
    grid = density.grid(DENSITY_POINTS, width)
    return {
        "range": [low, high],
        "quantiles": {
            f"{fraction:g}": _quantile(values[order], cumulative, fraction)
            for fraction in QUANTILES
        },
        "histogram": {"edges": plain(edges), "counts": plain(density.n * counts)},
        "width": width,
        "nodes": [plain(row) for row in backend.to_numpy(density.nodes).astype(float)],
        "weights": [plain(row) for row in backend.to_numpy(density.weights).astype(float)],
        "grid": plain(grid),
        "density": plain(density.density(grid, width)),
    }


def _spectrum_text(fields: dict[str, Any]) -> str:
    """The table a person reads: range, quantiles, method, time and the histogram."""
    low, high = fields["range"]
    quantiles = ", ".join(
        f"{100 * float(fraction):g}%: {format_number(value, 6)}"
        for fraction, value in fields["quantiles"].items()
    )
    seed = "" if fields["seed"] is None else f", seed {fields['seed']}"
    rows = [
        ("file", f"{fields['file']} ({fields['description']})"),
        ("range", f"[{format_number(low, 8)}, {format_number(high, 8)}] (extreme Ritz values)"),
        ("quantiles", quantiles),
        ("method", f"{fields['method']} ({fields['matvecs']} matvecs{seed})"),
        ("lanczos", f"{fields['probes']} probes x {fields['lanczos_steps']} steps"),
    ]
    if fields.get("threads") is not None:
        rows.append(("threads", str(fields["threads"])))
    rows.append(("time", f"{fields['seconds']:.3g} s"))
    if fields.get("plot"):
        rows.append(("plot", fields["plot"]))
    width = max(len(key) for key, _ in rows)
    lines = [f"{key:<{width}}  {text}" for key, text in rows]
    edges, counts = fields["histogram"]["edges"], fields["histogram"]["counts"]
    lines.append(f"eigenvalues per interval (estimated count of {fields['n']}):")
    spans = [
        f"[{format_number(edges[i], 5)}, {format_number(edges[i + 1], 5)}"
        + ("]" if i == len(counts) - 1 else ")")
        for i in range(len(counts))
    ]
    span_width = max(len(span) for span in spans)
    tallest = max(max(counts), 1e-300)
    for span, count in zip(spans, counts):
        bar = "#" * round(BAR_WIDTH * count / tallest)
        lines.append(f"  {span:<{span_width}}  {count:>9.1f}  {bar}".rstrip())
    return "\n".join(lines)


def run_spectrum(args: argparse.Namespace) -> int:
    """``linop-trace spectrum FILE``: the eigenvalue distribution, with ``--plot`` drawn."""
    figure = check_target(args.plot, PLOT_SUFFIXES, "--plot")
    path = Path(args.file)
    check_distinct(path, [("--plot", args.plot)])
    if args.log and figure is None:
        raise CliError("--log sets the density axis of the plot; it needs --plot FILE.png")
    if figure is not None:
        require_matplotlib()
    operator, fields = _open_symmetric(args, "spectrum", lambda n: _lanczos_columns(args, n))
    steps, budget = _lanczos_plan(args, operator.shape[0])
    seed = fresh_seed(args.seed)
    fields["seed"] = seed
    options = _lanczos_options(args, seed)
    density, start = _computed(
        args,
        operator,
        budget - budget % steps,
        "spectrum",
        lambda watched: spectral_density(watched, **options),
    )
    computed = _spectrum_fields(density, args.width)  # on the host: the run has finished
    m, k = density.nodes.shape
    fields |= {
        "quantity": "spectrum",
        "method": "slq",
        "matvecs": density.num_matvecs,
        "lanczos_steps": int(k),
        "probes": int(m),
        **computed,
        "seconds": time.perf_counter() - start,
    }
    fields = {"quantity": fields.pop("quantity"), **fields}
    if figure is not None:
        staged = Staged()  # the figure appears only once it is whole
        try:
            _plot_density(figure, density, computed["width"], args.log, str(path), staged)
            staged.commit()
        finally:
            staged.discard()
        fields["plot"] = str(figure)
    print(json.dumps(fields) if args.json else _spectrum_text(fields))
    return EXIT_OK


def _plot_density(
    path: Path, density: SpectralDensity, width: float, log: bool, label: str, staged: Staged
) -> None:
    """The smoothed density (:meth:`SpectralDensity.plot`) on a bare Figure, to ``path``."""
    from matplotlib.figure import Figure  # no pyplot figure: no GUI, no global state

    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    density.plot(ax=axes, num=DENSITY_POINTS, width=width, log=log)
    m, k = density.nodes.shape
    axes.set_title(
        f"eigenvalue density of {Path(label).name}\nSLQ: {m} probes x {k} Lanczos steps, "
        f"kernel width {format_number(width, 3)}",
        fontsize="medium",
    )
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    with staged.open(path, "--plot") as handle:
        figure.savefig(handle, format=path.suffix.lower().lstrip("."))


# --------------------------------------------------------------------------- eigs
def _eigs_text(fields: dict[str, Any]) -> str:
    """The table a person reads: which, method, convergence, then value and residual."""
    seed = "" if fields["seed"] is None else f", seed {fields['seed']}"
    cycles = f"{fields['cycles']} cycle{'' if fields['cycles'] == 1 else 's'}"
    converged = (
        f"yes (every residual norm <= {fields['tol']:g} x the largest |Ritz value|)"
        if fields["converged"]
        else "no (budget spent first)"
    )
    rows = [
        ("file", f"{fields['file']} ({fields['description']})"),
        ("which", f"{fields['which']} (k = {fields['k']})"),
        ("method", f"restarted block Lanczos ({fields['matvecs']} matvecs, {cycles}{seed})"),
        ("converged", converged),
    ]
    if fields.get("threads") is not None:
        rows.append(("threads", str(fields["threads"])))
    rows.append(("time", f"{fields['seconds']:.3g} s"))
    width = max(len(key) for key, _ in rows)
    lines = [f"{key:<{width}}  {text}" for key, text in rows]
    lines.append("eigenvalues (value, residual norm |A x - lambda x|):")
    for i, (value, residual) in enumerate(zip(fields["values"], fields["residual_norms"])):
        lines.append(f"  {i:>4}  {format_number(value, 12):>20}  {format_number(residual, 3)}")
    return "\n".join(lines)


def run_eigs(args: argparse.Namespace) -> int:
    """``linop-trace eigs FILE``: the extreme eigenvalues with their residual norms; a run
    that spends its budget unconverged prints them and a warning line on stderr."""
    operator, fields = _open_symmetric(
        args,
        "eigs",
        lambda n: 4 * min(n, max(6 * (args.k + 2), 40)),  # basis and images, x2
    )
    n = operator.shape[0]
    seed = fresh_seed(args.seed)
    fields["seed"] = seed
    options = {
        "k": args.k,
        "which": args.which,
        "tol": args.tol,
        "max_matvecs": args.max_matvecs,
        "block_size": args.block_size,
        "seed": seed,
    }
    cap = args.max_matvecs or max(EIGS_DEFAULT_BUDGET, EIGS_BUDGET_PER_VALUE * args.k)
    total = min(cap, EIGS_BUDGET_PER_ROW * n)

    def compute(watched: LinearOperator) -> EigenResult:
        with warnings.catch_warnings():  # the CLI says it in its own words (flag names)
            warnings.filterwarnings("ignore", message="eigenvalues: ", category=RuntimeWarning)
            return eigenvalues(watched, **options)

    result, start = _computed(args, operator, total, "eigs", compute)
    values = backend.to_numpy(result.values)
    residuals = backend.to_numpy(result.residual_norms)
    fields = {
        "quantity": "eigs",
        **fields,
        "method": "block-lanczos",
        "which": args.which,
        "k": args.k,
        "tol": args.tol,
        "values": plain(values),
        "residual_norms": plain(residuals),
        "matvecs": int(result.num_matvecs),
        "converged": bool(result.converged),
        "cycles": int(result.cycles),
        "seconds": time.perf_counter() - start,
    }
    print(json.dumps(fields) if args.json else _eigs_text(fields))
    if not result.converged and not args.quiet:
        print(
            f"{PROG}: warning: not converged: the largest residual norm is "
            f"{float(residuals.max()):.3g} after {result.num_matvecs} matvecs, above --tol "
            f"{args.tol:g} times the largest |Ritz value|; raise --max-matvecs or loosen --tol",
            file=sys.stderr,
        )
    return EXIT_OK
