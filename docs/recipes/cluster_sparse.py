"""Trace and diagonal of a sparse matrix held in blocks on a Dask cluster.

Run it against a running scheduler, or with nothing to start a local cluster::

    python cluster_sparse.py tcp://scheduler:8786 [K]
    python cluster_sparse.py                  # a LocalCluster: 2 processes, 1 thread each

The matrix is the 5-point Laplacian on a K x K grid (n = K^2 rows, 5 nonzeros a row),
chunked into square blocks of SciPy CSR matrices. Each block is built by a task on the
worker that keeps it: the client ships a small task graph, never the matrix. Its trace is
4 n, which the estimates are printed next to. The last line printed is ``RESULT {...}``.
"""

from __future__ import annotations

import json
import os
import sys

import dask.array as da
import numpy as np
import scipy.sparse as sp
from dask.distributed import Client, LocalCluster

import linop_trace as lt

K = 400  # grid side: n = 160,000 rows
BLOCKS = 4  # row (and column) blocks: 16 blocks, 10 of them hold entries
PROBE_SEED = 0
NUM_MATVECS = 64


def laplacian_block(k: int, block_info=None) -> sp.csr_matrix:
    """The block of the k x k grid's 5-point Laplacian that ``block_info`` locates."""
    (r0, r1), (c0, c1) = block_info[None]["array-location"]
    n = k * k
    i = np.arange(max(r0, c0 - k), min(r1, c1 + k))  # the rows that can reach c0..c1
    rows, cols, values = [], [], []
    for offset, value, inside in (
        (0, 4.0, np.ones(i.shape, dtype=bool)),
        (-1, -1.0, i % k != 0),  # left neighbour, not across the grid's edge
        (1, -1.0, i % k != k - 1),
        (-k, -1.0, i >= k),
        (k, -1.0, i < n - k),
    ):
        j = i + offset
        keep = inside & (j >= c0) & (j < c1)
        rows.append(i[keep] - r0)
        cols.append(j[keep] - c0)
        values.append(np.full(int(keep.sum()), value))
    entries = (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols)))
    return sp.csr_matrix(entries, shape=(r1 - r0, c1 - c0))


def laplacian(k: int) -> da.Array:
    """The Laplacian as a Dask array of CSR blocks; nothing is computed yet."""
    n = k * k
    size = -(-n // BLOCKS)
    sizes = tuple(min(size, n - start) for start in range(0, n, size))
    return da.map_blocks(  # (no input array: chunks gives every block's size)
        laplacian_block,
        k,
        chunks=(sizes, sizes),
        dtype=np.float64,
        meta=sp.csr_matrix((0, 0)),
    )


def summary(estimate: lt.Estimate) -> dict:
    low, high = estimate.ci(0.95)
    return {
        "trace": float(estimate.value),
        "stderr": float(estimate.stderr),
        "ci": [float(low), float(high)],
        "num_matvecs": estimate.num_matvecs,
    }


def main(address: str | None, k: int) -> dict:
    cluster = None
    if not address:
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None)
    with Client(address or cluster) as client:
        print(f"scheduler {client.scheduler.address}, {len(client.nthreads())} workers")
        A = laplacian(k).persist()  # build the blocks once, where they will stay
        result: dict = {"n": k * k, "exact": float(lt.trace(A, method="exact").value)}
        print(f"exact trace (4 n)      {result['exact']:.1f}")
        for method in ("hutchinson", "xtrace"):
            estimate = lt.trace(A, method=method, num_matvecs=NUM_MATVECS, seed=PROBE_SEED)
            result[method] = summary(estimate)
            low, high = result[method]["ci"]
            print(
                f"{method:<10} trace      {result[method]['trace']:.1f}"
                f" +- {result[method]['stderr']:.1f}   95% CI [{low:.1f}, {high:.1f}]"
            )
        diagonal = lt.diagonal(A, method="exact").value  # the blocks' own diagonals
        result["diagonal"] = {"min": float(diagonal.min()), "max": float(diagonal.max())}
        print(f"exact diagonal         {result['diagonal']}")
    if cluster is not None:
        cluster.close()
    return result


if __name__ == "__main__":
    scheduler = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DASK_SCHEDULER_ADDRESS")
    side = int(sys.argv[2]) if len(sys.argv) > 2 else K
    print("RESULT " + json.dumps(main(scheduler or None, side)))
