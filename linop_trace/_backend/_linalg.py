"""Fast paths of the linear algebra the estimators need.

A library's native routine where it has one (SciPy's LAPACK QR for NumPy, einsum column
sums, torch's cache-sized row chunks, vmap), the array-API spelling otherwise; and the
one-thread cap (:func:`one_blas_thread`) around the library's own small host algebra.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np

from ._compiled import jit
from ._dask import dask_column_inner, is_dask_array
from ._device import _torch_differentiating, copied, is_tracer, placed, stop_gradient
from ._dtypes import abs2, conj, is_complex_dtype, real_dtype_for, real_part
from ._identity import device_of

__all__ = [
    "ONE_THREAD_MIN_WORK",
    "cholesky",
    "column_inner",
    "column_norms",
    "divide_by_largest",
    "finite_entries",
    "frobenius_norm",
    "materialized",
    "may_differentiate",
    "block_diagonal",
    "block_gauss_rule",
    "identity_blocks",
    "one_blas_thread",
    "row_inner",
    "solve",
    "solve_triangular",
    "split",
    "subtract_scaled_columns",
    "householder_qr",
    "qr_with_rule",
    "thin_qr",
    "vmap_columns",
    "zeros",
    "ones",
    "filled",
]

# ------------------------------------------------------------ one thread on the host
#: Multiply-adds below which NumPy work runs without the one-thread cap: OpenBLAS runs
#: such calls on one thread already (QR of (500, 10) blocks, products of (500, 34) ones),
#: and entering the cap costs 10-20 us (asv_bench/benchmarks/threads.py measures both).
ONE_THREAD_MIN_WORK = 2**16

_NO_CAP = contextlib.nullcontext()


class _OneBlasThread:
    """One thread in every BLAS that NumPy and SciPy loaded, while the library's small
    calls run; re-entrant, shared by all Python threads.

    The first thread to enter sets the limit and its last exit restores it; nested
    entries cost a lock, not a library call. OpenBLAS's thread count is process-wide, so
    another thread that enters meanwhile runs under the same limit and changes nothing:
    two threads setting and restoring the count in turn would leave it at one for good.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._depth = 0
        self._limiter: Any = None
        self._controller: Any = None

    def __enter__(self) -> None:
        me = threading.get_ident()
        with self._lock:
            if self._owner is None:
                self._limiter = self._limit()
                self._owner = me
            if self._owner == me:
                self._depth += 1

    def __exit__(self, *exc: object) -> None:
        me = threading.get_ident()
        with self._lock:
            if self._owner != me:
                return
            self._depth -= 1
            if self._depth == 0:
                limiter, self._limiter, self._owner = self._limiter, None, None
                if limiter is not None:
                    limiter.__exit__(None, None, None)

    def _limit(self) -> Any:
        """threadpoolctl's limiter, entered; ``None`` where every BLAS has one thread
        already (``OPENBLAS_NUM_THREADS=1``: nothing to change, nothing is called)."""
        if self._controller is None:
            import scipy.linalg  # noqa: F401  (loads SciPy's own OpenBLAS before the scan)
            from threadpoolctl import ThreadpoolController

            # one scan of the loaded libraries (milliseconds), kept for the process
            self._controller = ThreadpoolController().select(user_api="blas")
        if all(library.num_threads == 1 for library in self._controller.lib_controllers):
            return None
        limiter = self._controller.limit(limits=1, user_api="blas")
        limiter.__enter__()  # (threadpoolctl >= 3.6: this thread owns OpenBLAS's count)
        return limiter


_NUMPY_CAP = _OneBlasThread()


def one_blas_thread(xp: Any, work: float | None = None) -> contextlib.AbstractContextManager[None]:
    """A context in which NumPy's and SciPy's BLAS and LAPACK run one thread, for the
    library's own small algebra: factorizations of k x k matrices, thin QR of tall-skinny
    (n, k) blocks and their products with k x k ones. Never for the user's products.

    Threads gain little on such sizes and cost dearly when the cores are busy: every
    threaded call waits for the threads the scheduler has not run yet, so that with 8
    OpenBLAS threads on 2 cores a 50 x 50 triangular solve takes milliseconds instead of
    20 us (``asv_bench/benchmarks/threads.py``). Done with threadpoolctl's limit; nothing
    is changed where every BLAS runs one thread already (``OPENBLAS_NUM_THREADS=1``).
    Other libraries run their own thread pools and get nothing: torch's and JAX's degrade
    far less under oversubscription, and a whole torch estimate gained nothing measurable
    from a cap.

    ``work`` is the call's multiply-adds (``n k^2`` for an (n, k) block): below
    :data:`ONE_THREAD_MIN_WORK` OpenBLAS runs one thread anyway and the cap is skipped.
    ``None`` caps at any size (OpenBLAS threads triangular solves of every size).

    The limit is process-wide while it lasts: BLAS calls that other Python threads make
    in that time run on one thread too.
    """
    if not array_api_compat.is_numpy_namespace(xp):
        return _NO_CAP
    return _NO_CAP if work is not None and work < ONE_THREAD_MIN_WORK else _NUMPY_CAP


def row_inner(xp: Any, x: Any, y: Any) -> Any:
    """``sum_k conj(x[i, k]) y[i, k]`` for each row i of two ``(n, k)`` arrays.

    NumPy 2's ``vecdot`` is a single-pass ufunc; elsewhere (JAX's ``vecdot`` traces a
    ``vmap`` on every eager call, NumPy 1.x's is a batched matmul) multiply and sum."""
    if array_api_compat.is_numpy_namespace(xp) and hasattr(np, "vecdot"):
        return np.vecdot(x, y, axis=1)  # type: ignore[call-overload]
    if xp.isdtype(x.dtype, "complex floating"):
        x = xp.conj(x)
    return xp.sum(x * y, axis=1)


#: Entries per row chunk of :func:`column_inner` on torch's CPU: the product of two
#: chunks stays in cache, where a fresh (n, k) temporary would be faulted in page by page.
COLUMN_CHUNK_ENTRIES = 2**18


def column_inner(xp: Any, x: Any, y: Any) -> Any:
    """``sum_i conj(x[i, j]) y[i, j]`` for each column j of two ``(n, k)`` arrays.

    The column reduction of every Hutchinson-type estimator, so it is done without an
    (n, k) temporary where the library allows: NumPy's ``einsum`` (4x faster than
    ``sum(x * y, axis=0)`` at n = 10^5, k = 100), torch on the CPU in row chunks that stay
    in cache (6x faster than one product whose fresh pages are faulted in); JAX fuses the
    product and the sum (eagerly, one compiled program), and GPU allocators reuse their
    memory."""
    if array_api_compat.is_jax_namespace(xp):
        return jit(xp, _column_inner)(xp, x, y)
    return _column_inner(xp, x, y)


def _column_inner(xp: Any, x: Any, y: Any) -> Any:
    if xp.isdtype(x.dtype, "complex floating"):
        x = xp.conj(x)
    if array_api_compat.is_numpy_namespace(xp) and type(x) is np.ndarray:
        return np.einsum("ij,ij->j", x, y)
    if is_dask_array(x) and x.ndim == 2:  # einsum chunk by chunk
        return dask_column_inner(x, y)
    if array_api_compat.is_torch_namespace(xp) and x.device.type == "cpu":
        n, k = x.shape
        rows = max(256, COLUMN_CHUNK_ENTRIES // max(k, 1))
        if n > rows:
            total = None
            for start in range(0, n, rows):
                part = xp.sum(x[start : start + rows, :] * y[start : start + rows, :], axis=0)
                total = part if total is None else total + part
            return total
    return xp.sum(x * y, axis=0)


def frobenius_norm(xp: Any, x: Any) -> Any:
    """``sqrt(sum |x|^2)`` over all entries, in one pass where the library allows."""
    flat = xp.reshape(x, (1, -1))
    square = row_inner(xp, flat, flat)[0]
    return xp.sqrt(xp.real(square) if xp.isdtype(square.dtype, "complex floating") else square)


def vmap_columns(xp: Any, function: Callable[[Any], Any]) -> Callable[[Any], Any] | None:
    """``function`` (vector -> vector) mapped over the columns of a block, or ``None``.

    Uses the library's own vectorizing map (torch.func.vmap, jax.vmap); other libraries
    have none and the caller falls back to a loop.
    """
    if array_api_compat.is_torch_namespace(xp):
        import torch

        return torch.func.vmap(function, in_dims=1, out_dims=1)
    if array_api_compat.is_jax_namespace(xp):
        import jax

        return jax.vmap(function, in_axes=1, out_axes=1)
    return None


def thin_qr(xp: Any, matrix: Any, floor: Any = None) -> tuple[Any, Any]:
    """Thin Householder QR ``(Q, R)`` of a tall ``(n, k)`` array of the library ``xp``
    (:func:`householder_qr`), differentiated by :func:`qr_with_rule`'s rule (``floor``
    there)."""
    return qr_with_rule(xp, functools.partial(householder_qr, xp), matrix, floor)


def householder_qr(xp: Any, matrix: Any) -> tuple[Any, Any]:
    """Thin Householder QR ``(Q, R)`` of a tall ``(n, k)`` array of the library ``xp``, with
    the library's own derivative.

    NumPy arrays go through LAPACK via SciPy on a Fortran-ordered copy (no transposed
    copies inside, about 2x faster than ``numpy.linalg.qr`` for tall-skinny blocks);
    every other library uses its own ``xp.linalg.qr`` (Dask's tall-skinny QR on the
    block's columns made one chunk). On one host thread
    (:func:`one_blas_thread`).
    """
    with one_blas_thread(xp, work=matrix.shape[-2] * matrix.shape[-1] ** 2):
        if type(matrix) is np.ndarray and array_api_compat.is_numpy_namespace(xp):
            import scipy.linalg

            copy = np.array(matrix, order="F", copy=True)
            return scipy.linalg.qr(copy, mode="economic", overwrite_a=True, check_finite=False)
        if is_dask_array(matrix) and matrix.ndim == 2:  # Dask's tsqr: one column chunk
            matrix = matrix.rechunk({1: -1})
        return xp.linalg.qr(matrix)


def qr_with_rule(
    xp: Any, factor: Callable[[Any], tuple[Any, Any]], matrix: Any, floor: Any = None
) -> tuple[Any, Any]:
    """``factor(matrix)``, a thin QR factorization (any: Householder, Cholesky QR),
    differentiated by :func:`qr_tangent` where ``matrix`` may be differentiated
    (:func:`may_differentiate`) and is tall (n >= k; a wide block's Q is square, and
    keeps the library's derivative).

    ``floor``: singular values of ``matrix`` below it carry no derivative (an absolute
    cut for the rule's R^+, beside the relative one of its rounding; a 0-d array without
    gradient or a number), for a block whose small directions are known to be noise of
    that size (:func:`~linop_trace._spectral._deflate`'s jitter)."""
    if matrix.shape[-2] < matrix.shape[-1] or not may_differentiate(xp, matrix):
        return factor(matrix)
    if floor is not None:
        floor = stop_gradient(
            xp.asarray(floor, dtype=real_dtype_for(xp, matrix.dtype), device=device_of(matrix))
        )
    if array_api_compat.is_jax_namespace(xp):
        return _jax_qr()(factor, matrix, floor)  # type: ignore[no-any-return]
    return _torch_qr().apply(matrix, floor, factor)  # type: ignore[no-any-return]


# ------------------------------------------------------------ the QR's derivative
# The thin QR's own derivative (JAX's, torch's) solves with R: where the block is rank
# deficient (the zero operator, a matrix of low rank whose sketch R has exact or
# round-off zeros on its diagonal) it is NaN (torch) or of size 1e32 - 1e64 (JAX), and
# so was every gradient of Hutch++, XTrace, Diag++ and XDiag there. The rule below is
# the same derivative with R^{-1} replaced by the pseudo-inverse R^+ whose cut-off is the
# block's rounding: equal to it where R is invertible above that level, and where it is
# not, the columns of Q that only rounding determines are moved by the part of the
# tangent that the other columns leave.


def qr_rounding_rtol(xp: Any, dtype: Any, rows: int) -> float:
    """The relative cut-off of R^+ in the QR's derivative: singular values of the block
    below ``eps (sqrt(32) + sqrt(rows / 32))`` of its largest are its products' rounding
    (blocked sums of ``rows`` terms: the package's rounding model,
    :func:`~linop_trace._stats.rounding_factor`), and the directions they give carry
    no derivative."""
    eps = float(xp.finfo(dtype).eps)
    return eps * (math.sqrt(32) + math.sqrt(rows / 32))


def _qr_pinv(xp: Any, q: Any, r: Any, floor: Any) -> Any:
    """R^+ at the cut-off of :func:`qr_rounding_rtol` relative to R's largest singular
    value, with the directions of singular values below ``floor`` (absolute; ``None``:
    none) removed too: R^+ (I - U_s U_s^H), U_s their left singular vectors, taken
    without derivative. (The relative cut stays a Python number: JAX's ``pinv`` takes
    its tolerance as a static argument, and a traced one broke second derivatives.)"""
    inverse = xp.linalg.pinv(r, rtol=qr_rounding_rtol(xp, real_dtype_for(xp, r.dtype), q.shape[-2]))
    if floor is None:
        return inverse
    left, values, _ = xp.linalg.svd(stop_gradient(r))
    small = xp.astype(values < stop_gradient(floor), r.dtype)
    return inverse - (inverse @ (left * small[..., None, :])) @ _h(xp, left)


def _triangles(xp: Any, c: Any) -> tuple[Any, Any]:
    """The strict lower triangle's mask and the diagonal's, in ``c``'s dtype (k x k)."""
    index = xp.arange(c.shape[-1], device=device_of(c))
    return (
        xp.astype(index[:, None] > index[None, :], c.dtype),
        xp.astype(index[:, None] == index[None, :], c.dtype),
    )


def _h(xp: Any, x: Any) -> Any:
    """The conjugate transpose of a matrix (torch: ``transpose``, not the array API's
    ``swapaxes``, which its older batching of backward passes lacks a rule for:
    ``is_grads_batched`` and vectorized Jacobians failed)."""
    if array_api_compat.is_torch_namespace(xp):
        return conj(xp, x.transpose(-2, -1))
    return conj(xp, xp.matrix_transpose(x))


def _imaginary_diagonal(xp: Any, c: Any, diagonal: Any) -> Any:
    """``i Im diag(c)`` as a matrix (zero for real ``c``)."""
    if not is_complex_dtype(xp, c.dtype):
        return xp.zeros_like(c)
    return diagonal * (c - xp.astype(xp.real(c), c.dtype))


def qr_tangent(xp: Any, q: Any, r: Any, direction: Any, floor: Any = None) -> tuple[Any, Any]:
    """``(dQ, dR)`` of the thin QR ``Y = QR`` along ``dY`` (Walter and Lehmann's formula,
    R^{-1} as R^+): with B = dY R^+ and C = Q^H B, Omega the skew-Hermitian part of C
    (its strict lower triangle L less L^H, and the imaginary part of its diagonal),

        dQ = Q (Omega - C) + B,   dR = (C - Omega) R."""
    b = direction @ _qr_pinv(xp, q, r, floor)
    c = _h(xp, q) @ b
    strict, diagonal = _triangles(xp, c)
    low = c * strict
    omega = low - _h(xp, low) + _imaginary_diagonal(xp, c, diagonal)
    return q @ (omega - c) + b, (c - omega) @ r


def qr_cotangent(xp: Any, q: Any, r: Any, grad_q: Any, grad_r: Any, floor: Any = 0.0) -> Any:
    """``gY`` of the thin QR's pullback, the adjoint of :func:`qr_tangent`: with
    M = Q^H gQ - gR R^H and G = tril(M, -1) - tril(M^H, -1) + i Im diag(M),

        gY = (gQ + Q (G - M)) R^{+H}."""
    m = _h(xp, q) @ grad_q - grad_r @ _h(xp, r)
    strict, diagonal = _triangles(xp, m)
    g = (m - _h(xp, m)) * strict + _imaginary_diagonal(xp, m, diagonal)
    return (grad_q + q @ (g - m)) @ _h(xp, _qr_pinv(xp, q, r, floor))


@functools.lru_cache(maxsize=1)
def _jax_qr() -> Callable[..., tuple[Any, Any]]:
    """``(factor, matrix, floor) -> factor(matrix)`` with :func:`qr_tangent` as its
    ``jax.custom_jvp`` (reverse mode by transposition; inside ``jit`` and ``vmap``; the
    rule is differentiable again)."""
    import jax

    @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
    def qr(factor: Any, matrix: Any, floor: Any) -> tuple[Any, Any]:
        return tuple(factor(matrix))  # type: ignore[return-value]

    @qr.defjvp
    def qr_jvp(factor: Any, primals: Any, tangents: Any) -> tuple[Any, Any]:
        (matrix, floor), (direction, _) = primals, tangents  # (the floor: no derivative)
        q, r = qr(factor, matrix, floor)
        xp = array_api_compat.array_namespace(matrix)
        return (q, r), qr_tangent(xp, q, r, direction, floor)

    return qr


@functools.lru_cache(maxsize=1)
def _torch_qr() -> Any:
    import array_api_compat.torch as tx
    import torch

    class ThinQR(torch.autograd.Function):
        """torch's thin QR with :func:`qr_cotangent` as its backward pass and
        :func:`qr_tangent` as its forward-mode rule (both differentiable again)."""

        generate_vmap_rule = True

        @staticmethod
        def forward(matrix: Any, floor: Any, factor: Any) -> Any:
            return tuple(factor(matrix))

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            ctx.save_for_backward(*output)
            ctx.save_for_forward(*output)
            ctx.floor = inputs[1]  # (no derivative: cut from the graph by the caller)

        @staticmethod
        def backward(ctx: Any, grad_q: Any, grad_r: Any) -> Any:
            q, r = ctx.saved_tensors
            grad_q = torch.zeros_like(q) if grad_q is None else grad_q
            grad_r = torch.zeros_like(r) if grad_r is None else grad_r
            return qr_cotangent(tx, q, r, grad_q, grad_r, ctx.floor), None, None

        @staticmethod
        def jvp(ctx: Any, direction: Any, _floor: Any, _factor: Any) -> Any:
            q, r = ctx.saved_tensors
            return qr_tangent(tx, q, r, direction, ctx.floor)

    return ThinQR


def positive_part(xp: Any, x: Any) -> Any:
    """``max(x, 0)`` entrywise, in one of the library's own operations (the array API's
    ``clip`` is a wrapper of several on NumPy and torch: 5.7 against 1.5 us on a NumPy
    scalar, the whole rounding floor of a standard error 16 against 9 us on torch's).

    >>> import array_api_compat.numpy as xp
    >>> import numpy as np
    >>> positive_part(xp, np.array([4.0, -1.0]))
    array([4., 0.])
    """
    if array_api_compat.is_numpy_namespace(xp):
        return np.maximum(x, 0.0)
    if array_api_compat.is_torch_namespace(xp):
        import torch

        return torch.clamp_min(x, 0.0)
    if array_api_compat.is_jax_namespace(xp):
        import jax.numpy as jnp

        return jnp.maximum(x, 0.0)
    return xp.clip(x, min=0.0)


def hypot(xp: Any, x: Any, y: Any) -> Any:
    """``sqrt(x^2 + y^2)`` entrywise without overflow, the library's own (the array API's
    is a wrapper on torch, for type promotion, which two arrays of one dtype do not need)."""
    if array_api_compat.is_numpy_namespace(xp):
        return np.hypot(x, y)
    if array_api_compat.is_torch_namespace(xp):
        import torch

        return torch.hypot(x, y)
    return xp.hypot(x, y)


def divide_by_largest(xp: Any, x: Any, axis: int | None = None) -> tuple[Any, Any]:
    """``(x / size, size)`` with ``size`` = max |x| (over ``axis``, kept real; the smallest
    normal number where it is below that, 0 included), the size cut from the gradient.
    Scale-free statistics (variances over their own size, skewness, dofs) then neither
    overflow nor underflow for entries of 1e160 or 1e-160. Two operations besides the
    division (on a GPU every operation is a kernel launch): the largest modulus as the
    infinity norm (one reduction, where ``max(abs(x))`` is two), and the clip.

    >>> import array_api_compat.numpy as xp
    >>> import numpy as np
    >>> scaled, size = divide_by_largest(xp, np.array([[2.0, -4.0], [0.0, 0.0]]), axis=1)
    >>> scaled, size[0]
    (array([[ 0.5, -1. ],
           [ 0. ,  0. ]]), np.float64(4.0))
    """
    size = xp.linalg.vector_norm(stop_gradient(x), ord=math.inf, axis=axis)  # (max |x|)
    size = xp.clip(size, min=float(xp.finfo(size.dtype).smallest_normal))
    divisor = size if axis is None else xp.expand_dims(size, axis=axis)
    if divisor.dtype != x.dtype:
        divisor = xp.astype(divisor, x.dtype)
    return x / divisor, size


def column_norms(xp: Any, x: Any) -> Any:
    """``sqrt(sum_i |x[i, j]|^2)`` for each column j of an ``(n, k)`` array, in one pass
    with no ``(n, k)`` temporary where the library allows."""
    if array_api_compat.is_numpy_namespace(xp):
        if np.iscomplexobj(x):
            return np.sqrt(np.einsum("ij,ij->j", x.conj(), x).real)
        return np.sqrt(np.einsum("ij,ij->j", x, x))
    if array_api_compat.is_torch_namespace(xp) or array_api_compat.is_jax_namespace(xp):
        return xp.linalg.vector_norm(x, axis=0)
    square = xp.real(xp.conj(x) * x) if xp.isdtype(x.dtype, "complex floating") else x * x
    return xp.sqrt(xp.sum(square, axis=0))


def solve(xp: Any, matrix: Any, rhs: Any) -> Any:
    """``matrix^{-1} rhs`` without a host check of the factorization (torch's ``solve``
    reads its LAPACK status, a device wait on a GPU; ``solve_ex`` does not). A singular
    matrix gives non-finite entries or raises (NumPy), which callers test for. On one
    host thread (:func:`one_blas_thread`)."""
    with one_blas_thread(xp, work=matrix.shape[-1] ** 3):  # LU: k^3 / 3, about
        if array_api_compat.is_torch_namespace(xp):
            import torch

            return torch.linalg.solve_ex(matrix, rhs)[0]
        return xp.linalg.solve(matrix, rhs)


def materialized(xp: Any, x: Any) -> Any:
    """``x`` computed as it stands, not folded into its neighbours by XLA
    (``optimization_barrier``: differentiable and batchable) when it is being traced; the
    identity elsewhere (an eager barrier is a dispatch of its own: 10 us, and nothing to
    fold into).

    Two rewrites of XLA's CPU compiler cost more than they save here: a transpose folded
    into a matrix product makes it a transposed-operand product, which runs at half speed
    (A^H X as (X^H A)^H: 1.9x A @ X at n = 512); and a sum of column sums rewritten as a
    sum over the whole block gives that block a second reader, which stops the product
    from fusing with its column sums (Hutchinson at n = 4000: 1.3x the product)."""
    if not array_api_compat.is_jax_namespace(xp) or not is_tracer(x):
        return x
    import jax

    return jax.lax.optimization_barrier(x)


def split(xp: Any, x: Any, sizes: tuple[int, ...]) -> tuple[Any, ...]:
    """The pieces of ``x`` along its last axis (columns of a matrix, entries of a
    vector): ``sizes[0]`` of them, then ``sizes[1]``, ..., then the rest.

    JAX's eager indexing ships each Python bound to the device (a host-to-device
    transfer per slice, refused under ``jax.transfer_guard("disallow")``), so outside a
    trace the pieces are cut by one compiled program there (one per ``sizes``)."""
    if array_api_compat.is_jax_namespace(xp) and not is_tracer(x):
        return jit(xp, _pieces, num_static=2)(xp, tuple(sizes), x)  # type: ignore[no-any-return]
    return _pieces(xp, sizes, x)


def _pieces(xp: Any, sizes: tuple[int, ...], x: Any) -> tuple[Any, ...]:
    pieces, start = [], 0
    for size in sizes:
        pieces.append(x[..., start : start + size])
        start += size
    pieces.append(x[..., start:])
    return tuple(pieces)


def zeros(xp: Any, shape: tuple[int, ...], dtype: Any, device: Any) -> Any:
    """``xp.zeros(shape, dtype=dtype, device=device)``, made as :func:`filled` makes it."""
    return filled(xp, shape, 0, dtype, device)


def ones(xp: Any, shape: tuple[int, ...], dtype: Any, device: Any) -> Any:
    """``xp.ones(shape, dtype=dtype, device=device)``, made as :func:`filled` makes it."""
    return filled(xp, shape, 1, dtype, device)


def filled(xp: Any, shape: tuple[int, ...], value: int, dtype: Any, device: Any) -> Any:
    """``xp.full(shape, value, dtype=dtype, device=device)``; under JAX made by a compiled
    program (eagerly, ``full``, ``zeros`` and ``ones`` ship their fill value from the
    host: a transfer refused under ``jax.transfer_guard("disallow")``) and placed on
    ``device``."""
    if array_api_compat.is_jax_namespace(xp):
        made = jit(xp, _full, num_static=5)(xp, tuple(shape), value, dtype, device)
        return placed(made, device)
    return _full(xp, shape, value, dtype, device)


def _full(xp: Any, shape: tuple[int, ...], value: int, dtype: Any, device: Any) -> Any:
    return xp.full(shape, value, dtype=dtype, device=device)


def identity_blocks(xp: Any, n: int, block: int, dtype: Any, device: Any) -> Any:
    """The columns of the ``n x n`` identity, ``block`` at a time (the last block the
    rest): ``(start, columns)`` pairs, ``columns`` the ones where row - column = start.

    Under JAX an eager ``eye`` ships its offset (and its fill) from the host, a transfer
    per block refused under ``jax.transfer_guard("disallow")``: there the first block is
    made by a compiled program (placed on ``device``) and each next one is the last one's
    rows shifted down by ``block``, so that no start goes to the device (the same in a
    trace)."""
    if not array_api_compat.is_jax_namespace(xp):
        for start in range(0, n, block):
            width = min(block, n - start)
            yield start, xp.eye(n, width, k=-start, dtype=dtype, device=device)
        return
    columns = placed(jit(xp, _eye, num_static=5)(xp, n, min(block, n), dtype, device), device)
    for start in range(0, n, block):
        width = min(block, n - start)
        if width < columns.shape[1]:
            columns = split(xp, columns, (width,))[0]
        yield start, columns
        if start + block < n:
            columns = jit(xp, _shifted_down, num_static=2)(xp, block, columns)


def _eye(xp: Any, n: int, width: int, dtype: Any, device: Any) -> Any:
    return xp.eye(n, width, dtype=dtype, device=device)


def _shifted_down(xp: Any, rows: int, x: Any) -> Any:
    """``x`` with its rows moved down by ``rows`` (zeros above)."""
    return xp.concat([xp.zeros_like(x[:rows]), x[: x.shape[0] - rows]], axis=0)


def block_diagonal(xp: Any, image: Any, start: int, columns: Any) -> Any:
    """``A[start + j, j]`` of ``image = A @ columns``, ``columns`` a block of the identity
    from :func:`identity_blocks`: a copy of the diagonal of ``image``'s rows from
    ``start`` (a view would keep the whole image alive); under JAX the entries where
    ``columns`` has its ones (one compiled program, no start shipped to the device; the
    other entries, NaN or infinite ones included, left out)."""
    if not array_api_compat.is_jax_namespace(xp):
        width = columns.shape[1]
        return copied(xp, xp.linalg.diagonal(image[start : start + width, :]))
    return jit(xp, _masked_column_sums)(xp, image, columns)


def _masked_column_sums(xp: Any, image: Any, columns: Any) -> Any:
    return xp.sum(xp.where(columns != 0, image, xp.zeros_like(image)), axis=0)


def with_slot(xp: Any, buffer: Any, index: Any, value: Any) -> Any:
    """``buffer`` with ``buffer[index] = value``: written in place where the library's
    arrays are mutable, a functional update under JAX (in place once compiled). The
    caller keeps the returned array."""
    if array_api_compat.is_jax_namespace(xp):
        return buffer.at[index].set(value)
    buffer[index] = value
    return buffer


def subtract_scaled_columns(xp: Any, w: Any, q: Any, scales: Any, out: Any, scratch: Any) -> Any:
    """``w - q * scales`` (``scales`` one per column) written into ``out``, which may be
    ``w``: one pass where the library fuses the multiply and the subtraction (torch's
    ``addcmul``: 1.95 ms against 3.3 ms for Lanczos' two updates of a (10^5, 20) block),
    else through ``scratch`` (an array like ``q``). Mutable arrays only (``out=``)."""
    scales = xp.astype(scales, w.dtype)
    if array_api_compat.is_torch_namespace(xp):
        import torch

        return torch.addcmul(w, q, scales, value=-1, out=out)
    xp.multiply(q, scales, out=scratch)
    return xp.subtract(w, scratch, out=out)


def solve_triangular(xp: Any, matrix: Any, rhs: Any, *, lower: bool) -> Any:
    """``matrix^{-1} rhs`` for a triangular ``matrix`` (lower or upper): one substitution,
    where a general solve factorizes (LU, pivot search and permutation: under JAX on a CPU
    a 10 x 10 inverse by LU is five times the operations of one triangular solve). An exact
    zero on the diagonal gives non-finite entries, or raises (NumPy, SciPy).
    Libraries without a triangular solver use their general ``solve``. On one host thread
    at every size (:func:`one_blas_thread`: OpenBLAS threads even 8 x 8 solves)."""
    with one_blas_thread(xp):
        if array_api_compat.is_torch_namespace(xp):
            import torch

            return torch.linalg.solve_triangular(matrix, rhs, upper=not lower)
        if array_api_compat.is_jax_namespace(xp):
            import jax.scipy.linalg

            return jax.scipy.linalg.solve_triangular(matrix, rhs, lower=lower)
        if array_api_compat.is_cupy_namespace(xp):
            import cupyx.scipy.linalg

            return cupyx.scipy.linalg.solve_triangular(matrix, rhs, lower=lower)
        if array_api_compat.is_numpy_namespace(xp) and type(matrix) is np.ndarray:
            import scipy.linalg

            return scipy.linalg.solve_triangular(matrix, rhs, lower=lower, check_finite=False)
        return solve(xp, matrix, rhs)


def finite_entries(xp: Any, matrix: Any) -> Any:
    """``matrix`` with its non-finite entries set to 0: the input of a decomposition that
    raises on them (torch's ``eigh`` and SVD: "failed to converge") where the products it
    came from are checked only when the estimate is read (torch, JAX, CuPy), so that the
    check, not the decomposition, says what went wrong (a non-finite product). Where
    products are checked at once (NumPy) no such entry gets here."""
    return xp.where(xp.isfinite(matrix), matrix, xp.zeros_like(matrix))


def cholesky(xp: Any, matrix: Any) -> Any:
    """The lower Cholesky factor, without a host check (torch: ``cholesky_ex``); a matrix
    that is not positive definite gives non-finite entries or raises (NumPy). On one host
    thread (:func:`one_blas_thread`)."""
    with one_blas_thread(xp, work=matrix.shape[-1] ** 3):
        if array_api_compat.is_torch_namespace(xp):
            import torch

            factor, info = torch.linalg.cholesky_ex(matrix)
            return torch.where(info == 0, factor, torch.full_like(factor, math.nan))
        return xp.linalg.cholesky(matrix)


# ------------------------------------------------------------ value and gradient apart
def with_gradient_of(
    xp: Any,
    value_function: Callable[..., Any],
    gradient_function: Callable[..., Any],
    *arrays: Any,
) -> Any:
    """``value_function(*arrays)``, differentiated as ``gradient_function(*arrays)``: two
    forms of the same function of the arrays, one computed for its rounding and one for
    its derivatives (an SVD's backward pass divides by the gaps between singular values,
    and is NaN where two are equal; a pseudo-inverse's is not).

    Under JAX a ``jax.custom_jvp`` whose tangent is ``gradient_function``'s (forward and
    reverse mode, inside ``jax.jit`` and ``jax.vmap``; the gradient form runs only when
    something is differentiated). On torch an ``autograd.Function`` whose backward pass
    (``torch.func.vjp``) and forward-mode rule (the pullback of the pullback) are
    ``gradient_function``'s, with a generated vmap rule, so ``torch.func.grad``,
    ``torch.func.jvp``, ``torch.func.vmap`` and second derivatives go through it.
    Elsewhere the value alone."""
    if array_api_compat.is_jax_namespace(xp):
        return _jax_with_gradient_of(value_function, gradient_function)(*arrays)
    if array_api_compat.is_torch_namespace(xp) and _torch_differentiating(arrays):
        return _torch_with_gradient_of().apply(value_function, gradient_function, *arrays)
    return value_function(*arrays)


def may_differentiate(xp: Any, x: Any) -> bool:
    """Whether ``x`` may be differentiated: a JAX tracer (a transformation may be taking
    its derivative), a torch tensor under some form of differentiation
    (:func:`_torch_differentiating`); never for other libraries."""
    if array_api_compat.is_jax_namespace(xp):
        return is_tracer(x)
    if array_api_compat.is_torch_namespace(xp):
        return _torch_differentiating((x,))
    return False


def _jax_with_gradient_of(
    value_function: Callable[..., Any], gradient_function: Callable[..., Any]
) -> Callable[..., Any]:
    import jax

    @jax.custom_jvp
    def function(*arrays: Any) -> Any:
        return value_function(*arrays)

    @function.defjvp
    def tangent(primals: Any, tangents: Any) -> tuple[Any, Any]:
        _, direction = jax.jvp(gradient_function, tuple(primals), tuple(tangents))
        return value_function(*primals), direction

    return function  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=1)
def _torch_with_gradient_of() -> Any:
    import torch

    class WithGradientOf(torch.autograd.Function):
        # (the setup_context form, with a vmap rule and a forward-mode rule: torch.func's
        # transforms and forward-mode AD go through the gradient form as well)
        generate_vmap_rule = True

        @staticmethod
        def forward(value_function: Any, gradient_function: Any, *arrays: Any) -> Any:
            return value_function(*arrays)

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            _, ctx.gradient_function, *arrays = inputs
            ctx.save_for_backward(*arrays)
            ctx.save_for_forward(*arrays)

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> Any:
            arrays = ctx.saved_tensors
            _, pullback = torch.func.vjp(ctx.gradient_function, *arrays)  # type: ignore[misc]
            found = pullback(grads if len(grads) > 1 else grads[0])
            wanted = ctx.needs_input_grad[2:]
            return (None, None, *(g if w else None for g, w in zip(found, wanted)))

        @staticmethod
        def jvp(ctx: Any, _value: Any, _gradient: Any, *tangents: Any) -> Any:
            # J t as the pullback of the pullback (torch.func.jvp would nest forward-mode
            # AD inside torch.autograd.forward_ad's level, which torch refuses)
            arrays = ctx.saved_tensors
            directions = tuple(
                torch.zeros_like(x) if t is None else t for x, t in zip(arrays, tangents)
            )
            outputs, pullback = torch.func.vjp(ctx.gradient_function, *arrays)  # type: ignore[misc]
            several = isinstance(outputs, tuple)
            zeros = tuple(torch.zeros_like(y) for y in outputs) if several else (outputs * 0,)
            _, transposed = torch.func.vjp(  # type: ignore[misc]
                lambda *cotangents: pullback(cotangents if several else cotangents[0]), *zeros
            )
            found = transposed(directions)
            return found if several else found[0]

    return WithGradientOf


# ------------------------------------------------------------ Gauss quadrature rules
def gauss_rule(
    xp: Any, tridiagonal: Any, function: Callable[[Any, Any], Any]
) -> tuple[Any, Any, Any]:
    """``e_1^T f(T) e_1`` for each of the (m, k, k) symmetric matrices ``T`` (the sum of
    f over the eigenvalues weighted by the squared first components of the eigenvectors),
    with the eigenvalues and eigenvectors (one ``eigh``; they carry no gradient).

    Its torch gradient is the Daleckii-Krein formula ``U (F o c c^T) U^T`` (c = U^T e_1,
    F the divided differences of f over the eigenvalues, f' where two are within
    sqrt(eps) of each other), not the derivative of the eigenvectors, which divides by
    the gaps between eigenvalues: Lanczos without reorthogonalisation repeats converged
    Ritz values ("ghosts"), and the gradient of a log-determinant was NaN in every entry
    through ``eigh``'s own backward pass. The value is the same function of T either
    way. Under JAX the same gradient is the value's ``jax.custom_jvp`` (forward and
    reverse mode, inside ``jax.jit`` and ``jax.vmap``)."""
    if array_api_compat.is_torch_namespace(xp) and _torch_differentiating((tridiagonal,)):
        return _torch_gauss_rule().apply(tridiagonal, function, xp)
    if array_api_compat.is_jax_namespace(xp):
        return _jax_gauss_rule(xp, tridiagonal, function)
    nodes, vectors = xp.linalg.eigh(tridiagonal)
    return xp.sum(vectors[:, 0, :] ** 2 * function(xp, nodes), axis=1), nodes, vectors


def _jax_gauss_rule(
    xp: Any, tridiagonal: Any, function: Callable[[Any, Any], Any]
) -> tuple[Any, Any, Any]:
    """:func:`gauss_rule` under JAX: one ``jax.custom_jvp`` that gives the value, the
    eigenvalues and the eigenvectors, whose tangent is the value's Daleckii-Krein
    <G, dT> (G from :func:`_daleckii_krein`; the eigenpairs get none). The rule
    computes the eigenpairs of its primal T itself, so that G is a differentiable
    function of T: second derivatives go through ``eigh``'s own (with the eigenpairs
    held fixed they read -4.31 for -4.63)."""
    import jax

    def values_and_slopes(nodes: Any) -> tuple[Any, Any]:  # (f' of an elementwise f)
        ones = xp.ones_like(nodes)
        return jax.jvp(lambda x: function(xp, x), (nodes,), (ones,))  # type: ignore[no-any-return]

    @jax.custom_jvp
    def rule(matrix: Any) -> tuple[Any, Any, Any]:
        nodes, vectors = xp.linalg.eigh(matrix)
        return xp.sum(vectors[:, 0, :] ** 2 * function(xp, nodes), axis=1), nodes, vectors

    @rule.defjvp
    def rule_tangent(primals: Any, tangents: Any) -> tuple[Any, Any]:
        (matrix,), (direction,) = primals, tangents
        nodes, vectors = xp.linalg.eigh(matrix)
        values, slopes = values_and_slopes(nodes)
        value = xp.sum(vectors[:, 0, :] ** 2 * values, axis=1)
        gradient = _daleckii_krein(xp, nodes, vectors, values, slopes)
        tangent = xp.sum(gradient * direction, axis=(1, 2))
        return (value, nodes, vectors), (tangent, xp.zeros_like(nodes), xp.zeros_like(vectors))

    return rule(tridiagonal)  # type: ignore[no-any-return]


def _daleckii_krein(
    xp: Any, nodes: Any, vectors: Any, values: Any, slopes: Any, rows: int = 1
) -> Any:
    """``U (F o W) U^H`` per matrix, W = U_r^H U_r for the first ``rows`` rows U_r of U:
    the gradient K of sum_{i < rows} f(T)_ii with respect to T, d = tr(K dT) (``values`` =
    f(nodes), ``slopes`` = f'(nodes); for ``rows = 1`` and a real T, ``U (F o c c^T) U^T``
    with c = U^T e_1)."""
    gaps = nodes[:, :, None] - nodes[:, None, :]
    rises = values[:, :, None] - values[:, None, :]
    eps = float(xp.finfo(nodes.dtype).eps)
    # close: within sqrt(eps) of the larger of the two (the difference of two rounded
    # values of f is then mostly rounding; the mean of the slopes is off by the gap
    # squared times f''' / 8). Per pair: a test relative to the largest node took 1e-9
    # and 2e-9 as equal next to 1, and a log's divided difference read 0.75e9 for
    # log(2) 1e9 (gradients of slq and slq++ 7% off on such spectra; found by a review)
    scale = xp.maximum(xp.abs(nodes[:, :, None]), xp.abs(nodes[:, None, :]))
    close = xp.abs(gaps) <= math.sqrt(eps) * scale
    means = (slopes[:, :, None] + slopes[:, None, :]) / 2
    divided = xp.where(close, means, rises / xp.where(close, xp.ones_like(gaps), gaps))
    top = vectors[:, :rows, :]
    inner = xp.astype(divided, vectors.dtype) * (_h(xp, top) @ top)
    return vectors @ inner @ _h(xp, vectors)


def block_gauss_rule(
    xp: Any, matrix: Any, rows: int, function: Callable[[Any, Any], Any]
) -> tuple[Any, Any]:
    """``sum_{i < rows} f(T)_ii`` of a Hermitian (k, k) ``T`` (the block Gauss rule of a
    block Krylov space's first ``rows`` directions), and T's eigenvalues (no gradient).

    Differentiated by the Daleckii-Krein formula (:func:`_daleckii_krein`), as
    :func:`gauss_rule`, not through ``eigh``'s eigenvectors, whose derivative divides by
    the gaps between eigenvalues: the deflated log-determinant's gradient (``"slq++"``)
    was NaN in every entry for matrices with repeated eigenvalues (c I, a low-rank matrix
    plus a shift), whose projected T repeats them."""
    if array_api_compat.is_torch_namespace(xp) and _torch_differentiating((matrix,)):
        return _torch_block_gauss_rule().apply(matrix, function, xp, rows)  # type: ignore[no-any-return]
    if array_api_compat.is_jax_namespace(xp) and is_tracer(matrix):
        return _jax_block_gauss_rule(xp, matrix, rows, function)
    nodes, vectors = xp.linalg.eigh(matrix)
    return _block_rule_value(xp, nodes, vectors, function(xp, nodes), rows), nodes


def _block_rule_value(xp: Any, nodes: Any, vectors: Any, values: Any, rows: int) -> Any:
    top = vectors[:rows, :]
    weights = abs2(xp, top)
    return xp.sum(xp.sum(weights, axis=0) * values)


def _values_and_slopes(xp: Any, function: Callable[[Any, Any], Any], nodes: Any) -> Any:
    """f and f' at ``nodes`` (an elementwise f: one forward-mode product under JAX; on
    torch one pullback of ones, since torch.func.jvp inside a torch.autograd.forward_ad
    level is refused)."""
    if array_api_compat.is_torch_namespace(xp):
        import torch

        values, pullback = torch.func.vjp(lambda x: function(xp, x), nodes)  # type: ignore[misc]
        return values, pullback(torch.ones_like(values))[0]
    import jax

    return jax.jvp(lambda x: function(xp, x), (nodes,), (xp.ones_like(nodes),))


def _jax_block_gauss_rule(
    xp: Any, matrix: Any, rows: int, function: Callable[[Any, Any], Any]
) -> tuple[Any, Any]:
    import jax

    @jax.custom_jvp
    def rule(matrix: Any) -> tuple[Any, Any]:
        nodes, vectors = xp.linalg.eigh(matrix)
        return _block_rule_value(xp, nodes, vectors, function(xp, nodes), rows), nodes

    @rule.defjvp
    def rule_tangent(primals: Any, tangents: Any) -> tuple[Any, Any]:
        (matrix,), (direction,) = primals, tangents
        nodes, vectors = xp.linalg.eigh(matrix)
        values, slopes = _values_and_slopes(xp, function, nodes)
        value = _block_rule_value(xp, nodes, vectors, values, rows)
        gradient = _daleckii_krein(
            xp, nodes[None, :], vectors[None, :, :], values[None, :], slopes[None, :], rows
        )[0]
        tangent = xp.sum(xp.matrix_transpose(gradient) * direction)
        tangent = real_part(xp, tangent)
        return (value, nodes), (xp.astype(tangent, value.dtype), xp.zeros_like(nodes))

    return rule(matrix)  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=1)
def _torch_block_gauss_rule() -> Any:
    import torch

    def gradient(xp: Any, matrix: Any, function: Any, rows: int) -> Any:
        # (the eigenpairs of the saved T again: G is then a differentiable function of T,
        # and second derivatives go through eigh's own)
        nodes, vectors = torch.linalg.eigh(matrix)
        values, slopes = _values_and_slopes(xp, function, nodes)
        return _daleckii_krein(xp, nodes[None], vectors[None], values[None], slopes[None], rows)[0]

    class BlockGaussRule(torch.autograd.Function):
        # (the setup_context form, with a vmap rule and a forward-mode rule: torch.func's
        # transforms and forward-mode AD go through the rule as well)
        generate_vmap_rule = True

        @staticmethod
        def forward(matrix: Any, function: Any, xp: Any, rows: int) -> Any:
            nodes, vectors = torch.linalg.eigh(matrix)
            return _block_rule_value(xp, nodes, vectors, function(xp, nodes), rows), nodes

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            matrix, ctx.function, ctx.xp, ctx.rows = inputs
            ctx.save_for_backward(matrix)
            ctx.save_for_forward(matrix)
            ctx.mark_non_differentiable(output[1])

        @staticmethod
        def backward(ctx: Any, grad: Any, _: Any) -> Any:
            (matrix,) = ctx.saved_tensors
            return gradient(ctx.xp, matrix, ctx.function, ctx.rows) * grad, None, None, None

        @staticmethod
        def jvp(ctx: Any, direction: Any, *_: Any) -> Any:
            (matrix,) = ctx.saved_tensors
            g = gradient(ctx.xp, matrix, ctx.function, ctx.rows)
            tangent = torch.sum(g.transpose(-2, -1) * direction)
            return real_part(ctx.xp, tangent), None

    return BlockGaussRule


@functools.lru_cache(maxsize=1)
def _torch_gauss_rule() -> Any:
    import torch

    def gradient(xp: Any, tridiagonal: Any, function: Any) -> Any:
        # (the eigenpairs of the saved T again: G is a differentiable function of T, and
        # second derivatives go through eigh's own)
        nodes, vectors = torch.linalg.eigh(tridiagonal)
        values, slopes = _values_and_slopes(xp, function, nodes)
        return _daleckii_krein(xp, nodes, vectors, values, slopes)

    class GaussRule(torch.autograd.Function):
        # (the setup_context form, with a vmap rule and a forward-mode rule: torch.func's
        # transforms and forward-mode AD go through the rule; the old form raised there)
        generate_vmap_rule = True

        @staticmethod
        def forward(tridiagonal: Any, function: Any, xp: Any) -> Any:
            nodes, vectors = torch.linalg.eigh(tridiagonal)
            values = function(xp, nodes)
            return torch.sum(vectors[..., 0, :] ** 2 * values, dim=-1), nodes, vectors

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            tridiagonal, ctx.function, ctx.xp = inputs
            ctx.save_for_backward(tridiagonal)
            ctx.save_for_forward(tridiagonal)
            ctx.mark_non_differentiable(output[1], output[2])

        @staticmethod
        def backward(ctx: Any, grad: Any, *_: Any) -> Any:
            (tridiagonal,) = ctx.saved_tensors
            g = gradient(ctx.xp, tridiagonal, ctx.function)
            return g * grad[..., None, None], None, None

        @staticmethod
        def jvp(ctx: Any, direction: Any, *_: Any) -> Any:
            (tridiagonal,) = ctx.saved_tensors
            g = gradient(ctx.xp, tridiagonal, ctx.function)
            return torch.sum(g * direction, dim=(-2, -1)), None, None

    return GaussRule
