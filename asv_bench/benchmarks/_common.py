"""What the benchmark modules share: backends and devices, thread pinning, test operators.

A benchmark whose backend, device or method is not available here raises
``NotImplementedError`` in ``setup``; asv reports that combination as skipped (``n/a``),
so the suite never errors on a machine without torch, JAX or a GPU, nor before a method
is registered.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

BACKENDS = ["numpy", "torch", "jax"]
DEVICES = ["cpu", "cuda"]

#: Budget of operator applications of every timed estimator (the issue's m).
NUM_MATVECS = 100

TRACE_METHODS = ["hutchinson", "hutch++", "na-hutch++", "xtrace", "xnystrace"]
DIAGONAL_METHODS = ["hutchinson", "diag++", "xdiag"]

_pinned = None


def pin_threads() -> None:
    """One BLAS/OpenMP thread, one torch thread: timings comparable on a shared machine.

    Environment variables such as OMP_NUM_THREADS only act before NumPy is imported, which
    asv does before ``setup``; threadpoolctl changes the loaded BLAS in place. asv.conf.json
    also sets them (and XLA_FLAGS, which JAX reads at start-up) for every benchmark process.
    """
    global _pinned
    if _pinned is None:
        from threadpoolctl import threadpool_limits

        _pin_to_one_cpu()
        _pinned = threadpool_limits(limits=1)
    torch = _loaded("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def _pin_to_one_cpu() -> None:
    """Run this process on one CPU.

    XLA's CPU client sizes its thread pools from the CPUs the process may use and ignores
    the thread flags in XLA_FLAGS (JAX 0.10 ran a 4000 x 4000 by 4000 x 100 product on
    both cores of a 2-core machine with them set: 48 ms of wall time, 79 ms of CPU time).
    The affinity mask is the limit it obeys; it must be set before JAX creates its CPU
    client (its first array), so pin_threads runs first in every setup. NumPy and torch
    are pinned to one thread as well, so the mask changes nothing for them.
    """
    import os

    if not hasattr(os, "sched_setaffinity"):  # (macOS, Windows: thread limits only)
        return
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) > 1:
        os.sched_setaffinity(0, {allowed[-1]})


def _loaded(name: str) -> Any:
    import sys

    return sys.modules.get(name)


def require_method(name: str, quantity: str) -> None:
    """Skip (NotImplementedError) when ``name`` is not a registered ``quantity`` method."""
    import linop_trace

    if name not in linop_trace.available_methods(quantity):
        raise NotImplementedError(f"method {name!r} is not registered for {quantity}")


@dataclass
class Backend:
    """One array library on one device, as the benchmarks use it."""

    name: str
    device: str
    dense: Callable[[np.ndarray], Any]
    sparse: Callable[[sp.csr_array], Any]
    like: Callable[[], Any]
    sync: Callable[[Any], Any]


@functools.cache
def get_backend(name: str, device: str) -> Backend:
    """The backend, or NotImplementedError naming what is missing (asv skips it)."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}")
    if name == "numpy":
        if device != "cpu":
            raise NotImplementedError("NumPy and SciPy arrays live on the CPU only")
        return Backend(name, device, lambda a: a, lambda s: s, lambda: np.zeros(1), _no_sync)
    if name == "torch":
        try:
            import torch
        except ImportError as error:
            raise NotImplementedError(f"torch is not installed: {error}") from None
        if device == "cuda" and not torch.cuda.is_available():
            raise NotImplementedError("torch sees no CUDA device")
        where = torch.device(device)

        def torch_sparse(s: sp.csr_array) -> Any:
            s = sp.csr_array(s)
            return torch.sparse_csr_tensor(
                torch.from_numpy(s.indptr.astype(np.int64)),
                torch.from_numpy(s.indices.astype(np.int64)),
                torch.from_numpy(s.data),
                size=s.shape,
                device=where,
            )

        def torch_sync(value: Any) -> Any:
            if device == "cuda":
                torch.cuda.synchronize()
            return value

        return Backend(
            name,
            device,
            lambda a: torch.as_tensor(a, device=where),
            torch_sparse,
            lambda: torch.zeros(1, dtype=torch.float64, device=where),
            torch_sync,
        )
    if name == "jax":
        try:
            import jax
        except ImportError as error:
            raise NotImplementedError(f"jax is not installed: {error}") from None
        jax.config.update("jax_enable_x64", True)  # float64, like the other libraries
        import jax.numpy as jnp
        from jax.experimental import sparse as jsparse

        platform = "cpu" if device == "cpu" else "gpu"
        try:
            where = jax.devices(platform)[0]
        except RuntimeError:
            raise NotImplementedError(f"jax sees no {platform} device") from None

        def jax_sync(value: Any) -> Any:
            leaf = getattr(value, "value", value)
            if hasattr(leaf, "block_until_ready"):
                leaf.block_until_ready()
            return value

        return Backend(
            name,
            device,
            lambda a: jax.device_put(jnp.asarray(a), where),
            lambda s: jax.device_put(jsparse.BCOO.from_scipy_sparse(sp.coo_matrix(s)), where),
            lambda: jax.device_put(jnp.zeros(1, dtype=jnp.float64), where),
            jax_sync,
        )
    raise ValueError(f"unknown backend {name!r}")


def _no_sync(value: Any) -> Any:
    return value


def sync_estimate(backend: Backend, estimate: Any) -> Any:
    """Wait until an Estimate's (or an array's) value is computed (GPU/JAX are async)."""
    return backend.sync(getattr(estimate, "value", estimate))


@functools.lru_cache(maxsize=4)
def dense_psd(n: int) -> np.ndarray:
    """A dense symmetric positive definite n x n matrix (eigenvalues linspace(3, 1, n))."""
    from linop_trace._testing import test_matrix

    return test_matrix("flat", n, seed=0)


@functools.lru_cache(maxsize=4)
def sparse_psd(n: int, per_row: int = 10, seed: int = 0) -> sp.csr_array:
    """A sparse symmetric diagonally dominant (so positive definite) n x n CSR matrix.

    About ``2 * per_row + 1`` nonzeros per row: the size of problem (a mesh or graph
    operator) for which people use estimators instead of forming the matrix.
    """
    rng = np.random.default_rng(seed)
    count = n * per_row
    rows = rng.integers(0, n, count)
    cols = rng.integers(0, n, count)
    values = rng.standard_normal(count)
    B = sp.csr_array(sp.coo_array((values, (rows, cols)), shape=(n, n)))
    S = B + B.T
    margin = np.asarray(abs(S).sum(axis=1)).ravel() + 1.0
    return sp.csr_array(S + sp.diags(margin - S.diagonal()))


def laplacian_1d(n: int) -> sp.csr_array:
    """The 1-d Dirichlet Laplacian tridiag(-1, 2, -1): trace 2n, diagonal all 2."""
    return sp.csr_array(sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(n, n)))


#: Samples of each side of a ratio measured by :func:`interleaved_best`.
REPEATS = 7


def interleaved_best(
    calls: list[Callable[[], Any]], repeats: int = REPEATS, min_sample_seconds: float = 0.02
) -> list[float]:
    """Best seconds per call of each no-argument callable, timed in turn (a, b, a, b, ...).

    Timing the sides of a ratio alternately, in one process, keeps a change of the
    machine's load from moving one side only. A sample runs a callable ``number`` times in
    a row, ``number`` chosen once per callable so that a sample lasts at least
    ``min_sample_seconds``: a single sub-millisecond call would time the timer and the
    scheduler. Each callable must wait for its own result (GPU and JAX are asynchronous).
    """
    import math
    import time

    numbers = []
    for call in calls:  # (the callers have warmed up: compilation is not timed here)
        start = time.perf_counter()
        call()
        elapsed = time.perf_counter() - start
        numbers.append(min(1000, max(1, math.ceil(min_sample_seconds / max(elapsed, 1e-9)))))
    best = [math.inf] * len(calls)
    for _ in range(repeats):
        for index, (call, number) in enumerate(zip(calls, numbers)):
            start = time.perf_counter()
            for _ in range(number):
                call()
            best[index] = min(best[index], (time.perf_counter() - start) / number)
    return best
