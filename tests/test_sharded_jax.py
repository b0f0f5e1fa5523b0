"""JAX arrays sharded over a mesh of devices (``NamedSharding``) run the same estimators.

A mesh needs several devices, and JAX fixes its device count when it starts: with fewer
than four CPU devices here, one test runs this module again in a Python started with
``--xla_force_host_platform_device_count=4``, where the checks run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import linop_trace as lt  # noqa: E402
from linop_trace._testing import test_matrix  # noqa: E402

DEVICES = 4
SIZE = 256
BUDGET = 30
ROOT = Path(__file__).resolve().parents[1]
FOUR_DEVICES = len(jax.devices("cpu")) >= DEVICES
needs_mesh = pytest.mark.skipif(not FOUR_DEVICES, reason="runs in the four-device process")


def _estimates(method: str, quantity: str) -> bool:
    try:
        lt.estimators.get_estimator(method, quantity)
    except ValueError:
        return False
    return True


#: (quantity, method, tags) of every registered method ("auto" included).
CASES = [
    (quantity, method, ("symmetric", "positive_semidefinite") if method == "xnystrace" else ())
    for quantity in ("trace", "diagonal")
    for method in lt.available_methods()
    if _estimates(method, quantity)
]


@pytest.mark.skipif(FOUR_DEVICES, reason="this process has the devices: the checks run here")
def test_in_a_process_with_four_host_devices():
    """The checks below, in a Python whose JAX has four CPU devices: XLA_FLAGS holds the
    device count and the test sessions' compile-time flags (46 -> 38 s for the checks on
    the 2-core machine). While this was written, XLA's CPU collectives hung now and then
    on a one-core sandbox, with and without those flags, for sharded SLQ, which is
    therefore not tested here; the trace and diagonal checks never hung."""
    flags = (
        f"--xla_force_host_platform_device_count={DEVICES} "
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    )
    env = dict(os.environ, XLA_FLAGS=flags)
    env.setdefault("OMP_NUM_THREADS", "1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def mesh_setup():
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.devices("cpu")[:DEVICES]
    mesh = Mesh(np.array(devices), ("x",))
    values = test_matrix("poly", SIZE, seed=0)
    plain = jax.device_put(jnp.asarray(values), devices[0])
    rows = jax.device_put(plain, NamedSharding(mesh, PartitionSpec("x", None)))
    return mesh, plain, rows


def _ids(case):
    quantity, method, tags = case
    return f"{quantity}-{method}"


def _assert_close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.max(np.abs(want)))


def _on_the_mesh(array, mesh, spec):
    from jax.sharding import NamedSharding, PartitionSpec

    assert array.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(*spec)), array.ndim)


@needs_mesh
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_row_sharded_matrix_gives_the_unsharded_estimate(mesh_setup, case):
    """Same seed, same estimate to round-off, plain and under the user's ``jax.jit``; a
    trace (and an exact diagonal, read from the stored diagonal) comes back replicated on
    the mesh, a randomized diagonal sharded like the rows."""
    mesh, plain, rows = mesh_setup
    quantity, method, tags = case
    function = getattr(lt, quantity)
    key = jax.random.key(3)

    def estimate(matrix, key):
        operator = lt.aslinearoperator(matrix, tags=tags)
        return function(operator, method=method, num_matvecs=BUDGET, seed=key)

    reference = estimate(plain, key)
    sharded = estimate(rows, key)
    _assert_close(sharded.value, reference.value)
    if reference.stderr is not None:
        _assert_close(sharded.stderr, reference.stderr)
    jitted = jax.jit(lambda matrix, key: estimate(matrix, key).value)(rows, key)
    _assert_close(jitted, reference.value)
    spec = ("x",) if quantity == "diagonal" and sharded.method != "exact" else ()
    _on_the_mesh(sharded.value, mesh, spec)
    _on_the_mesh(jitted, mesh, spec)


@needs_mesh
@pytest.mark.parametrize("method", ["hutchinson", "xtrace"])
def test_the_sharded_operator_is_never_gathered(mesh_setup, method):
    """In the compiled program each device keeps its rows of A: no (n, n) array appears
    (probes are drawn, and the products computed, shard by shard)."""
    _, _, rows = mesh_setup
    program = jax.jit(
        lambda matrix, key: lt.trace(matrix, method=method, num_matvecs=BUDGET, seed=key).value
    )
    text = program.lower(rows, jax.random.key(0)).compile().as_text()
    assert f"f64[{SIZE},{SIZE}]" not in text


@needs_mesh
def test_exact_logdet_of_a_sharded_matrix(mesh_setup):
    """The exact spectral sum runs eagerly; its 0-d results are made on the mesh (a
    sharded array's device is its mesh, replicated)."""
    mesh, plain, rows = mesh_setup
    spd = lambda M: M @ M.T / SIZE + jax.numpy.eye(SIZE, device=M.sharding)  # noqa: E731
    reference = lt.logdet(spd(plain), method="exact")
    sharded = lt.logdet(spd(rows), method="exact")
    _assert_close(sharded.value, reference.value)
    _on_the_mesh(sharded.value, mesh, ())


@needs_mesh
def test_callable_operator_over_a_sharded_matrix(mesh_setup):
    """A products-only operator over a sharded matrix (eager: its probes are drawn on the
    operator's mesh) gives the unsharded estimate."""
    _, plain, rows = mesh_setup

    def operator(matrix):
        return lt.LinearOperator.from_callable(
            matmat=lambda X: matrix @ X, shape=matrix.shape, like=matrix
        )

    key = jax.random.key(3)
    reference = lt.trace(operator(plain), method="hutchinson", num_matvecs=BUDGET, seed=key)
    sharded = lt.trace(operator(rows), method="hutchinson", num_matvecs=BUDGET, seed=key)
    _assert_close(sharded.value, reference.value)


@needs_mesh
@pytest.mark.parametrize(
    "case", CASES + [("trace", "exact", ()), ("diagonal", "exact", ())], ids=_ids
)
def test_operator_of_functions_on_another_device(mesh_setup, case):
    """An operator known by functions over a matrix on a device other than the default
    one (a second GPU, here a second host device) runs eagerly: its probes, identity
    blocks and zeros must be made there. The draws followed their key, made on the
    default device, and the operator refused them ("devices are mixed"), every method;
    row and column sums and the exact walk made their blocks on the default device."""
    quantity, method, tags = case
    _, plain, _ = mesh_setup
    other = jax.device_put(plain, jax.devices("cpu")[1])

    def operator(matrix):
        return lt.LinearOperator.from_callable(
            matmat=lambda X: matrix @ X,
            rmatmat=lambda X: matrix.T @ X,
            shape=matrix.shape,
            like=matrix,
            tags=tags or ("symmetric",),
        )

    function = getattr(lt, quantity)
    reference = function(operator(plain), method=method, num_matvecs=BUDGET, seed=3)
    moved = function(operator(other), method=method, num_matvecs=BUDGET, seed=3)
    _assert_close(moved.value, reference.value)
    assert moved.value.devices() == {jax.devices("cpu")[1]}
    if quantity == "trace" and method == "exact":
        for sums in (lt.row_sums, lt.col_sums):
            result = sums(operator(other))
            _assert_close(result.value, sums(plain).value)
            assert result.value.devices() == result.stderr.devices() == {jax.devices("cpu")[1]}


@needs_mesh
@pytest.mark.parametrize("quantity", ["trace", "diagonal"])
def test_adaptive_estimate_over_a_sharded_matrix(mesh_setup, quantity):
    """An adaptive estimate runs eagerly, its later blocks drawn in chunks of the first
    width and joined: on the operator's mesh, the same estimate as unsharded."""
    _, plain, rows = mesh_setup
    function = getattr(lt, quantity)

    def estimate(matrix):
        operator = lt.LinearOperator.from_callable(
            matmat=lambda X: matrix @ X, shape=matrix.shape, like=matrix
        )
        return function(
            operator, method="hutchinson", num_matvecs=4, rtol=1e-4, max_matvecs=40, seed=5
        )

    reference, sharded = estimate(plain), estimate(rows)
    assert sharded.num_matvecs == reference.num_matvecs == 40  # blocks of 4, 4, 8, 16, 8
    _assert_close(sharded.value, reference.value)
    _assert_close(sharded.stderr, reference.stderr)
