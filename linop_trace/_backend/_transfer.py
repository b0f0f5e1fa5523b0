"""Moving values to NumPy, and waiting for devices."""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

from ._identity import _module_loaded, is_sparse
from ._sparse import sparse_to_dense

__all__ = ["block_until_ready", "synchronize", "to_numpy"]


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy copy of ``x`` (for files, printing and tests; never on a compute path)."""
    if is_sparse(x):
        x = sparse_to_dense(x)
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().resolve_conj().numpy()
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_numpy_array(x):
        return np.asarray(x)
    if array_api_compat.is_jax_array(x):
        if hasattr(x, "block_until_ready"):  # (then viewed: see read_bool; not a tracer)
            x.block_until_ready()
        return np.asarray(x)
    # array_api_strict and other libraries: via DLPack, then the buffer protocol.
    try:
        return np.from_dlpack(x)
    except Exception:
        return np.asarray(x)


def synchronize(device: Any) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU); used by benchmarks."""
    text = str(device)
    if text.startswith("cuda") and _module_loaded("torch"):
        import torch

        torch.cuda.synchronize(device)


def block_until_ready(x: Any) -> Any:
    """Wait until ``x`` is computed (JAX dispatches asynchronously); returns ``x``."""
    if array_api_compat.is_jax_array(x):
        return x.block_until_ready()
    return x
