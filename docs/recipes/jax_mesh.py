"""Trace and diagonal of a matrix sharded by rows over a mesh of JAX devices.

On a machine with several GPUs (or TPU cores) the mesh takes them all::

    python jax_mesh.py

On a CPU, ask XLA for several host devices before JAX starts::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python jax_mesh.py

The matrix, A = G G^T / RANK + diag(d) with G a Gaussian (N, RANK) matrix, is made on the
mesh by a compiled function whose output is sharded by rows: no device ever holds all of
it. The estimates run plain and inside ``jax.jit``. The last line printed is
``RESULT {...}`` (JSON).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import linop_trace as lt

N = 2048  # rows: a multiple of the number of devices
RANK = 32  # rank of the low-rank part
MATRIX_SEED = 0
PROBE_SEED = 1
NUM_MATVECS = 96


def make_matrix(key: jax.Array) -> jax.Array:
    """A = G G^T / RANK + diag(d), with d rising from 0.5 to 1.5 along the rows."""
    G = jax.random.normal(key, (N, RANK), dtype=jnp.float32)
    return G @ G.T / RANK + jnp.diag(jnp.linspace(0.5, 1.5, N, dtype=jnp.float32))


def main() -> dict:
    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("x",))
    rows = NamedSharding(mesh, PartitionSpec("x", None))
    A = jax.jit(make_matrix, out_shardings=rows)(jax.random.key(MATRIX_SEED))
    print(f"{len(devices)} {devices[0].platform} devices; A {A.shape} sharded {A.sharding.spec}")

    key = jax.random.key(PROBE_SEED)
    trace = lt.trace(A, method="xtrace", num_matvecs=NUM_MATVECS, seed=key)
    diagonal = lt.diagonal(A, method="xdiag", num_matvecs=NUM_MATVECS, seed=key)

    @jax.jit
    def compiled(A: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        # inside the user's own jit: the same program, the same numbers
        estimate = lt.trace(A, method="xtrace", num_matvecs=NUM_MATVECS, seed=key)
        return estimate.value, estimate.stderr

    jit_value, jit_stderr = compiled(A, key)

    low, high = trace.ci(0.95)
    print(f"xtrace trace   {float(trace.value):.3f} +- {float(trace.stderr):.3f}")
    print(f"   under jit   {float(jit_value):.3f} +- {float(jit_stderr):.3f}")
    print(f"   sharding    {trace.value.sharding.spec} (a 0-d array replicated on the mesh)")
    print(f"xdiag diagonal {diagonal.value.shape} sharded {diagonal.value.sharding.spec}")
    return {
        "devices": len(devices),
        "matrix_spec": str(A.sharding.spec),
        "trace": float(trace.value),
        "stderr": float(trace.stderr),
        "ci": [float(low), float(high)],
        "jit_trace": float(jit_value),
        "jit_stderr": float(jit_stderr),
        "trace_spec": str(trace.value.sharding.spec),
        "diagonal_head": np.asarray(diagonal.value[:4]).tolist(),
        "diagonal_sum": float(diagonal.value.sum()),
        "diagonal_spec": str(diagonal.value.sharding.spec),
        "num_matvecs": trace.num_matvecs,
    }


if __name__ == "__main__":
    print("RESULT " + json.dumps(main()))
