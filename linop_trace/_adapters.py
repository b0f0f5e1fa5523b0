"""Operators of peer libraries as :class:`~linop_trace.LinearOperator`.

:func:`~linop_trace.aslinearoperator` hands anything it does not know as an array to
:func:`adapt_peer_operator`, which recognises four libraries' operators by the names
of their classes (``type(op).__mro__``), so nothing here imports a peer library until
the user has given one of its objects:

============================  ===============================  ==================
library                       base class                       array library
============================  ===============================  ==================
curvlinops                    ``PyTorchLinearOperator``        torch
lineax                        ``AbstractLinearOperator``       JAX
PyLops                        ``pylops.LinearOperator``        NumPy
linear_operator (GPyTorch)    ``linear_operator.LinearOperator``  torch
============================  ===============================  ==================

Products go through the peer's own block product and stay in its library and on its
device; the peer's operator is never materialised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _backend as backend
from ._operators import LinearOperator

__all__ = ["adapt_peer_operator"]

#: (module prefix, class name) of each peer's operator base class.
_PEER_BASES = {
    "curvlinops": ("curvlinops", "PyTorchLinearOperator"),
    "lineax": ("lineax", "AbstractLinearOperator"),
    "pylops": ("pylops", "LinearOperator"),
    "linear_operator": ("linear_operator", "LinearOperator"),
}

#: curvlinops operators that are positive semidefinite by construction (a GGN, Fisher or
#: empirical Fisher is J^T H J with a convex loss' Hessian H; K-FAC is a Kronecker product
#: of two such factors). The Hessian is only symmetric.
_CURVLINOPS_PSD = frozenset(
    {
        "GGNLinearOperator",
        "FisherMCLinearOperator",
        "EFLinearOperator",
        "KFACLinearOperator",
        "EKFACLinearOperator",
    }
)

#: linear_operator classes that are ``R R^T`` (symmetric, PSD) or diagonal (symmetric)
#: whatever their data; everything else gets no tags (a ``DenseLinearOperator`` may hold
#: any matrix).
_LINEAR_OPERATOR_ROOTS = frozenset({"RootLinearOperator", "LowRankRootLinearOperator"})
_LINEAR_OPERATOR_DIAGONALS = frozenset({"DiagLinearOperator", "ConstantDiagLinearOperator"})


def _peer_of(operator: Any) -> str | None:
    """The name of the peer library whose operator base class ``operator`` derives from."""
    for cls in type(operator).__mro__:
        module = cls.__module__.split(".")[0]
        for peer, (prefix, name) in _PEER_BASES.items():
            if module == prefix and cls.__name__ == name:
                return peer
    return None


def _class_names(operator: Any) -> set[str]:
    return {cls.__name__ for cls in type(operator).__mro__}


class _PeerOperator(LinearOperator):
    """A peer library's operator, through its block product (and adjoint, if any).

    ``forward`` and ``adjoint`` take and return ``(n, k)`` arrays of the peer's library in
    the operator's dtype; ``adjoint`` is ``None`` where the peer has no adjoint product,
    and is not needed for self-adjoint operators (their forward product serves both).
    """

    _validate_output = True
    #: The peer computes in its own dtype: a complex block on a real operator goes
    #: through as its real and imaginary parts (cast as it stood, the imaginary part
    #: was dropped: ``A @ (1j v)`` gave 0, and a Steinhaus trace of ``A + 1j I`` read
    #: 2.5 + 2j against 5 + 2j)
    _real_products = True

    def __init__(
        self,
        source: Any,
        peer: str,
        forward: Callable[[Any], Any],
        adjoint: Callable[[Any], Any] | None,
        shape: tuple[int, int],
        dtype: Any,
        like: Any,
        tags: frozenset[str],
    ) -> None:
        xp = backend.array_namespace(like)
        super().__init__(shape, dtype, xp, backend.device_of(like), tags)
        self.source = source
        self.peer = peer
        self._forward = forward
        self._adjoint = adjoint

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f" over {self.peer}.{type(self.source).__name__}>"

    def _in_own_dtype(self, product: Callable[[Any], Any], X: Any) -> Any:
        # The peer computes in its own dtype (a float32 Hessian cannot take float64
        # probes); the result is cast back to the block's dtype, as the checks expect.
        if X.dtype != self.dtype:
            return self.xp.astype(product(self.xp.astype(X, self.dtype)), X.dtype)
        return product(X)

    def _matmat(self, X: Any) -> Any:
        return self._in_own_dtype(self._forward, X)

    def _rmatmat(self, X: Any) -> Any:
        if self._adjoint is not None:
            return self._in_own_dtype(self._adjoint, X)
        if "hermitian" in self.tags or (
            "symmetric" in self.tags and not backend.is_complex_dtype(self.xp, self.dtype)
        ):
            return self._matmat(X)
        raise NotImplementedError(
            f"the {self.peer} operator {type(self.source).__name__} has no adjoint "
            "product, which this computation needs; use a method that needs only A @ x, "
            "or tag the operator 'symmetric' if it is"
        )


def _conjugated(xp: Any, product: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``X -> conj(product(conj(X)))``: the adjoint from a transpose's product."""

    def adjoint(X: Any) -> Any:
        if not backend.is_complex_dtype(xp, X.dtype):
            return product(X)
        return xp.conj(product(xp.conj(X)))

    return adjoint


def _self_adjoint_tags(symmetric: bool, psd: bool) -> frozenset[str]:
    tags = {"symmetric"} if symmetric else set()
    if psd:
        tags.add("positive_semidefinite")
    return frozenset(tags)


def _from_curvlinops(operator: Any) -> _PeerOperator:
    import torch

    like = torch.empty(0, dtype=operator.dtype, device=operator.device)
    self_adjoint = bool(getattr(operator, "SELF_ADJOINT", False))
    psd = self_adjoint and bool(_class_names(operator) & _CURVLINOPS_PSD)
    adjoint: Callable[[Any], Any] | None = None
    if not self_adjoint:
        transpose: list[Any] = []  # built on first use: a transposed Jacobian is not free

        def adjoint(X: Any) -> Any:
            if not transpose:
                try:
                    transpose.append(operator.adjoint())
                except NotImplementedError:
                    raise NotImplementedError(
                        f"the curvlinops operator {type(operator).__name__} has no adjoint "
                        "(`.adjoint()`), which this computation needs; use a method that "
                        "needs only A @ x"
                    ) from None
            return transpose[0] @ X

    return _PeerOperator(
        operator,
        "curvlinops",
        lambda X: operator @ X,
        adjoint,
        tuple(operator.shape),
        operator.dtype,
        like,
        _self_adjoint_tags(self_adjoint, psd),
    )


def _lineax_tag(query: Callable[[Any], bool], operator: Any) -> bool:
    try:
        return bool(query(operator))
    except NotImplementedError:  # a user's operator class that does not answer
        return False


def _from_lineax(operator: Any) -> _PeerOperator:
    import jax
    import jax.numpy as jnp
    import lineax

    in_structure, out_structure = operator.in_structure(), operator.out_structure()
    for structure in (in_structure, out_structure):
        if not isinstance(structure, jax.ShapeDtypeStruct) or len(structure.shape) != 1:
            raise TypeError(
                "aslinearoperator takes lineax operators on vectors (an in_structure and "
                f"out_structure of one 1-d array), got {in_structure} -> {out_structure}"
            )
    dtype = jnp.result_type(in_structure.dtype, out_structure.dtype)
    like = jnp.zeros((0,), dtype=dtype)
    xp = backend.array_namespace(like)
    transposed = jax.vmap(lambda x: operator.transpose().mv(x), in_axes=1, out_axes=1)
    symmetric = _lineax_tag(lineax.is_symmetric, operator)
    psd = _lineax_tag(lineax.is_positive_semidefinite, operator)
    return _PeerOperator(
        operator,
        "lineax",
        jax.vmap(operator.mv, in_axes=1, out_axes=1),
        _conjugated(xp, transposed),
        (out_structure.shape[0], in_structure.shape[0]),
        dtype,
        like,
        _self_adjoint_tags(symmetric, psd),
    )


def _from_pylops(operator: Any) -> _PeerOperator:
    import numpy as np

    dtype = backend.promote_to_float(backend.numpy_namespace(), np.dtype(operator.dtype))
    like = np.zeros(0, dtype=dtype)

    def forward(X: Any) -> Any:
        return np.asarray(operator.matmat(X))

    def adjoint(X: Any) -> Any:
        try:
            return np.asarray(operator.rmatmat(X))
        except NotImplementedError:
            raise NotImplementedError(
                f"the pylops operator {type(operator).__name__} has no adjoint product "
                "(rmatvec), which this computation needs; use a method that needs only A @ x"
            ) from None

    return _PeerOperator(
        operator, "pylops", forward, adjoint, tuple(operator.shape), dtype, like, frozenset()
    )


def _linear_operator_tags(operator: Any) -> frozenset[str]:
    names = _class_names(operator)
    if "SumLinearOperator" in names:  # (AddedDiagLinearOperator too): what every term has
        parts = [_linear_operator_tags(part) for part in operator.linear_ops]
        return frozenset.intersection(*parts) if parts else frozenset()
    if names & _LINEAR_OPERATOR_ROOTS:
        return _self_adjoint_tags(True, True)
    if names & _LINEAR_OPERATOR_DIAGONALS:
        return _self_adjoint_tags(True, False)
    return frozenset()


def _from_linear_operator(operator: Any) -> _PeerOperator:
    import torch

    if len(operator.shape) != 2:
        raise ValueError(
            "aslinearoperator takes one matrix, got a batch of linear_operator operators "
            f"of shape {tuple(operator.shape)}"
        )
    like = torch.empty(0, dtype=operator.dtype, device=operator.device)
    xp = backend.array_namespace(like)

    def dense(out: Any) -> Any:  # a product may come back as a lazy operator
        return out if isinstance(out, torch.Tensor) else out.to_dense()

    tags = _linear_operator_tags(operator)
    if backend.is_complex_dtype(xp, operator.dtype):
        tags = frozenset()  # the classes' symmetry is a transpose, not a conjugate one
    return _PeerOperator(
        operator,
        "linear_operator",
        lambda X: dense(operator.matmul(X)),
        _conjugated(xp, lambda X: dense(operator.mT.matmul(X))),
        tuple(operator.shape),
        operator.dtype,
        like,
        tags,
    )


_BUILDERS: dict[str, Callable[[Any], _PeerOperator]] = {
    "curvlinops": _from_curvlinops,
    "lineax": _from_lineax,
    "pylops": _from_pylops,
    "linear_operator": _from_linear_operator,
}


def adapt_peer_operator(operator: Any, tags: Any = ()) -> LinearOperator | None:
    """``operator`` as a :class:`LinearOperator` if it is a peer library's operator (with
    its own tags and ``tags``), else ``None``."""
    peer = _peer_of(operator)
    if peer is None:
        return None
    adapted = _BUILDERS[peer](operator)
    if tags:
        from ._operators import aslinearoperator

        return aslinearoperator(adapted, tags=tags)
    return adapted
