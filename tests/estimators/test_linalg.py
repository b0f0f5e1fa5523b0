"""The estimators' shared linear algebra: the thin QR of a sketch on every backend, by
Householder QR below the size where Cholesky QR twice pays, by Cholesky QR twice above it
(with Householder QR where the block is ill conditioned)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import numpy_of

from linop_trace import _backend as backend_module
from linop_trace.estimators import _linalg

#: A block just above the Cholesky QR threshold (1100 * 32^2 >= 2^20) and one below it.
LARGE = (1100, 32)
SMALL = (512, 10)


def _block(shape, condition):
    """An (n, k) block with singular values from 1 down to 1 / condition."""
    rng = np.random.default_rng(shape[0] + shape[1])
    left, _ = np.linalg.qr(rng.standard_normal(shape))
    right, _ = np.linalg.qr(rng.standard_normal((shape[1], shape[1])))
    return (left * np.geomspace(1.0, 1.0 / condition, shape[1])) @ right


def _check_factors(block, basis, triangular, tolerance):
    k = block.shape[1]
    assert basis.shape == block.shape and triangular.shape == (k, k)
    np.testing.assert_allclose(basis.T @ basis, np.eye(k), atol=tolerance)
    np.testing.assert_allclose(np.tril(triangular, -1), 0, atol=tolerance)
    np.testing.assert_allclose(basis @ triangular, block, atol=tolerance * np.abs(block).max())


@pytest.mark.parametrize("shape", [SMALL, LARGE])
@pytest.mark.parametrize("condition", [10.0, 1e12])
def test_orthonormal_factors_every_backend(dense_backend, shape, condition):
    """Q orthonormal, R upper triangular, QR the block: well and ill conditioned (where
    the first Cholesky pass is off by more than 0.1 and Householder QR takes over)."""
    block = _block(shape, condition)
    basis, triangular = _linalg.orthonormal_factors(dense_backend.asarray(block), dense_backend.xp)
    _check_factors(block, numpy_of(basis), numpy_of(triangular), 1e-12)


def test_orthonormal_factors_compiled_under_jax():
    """The same factors inside ``jax.jit`` (the choice above the threshold made on the
    device with ``lax.cond``), for both sizes and both conditions."""
    jax = pytest.importorskip("jax", reason="jax is not installed")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from linop_trace._backend import array_namespace

    xp = array_namespace(jnp.ones(2))
    for shape in (SMALL, LARGE):
        for condition in (10.0, 1e12):
            block = _block(shape, condition)
            basis, triangular = jax.jit(lambda b: _linalg.orthonormal_factors(b, xp))(
                jnp.asarray(block)
            )
            _check_factors(block, np.asarray(basis), np.asarray(triangular), 1e-12)


@pytest.mark.parametrize(
    ("shape", "condition", "householder"),
    [(SMALL, 10.0, True), (LARGE, 10.0, False), (LARGE, 1e12, True)],
)
def test_householder_below_the_threshold_and_for_ill_conditioned_blocks(
    monkeypatch, shape, condition, householder
):
    """NumPy decides on the host: Householder QR for a block below
    ``CHOLESKY_QR_MIN_WORK`` multiply-adds (without a Cholesky pass) and for an ill
    conditioned one above it, Cholesky QR twice for a well conditioned one above it."""
    import array_api_compat.numpy as xp

    calls = {"householder": 0, "cholesky": 0}
    householder_qr, cholesky_qr2 = backend_module.householder_qr, _linalg._cholesky_qr2

    def counted_qr(*args):
        calls["householder"] += 1
        return householder_qr(*args)

    def counted_cholesky(*args):
        calls["cholesky"] += 1
        return cholesky_qr2(*args)

    monkeypatch.setattr(backend_module, "householder_qr", counted_qr)
    monkeypatch.setattr(_linalg, "_cholesky_qr2", counted_cholesky)
    assert (shape[0] * shape[1] ** 2 >= _linalg.CHOLESKY_QR_MIN_WORK) == (shape == LARGE)
    _linalg.orthonormal_factors(_block(shape, condition), xp)
    assert calls["householder"] == int(householder)
    assert calls["cholesky"] == int(shape == LARGE)


def test_downdate_directions_do_not_overflow(dense_backend):
    """R^{-H} of a nearly singular float32 R has entries past sqrt(max float) (1e24 here:
    diagonal entries of 1e-6, above the regularizing shift, compound through the
    substitution), whose squares overflowed: the column's length was inf and the column
    came back zero (XDiag in float32 with a sketch wider than n, with a RuntimeWarning).
    Each column is divided by its largest entry first: unit columns along R^{-H}'s."""
    R = np.triu(np.ones((5, 5))) + np.diag([0.0, -1 + 1e-6, -1 + 1e-6, -1 + 1e-6, -1 + 1e-6])
    directions = _linalg.downdate_directions(dense_backend.asarray(R, np.float32), dense_backend.xp)
    expected = np.linalg.inv(R).T
    expected /= np.linalg.norm(expected, axis=0)
    np.testing.assert_allclose(numpy_of(directions), expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------ the QR's derivative
def _full_rank_blocks() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    real = rng.standard_normal((30, 7))
    return [real, real + 1j * rng.standard_normal((30, 7))]


@pytest.mark.parametrize("complex_block", [False, True])
def test_qr_derivative_is_the_native_one_where_r_is_invertible_torch(complex_block):
    """The thin QR's rule (R^+ for R^{-1}), taken by backend.thin_qr where torch
    differentiates, gives torch's own derivatives of a full-rank block: reverse mode,
    forward mode, batched backward passes (is_grads_batched), torch.func.vmap, and
    second derivatives (gradgradcheck)."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as tx
    from torch.autograd import forward_ad

    def ours(Y: Any) -> Any:
        return backend_module.thin_qr(tx, Y)

    block = torch.as_tensor(_full_rank_blocks()[complex_block])
    rng = np.random.default_rng(6)
    weights = [torch.as_tensor(rng.standard_normal(s)).to(block.dtype) for s in ((30, 7), (7, 7))]

    def loss(qr: Any, Y: Any) -> Any:
        q, r = qr(Y)
        return torch.real(torch.sum(weights[0] * q) + torch.sum(weights[1] * r))

    gradients = []
    for qr in (ours, torch.linalg.qr):
        Y = block.clone().requires_grad_(True)
        gradients.append(torch.autograd.grad(loss(qr, Y), Y)[0])
    assert torch.allclose(*gradients, rtol=1e-10, atol=1e-12)
    direction = torch.as_tensor(rng.standard_normal((30, 7))).to(block.dtype)
    tangents = []
    for qr in (ours, torch.linalg.qr):
        with forward_ad.dual_level():
            q, r = qr(forward_ad.make_dual(block, direction))
            tangents.append([forward_ad.unpack_dual(x).tangent for x in (q, r)])
    for ours_t, native_t in zip(*tangents):
        assert torch.allclose(ours_t, native_t, rtol=1e-10, atol=1e-12)
    # batched: a Jacobian's rows at once, through torch's older batching and torch.func
    cotangents = torch.as_tensor(rng.standard_normal((3, 30, 7))).to(block.dtype)
    batched = []
    for qr in (ours, torch.linalg.qr):
        Y = block.clone().requires_grad_(True)
        q, _ = qr(Y)
        batched.append(torch.autograd.grad(q, Y, cotangents, is_grads_batched=True)[0])
    assert torch.allclose(*batched, rtol=1e-10, atol=1e-12)
    mapped = [
        torch.func.vmap(torch.func.grad(lambda Y, qr=qr: loss(qr, Y)))(
            torch.stack([block, 2 * block])
        )
        for qr in (ours, torch.linalg.qr)
    ]
    assert torch.allclose(*mapped, rtol=1e-10, atol=1e-12)
    Y = block.clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(ours, (Y,))


@pytest.mark.parametrize("complex_block", [False, True])
def test_qr_derivative_is_the_native_one_where_r_is_invertible_jax(complex_block):
    """The same under JAX: the custom rule's jvp, its transpose (jax.grad) and a second
    derivative agree with jnp.linalg.qr's, compiled and batched."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from array_api_compat import array_namespace

    block = jnp.asarray(_full_rank_blocks()[complex_block])
    xp = array_namespace(block)

    def qr(Y: Any) -> Any:
        return backend_module.thin_qr(xp, Y)

    direction = jnp.asarray(np.random.default_rng(7).standard_normal((30, 7))).astype(block.dtype)
    ours = jax.jit(lambda Y, D: jax.jvp(qr, (Y,), (D,))[1])(block, direction)
    native = jax.jvp(jnp.linalg.qr, (block,), (direction,))[1]
    for a, b in zip(ours, native):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)

    def loss(function: Any, Y: Any) -> Any:
        q, r = function(Y)
        return jnp.real(jnp.sum(jnp.sin(q)) + jnp.sum(r * r))

    def grad(function: Any) -> Any:
        return jax.grad(lambda Y: loss(function, Y))

    # first derivatives compiled and batched, second derivatives eagerly
    pair = jnp.stack([block, 2 * block])
    ours_g = jax.jit(jax.vmap(grad(qr)))(pair)
    native_g = jax.vmap(grad(jnp.linalg.qr))(pair)
    np.testing.assert_allclose(np.asarray(ours_g), np.asarray(native_g), rtol=1e-10, atol=1e-12)

    def second(function: Any) -> Any:
        return jax.grad(lambda Y: jnp.real(jnp.sum(grad(function)(Y) * direction)))(block)

    np.testing.assert_allclose(
        np.asarray(second(qr)), np.asarray(second(jnp.linalg.qr)), rtol=1e-8, atol=1e-10
    )


def test_qr_rule_covers_cholesky_qr_under_jax():
    """Blocks of n k^2 >= 2^20 multiply-adds are factored by Cholesky QR twice under JAX
    (lax.cond on its first pass); a rank-deficient one falls back to Householder, and the
    zero cotangent through the failed Cholesky factors made the gradient NaN (XTrace and
    XDiag at 500 x 100 matvecs on the zero operator, found by a review). The rule covers
    whichever factorization ran: finite on a zero block, and the native derivative of a
    full-rank one."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from array_api_compat import array_namespace

    n, k = 4096, 16  # n k^2 = 2^20
    assert n * k * k >= _linalg.CHOLESKY_QR_MIN_WORK
    full = jnp.asarray(np.random.default_rng(8).standard_normal((n, k)))
    xp = array_namespace(full)
    weights = jnp.asarray(np.random.default_rng(9).standard_normal((n, k)))

    def loss(function: Any, Y: Any) -> Any:
        # invariant to the signs of Q's columns (R's rows), which Cholesky QR and
        # LAPACK choose differently
        q, r = function(Y)
        return jnp.sum((q.T @ weights) ** 2) + jnp.sum(r * r)

    def ours(Y: Any) -> Any:
        return _linalg.orthonormal_factors(Y, xp)

    zero = np.asarray(jax.grad(lambda Y: loss(ours, Y))(jnp.zeros((n, k))))
    assert np.all(np.isfinite(zero))
    got = jax.grad(lambda Y: loss(ours, Y))(full)
    want = jax.grad(lambda Y: loss(jnp.linalg.qr, Y))(full)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-8, atol=1e-10)
