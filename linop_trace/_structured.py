"""Structured operators whose trace, diagonal and row sums are known exactly: the
identity, diagonal matrices, Kronecker products and block-diagonal operators.

Each keeps the library, dtype and device of what it is built from; none forms a matrix
larger than its factors or blocks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from . import _backend as backend
from ._operators import LinearOperator, _check_compatible, aslinearoperator

__all__ = ["block_diagonal", "diagonal_operator", "identity", "kronecker"]

_ALL_TAGS = frozenset({"symmetric", "hermitian", "positive_semidefinite"})


def _conj(xp: Any, x: Any) -> Any:
    return xp.conj(x) if backend.is_complex_dtype(xp, x.dtype) else x


class _IdentityOperator(LinearOperator):
    """``I_n`` (its product is a copy of the block: the estimators may reuse their probes)."""

    _data_fields: tuple[str, ...] | None = ()

    def __init__(self, n: int, dtype: Any, xp: Any, device: Any) -> None:
        super().__init__((n, n), dtype, xp, device, _ALL_TAGS)

    def _matmat(self, X: Any) -> Any:
        return self.xp.asarray(X, copy=True)

    def _rmatmat(self, X: Any) -> Any:
        return self.xp.asarray(X, copy=True)

    def _exact_diagonal(self) -> Any:
        return self.xp.ones((self.shape[0],), dtype=self.dtype, device=self.device)


class _ZeroOperator(LinearOperator):
    """The n x m zero matrix: the place of an exact block in the implicit part of a
    block-diagonal operator."""

    _data_fields: tuple[str, ...] | None = ()

    def __init__(self, shape: tuple[int, int], dtype: Any, xp: Any, device: Any) -> None:
        super().__init__(shape, dtype, xp, device)

    def _matmat(self, X: Any) -> Any:
        return self.xp.zeros((self.shape[0], X.shape[1]), dtype=X.dtype, device=self.device)

    def _rmatmat(self, X: Any) -> Any:
        return self.xp.zeros((self.shape[1], X.shape[1]), dtype=X.dtype, device=self.device)

    def _exact_diagonal(self) -> Any:
        return self.xp.zeros((min(self.shape),), dtype=self.dtype, device=self.device)


class _DiagonalOperator(LinearOperator):
    """``diag(d)``: row i scaled by ``d[i]``."""

    _data_fields: tuple[str, ...] | None = ("diagonal",)

    def __init__(self, diagonal: Any) -> None:
        xp = backend.array_namespace(diagonal)
        device = backend.device_of(diagonal)
        dtype = backend.promote_to_float(xp, diagonal.dtype, device)
        if diagonal.dtype != dtype:
            diagonal = xp.astype(diagonal, dtype)
        n = int(diagonal.shape[0])
        tags = () if backend.is_complex_dtype(xp, dtype) else ("symmetric", "hermitian")
        super().__init__((n, n), dtype, xp, device, tags)
        self.diagonal = diagonal

    def _matmat(self, X: Any) -> Any:
        return self.xp.astype(self.diagonal, X.dtype)[:, None] * X

    def _rmatmat(self, X: Any) -> Any:
        return _conj(self.xp, self.xp.astype(self.diagonal, X.dtype))[:, None] * X

    def _exact_diagonal(self) -> Any:
        return backend.owned(self.xp, self.diagonal)  # (not the caller's own array)


class _OfParts(LinearOperator):
    """An operator made of others (Kronecker factors, diagonal blocks): both products go
    through ``_apply``, and its diagonal joins the parts' diagonals (``_join``) when every
    part is square and has one."""

    def _parts(self) -> tuple[LinearOperator, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply(self, X: Any, adjoint: bool) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _join(self, vectors: list[Any]) -> Any:  # pragma: no cover - abstract
        """The whole operator's diagonal (or row sums) from the parts'."""
        raise NotImplementedError

    def _join_traces(self, traces: list[Any]) -> Any:  # pragma: no cover - abstract
        """The whole operator's trace from the parts' traces."""
        raise NotImplementedError

    def compilable(self) -> bool:
        return all(part.compilable() for part in self._parts())

    def _matmat(self, X: Any) -> Any:
        return self._apply(X, adjoint=False)

    def _rmatmat(self, X: Any) -> Any:
        return self._apply(X, adjoint=True)

    def _exact_diagonal(self) -> Any | None:
        parts = self._parts()
        if any(part.shape[0] != part.shape[1] for part in parts):
            return None
        diagonals = [part._exact_diagonal() for part in parts]
        if any(diagonal is None for diagonal in diagonals):
            return None
        return self._join(diagonals)


class _KroneckerOperator(_OfParts):
    """``A_1 kron A_2 kron ... kron A_d``, applied by the vec trick: a block X of shape
    (n_1 ... n_d, k) is a tensor (n_1, ..., n_d, k) and each factor multiplies its own
    axis, so a product costs sum_t m_t * n * k / n_t flops and the big matrix is never
    formed. Rows are ordered as :func:`numpy.kron` orders them (the last factor fastest)."""

    _data_fields: tuple[str, ...] | None = ("factors",)

    def __init__(self, factors: tuple[LinearOperator, ...]) -> None:
        first = factors[0]
        for factor in factors[1:]:
            _check_compatible(first, factor, "take the Kronecker product of")
        dtype = first.dtype
        for factor in factors[1:]:
            dtype = first.xp.result_type(dtype, factor.dtype)
        shape = (
            math.prod(factor.shape[0] for factor in factors),
            math.prod(factor.shape[1] for factor in factors),
        )
        tags = _ALL_TAGS
        for factor in factors:
            tags = tags & factor.tags
        super().__init__(shape, dtype, first.xp, first.device, tags)
        self.factors = factors

    def _apply(self, X: Any, adjoint: bool) -> Any:
        xp = self.xp
        k = int(X.shape[1])
        dims = [factor.shape[0 if adjoint else 1] for factor in self.factors]
        ndim = len(dims)
        tensor = xp.reshape(X, (*dims, k))
        for axis, factor in enumerate(self.factors):
            order = (axis, *(i for i in range(ndim + 1) if i != axis))
            moved = xp.permute_dims(tensor, order)
            rest = tuple(moved.shape[1:])
            flat = xp.reshape(moved, (dims[axis], math.prod(rest)))
            image = factor.rmatmat(flat) if adjoint else factor.matmat(flat)
            dims[axis] = factor.shape[1 if adjoint else 0]
            image = xp.reshape(image, (dims[axis], *rest))
            tensor = xp.permute_dims(image, tuple(int(i) for i in np.argsort(order)))
        return xp.reshape(tensor, (math.prod(dims), k))

    def _parts(self) -> tuple[LinearOperator, ...]:
        return self.factors

    def _join(self, vectors: list[Any]) -> Any:
        return kron_vectors(self.xp, vectors)

    def _join_traces(self, traces: list[Any]) -> Any:
        return functools.reduce(lambda a, b: a * b, traces)


def kron_vectors(xp: Any, vectors: Sequence[Any]) -> Any:
    """The Kronecker product of 1-d arrays (the diagonal or the row sums of a Kronecker
    product of factors with those diagonals or row sums)."""
    out = vectors[0]
    for vector in vectors[1:]:
        out = xp.reshape(out[:, None] * vector[None, :], (-1,))
    return out


class _BlockDiagonalOperator(_OfParts):
    """``diag(B_1, ..., B_p)``: each block acts on its own slice of rows."""

    _data_fields: tuple[str, ...] | None = ("blocks",)

    def __init__(self, blocks: tuple[LinearOperator, ...]) -> None:
        first = blocks[0]
        for block in blocks[1:]:
            _check_compatible(first, block, "put on one diagonal")
        dtype = first.dtype
        for block in blocks[1:]:
            dtype = first.xp.result_type(dtype, block.dtype)
        shape = (sum(b.shape[0] for b in blocks), sum(b.shape[1] for b in blocks))
        tags = _ALL_TAGS
        for block in blocks:
            tags = tags & block.tags
        super().__init__(shape, dtype, first.xp, first.device, tags)
        self.blocks = blocks
        self.row_offsets = tuple(int(i) for i in np.cumsum([0] + [b.shape[0] for b in blocks]))
        self.col_offsets = tuple(int(i) for i in np.cumsum([0] + [b.shape[1] for b in blocks]))

    def _apply(self, X: Any, adjoint: bool) -> Any:
        offsets = self.row_offsets if adjoint else self.col_offsets
        pieces = []
        for i, block in enumerate(self.blocks):
            part = X[offsets[i] : offsets[i + 1], :]
            pieces.append(block.rmatmat(part) if adjoint else block.matmat(part))
        return pieces[0] if len(pieces) == 1 else self.xp.concat(pieces, axis=0)

    def _parts(self) -> tuple[LinearOperator, ...]:
        return self.blocks

    def _join(self, vectors: list[Any]) -> Any:
        return vectors[0] if len(vectors) == 1 else self.xp.concat(vectors)

    def _join_traces(self, traces: list[Any]) -> Any:
        return functools.reduce(lambda a, b: a + b, traces)


def _namespace_of(like: Any) -> tuple[Any, Any, Any]:
    """(xp, device, dtype) of an array or operator; NumPy float64 for ``None``."""
    if like is None:
        return backend.numpy_namespace(), "cpu", np.dtype(np.float64)
    if isinstance(like, LinearOperator):
        return like.xp, like.device, like.dtype
    try:
        xp = backend.array_namespace(like)
    except TypeError:
        raise TypeError(
            f"`like` must be an array or a LinearOperator, got "
            f"{type(like).__module__}.{type(like).__name__}"
        ) from None
    device = backend.device_of(like)
    return xp, device, backend.promote_to_float(xp, like.dtype, device)


def identity(n: int, like: Any = None, dtype: Any = None) -> LinearOperator:
    """The n x n identity as an operator, in the library and on the device of ``like``.

    Its trace and diagonal are known: :func:`~linop_trace.trace` and
    :func:`~linop_trace.diagonal` compute them exactly in any sum (``H + 0.1 *
    identity(n, like=x)`` estimates only ``H``).

    Parameters
    ----------
    n : int
    like : array or LinearOperator, optional
        Gives the library, device and dtype; NumPy float64 on the CPU if omitted.
    dtype : dtype, optional
        Overrides the dtype of ``like`` (a dtype of its library).

    Returns
    -------
    LinearOperator
        Tagged symmetric, Hermitian and positive semidefinite. A scaled identity is
        ``c * identity(n)``.

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import identity, trace
    >>> est = trace(3 * identity(4, like=np.zeros(1)))
    >>> float(est), est.num_matvecs
    (12.0, 0)
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"`n` must be a non-negative int, got {n!r}")
    xp, device, like_dtype = _namespace_of(like)
    dtype = like_dtype if dtype is None else backend.promote_to_float(xp, dtype, device)
    return _IdentityOperator(int(n), dtype, xp, device)


def diagonal_operator(d: Any) -> LinearOperator:
    """``diag(d)`` as an operator: ``x -> d * x``, in the library and on the device of d.

    Parameters
    ----------
    d : 1-d array
        Of any supported library (integer and bool promoted to the default float).

    Returns
    -------
    LinearOperator
        Its trace, diagonal and row sums are computed exactly wherever it appears in a
        sum, a scaling, a Kronecker or block-diagonal operator.

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import diagonal_operator
    >>> D = diagonal_operator(np.array([1.0, 2.0, 3.0]))
    >>> D @ np.ones(3)
    array([1., 2., 3.])
    """
    if isinstance(d, LinearOperator):
        raise TypeError("diagonal_operator takes a 1-d array of the diagonal, got an operator")
    try:
        backend.array_namespace(d)
    except TypeError:
        raise TypeError(
            f"diagonal_operator takes a 1-d array, got {type(d).__module__}.{type(d).__name__}"
        ) from None
    if backend.is_sparse(d) or d.ndim != 1:
        raise ValueError(
            f"diagonal_operator takes a 1-d array, got shape {tuple(d.shape)}; for a matrix "
            "use aslinearoperator"
        )
    return _DiagonalOperator(d)


def _operators(items: Iterable[Any], name: str, what: str) -> tuple[LinearOperator, ...]:
    operators = tuple(aslinearoperator(item) for item in items)
    if not operators:
        raise ValueError(f"{name} needs at least one {what}")
    return operators


def kronecker(*factors: Any) -> LinearOperator:
    """The Kronecker product ``A_1 kron A_2 kron ...`` of matrices or operators, lazily.

    A product with a block of k columns applies each factor to a reshaped block (the vec
    trick): for two n_A and n_B factors it costs ``k n_A n_B (n_A + n_B)`` flops and
    ``O(k n_A n_B)`` memory; the ``n_A n_B`` square matrix is never formed. Rows are
    ordered as :func:`numpy.kron` orders them. Its trace is the product of the factors'
    traces and its diagonal the Kronecker product of their diagonals, computed exactly
    by :func:`~linop_trace.trace` and :func:`~linop_trace.diagonal` when the factors'
    are known (stored matrices, diagonal operators, identities).

    Parameters
    ----------
    *factors : matrices or LinearOperator
        Anything :func:`aslinearoperator` accepts; all of one library and device.

    Returns
    -------
    LinearOperator

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import kronecker, trace
    >>> A, B = np.diag([1.0, 2.0]), np.array([[1.0, 5.0], [0.0, 3.0]])
    >>> K = kronecker(A, B)
    >>> bool(np.allclose(K.to_dense(), np.kron(A, B))), float(trace(K))
    (True, 12.0)
    """
    operators = _operators(factors, "kronecker", "factor")
    if len(operators) == 1:
        return operators[0]
    return _KroneckerOperator(operators)


def block_diagonal(blocks: Iterable[Any]) -> LinearOperator:
    """The block-diagonal operator ``diag(B_1, B_2, ...)`` of matrices or operators.

    :func:`~linop_trace.trace` and :func:`~linop_trace.diagonal` compute the blocks
    they can exactly (stored matrices, structured operators) and estimate only the
    others, counting only the columns that pass through those.

    Parameters
    ----------
    blocks : iterable of matrices or LinearOperator
        Anything :func:`aslinearoperator` accepts; all of one library and device.

    Returns
    -------
    LinearOperator

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import block_diagonal
    >>> B = block_diagonal([np.eye(2), 3 * np.eye(1)])
    >>> B.to_dense()
    array([[1., 0., 0.],
           [0., 1., 0.],
           [0., 0., 3.]])
    """
    if isinstance(blocks, LinearOperator) or getattr(blocks, "ndim", None) is not None:
        raise TypeError("block_diagonal takes a list of blocks: block_diagonal([A, B])")
    operators = _operators(blocks, "block_diagonal", "block")
    if len(operators) == 1:
        return operators[0]
    return _BlockDiagonalOperator(operators)
