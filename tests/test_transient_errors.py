"""A transient error in a product never downgrades an operator (issue 18, item 4).

The vectorized products fall back to a slower route, for the operator's whole life, when
the function does not support the transform (in-place operations, ``.item()``,
data-dependent control flow, no forward-mode rule, JAX tracer conversions). An
out-of-memory error, an interrupt or anything else that says nothing about the function
must propagate unchanged and leave the route as it was: the next call is vectorized
again.
"""

from __future__ import annotations

import warnings

import pytest

import linop_trace as lt

torch = pytest.importorskip("torch")

from test_autodiff_torch import _CubeWithoutJvp  # noqa: E402 (x^3 without a jvp rule)

from linop_trace.autodiff._torch import (  # noqa: E402
    FORWARD_HVP,
    LOOP_HVP,
    REVERSE_HVP,
)

F64 = torch.float64


class XlaRuntimeError(RuntimeError):
    """Stands in for jaxlib's error class, which XLA raises when a device is full."""


class OutOfMemoryError(MemoryError):
    """Stands in for ``cupy.cuda.memory.OutOfMemoryError`` (a MemoryError)."""


def transient_errors():
    """The errors a product may raise whatever the function: the device or the process."""
    return [
        MemoryError("cannot allocate 8 GiB"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 79.1 GiB total)"),
        RuntimeError("MPS backend out of memory (MPS allocated: 17.9 GB)"),
        XlaRuntimeError("RESOURCE_EXHAUSTED: Failed to allocate request for 4.00GiB on device"),
        OutOfMemoryError("Out of memory allocating 1,073,741,824 bytes"),
        KeyboardInterrupt(),
    ]


TRANSIENT = pytest.mark.parametrize(
    "error", transient_errors(), ids=lambda e: f"{type(e).__name__}:{str(e)[:20]}"
)


def quartic(x):
    return (x**4).sum() + (torch.sin(x) * x.sum()).sum()


def failing_once(function, errors):
    """``function``, raising (and dropping) the first of ``errors`` while any is left."""

    def wrapped(x):
        if errors:
            raise errors.pop(0)
        return function(x)

    return wrapped


# ---------------------------------------------------------------- classification


def raised_by(function, *args):
    """The exception ``function(*args)`` raises."""
    with pytest.raises(Exception) as raised:
        function(*args)
    return raised.value


def test_the_classification_of_errors():
    jax = pytest.importorskip("jax")

    from linop_trace._backend import is_transient_error, is_unsupported_transform_error

    for error in transient_errors():
        assert is_transient_error(error), error
        assert not is_unsupported_transform_error(error), error
    column = torch.ones(3, 2, dtype=F64)
    unsupported = [  # as the transforms raise them
        raised_by(torch.func.vmap(lambda x: x * x.sum().item(), in_dims=1), column),
        raised_by(torch.func.vmap(lambda x: x if x.sum() > 0 else -x, in_dims=1), column),
        raised_by(torch.func.vmap(lambda x: 1.0, in_dims=1), column),
        raised_by(jax.vmap(lambda x: x if x[0] > 0 else -x), jax.numpy.ones((2, 3))),
        raised_by(jax.vmap(lambda x: x * float(x[0])), jax.numpy.ones((2, 3))),
        raised_by(jax.vmap(lambda x: x[: x[0].astype(int)]), jax.numpy.ones((2, 3))),
        NotImplementedError("You must implement the jvp function for custom autograd.Function"),
        TypeError("can't apply forward-mode autodiff (jvp) to a custom_vjp function."),
    ]
    assert isinstance(unsupported[3], jax.errors.TracerBoolConversionError)
    assert isinstance(unsupported[4], jax.errors.ConcretizationTypeError)
    for error in unsupported:
        assert is_unsupported_transform_error(error), error
        assert not is_transient_error(error), error
    # the function's own errors, which every route would raise: they propagate too
    for error in (AssertionError("bad"), KeyError("w"), ZeroDivisionError(), OSError(5, "EIO")):
        assert not is_unsupported_transform_error(error), error


# ---------------------------------------------------- operators from callables


def call_counting_operator(errors):
    """A torch operator 2 x from ``matvec``, its calls counted, failing with ``errors``."""
    calls = []

    def matvec(x):
        calls.append(1)
        return 2 * x

    A = lt.LinearOperator.from_callable(
        matvec=failing_once(matvec, errors), shape=(3, 3), like=torch.ones(3, dtype=F64)
    )
    return A, calls


@TRANSIENT
def test_a_transient_error_of_a_vmapped_matvec_propagates_and_keeps_it_vmapped(error):
    A, calls = call_counting_operator([error])
    X = torch.ones(3, 4, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "could not be vectorized"
        with pytest.raises(type(error)) as raised:
            A @ X
        assert raised.value is error
        assert calls == []  # not retried column by column
        assert torch.equal(A @ X, 2 * X)
    assert len(calls) == 1  # one vmapped call for the 4 columns, not a loop


def test_a_matvec_that_vmap_does_not_support_still_falls_back_to_a_loop():
    def matvec(x):
        if x.sum() > 0:  # data-dependent control flow: vmap refuses it
            return 2 * x
        return -2 * x

    A = lt.LinearOperator.from_callable(matvec=matvec, shape=(3, 3), like=torch.ones(3, dtype=F64))
    X = torch.ones(3, 4, dtype=F64)
    with pytest.warns(RuntimeWarning, match="could not be vectorized"):
        assert torch.equal(A @ X, 2 * X)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the loop, now without a warning
        assert torch.equal(A @ X, 2 * X)


# ----------------------------------------------------------------- Hessians


@TRANSIENT
@pytest.mark.parametrize("mode", ["auto", "reverse"])
def test_a_transient_error_of_a_hessian_product_propagates_and_keeps_the_route(error, mode):
    x = torch.randn(5, dtype=F64, generator=torch.Generator().manual_seed(1))
    V = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    errors = []
    H = lt.hessian(failing_once(quartic, errors), x, mode=mode)
    route = H.mode
    assert route == (FORWARD_HVP if mode == "auto" else REVERSE_HVP)
    errors.append(error)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "failed for this function"
        with pytest.raises(type(error)) as raised:
            H @ V  # 3 columns: too narrow to time, the chain alone
        assert raised.value is error
        assert H.mode == route
        expected = torch.func.hessian(quartic)(x) @ V
        assert torch.allclose(H @ V, expected, rtol=1e-12, atol=0)
    assert H.mode == route


@TRANSIENT
def test_a_transient_error_while_timing_the_loop_lets_the_next_block_time_it(error):
    # mode="auto" times the loop first on a block of 4 or more columns; an error there
    # used to mark the loop as failing for good, so no block was ever timed again
    x = torch.randn(8, dtype=F64, generator=torch.Generator().manual_seed(3))
    errors = []
    H = lt.hessian(failing_once(quartic, errors), x)
    errors.append(error)
    eye = torch.eye(8, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(type(error)):
            H @ eye
        assert H.route_timing is None
        assert torch.allclose(H @ eye, torch.func.hessian(quartic)(x), rtol=1e-12, atol=0)
    assert H.route_timing is not None and H.route_timing.columns == 8
    assert H.mode in (FORWARD_HVP, LOOP_HVP)


def test_a_hessian_without_forward_mode_rules_still_falls_back():
    x = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    H = lt.hessian(lambda v: _CubeWithoutJvp.apply(v).sum(), x)
    with pytest.warns(RuntimeWarning, match="failed for this function.*NotImplementedError"):
        dense = H @ torch.eye(3, dtype=F64)[:, :2]
    assert H.mode == REVERSE_HVP
    assert torch.allclose(dense, torch.diag(6 * x)[:, :2], rtol=1e-12, atol=0)


def test_a_transient_error_of_the_fallback_propagates_after_the_switch():
    # forward mode is unsupported (a switch, with its warning); the reverse route then
    # runs out of memory: that error is raised, and the route stays the reverse one
    x = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    error = torch.OutOfMemoryError("CUDA out of memory")
    errors = []

    def cube(v):
        if errors:
            raise errors.pop()
        try:
            return _CubeWithoutJvp.apply(v).sum()
        except NotImplementedError:  # the forward route: the reverse one is next
            errors.append(error)
            raise

    H = lt.hessian(cube, x)
    with pytest.warns(RuntimeWarning, match="failed for this function"):
        with pytest.raises(torch.OutOfMemoryError) as raised:
            H @ torch.eye(3, dtype=F64)[:, :2]
    assert raised.value is error
    assert H.mode == REVERSE_HVP
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert torch.allclose(H @ torch.ones(3, dtype=F64), 6 * x, rtol=1e-12, atol=0)


@pytest.mark.parametrize("error", [MemoryError("cannot allocate"), KeyboardInterrupt()])
def test_a_transient_error_of_a_jax_hessian_keeps_the_forward_route(error):
    """A JAX Hessian traces f once, when it is built (its products are compiled programs
    that call no Python): a transient error there propagates as it is, and the next
    operator of the same f builds and takes the forward route."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    x = jnp.asarray([1.0, -2.0, 0.5])
    errors = [error]
    f = failing_once(lambda v: jnp.sum(v**4), errors)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(type(error)):
            lt.hessian(f, x) @ jnp.eye(3)
        H = lt.hessian(f, x)
        assert jnp.allclose(H @ jnp.eye(3), jnp.diag(12 * x**2), rtol=1e-6, atol=0)
    assert H.mode.startswith("forward")
