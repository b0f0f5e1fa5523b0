"""What ends a run of ``linop-trace``: :class:`CliError` for the user's bad input, and the
exit statuses."""

from __future__ import annotations

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_BROKEN_PIPE",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "PROG",
    "CliError",
    "one_line",
]

PROG = "linop-trace"
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


class CliError(Exception):
    """A problem with the user's input: reported as one line on stderr, exit status 2."""


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (its type's name when it has none)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__
