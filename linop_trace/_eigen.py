"""Extreme eigenvalues of self-adjoint operators: restarted block Lanczos.

Each cycle builds a block Krylov basis V = [V_0, A V_0, A^2 V_0, ...] (orthonormalised,
b columns per block, one ``matmat`` of b columns per block) and keeps the products A V,
so that the Rayleigh-Ritz step (the eigenpairs of V^H A V) and every Ritz pair's residual
A x - theta x cost no further product. Converged when each wanted pair's residual norm is
at most ``tol`` times the largest Ritz value's magnitude; otherwise the cycle restarts from
its best b Ritz vectors, whose products are already known (a thick restart: the new basis
contains the old best approximations, so nothing converged is lost).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _backend as backend
from ._operators import aslinearoperator, widened
from ._probes import ProbeSampler
from ._validation import check_positive_int, check_square
from .estimators._base import CountingMatmat
from .estimators._linalg import hermitian_transpose, orthonormal_basis, orthonormal_factors

__all__ = ["EigenResult", "eigenvalues"]

WHICH = ("largest", "smallest", "both_ends")


@dataclass
class EigenResult:
    """Extreme eigenvalues from :func:`~linop_trace.eigenvalues`.

    Attributes
    ----------
    values : array, shape (k,)
        The eigenvalues, in the operator's library: descending for ``"largest"``,
        ascending for ``"smallest"`` and ``"both_ends"``.
    vectors : array of shape (n, k), or None
        Unit eigenvectors (columns), with ``return_vectors=True``.
    residual_norms : array, shape (k,)
        ``||A x - lambda x||`` of each returned pair: a bound on its distance to an eigenvalue.
    num_matvecs : int
        Operator columns spent.
    converged : bool
        Whether every residual met the tolerance within ``max_matvecs``.
    cycles : int
        Restart cycles run.
    """

    values: Any
    vectors: Any
    residual_norms: Any
    num_matvecs: int
    converged: bool
    cycles: int


def eigenvalues(
    A: Any,
    k: int = 6,
    which: str = "largest",
    tol: float = 1e-6,
    max_matvecs: int | None = None,
    block_size: int | None = None,
    basis_blocks: int | None = None,
    return_vectors: bool = False,
    seed: Any = None,
    check_finite: bool = True,
) -> EigenResult:
    """The ``k`` extreme eigenvalues of a self-adjoint operator by restarted block Lanczos.

    Parameters
    ----------
    A : LinearOperator or matrix
        Self-adjoint (symmetric or Hermitian): Lanczos assumes it.
    k : int
        Number of eigenvalues.
    which : {"largest", "smallest", "both_ends"}
        Algebraically largest, smallest, or ceil(k/2) largest and floor(k/2) smallest.
    tol : float
        Stop when every returned pair's residual ``||A x - theta x||`` is at most ``tol`` times
        the largest ``|theta|``. The eigenvalue's error is then at most that residual, and
        for well-separated eigenvalues about its square over the gap.
    max_matvecs : int, optional
        Budget of operator columns (default ``max(1000, 50 k)``, capped at 50 n); when it
        runs out the result has ``converged=False`` and a ``RuntimeWarning`` says so. The
        first block is always made whole: a cap below ``block_size`` spends one block.
    block_size : int, optional
        Columns per block, b (default ``min(k + 2, n)``): each Krylov step is one
        ``matmat`` of b columns.
    basis_blocks : int, optional
        Basis size per cycle in blocks of b columns (default: ``max(6 b, 40)`` columns,
        at most n). At a restart half the basis (at least the k wanted Ritz vectors) is
        kept.
    return_vectors : bool
        Also return the eigenvectors.
    seed : int, None, or the library's generator/key
        For the starting block (Gaussian).
    check_finite : bool
        Raise ``FloatingPointError`` when a product is NaN or infinite.

    Returns
    -------
    EigenResult

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import eigenvalues
    >>> A = np.diag(np.arange(1.0, 101.0))
    >>> result = eigenvalues(A, k=3, seed=0)
    >>> np.round(result.values, 6).tolist(), result.converged
    ([100.0, 99.0, 98.0], True)
    """
    operator = widened(aslinearoperator(A))
    backend.refuse_dask(operator.xp, "eigenvalues")
    n = check_square(operator, "eigenvalues")
    k = check_positive_int(k, "k")
    if k > n:
        raise ValueError(f"k = {k} eigenvalues asked of an operator of size n = {n}")
    if which not in WHICH:
        raise ValueError(f"unknown which={which!r}; choose one of {', '.join(WHICH)}")
    if not (isinstance(tol, numbers.Real) and not isinstance(tol, bool) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    tol = float(tol)  # (NumPy scalars too)
    b = min(k + 2, n) if block_size is None else check_positive_int(block_size, "block_size")
    b = min(b, n)
    if b < k and which != "both_ends":
        b = k
    if basis_blocks is None:
        columns = max(6 * b, 40)
    else:
        columns = check_positive_int(basis_blocks, "basis_blocks", 2) * b
    columns = max(b, min(columns, n))
    # Ritz vectors kept at a restart: the wanted ones and as many more as half the basis
    kept = max(min(k, columns - b), min(columns // 2, columns - b))
    budget = max(1000, 50 * k) if max_matvecs is None else max_matvecs
    budget = min(check_positive_int(budget, "max_matvecs"), max(50 * n, b))
    xp = operator.xp
    # products scaled by a power of two where A's entries are far from 1 (the residuals'
    # squares underflowed at 1e-25 in float32: "converged" with 7% errors; overflowed at
    # 1e30); values and residual norms are scaled back at the end, exactly
    matmat = CountingMatmat(
        operator, bool(check_finite), None, backend.caller_precision(xp), unit_scale=True
    )
    sampler = ProbeSampler("gaussian", n, xp, operator.dtype, operator.device, seed)
    start = orthonormal_basis(sampler(b), xp)
    start_image = matmat(start)
    direction = start_image
    cycles = 0
    # the wanted pairs of the last basis checked inside a cycle: (columns, pairs), reused
    # when the cycle ends on that basis (no second Rayleigh-Ritz of the same basis)
    last: tuple[int, tuple[Any, ...]] | None = None

    def converged_now(basis: Any, images: Any) -> bool:
        """Whether the wanted Ritz pairs of a partial basis already meet ``tol`` (checked
        after every block, so a loose tolerance stops inside the first cycle)."""
        nonlocal last
        if basis.shape[1] < k + b:
            return False
        pairs = _wanted_pairs(basis, images, k, which, xp)
        last = (basis.shape[1], pairs)
        values, norms = pairs[0], pairs[4]
        numbers = backend.read_floats(xp, [xp.max(norms), xp.max(xp.abs(values))])
        return numbers is not None and numbers[0] <= tol * max(numbers[1], 1e-300)

    largest: float | None = None
    scale: float | None = None
    while True:
        cycles += 1
        last = None
        basis, images = _krylov_cycle(
            matmat, start, start_image, direction, columns, budget, xp, converged_now
        )
        if last is not None and last[0] == basis.shape[1]:
            pairs = last[1]
        else:
            pairs = _wanted_pairs(basis, images, k, which, xp)
        values, rotations, chosen_values, chosen_vectors, norms = pairs
        matmat.check_now()
        scale = backend.read_float(xp.max(xp.abs(values)))
        largest = backend.read_float(xp.max(norms))
        done = largest is not None and scale is not None and largest <= tol * max(scale, 1e-300)
        exhausted = matmat.columns + b > budget or basis.shape[1] >= n
        if done or exhausted:
            break
        keep = _wanted(values, kept, which, xp)
        kept_rotations = xp.take(rotations, keep, axis=1)
        start = basis @ kept_rotations
        start_image = images @ kept_rotations
        theta = xp.take(values, keep)
        # the kept vectors' residuals span the one new direction per block column
        direction = _leading_directions(start_image - start * theta[None, :], b, xp)
    converged = bool(done)
    units = matmat.scale  # (the products' power of two: A's own units back)
    if units is not None:
        chosen_values, norms = matmat.in_operator_units(chosen_values, norms)
        factor = backend.read_float(units)
        if factor and largest is not None and scale is not None:
            largest, scale = largest / factor, scale / factor
    if not converged:
        warnings.warn(
            f"eigenvalues: the largest residual is {largest:.3g} after {matmat.columns} "
            f"products, above tol * |theta|max = {tol * (scale or 0):.3g}; raise max_matvecs "
            "or basis_blocks, or loosen tol",
            RuntimeWarning,
            stacklevel=2,
        )
    return EigenResult(
        chosen_values,
        chosen_vectors if return_vectors else None,
        norms,
        matmat.columns,
        converged,
        cycles,
    )


def _krylov_cycle(
    matmat: Any,
    start: Any,
    start_image: Any,
    direction: Any,
    columns: int,
    budget: int,
    xp: Any,
    converged: Callable[[Any, Any], bool] | None = None,
) -> tuple[Any, Any]:
    """An orthonormal basis of ``columns`` columns (fewer when the budget runs out, or
    once ``converged(basis, images)`` says so after a block) and its image: ``start``
    (orthonormal, image known), then blocks grown from ``direction`` (b columns) by the
    operator, each orthonormalised against all before.

    The basis and its image fill two preallocated (n, columns) blocks, and the steps read
    their leading columns: joining a list of blocks anew at every step (twice more for the
    convergence check) copied the whole basis three times a block."""
    b = direction.shape[1]
    n, size = start.shape[0], start.shape[1]
    device = backend.device_of(start)
    basis = xp.empty((n, max(columns, size)), dtype=start.dtype, device=device)
    images = xp.empty((n, max(columns, size)), dtype=start_image.dtype, device=device)
    basis = backend.with_slot(xp, basis, (slice(None), slice(0, size)), start)
    images = backend.with_slot(xp, images, (slice(None), slice(0, size)), start_image)
    current = direction
    while size + b <= columns and matmat.columns + b <= budget:
        known = basis[:, :size]
        block = current
        block = _orthonormal_against(known, block, xp)
        current = matmat(block)
        basis = backend.with_slot(xp, basis, (slice(None), slice(size, size + b)), block)
        images = backend.with_slot(xp, images, (slice(None), slice(size, size + b)), current)
        size += b
        if converged is not None and converged(basis[:, :size], images[:, :size]):
            break
    return basis[:, :size], images[:, :size]


def _orthonormal_against(known: Any, block: Any, xp: Any) -> Any:
    """Orthonormal columns spanning ``block`` less its part in range(``known``) (block
    Gram-Schmidt, twice), orthogonal to ``known``.

    A block (nearly) inside range(known) leaves columns of rounding errors, or exact
    zeros, once projected: the Krylov space is invariant (A a multiple of I plus a low
    rank part, or a block exhausted). Their QR normalises them into directions with O(1)
    components along ``known``, and a basis that is no longer orthonormal gives Ritz
    values outside the spectrum (0 for I plus rank 2) with tiny residuals. Such a block
    (a diagonal entry of R below sqrt(eps) of the block's largest column before the
    projection) is projected and orthonormalised once more: its new columns are then
    arbitrary unit directions orthogonal to ``known``, which the Krylov method may use
    as any other (as :func:`~linop_trace.estimators._linalg.extend_basis` does). The test
    is read on the host (one read per block, as the cycle's convergence check reads);
    under a JAX trace the second pass always runs."""
    original = block
    for _ in range(2):  # block Gram-Schmidt against every earlier block, twice
        block = block - known @ (hermitian_transpose(known, xp) @ block)
    block, triangular = orthonormal_factors(block, xp)
    numbers = backend.read_floats(
        xp,
        [
            xp.min(xp.abs(xp.linalg.diagonal(triangular))),
            xp.max(backend.column_norms(xp, original)),
        ],
    )
    eps = float(xp.finfo(backend.real_part(xp, triangular).dtype).eps)
    if numbers is not None and numbers[0] > math.sqrt(eps) * numbers[1]:
        return block
    block = block - known @ (hermitian_transpose(known, xp) @ block)
    return orthonormal_basis(block, xp)


def _leading_directions(block: Any, count: int, xp: Any) -> Any:
    """The ``count`` leading left singular vectors of ``block`` (its numerical range)."""
    left, _, _ = xp.linalg.svd(block, full_matrices=False)
    return left[:, :count]


def _projected_eigenpairs(basis: Any, images: Any, xp: Any) -> tuple[Any, Any]:
    """Eigenpairs (values ascending) of the operator projected on the basis, V^H A V."""
    projected = hermitian_transpose(basis, xp) @ images
    projected = (projected + hermitian_transpose(projected, xp)) / 2
    # a non-finite product (its check raises when read: at once on NumPy, at the cycle's
    # end where checks wait for the device) must not reach the eigensolver, whose own
    # LinAlgError (torch) named it instead of the product; NaN values fail the check
    finite = xp.all(xp.isfinite(projected))
    safe = xp.where(finite, projected, xp.zeros_like(projected))
    values, rotations = xp.linalg.eigh(safe)
    nan = xp.asarray(math.nan, dtype=values.dtype, device=backend.device_of(values))
    return xp.where(finite, values, nan), rotations


def _wanted_pairs(
    basis: Any, images: Any, count: int, which: str, xp: Any
) -> tuple[Any, Any, Any, Any, Any]:
    """``(values, rotations, theta, vectors, norms)``: every Ritz value (ascending) and
    its rotation from the basis and A basis, and for the ``count`` wanted pairs their
    values, vectors and residual norms ``||A x - theta x||``. Only the wanted vectors
    and images are formed, (n, p) @ (p, count) products where all of them would be
    (n, p) @ (p, p)."""
    values, rotations = _projected_eigenpairs(basis, images, xp)
    wanted = _wanted(values, count, which, xp)
    theta = xp.take(values, wanted)
    chosen = xp.take(rotations, wanted, axis=1)
    vectors = basis @ chosen
    residuals = images @ chosen - vectors * theta[None, :]
    norms = xp.sqrt(backend.real_part(xp, backend.column_inner(xp, residuals, residuals)))
    return values, rotations, theta, vectors, norms


def _wanted(values: Any, count: int, which: str, xp: Any) -> Any:
    """Indices of the ``count`` wanted Ritz values (``values`` ascending)."""
    size = values.shape[0]
    count = min(count, size)
    device = backend.device_of(values)
    if which == "largest":
        return xp.arange(size - 1, size - 1 - count, -1, device=device)
    if which == "smallest":
        return xp.arange(count, device=device)
    return _ends(values, count, xp)


def _ends(values: Any, count: int, xp: Any) -> Any:
    """ceil(count/2) largest and floor(count/2) smallest, ascending."""
    size = values.shape[0]
    count = min(count, size)
    device = backend.device_of(values)
    low = xp.arange(count // 2, device=device)
    high = xp.arange(size - (count - count // 2), size, device=device)
    return xp.concat([low, high])
