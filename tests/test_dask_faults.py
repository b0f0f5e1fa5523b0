"""Dask arrays given bad input, and a worker lost mid-estimate (issue 21, "Bad input and
faults").

- A Dask operator takes NumPy blocks (wrapped as Dask arrays) and Dask blocks of any
  chunking (rechunked to the matrix's chunks they meet), without computing anything; an
  operator of another library refuses a Dask block rather than compute it into memory.
- A worker killed while an estimate runs: Dask recomputes what it held and the estimate
  is the one an undisturbed run gives with the same seed.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

import dask  # noqa: E402
import scipy.sparse.linalg as spla  # noqa: E402

import linop_trace as lt  # noqa: E402
from linop_trace._backend import dask_probe_block  # noqa: E402

N = 700
SEED = 3


def _refuse_compute(*args, **kwargs):
    raise AssertionError("a graph was computed")


def _nothing_computed():
    """Within it, computing any Dask graph fails the test (building one is fine)."""
    return dask.config.set(scheduler=_refuse_compute)


@pytest.fixture(scope="module")
def matrix() -> np.ndarray:
    rng = np.random.default_rng(0)
    M = rng.standard_normal((N, N)) / np.sqrt(N)
    return M + M.T + np.diag(np.linspace(1.0, 3.0, N))


def _reads_whole_chunks(product: da.Array, matrix: da.Array) -> bool:
    """Whether the matrix's chunks go into ``product``'s matmul as they are: no rechunk
    of the (m, n) matrix, only of the (n, k) block, if any."""
    graph = product.dask
    readers = [name for name, needs in graph.dependencies.items() if matrix.name in needs]
    return bool(readers) and all(name.startswith("matmul") for name in readers)


# ------------------------------------------------------------- NumPy and Dask blocks mixed
@pytest.mark.parametrize("product", ["matmat", "rmatmat"])
def test_numpy_block_is_wrapped_like_the_matrix(matrix, product):
    A = da.from_array(matrix, chunks=(250, 300))
    operator = lt.aslinearoperator(A)
    block = np.random.default_rng(1).standard_normal((N, 3))
    with _nothing_computed():
        image = getattr(operator, product)(block)
    assert isinstance(image, da.Array)
    assert _reads_whole_chunks(image, A)
    expected = matrix @ block if product == "matmat" else matrix.T @ block
    np.testing.assert_allclose(image.compute(scheduler="sync"), expected, rtol=1e-12)


def test_numpy_vector_gives_a_dask_vector(matrix):
    operator = lt.aslinearoperator(da.from_array(matrix, chunks=(250, 300)))
    x = np.linspace(-1.0, 1.0, N)
    with _nothing_computed():
        y = operator @ x
    assert isinstance(y, da.Array) and y.shape == (N,)
    np.testing.assert_allclose(y.compute(scheduler="sync"), matrix @ x, rtol=1e-12)


def test_numpy_block_is_read_when_given(matrix):
    """The graph holds a copy: writing into the block afterwards changes nothing."""
    operator = lt.aslinearoperator(da.from_array(matrix, chunks=(250, 300)))
    block = np.ones((N, 2))
    image = operator.matmat(block)
    block[:] = 0.0
    np.testing.assert_allclose(image.compute(scheduler="sync"), matrix @ np.ones((N, 2)))


@pytest.mark.parametrize("product", ["matmat", "rmatmat"])
def test_dask_block_of_other_chunks_is_rechunked(matrix, product):
    A = da.from_array(matrix, chunks=(250, 300))
    operator = lt.aslinearoperator(A)
    values = np.random.default_rng(2).standard_normal((N, 4))
    block = da.from_array(values, chunks=(400, 3))
    with _nothing_computed():
        image = getattr(operator, product)(block)
    assert isinstance(image, da.Array)
    assert _reads_whole_chunks(image, A)  # Dask alone would rechunk the matrix here
    met = A.chunks[0] if product == "matmat" else A.chunks[1]
    assert image.chunks[0] == met
    expected = matrix @ values if product == "matmat" else matrix.T @ values
    np.testing.assert_allclose(image.compute(scheduler="sync"), expected, rtol=1e-12)


def test_mixed_blocks_through_the_algebra(matrix):
    """Sums, adjoints and functions pass a NumPy block on; each matrix cuts it itself."""
    A = da.from_array(matrix, chunks=(250, 300))
    base = lt.aslinearoperator(A)
    function = lt.LinearOperator.from_callable(matmat=lambda X: A @ X, shape=(N, N), like=A)
    block = np.random.default_rng(3).standard_normal((N, 2))
    cases = [(base + 2 * base.H, 3 * matrix), (base.T @ base, matrix.T @ matrix)]
    cases.append((function, matrix))
    for operator, dense in cases:
        with _nothing_computed():
            image = operator.matmat(block)
        assert isinstance(image, da.Array)
        np.testing.assert_allclose(image.compute(scheduler="sync"), dense @ block, rtol=1e-11)


def test_dask_block_to_another_library_is_refused(backend, matrix):
    operator = lt.aslinearoperator(backend.matrix(matrix))
    block = da.ones((N, 3), chunks=(250, 3))
    with _nothing_computed(), pytest.raises(TypeError) as error:
        operator.matmat(block)
    message = str(error.value)
    assert f"`matmat` got a dask array on cpu (float64, shape ({N}, 3))" in message
    assert "never computed into memory" in message and "X.compute()" in message
    if operator.library == "numpy":  # (SciPy's sparse matrices too)
        assert "dask.array.from_array" in message  # or give the operator a Dask matrix
    else:
        assert f"convert it to {operator.library}" in message


def test_dask_block_to_a_scipy_linear_operator_is_refused(matrix):
    operator = lt.aslinearoperator(spla.aslinearoperator(matrix))
    with _nothing_computed(), pytest.raises(TypeError, match="never computed into memory"):
        operator.rmatvec(da.ones(N, chunks=250))


def test_function_that_computes_the_graph_is_refused(matrix):
    A = da.from_array(matrix, chunks=(250, 300))
    computes = lt.LinearOperator.from_callable(
        matmat=lambda X: matrix @ X.compute(scheduler="sync"), shape=(N, N), like=A
    )
    with pytest.raises(TypeError, match="`matmat` returned a numpy array.*computed the Dask graph"):
        computes.matmat(da.ones((N, 2), chunks=(250, 2)))


# ------------------------------------------------------------- estimates are unchanged
def _by_hand(matrix: np.ndarray, num_matvecs: int) -> float:
    """Hutchinson on the probes a Dask estimate with ``SEED`` draws."""
    Z = dask_probe_block("rademacher", SEED, (N, num_matvecs), 0, np.float64)
    Z = Z.compute(scheduler="sync")
    return float(np.einsum("ij,ij->j", Z, matrix @ Z).mean())


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_estimates_do_not_depend_on_the_matrix_chunks(matrix, method):
    """Probe blocks cut in pages of 4096 rows meet matrices cut in other ways: the
    products rechunk the blocks, and the estimates are those of aligned chunks."""
    values = []
    with dask.config.set(scheduler="sync"):
        for chunks in [(250, N), (250, 300), (160, 90)]:
            estimate = lt.trace(
                da.from_array(matrix, chunks=chunks),
                method=method,
                num_matvecs=30,
                seed=SEED,
                block_size=10,
            )
            assert isinstance(estimate.value, da.Array)
            values.append((float(estimate), float(estimate.stderr.compute())))
    for value in values[1:]:
        np.testing.assert_allclose(value, values[0], rtol=1e-10)
    if method == "hutchinson":
        np.testing.assert_allclose(values[0][0], _by_hand(matrix, 30), rtol=1e-12)


# ------------------------------------------------------------------ a worker lost mid-run
SLOW_N = 1200
SLOW_ROWS = 150  # eight row chunks of the matrix, each taking SLOW_SECONDS to draw
SLOW_SECONDS = 0.3
WAIT_SECONDS = 30.0


@pytest.fixture(scope="module")
def cluster_client():
    """Two worker processes of one thread each, under nannies that restart them."""
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    with distributed.Client(cluster) as client:
        yield client
    cluster.close()


def _slowed_matrix(log: Path) -> da.Array:
    """A ``(SLOW_N, SLOW_N)`` Dask matrix drawn on the workers, chunk by chunk (each one
    from its row: the same values wherever and however often it is drawn), that takes
    a while to draw. Each draw leaves a file ``start-<row>-<pid>-<ns>`` in ``log`` and,
    when done, an ``end-...`` one. While a file ``log / "hold"`` exists, a worker's
    second and later draws wait for it to go: the test kills a worker that holds a drawn
    chunk and is drawing another."""

    def slow_chunk(template, block_info=None):  # nested: pickled by value for the workers
        row, pid = block_info[None]["array-location"][0][0], os.getpid()
        (log / f"start-{row}-{pid}-{time.time_ns()}").touch()
        chunk = np.random.default_rng([4, row]).standard_normal(template.shape) / SLOW_N
        chunk[:, row : row + template.shape[0]] += 2.0 * np.eye(template.shape[0])
        time.sleep(SLOW_SECONDS)
        drawn_before = any(path.name.startswith("end-") for path in log.glob(f"*-{pid}-*"))
        deadline = time.monotonic() + WAIT_SECONDS
        while drawn_before and (log / "hold").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        (log / f"end-{row}-{pid}-{time.time_ns()}").touch()
        return chunk

    template = da.empty((SLOW_N, SLOW_N), chunks=(SLOW_ROWS, SLOW_N))
    return template.map_blocks(slow_chunk, dtype=np.float64, meta=np.empty((0, 0)))


def _loads(log: Path) -> list[tuple[str, int, int]]:
    """``(event, row, pid)`` for each load event in ``log``."""
    events = []
    for path in log.glob("*-*-*-*"):
        event, row, pid, _ = path.name.split("-")
        events.append((event, int(row), int(pid)))
    return events


def _wait_for(condition, what: str):
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"timed out after {WAIT_SECONDS} s waiting for {what}")


def _held_in_a_second_load(log: Path) -> tuple[int, int] | None:
    """``(pid, row)`` of a worker that has loaded a chunk and is loading another one."""
    events = _loads(log)
    for pid in {pid for _, _, pid in events}:
        started = {row for event, row, p in events if p == pid and event == "start"}
        ended = {row for event, row, p in events if p == pid and event == "end"}
        if ended and started - ended:
            return pid, min(started - ended)
    return None


@pytest.mark.parametrize("method", ["hutchinson", "xtrace"])
def test_worker_lost_mid_estimate_changes_nothing(cluster_client, tmp_path, method):
    client = cluster_client

    def estimate(log: Path) -> lt.Estimate:
        log.mkdir(exist_ok=True)
        return lt.trace(_slowed_matrix(log), method=method, num_matvecs=40, seed=SEED)

    client.wait_for_workers(2, timeout=WAIT_SECONDS)
    undisturbed = estimate(tmp_path / "undisturbed")

    client.wait_for_workers(2, timeout=WAIT_SECONDS)
    pids = client.run(os.getpid)  # worker address -> process id
    log = tmp_path / "disturbed"
    log.mkdir()
    (log / "hold").touch()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(estimate, log)
        try:
            victim, row = _wait_for(lambda: _held_in_a_second_load(log), "a second load")
            os.kill(victim, signal.SIGKILL)
        finally:
            (log / "hold").unlink()
        disturbed = running.result(timeout=2 * WAIT_SECONDS)

    (lost,) = [address for address, pid in pids.items() if pid == victim]
    _wait_for(lambda: lost not in client.scheduler_info()["workers"], "the worker to be dropped")
    # the chunk it was loading was loaded again, to the end, by another process
    events = _loads(log)
    assert ("end", row, victim) not in events
    assert any(event == "end" and r == row and pid != victim for event, r, pid in events)

    np.testing.assert_allclose(float(disturbed), float(undisturbed), rtol=1e-12)
    np.testing.assert_allclose(
        float(disturbed.stderr.compute()), float(undisturbed.stderr.compute()), rtol=1e-12
    )
    assert disturbed.num_matvecs == undisturbed.num_matvecs == 40
