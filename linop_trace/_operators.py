"""``LinearOperator``: a matrix known only through its products with blocks of vectors.

Subclasses implement ``_matmat`` (and ``_rmatmat`` where the adjoint exists); the base
class derives ``matvec``/``rmatvec``, validates what it is given and what user code
returns, and builds lazy sums, scalings, products and adjoints.
"""

from __future__ import annotations

import copy
import numbers
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from . import _backend as backend

__all__ = ["LinearOperator", "aslinearoperator"]

_KNOWN_TAGS = frozenset({"symmetric", "hermitian", "positive_semidefinite"})


def _validate_tags(tags: Iterable[str] | str) -> frozenset[str]:
    """The tags as a set; one string is one tag (``tags="symmetric"``), not its letters."""
    if isinstance(tags, str):
        tags = (tags,)
    try:
        tags = frozenset(tags)
    except TypeError:
        raise TypeError(
            f"`tags` must be a string or an iterable of strings, got {tags!r}"
        ) from None
    if not all(isinstance(tag, str) for tag in tags):
        raise TypeError(
            f"`tags` must be a string or an iterable of strings, got {sorted(tags, key=repr)!r}"
        )
    unknown = tags - _KNOWN_TAGS
    if unknown:
        raise ValueError(f"unknown tags {sorted(unknown)}; known tags are {sorted(_KNOWN_TAGS)}")
    return tags


class LinearOperator:
    """A linear map ``x -> A x`` between vectors of one array library on one device.

    Do not instantiate this class directly: use :func:`aslinearoperator` for matrices,
    :meth:`LinearOperator.from_callable` for functions, or the autodiff constructors.
    A subclass sets ``shape``, ``dtype``, ``xp`` and ``device`` through
    ``super().__init__`` and implements ``_matmat(X)`` for an ``(n, k)`` block ``X``
    (and ``_rmatmat`` for the adjoint, if it has one).

    Attributes
    ----------
    shape : tuple of int
        ``(rows, columns)``.
    dtype : dtype
        The dtype of the operator's entries, in its library.
    xp : module
        The array-api-compat namespace of the operator's library.
    device : object
        The device that holds the operator's data; inputs must live there too.
    tags : frozenset of str
        Unchecked structural labels: ``"symmetric"``, ``"hermitian"``,
        ``"positive_semidefinite"``.

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import aslinearoperator
    >>> A = aslinearoperator(np.array([[2.0, 1.0], [0.0, 3.0]]))
    >>> A @ np.array([1.0, 1.0])
    array([3., 3.])
    >>> (A + 2 * A.T).to_dense()
    array([[6., 1.],
           [2., 9.]])
    """

    #: NumPy defers its operators to ours (``np.ones(3) * A`` is ``A.__rmul__``), instead
    #: of broadcasting the operator into an object array.
    __array_ufunc__ = None
    #: Output of user code is validated (shape, library, dtype) when this is true.
    _validate_output = False
    #: The attributes that hold the operator's data (arrays, sparse matrices, operators,
    #: pytrees of arrays). Under JAX they are the arguments of a compiled estimate, so
    #: one program serves every operator of the same structure and shapes. ``None``: the
    #: operator is more than its data (user functions, which may close over arrays that
    #: a compiled program would embed as constants), and estimates on it run eagerly.
    _data_fields: tuple[str, ...] | None = None
    #: Attributes that only cache derived data; dropped when the operator is rebuilt.
    _cache_fields: tuple[str, ...] = ()
    #: Whether the products take the operator's own (real) dtype only: a complex block
    #: then goes through as its real and imaginary parts (:meth:`_by_real_parts`).
    _real_products: bool = False

    def __new__(cls, *args: Any, **kwargs: Any) -> LinearOperator:
        if cls is LinearOperator:
            raise TypeError(
                "LinearOperator is not built directly: use LinearOperator.from_callable("
                "matvec=..., shape=(m, n), ...) for functions (SciPy's "
                "LinearOperator(shape, matvec=...)), aslinearoperator(matrix) for arrays"
            )
        return super().__new__(cls)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "_data_fields", None) is not None:  # its own, or inherited
            backend.register_pytree(cls, _flatten_operator, _unflatten_operator)

    def __init__(
        self,
        shape: tuple[int, int],
        dtype: Any,
        xp: Any,
        device: Any,
        tags: Iterable[str] = (),
    ) -> None:
        if len(shape) != 2 or any(
            not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 0 for s in shape
        ):
            raise ValueError(f"shape must be a pair of non-negative ints, got {shape!r}")
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.dtype = dtype
        self.xp = xp
        self.device = device
        self.tags = _validate_tags(tags)

    # ------------------------------------------------------------------ description
    @property
    def ndim(self) -> int:
        return 2

    @property
    def library(self) -> str:
        """The name of the operator's array library (``"numpy"``, ``"torch"``, ...)."""
        return backend.namespace_name(self.xp)

    def compilable(self) -> bool:
        """Whether the operator is its data alone (see ``_data_fields``), so that under JAX
        an estimate on it compiles into one program with the data as arguments."""
        fields = self._data_fields
        if fields is None:
            return False
        return all(
            getattr(self, name).compilable()
            for name in fields
            if isinstance(getattr(self, name), LinearOperator)
        )

    def bytes_per_column(self) -> int:
        """Memory one column of a block product needs on the operator's device (the input
        column and its image); block sizes divide the device's free memory by it.
        Operators whose product needs more (autodiff) say so by overriding it."""
        from ._blocks import itemsize

        return (self.shape[0] + self.shape[1]) * itemsize(self.xp, self.dtype)

    def settings_identity(self) -> Any:
        """What an estimate's settings (block size, budget cap, probes) depend on in this
        operator, as a hashable value, where that is its structure alone; ``None`` (the
        default): the operator object itself, so that settings are reused for the same
        object only. Dense arrays say so: two of one type, shape, dtype and device get
        the same settings, so a call on a fresh array (a new operator) reuses them."""
        return None

    def __repr__(self) -> str:
        return (
            f"<{self.shape[0]}x{self.shape[1]} {type(self).__name__} "
            f"({self.library}, {backend.dtype_name(self.dtype)}, {self.device})>"
        )

    def _describe(self) -> str:
        return f"{self.library} on {self.device}"

    # -------------------------------------------------------------- input checking
    def _check_block(self, block: Any, rows: int, name: str) -> Any:
        """Validate a 2-d input block: library, device, shape; return it as a float array.

        Dask operators also take NumPy blocks, wrapped as Dask arrays, and cut a Dask
        block's rows like the matrix they meet (:func:`~linop_trace._backend.fit_block`):
        neither computes anything. A Dask block given to an operator of another library
        is refused, never computed into memory behind the user's back
        (:func:`~linop_trace._backend.mixed_libraries_reason`).
        """
        if isinstance(block, LinearOperator):
            raise TypeError(f"`{name}` got a LinearOperator; use `@` to compose operators")
        try:
            xp = backend.array_namespace(block)
        except TypeError:
            raise TypeError(
                f"`{name}` got a {type(block).__module__}.{type(block).__name__}, "
                f"operator is {self._describe()}"
            ) from None
        if xp is not self.xp and not backend.adopts_block(self.xp, xp):
            reason = backend.mixed_libraries_reason(block, self.xp, self.library)
            raise TypeError(
                f"`{name}` got {backend.describe(block)}, operator is {self._describe()}; {reason}"
            )
        try:
            device = backend.device_of(block)
        except Exception:  # tracers under jit/vmap may not carry a device
            device = self.device
        if device is None:  # JAX tracers report no device
            device = self.device
        if self.device is not None and not backend.same_device(device, self.device):
            # (an operator over JAX tracers, under grad or vmap, has no device to match)
            raise ValueError(
                f"`{name}` got an array on {device}, operator is {self._describe()}; "
                "devices are mixed"
            )
        if block.ndim != 2 or block.shape[0] != rows:
            raise ValueError(
                f"`{name}` expects an array of shape ({rows}, k), got shape {tuple(block.shape)}"
            )
        matrix = getattr(self, "matrix", None)  # (a stored matrix's chunks cut Dask blocks)
        block = backend.fit_block(self.xp, block, matrix, adjoint=name == "rmatmat")
        if not backend.is_float_dtype(self.xp, block.dtype):
            return self.xp.astype(block, self.dtype)
        return block

    def _result_dtype(self, block: Any) -> Any:
        return self.xp.result_type(self.dtype, block.dtype)

    # ------------------------------------------------------------------- products
    def matmat(self, X: Any) -> Any:
        """``A @ X`` for a block ``X`` of shape ``(n, k)``: one call for k vectors.

        Parameters
        ----------
        X : array of shape (n, k)
            In the operator's library and on its device.

        Returns
        -------
        array of shape (m, k)
        """
        X = self._check_block(X, self.shape[1], "matmat")
        dtype = self._result_dtype(X)
        if self._real_products and dtype != self.dtype:
            return self._by_real_parts(self._matmat, X, dtype)
        if X.dtype != dtype:
            X = self.xp.astype(X, dtype)
        if self._validate_output:  # a user's function: it must leave X as it was
            out = backend.plain_array(_unchanged_input(self._matmat, X, "matmat"))
        else:
            out = backend.plain_array(self._matmat(X))
        if self._validate_output:
            self._check_output(out, (self.shape[0], X.shape[1]), dtype, "matmat")
        return out

    def _by_real_parts(self, product: Callable[[Any], Any], X: Any, dtype: Any) -> Any:
        """``product(X)`` for a real operator whose products take its own real dtype only
        (``_real_products``: autodiff operators, which cast a block to the variables'
        dtype) and a complex or wider block: A (Re X) + i A (Im X), both parts in one
        call of twice the columns. Cast as it stood, the imaginary part was dropped
        (``H @ (1j v)`` gave 0)."""
        xp = self.xp
        k = X.shape[1]
        if backend.is_complex_dtype(xp, X.dtype):
            parts = xp.concat([xp.real(X), xp.imag(X)], axis=1)
            out = backend.plain_array(product(xp.astype(parts, self.dtype)))
            real, imag = xp.astype(out[:, :k], dtype), xp.astype(out[:, k:], dtype)
            return real + 1j * imag if k else real
        return xp.astype(backend.plain_array(product(xp.astype(X, self.dtype))), dtype)

    def _product_into(self, X: Any, out: Any) -> Any:
        """:meth:`matmat`, written into ``out`` where the operator can (a stored NumPy or
        torch CPU matrix: :func:`~linop_trace._backend.product_into`); the returned array
        is the product either way. For loops that multiply one block shape again and
        again: ``out`` must be an (m, k) array of the product's dtype, distinct from X,
        which the caller no longer needs."""
        if self._validate_output or tuple(out.shape) != (self.shape[0], X.shape[1]):
            return self.matmat(X)
        X = self._check_block(X, self.shape[1], "matmat")
        dtype = self._result_dtype(X)
        if X.dtype != dtype or out.dtype != dtype:
            return self.matmat(X)
        return backend.plain_array(self._matmat_into(X, out))

    def _matmat_into(self, X: Any, out: Any) -> Any:
        """The product of a checked block, into ``out`` where the subclass can."""
        return self._matmat(X)

    def rmatmat(self, X: Any) -> Any:
        """``A^H @ X`` (conjugate transpose) for a block ``X`` of shape ``(m, k)``."""
        X = self._check_block(X, self.shape[0], "rmatmat")
        dtype = self._result_dtype(X)
        if self._real_products and dtype != self.dtype:
            return self._by_real_parts(self._rmatmat, X, dtype)
        if X.dtype != dtype:
            X = self.xp.astype(X, dtype)
        if self._validate_output:  # a user's function: it must leave X as it was
            out = backend.plain_array(_unchanged_input(self._rmatmat, X, "rmatmat"))
        else:
            out = backend.plain_array(self._rmatmat(X))
        if self._validate_output:
            self._check_output(out, (self.shape[1], X.shape[1]), dtype, "rmatmat")
        return out

    def matvec(self, x: Any) -> Any:
        """``A @ x`` for a vector of length n (shape ``(n,)`` or ``(n, 1)``)."""
        return self._vector_call(x, self.matmat, self.shape[1], "matvec")

    def rmatvec(self, x: Any) -> Any:
        """``A^H @ x`` for a vector of length m (shape ``(m,)`` or ``(m, 1)``)."""
        return self._vector_call(x, self.rmatmat, self.shape[0], "rmatvec")

    def _vector_call(self, x: Any, block_call: Callable[[Any], Any], rows: int, name: str) -> Any:
        ndim = getattr(x, "ndim", None)
        if ndim == 1:
            if x.shape[0] != rows:
                raise ValueError(
                    f"`{name}` expects a vector of length {rows}, got shape {tuple(x.shape)}"
                )
            return block_call(x[:, None])[:, 0]
        if ndim == 2 and x.shape[1] == 1:
            return block_call(x)
        if ndim is None:
            return block_call(x)  # let the block check name the wrong type
        raise ValueError(
            f"`{name}` expects a vector of shape ({rows},) or ({rows}, 1), got shape {tuple(x.shape)}"
        )

    def _matmat(self, X: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not implement _matmat")

    def _rmatmat(self, X: Any) -> Any:
        raise NotImplementedError(
            f"{type(self).__name__} has no adjoint product (rmatvec/rmatmat) defined"
        )

    def _check_output(self, out: Any, shape: tuple[int, int], dtype: Any, name: str) -> None:
        try:
            xp = backend.array_namespace(out)
        except TypeError:
            xp = None
        if xp is not self.xp:
            what = backend.describe(out) if xp is not None else type(out).__name__
            computed = backend.computed_graph_hint(self.xp, out)
            raise TypeError(f"`{name}` returned {what}, operator is {self._describe()}{computed}")
        if tuple(out.shape) != shape:
            raise ValueError(
                f"`{name}` returned an array of shape {tuple(out.shape)}, expected {shape}"
            )
        if out.dtype != dtype:
            raise TypeError(
                f"`{name}` returned dtype {backend.dtype_name(out.dtype)}, "
                f"expected {backend.dtype_name(dtype)}"
            )

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            return _ProductOperator(self, other)
        ndim = getattr(other, "ndim", None)
        if ndim == 1:
            return self.matvec(other)
        if ndim == 2:
            return self.matmat(other)
        if ndim is None:
            return NotImplemented
        raise ValueError(f"`@` expects a vector or a 2-d block, got shape {tuple(other.shape)}")

    def __call__(self, x: Any) -> Any:
        return self @ x

    # -------------------------------------------------------------------- algebra
    @property
    def H(self) -> LinearOperator:
        """The conjugate transpose (adjoint), lazily."""
        return _AdjointOperator(self)

    @property
    def T(self) -> LinearOperator:
        """The transpose (no conjugation), lazily."""
        return _TransposeOperator(self)

    def adjoint(self) -> LinearOperator:
        return self.H

    def transpose(self) -> LinearOperator:
        return self.T

    def __add__(self, other: Any) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return _SumOperator(self, other)

    def __sub__(self, other: Any) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return _SumOperator(self, _ScaledOperator(other, -1))

    def __neg__(self) -> LinearOperator:
        return _ScaledOperator(self, -1)

    def __pos__(self) -> LinearOperator:
        return self

    def __mul__(self, scalar: Any) -> LinearOperator:
        if isinstance(scalar, LinearOperator):
            raise TypeError("use `@` to compose two operators; `*` scales by a number")
        if not _is_scalar(scalar):
            if getattr(scalar, "ndim", None) is not None:
                raise TypeError(
                    f"`*` scales an operator by a number, got an array of shape "
                    f"{tuple(scalar.shape)}; use `A @ x` to apply it to a vector or block"
                )
            return NotImplemented
        return _ScaledOperator(self, scalar)

    def __rmul__(self, scalar: Any) -> LinearOperator:
        return self.__mul__(scalar)

    def __truediv__(self, scalar: Any) -> LinearOperator:
        if not _is_scalar(scalar):
            return NotImplemented
        return _ScaledOperator(self, 1 / scalar)

    # ------------------------------------------------------------ dense and scipy
    def to_dense(self, block_size: int | None = None) -> Any:
        """The full matrix as a dense array of the operator's library (n^2 memory)."""
        n = self.shape[1]
        xp = self.xp
        if n == 0 or self.shape[0] == 0:
            return xp.zeros(self.shape, dtype=self.dtype, device=self.device)
        block = n if block_size is None else max(1, min(int(block_size), n))
        pieces = []
        for start in range(0, n, block):
            width = min(block, n - start)
            identity = xp.eye(n, width, k=-start, dtype=self.dtype, device=self.device)
            pieces.append(self.matmat(identity))
        return pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=1)

    def to_scipy(self) -> Any:
        """A :class:`scipy.sparse.linalg.LinearOperator` over the same products (NumPy only)."""
        if not backend.is_numpy_namespace(self.xp):
            raise TypeError(
                f"to_scipy() needs a NumPy-backed operator, this one is {self._describe()}"
            )
        import scipy.sparse.linalg as spla

        def rmatmat(X: Any) -> Any:
            return self.rmatmat(np.asarray(X))

        return spla.LinearOperator(
            self.shape,
            matvec=lambda x: self.matvec(np.asarray(x).reshape(-1)),
            rmatvec=lambda x: self.rmatvec(np.asarray(x).reshape(-1)),
            matmat=lambda X: self.matmat(np.asarray(X)),
            rmatmat=rmatmat,
            dtype=np.dtype(self.dtype),
        )

    # ---------------------------------------------------------- structural facts
    def _exact_diagonal(self) -> Any | None:
        """The diagonal when the structure gives it cheaply (dense, sparse, sums), else None."""
        return None

    def _has_real_diagonal(self) -> bool:
        """Whether the trace and diagonal are real although the dtype is complex: a complex
        operator tagged ``"hermitian"`` (its estimates are returned real)."""
        return "hermitian" in self.tags and backend.is_complex_dtype(self.xp, self.dtype)

    def _stores_diagonal(self) -> bool:
        """Whether :meth:`_exact_diagonal` gives the diagonal, without computing it where
        that costs a pass (a sparse matrix's: ``method="auto"`` asked on every call, and a
        JAX BCOO paid an eager diagonal of 1.7 ms before its compiled exact run)."""
        return self._exact_diagonal() is not None

    def _reset_caches(self) -> None:
        """Empty the attributes named in ``_cache_fields`` (after a rebuild from data)."""
        for name in self._cache_fields:
            setattr(self, name, {} if name == "_cast" else None)

    # --------------------------------------------------------------- constructors
    @classmethod
    def from_callable(
        cls,
        matvec: Callable[[Any], Any] | None = None,
        matmat: Callable[[Any], Any] | None = None,
        rmatvec: Callable[[Any], Any] | None = None,
        rmatmat: Callable[[Any], Any] | None = None,
        *,
        shape: tuple[int, int],
        dtype: Any = None,
        like: Any = None,
        tags: Iterable[str] = (),
    ) -> LinearOperator:
        """Wrap user functions as an operator.

        Parameters
        ----------
        matvec, matmat : callable, optional
            ``x -> A x`` for a vector of shape ``(n,)``, and ``X -> A X`` for a block of
            shape ``(n, k)``. At least one is required. A missing ``matmat`` is derived
            by batching ``matvec``: ``torch.func.vmap``/``jax.vmap`` where the library
            has one and the function allows it, else a loop over columns.
        rmatvec, rmatmat : callable, optional
            The same for the conjugate transpose ``A^H``.

            None of them may write into its input: the estimators reuse their probes
            after the product. (On NumPy a function that does is caught by a fingerprint
            of the block and refused with a ``ValueError``.)

            Under JAX, when every function given is compiled by ``jax.jit``, a
            fixed-budget estimate traces them into its own compiled program, as it does
            for a stored matrix: the same values, without an eager dispatch per product
            (a function's arrays closed over are fixed at its first trace, by ``jax.jit``
            itself). Plain functions run eagerly, called once per block.
        shape : (int, int)
        dtype : dtype, optional
            Defaults to the dtype of ``like`` (integer and bool promoted to the default
            float), or float64 for NumPy.
        like : array, optional
            An array of the library and on the device the operator works in; NumPy on
            the CPU if omitted.
        tags : iterable of str
            Structural labels (``"symmetric"``, ``"hermitian"``,
            ``"positive_semidefinite"``).

        Returns
        -------
        LinearOperator
            Its products check the shape, library and dtype of what the functions return.

        Examples
        --------
        >>> import numpy as np
        >>> from linop_trace import LinearOperator
        >>> d = np.arange(1.0, 4.0)
        >>> A = LinearOperator.from_callable(matvec=lambda x: d * x, shape=(3, 3))
        >>> A.matmat(np.ones((3, 2)))
        array([[1., 1.],
               [2., 2.],
               [3., 3.]])
        """
        functions = [f for f in (matvec, matmat, rmatvec, rmatmat) if f is not None]
        compiled = bool(functions) and all(backend.is_compiled_function(f) for f in functions)
        kind = _CompiledCallableOperator if compiled else _CallableOperator
        return kind(matvec, matmat, rmatvec, rmatmat, shape, dtype, like, tags)


def _flatten_operator(operator: LinearOperator) -> tuple[tuple[Any, ...], Any]:
    fields = operator._data_fields or ()
    static = vars(operator).get("_static_part")
    if static is None:  # once per operator: its structure does not change
        skip = set(fields) | set(operator._cache_fields) | {"_static_part"}
        static = _Static(tuple(sorted((k, v) for k, v in vars(operator).items() if k not in skip)))
        vars(operator)["_static_part"] = static
    return tuple(getattr(operator, name) for name in fields), (type(operator), static)


def _unflatten_operator(aux: Any, children: tuple[Any, ...]) -> LinearOperator:
    cls, static = aux
    operator = object.__new__(cls)
    vars(operator).update(static.items)
    vars(operator)["_static_part"] = static
    fields = operator._data_fields or ()
    vars(operator).update(zip(fields, children))
    operator._reset_caches()
    return operator


class _Static:
    """An operator's static attributes, compared item by item (by identity where a value
    does not compare), so that operators of one structure share a compiled program."""

    def __init__(self, items: tuple[tuple[str, Any], ...]) -> None:
        self.items = items
        self._hash = hash(tuple((key, _hash_of(value)) for key, value in items))

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, _Static) or self._hash != other._hash:
            return False
        if len(self.items) != len(other.items):
            return False
        for (key, value), (other_key, other_value) in zip(self.items, other.items):
            if key != other_key or not _same(value, other_value):
                return False
        return True

    def __hash__(self) -> int:
        return self._hash


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:
        return False


def _hash_of(value: Any) -> int:
    try:
        return hash(value)
    except TypeError:
        return id(value)


def _is_scalar(value: Any) -> bool:
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return True
    return getattr(value, "ndim", None) == 0 and getattr(value, "shape", None) == ()


# ------------------------------------------------------------------------ explicit


class _DenseOperator(LinearOperator):
    """A dense 2-d array of any array-API library."""

    _data_fields = ("matrix",)
    _cache_fields = ("_adjoint", "_cast")

    def __init__(self, matrix: Any, tags: Iterable[str] = ()) -> None:
        xp = backend.array_namespace(matrix)
        device = backend.device_of(matrix)
        dtype = backend.promote_to_float(xp, matrix.dtype, device)
        if matrix.dtype != dtype:
            matrix = xp.astype(matrix, dtype)
        super().__init__((matrix.shape[0], matrix.shape[1]), dtype, xp, device, tags)
        self.matrix = matrix
        self._adjoint: Any = None
        self._cast: dict[Any, Any] = {}

    def settings_identity(self) -> Any:
        # block sizes come from the shape, dtype and device (bytes per column) alone; a
        # Dask matrix's also from its chunks
        if backend.is_dask_array(self.matrix):
            return None
        return (type(self), type(self.matrix), self.shape, self.dtype, self.device)

    def _matrix_as(self, dtype: Any) -> Any:
        """The matrix in ``dtype``: a cast kept while the matrix is unchanged (torch's
        version counter; JAX's arrays cannot change), cast again at every call where a
        write would leave no trace (NumPy: a kept cast read stale values after
        ``A[...] = ...``)."""
        if dtype == self.dtype:
            return self.matrix
        stamp = backend.mutation_stamp(self.matrix)
        kept = self._cast.get(dtype)
        if kept is not None and stamp is not None and kept[0] == stamp:
            return kept[1]
        cast = self.xp.astype(self.matrix, dtype)
        if stamp is not None:
            self._cast[dtype] = (stamp, cast)
        return cast

    def _matmat(self, X: Any) -> Any:
        return self._matrix_as(X.dtype) @ X

    def _matmat_into(self, X: Any, out: Any) -> Any:
        written = backend.product_into(self._matrix_as(X.dtype), X, out)
        return self._matmat(X) if written is None else written

    def _rmatmat(self, X: Any) -> Any:
        # A^H X as (X^H A)^H: the same product, but torch copies the whole matrix for
        # A^T @ X when X is column-major (as QR factors are): 2x slower on 4000 x 4000.
        # XLA folds the transposes back into one dot that is just as slow on a CPU (1.9x
        # A @ X at n = 512): the layout barriers keep X^H A a plain row-major product.
        xp = self.xp
        matrix = self._matrix_as(X.dtype)
        keep = backend.materialized
        if backend.is_complex_dtype(xp, matrix.dtype):
            rows = keep(xp, keep(xp, xp.conj(xp.matrix_transpose(X))) @ matrix)
            return xp.conj(xp.matrix_transpose(rows))
        return xp.matrix_transpose(keep(xp, keep(xp, xp.matrix_transpose(X)) @ matrix))

    def to_dense(self, block_size: int | None = None) -> Any:
        """A copy of the matrix (writing into it leaves the operator as it is)."""
        return backend.copied(self.xp, self.matrix)

    def _exact_diagonal(self) -> Any:
        n = min(self.shape)
        if n == 0:
            return self.xp.zeros((0,), dtype=self.dtype, device=self.device)
        # a view of the caller's matrix would be the estimate's value (an in-place edit of
        # either would change the other)
        return backend.owned(self.xp, self.xp.linalg.diagonal(self.matrix))


class _SparseOperator(LinearOperator):
    """A sparse matrix: SciPy, torch (COO/CSR), JAX BCOO or cupyx."""

    _data_fields = ("matrix",)
    _cache_fields = ("_adjoint",)

    def __init__(self, matrix: Any, tags: Iterable[str] = ()) -> None:
        xp = backend.array_namespace(matrix)
        device = backend.device_of(matrix)
        dtype = backend.promote_to_float(xp, matrix.dtype, device)
        matrix = backend.prepare_sparse(backend.sparse_astype(matrix, dtype))
        super().__init__((matrix.shape[0], matrix.shape[1]), dtype, xp, device, tags)
        self.matrix = matrix
        self._adjoint: Any = None

    def _matmat(self, X: Any) -> Any:
        matrix = backend.sparse_astype(self.matrix, X.dtype)
        return backend.sparse_matmat(matrix, X)

    def _matmat_into(self, X: Any, out: Any) -> Any:
        written = backend.product_into(backend.sparse_astype(self.matrix, X.dtype), X, out)
        return self._matmat(X) if written is None else written

    def _rmatmat(self, X: Any) -> Any:
        """A^H X through the adjoint in its own sparse format, kept while the matrix is
        unchanged (see :meth:`_DenseOperator._matrix_as`)."""
        stamp = backend.mutation_stamp(self.matrix)
        kept = self._adjoint
        if kept is not None and stamp is not None and kept[0] == stamp:
            adjoint = kept[1]
        else:
            adjoint = backend.sparse_adjoint(self.matrix)
            self._adjoint = None if stamp is None else (stamp, adjoint)
        return backend.sparse_matmat(backend.sparse_astype(adjoint, X.dtype), X)

    def to_dense(self, block_size: int | None = None) -> Any:
        return backend.sparse_to_dense(self.matrix)

    def _exact_diagonal(self) -> Any:
        return backend.sparse_diagonal(self.matrix)

    def _stores_diagonal(self) -> bool:
        return True


class _ScipyLinearOperator(LinearOperator):
    """A :class:`scipy.sparse.linalg.LinearOperator` (NumPy arrays in and out)."""

    _validate_output = True

    def __init__(self, operator: Any, tags: Iterable[str] = ()) -> None:
        np_compat = backend.numpy_namespace()
        dtype = operator.dtype
        if dtype is None:  # SciPy leaves it unset when it cannot infer it
            dtype = np.asarray(operator.matvec(np.zeros(operator.shape[1]))).dtype
        dtype = backend.promote_to_float(np_compat, np.dtype(dtype))
        super().__init__(tuple(operator.shape), dtype, np_compat, "cpu", tags)
        self.operator = operator
        # SciPy's LinearOperator(shape, matvec=...) keeps a missing rmatvec as None and
        # fails with "'NoneType' object is not callable" when asked for A^H x
        # (one built with rmatmat= alone has an adjoint: SciPy's rmatmat uses it)
        self._has_adjoint = (
            getattr(operator, "_CustomLinearOperator__rmatvec_impl", True) is not None
            or getattr(operator, "_CustomLinearOperator__rmatmat_impl", None) is not None
        )

    def _matmat(self, X: Any) -> Any:
        return np.asarray(self.operator.matmat(X), dtype=X.dtype)

    def _rmatmat(self, X: Any) -> Any:
        if not self._has_adjoint:
            raise NotImplementedError(
                "the scipy.sparse.linalg.LinearOperator has no adjoint product (it was built "
                "without rmatvec/rmatmat), which this computation needs; build it with "
                "rmatvec=, or use a method that needs only A @ x"
            )
        if X.shape[1] == 0:  # SciPy cannot stack zero columns
            return np.zeros((self.shape[1], 0), dtype=X.dtype)
        return np.asarray(self.operator.rmatmat(X), dtype=X.dtype)


# ------------------------------------------------------------------------ callable


class _BatchedCallable:
    """A column-wise function applied to a block: vmapped if possible, else a loop.

    The first error of the vmapped call that may mean the function does not support vmap
    (:func:`~linop_trace._backend.is_unsupported_transform_error`) switches it to the loop
    for good, with one warning. Any other error (out of memory, an interrupt, a bug of the
    function) propagates unchanged and the next call is vmapped again.
    """

    def __init__(self, function: Callable[[Any], Any], xp: Any, name: str) -> None:
        self.function = function
        self.xp = xp
        self.name = name
        self._vmapped = backend.vmap_columns(xp, function)

    def __eq__(self, other: object) -> bool:  # (one structure for one function)
        if not isinstance(other, _BatchedCallable):
            return NotImplemented
        return (self.function, self.xp, self.name) == (other.function, other.xp, other.name)

    def __hash__(self) -> int:
        return hash((_BatchedCallable, self.function, self.name))

    def __call__(self, X: Any) -> Any:
        if self._vmapped is not None:
            try:
                return self._vmapped(X)
            except Exception as error:
                # A transient error (out of memory) says nothing about the function, and
                # another error would come from the loop as well: neither switches.
                if not backend.is_unsupported_transform_error(error):
                    raise
                # The function is not vmappable (in-place ops, host callbacks, ...):
                # remember it and loop from now on.
                self._vmapped = None
                warnings.warn(
                    f"`{self.name}` could not be vectorized with the library's vmap; "
                    "falling back to one call per column",
                    RuntimeWarning,
                    stacklevel=4,
                )
        columns = [self.function(X[:, j]) for j in range(X.shape[1])]
        if not columns:
            raise ValueError(f"`{self.name}` was given an empty block")
        for column in columns:
            try:
                column_xp = backend.array_namespace(column)
            except TypeError:
                column_xp = None
            if column_xp is not self.xp:
                what = backend.describe(column) if column_xp is not None else type(column).__name__
                raise TypeError(
                    f"`{self.name}` returned {what}, operator is {backend.namespace_name(self.xp)}"
                )
            if getattr(column, "ndim", None) != 1:
                raise ValueError(
                    f"`{self.name}` returned shape {tuple(getattr(column, 'shape', ()))}, "
                    "expected a vector"
                )
        return self.xp.stack(columns, axis=1)


class _CallableOperator(LinearOperator):
    _validate_output = True

    def __init__(
        self,
        matvec: Callable[[Any], Any] | None,
        matmat: Callable[[Any], Any] | None,
        rmatvec: Callable[[Any], Any] | None,
        rmatmat: Callable[[Any], Any] | None,
        shape: tuple[int, int],
        dtype: Any,
        like: Any,
        tags: Iterable[str],
    ) -> None:
        if matvec is None and matmat is None:
            raise ValueError("from_callable needs `matvec` or `matmat`")
        if not isinstance(shape, (tuple, list)) or len(shape) != 2:
            raise ValueError(f"`shape` must be a pair (rows, columns), got {shape!r}")
        if like is None:
            xp, device = backend.numpy_namespace(), "cpu"
            try:
                dtype = np.dtype(np.float64 if dtype is None else dtype)
            except TypeError:
                raise TypeError(
                    f"`dtype`={dtype!r} is not a NumPy dtype; an operator of another library "
                    "needs `like=`, an array of that library (its namespace and device)"
                ) from None
        else:
            xp = backend.array_namespace(like)
            device = backend.device_of(like)
            dtype = like.dtype if dtype is None else backend.dtype_of_library(xp, dtype)
        dtype = backend.promote_to_float(xp, dtype, device)
        super().__init__((shape[0], shape[1]), dtype, xp, device, tags)  # (checks the ints)
        self._forward = self._block_function(matvec, matmat, "matvec", "matmat")
        self._backward = (
            None
            if rmatvec is None and rmatmat is None
            else self._block_function(rmatvec, rmatmat, "rmatvec", "rmatmat")
        )

    def _block_function(
        self,
        vector_fn: Callable[[Any], Any] | None,
        block_fn: Callable[[Any], Any] | None,
        vector_name: str,
        block_name: str,
    ) -> Callable[[Any], Any]:
        if block_fn is not None:
            return block_fn
        assert vector_fn is not None
        return _BatchedCallable(vector_fn, self.xp, vector_name)

    def _matmat(self, X: Any) -> Any:
        return self._forward(X)

    def _rmatmat(self, X: Any) -> Any:
        if self._backward is None:
            return super()._rmatmat(X)
        return self._backward(X)


class _CompiledCallableOperator(_CallableOperator):
    """An operator of functions compiled by ``jax.jit``. Their author made them traceable,
    and their arrays closed over are fixed when they are first traced, so an estimate may
    trace them into its own program (one compiled program, as for a stored matrix) and
    compute what their calls would. The functions are the operator's structure: operators
    of the same functions share the program."""

    _data_fields: tuple[str, ...] | None = ()

    def __init__(self, *arguments: Any) -> None:
        super().__init__(*arguments)
        if not backend.compiles_estimates(self.xp):  # (jitted functions, `like` not JAX)
            self._data_fields = None


# ------------------------------------------------------------------------ algebra


def _check_compatible(a: LinearOperator, b: LinearOperator, what: str) -> None:
    if a.xp is not b.xp:
        raise TypeError(
            f"cannot {what} operators of two libraries: {a._describe()} and {b._describe()}"
        )
    if not backend.same_device(a.device, b.device):
        raise ValueError(
            f"cannot {what} operators on two devices: {a._describe()} and {b._describe()}"
        )


class _SumOperator(LinearOperator):
    _data_fields = ("left", "right")

    def __init__(self, left: LinearOperator, right: LinearOperator) -> None:
        _check_compatible(left, right, "add")
        if left.shape != right.shape:
            raise ValueError(f"cannot add operators of shapes {left.shape} and {right.shape}")
        dtype = left.xp.result_type(left.dtype, right.dtype)
        super().__init__(left.shape, dtype, left.xp, left.device, left.tags & right.tags)
        self.left, self.right = left, right

    def _matmat(self, X: Any) -> Any:
        return self.left.matmat(X) + self.right.matmat(X)

    def _rmatmat(self, X: Any) -> Any:
        return self.left.rmatmat(X) + self.right.rmatmat(X)

    def _stores_diagonal(self) -> bool:
        return self.left._stores_diagonal() and self.right._stores_diagonal()

    def _exact_diagonal(self) -> Any | None:
        left, right = self.left._exact_diagonal(), self.right._exact_diagonal()
        if left is None or right is None:
            return None
        return left + right


class _ScaledOperator(LinearOperator):
    _data_fields: tuple[str, ...] | None = ("operator", "scalar")

    def __init__(self, operator: LinearOperator, scalar: Any) -> None:
        xp = operator.xp
        # (a NumPy scalar as its Python number: np.complex64(c)'s adjoint kept c, and
        # np.float64(2) widened a float32 operator's products)
        scalar = backend.python_number(scalar)
        if isinstance(scalar, numbers.Number):
            is_complex = isinstance(scalar, complex) and scalar.imag != 0
            dtype = backend.complex_dtype_for(xp, operator.dtype) if is_complex else operator.dtype
            positive = not is_complex and complex(scalar).real >= 0  # type: ignore[call-overload]
        else:
            if backend.array_namespace(scalar) is not xp:
                raise TypeError(
                    f"cannot scale {operator._describe()} by {backend.describe(scalar)}"
                )
            dtype = xp.result_type(operator.dtype, scalar.dtype)
            # the value of a 0-d array is not inspected (it may be traced): assume the worst
            positive = False
            is_complex = backend.is_complex_dtype(xp, scalar.dtype)
        tags = operator.tags if positive else operator.tags - {"positive_semidefinite"}
        if is_complex:
            # a complex multiple of a Hermitian operator is not Hermitian (c A)^H = conj(c) A
            tags = tags - {"hermitian"}
        super().__init__(operator.shape, dtype, xp, operator.device, tags)
        self.operator, self.scalar = operator, scalar
        if isinstance(scalar, numbers.Number):  # a Python number is part of the structure
            self._data_fields = ("operator",)

    def _conj_scalar(self) -> Any:
        if isinstance(self.scalar, numbers.Number):
            return (
                complex(self.scalar).conjugate()
                if isinstance(self.scalar, complex)
                else self.scalar
            )
        return (
            self.xp.conj(self.scalar)
            if backend.is_complex_dtype(self.xp, self.scalar.dtype)
            else self.scalar
        )

    def _matmat(self, X: Any) -> Any:
        return self.scalar * self.operator.matmat(X)

    def _rmatmat(self, X: Any) -> Any:
        return self._conj_scalar() * self.operator.rmatmat(X)

    def _stores_diagonal(self) -> bool:
        return self.operator._stores_diagonal()

    def _exact_diagonal(self) -> Any | None:
        diagonal = self.operator._exact_diagonal()
        if diagonal is None:
            return None
        # in the operator's dtype first: the library's own rule for a 0-d array times a
        # half-precision vector keeps float16 (torch, JAX's weak types), which overflowed
        # where the operator (float32 by the array API's rule) is widened; a complex
        # scalar made torch's complex32, which has no kernels
        return self.scalar * self.xp.astype(diagonal, self.dtype)


class _WidenedOperator(LinearOperator):
    """A half-precision operator (float16, bfloat16) seen in float32 (complex64 for
    complex32): each product casts its block to the operator's dtype and the image back,
    so that probes, bases and every sum of the estimators run in single precision (the
    linear algebra of torch and NumPy has no half-precision kernels, and a half-precision
    trace overflows at 65504). The products keep the user's precision, which bounds the
    accuracy: about 1e-3 relative for float16, 1e-2 for bfloat16."""

    _data_fields = ("operator",)

    def __init__(self, operator: LinearOperator) -> None:
        xp = operator.xp
        complex_ = backend.is_complex_dtype(xp, operator.dtype)
        dtype = xp.complex64 if complex_ else xp.float32
        super().__init__(operator.shape, dtype, xp, operator.device, operator.tags)
        self.operator = operator

    def _narrow(self, X: Any) -> Any:
        return self.xp.astype(X, self.operator.dtype)

    def _matmat(self, X: Any) -> Any:
        return self.xp.astype(self.operator.matmat(self._narrow(X)), X.dtype)

    def _rmatmat(self, X: Any) -> Any:
        return self.xp.astype(self.operator.rmatmat(self._narrow(X)), X.dtype)

    def _stores_diagonal(self) -> bool:
        return self.operator._stores_diagonal()

    def _exact_diagonal(self) -> Any | None:
        diagonal = self.operator._exact_diagonal()
        return None if diagonal is None else self.xp.astype(diagonal, self.dtype)

    def bytes_per_column(self) -> int:
        return self.operator.bytes_per_column() * 2 + super().bytes_per_column()


def widened(operator: LinearOperator) -> LinearOperator:
    """``operator`` itself, or seen in float32 if its dtype is a half precision (the rule
    of :func:`~linop_trace.trace` and :func:`~linop_trace.diagonal` for such operators)."""
    if backend.is_half_precision(operator.xp, operator.dtype):
        return _WidenedOperator(operator)
    return operator


class _ProductOperator(LinearOperator):
    _data_fields = ("left", "right")

    def __init__(self, left: LinearOperator, right: LinearOperator) -> None:
        _check_compatible(left, right, "compose")
        if left.shape[1] != right.shape[0]:
            raise ValueError(f"cannot compose operators of shapes {left.shape} and {right.shape}")
        dtype = left.xp.result_type(left.dtype, right.dtype)
        super().__init__((left.shape[0], right.shape[1]), dtype, left.xp, left.device)
        self.left, self.right = left, right

    def _matmat(self, X: Any) -> Any:
        return self.left.matmat(self.right.matmat(X))

    def _rmatmat(self, X: Any) -> Any:
        return self.right.rmatmat(self.left.rmatmat(X))


class _FlippedOperator(LinearOperator):
    """An operator of the transposed shape over another one's products (the adjoint and
    the transpose): same dtype, library, device and tags."""

    _data_fields = ("operator",)

    def __init__(self, operator: LinearOperator) -> None:
        super().__init__(
            (operator.shape[1], operator.shape[0]),
            operator.dtype,
            operator.xp,
            operator.device,
            operator.tags,
        )
        self.operator = operator


class _AdjointOperator(_FlippedOperator):
    """``A^H``: the operator's adjoint product, and its product as the adjoint's."""

    def _matmat(self, X: Any) -> Any:
        return self.operator.rmatmat(X)

    def _rmatmat(self, X: Any) -> Any:
        return self.operator.matmat(X)

    @property
    def H(self) -> LinearOperator:
        return self.operator

    def _stores_diagonal(self) -> bool:
        return self.operator._stores_diagonal()

    def _exact_diagonal(self) -> Any | None:
        diagonal = self.operator._exact_diagonal()
        if diagonal is None or not backend.is_complex_dtype(self.xp, diagonal.dtype):
            return diagonal
        return self.xp.conj(diagonal)


class _TransposeOperator(_FlippedOperator):
    """``A^T X = conj(A^H conj(X))``: the adjoint product with conjugations around it."""

    def _conj(self, X: Any) -> Any:
        return self.xp.conj(X) if backend.is_complex_dtype(self.xp, X.dtype) else X

    def _matmat(self, X: Any) -> Any:
        return self._conj(self.operator.rmatmat(self._conj(X)))

    def _rmatmat(self, X: Any) -> Any:
        return self._conj(self.operator.matmat(self._conj(X)))

    @property
    def T(self) -> LinearOperator:
        return self.operator

    def _stores_diagonal(self) -> bool:
        return self.operator._stores_diagonal()

    def _exact_diagonal(self) -> Any | None:
        return self.operator._exact_diagonal()


# ---------------------------------------------------------------------- conversion


#: Rows of the input block fingerprinted around a user's function (spread evenly).
_FINGERPRINT_ROWS = 64


def _unchanged_input(product: Callable[[Any], Any], X: Any, name: str) -> Any:
    """``product(X)``, refused if it wrote into ``X``.

    The estimators reuse their probe block after its product (Hutchinson's samples are
    ``Z^H (A Z)``): a function that scales its input in place (``X *= d[:, None]; return
    X``) would turn them into ``(A Z)^H (A Z)`` without a word. Where reads are free
    (NumPy) up to 64 rows spread over the block, the first and last among them, are
    copied before the call and compared after it: a few hundred entries, nothing next to
    a product. Functions that write into other rows only are not caught, nor are
    functions of torch, CuPy or JAX arrays (the comparison would wait for the device, and
    JAX arrays cannot be written): the documented rule is that ``matvec``/``matmat`` must
    not modify their input.
    """
    xp = backend.array_namespace(X)
    if not backend.reads_are_free(xp) or X.shape[0] == 0 or X.shape[1] == 0:
        return product(X)
    n = int(X.shape[0])
    rows = np.unique(np.linspace(0, n - 1, min(n, _FINGERPRINT_ROWS)).astype(np.int64))
    index = xp.asarray(rows, device=backend.device_of(X))
    before = xp.take(X, index, axis=0)
    before = xp.asarray(before, copy=True)
    out = product(X)
    after = xp.take(X, index, axis=0)
    same = (after == before) | (xp.isnan(after) & xp.isnan(before))
    if not bool(xp.all(same)):
        raise ValueError(
            f"`{name}` changed the block it was given (it wrote into its input, e.g. "
            "X *= d[:, None]); the estimators reuse their probes after the product, so the "
            "function must leave its input as it is: work on a copy (X = X * d[:, None])"
        )
    return out


def aslinearoperator(matrix: Any, *, tags: Iterable[str] = ()) -> LinearOperator:
    """View ``matrix`` as a :class:`LinearOperator` in its own library and on its device.

    Parameters
    ----------
    matrix : array, sparse matrix, LinearOperator
        A 2-d dense array of NumPy, torch, JAX, CuPy or any array-API library; a
        sparse matrix of SciPy (arrays and matrices), torch (COO, CSR), JAX
        (``BCOO``) or cupyx; a :class:`scipy.sparse.linalg.LinearOperator`; an
        operator of curvlinops, lineax, PyLops or linear_operator (GPyTorch), whose
        products stay in its library (see :ref:`peer-operators`); or a
        :class:`LinearOperator`, returned as it is (with ``tags``: a copy that carries
        its own tags and these).
    tags : iterable of str, optional
        Structural labels: ``"symmetric"``, ``"hermitian"``, ``"positive_semidefinite"``.
        They are not checked; estimators that need them still look for evidence.

    Returns
    -------
    LinearOperator
        Integer and bool matrices are promoted to the library's default float.

    Raises
    ------
    TypeError
        For objects that are not matrices of a supported library.
    ValueError
        For arrays that are not 2-d.

    Examples
    --------
    >>> import scipy.sparse as sp
    >>> from linop_trace import aslinearoperator
    >>> A = aslinearoperator(sp.diags([1.0, 2.0, 3.0]))
    >>> A.shape, A.library
    ((3, 3), 'numpy')
    """
    if isinstance(matrix, LinearOperator):
        added = _validate_tags(tags)
        if added <= matrix.tags:
            return matrix
        tagged = copy.copy(matrix)
        tagged.tags = matrix.tags | added
        # (the copy's compiled structure is made anew: the one an estimate kept on the
        # original holds the original's tags, and a JAX estimate refused a tag just added)
        vars(tagged).pop("_static_part", None)
        tagged._reset_caches()  # (an adjoint made with the old tags, too)
        return tagged
    if not tags:
        known = _known_jax_dense(matrix)
        if known is not None:
            return known
    matrix = backend.plain_matrix(matrix)
    if backend.is_sparse(matrix):
        if len(matrix.shape) != 2:
            raise ValueError(f"expected a 2-d matrix, got shape {tuple(matrix.shape)}")
        return _SparseOperator(matrix, tags)
    if backend.is_scipy_linear_operator(matrix):
        return _ScipyLinearOperator(matrix, tags)
    from ._adapters import adapt_peer_operator  # curvlinops, lineax, PyLops, linear_operator

    adapted = adapt_peer_operator(matrix, tags)
    if adapted is not None:
        return adapted
    try:
        backend.array_namespace(matrix)
    except TypeError:
        raise TypeError(
            "aslinearoperator expects a 2-d array, a sparse matrix, a "
            "scipy.sparse.linalg.LinearOperator or a LinearOperator, got "
            f"{type(matrix).__module__}.{type(matrix).__name__}"
        ) from None
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-d matrix, got shape {tuple(matrix.shape)}")
    backend.check_dask_chunks(matrix)  # NumPy chunks only
    operator = _DenseOperator(matrix, tags)
    if not tags:
        _remember_jax_dense(operator)
    return operator


#: The layout (:func:`~linop_trace._backend.jax_array_layout`) of the last JAX array made
#: an operator of here, and that operator's attributes but its matrix. They follow from
#: the layout alone, and JAX arrays are immutable, so an array of the same layout (the
#: same array in a loop, or the next one of a training loop) gets its operator without
#: the checks: 20 us a call for the same array, which cost 0.2x of a Hutchinson
#: estimate's product at n = 512 with what ran after it, and 45 us for a new array.
_LAST_JAX_DENSE: list[Any] = []


def _known_jax_dense(matrix: Any) -> _DenseOperator | None:
    """The operator of ``matrix`` if it is a JAX array with the layout of the last one
    made an operator, else ``None``."""
    if not _LAST_JAX_DENSE:
        return None
    layout, attributes = _LAST_JAX_DENSE
    if type(matrix) is not layout[0] or backend.jax_array_layout(matrix) != layout:
        return None
    operator = object.__new__(_DenseOperator)
    vars(operator).update(attributes)
    operator.matrix = matrix
    operator._reset_caches()
    return operator


def _remember_jax_dense(operator: _DenseOperator) -> None:
    """Keep ``operator``'s attributes for its matrix's layout, a concrete JAX array used
    as given (not promoted to a floating type)."""
    layout = backend.jax_array_layout(operator.matrix)
    if layout is None:
        return
    _flatten_operator(operator)  # its static part, made once and shared
    skip = {"matrix", *operator._cache_fields}
    attributes = {key: value for key, value in vars(operator).items() if key not in skip}
    _LAST_JAX_DENSE[:] = [layout, attributes]
