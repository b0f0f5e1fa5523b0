"""Trace of a data-parallel Hessian: each torchrun rank holds a shard of the data.

Launch it with torchrun (one node, two ranks; the same command on every node of a
multi-node run, with ``--nnodes``, ``--node-rank`` and ``--rdzv-endpoint``)::

    torchrun --nproc-per-node=2 torchrun_hessian.py

The model is a small MLP on scikit-learn's 8 x 8 digits (1,797 images, 1,480
parameters). Every rank builds the same model, takes every R-th digit, and runs the same
estimate with the same seed; each Hessian-vector product block is summed over the ranks
in one ``all_reduce``, so all ranks get the estimate of the Hessian of the loss on all
the digits. Rank 0 prints it; its last line is ``RESULT {...}`` (JSON).
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits

import linop_trace as lt

MODEL_SEED = 0  # the same initial weights on every rank
PROBE_SEED = 0  # the same probes on every rank: SPMD
NUM_MATVECS = 90


def digits(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """All the digits: images (1797, 64) scaled to [0, 1], labels (1797,)."""
    data = load_digits()
    images = torch.as_tensor(data.data / 16.0, dtype=torch.float32, device=device)
    labels = torch.as_tensor(data.target, dtype=torch.long, device=device)
    return images, labels


def mlp(device: torch.device) -> torch.nn.Module:
    """64 -> 20 -> 10 without biases, initialized from MODEL_SEED."""
    torch.manual_seed(MODEL_SEED)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 20, bias=False), torch.nn.Sigmoid(), torch.nn.Linear(20, 10, bias=False)
    )
    return model.to(device)


def main() -> dict | None:
    if torch.cuda.is_available():  # one GPU per rank
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()

    model, loss_fn = mlp(device), torch.nn.CrossEntropyLoss()
    images, labels = digits(device)
    # this rank's shard; in a real run, each rank would read only its own files
    shard = (images[rank::world_size], labels[rank::world_size])

    H = lt.hessian(model, loss_fn, shard, process_group=dist.group.WORLD)
    estimate = lt.trace(H, method="hutch++", num_matvecs=NUM_MATVECS, seed=PROBE_SEED)
    low, high = estimate.ci(0.95)
    result = {
        "ranks": world_size,
        "samples": int(shard[0].shape[0]),
        "parameters": H.shape[0],
        "trace": float(estimate.value),
        "stderr": float(estimate.stderr),
        "ci": [float(low), float(high)],
        "num_matvecs": estimate.num_matvecs,
    }
    dist.destroy_process_group()
    return result if rank == 0 else None


if __name__ == "__main__":
    torch.set_num_threads(1)  # one core per rank: leave the others to the other ranks
    result = main()
    if result is not None:
        print(
            f"{result['ranks']} ranks ({result['samples']} digits on rank 0), "
            f"{result['parameters']} parameters"
        )
        low, high = result["ci"]
        print(
            f"hutch++ Hessian trace {result['trace']:.5f} +- {result['stderr']:.5f}"
            f"   95% CI [{low:.5f}, {high:.5f}]"
        )
        print("RESULT " + json.dumps(result))
