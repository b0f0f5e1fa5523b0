"""The command line's grammar: subcommands, options, their checks and help texts. Parsing
only; :mod:`._main` runs what was parsed."""

from __future__ import annotations

import argparse
import math
from typing import Any

from .. import _spectral as spectral_sums
from .._eigen import WHICH
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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
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


def _add_lanczos(parser: argparse.ArgumentParser) -> None:
    """Options of ``logdet`` and ``spectrum``: the budget and probes of stochastic Lanczos
    quadrature, and the compute dtype."""
    steps, probes = spectral_sums.DEFAULT_LANCZOS_STEPS, spectral_sums.DEFAULT_NUM_PROBES
    parser.add_argument(
        "--matvecs",
        type=_positive_int,
        help=f"budget of operator applications, probes x Lanczos steps, at least 2 probes "
        f"(default {probes} probes: {probes * steps} at {steps} steps)",
    )
    parser.add_argument(
        "--lanczos-steps",
        type=_positive_int,
        metavar="K",
        help=f"Lanczos steps (quadrature nodes) per probe, at least 2 (default {steps}, at most n)",
    )
    parser.add_argument(
        "--seed", type=int, help="random seed (default: fresh, reported in the output)"
    )
    parser.add_argument("--probe", choices=PROBES, help="probe distribution (default rademacher)")
    parser.add_argument("--block-size", type=_positive_int, help="most columns per operator call")
    parser.add_argument(
        "--dtype", choices=DTYPES, help="compute dtype (default: the file's, integers as float64)"
    )


def _add_spectral_commands(commands: Any) -> None:
    """``logdet``, ``spectrum`` and ``eigs``: Lanczos on a symmetric (Hermitian) matrix."""
    file_help = "a .npy, .npz, .mtx or .mtx.gz file holding a symmetric (Hermitian) matrix"
    logdet = commands.add_parser(
        "logdet",
        help="log det A of a symmetric positive definite matrix",
        description="The log-determinant of a symmetric (Hermitian) positive definite matrix "
        "file by stochastic Lanczos quadrature, with an interval that adds the estimated "
        "quadrature error to the probes' standard error.",
    )
    logdet.add_argument("file", metavar="FILE", help=file_help)
    _add_common(logdet)
    # read when the parser is built: a method added to the library is offered here too
    logdet.add_argument(
        "--method",
        choices=spectral_sums.METHODS,
        default="slq",
        help="slq: stochastic Lanczos quadrature (default); slq++: deflated SLQ, for "
        "decaying spectra (a block Krylov space of the top takes a third of the budget); "
        "exact: the eigenvalues of the matrix formed from n products (small matrices)",
    )
    _add_lanczos(logdet)
    logdet.add_argument(
        "--confidence", type=_level, default=0.95, help="level of the interval (default 0.95)"
    )

    spectrum = commands.add_parser(
        "spectrum",
        help="the eigenvalue distribution (spectral density)",
        description="The eigenvalue distribution of a symmetric (Hermitian) matrix file by "
        "stochastic Lanczos quadrature: its range, quantiles and a histogram of the "
        "estimated eigenvalue counts, and with --plot the smoothed density.",
    )
    spectrum.add_argument("file", metavar="FILE", help=file_help)
    _add_common(spectrum)
    _add_lanczos(spectrum)
    spectrum.add_argument(
        "--width",
        type=_positive_float,
        help="width of the Gaussian kernel that smooths the density (default: the range of "
        "the Ritz values / (4 K))",
    )
    spectrum.add_argument(
        "--plot", metavar="FILE.png", help="plot the smoothed density (.png, .pdf or .svg)"
    )
    spectrum.add_argument(
        "--log",
        action="store_true",
        help="a logarithmic density axis in the plot, where a few outliers stay visible "
        "next to the bulk (needs --plot)",
    )

    eigs = commands.add_parser(
        "eigs",
        help="the extreme eigenvalues",
        description="The k largest, smallest or both-end eigenvalues of a symmetric "
        "(Hermitian) matrix file by restarted block Lanczos, with their residual norms.",
    )
    eigs.add_argument("file", metavar="FILE", help=file_help)
    _add_common(eigs)
    eigs.add_argument(
        "-k", type=_positive_int, default=6, metavar="K", help="number of eigenvalues (default 6)"
    )
    eigs.add_argument(
        "--which",
        choices=WHICH,
        default="largest",
        help="algebraically largest (default), smallest, or ceil(K/2) largest and "
        "floor(K/2) smallest",
    )
    eigs.add_argument(
        "--tol",
        type=_positive_float,
        default=1e-6,
        help="stop when every residual norm |A x - theta x| <= tol x the largest |Ritz value| "
        "(default %(default)g)",
    )
    eigs.add_argument(
        "--max-matvecs",
        type=_positive_int,
        help="budget of operator applications (default max(1000, 50 K), at most 50 n); a run "
        "that spends it unconverged says so on stderr",
    )
    eigs.add_argument(
        "--block-size", type=_positive_int, help="columns per Krylov block (default K + 2)"
    )
    eigs.add_argument(
        "--seed", type=int, help="random seed (default: fresh, reported in the output)"
    )
    eigs.add_argument(
        "--dtype", choices=DTYPES, help="compute dtype (default: the file's, integers as float64)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``linop-trace`` (subcommands trace, diagonal, rowsums, logdet,
    spectrum, eigs, demo, methods); the parsed ``command`` names the subcommand.

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
        description="Trace, diagonal and row sums of a matrix file, with error bars; the "
        "log-determinant, eigenvalue distribution and extreme eigenvalues of a symmetric one.",
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

    _add_spectral_commands(commands)

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
        "--damping",
        type=_non_negative_float,
        default=0.0,
        help=(
            "add damping * I to the matrix (weight decay on a Hessian): its trace is known "
            "exactly, so the estimators estimate the matrix alone; the sparse matrix "
            "stores its diagonal, so there every method is exact, with 0 matvecs "
            "(default 0)"
        ),
    )
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
