"""``--threads N``: the threads NumPy's and SciPy's BLAS and OpenMP pools (and torch's,
when it is in use) compute with, capped for the duration of a computation."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from ._errors import CliError

__all__ = ["limited_threads"]


@contextlib.contextmanager
def limited_threads(count: int | None) -> Iterator[None]:
    """At most ``count`` threads in NumPy's and SciPy's BLAS and OpenMP pools (threadpoolctl)
    and in torch's intra-op pool, if torch is imported; ``None`` changes nothing.

    Without a cap the libraries keep their defaults (a thread per core), which
    oversubscribe the cores of a busy machine (the README's command line section has a
    measurement). JAX is left alone: XLA sizes its CPU threads when it starts, from
    ``XLA_FLAGS`` (e.g. ``--xla_cpu_multi_thread_eigen=false``). OpenMP's limit belongs to
    the thread that sets it: enter this in the thread that computes. The previous limits
    come back on exit.
    """
    if count is None:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        raise CliError(
            "--threads needs threadpoolctl, which is not installed (pip install threadpoolctl, "
            'or pip install -c constraints.txt -e ".[cli]" in the checkout)'
        ) from None
    # SciPy's own BLAS (its QR) is loaded on first use; threadpoolctl limits only the
    # libraries loaded when it is entered
    import scipy.linalg  # noqa: F401

    torch = sys.modules.get("torch")  # only when the run already uses it: never imported here
    before = torch.get_num_threads() if torch is not None else None
    with threadpool_limits(limits=count):
        if torch is not None:
            torch.set_num_threads(count)
        try:
            yield
        finally:
            if torch is not None:
                torch.set_num_threads(before)
