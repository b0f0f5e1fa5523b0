"""``main``: parse the arguments, run the command, and turn every way a run can end into
an exit status and at most one line on stderr."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence

from ._commands import run_methods, run_quantity
from ._demos import run_demo
from ._errors import (
    EXIT_BAD_INPUT,
    EXIT_BROKEN_PIPE,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    PROG,
    CliError,
    one_line,
)
from ._parser import build_parser
from ._report import partial_summary
from ._spectral import run_eigs, run_logdet, run_spectrum

__all__ = ["main"]

#: What each subcommand runs.
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "trace": lambda args: run_quantity(args, "trace"),
    "diagonal": lambda args: run_quantity(args, "diagonal"),
    "rowsums": lambda args: run_quantity(args, "rowsums"),
    "logdet": run_logdet,
    "spectrum": run_spectrum,
    "eigs": run_eigs,
    "demo": run_demo,
    "methods": run_methods,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``linop-trace`` with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    0 on success, 2 for bad input (one line on stderr), 1 for an internal error,
    130 when interrupted.

    Examples
    --------
    >>> from linop_trace.cli import main
    >>> main(["methods"]) == 0  # doctest: +ELLIPSIS
    auto...
    True
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_BAD_INPUT
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return int(COMMANDS[args.command](args))
    except KeyboardInterrupt as interrupt:
        print(f"{PROG}: interrupted{partial_summary(interrupt)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader of stdout went away (`| head`): stop quietly, as other commands do
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (
        CliError,
        ValueError,
        TypeError,
        FloatingPointError,
        OSError,
        ImportError,
        NotImplementedError,
    ) as error:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as error:
        if debug:
            traceback.print_exc()
        print(
            f"{PROG}: internal error: {type(error).__name__}: {one_line(error)} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
