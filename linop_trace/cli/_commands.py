"""The commands on a matrix file (``trace``, ``diagonal``, ``rowsums``) and ``methods``:
parsed options in, a printed result and the asked-for files out."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import _backend as backend
from .._blocks import CPU_BLOCK_BYTES
from .._functions import (
    DEFAULT_MAX_MATVECS,
    DEFAULT_NUM_MATVECS,
    computes_exactly,
    diagonal,
    row_sums,
    trace,
)
from .._operators import LinearOperator, aslinearoperator
from ..estimators import available_methods, get_estimator
from . import _run
from ._errors import EXIT_OK, CliError
from ._libraries import default_dtype, import_library, to_library
from ._memory import check_memory
from ._plot import plot, require_matplotlib
from ._reading import Declared, csr_bytes, declared_matrix, load_matrix
from ._report import Result, describe_operator, stored_diagonal_note
from ._threads import limited_threads
from ._writing import (
    OUTPUT_SUFFIXES,
    PLOT_SUFFIXES,
    Staged,
    check_distinct,
    check_target,
    write_vector,
)

__all__ = ["fresh_seed", "open_operator", "run_bytes", "run_methods", "run_quantity"]

#: Bytes per entry of a vector printed as JSON (a Python float in a list, then its text).
JSON_ENTRY_BYTES = 64


def _estimate_options(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """The keyword arguments of :func:`~linop_trace.trace` / :func:`~linop_trace.diagonal`."""
    return {
        "method": args.method,
        "num_matvecs": args.matvecs,
        "seed": seed,
        "probe": args.probe,
        "rtol": args.rtol,
        "atol": args.atol,
        "confidence": args.confidence,
        "max_matvecs": args.max_matvecs,
        "block_size": args.block_size,
    }


def _planned_matvecs(options: dict[str, Any]) -> int:
    """The most columns an estimate with ``options`` sends through the operator (the
    progress bar's total), with the library's defaults where the options leave it open."""
    if options["rtol"] is not None or options["atol"] is not None:
        return options["max_matvecs"] or max(options["num_matvecs"] or 0, DEFAULT_MAX_MATVECS)
    return options["num_matvecs"] or options["max_matvecs"] or DEFAULT_NUM_MATVECS


def run_bytes(declared: Declared, args: argparse.Namespace, quantity: str, plot: bool) -> int:
    """Memory a run on the matrix ``declared`` takes at its peak (an estimate, from the
    header alone): the larger of reading the file and computing, where computing holds the
    matrix, its copy in the compute dtype, a probe block and its product (columns as the
    block size the run would use: on the host at most CPU_BLOCK_BYTES per block), the
    result vectors, their JSON text and the estimates a diagonal plot draws."""
    rows, cols, stored = declared.rows, declared.cols, declared.stored
    item = declared.dtype.itemsize
    compute = np.dtype(getattr(args, "dtype", None) or default_dtype(declared)).itemsize
    if declared.sparse:
        held = csr_bytes(rows, stored, item) + csr_bytes(rows, stored, compute)
    else:
        held = rows * cols * (item + compute)
    n = max(rows, cols)
    columns = 1 if quantity == "rowsums" else getattr(args, "block_size", None) or n
    block = max(1, min(columns, n, CPU_BLOCK_BYTES // max(1, n * compute)))
    work = (rows + cols) * block * compute
    vectors = 8 * n * 8  # value, stderr, interval and the estimators' running sums
    if getattr(args, "json", False) and quantity != "trace" and not getattr(args, "output", None):
        vectors += 4 * n * JSON_ENTRY_BYTES
    if plot and quantity == "diagonal":
        vectors += 36 * n * 8  # up to 12 estimates, each with its interval
    return max(declared.reading_bytes(), held + work + vectors)


def fresh_seed(seed: int | None) -> int:
    """``seed``, or a fresh one when none is given (reported, so that a run can be repeated)."""
    return seed if seed is not None else int(np.random.SeedSequence().generate_state(1)[0] >> 1)


def open_operator(
    args: argparse.Namespace, path: Path, quantity: str, need: Callable[[Declared], int]
) -> tuple[Any, LinearOperator, dict[str, Any]]:
    """The matrix file ``path`` as an operator of ``args.backend`` on ``args.device`` in the
    compute dtype: ``(matrix, operator, fields)``, where ``fields`` describe them for the
    report. The memory the run needs, ``need(declared)``, is checked from the header
    before the file is read; every ``quantity`` but ``rowsums`` needs a square matrix."""
    library = args.backend
    try:
        import_library(library)
    except ImportError as error:
        raise CliError(str(error)) from None

    declared = declared_matrix(path)
    if declared is not None:
        check_memory(path, declared.describe(), need(declared))
    matrix = load_matrix(path)
    rows, cols = matrix.shape
    if quantity != "rowsums" and rows != cols:
        raise CliError(f"{path}: {quantity} needs a square matrix, got shape ({rows}, {cols})")
    dtype = args.dtype or default_dtype(matrix)
    if np.dtype(dtype).kind == "f" and np.iscomplexobj(matrix):
        raise CliError(
            f"{path}: the matrix is complex; --dtype {dtype} would drop its imaginary part"
        )
    operator = aslinearoperator(to_library(matrix, library, args.device, dtype))
    fields: dict[str, Any] = {
        "file": str(path),
        "description": describe_operator(matrix, operator, library),
        "n": int(cols),
        "shape": [int(rows), int(cols)],
        "backend": library,
        "device": str(operator.device),
        "dtype": backend.dtype_name(operator.dtype),
        "threads": args.threads,
    }
    return matrix, operator, fields


def run_quantity(args: argparse.Namespace, quantity: str) -> int:
    """``trace``, ``diagonal`` or ``rowsums`` of ``args.file``: every check that needs no
    computing first (method, outputs, memory), then the estimate, its files, its report."""
    estimating = quantity in ("trace", "diagonal")
    if estimating:
        get_estimator(args.method, quantity)  # unknown names fail before the file is read
    output_path = getattr(args, "output", None)
    plot_path = getattr(args, "plot", None)
    output = check_target(output_path, OUTPUT_SUFFIXES, "--output")
    figure = check_target(plot_path, PLOT_SUFFIXES, "--plot")
    path = Path(args.file)
    check_distinct(path, [("--output", output_path), ("--plot", plot_path)])
    if figure is not None:
        if args.method == "exact":  # refused with or without matplotlib
            raise CliError(
                "--plot shows a randomized estimate converging; method 'exact' has nothing to show"
            )
        require_matplotlib()
    _, operator, extra = open_operator(
        args,
        path,
        quantity,
        lambda declared: run_bytes(declared, args, quantity, figure is not None),
    )

    show_bar = _run.progress_wanted(args.quiet)
    options: dict[str, Any] = {}
    import scipy.stats  # noqa: F401 - intervals need it; a slow first import is not the estimate's time

    with limited_threads(args.threads):  # this thread's pools: the plot's estimates
        start = time.perf_counter()
        if estimating:
            seed = fresh_seed(args.seed)
            extra["seed"] = seed
            options = _estimate_options(args, seed)
            function = trace if quantity == "trace" else diagonal
            budget = {k: options[k] for k in ("num_matvecs", "rtol", "atol", "max_matvecs")}
            exact = computes_exactly(operator, quantity, args.method, **budget)
            # a matrix read from a file stores its diagonal: an exact result reads it
            total = 0 if exact else _planned_matvecs(options)
            with _run.progress(operator, total, show_bar, quantity) as watched:

                def compute() -> Any:
                    with limited_threads(args.threads):  # the worker's own OpenMP limit
                        return function(watched, **options)

                estimate = _run.interruptible(
                    compute, keeps_partial=options["method"] in _run.PARTIAL_METHODS
                )
        else:
            with _run.progress(operator, 1, show_bar, quantity) as watched:
                estimate = row_sums(watched)
        seconds = _run.elapsed(start, estimate, operator)
        if estimating and estimate.method == "exact":
            extra["seed"] = None  # nothing random ran: a seed would claim otherwise

        confidence = getattr(args, "confidence", 0.95)
        result = Result.of(quantity, estimate, seconds, confidence, extra)
        note = stored_diagonal_note(args, estimate) if estimating else None
        if note is not None:
            result.fields["note"] = note
        staged = Staged()  # the outputs appear together, and only if all of them were written
        try:
            if output is not None:
                with staged.open(output, "--output") as handle:
                    write_vector(handle, output, result.value, result.stderr, result.interval)
                result.fields["output"] = str(output)
            if figure is not None:
                plot(figure, quantity, operator, options, estimate, str(path), staged)
                result.fields["plot"] = str(figure)
            staged.commit()
        finally:
            staged.discard()
    print(result.json() if args.json else result.text())
    return EXIT_OK


def run_methods(args: argparse.Namespace) -> int:
    """``linop-trace methods``: the registered names and what each estimates."""
    names = available_methods()
    trace_names, diagonal_names = (
        set(available_methods("trace")),
        set(available_methods("diagonal")),
    )
    if args.json:
        print(
            json.dumps(
                [
                    {"name": n, "trace": n in trace_names, "diagonal": n in diagonal_names}
                    for n in names
                ]
            )
        )
        return EXIT_OK
    width = max(len(n) for n in names)
    for n in names:
        kinds = [
            q for q, known in (("trace", trace_names), ("diagonal", diagonal_names)) if n in known
        ]
        print(f"{n:<{width}}  {', '.join(kinds)}")
    return EXIT_OK
