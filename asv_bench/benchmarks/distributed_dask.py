"""Dask on a dask.distributed LocalCluster: overhead, strong scaling, memory, the largest run.

The problem is the 5-point Laplacian on a k x k grid (n = k^2, 5 nonzeros a row), built
block by block on the workers (``linop_trace._testing.poisson_2d_dask``, SciPy CSR
blocks) and persisted there; probes are Rademacher, drawn on the workers. Every worker
process has one thread, as does the in-process SciPy run it is compared with
(OMP/OpenBLAS pinned to 1 in the workers' environment too).

- ``TrackDaskOverhead.track_ratio``: Hutchinson with m = 64 at n = 10^6, the time on a
  LocalCluster of one worker over the time of the same call on the SciPy matrix in this
  process (best of 3 each, the two runs alternated). Target <= 1.3.
- ``TrackDaskStrongScaling.track_speedup``: Hutchinson with m = 64 at n = 4 x 10^6 (4
  row blocks), on 1 worker over 2 workers (best of 3 each, one cluster after the
  other). Target >= 1.6 (it needs two free cores; the scheduler shares them too).
- ``TrackDaskWorkerMemory.track_peak_ratio``: at n = 4 x 10^6 on 2 workers (4 row
  blocks), per worker, its peak resident memory
  during one estimate (the peak reset after the matrix was built, Linux's ``VmHWM``)
  less its memory when idle before the matrix was built, divided by the bytes of its row
  block of A plus its row block of the probes; the largest over the 2 workers. Target
  <= 1.5.
- ``TrackDaskLargestRun``: Hutchinson and XTrace with m = 32 at k = 4000 (n = 1.6 x 10^7,
  8 x 10^7 nonzeros) on 2 workers: seconds and the peak resident memory of a worker
  (GiB). Minutes of work: run it by name.

**Workers' malloc.** Dask starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536``
(glibc): freed memory goes back to the system at once, so that the worker's reported
memory falls, and every large temporary (a probe chunk, a product chunk: 64-128 MB here)
is fresh memory that page-faults in again. A worker then drew the same probe chunk in
0.23-0.42 s instead of 0.11-0.15 s in this process. These benchmarks start the workers
without it, as a cluster running these estimates should (``distributed.nanny.
pre-spawn-environ`` in Dask's configuration); ``LINOP_TRACE_BENCH_DASK_TRIM=1`` keeps it.

Run ``python -m benchmarks.distributed_dask`` from ``asv_bench/`` to print every number
(``--largest`` adds the largest run). Skipped (``NotImplementedError``) without dask,
distributed or SciPy.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from typing import Any

PAGE = 4096
OVERHEAD_K = 1000  # n = 10^6
SCALING_K = 2000  # n = 4 x 10^6
PROBES = 64
LARGEST_K = 4000  # n = 1.6 x 10^7
LARGEST_PROBES = 32
REPEATS = 3
ONE_THREAD = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def _require() -> None:
    for module in ("dask", "distributed", "scipy"):
        if importlib.util.find_spec(module) is None:
            raise NotImplementedError(f"{module} is not installed")
    os.environ.update(ONE_THREAD)


def _chunk_rows(n: int, blocks: int) -> int:
    """Rows a block, for ``blocks`` row blocks: a whole number of probe pages."""
    rows = -(-n // blocks)
    return -(-rows // PAGE) * PAGE


def _cluster(workers: int) -> Any:
    """A LocalCluster of ``workers`` one-thread worker processes, started without the
    ``MALLOC_TRIM_THRESHOLD_=65536`` Dask gives its workers by default (see the module's
    notes); ``LINOP_TRACE_BENCH_DASK_TRIM=1`` keeps Dask's default."""
    import dask
    from distributed import LocalCluster

    environ = dict(ONE_THREAD)
    if os.environ.get("LINOP_TRACE_BENCH_DASK_TRIM") == "1":
        environ["MALLOC_TRIM_THRESHOLD_"] = "65536"
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        return LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            memory_limit=0,
            silence_logs=logging.ERROR,
        )


def _resident_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _reset_peak() -> bool:
    """Start this process's peak resident memory afresh (Linux: ``clear_refs`` 5 resets
    ``VmHWM``); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def _peak_bytes() -> int:
    """This process's peak resident memory since it started or :func:`_reset_peak`."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # (kB)
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # (Linux: KiB)


def _best(run: Any, repeats: int = REPEATS) -> float:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return min(seconds)


def _matrix_bytes(matrix: Any) -> int:
    return int(matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes)


class _DaskRun:
    """A LocalCluster of ``workers`` holding the Poisson matrix of grid ``k`` (persisted,
    ``blocks`` row and column blocks) and the estimate to run on it."""

    def __init__(self, k: int, workers: int, blocks: int, method: str, probes: int) -> None:
        from distributed import Client, wait

        import linop_trace as lt
        from linop_trace._testing import poisson_2d_dask

        self.cluster = _cluster(workers)
        self.client = Client(self.cluster)
        self.idle = self.client.run(_resident_bytes)
        matrix = poisson_2d_dask(k, _chunk_rows(k * k, blocks)).persist()
        wait(matrix)
        self.operator = lt.aslinearoperator(matrix)  # (counts the blocks' spans once)
        self.method, self.probes = method, probes

    def reset_peaks(self) -> None:
        """Forget the workers' peaks so far (building the matrix has its own)."""
        self.client.run(_reset_peak)

    def estimate(self) -> float:
        import linop_trace as lt

        result = lt.trace(self.operator, method=self.method, num_matvecs=self.probes, seed=0)
        return float(result.value)

    def peaks(self) -> dict[str, int]:
        """Each worker's peak resident memory over its idle memory, in bytes."""
        peaks = self.client.run(_peak_bytes)
        return {worker: peaks[worker] - self.idle[worker] for worker in peaks}

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


def _scipy_seconds(k: int, method: str, probes: int) -> tuple[float, Any]:
    import linop_trace as lt
    from linop_trace._testing import poisson_2d_block

    n = k * k
    matrix = poisson_2d_block(k, (0, n), (0, n))
    seconds = _best(lambda: lt.trace(matrix, method=method, num_matvecs=probes, seed=0))
    return seconds, matrix


def overhead_ratio() -> float:
    """Dask (1 worker, 2 row blocks) over in-process SciPy, Hutchinson, n = 10^6, m = 64."""
    import linop_trace as lt
    from linop_trace._testing import poisson_2d_block

    n = OVERHEAD_K**2
    local = poisson_2d_block(OVERHEAD_K, (0, n), (0, n))
    run = _DaskRun(OVERHEAD_K, 1, 2, "hutchinson", PROBES)
    try:
        run.estimate()  # warm-up: imports and the workers' first tasks
        dask_seconds, scipy_seconds = [], []
        for _ in range(REPEATS):  # alternated, so a noisy moment hits both
            dask_seconds.append(_best(run.estimate, 1))
            scipy_seconds.append(
                _best(lambda: lt.trace(local, method="hutchinson", num_matvecs=PROBES, seed=0), 1)
            )
    finally:
        run.close()
    return min(dask_seconds) / min(scipy_seconds)


def scaling_seconds(workers: int, k: int = SCALING_K) -> float:
    """Best-of-3 seconds of the Hutchinson estimate on ``workers`` workers (4 row blocks)."""
    run = _DaskRun(k, workers, 4, "hutchinson", PROBES)
    try:
        run.estimate()
        return _best(run.estimate)
    finally:
        run.close()


def memory_ratio(workers: int = 2, k: int = SCALING_K) -> float:
    """The largest worker's (peak - idle) over (its row block of A + of the probes)."""
    from linop_trace._testing import poisson_2d_block

    n = k * k
    run = _DaskRun(k, workers, 2 * workers, "hutchinson", PROBES)
    try:
        run.estimate()  # warm-up
        run.reset_peaks()
        run.estimate()
        peaks = run.peaks()
    finally:
        run.close()
    share = (_matrix_bytes(poisson_2d_block(k, (0, n), (0, n))) + n * PROBES * 8) / workers
    return max(peaks.values()) / share


def largest_run(method: str) -> tuple[float, float]:
    """Seconds and the largest worker peak (GiB) of one estimate at k = 4000, m = 32."""
    run = _DaskRun(LARGEST_K, 2, 8, method, LARGEST_PROBES)
    try:
        run.reset_peaks()
        seconds = _best(run.estimate, 1)
        peak = max(run.peaks().values()) / 2**30
    finally:
        run.close()
    return seconds, peak


class TrackDaskOverhead:
    """Hutchinson at n = 10^6, m = 64: one Dask worker over in-process SciPy."""

    unit = "ratio"
    timeout = 900

    def setup(self) -> None:
        _require()

    def track_ratio(self) -> float:
        return overhead_ratio()


class TrackDaskStrongScaling:
    """Hutchinson at n = 4 x 10^6, m = 64: seconds on 1 worker over seconds on 2."""

    unit = "speed-up"
    timeout = 900

    def setup(self) -> None:
        _require()

    def track_speedup(self) -> float:
        return scaling_seconds(1) / scaling_seconds(2)


class TrackDaskWorkerMemory:
    """Per worker: (peak - idle) resident memory over its row blocks of A and probes."""

    unit = "ratio"
    timeout = 900

    def setup(self) -> None:
        _require()

    def track_peak_ratio(self) -> float:
        return memory_ratio()


class TrackDaskLargestRun:
    """k = 4000 (n = 1.6 x 10^7), m = 32, 2 workers: seconds and a worker's peak GiB."""

    params = ["hutchinson", "xtrace"]
    param_names = ["method"]
    timeout = 1800

    def setup(self, method: str) -> None:
        _require()
        self.result = largest_run(method)

    def track_seconds(self, method: str) -> float:
        return self.result[0]

    track_seconds.unit = "seconds"  # type: ignore[attr-defined]

    def track_worker_peak_gib(self, method: str) -> float:
        return self.result[1]

    track_worker_peak_gib.unit = "GiB"  # type: ignore[attr-defined]


if __name__ == "__main__":
    _require()
    print(f"overhead, 1 worker / SciPy in process: {overhead_ratio():.2f}", flush=True)
    one, two = scaling_seconds(1), scaling_seconds(2)
    print(f"strong scaling: 1 worker {one:.2f} s, 2 workers {two:.2f} s: {one / two:.2f}x")
    print(f"worker memory, (peak - idle) / (A rows + probe rows): {memory_ratio():.2f}")
    if "--largest" in sys.argv:
        for method in TrackDaskLargestRun.params:
            seconds, peak = largest_run(method)
            print(f"largest run, {method}: {seconds:.1f} s, worker peak {peak:.2f} GiB")
