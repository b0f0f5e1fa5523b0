"""The command line's grammar: subcommands, options, their checks and help texts. Parsing
only; :mod:`._main` runs what was parsed."""

from __future__ import annotations

import argparse
import math
from typing import Any

from .._functions import DEFAULT_MAX_MATVECS, DEFAULT_NUM_MATVECS
from .._probes import PROBES
from ..estimators import available_methods, get_estimator
from ._errors import PROG, CliError
from ._libraries import DTYPES, LIBRARIES

__all__ = ["build_parser"]


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (raised, not printed with the usage)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise CliError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text}")
    return value


def _level(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return value


def _add_common(
    parser: argparse.ArgumentParser,
    *,
    backend_default: str | None = "numpy",
    backend_help: str = "array library to compute in (default: %(default)s)",
) -> None:
    """Options of every command that computes: where, how many threads, how to report."""
    parser.add_argument("--backend", choices=LIBRARIES, default=backend_default, help=backend_help)
    parser.add_argument(
        "--device",
        help="device of that library: cpu, cuda, cuda:1, gpu, ... (default: its default)",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="at most N threads in NumPy's and SciPy's BLAS and OpenMP pools and in torch's "
        "(default: the libraries' own, a thread per core, which oversubscribes a busy "
        "machine); JAX takes its threads from XLA_FLAGS instead",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or notes on stderr")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _tolerance_methods(quantity: str) -> list[str]:
    """The registered methods that estimate ``quantity`` and honour rtol/atol."""
    return [
        name
        for name in available_methods(quantity)
        if getattr(get_estimator(name, quantity), "supports_tolerance", False)
    ]


def _add_estimation(parser: argparse.ArgumentParser, quantity: str) -> None:
    """Options of ``trace`` and ``diagonal``: the method, its budget, probes and plot."""
    parser.add_argument(
        "--method",
        default="auto",
        help="a registered method (see `linop-trace methods`; default auto)",
    )
    parser.add_argument(
        "--matvecs",
        type=_positive_int,
        help=f"budget of operator applications (default {DEFAULT_NUM_MATVECS})",
    )
    parser.add_argument(
        "--max-matvecs",
        type=_positive_int,
        help=f"cap on the budget with --rtol/--atol (default {DEFAULT_MAX_MATVECS})",
    )
    # from the registry, so that a method registered by the user is listed too
    takers = ", ".join(_tolerance_methods(quantity)).replace("%", "%%") or "none"
    parser.add_argument(
        "--rtol",
        type=_non_negative_float,
        help=(
            "stop when the interval half-width <= rtol * |estimate|; the methods that take "
            f"--rtol/--atol: {takers} (others refuse them)"
        ),
    )
    parser.add_argument(
        "--atol",
        type=_non_negative_float,
        help="stop when the interval half-width <= atol (the methods listed under --rtol)",
    )
    parser.add_argument(
        "--confidence", type=_level, default=0.95, help="level of the interval (default 0.95)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        help="random seed (default: fresh, reported in the output; an exact result uses "
        "none and reports none: JSON null)",
    )
    parser.add_argument(
        "--probe", choices=PROBES, help="probe distribution (default: the method's own)"
    )
    parser.add_argument("--block-size", type=_positive_int, help="most columns per operator call")
    parser.add_argument(
        "--dtype", choices=DTYPES, help="compute dtype (default: the file's, integers as float64)"
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="plot the running estimate and its interval against matvecs",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``linop-trace`` (subcommands trace, diagonal, rowsums, demo,
    methods); the parsed ``command`` names the subcommand.

    Examples
    --------
    >>> from linop_trace.cli import build_parser
    >>> args = build_parser().parse_args(["trace", "A.npz", "--threads", "1"])
    >>> args.command, args.method, args.threads
    ('trace', 'auto', 1)
    """
    from .. import __version__

    parser = OneLineParser(
        prog=PROG,
        description="Trace, diagonal and row sums of a matrix file, with error bars.",
        epilog="Run `linop-trace demo` to see every estimator on a real problem.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)

    for name, text in (
        ("trace", "the trace"),
        ("diagonal", "the main diagonal"),
        ("rowsums", "the row sums A @ 1 (exact, one matvec)"),
    ):
        sub = commands.add_parser(
            name, help=text, description=f"{text[0].upper()}{text[1:]} of a matrix file."
        )
        sub.add_argument("file", metavar="FILE", help="a .npy, .npz, .mtx or .mtx.gz file")
        _add_common(sub)
        if name == "rowsums":
            sub.add_argument(
                "--dtype",
                choices=DTYPES,
                help="compute dtype (default: the file's, integers as float64)",
            )
        else:
            _add_estimation(sub, name)
        if name != "trace":
            sub.add_argument(
                "--output",
                metavar="FILE",
                help="write the vector to FILE.npy or FILE.csv (with --json the JSON then "
                'names the file under "output" and leaves out value, stderr and interval)',
            )

    demo = commands.add_parser(
        "demo",
        help="every estimator on a real problem",
        description=(
            "The trace of a real matrix by every registered method: the Hessian of a small MLP on "
            "scikit-learn's digits (torch or JAX), or a bundled sparse graph Laplacian (any "
            "backend). By default the Hessian on torch when torch and scikit-learn are "
            "installed, else the sparse matrix."
        ),
    )
    demo.add_argument(
        "--problem",
        choices=("auto", "hessian", "sparse"),
        default="auto",
        help=(
            "hessian: on --backend torch (default) or jax; sparse: on any backend; auto "
            "(default): the torch Hessian when torch and scikit-learn are installed and no "
            "--backend is given, else the sparse matrix"
        ),
    )
    demo.add_argument(
        "--matvecs",
        type=_positive_int,
        default=DEFAULT_NUM_MATVECS,
        help="budget per estimator (default %(default)s)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument(
        "--confidence", type=_level, default=0.95, help="level of the intervals (default 0.95)"
    )
    demo.add_argument("--block-size", type=_positive_int, help="most columns per operator call")
    _add_common(
        demo,
        backend_default=None,
        backend_help="array library to compute in (default: torch for the Hessian, numpy for "
        "the sparse matrix)",
    )

    methods = commands.add_parser(
        "methods",
        help="list the registered methods",
        description="The registered method names and what each estimates.",
    )
    methods.add_argument("--json", action="store_true", help="print JSON")
    methods.add_argument("--debug", action="store_true", help="show the traceback of an error")
    methods.set_defaults(quiet=False)
    return parser
