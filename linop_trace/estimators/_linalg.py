"""The linear algebra the estimators share: conjugates and inner products of blocks,
orthonormal bases (and their extension), and the regularized inverse behind the
leave-one-out downdates of XTrace and XDiag.

Pure array code on the namespace ``xp``; a library-specific choice (a faster
factorization where the library can branch on its result) goes through the backend, and
so does the one-thread cap on the host's BLAS around this small algebra
(:func:`~linop_trace._backend.one_blas_thread`): never around the operator's products.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from .. import _backend as backend

__all__ = [
    "as_dtype",
    "column_inner",
    "downdate_directions",
    "extend_basis",
    "hermitian_transpose",
    "orthonormal_basis",
    "orthonormal_factors",
    "project_out",
    "regularized_inverse_h",
    "two_sided_low_rank_diagonal",
]


def as_dtype(x: Any, dtype: Any, xp: Any) -> Any:
    """A real array (or a float, left as it is) in the working dtype, for mixed products."""
    if isinstance(x, float):
        return x
    return x if x.dtype == dtype else xp.astype(x, dtype)


def hermitian_transpose(x: Any, xp: Any) -> Any:
    """``x^H`` of a matrix."""
    return backend.conj(xp, xp.matrix_transpose(x))


def column_inner(x: Any, y: Any, xp: Any) -> Any:
    """``[x_j^H y_j]_j`` for the columns of two ``(n, k)`` blocks, in one pass where the
    library allows (:func:`~linop_trace._backend.column_inner`)."""
    return backend.column_inner(xp, x, y)


def project_out(basis: Any, block: Any, xp: Any) -> Any:
    """``(I - Q Q^H) block`` for an orthonormal ``basis`` Q, on one host thread."""
    n, p = basis.shape
    with backend.one_blas_thread(xp, work=n * p * block.shape[-1]):
        return block - basis @ (hermitian_transpose(basis, xp) @ block)


# ---------------------------------------------------------------- orthonormal bases
#: The multiply-adds ``n k^2`` of an (n, k) block from which its thin QR is Cholesky QR
#: twice (:func:`orthonormal_factors`); smaller blocks take Householder QR. Measured on
#: one thread: Householder wins below (2.5x at 512 x 10), the two are even around
#: 2000 x 20 and 4000 x 100 on NumPy, Cholesky QR wins at 16384 x 50 and beyond.
CHOLESKY_QR_MIN_WORK = 2**20


def orthonormal_factors(block: Any, xp: Any, floor: Any = None) -> tuple[Any, Any]:
    """A thin QR factorization ``block = Q R``: Q orthonormal, R upper triangular.

    Cholesky QR twice (BLAS-3 products: 40 against 64 ms for Householder QR at 16384 x
    100, 215 against 650 ms at 10^5 x 100, NumPy on one thread) when the block is well
    conditioned, which the first pass reveals; R is then the product of the two Cholesky
    factors, so Q^H block costs no further product. Householder QR otherwise (sketches of
    decaying spectra are ill conditioned), and for blocks of fewer than
    :data:`CHOLESKY_QR_MIN_WORK` multiply-adds, where the dozen calls of the two passes
    cost more than their flops save (at 512 x 10: 118 against 46 us on NumPy, 58 against
    37 us in a compiled JAX program). Deciding needs a look at the first pass: the host
    decides for NumPy, the device for JAX (``lax.cond``); torch and CuPy, which cannot
    branch on the device, take Householder QR. On one host thread
    (:func:`~linop_trace._backend.one_blas_thread`).

    Where the block may be differentiated, its derivative is the QR rule of
    :func:`~linop_trace._backend.qr_with_rule` (finite where the block is rank
    deficient), whichever factorization ran; ``floor``: its singular values below this
    carry none.
    """
    return backend.qr_with_rule(xp, functools.partial(_factors, xp), block, floor)


def _factors(xp: Any, block: Any) -> tuple[Any, Any]:
    """:func:`orthonormal_factors` with the libraries' own derivatives."""
    n, k = block.shape
    with backend.one_blas_thread(xp, work=n * k * k):
        if not backend.can_branch(xp) or n * k * k < CHOLESKY_QR_MIN_WORK:
            return backend.householder_qr(xp, block)
        try:
            basis, triangular, good = backend.jit(xp, _cholesky_qr2)(xp, block)
        except Exception:  # Cholesky failed (NumPy raises): numerically rank deficient
            return tuple(backend.householder_qr(xp, block))
        return backend.device_cond(
            xp,
            good,
            lambda basis, triangular, block: (basis, triangular),
            lambda basis, triangular, block: tuple(backend.householder_qr(xp, block)),
            basis,
            triangular,
            block,
        )


def orthonormal_basis(block: Any, xp: Any, floor: Any = None) -> Any:
    """An orthonormal basis Q of range(block) (the Q of :func:`orthonormal_factors`)."""
    return orthonormal_factors(block, xp, floor)[0]


def _cholesky_qr2(xp: Any, block: Any) -> tuple[Any, Any, Any]:
    """Cholesky QR twice, ``(Q, R, worked)``: worked when the first pass's Q^H Q is
    within 0.1 of I (then the second pass restores orthogonality to working precision) and
    no entry is non-finite (JAX's Cholesky returns NaN where others raise).

    block = F L1^H and F = Q L2^H, so R = L2^H L1^H = (L1 L2)^H."""
    first, lower_1 = _cholesky_pass(xp, block, hermitian_transpose(block, xp) @ block)
    gram = hermitian_transpose(first, xp) @ first
    k = gram.shape[0]
    eye = xp.eye(k, dtype=gram.dtype, device=backend.device_of(gram))
    close = xp.max(xp.abs(gram - eye)) < 0.1 if k else xp.asarray(True)
    second, lower_2 = _cholesky_pass(xp, first, gram)
    triangular = hermitian_transpose(lower_1 @ lower_2, xp)
    return second, triangular, close & xp.all(xp.isfinite(second))


def _cholesky_pass(xp: Any, block: Any, gram: Any) -> tuple[Any, Any]:
    """``(block @ L^{-H}, L)`` with ``L L^H = gram = block^H block``."""
    lower = xp.linalg.cholesky(gram)
    eye = xp.eye(gram.shape[0], dtype=gram.dtype, device=backend.device_of(gram))
    inverse = backend.solve_triangular(xp, lower, eye, lower=True)
    return block @ hermitian_transpose(inverse, xp), lower


def extend_basis(basis: Any, block: Any, xp: Any, floor: Any = None) -> Any:
    """Orthonormal columns spanning ``(I - QQ^H) block``, orthogonal to ``basis`` Q.

    Projected twice (classical Gram-Schmidt with one reorthogonalization), then
    orthonormalized; then once more project-and-orthonormalize: when the block is rank
    deficient (A of low rank, repeated probes) the QR fills the missing columns with
    normalized rounding errors, which carry O(1) components along Q until projected out
    again. ``[Q, new]`` stays orthonormal to working precision either way. On one host
    thread (:func:`~linop_trace._backend.one_blas_thread`).

    ``floor``: directions of the projected block below this size carry no derivative
    (:func:`orthonormal_factors`); the second pass, of an orthonormal block, needs none."""
    n, p = basis.shape
    k = block.shape[-1]
    with backend.one_blas_thread(xp, work=n * (p + k) * k):
        for _ in range(2):
            block = project_out(basis, project_out(basis, block, xp), xp)
            block = orthonormal_basis(block, xp, floor)
            floor = None
    return block


# ------------------------------------------------------ leave-one-out downdates
def regularized_inverse_h(triangular: Any, xp: Any, *, upper: bool = True) -> Any:
    """R^{-H} of the triangular factor of a sketch, finite even when R is singular.

    ``upper=False`` takes any square R (``Q^H Y`` for a basis Q other than the QR
    factor's, as an extended basis gives) and solves by LU.

    A numerically singular R (A of low rank, or zero on the probes: exact zeros on the
    diagonal of R) gets a shift at round-off level, eps max|R_ij| (eps when R = 0), so
    its columns stay finite; the directions they give only matter where Y has rank to
    spare. For an upper triangular R, R^H is lower triangular and each solve is one
    substitution. Should it still
    fail (a shifted diagonal entry that cancels to zero, or round-off diagonals just
    above the shift, as two equal +-1 probes give, whose reciprocals compound past the
    largest float), the shift is sqrt(eps) max|R_ij| instead. Where reads are free
    (NumPy) the second solve runs only when needed; on devices both run (s x s, cheap)
    and the finite one is kept. The solves run on one host thread
    (:func:`~linop_trace._backend.one_blas_thread`).
    """
    s = triangular.shape[0]
    eye = xp.eye(s, dtype=triangular.dtype, device=backend.device_of(triangular))
    if not s:
        return eye
    eps = float(xp.finfo(backend.real_part(xp, triangular).dtype).eps)
    fixed = xp.abs(backend.stop_gradient(triangular))
    scale = xp.max(fixed)
    scale = xp.where(scale > 0, scale, xp.ones_like(scale))
    small = xp.any(xp.linalg.diagonal(fixed) < eps * scale)
    shift = as_dtype(eps * scale, triangular.dtype, xp)
    shifted = xp.where(small, triangular + shift * eye, triangular)
    try:
        inverse_h = _solve_h(xp, shifted, eye, upper)
    except Exception:  # NumPy raises on an exact zero pivot
        inverse_h = None
    finite = None if inverse_h is None else xp.all(xp.isfinite(inverse_h))
    if inverse_h is not None and backend.known_value(xp, finite):
        return inverse_h
    wider = triangular + as_dtype(math.sqrt(eps) * scale, triangular.dtype, xp) * eye
    fallback = _solve_h(xp, wider, eye, upper)
    if inverse_h is None or backend.known_value(xp, finite) is False:
        return fallback
    return xp.where(finite, inverse_h, fallback)


def _solve_h(xp: Any, matrix: Any, rhs: Any, upper: bool) -> Any:
    """``matrix^{-H} rhs``: a substitution for upper triangular ``matrix``, else LU."""
    if upper:
        return backend.solve_triangular(xp, hermitian_transpose(matrix, xp), rhs, lower=True)
    return backend.solve(xp, hermitian_transpose(matrix, xp), rhs)


def downdate_directions(triangular: Any, xp: Any, *, upper: bool = True) -> Any:
    """Columns of R^{-H}, normalized: s_i spans range(Q) minus range(Y without column i)
    (:func:`regularized_inverse_h` when R is singular; ``upper`` as there).

    Each column is divided by its largest entry before its length is taken: R^{-H} of
    a nearly singular R has entries past the square root of the largest float, whose
    squares overflowed (float32 XDiag with a sketch wider than n: entries of 1e20, a
    length of inf, and the column zeroed)."""
    inverse_h = regularized_inverse_h(triangular, xp, upper=upper)
    scaled, _ = backend.divide_by_largest(xp, inverse_h, axis=0)
    norms = xp.sqrt(xp.sum(backend.abs2(xp, scaled), axis=0))
    return scaled / xp.astype(norms, scaled.dtype)


def two_sided_low_rank_diagonal(basis: Any, image: Any, residual: Any, xp: Any) -> Any:
    """diag(P A + A P - P A P), P = QQ^H, for self-adjoint A (Diag++ and XDiag's two-sided
    forms): with Z = A Q (``image``) and Zp = (I - P) Z (``residual``) it is
    Re sum_l conj(Q_kl) (Z + Zp)_kl, in Q's dtype."""
    diagonal = backend.row_inner(xp, basis, image + residual)
    if backend.is_complex_dtype(xp, diagonal.dtype):
        diagonal = xp.astype(xp.real(diagonal), diagonal.dtype)
    return diagonal
