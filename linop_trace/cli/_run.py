"""Running an estimate from the terminal: a progress bar that counts the operator's
products, and a worker thread so that Ctrl-C stops a long run at once."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from .. import _backend as backend
from .._estimate import Estimate
from .._operators import LinearOperator

__all__ = [
    "PARTIAL_METHODS",
    "elapsed",
    "exact_block_for_progress",
    "interruptible",
    "progress",
    "progress_wanted",
]

#: The progress bar appears only for estimates that run longer than this (seconds).
PROGRESS_DELAY = 1.0
#: Blocks the exact path is split into when a progress bar is shown.
PROGRESS_STEPS = 25
#: Methods whose interrupted runs give a partial estimate (Hutchinson's, and ``auto`` when
#: it runs Hutchinson): on Ctrl-C the CLI waits for the block in progress for them.
PARTIAL_METHODS = ("hutchinson", "auto")
#: How often (seconds) the main thread looks at the computing thread.
POLL_SECONDS = 0.05


class ProgressOperator(LinearOperator):
    """The user's operator, reporting each block of columns to a progress bar."""

    def __init__(self, inner: LinearOperator, update: Callable[[int], Any]) -> None:
        super().__init__(inner.shape, inner.dtype, inner.xp, inner.device, inner.tags)
        self.inner = inner
        self.update = update
        self.columns = 0

    def _count(self, out: Any, columns: int) -> Any:
        self.columns += columns
        self.update(columns)
        return out

    def _matmat(self, X: Any) -> Any:
        return self._count(self.inner.matmat(X), int(X.shape[1]))

    def _rmatmat(self, X: Any) -> Any:
        return self._count(self.inner.rmatmat(X), int(X.shape[1]))

    def to_dense(self, block_size: int | None = None) -> Any:
        return self.inner.to_dense(block_size)

    def _exact_diagonal(self) -> Any:
        return self.inner._exact_diagonal()  # the wrapped operator's structural fact


def progress_wanted(quiet: bool, stream: Any = None) -> bool:
    """Whether to draw a progress bar: on a terminal (stderr by default), without --quiet."""
    stream = sys.stderr if stream is None else stream
    if quiet:
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def progress(
    operator: LinearOperator, total: int, enabled: bool, label: str, stream: Any = None
) -> Iterator[LinearOperator]:
    """``operator`` wrapped so that a tqdm bar (after PROGRESS_DELAY seconds) counts matvecs."""
    if not enabled:
        yield operator
        return
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety: without tqdm, run without one
        yield operator
        return
    bar = tqdm(
        total=total,
        desc=label,
        unit="matvec",
        file=sys.stderr if stream is None else stream,
        delay=PROGRESS_DELAY,
        leave=False,
        dynamic_ncols=True,
    )
    try:
        yield ProgressOperator(operator, bar.update)
    finally:
        bar.close()


def exact_block_for_progress(n: int) -> int:
    """Identity columns per block on the exact path when a progress bar is shown.

    The default block may hold all n columns, so the bar would jump from 0 to n at the
    end; about PROGRESS_STEPS blocks let it move. Only the exact path is split this way:
    there the blocks do not change the result, while for randomized methods the block
    widths set the order of the random draws, and a terminal must not change a seeded
    estimate.
    """
    return max(1, math.ceil(n / PROGRESS_STEPS))


def interruptible(compute: Callable[[], Any], keeps_partial: bool) -> Any:
    """``compute()`` in a worker thread, the main thread waiting, so that Ctrl-C is seen at
    once even while a long library call (a product, a QR factorization) runs: Python
    handles a signal only between its own steps, in the main thread.

    On Ctrl-C, a method with partial estimates gets a ``KeyboardInterrupt`` raised in the
    worker at its next Python step, which comes when the block in progress is done, and
    its ``EstimateInterrupted`` (with the partial estimate) is raised here; a second
    Ctrl-C stops waiting. Other methods have nothing partial to give: the interrupt is
    raised here at once, and the worker (a daemon thread) ends with the process.
    """
    import threading

    outcome: dict[str, Any] = {}
    # an Event, not Thread.join: a join interrupted by Ctrl-C can report a running thread
    # as finished (CPython before 3.13)
    done = threading.Event()

    def work() -> None:
        try:
            outcome["value"] = compute()
        except BaseException as error:  # handed to the main thread
            outcome["error"] = error
        finally:
            done.set()

    worker = threading.Thread(target=work, name="linop-trace-estimate", daemon=True)
    worker.start()
    try:
        while not done.wait(POLL_SECONDS):
            pass
    except KeyboardInterrupt:
        if not keeps_partial or worker.ident is None:
            raise
        _raise_in_thread(worker.ident, KeyboardInterrupt)
        while not done.wait(POLL_SECONDS):  # a second Ctrl-C propagates from here
            pass
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _raise_in_thread(ident: int, exception: type[BaseException]) -> None:
    """Raise ``exception`` in the thread ``ident`` at its next Python step (CPython)."""
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exception))


def elapsed(start: float, estimate: Estimate, operator: LinearOperator) -> float:
    """Seconds since ``start`` once the estimate is computed (JAX and CUDA run async)."""
    backend.block_until_ready(estimate.value)
    backend.synchronize(operator.device)
    return time.perf_counter() - start
