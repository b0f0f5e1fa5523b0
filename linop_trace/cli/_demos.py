"""``linop-trace demo``: every registered trace method on a real problem (the Hessian of a
small MLP on scikit-learn's digits, or a bundled sparse graph Laplacian), against the
exact trace."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from .. import _backend as backend
from .._estimate import Estimate
from .._functions import trace
from .._operators import LinearOperator, aslinearoperator
from .._structured import identity
from ..estimators import available_methods
from ._errors import EXIT_OK, CliError
from ._libraries import from_numpy, resolve_device, to_library
from ._reading import load_matrix
from ._report import interval_of, level_text, plain
from ._run import elapsed, exact_block_for_progress, progress, progress_wanted
from ._threads import limited_threads

__all__ = ["AUTODIFF_LIBRARIES", "DEMO_MATRIX", "run_demo"]

DEMO_MATRIX = "digits_knn_laplacian.mtx"
#: Libraries with automatic differentiation: those the Hessian demo runs on (torch first).
AUTODIFF_LIBRARIES = ("torch", "jax")


def _demo_sparse(args: argparse.Namespace, library: str) -> tuple[str, LinearOperator]:
    from importlib import resources

    source = resources.files("linop_trace") / "data" / DEMO_MATRIX
    with resources.as_file(source) as file:
        matrix = load_matrix(file)
    operator = aslinearoperator(to_library(matrix, library, args.device, "float64"))
    text = (
        f"graph Laplacian of the 10-nearest-neighbour graph of scikit-learn's 1,797 digits "
        f"(bundled {DEMO_MATRIX}: {matrix.shape[0]} x {matrix.shape[1]}, {matrix.nnz} nonzeros; "
        f"{library} float64)"
    )
    return text, operator


def _demo_hessian(args: argparse.Namespace, library: str) -> tuple[str, LinearOperator]:
    """The Hessian of the digits MLP written in ``library`` (torch or JAX), its variables
    and data on ``args.device``."""
    from ..autodiff import _examples, hessian  # the examples' data needs scikit-learn

    device = resolve_device(library, args.device)  # ImportError: not installed

    def moved(array: Any) -> Any:
        return from_numpy(backend.to_numpy(array), library, device)

    if library == "torch":
        model, loss_fn, (X, y) = _examples.digits_mlp_problem(batch_size=256, seed=0)
        operator = hessian(model.to(device), loss_fn, (moved(X), moved(y)))
    else:
        apply_fn, params, loss_fn, (X, y) = _examples.digits_mlp_jax_problem(256, seed=0)
        weights = {name: moved(value) for name, value in params.items()}
        operator = hessian(apply_fn, weights, loss_fn, (moved(X), moved(y)))
    n = operator.shape[1]
    text = (
        f"Hessian of the cross-entropy loss of a 64-20-10 MLP on 256 scikit-learn digits "
        f"({n:,} parameters; {operator.library} {backend.dtype_name(operator.dtype)})"
    )
    return text, operator


def _demo_problem(args: argparse.Namespace) -> tuple[str, LinearOperator]:
    """The problem ``--problem`` names on the library ``--backend`` names.

    ``auto`` is the torch Hessian when no backend is named (the sparse matrix if torch or
    scikit-learn is missing), else the sparse matrix, which every backend runs; a Hessian
    needs automatic differentiation, so it runs on torch (the default) or JAX only.
    """
    problem, library = args.problem, args.backend
    if problem == "hessian" and library not in (None, *AUTODIFF_LIBRARIES):
        raise CliError(
            f"demo --problem hessian cannot run on --backend {library}: a Hessian needs "
            "automatic differentiation; use --backend torch or --backend jax, or "
            "--problem sparse (every backend)"
        )
    if problem == "sparse" or (problem == "auto" and library is not None):
        return _demo_sparse(args, library or "numpy")
    library = library or AUTODIFF_LIBRARIES[0]
    try:
        return _demo_hessian(args, library)
    except ImportError as error:
        if problem == "hessian":
            raise CliError(
                f"the Hessian demo on {library} needs {library} and scikit-learn ({error})"
            ) from None
        if not args.quiet:
            print(f"({error}; using the bundled sparse matrix instead)", file=sys.stderr)
        return _demo_sparse(args, "numpy")


def _estimates(
    args: argparse.Namespace, operator: LinearOperator
) -> tuple[float, list[tuple[str, Estimate | None, float, str | None]]]:
    """The exact trace (its real part), and the rows of the table: the exact trace, then
    every registered randomized method's estimate at the budget, as (method, estimate or
    None, seconds, why it was refused or None)."""
    show_bar = progress_wanted(args.quiet)
    start = time.perf_counter()
    block_size = args.block_size
    if show_bar and block_size is None:
        block_size = exact_block_for_progress(operator.shape[1])
    with progress(operator, operator.shape[1], show_bar, "exact") as watched:
        exact = trace(watched, method="exact", block_size=block_size)
    rows: list[tuple[str, Estimate | None, float, str | None]] = [
        ("exact", exact, elapsed(start, exact, operator), None)
    ]
    skip = {"exact", "auto"}
    for name in available_methods("trace"):
        if name in skip:
            continue
        start = time.perf_counter()
        try:
            with progress(operator, args.matvecs, show_bar, name) as watched:
                estimate = trace(
                    watched,
                    method=name,
                    num_matvecs=args.matvecs,
                    seed=args.seed,
                    block_size=args.block_size,
                )
                estimate.value  # noqa: B018 - its checks run when first read (torch, JAX)
        except (ValueError, TypeError, NotImplementedError, FloatingPointError) as error:
            rows.append((name, None, time.perf_counter() - start, str(error).splitlines()[0]))
            continue
        rows.append((name, estimate, elapsed(start, estimate, operator), None))
    return float(np.real(backend.to_numpy(exact.value))), rows


def run_demo(args: argparse.Namespace) -> int:
    """``linop-trace demo``: the table (or JSON) of every method against the exact trace."""
    description, operator = _demo_problem(args)
    damping = getattr(args, "damping", 0.0)
    if damping:  # known exactly: the estimators estimate the matrix alone (a stored one,
        # whose diagonal is stored too, is then exact: docs/operators/algebra.rst)
        operator = operator + damping * identity(operator.shape[0], like=operator)
        description += f", plus {damping:g} I (damping: its trace is computed exactly)"
    with limited_threads(args.threads):
        exact_value, rows = _estimates(args, operator)
    records = []
    for name, result, seconds, problem in rows:
        record: dict[str, Any] = {"method": name, "seconds": seconds}
        if result is None:
            record["error"] = problem
        else:
            estimate = result
            value = float(np.real(backend.to_numpy(estimate.value)))
            interval = interval_of(estimate, args.confidence)
            record.update(
                value=value,
                stderr=plain(
                    None if estimate.stderr is None else backend.to_numpy(estimate.stderr)
                ),
                interval=None if interval is None else [float(interval[0]), float(interval[1])],
                relative_error=abs(value - exact_value) / abs(exact_value) if exact_value else None,
                matvecs=int(estimate.num_matvecs),
                resolved=estimate.method,
            )
        records.append(record)
    if args.json:
        print(
            json.dumps(
                {
                    "problem": description,
                    "n": operator.shape[1],
                    "exact": exact_value,
                    "confidence": args.confidence,
                    "seed": args.seed,
                    "threads": args.threads,
                    "results": records,
                }
            )
        )
        return EXIT_OK
    _print_demo(description, operator, args, records)
    return EXIT_OK


def _print_demo(
    description: str,
    operator: LinearOperator,
    args: argparse.Namespace,
    records: list[dict[str, Any]],
) -> None:
    level = level_text(args.confidence)
    header = ("method", "estimate", f"{level} interval", "covers", "rel. error", "matvecs", "time")
    table: list[tuple[str, ...]] = []
    notes: list[str] = []
    exact = records[0]["value"]
    for record in records:
        seconds = f"{record['seconds']:.3f} s"
        if "error" in record:
            notes.append(f"[{len(notes) + 1}] {record['method']}: {record['error']}")
            table.append((record["method"], f"refused [{len(notes)}]", "", "", "", "", seconds))
            continue
        interval = record["interval"]
        if interval is None:
            span, covers = "n/a", ""
        else:
            span = f"[{interval[0]:.6g}, {interval[1]:.6g}]"
            # (to rounding: a method that computed the value exactly has an interval of
            # width 0, which the reference's own rounding put 1e-16 outside)
            slack = 64 * float(np.finfo(float).eps) * abs(exact)
            inside = interval[0] - slack <= exact <= interval[1] + slack
            covers = "" if record["method"] == "exact" else "yes" if inside else "no"
        error = "0" if record["method"] == "exact" else f"{record['relative_error']:.2e}"
        table.append(
            (
                record["method"],
                f"{record['value']:.8g}",
                span,
                covers,
                error,
                str(record["matvecs"]),
                seconds,
            )
        )
    widths = [max(len(str(row[i])) for row in [header, *table]) for i in range(len(header))]
    threads = "" if args.threads is None else f", {args.threads} thread(s)"
    lines = [
        f"linop-trace demo: trace of the {description}",
        f"n = {operator.shape[1]}, budget {args.matvecs} matvecs per estimator, seed {args.seed}"
        f"{threads}",
        "",
        "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    lines.extend("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)
    if notes:
        lines.extend(["", *notes])
    print("\n".join(lines))
