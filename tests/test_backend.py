"""The backend layer: namespaces, devices, dtype promotion, seeded random sources."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import numpy_of

from linop_trace import _backend as backend_module
from linop_trace._probes import ProbeSampler


def test_namespace_and_device(backend):
    x = backend.matrix(np.eye(3))
    assert backend_module.array_namespace(x) is backend.xp
    assert backend_module.same_device(backend_module.device_of(x), backend.device)


def test_mixed_namespaces_name_both():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="numpy array on cpu .*and a torch array on cpu"):
        backend_module.array_namespace(np.ones(2), torch.ones(2))


@pytest.mark.parametrize(
    "source, expected",
    [
        ("int64", "default"),
        ("bool", "default"),
        ("float32", "float32"),
        ("float64", "float64"),
        ("complex128", "complex128"),
    ],
)
def test_dtype_promotion(dense_backend, source, expected):
    xp = dense_backend.xp
    dtype = dense_backend.dtype(source)
    promoted = backend_module.promote_to_float(xp, dtype)
    want = (
        backend_module.default_float_dtype(xp)
        if expected == "default"
        else dense_backend.dtype(expected)
    )
    assert promoted == want


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "sphere"])
def test_same_seed_same_probes_other_seed_other_probes(backend, kind):
    xp = backend.xp
    dtype = backend.dtype("float64")
    draw = lambda seed: numpy_of(ProbeSampler(kind, 50, xp, dtype, backend.device, seed)(4))  # noqa: E731
    np.testing.assert_array_equal(draw(3), draw(3))
    assert not np.array_equal(draw(3), draw(4))


def test_library_generators_are_accepted(dense_backend):
    xp, name = dense_backend.xp, dense_backend.library
    if name == "torch":
        import torch

        seed = torch.Generator().manual_seed(5)
    elif name == "jax":
        import jax

        seed = jax.random.key(5)
    else:
        seed = np.random.default_rng(5)
    block = ProbeSampler(
        "gaussian", 10, xp, dense_backend.dtype("float64"), dense_backend.device, seed
    )(3)
    assert tuple(block.shape) == (10, 3)
    assert backend_module.array_namespace(block) is xp


def test_torch_generator_lives_on_operator_device():
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xp

    source = backend_module.make_random_source(xp, torch.device("cpu"), 0)
    assert source._state.device == torch.device("cpu")


def test_describe_names_library_device_dtype():
    assert (
        backend_module.describe(np.ones((2, 3), dtype=np.float32))
        == "a numpy array on cpu (float32, shape (2, 3))"
    )


def test_to_numpy_round_trip(backend):
    values = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(numpy_of(backend.matrix(values)), values)


def test_finite_flag_is_exact(dense_backend):
    """The finiteness flag of a block says whether every entry is finite: a NaN or an
    infinity of either sign anywhere is caught, entries near the largest float (whose sums
    or differences overflow) are not mistaken for one, and an empty block is finite."""
    xp = dense_backend.xp
    for dtype in ("float32", "float64"):
        big = float(np.finfo(dtype).max) / 2
        blocks = {
            "plain": np.arange(12.0).reshape(4, 3),
            "nan": np.where(np.eye(4, 3) > 0, np.nan, 1.0),
            "+inf": np.full((4, 3), 2.0) + np.where(np.arange(12).reshape(4, 3) == 7, np.inf, 0),
            "-inf": np.full((4, 3), 2.0) - np.where(np.arange(12).reshape(4, 3) == 5, np.inf, 0),
            "huge, both signs": np.array([[big, -big, big], [-big, big, -big]]),
            "empty": np.zeros((0, 3)),
        }
        for label, values in blocks.items():
            x = dense_backend.asarray(values, dtype=dtype)
            flag = backend_module.finite_flag(xp, x)
            assert bool(numpy_of(flag)) == bool(np.all(np.isfinite(values))), (dtype, label)


def test_product_written_into_a_given_block(backend):
    """``_product_into`` gives ``A @ X`` on every backend. Stored NumPy matrices and
    torch CPU matrices (dense or CSR) write it into the given block (the Lanczos loop's
    products then fault in no fresh pages); the others return a fresh product."""
    from linop_trace import aslinearoperator

    rng = np.random.default_rng(0)
    M = rng.standard_normal((30, 30)) * (rng.random((30, 30)) < 0.2) + np.eye(30)
    X = rng.standard_normal((30, 4))
    holders = [backend.matrix(M)]
    if backend.name == "torch":
        holders.append(backend.asarray(M).to_sparse_csr())
    for held in holders:
        operator = aslinearoperator(held)
        block = backend.asarray(X, dtype=np.float64)
        out = backend.xp.zeros((30, 4), dtype=operator.dtype, device=backend.device)
        result = operator._product_into(block, out)
        np.testing.assert_allclose(numpy_of(result), M @ X, rtol=1e-12, atol=1e-12)
        stored_dense = type(held) is np.ndarray
        torch_cpu = backend.name == "torch"
        assert (result is out) == (stored_dense or torch_cpu), type(held)
        wrong = backend.xp.zeros((30, 5), dtype=operator.dtype, device=backend.device)
        fresh = operator._product_into(block, wrong)  # a block of another shape: not used
        assert fresh is not wrong
        np.testing.assert_allclose(numpy_of(fresh), M @ X, rtol=1e-12, atol=1e-12)


def test_subtract_scaled_columns_may_write_over_its_input(dense_backend):
    xp = dense_backend.xp
    if not backend_module.writes_in_place(dense_backend.asarray(np.ones((2, 2)))):
        pytest.skip(f"{dense_backend.name} arrays are not written in place")
    rng = np.random.default_rng(1)
    w, q = rng.standard_normal((50, 3)), rng.standard_normal((50, 3))
    scales = np.array([0.5, -2.0, 3.0])
    expected = w - q * scales
    W, Q = dense_backend.asarray(w), dense_backend.asarray(q)
    S = dense_backend.asarray(scales)
    out = xp.zeros_like(W)
    result = backend_module.subtract_scaled_columns(xp, W, Q, S, out, xp.zeros_like(Q))
    np.testing.assert_allclose(numpy_of(result), expected, rtol=1e-14)
    result = backend_module.subtract_scaled_columns(xp, W, Q, S, W, xp.zeros_like(Q))
    assert result is W
    np.testing.assert_allclose(numpy_of(W), expected, rtol=1e-14)
