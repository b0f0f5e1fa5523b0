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
