"""Structure before estimation: split an operator expression into the terms whose trace,
diagonal and row sums are known exactly and the implicit rest, which alone is estimated.

The walk goes through sums, differences and scalar multiples; a term is exact when it
stores what is asked (dense and sparse matrices: their stored diagonal, never an identity
walk), is an identity or a diagonal operator, a Kronecker product of exact factors, a
block-diagonal operator of exact blocks (mixed blocks split block by block), a product of
a diagonal operator with an exact term, or the adjoint/transpose of an exact term.
Everything else (callables, autodiff operators, products without a rule) is implicit;
the implicit terms are summed into one operator, so each probe block costs one product
through their sum, not one per term.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _backend as backend
from ._estimate import DeferredCheck, Estimate, EstimateInterrupted
from ._operators import (
    LinearOperator,
    _AdjointOperator,
    _DenseOperator,
    _ProductOperator,
    _ScaledOperator,
    _SparseOperator,
    _SumOperator,
    _TransposeOperator,
    widened,
)
from ._structured import (
    _BlockDiagonalOperator,
    _DiagonalOperator,
    _IdentityOperator,
    _KroneckerOperator,
    _OfParts,
    _ZeroOperator,
)

__all__ = ["Decomposition", "ExactTerm", "decompose"]

_STRUCTURED = (_IdentityOperator, _DiagonalOperator, _KroneckerOperator, _BlockDiagonalOperator)


@dataclass(frozen=True)
class ExactTerm:
    """One exactly known term: a label for ``info["exact_terms"]`` and its trace,
    diagonal and row sums, computed when asked (no product through an implicit operator)."""

    label: str
    trace: Callable[[], Any]
    diagonal: Callable[[], Any]
    row_sums: Callable[[], Any]


@dataclass(frozen=True)
class Decomposition:
    """``operator = sum(exact terms) + implicit`` (``implicit`` is ``None`` when every
    term is exact)."""

    operator: LinearOperator
    exact: tuple[ExactTerm, ...]
    implicit: LinearOperator | None

    @property
    def labels(self) -> list[str]:
        return [term.label for term in self.exact]

    def exact_part(self, quantity: str) -> Any:
        """The sum of the exact terms' trace, diagonal or row sums."""
        values = [getattr(term, quantity)() for term in self.exact]
        total = functools.reduce(lambda a, b: a + b, values)
        # half precisions are estimated in float32 (see `widened`): so is their exact part
        dtype = widened(self.operator).dtype
        if total.dtype != dtype and backend.is_half_precision(self.operator.xp, total.dtype):
            total = self.operator.xp.astype(total, dtype)
        return total

    def estimate(
        self,
        quantity: str,
        estimate_implicit: Callable[[LinearOperator], Estimate],
        check_finite: bool,
    ) -> Estimate:
        """The exact part plus the estimate of the implicit part (``estimate_implicit``
        is the undecomposed trace or diagonal on it, with the caller's options): its
        stderr, columns, method and interval are the implicit part's."""
        exact = self.exact_part(quantity)
        xp = self.operator.xp
        checks = _finite_checks(xp, exact, check_finite)
        info = {"exact_terms": self.labels, "exact_part": exact}
        # a Hermitian sum has a real trace and diagonal (the implicit part's estimate is
        # real already; the exact part's imaginary part is round-off)
        real = quantity != "row_sums" and self.operator._has_real_diagonal()
        if self.implicit is None:
            stderr = xp.zeros(
                exact.shape,
                dtype=backend.real_dtype_for(xp, exact.dtype),
                device=self.operator.device,
            )
            whole = Estimate(exact, stderr, 0, "exact", info=info, checks=checks)
            return whole.real_part() if real else whole
        try:
            estimate = estimate_implicit(self.implicit)
        except EstimateInterrupted as interrupted:  # the partial estimate of the whole
            partial = interrupted.partial
            if partial is not None:
                partial = _shifted(partial, exact, info, checks, self.implicit)
                partial = partial.real_part() if real else partial
            raise EstimateInterrupted(partial) from interrupted
        shifted = _shifted(estimate, exact, info, checks, self.implicit)
        return shifted.real_part() if real else shifted


def _shifted(
    estimate: Estimate,
    exact: Any,
    info: dict[str, Any],
    checks: tuple[DeferredCheck, ...],
    implicit: LinearOperator,
) -> Estimate:
    """``estimate`` of the implicit part moved by the exact part; ``refine`` goes on
    refining the implicit part (whatever operator it is given: it must be the first)."""
    shifted = Estimate(
        estimate._value + exact,
        estimate._stderr,
        estimate.num_matvecs,
        estimate._method,
        estimate.converged,
        estimate._dof,
        {**estimate._info, **info},
        shape_of=estimate._shape_of,
        checks=estimate._checks + checks,
    )
    shifted._state, shifted._choice = estimate._state, estimate._choice
    inner = estimate._resume
    if inner is not None:

        def resume(A: Any, *args: Any) -> Estimate:
            return _shifted(inner(implicit, *args), exact, info, (), implicit)

        shifted._resume = resume
    return shifted


def _finite_checks(xp: Any, exact: Any, check_finite: bool) -> tuple[DeferredCheck, ...]:
    if not check_finite:
        return ()

    def error() -> Exception:
        return FloatingPointError("the exact part (stored entries) holds NaN or inf values")

    if backend.reads_are_free(xp):
        if not bool(xp.all(xp.isfinite(exact))):
            raise error()
        return ()
    return (DeferredCheck(~backend.finite_flag(xp, exact), (), error),)


# ------------------------------------------------------------------------- the walk


def _terms(operator: LinearOperator, coefficient: Any) -> list[tuple[Any, LinearOperator]]:
    """``operator`` as ``sum(coefficient_i * term_i)`` over sums and scalings."""
    if isinstance(operator, _SumOperator):
        return _terms(operator.left, coefficient) + _terms(operator.right, coefficient)
    if isinstance(operator, _ScaledOperator):
        return _terms(operator.operator, _times(coefficient, operator.scalar))
    return [(coefficient, operator)]


def _times(a: Any, b: Any) -> Any:
    if isinstance(a, numbers.Number) and a == 1:
        return b
    if isinstance(b, numbers.Number) and b == 1:
        return a
    return a * b


def _is_one(coefficient: Any) -> bool:
    return isinstance(coefficient, numbers.Number) and coefficient == 1


def _label(coefficient: Any, term: LinearOperator) -> str:
    name = type(term).__name__.strip("_").replace("Operator", "") or "operator"
    text = f"{name} {term.shape[0]}x{term.shape[1]}"
    if _is_one(coefficient):
        return text
    factor = repr(coefficient) if isinstance(coefficient, numbers.Number) else "c"
    return f"{factor} * {text}"


def _scaled(coefficient: Any, value: Any) -> Any:
    return value if _is_one(coefficient) else coefficient * value


def _ones(operator: LinearOperator) -> Any:
    return operator.xp.ones((operator.shape[1], 1), dtype=operator.dtype, device=operator.device)


def _diagonal_of_diagonal_kind(operator: LinearOperator) -> Any | None:
    """d when ``operator`` is ``diag(d)`` (an identity, a diagonal operator or a multiple)."""
    if isinstance(operator, (_IdentityOperator, _DiagonalOperator)):
        return operator._exact_diagonal()
    if isinstance(operator, _ScaledOperator):
        inner = _diagonal_of_diagonal_kind(operator.operator)
        return None if inner is None else operator.scalar * inner
    return None


def _exact_term(coefficient: Any, term: LinearOperator) -> ExactTerm | None:
    """The rule that gives ``term``'s trace, diagonal and row sums exactly, or None."""
    if term.shape[0] != term.shape[1]:
        return None
    xp = term.xp
    label = _label(coefficient, term)

    def from_diagonal(diagonal: Callable[[], Any], row_sums: Callable[[], Any]) -> ExactTerm:
        return ExactTerm(
            label,
            lambda: _scaled(coefficient, xp.sum(diagonal())),
            lambda: _scaled(coefficient, diagonal()),
            lambda: _scaled(coefficient, row_sums()),
        )

    def stored_row_sums() -> Any:  # a stored matrix: its own product, not counted
        return term.matmat(_ones(term))[:, 0]

    if isinstance(term, (_SumOperator, _ScaledOperator)):  # a factor or block: A + c I
        exact, implicit, _ = _split(term)
        if implicit:
            return None
        return ExactTerm(
            label,
            *(
                functools.partial(_scaled_sum, coefficient, exact, quantity)
                for quantity in ("trace", "diagonal", "row_sums")
            ),
        )
    if isinstance(term, (_IdentityOperator, _DiagonalOperator)):
        return from_diagonal(term._exact_diagonal, term._exact_diagonal)
    if isinstance(term, (_DenseOperator, _SparseOperator)):
        return from_diagonal(term._exact_diagonal, stored_row_sums)
    if isinstance(term, _OfParts):  # Kronecker factors, diagonal blocks
        parts = [_exact_term(1, part) for part in term._parts()]
        if any(rule is None for rule in parts):
            return None
        rules = [rule for rule in parts if rule is not None]
        return ExactTerm(
            label,
            lambda: _scaled(coefficient, term._join_traces(_each(rules, "trace"))),
            lambda: _scaled(coefficient, term._join(_each(rules, "diagonal"))),
            lambda: _scaled(coefficient, term._join(_each(rules, "row_sums"))),
        )
    if isinstance(term, _ProductOperator):
        left_d = _diagonal_of_diagonal_kind(term.left)
        right_d = _diagonal_of_diagonal_kind(term.right)
        if left_d is not None:  # diag(D A) = d * diag(A), (D A) 1 = d * (A 1)
            rule = _exact_term(1, term.right)
            if rule is not None:
                inner = rule
                return from_diagonal(
                    lambda: left_d * inner.diagonal(), lambda: left_d * inner.row_sums()
                )
        if right_d is not None:  # diag(A D) = diag(A) * d, (A D) 1 = A d
            rule = _exact_term(1, term.left)
            if rule is not None:
                inner = rule
                return from_diagonal(
                    lambda: inner.diagonal() * right_d,
                    lambda: term.left.matmat(right_d[:, None])[:, 0],
                )
        return None
    if isinstance(term, (_AdjointOperator, _TransposeOperator)):
        rule = _exact_term(1, term.operator)
        if rule is None:
            return None
        inner = rule
        conjugate = isinstance(term, _AdjointOperator) and backend.is_complex_dtype(xp, term.dtype)

        def diagonal() -> Any:
            value = inner.diagonal()
            return xp.conj(value) if conjugate else value

        return from_diagonal(diagonal, stored_row_sums)
    return None


def _scaled_sum(coefficient: Any, rules: list[ExactTerm], quantity: str) -> Any:
    return _scaled(coefficient, functools.reduce(lambda a, b: a + b, _each(rules, quantity)))


def _each(rules: list[ExactTerm], quantity: str) -> list[Any]:
    return [getattr(rule, quantity)() for rule in rules]


def _split(
    operator: LinearOperator,
) -> tuple[list[ExactTerm], list[LinearOperator], bool]:
    """(exact terms, implicit terms with their coefficients applied, whether any
    structured operator was met)."""
    exact: list[ExactTerm] = []
    implicit: list[LinearOperator] = []
    structured = False
    for coefficient, term in _terms(operator, 1):
        structured = structured or _is_structured(term)
        rule = _exact_term(coefficient, term)
        if rule is not None:
            exact.append(rule)
            continue
        if isinstance(term, _BlockDiagonalOperator) and all(
            block.shape[0] == block.shape[1] for block in term.blocks
        ):
            part = _split_blocks(coefficient, term)
            if part is not None:
                exact.append(part[0])
                implicit.append(part[1])
                continue
        implicit.append(term if _is_one(coefficient) else _ScaledOperator(term, coefficient))
    return exact, implicit, structured


def _is_structured(term: LinearOperator) -> bool:
    """A structured operator, or a product with one as a factor (``D @ A`` with a diagonal
    ``D``: exact by its rule, and no stored matrix alone; ``trace(D @ A)`` ran Hutchinson
    where ``trace(I + D @ A)`` was exact)."""
    if isinstance(term, _STRUCTURED):
        return True
    if isinstance(term, _ProductOperator):
        return _is_structured(term.left) or _is_structured(term.right)
    return False


def _split_blocks(
    coefficient: Any, term: _BlockDiagonalOperator
) -> tuple[ExactTerm, LinearOperator] | None:
    """A block-diagonal operator with exact and implicit blocks: the exact blocks' part
    (zeros in the implicit blocks' rows) and the implicit part (zeros in the exact
    blocks' places), which probes pass through whole: the zero blocks cost nothing."""
    xp, device = term.xp, term.device
    exact_blocks: list[tuple[list[ExactTerm], int]] = []
    implicit_blocks: list[LinearOperator] = []
    any_exact = False
    for block in term.blocks:
        exact, implicit, _ = _split(block)
        any_exact = any_exact or bool(exact)
        exact_blocks.append((exact, block.shape[0]))
        if implicit:
            implicit_blocks.append(functools.reduce(_SumOperator, implicit))
        else:
            implicit_blocks.append(_ZeroOperator(block.shape, block.dtype, xp, device))
    if not any_exact:
        return None

    def zeros(n: int) -> Any:
        return xp.zeros((n,), dtype=term.dtype, device=device)

    def pieces(quantity: str) -> list[Any]:
        return [
            functools.reduce(lambda a, b: a + b, _each(rules, quantity)) if rules else zeros(n)
            for rules, n in exact_blocks
        ]

    def every(quantity: str) -> list[Any]:
        return [value for rules, _ in exact_blocks for value in _each(rules, quantity)]

    label = _label(coefficient, term) + " (exact blocks)"
    part = ExactTerm(
        label,
        lambda: _scaled(coefficient, functools.reduce(lambda a, b: a + b, every("trace"))),
        lambda: _scaled(coefficient, xp.concat(pieces("diagonal"))),
        lambda: _scaled(coefficient, xp.concat(pieces("row_sums"))),
    )
    implicit_operator: LinearOperator = _BlockDiagonalOperator(tuple(implicit_blocks))
    if not _is_one(coefficient):
        implicit_operator = _ScaledOperator(implicit_operator, coefficient)
    return part, implicit_operator


def decompose(operator: LinearOperator) -> Decomposition | None:
    """The split of a square ``operator`` into exact terms and one implicit operator, or
    ``None`` when it gains nothing: no exact term, or an expression of stored matrices
    alone (a method asked for on a stored matrix keeps estimating it, as it always did)."""
    if operator.shape[0] != operator.shape[1] or operator.shape[0] == 0:
        return None
    exact, implicit, structured = _split(operator)
    if not exact or not (structured or implicit):
        return None
    return Decomposition(
        operator, tuple(exact), functools.reduce(_SumOperator, implicit) if implicit else None
    )
