"""Trace and diagonal of a kernel matrix that lives on a Dask cluster.

Run it against a running scheduler, or with nothing to start a local cluster::

    python cluster_dask.py tcp://scheduler:8786
    DASK_SCHEDULER_ADDRESS=tcp://scheduler:8786 python cluster_dask.py
    python cluster_dask.py                  # a LocalCluster: 2 processes, 1 thread each

The matrix is an RBF kernel over N random points in the unit square, scaled by an
amplitude that grows across the square, plus a small noise term on the diagonal:

    K[i, j] = a_i a_j exp(-|x_i - x_j|^2 / (2 LENGTH^2)) + NOISE [i == j].

Each worker computes its own row blocks of K from the seed: the client ships a small task
graph, never the matrix. The last line printed is ``RESULT {...}`` (JSON).
"""

from __future__ import annotations

import json
import os
import sys

import dask.array as da
import numpy as np
from dask.distributed import Client, LocalCluster

import linop_trace as lt

N = 4000  # rows and columns of K (128 MB in float64)
ROWS_PER_CHUNK = 1000  # one chunk is a block of whole rows
LENGTH = 0.1  # kernel length scale
NOISE = 1e-2
POINTS_SEED = 0  # the points, drawn on every worker from this seed
PROBE_SEED = 0
NUM_MATVECS = 120


def points() -> np.ndarray:
    """The N points, the same on every worker (drawn from POINTS_SEED)."""
    return np.random.default_rng(POINTS_SEED).uniform(size=(N, 2))


def kernel_rows(block_info=None) -> np.ndarray:
    """Rows ``start:stop`` of K, the row block that ``block_info`` locates."""
    (start, stop), _ = block_info[None]["array-location"]
    x = points()
    amplitude = 1.0 + x[:, 0]
    squared_distances = ((x[start:stop, None, :] - x[None, :, :]) ** 2).sum(axis=-1)
    rows = np.exp(-squared_distances / (2 * LENGTH**2))
    rows *= amplitude[start:stop, None] * amplitude[None, :]
    rows[np.arange(stop - start), np.arange(start, stop)] += NOISE
    return rows


def kernel_matrix() -> da.Array:
    """K as a Dask array chunked by rows; nothing is computed yet."""
    row_chunks = (ROWS_PER_CHUNK,) * (N // ROWS_PER_CHUNK)
    return da.map_blocks(
        kernel_rows, chunks=(row_chunks, (N,)), dtype=np.float64, meta=np.empty((0, 0))
    )


def summary(estimate: lt.Estimate) -> dict:
    low, high = estimate.ci(0.95)
    return {
        "trace": float(estimate.value),
        "stderr": float(estimate.stderr),
        "ci": [float(low), float(high)],
        "num_matvecs": estimate.num_matvecs,
    }


def main(address: str | None) -> dict:
    cluster = None
    if not address:
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None)
    with Client(address or cluster) as client:
        print(f"scheduler {client.scheduler.address}, {len(client.nthreads())} workers")
        # persist: compute K once, into the workers' memory, for all the estimates below
        K = kernel_matrix().persist()

        result: dict = {"n": N}
        # the exact trace reads the stored diagonal (cheap here; the estimators are for
        # matrices known through products only, and show what they cost and achieve)
        result["exact"] = float(lt.trace(K, method="exact").value)
        print(f"exact trace            {result['exact']:.4f}")
        for method in ("hutchinson", "xtrace"):
            estimate = lt.trace(K, method=method, num_matvecs=NUM_MATVECS, seed=PROBE_SEED)
            result[method] = summary(estimate)
            low, high = result[method]["ci"]
            print(
                f"{method:<10} trace      {result[method]['trace']:.4f}"
                f" +- {result[method]['stderr']:.4f}   95% CI [{low:.4f}, {high:.4f}]"
            )

        exact_diagonal = np.asarray(lt.diagonal(K, method="exact").value)
        diagonal = lt.diagonal(K, method="xdiag", num_matvecs=NUM_MATVECS, seed=PROBE_SEED)
        values = np.asarray(diagonal.value)  # computed already: reading it runs nothing
        errors = np.asarray(diagonal.stderr)
        print(f"exact diagonal[:4]     {np.array2string(exact_diagonal[:4], precision=4)}")
        print(f"xdiag diagonal[:4]     {np.array2string(values[:4], precision=4)}")
        print(f"         stderr[:4]     {np.array2string(errors[:4], precision=4)}")
        result["xdiag"] = {
            "exact_head": exact_diagonal[:4].tolist(),
            "head": values[:4].tolist(),
            "stderr_head": errors[:4].tolist(),
            "sum": float(values.sum()),
            "num_matvecs": diagonal.num_matvecs,
        }
    if cluster is not None:
        cluster.close()
    return result


if __name__ == "__main__":
    scheduler = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DASK_SCHEDULER_ADDRESS")
    print("RESULT " + json.dumps(main(scheduler)))
