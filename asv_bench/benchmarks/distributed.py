"""Data-parallel Hessian products on torch.distributed: 2 gloo ranks against 1.

The digits MLP (``digits_mlp_problem``) on all 1,797 digits, float32, one thread per
rank; each rank holds every R-th digit. ``TrackDataParallelHessian.track_seconds`` is
the wall time of H @ V for a block V of 100 Rademacher columns (100 HVPs and one
``all_reduce``), measured inside the ranks after a warm-up product (the slowest rank's
median of 5 rounds): torchrun's start-up and the imports are left out. Two ranks need
two free cores to show their speed-up.

Skipped (``NotImplementedError``) where torch or gloo is missing. Run
``python -m benchmarks.distributed`` from ``asv_bench/`` to print both numbers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

NUM_COLUMNS = 100
NUM_SAMPLES = 1797
ROUNDS = 5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_ranks(num_ranks: int) -> float:
    """Seconds per 100-column product with ``num_ranks`` ranks (the slowest rank's)."""
    with tempfile.TemporaryDirectory() as output:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={num_ranks}",
            "--nnodes=1",
            "--master-addr=127.0.0.1",
            f"--master-port={_free_port()}",
            str(Path(__file__).resolve()),
            output,
        ]
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=600)
        return max(
            json.loads((Path(output) / f"rank{r}.json").read_text()) for r in range(num_ranks)
        )


class TrackDataParallelHessian:
    """Seconds of one 100-HVP block product of the digits Hessian, by number of ranks."""

    params = [1, 2]
    param_names = ["ranks"]
    unit = "seconds"
    timeout = 600

    def setup(self, ranks: int) -> None:
        if importlib.util.find_spec("torch") is None:
            raise NotImplementedError("torch is not installed")
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_gloo_available()):
            raise NotImplementedError("torch.distributed with gloo is not available")

    def track_seconds(self, ranks: int) -> float:
        return _run_ranks(ranks)


def _rank_main(output: Path) -> None:
    """One rank: build the operator on this rank's digits, time the block products."""
    import statistics
    import time

    import torch
    import torch.distributed as dist

    import linop_trace as lt
    from linop_trace.autodiff._examples import digits_mlp_problem

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, ranks = dist.get_rank(), dist.get_world_size()
    model, loss_fn, (X, y) = digits_mlp_problem(NUM_SAMPLES)
    H = lt.hessian(model, loss_fn, (X[rank::ranks], y[rank::ranks]), process_group=dist.group.WORLD)
    generator = torch.Generator().manual_seed(0)
    V = torch.randint(0, 2, (H.shape[1], NUM_COLUMNS), generator=generator).float() * 2 - 1
    H @ V  # warm-up: torch.func's first transform, the route timing of mode="auto"
    seconds = []
    for _ in range(ROUNDS):
        dist.barrier()
        start = time.perf_counter()
        H @ V
        seconds.append(time.perf_counter() - start)
    (output / f"rank{rank}.json").write_text(json.dumps(statistics.median(seconds)))
    dist.destroy_process_group()


if __name__ == "__main__" and len(sys.argv) == 2 and "LOCAL_RANK" in os.environ:
    _rank_main(Path(sys.argv[1]))
elif __name__ == "__main__":
    for num_ranks in TrackDataParallelHessian.params:
        print(f"{num_ranks} rank(s): {_run_ranks(num_ranks):.3f} s per {NUM_COLUMNS} HVPs")
