"""XDiag (Epperly, Tropp and Webber 2024, Section 4): the exchangeable diagonal estimator.

With probes Omega = [w_1..w_s] and Y = A Omega = QR, each probe serves once as a Hutchinson
probe of what the other probes' sketch leaves, and s - 1 times in their sketches:

    d^(i) = diag(Q_(i) Q_(i)^H A) + conj(w_i) * (I - Q_(i) Q_(i)^H) A w_i,

Q_(i) an orthonormal basis of Y without column i; the estimate is the mean of the d^(i).
Q_(i) Q_(i)^H = QQ^H - q_i q_i^H with q_i = Q s_i, s_i the i-th column of R^{-H}
normalized (a rank-one downdate), so with Z = A^H Q and T = Z^H Omega = Q^H A Omega:

    d^(i) = diag(Q Z^H) - (Q s_i) * conj(Z s_i) + conj(w_i) * (y_i - Q t_i + Q s_i (s_i^H t_i)).

Two-sided estimates (A = A^H: the default there). With P_(i) = Q_(i) Q_(i)^H,

    d^(i) = diag(P_(i) A + A P_(i) - P_(i) A P_(i)) + conj(w_i) * (I - P_(i)) A (I - P_(i)) w_i,

unbiased for the same reason (the first term is diag(A) - diag((I - P) A (I - P)), and w_i
is independent of P_(i)), from the same products A Omega and A Q. The part of A that an
approximate sketch misses enters the residual to second order instead of first: smaller
errors on decaying spectra, for about twice the algebra (row formulas in
:func:`_two_sided_row_pieces`; trade-offs and derivation in docs/estimators/xdiag.rst).

The honest error estimate. The paper's std(d^(i)) / sqrt(s) is too small: the d^(i) are
exchangeable but positively correlated. XTrace's cross jackknife (``_xtrace.py``) carries
over entry by entry: with d_j^(i) the estimate of probe j when probe i also leaves the
sketch and the jackknife pseudo-values p_i = d^(i) + sum_{j != i} (d^(j) - d_j^(i)),

    C_k = sum_i Re conj(d_ki - dbar_k)(p_ki - pbar_k),   J_k = sum_i |p_ki - pbar_k|^2,
    stderr_k^2 = max(C_k + min(J_k - C_k, C_k) / (s - 2), sum_i |d_ki - dbar_k|^2)
                 / (s (s - 1))

for each entry k (C_k alone falls short by (s - 2) / (s - 1) on a flat spectrum; the
second-order correction is :func:`~linop_trace._stats.second_order_sum`'s). All pairs come from s x s matrices: with c_ij = s_i^H s_j,
Q_(ij) Q_(ij)^H = Q (I - Pi_ij) Q^H, where Pi_ij = (s_i s_i^H - c_ij s_i s_j^H
- conj(c_ij) s_j s_i^H + s_j s_j^H) / (1 - |c_ij|^2) projects onto span(s_i, s_j) (a
rank-two downdate). With B = Q S, C = Z S, u_ij = s_i^H t_j:

    d_j^(i) = diag(Q Z^H) - [B_i conj(C_i) - c_ij B_i conj(C_j) - conj(c_ij) B_j conj(C_i)
              + B_j conj(C_j)] / (1 - |c_ij|^2)
              + conj(w_j) * (y_j - Q t_j + a_ij B_i + b_ij B_j),
    a_ij = (u_ij - c_ij u_jj) / (1 - |c_ij|^2),  b_ij = (u_jj - conj(c_ij) u_ij) / (1 - |c_ij|^2);

every sum over j is an (n, s) @ (s, s) product: O(n s^2) flops, never an (n, s, s) array,
no further operator product.

Degrees of freedom. Entry k has Satterthwaite's dof 2 s mean(v_k)^2 / var(v_k) for the
variance estimate it uses (v_ki its per-probe terms, or the squares |d_ki - dbar_k|^2
where the floor applies), clipped to [2, s - 1]. ``Estimate.dof`` is one number: the
median over the entries, rounded down (the dof of a typical entry, independent of n; the
minimum would grow more conservative with every entry).

Degenerate sketches. Where 1 - |c_ij|^2 < sqrt(eps) (s_i parallel to s_j: Y numerically
rank deficient) the pair takes d_j^(i) = d^(j) instead of dividing round-off by round-off.
That is not the limit of d_j^(i) in general, so those pseudo-values are approximations,
and the stderr keeps its floor at the plain value; below rank s - 1 every d^(i) is exact
and the stderr is 0 whatever the pairs. A singular R is inverted with a round-off shift
(:func:`~._linalg.regularized_inverse_h`) and 1 / nu_i is taken as s_i^H r_i, so the zero
operator gives exact zeros. Dependent probes would leave every s_i to R's round-off:
short Rademacher blocks (n <= 64, n - s >= 10) are drawn with independent columns
(:meth:`~linop_trace._probes.ProbeSampler.independent`). At most n probes: s = min(m // 2, n).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import _backend as backend
from .._estimate import Estimate
from .._stats import (
    ERROR_PROBES,
    entrywise_dofs,
    entrywise_exchangeable_error,
    low_rank_rounding_size,
    median_dof,
    with_rounding,
)
from ._base import EstimationRequest, Estimator
from ._linalg import (
    downdate_directions,
    hermitian_transpose,
    orthonormal_factors,
    two_sided_low_rank_diagonal,
)

__all__ = ["XDiag", "XDiagResult", "xdiag_core"]

Matmat = Callable[[Any], Any]

#: The reported dof is the median over at most this many evenly spaced entries.
DOF_ENTRIES = 1024
#: Rows of a block of the (n, s) algebra on a CPU: about this many entries per (rows, s)
#: array ...
CHUNK_ENTRIES = 2**15
#: ... and at least this many rows (fewer blocks, less Python overhead, for large s).
CHUNK_ROWS_MIN = 256


@backend.register_pytree_dataclass
@dataclass(frozen=True)
class XDiagResult:
    """XDiag's estimate and what it is made of.

    ``value`` (n,) is the mean of the s exchangeable estimates d^(i); ``stderr`` and
    ``stderr_plain`` (n,) the honest and the paper's entrywise errors and ``dof`` the median
    Satterthwaite dof (a 0-d array), all ``None`` below ``ERROR_PROBES`` probes;
    ``low_rank_diagonal`` (n,) the part common to every d^(i); ``two_sided`` which form
    was used. With ``samples=True`` also the (n, s) ``estimates`` d^(i) and their jackknife
    ``pseudo_values``.
    """

    value: Any
    stderr: Any
    stderr_plain: Any
    dof: Any
    low_rank_diagonal: Any
    two_sided: bool = field(metadata={"static": True})
    estimates: Any = None
    pseudo_values: Any = None


@backend.register_pytree_dataclass
@dataclass(frozen=True)
class Downdates:
    """The (s, s) and (s,) pieces of the leave-one-out downdates (one-sided form): S
    (``downdate``, columns s_i), 1 / nu_i = s_i^H r_i (``inverse_norms``), the Gram matrix
    c_ij = s_i^H s_j, for the pairs the weights 1 / (1 - |c_ij|^2) (``inverse``, 0 for
    j = i or parallel pairs) and couplings K = c_ij / (1 - |c_ij|^2) (transposed), and the
    parallel pairs (``parallel_t``, ``None`` where none are known to exist)."""

    downdate: Any
    inverse_norms: Any
    gram: Any
    inverse: Any
    coupling_h: Any
    coupling_t: Any
    inverse_t: Any
    inverse_sums: Any
    parallel_t: Any
    count_offsets: Any


@backend.register_pytree_dataclass
@dataclass(frozen=True)
class TwoSidedDowndates(Downdates):
    """:class:`Downdates` and the coefficients of the two-sided estimates."""

    core_downdate: Any = None
    downdate_cross: Any = None
    own_square: Any = None
    own_probe: Any = None
    own_shift: Any = None
    pair_left: Any = None
    pair_basis: Any = None
    pair_residual: Any = None
    pair_stacked: Any = None


@backend.register_pytree_dataclass
@dataclass(frozen=True)
class RowPieces:
    """A block of rows (entries): the updates d^(i) - low (``update``, (rows, s)), the
    common ``low_rank_diagonal`` and the row factors the pair sums reuse."""

    update: Any
    low_rank_diagonal: Any
    basis_down: Any
    adjoint_down_c: Any = None
    weight: Any = None
    residual_down: Any = None
    stacked: Any = None
    hutchinson: Any = None
    probes_c: Any = None


@dataclass
class _RowsEstimate:
    """The results of one block of rows (see :func:`_estimate_rows`)."""

    low_rank_diagonal: Any
    value: Any
    stderr: Any = None
    stderr_plain: Any = None
    dof_rows: Any = None
    estimates: Any = None
    pseudo_values: Any = None


def _products_and_factors(
    matmat: Matmat, adjoint: Matmat | None, probes: Any, xp: Any
) -> tuple[Any, ...]:
    """XDiag's two operator products and the factorization between them:
    ``(Q, R, Z)`` with Y = A Omega = QR and Z = A^H Q."""
    image = matmat(probes)
    basis, triangular = orthonormal_factors(image, xp)  # Y = QR
    adjoint_basis = matmat(basis) if adjoint is None else adjoint(basis)  # Z = A^H Q
    return basis, triangular, adjoint_basis


def _one_sided_downdates(xp: Any, triangular: Any) -> Downdates:
    """:class:`Downdates` from the triangular factor R of the sketch."""
    downdate = downdate_directions(triangular, xp)  # R^{-H} e_i / nu_i
    dtype = downdate.dtype
    # 1 / nu_i = s_i^H r_i (R triangular); from R itself, so a singular R (regularized
    # above) gives the residual of y_i it has, e.g. exact zeros when A Omega = 0
    inverse_norms = xp.sum(backend.conj(xp, downdate) * triangular, axis=0)
    count = downdate.shape[1]
    gram = hermitian_transpose(downdate, xp) @ downdate  # c_ij = s_i^H s_j
    eye = xp.eye(count, dtype=dtype, device=backend.device_of(downdate))
    off = 1 - eye
    # 1 - |c_ij|^2 = |s_i - conj(c_ij) s_j|^2. Where it vanishes (s_i parallel to s_j, Y of
    # numerically deficient rank) span(s_i, s_j) = span(s_j), so d_j^(i) = d^(j): such pairs
    # take d^(j) instead of the formula, which would divide round-off by round-off.
    determinant = (
        1 - xp.real(gram * backend.conj(xp, gram))
        if backend.is_complex_dtype(xp, dtype)
        else (1 - gram * gram)
    )
    tolerance = math.sqrt(float(xp.finfo(determinant.dtype).eps))
    valid = xp.astype((determinant > tolerance) & (off != 0), dtype)
    parallel = off - valid
    determinant = xp.where(determinant > tolerance, determinant, xp.ones_like(determinant))
    inverse = valid / xp.astype(determinant, dtype)  # 1 / (1 - |c_ij|^2); 0 if j = i
    coupling = gram * inverse  # K
    transpose = xp.matrix_transpose
    # where reads are free and no pair is parallel (the rule), their correction is
    # skipped; devices always take the general path (a zero correction otherwise)
    none_parallel = backend.known_value(xp, xp.sum(xp.abs(parallel))) == 0
    return Downdates(
        downdate=downdate,
        inverse_norms=inverse_norms,
        gram=gram,
        inverse=inverse,
        coupling_h=transpose(backend.conj(xp, coupling)),
        coupling_t=transpose(coupling),
        inverse_t=transpose(inverse),
        inverse_sums=xp.sum(inverse, axis=1),
        parallel_t=None if none_parallel else transpose(parallel),
        count_offsets=xp.sum(valid, axis=1) - (count - 1),
    )


def _row_pieces(
    xp: Any, downdates: Downdates, probes: Any, basis: Any, adjoint_basis: Any
) -> RowPieces:
    """The d^(i) of a block of rows (entries), and the row pieces the pairs reuse.

    With Y = QR, Q^H y_i = r_i, so s_i^H Q^H y_i = 1 / nu_i (nu_i the norm of column i of
    R^{-H}) and the left-out residual (I - Q_(i) Q_(i)^H) y_i is (Q s_i) / nu_i: the
    distance of y_i from the other columns' span is 1 / nu_i. Hence, with B = Q S, C = Z S
    and E = conj(Omega) / nu - conj(C) (columnwise),

        d^(i) = diag(Q Z^H) + B_i * E_i,

    two (n, s) @ (s, s) products beyond the QR factorization.
    """
    downdate = downdates.downdate
    basis_down = basis @ downdate  # B: columns Q s_i
    adjoint_down_c = backend.conj(xp, adjoint_basis @ downdate)  # conj(C): columns conj(Z s_i)
    weight = backend.conj(xp, probes) * downdates.inverse_norms[None, :] - adjoint_down_c  # E
    update = basis_down * weight  # B * E
    # diag(Q Z^H) (row_inner conjugates its first argument)
    low_rank_diagonal = backend.row_inner(xp, adjoint_basis, basis)
    return RowPieces(
        update, low_rank_diagonal, basis_down, adjoint_down_c=adjoint_down_c, weight=weight
    )


def _downdates_for(
    xp: Any, two_sided: bool, probes: Any, basis: Any, triangular: Any, image: Any
) -> Downdates:
    """The (s, s) pieces of either form (``image`` = A^H Q, or A Q when two-sided)."""
    if not two_sided:
        return _one_sided_downdates(xp, triangular)
    basis_h = hermitian_transpose(basis, xp)
    return _two_sided_downdates(xp, triangular, basis_h @ probes, basis_h @ image)


def _pair_sums(parts: RowPieces, downdates: Downdates, xp: Any) -> tuple[Any, Any]:
    """``sum_{j != i} d_j^(i)`` in column i: the estimates with two probes left out.

    The formula is in the module docstring. With u_ij = s_i^H r_j = delta_ij / nu_i (see
    :func:`_row_pieces`), a_ij = -c_ij / (nu_j (1 - |c_ij|^2)) and
    b_ij = 1 / (nu_j (1 - |c_ij|^2)); with K_ij = c_ij / (1 - |c_ij|^2), r_i = sum_j
    1 / (1 - |c_ij|^2) (both over the pairs j != i) and E = conj(Omega) / nu - conj(C),

        sum_j d_j^(i) = (s - 1) diag(Q Z^H) - B_i conj(C_i) r_i + conj(C_i) (B K^T_conj)_i
                        - B_i (E K^T)_i + ((B * E) Inv^T)_i,

    three (n, s) @ (s, s) products. Returned without the first term, the same in every
    column, which the caller adds to an (n,) vector instead of an (n, s) array, and with
    ``None`` for the (n,) rest that is the same in every column (see
    :func:`_two_sided_pair_sums`).
    """
    basis_down = parts.basis_down  # B = Q S
    adjoint_down_c = parts.adjoint_down_c  # conj(C), C = Z S
    pairs = (
        adjoint_down_c * (basis_down @ downdates.coupling_h)
        - basis_down * (parts.weight @ downdates.coupling_t)
        + parts.update @ downdates.inverse_t
        - (basis_down * adjoint_down_c) * downdates.inverse_sums[None, :]
    )
    # Pairs of parallel s_i, s_j (rare) take d^(j), and the term (number of valid pairs)
    # x diag(Q Z^H) is then not the same in every column.
    if downdates.parallel_t is not None:
        estimates = parts.low_rank_diagonal[:, None] + parts.update
        pairs = pairs + estimates @ downdates.parallel_t
        offsets = downdates.count_offsets[None, :]
        pairs = pairs + parts.low_rank_diagonal[:, None] * offsets
    return pairs, None


def xdiag_core(
    matmat: Matmat,
    adjoint: Matmat | None,
    probes: Any,
    xp: Any,
    two_sided: bool | None = None,
    samples: bool = False,
    real: bool = False,
) -> XDiagResult:
    """XDiag with its honest entrywise error estimate: two products (``A Omega``, then
    ``A^H Q``), then pure array algebra.

    Parameters
    ----------
    matmat : callable
        ``X -> A X``.
    adjoint : callable or None
        ``X -> A^H X``; ``None`` when A is self-adjoint (``A Q`` is used).
    probes : array (n, s)
        Rademacher (real) or unit-modulus (complex) probes: the estimator needs
        ``conj(w) * w = 1``.
    xp : namespace
    two_sided : bool, optional
        The two-sided estimates (module docstring); by default when ``adjoint`` is
        ``None``. ``True`` with an adjoint raises ``ValueError``.
    samples : bool
        Also return the (n, s) estimates d^(i) and their pseudo-values (``False``, as
        :class:`XDiag` runs it: only what they give, without keeping two (n, s) arrays).
    real : bool
        Keep the real part of every d^(i) and pseudo-value (a Hermitian A: its diagonal
        is real, and the imaginary parts are noise of zero mean that would enter the
        error estimate).

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from linop_trace.estimators._xdiag import xdiag_core
    >>> rng = np.random.default_rng(0)
    >>> U = rng.standard_normal((50, 3))
    >>> A = U @ U.T  # rank 3 < s - 1
    >>> W = rng.choice([-1.0, 1.0], size=(50, 6))
    >>> out = xdiag_core(lambda X: A @ X, None, W, xp, samples=True)
    >>> out.estimates.shape, bool(np.allclose(out.value, np.diag(A)))
    ((50, 6), True)
    """
    if two_sided is None:
        two_sided = adjoint is None
    elif two_sided and adjoint is not None:
        raise ValueError("two-sided XDiag needs a self-adjoint operator (adjoint=None)")
    basis, triangular, adjoint_basis = _products_and_factors(matmat, adjoint, probes, xp)
    return backend.jit(xp, _xdiag_from_products, num_static=4)(
        xp, bool(two_sided), samples, bool(real), probes, basis, triangular, adjoint_basis
    )


def _xdiag_from_products(
    xp: Any,
    two_sided: bool,
    samples: bool,
    real: bool,
    probes: Any,
    basis: Any,
    triangular: Any,
    adjoint_basis: Any,
) -> XDiagResult:
    """Everything after the products: pure array algebra (``samples``: also return the
    (n, s) estimates and pseudo-values, not only their means and error estimates).

    Every (n, s) quantity is computed row by row from (s, s) matrices, so on a CPU the
    rows are processed in blocks of about ``CHUNK_ENTRIES`` entries that stay in cache (a
    dozen passes over each block instead of a dozen passes over memory); JAX compiles the
    whole as one program instead (its arrays are immutable, and XLA fuses the passes),
    and accelerators take it in one piece (one kernel per operation).
    """
    downdates = _downdates_for(xp, two_sided, probes, basis, triangular, adjoint_basis)
    n, count = probes.shape
    step = -(-n // DOF_ENTRIES)  # the dofs of every step-th entry
    # the two-sided blocks hold about twice as many (rows, s) temporaries: half the rows
    # keeps them in cache and below the allocator's trim threshold (whose page faults
    # measurably cost more than the extra Python steps)
    entries = CHUNK_ENTRIES // 2 if two_sided else CHUNK_ENTRIES
    rows = max(CHUNK_ROWS_MIN, entries // max(count, 1))
    errors = count >= ERROR_PROBES
    if n <= rows or backend.prefers_whole_arrays(xp, backend.device_of(probes)):
        whole = _estimate_rows(
            xp, two_sided, downdates, probes, basis, adjoint_basis, step, 0, samples, real
        )
        dof_rows = [whole.dof_rows] if whole.dof_rows is not None else []
    else:
        whole, dof_rows = _estimate_rows_in_chunks(
            xp, two_sided, downdates, probes, basis, adjoint_basis, step, samples, rows, real
        )
    dof = None
    if errors:
        rows_of_dofs = tuple(
            dof_rows[0][k] if len(dof_rows) == 1 else xp.concat([part[k] for part in dof_rows])
            for k in range(3)
        )
        dof = median_dof(entrywise_dofs(rows_of_dofs, xp), xp, count - 1)
    stderr = whole.stderr
    if stderr is not None:
        # the rounding of the low-rank diagonal that every d^(i) shares (as Diag++'s):
        # where the sketch captures A (rank below s) the d^(i) agree but for rounding
        size = low_rank_rounding_size(xp, basis, adjoint_basis)
        stderr = with_rounding(stderr, size, n, xp)
    return XDiagResult(
        whole.value,
        stderr,
        whole.stderr_plain,
        dof,
        whole.low_rank_diagonal,
        two_sided,
        whole.estimates,
        whole.pseudo_values,
    )


def _estimate_rows_in_chunks(
    xp: Any,
    two_sided: bool,
    downdates: Downdates,
    probes: Any,
    basis: Any,
    adjoint_basis: Any,
    step: int,
    samples: bool,
    rows: int,
    real_values: bool,
) -> tuple[_RowsEstimate, list[Any]]:
    """:func:`_estimate_rows` over blocks of ``rows`` rows, written into whole arrays."""
    n, count = probes.shape
    dtype, device = probes.dtype, backend.device_of(probes)
    real = backend.real_dtype_for(xp, dtype)
    dtype = real if real_values else dtype
    errors = count >= ERROR_PROBES
    out = _RowsEstimate(
        xp.empty((n,), dtype=dtype, device=device), xp.empty((n,), dtype=dtype, device=device)
    )
    if samples:
        out.estimates = xp.empty((n, count), dtype=dtype, device=device)
        out.pseudo_values = xp.empty((n, count), dtype=dtype, device=device)
    if errors:
        out.stderr = xp.empty((n,), dtype=real, device=device)
        out.stderr_plain = xp.empty((n,), dtype=real, device=device)
    fields = [name for name in vars(out) if name != "dof_rows" and getattr(out, name) is not None]
    dof_rows = []
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        block = _estimate_rows(
            xp,
            two_sided,
            downdates,
            probes[start:stop, :],
            basis[start:stop, :],
            adjoint_basis[start:stop, :],
            step,
            (-start) % step,
            samples,
            real_values,
        )
        for name in fields:
            getattr(out, name)[start:stop, ...] = getattr(block, name)
        if block.dof_rows is not None:
            dof_rows.append(block.dof_rows)
    return out, dof_rows


def _estimate_rows(
    xp: Any,
    two_sided: bool,
    downdates: Downdates,
    probes: Any,
    basis: Any,
    adjoint_basis: Any,
    step: int,
    first: int,
    samples: bool,
    real: bool = False,
) -> _RowsEstimate:
    """Estimates, error estimates (and with ``samples`` the (n, s) estimates and
    pseudo-values) of a block of rows (entries); the products for the dofs of the rows
    ``first, first + step, ...`` of the block.

    With d^(i) = low + u_i (``low`` the common low-rank diagonal) and the pair sums
    sum_{j != i} d_j^(i) = (s - 1) low + c + pairs_i (c the part the same in every column),
    p_i = sum_j d^(j) - sum_{j != i} d_j^(i) = low + sum_j u_j - c - pairs_i."""
    if two_sided:
        assert isinstance(downdates, TwoSidedDowndates)
        parts = _two_sided_row_pieces(xp, downdates, probes, basis, adjoint_basis)
        pairs, constant = _two_sided_pair_sums(parts, downdates, xp)
    else:
        parts = _row_pieces(xp, downdates, probes, basis, adjoint_basis)
        pairs, constant = _pair_sums(parts, downdates, xp)
    update, low = parts.update, parts.low_rank_diagonal
    if real:  # (a Hermitian A: the imaginary parts are noise of zero mean)
        update, low, pairs = (backend.real_part(xp, x) for x in (update, low, pairs))
        constant = None if constant is None else backend.real_part(xp, constant)
    count = update.shape[1]
    update_mean = xp.mean(update, axis=1)
    out = _RowsEstimate(low, low + update_mean)
    if samples:
        common = low + xp.sum(update, axis=1)
        if constant is not None:
            common = common - constant
        out.estimates = low[:, None] + update
        out.value = xp.mean(out.estimates, axis=1)  # exactly their mean
        out.pseudo_values = common[:, None] - pairs
    if count >= ERROR_PROBES:
        out.stderr, out.stderr_plain, out.dof_rows = entrywise_exchangeable_error(
            update - update_mean[:, None], pairs, xp, step, first
        )
    return out


class XDiag(Estimator):
    """XDiag: every probe serves both the low-rank sketch and the residual estimate.

    With ``num_matvecs = m``: s = floor(m/2) probes, ``A Omega`` then ``A^H Q`` (the
    forward product for operators tagged ``"symmetric"``/``"hermitian"``, ``rmatmat``
    otherwise): 2 s <= m columns in two operator calls. Rademacher probes for real
    operators, unit-modulus for complex ones (other probe kinds raise ``ValueError``).
    Exact when rank(A) < s.

    Parameters
    ----------
    two_sided : bool, optional
        For self-adjoint operators (the default, ``None``, decides by the tag): deflate on
        both sides, diag(PA + AP - PAP) plus Hutchinson on (I - P) A (I - P), instead of
        the paper's diag(PA) plus Hutchinson on (I - P) A. Same products, unbiased, smaller
        errors on decaying spectra, about twice the algebra; where a varying diagonal
        dominates its rows (graph Laplacians D - W) the one-sided form has the smaller
        maximum error (docs/estimators/xdiag.rst). ``False`` gives the paper's estimator;
        ``True`` on an operator not tagged self-adjoint raises ``ValueError``.

    Notes
    -----
    ``stderr`` is the honest elementwise error estimate: the covariance of the leave-one-out
    estimates d^(i) with their jackknife pseudo-values, entry by entry, corrected to second
    order and floored at the plain value; ``dof`` is the median over the entries of their Satterthwaite dof (see the module
    docstring). ``info["stderr_plain"]`` keeps the paper's std(d^(i)) / sqrt(s), which
    covers less than its level (measured coverages: docs/estimators/xdiag.rst);
    ``info["two_sided"]`` says which form was used.

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import diagonal
    >>> rng = np.random.default_rng(0)
    >>> U = rng.standard_normal((100, 8))
    >>> A = U @ U.T  # rank 8 < s = 15
    >>> est = diagonal(A, method="xdiag", num_matvecs=30, seed=0)
    >>> bool(np.allclose(est.value, np.diag(A))), est.num_matvecs
    (True, 30)
    """

    name = "xdiag"
    min_matvecs = 2
    jit_compatible = True
    unit_scaled = ("diagonal",)

    def __init__(self, two_sided: bool | None = None) -> None:
        self.two_sided = two_sided

    def __repr__(self) -> str:
        return f"{type(self).__name__}(two_sided={self.two_sided!r})"

    def diagonal(self, request: EstimationRequest) -> Estimate:
        xp = request.xp
        adjoint = None if request.self_adjoint else request.adjoint
        if self.two_sided and adjoint is not None:
            raise ValueError(
                f"{type(self).__name__}(two_sided=True) needs an operator tagged "
                "'symmetric' or 'hermitian'; use two_sided=None (the default) for others"
            )
        if not request.probes.unit_modulus:
            raise ValueError(
                f"method 'xdiag' needs Rademacher (or unit-modulus) probes, got "
                f"probe={request.probes.kind!r}; use method='diag++' for other probes"
            )
        count = min(request.num_matvecs // 2, request.n)  # s <= n, like XTrace
        result = xdiag_core(
            request.matmat,
            adjoint,
            request.probes.independent(count),
            xp,
            self.two_sided,
            real=request.real_valued,
        )
        return Estimate(
            result.value,
            result.stderr,
            request.columns,
            self.name,
            converged=None,
            dof=result.dof,
            info={
                "num_probes": count,
                "low_rank_diagonal": result.low_rank_diagonal,
                "stderr_plain": result.stderr_plain,
                "two_sided": result.two_sided,
            },
        )


def _two_sided_downdates(xp: Any, triangular: Any, cross: Any, core: Any) -> TwoSidedDowndates:
    """:func:`_one_sided_downdates` and the (s, s) coefficients of the two-sided estimates, from
    U = Q^H Omega (``cross``) and M = Q^H A Q (``core``)."""
    downdates = _one_sided_downdates(xp, triangular)
    downdate = downdates.downdate  # S
    core = (core + hermitian_transpose(core, xp)) / 2  # M, Hermitian up to round-off
    core_down = core @ downdate  # M S
    transpose = xp.matrix_transpose
    downdate_h = hermitian_transpose(downdate, xp)
    projected = downdate_h @ core_down  # N_ij = s_i^H M s_j
    probes_down = downdate_h @ cross  # V_ij = s_i^H u_j
    core_probes = hermitian_transpose(core_down, xp) @ cross  # T_ij = s_i^H M u_j
    n_diag = xp.linalg.diagonal(projected)
    v_diag = xp.linalg.diagonal(probes_down)
    t_diag = xp.linalg.diagonal(core_probes)
    # Gamma_ij^{-1} = [[g11, g12], [g21, g22]] entry by entry over the pairs (i, j)
    g11 = downdates.inverse
    g12 = -downdates.gram * g11
    g21 = backend.conj(xp, g12)
    # K = Gamma^{-1} [[N_ii, N_ij], [N_ji, N_jj]] Gamma^{-1}
    n11, n12, n21, n22 = n_diag[:, None], projected, transpose(projected), n_diag[None, :]
    x11, x12 = g11 * n11 + g12 * n21, g11 * n12 + g12 * n22
    x21, x22 = g21 * n11 + g11 * n21, g21 * n12 + g11 * n22
    k11 = x11 * g11 + x12 * g21
    k12 = x11 * g12 + x12 * g11
    k22 = x21 * g12 + x22 * g11
    v_j, t_j = v_diag[None, :], t_diag[None, :]
    shift_j = downdates.inverse_norms[None, :]  # s_j^H r_j = 1 / nu_j
    phi1 = g11 * probes_down + g12 * v_j
    phi2 = g21 * probes_down + g11 * v_j
    psi1 = g12 * shift_j - (g11 * core_probes + g12 * t_j) + k11 * probes_down + k12 * v_j
    psi2 = (
        g11 * shift_j
        - (g21 * core_probes + g11 * t_j)
        + backend.conj(xp, k12) * probes_down
        + k22 * v_j
    )
    eye = xp.eye(downdate.shape[1], dtype=downdate.dtype, device=backend.device_of(core))
    # The pair sums' own-column terms (weights r_i and sum_j K11_ij) as the diagonal of the
    # coefficients of their row factors. In the terms -2 Re(.) a real operator's factor 2
    # joins the coefficients; a complex one keeps -(x + conj(x)) (:func:`_two_sided_pair_sums`).
    real = not backend.is_complex_dtype(xp, downdate.dtype)
    twice = 2 if real else 1
    left = xp.concat([-transpose(downdates.gram * g11), transpose(k12)], axis=0)
    return TwoSidedDowndates(
        **vars(downdates),
        core_downdate=xp.concat([core, downdate], axis=1),
        downdate_cross=xp.concat([downdate, cross], axis=1),
        own_square=n_diag,  # N_ii
        own_probe=v_diag,  # V_ii
        own_shift=downdates.inverse_norms - t_diag + n_diag * v_diag,
        pair_left=left,
        pair_basis=xp.concat([-twice * left, transpose(psi1)], axis=0),
        pair_residual=xp.concat(
            [
                twice * downdates.coupling_h if real else backend.conj(xp, downdates.coupling_h),
                transpose(phi1),
            ],
            axis=0,
        ),
        pair_stacked=xp.concat(
            [
                -transpose(g11) - eye * downdates.inverse_sums[None, :],
                -transpose(k22) - eye * xp.sum(k11, axis=1)[None, :],
                transpose(phi2),
                transpose(psi2),
            ],
            axis=0,
        ),
    )


def _two_sided_row_pieces(
    xp: Any, downdates: TwoSidedDowndates, probes: Any, basis: Any, image: Any
) -> RowPieces:
    """The updates d^(i) - diag(P A + A P - P A P) of a block of rows, that common low-rank
    diagonal, and the row pieces the pairs reuse (``image`` = A Q).

    With Z = A Q, M = Q^H Z, Zp = Z - Q M = (I - P) A Q, U = Q^H Omega, B = Q S, Cp = Zp S,
    N = S^H M S, V = S^H U and T = S^H M U (row i of the block: entry i),

        d^(i) = base - 2 Re(B_i conj(Cp_i)) - |B_i|^2 N_ii
                + conj(w_i) * (-(Zp U)_i + Cp_i V_ii + B_i (1 / nu_i - T_ii + N_ii V_ii)),

    base = diag(Q Q^H A + A Q Q^H - Q M Q^H) (row formula: docs/estimators/xdiag.rst).
    """
    count = probes.shape[1]
    both = basis @ downdates.core_downdate  # [Q M, Q S]
    basis_down = both[:, count:]  # B = Q S
    residual = image - both[:, :count]  # Zp = (I - P) A Q = Z - Q M
    both = residual @ downdates.downdate_cross  # [Zp S, Zp U]
    residual_down, residual_probes = both[:, :count], both[:, count:]  # Cp, Zp U
    probes_c = backend.conj(xp, probes)
    low_rank_diagonal = two_sided_low_rank_diagonal(basis, image, residual, xp)
    coupled = basis_down * backend.conj(xp, residual_down)  # B conj(Cp)
    coupled = coupled + backend.conj(xp, coupled)  # 2 Re(B conj(Cp))
    square = basis_down * backend.conj(xp, basis_down)  # |B|^2
    probe_residual = probes_c * residual_down  # conj(Omega) Cp, entrywise
    probe_basis = probes_c * basis_down  # conj(Omega) B
    hutchinson = probes_c * residual_probes  # conj(Omega) (Zp U)
    update = (
        probe_residual * downdates.own_probe[None, :]
        + probe_basis * downdates.own_shift[None, :]
        - hutchinson
        - coupled
        - square * downdates.own_square[None, :]
    )
    return RowPieces(
        update,
        low_rank_diagonal,
        basis_down,
        residual_down=residual_down,
        stacked=xp.concat([coupled, square, probe_residual, probe_basis], axis=1),
        hutchinson=hutchinson,
        probes_c=probes_c,
    )


def _two_sided_pair_sums(
    parts: RowPieces, downdates: TwoSidedDowndates, xp: Any
) -> tuple[Any, Any]:
    """``sum_{j != i} d_j^(i)`` of the two-sided estimates, without (s - 1) times the
    common low-rank diagonal, as ``(pairs, constant)``: column i of ``pairs`` plus the
    (n,) ``constant`` (the part the same in every column, -sum_j conj(w_j) (Zp U)_j).

    With Gamma^{-1} = [[1, -c_ij], [-conj(c_ij), 1]] / (1 - |c_ij|^2), a row vector x and a
    vector v, x Pi_ij v = [x s_i, x s_j] Gamma^{-1} [s_i^H v, s_j^H v]^T: each term of the
    estimate of a pair is (i-th column entry) x (j-th column entry) x (an s x s coefficient
    of :func:`_two_sided_downdates`), and its sum over j one (n, s) @ (s, s) product.

    Nine (n, s) @ (s, s) products in three calls (five more for complex operators). The
    row factors of column i, B_i and Cp_i, multiply one product each: with T = [conj(Cp),
    conj(B), conj(Omega)], B_i (T X_B)_i + Cp_i (T_{B, Omega} X_C)_i, where for a real
    operator the terms -2 Re(.) have joined X_B and X_C (a complex one adds their
    conjugate parts separately); the rest is [2 Re(B conj(Cp)), |B|^2, conj(Omega) Cp,
    conj(Omega) B] times the stacked coefficients, whose diagonals carry the own-column
    terms."""
    count = parts.basis_down.shape[1]
    basis_down, residual_down = parts.basis_down, parts.residual_down
    factors = xp.concat(
        [backend.conj(xp, residual_down), backend.conj(xp, basis_down), parts.probes_c], axis=1
    )
    hutchinson = parts.hutchinson
    pairs = (
        parts.stacked @ downdates.pair_stacked
        + hutchinson
        + basis_down * (factors @ downdates.pair_basis)
        + residual_down * (factors[:, count:] @ downdates.pair_residual)
    )
    if backend.is_complex_dtype(xp, pairs.dtype):
        left = factors[:, : 2 * count] @ downdates.pair_left
        coupled = basis_down @ downdates.coupling_h
        pairs = pairs + backend.conj(
            xp, residual_down * backend.conj(xp, coupled) - basis_down * left
        )
    if downdates.parallel_t is not None:
        estimates = parts.low_rank_diagonal[:, None] + parts.update
        pairs = pairs + (estimates + hutchinson) @ downdates.parallel_t
        offsets = downdates.count_offsets[None, :]
        pairs = pairs + parts.low_rank_diagonal[:, None] * offsets
    return pairs, -xp.sum(hutchinson, axis=1)
