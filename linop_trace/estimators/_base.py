"""The estimator contract: what an estimator receives (:class:`EstimationRequest`), what it
declares and implements (:class:`Estimator`), and the counted product every column of
every estimate goes through (:class:`CountingMatmat`).

An estimator never sees the operator itself: the request gives it the counted block
products ``A X`` and ``A^H X``, the operator's size, library, dtype, device and tags, and
its stored diagonal where it has one. So the budget (``num_matvecs``), the finiteness
check and the block size hold for every method, built in or plugged in.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from .. import _backend as backend
from .._blocks import IDENTITY_BLOCK_BYTES, itemsize
from .._estimate import DeferredCheck, Estimate
from .._probes import ProbeSampler

__all__ = [
    "CountingMatmat",
    "EstimationRequest",
    "Estimator",
    "ProbeOption",
    "RefineState",
    "cover",
    "covered_product",
    "deflation_split",
    "exact_diagonal",
    "exact_estimate",
    "is_self_adjoint",
]


def deflation_split(num_matvecs: int) -> tuple[int, int]:
    """The budget split of the deflation methods (Hutch++, Diag++): sketch size s and
    residual probes g with 2 s + g <= num_matvecs (s for the sketch, s for A Q).

    s = ceil(m/3) unless that leaves no residual probe, g = m - 2 s; so m = 100 gives
    34 sketch columns, 34 for A Q and 32 residual probes; m = 20 gives 7, 7, 6.
    """
    sketch = min(math.ceil(num_matvecs / 3), (num_matvecs - 1) // 2)
    return sketch, num_matvecs - 2 * sketch


def is_self_adjoint(operator: Any) -> bool:
    """Whether the operator's tags say ``A^H = A``."""
    tags = operator.tags
    if "hermitian" in tags:
        return True
    return "symmetric" in tags and not backend.is_complex_dtype(operator.xp, operator.dtype)


class _Tally:
    """Columns and calls through an operator (both directions), and the finiteness of
    every product: read on the host at once where reads are free, else kept as device
    flags that the estimate checks when it is first read."""

    def __init__(self, check_finite: bool) -> None:
        self.check_finite = check_finite
        self.calls = 0
        self.columns = 0
        self.flags: list[Any] = []
        # lazy products (JAX tracers, Dask) taken without ``covered=True``: flagged at
        # the end, each by a reduction of its own
        self.pending: list[Any] = []
        self.covered: list[Any] = []
        # products a caller took unchecked (``covered=True``), until its cover_all
        self.uncovered = 0
        # out of memory: the narrower block every later call keeps to, and the widths of
        # the calls that went through after the first retry
        self.block_limit: int | None = None
        self.retried_widths: list[int] = []
        # products scaled by a power of two, fixed at the first product (0-d array)
        self.unit_scale = False
        self.scale: Any = None


class CountingMatmat:
    """``X -> A @ X`` in blocks of at most ``block_size`` columns, counted, checked finite.

    Every estimator multiplies through one of these, so ``num_matvecs`` in the result is
    the number of columns that really passed through the operator. A block wider than
    ``block_size`` goes through in column chunks (one call when it fits). With
    ``check_finite``, a non-finite product raises ``FloatingPointError``: at once for
    NumPy, when the estimate is first read for libraries whose values live on a device
    (so that the estimate runs without waiting for it).

    Parameters
    ----------
    operator : LinearOperator
    check_finite : bool
    block_size : int, optional
        Most columns per operator call (default: no limit).
    precision : str, optional
        JAX's matrix-product precision for the operator's products (``None``: the default).
        Estimates pass the caller's own, so that their products are the caller's ``A @ Z``
        while their internal algebra runs at full precision.
    """

    def __init__(
        self,
        operator: Any,
        check_finite: bool = True,
        block_size: int | None = None,
        precision: str | None = None,
        *,
        unit_scale: bool = False,
        _adjoint: bool = False,
        _tally: _Tally | None = None,
    ) -> None:
        self._operator = operator
        self.block_size = block_size
        self.precision = precision
        self._is_adjoint = _adjoint
        self._tally = _Tally(check_finite) if _tally is None else _tally
        if unit_scale:
            self._tally.unit_scale = True

    @property
    def calls(self) -> int:
        """Operator calls so far (both directions)."""
        return self._tally.calls

    @property
    def columns(self) -> int:
        """Columns through the operator so far (both directions): the matvecs spent."""
        return self._tally.columns

    @property
    def check_finite(self) -> bool:
        return self._tally.check_finite

    def __call__(self, block: Any, out: Any = None, *, covered: bool = False) -> Any:
        """``A @ block``, counted and checked. ``out``: an array of the product's shape
        and dtype that the caller no longer needs, which the product may be written into
        (see :meth:`LinearOperator._product_into`); use the returned array either way.
        ``covered``: the caller checks this product through a later result that every
        entry of it flows into (:meth:`cover_all`), so it is not checked on its own."""
        buffer = out
        tally = self._tally
        unchecked = covered and tally.check_finite
        if unchecked:
            tally.check_finite = False  # (for this product's blocks only)
        try:
            out = self._in_blocks(block, buffer)
        finally:
            if unchecked:
                tally.check_finite = True
        if unchecked:  # (counted once made: an interrupted product leaves nothing to cover)
            tally.uncovered += 1
        if tally.unit_scale:
            xp = self._operator.xp
            tally.unit_scale = False  # decided once, at the first product
            scale = backend.jit(xp, _power_of_two_scale)(xp, out)
            if backend.known_value(xp, scale) != 1.0:  # (NumPy skips a scale of 1)
                tally.scale = scale
        if tally.scale is not None:
            if buffer is not None and out is buffer:
                out = self._operator.xp.multiply(out, tally.scale, out=out)
            else:
                out = out * tally.scale
        if tally.check_finite and backend.is_lazy(out) and not unchecked:
            tally.pending.append(out)
        return out

    def cover_all(self, result: Any) -> None:
        """Check every product taken with ``covered=True`` since the last call through
        ``result``, which every entry of each of them flows into (Lanczos: the
        coefficients ``alpha_j = q_j^H A q_j``, into which a NaN or infinite entry of
        ``A q_j`` brings a NaN or infinity, a zero entry of ``q_j`` included). One pass
        over the small result instead of one over each product: on a cheap sparse
        operator a product's own check costs a tenth of the product. Raises at once where
        reads are free, else the estimate's checks read the flag."""
        tally = self._tally
        if not tally.uncovered:
            return
        tally.uncovered = 0
        xp = self._operator.xp
        if backend.reads_are_free(xp):
            if backend.all_finite(xp, result) is False:
                raise _covered_error()
        else:
            tally.covered.append(backend.finite_flag(xp, result))

    @property
    def scale(self) -> Any:
        """The power of two every product was multiplied by (a 0-d array), or ``None``."""
        return self._tally.scale

    def in_operator_units(self, *arrays: Any) -> tuple[Any, ...]:
        """``arrays``, linear in the products, divided by :attr:`scale` (exactly: a power
        of two) back into the operator's units; as they are where there was none."""
        scale = self._tally.scale
        if scale is None:
            return arrays
        xp = self._operator.xp
        return tuple(x / xp.astype(scale, x.dtype) for x in arrays)

    def _in_blocks(self, block: Any, buffer: Any = None) -> Any:
        """The product in column chunks of at most the block size; a chunk whose product
        runs out of memory is done again in halves (down to one column), and the narrower
        size holds for the rest of the estimate. Chunks already through are kept, and each
        column's product is the same whatever the chunk, so the estimate is that of an
        uninterrupted run. (Eager products only: under ``jax.jit`` memory runs out when
        the compiled program runs, after this code.)"""
        width = int(block.shape[1])
        limit = self._tally.block_limit or self.block_size
        if limit is None or width <= limit:
            try:
                return self._counted(block, buffer)
            except Exception as error:
                if width == 1 or not backend.is_out_of_memory(error):
                    raise
                half = (width + 1) // 2
                self._tally.block_limit = half
                warnings.warn(
                    f"a product of {width} columns ran out of memory "
                    f"({type(error).__name__}); going on in blocks of {half}",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return self._in_blocks(block)
        pieces = [
            self._in_blocks(block[:, start : min(start + limit, width)])
            for start in range(0, width, limit)
        ]
        return self._operator.xp.concat(pieces, axis=1)

    def adjoint(self, block: Any) -> Any:
        """``A^H @ X``, counted like ``A @ X`` (same ``calls`` and ``columns``).

        Self-adjoint operators (tagged ``"hermitian"``, or ``"symmetric"`` and real) use
        the forward product, so methods that need ``A^H`` work on them without an adjoint.
        """
        if is_self_adjoint(self._operator):
            return self(block)
        other = CountingMatmat(
            self._operator,
            block_size=self.block_size,
            precision=self.precision,
            _adjoint=True,
            _tally=self._tally,
        )
        return other(block)

    def with_precision(self, precision: str | None) -> CountingMatmat:
        """The same counted product (one tally) at another JAX matrix-product precision:
        the exact walk multiplies at ``"highest"``, its result being exact."""
        return CountingMatmat(
            self._operator,
            block_size=self.block_size,
            precision=precision,
            _adjoint=self._is_adjoint,
            _tally=self._tally,
        )

    def _counted(self, block: Any, buffer: Any = None) -> Any:
        operator = self._operator
        with backend.product_precision(operator.xp, self.precision):
            if self._is_adjoint:
                out = operator.rmatmat(block)
            elif buffer is not None:
                out = operator._product_into(block, buffer)
            else:
                out = operator.matmat(block)
        tally = self._tally
        tally.calls += 1
        tally.columns += int(block.shape[1])
        if tally.block_limit is not None:
            tally.retried_widths.append(int(block.shape[1]))
        if tally.check_finite:
            xp = operator.xp
            if backend.reads_are_free(xp):
                if backend.all_finite(xp, out) is False:
                    raise FloatingPointError(_non_finite_message(int(block.shape[1])))
            elif not backend.is_lazy(out):  # (traced or Dask: flagged in __call__ or covered)
                tally.flags.append(backend.finite_flag(xp, out))
        return out

    @property
    def retried_widths(self) -> list[int]:
        """Widths of the operator calls made after a product ran out of memory (empty if
        none did)."""
        return list(self._tally.retried_widths)

    def deferred_checks(self) -> tuple[DeferredCheck, ...]:
        """The finiteness of the products so far, as checks for the :class:`Estimate`
        (empty where they were checked already, or not asked for)."""
        tally = self._tally
        if tally.uncovered:  # (a caller that took products unchecked must cover them)
            raise RuntimeError(f"{tally.uncovered} products were taken unchecked and never covered")
        xp = self._operator.xp
        flags = tally.flags + [backend.finite_flag(xp, out) for out in tally.pending]
        checks = []
        for group, error in ((flags, _non_finite_error), (tally.covered, _covered_error)):
            if group:
                failed = ~(group[0] if len(group) == 1 else xp.all(xp.stack(group)))
                checks.append(DeferredCheck(failed, (), error))
        return tuple(checks)

    def check_now(self) -> None:
        """Read the finiteness flags now (adaptive runs, once per round) and raise."""
        for check in self.deferred_checks():
            check.run()
        self._tally.flags, self._tally.pending, self._tally.covered = [], [], []


def _power_of_two_scale(xp: Any, product: Any) -> Any:
    """1 where the largest entry of ``product`` lies in a range whose squares and their
    sums neither overflow nor underflow (2^+-(max exponent / 4): 2^+-256 in float64,
    2^+-32 in float32), and for a product that is zero, NaN or infinite (which fails its
    finiteness check); else 2^-e with 2^e <= max|product| < 2^(e+1), which brings the
    largest entry into [1, 2) exactly (a 0-d real array, computed where the product
    lives; e clipped so that 2^-e is finite and normal, also where XLA flushes
    subnormals).

    A handful of operations on 0-d arrays, each a kernel launch on a GPU. Where the
    library has ``frexp`` (NumPy, torch, JAX, CuPy), e comes from it exactly: max|product|
    = f 2^(e+1) with f in [1/2, 1), and 0, NaN and inf read as e + 1 = 0 (three
    operations fewer than the logarithm, 26 us against 40 us for torch on the CPU, and
    exact where ``log2`` rounds up just below a power of two). Elsewhere the exponent is
    ``floor(log2 max)``, corrected down where that rounding happened, a zero or NaN
    maximum read as 1 first (an infinite one then gets 2^-(max exponent - 2))."""
    fixed = backend.stop_gradient(product)
    real = backend.real_dtype_for(xp, product.dtype)
    if not math.prod(fixed.shape):
        return xp.ones((), dtype=real, device=backend.device_of(product))
    largest = xp.max(xp.abs(fixed))  # (real for complex products too)
    top = int(math.floor(math.log2(float(xp.finfo(real).max))))  # 1023, 127
    frexp = getattr(xp, "frexp", None)
    if frexp is not None:
        exponent = xp.astype(frexp(largest)[1], real) - 1
    else:  # (log2 may round up to the next integer just below a power of two)
        exponent = xp.floor(xp.log2(xp.where(largest > 0, largest, xp.ones_like(largest))))
        exponent = xp.where(2.0**exponent > largest, exponent - 1, exponent)
    exponent = xp.where(
        xp.abs(exponent) <= top // 4,
        xp.zeros_like(exponent),
        xp.clip(exponent, min=float(2 - top), max=float(top - 2)),
    )
    return 2.0**-exponent


def _non_finite_message(width: int | None = None) -> str:
    where = f"for a block of {width} columns" if width is not None else "in one of its blocks"
    return (
        f"the operator's matmat returned non-finite values (NaN or inf) {where}; pass "
        "check_finite=False to skip this check"
    )


def _non_finite_error() -> Exception:
    return FloatingPointError(_non_finite_message())


def _covered_error() -> Exception:
    return FloatingPointError(
        "the operator's matmat returned non-finite values (NaN or inf) in one of its "
        "blocks, or the sums the estimate forms from them overflowed; pass "
        "check_finite=False to skip this check"
    )


def covered_product(matmat: Any, block: Any, *, feeds_products: bool = False) -> Any:
    """``matmat(block)``, whose finiteness :func:`cover` checks later through a result
    that every entry of the product flows into, not by a pass of its own. Under
    ``jax.jit`` a product with one consumer fuses with it (XLA runs
    ``sum(Z * (A @ Z), axis=0)`` without writing ``A @ Z`` out, faster than the product
    alone: docs/evidence.rst), which a separate check of the product prevents; on Dask the
    check of the result replaces a pass over the whole product (a quarter of a Hutchinson
    estimate's work at n = 10^6); eagerly (NumPy, torch, CuPy) the pass over each product
    goes, and on a GPU the kernels that check it. Plain callables (the cores' reference
    tests) are called as they are.

    ``feeds_products``: the operator is later applied to what this product becomes
    (XTrace's basis of it). Where reads are free (NumPy) such a product is checked at
    once, so that a non-finite one stops the run before the operator gets a NaN block
    (which a function that checks its input refuses with an error of its own). On Dask it
    gets a check of its own too: the graph's solvers come between it and the result
    (SciPy's refuse a NaN with an error of their own), and the check is then computed
    alone to name the cause."""
    if isinstance(matmat, CountingMatmat):
        xp = matmat._operator.xp
        if feeds_products and (backend.reads_are_free(xp) or backend.is_dask_namespace(xp)):
            return matmat(block)
        return matmat(block, covered=True)
    return matmat(block)


def cover(matmat: Any, result: Any) -> Any:
    """``result``, carrying the finiteness check of the products taken with
    :func:`covered_product` since the last cover (:meth:`CountingMatmat.cover_all`): a
    non-finite entry of any of them makes ``result`` non-finite, and so does an overflow
    of ``result`` itself, which the check then reports too. Plain callables pass
    through."""
    if isinstance(matmat, CountingMatmat):
        matmat.cover_all(result)
    return result


@dataclass
class EstimationRequest:
    """Everything an estimator gets: the counted products, probes, budget and tolerance.

    Attributes
    ----------
    matmat : CountingMatmat
        ``X -> A X`` in blocks of ``block_size`` columns, counted; use it for every
        operator application (and :meth:`adjoint` for ``A^H X``).
    probes : ProbeSampler
        ``probes(k)`` draws an ``(n, k)`` block in the operator's library, dtype and device
        (the kind the method uses: ``probes.kind``).
    num_matvecs : int
        The budget of operator applications (columns).
    block_size : int
        Most columns per operator call.
    rtol, atol : float or None
        Tolerance on the interval half-width, for adaptive methods.
    confidence : float
        Level of that interval.
    max_matvecs : int or None
        Budget cap when a tolerance is given.
    method : str
        The name of the estimator the request is for (in error messages).
    """

    matmat: CountingMatmat
    probes: ProbeSampler
    num_matvecs: int
    block_size: int
    rtol: float | None = None
    atol: float | None = None
    confidence: float = 0.95
    max_matvecs: int | None = None
    method: str = "custom"
    _has_adjoint: bool | None = field(default=None, repr=False)

    # ------------------------------------------------------------ the operator's facts
    @property
    def n(self) -> int:
        """The operator's size (it is square)."""
        return int(self.matmat._operator.shape[1])

    @property
    def xp(self) -> Any:
        """The array namespace of the operator's library."""
        return self.matmat._operator.xp

    @property
    def dtype(self) -> Any:
        return self.matmat._operator.dtype

    @property
    def device(self) -> Any:
        return self.matmat._operator.device

    @property
    def tags(self) -> frozenset[str]:
        return self.matmat._operator.tags

    @property
    def self_adjoint(self) -> bool:
        """Whether the tags say ``A^H = A`` (then :meth:`adjoint` is the forward product)."""
        return is_self_adjoint(self.matmat._operator)

    @property
    def real_valued(self) -> bool:
        """Whether the trace and diagonal are real although the operator is complex: it
        is tagged Hermitian. Estimators may keep the real part of their samples (for a
        diagonal the imaginary part is noise of zero mean); every estimate of such an
        operator is returned real (:func:`~linop_trace.trace` takes the real part)."""
        return bool(self.matmat._operator._has_real_diagonal())

    @property
    def has_adjoint(self) -> bool:
        """Whether ``A^H X`` is available: self-adjoint tags, or an ``rmatmat`` that accepts
        an empty block (nothing is counted or computed)."""
        if self._has_adjoint is None:
            self._has_adjoint = self.self_adjoint or _accepts_adjoint(self.matmat._operator)
        return self._has_adjoint

    def adjoint(self, block: Any) -> Any:
        """``A^H @ X`` through the counted product; an operator without an adjoint raises a
        ``ValueError`` that names the method and the fix."""
        try:
            return self.matmat.adjoint(block)
        except NotImplementedError as error:
            raise ValueError(
                f"method {self.method!r} needs products with A^H: give the operator an "
                "rmatmat/rmatvec, or tag it tags=('symmetric',) / ('hermitian',) if A^H = A"
            ) from error

    def stored_diagonal(self) -> Any | None:
        """The diagonal the operator stores (dense and sparse matrices, sums and scalings of
        them), at no product; ``None`` when it has none."""
        return self.matmat._operator._exact_diagonal()

    def has_stored_diagonal(self) -> bool:
        """Whether :meth:`stored_diagonal` has one (without computing it)."""
        return self.matmat._operator._stores_diagonal()  # type: ignore[no-any-return]

    # ------------------------------------------------------------------- the budget
    @property
    def columns(self) -> int:
        """Columns spent so far."""
        return self.matmat.columns

    @property
    def adaptive(self) -> bool:
        return self.rtol is not None or self.atol is not None

    @property
    def cap(self) -> int:
        """The most columns the estimate may spend in all (a refine's ``max_matvecs`` of
        0 is none more: ``or`` read it as unset, and the refine spent as many again)."""
        return self.num_matvecs if self.max_matvecs is None else self.max_matvecs

    def blocks(self, total: int) -> list[int]:
        """Split ``total`` columns into block widths of at most ``block_size``."""
        count = math.ceil(total / self.block_size) if total else 0
        return [min(self.block_size, total - i * self.block_size) for i in range(count)]


def _accepts_adjoint(operator: Any) -> bool:
    xp = operator.xp
    empty = backend.zeros(xp, (operator.shape[0], 0), operator.dtype, operator.device)
    try:
        operator.rmatmat(empty)
    except NotImplementedError:
        return False
    except Exception:  # an adjoint exists but dislikes empty blocks; methods give it real ones
        return True
    return True


# ------------------------------------------------------------ the exact walk
def exact_diagonal(request: EstimationRequest) -> tuple[Any, tuple[DeferredCheck, ...]]:
    """The diagonal of the request's operator, with no n x n array unless it was given one,
    and the check that a stored diagonal is finite (empty where it was checked already).

    The identity walk sends ``(n, block)`` slices of the identity through the counted
    product: at most ``IDENTITY_BLOCK_BYTES`` each (and at most ``request.block_size``
    columns), n columns in all.
    """
    xp, n = request.xp, request.n
    stored = request.stored_diagonal()
    if stored is not None:
        return stored, _finite_checks(xp, stored, request.matmat.check_finite)
    width_bytes = n * itemsize(xp, request.dtype)
    block = max(1, min(request.block_size, IDENTITY_BLOCK_BYTES // max(1, width_bytes), n))
    # exact: the products at full precision (JAX's float32 default on GPUs is TF32)
    walk = request.matmat.with_precision("highest")
    pieces = [
        backend.block_diagonal(xp, walk(identity), start, identity)
        for start, identity in backend.identity_blocks(xp, n, block, request.dtype, request.device)
    ]
    return (pieces[0] if len(pieces) == 1 else xp.concat(pieces)), ()


def _finite_checks(xp: Any, stored: Any, check_finite: bool) -> tuple[DeferredCheck, ...]:
    if not check_finite:
        return ()
    if backend.reads_are_free(xp):
        if not bool(xp.all(xp.isfinite(stored))):
            raise _non_finite_diagonal()
        return ()
    return (DeferredCheck(~backend.finite_flag(xp, stored), (), _non_finite_diagonal),)


def _non_finite_diagonal() -> Exception:
    return FloatingPointError("the operator's diagonal holds non-finite values (NaN or inf)")


def exact_estimate(
    request: EstimationRequest, quantity: str, info: dict[str, Any] | None = None
) -> Estimate:
    """The exact ``quantity`` (``"trace"`` or ``"diagonal"``) of the request's operator as
    an :class:`~linop_trace.Estimate` of ``method="exact"`` with zero standard error: the
    stored diagonal, or n identity columns through the counted product
    (:func:`exact_diagonal`). ``method="exact"`` is this; a method whose budget covers n
    columns and whose own algebra degrades there (a square sketch) returns it too, with
    ``info`` saying so."""
    xp = request.xp
    diagonal, checks = exact_diagonal(request)
    value, stderr = backend.jit(xp, _with_zero_error, num_static=2)(xp, quantity, diagonal)
    # an exact answer meets any tolerance asked for
    converged = True if request.adaptive else None
    return Estimate(value, stderr, request.columns, "exact", converged, info=info, checks=checks)


def _with_zero_error(xp: Any, quantity: str, diagonal: Any) -> tuple[Any, Any]:
    """The exact ``quantity`` from the diagonal, and its zero standard error (one compiled
    program under JAX: made eagerly, the zeros' fill was shipped from the host)."""
    value = xp.sum(diagonal) if quantity == "trace" else diagonal
    return value, xp.zeros_like(backend.real_part(xp, value))


@backend.register_pytree_dataclass
@dataclass(frozen=True)
class RefineState:
    """What an estimate keeps so that :meth:`~linop_trace.Estimate.refine` continues it
    (in the units of the run's products, before any scale is undone):

    - ``method``: the name of the estimator whose :meth:`Estimator.refine` continues it;
    - ``samples``: the per-probe samples of a sample mean (Hutchinson's trace, Hutch++'s
      residual), ``offset`` the value they are added to (Hutch++: tr(Q^H A Q)),
      ``offset_size`` the size of its rounding (Hutch++: sum_j |q_j^H A q_j|) and
      ``basis`` the sketch they are deflated by (Hutch++: Q);
    - ``sums``: a diagonal's running :class:`~linop_trace._stats.RatioSums`;
    - ``scale``: the power of two the products were multiplied by (``None``: none), and
      ``drawn``: the probe columns drawn from the random stream (set by the run).
    """

    method: str = field(metadata={"static": True})
    samples: Any = None
    sums: Any = None
    offset: Any = None
    offset_size: Any = None
    basis: Any = None
    scale: Any = None
    drawn: int = field(default=0, metadata={"static": True})


class Estimator:
    """Base class of trace and diagonal estimators: the plug-in contract.

    A subclass sets ``name`` and overrides :meth:`trace` and/or :meth:`diagonal`; each
    receives an :class:`EstimationRequest` (never the operator: every product goes through
    ``request.matmat``) and returns an :class:`~linop_trace.Estimate`. It declares:

    - ``min_matvecs``: the smallest budget it works with (checked before it is called);
    - ``supports_tolerance``: whether it honours ``rtol``/``atol`` (else they are refused);
    - ``default_probe``: the probe kind it draws unless the caller names one (a name, or a
      ``{"trace": ..., "diagonal": ...}`` dict); ``probe`` (set by constructors that take
      ``probe=``) fixes the kind whatever the caller asks;
    - ``jit_compatible``: whether its fixed-budget path reads no value on the host, so that
      under JAX the whole estimate compiles into one program (the built-in methods do);
    - :meth:`refine`: continues an estimate it left a :class:`RefineState` on (its
      ``_state``), for :meth:`~linop_trace.Estimate.refine` (by default none);
    - :meth:`uses_exact`: whether a request is computed exactly rather than estimated
      (what :func:`~linop_trace.computes_exactly` answers; by default never);
    - ``unit_scaled``: the quantities for which a fixed-budget estimate gets its products
      scaled by a power of two that brings their largest entry near 1, and its value,
      stderr and every array in its ``info`` scaled back (exactly) at the end; for
      methods that square products, whose squares would overflow or underflow at scales
      a float reaches (beyond about 1e+-19 in float32, 1e+-154 in float64). Only for
      estimators whose value, stderr and ``info`` arrays are linear in A (none by
      default).

    Estimators compare and hash by their type and constructor arguments.

    Examples
    --------
    A trace estimator that uses one Rademacher probe block and no error bar:

    >>> import numpy as np
    >>> from linop_trace import Estimate, Estimator, trace
    >>> class OneBlock(Estimator):
    ...     name = "one-block"
    ...     def trace(self, request):
    ...         xp = request.xp
    ...         Z = request.probes(request.num_matvecs)
    ...         value = xp.sum(Z * request.matmat(Z)) / request.num_matvecs
    ...         return Estimate(value, None, request.columns, self.name)
    >>> est = trace(np.diag([1.0, 2.0, 3.0]), method=OneBlock(), num_matvecs=2, seed=0)
    >>> float(est), est.num_matvecs
    (6.0, 2)
    """

    name: str = "custom"
    min_matvecs: int = 1
    supports_tolerance: bool = False
    default_probe: str | dict[str, str] = "rademacher"
    probe: str | None = None
    jit_compatible: bool = False
    unit_scaled: tuple[str, ...] = ()

    def trace(self, request: EstimationRequest) -> Estimate:
        raise NotImplementedError(f"method {self.name!r} does not estimate traces")

    def diagonal(self, request: EstimationRequest) -> Estimate:
        raise NotImplementedError(f"method {self.name!r} does not estimate diagonals")

    def refine(self, quantity: str, request: EstimationRequest, state: RefineState) -> Estimate:
        """The estimate continued from ``state`` with the request's budget: fixed
        (``request.num_matvecs`` more columns) or, with a tolerance, until it is met within
        ``request.max_matvecs`` more columns. The probes continue the run's random stream.
        """
        raise NotImplementedError(f"method {self.name!r} cannot refine its estimates")

    def uses_exact(self, request: EstimationRequest) -> bool:
        """Whether the estimator computes ``request`` exactly (``method="exact"``'s
        identity walk or stored diagonal) instead of estimating it, decided before any
        product: ``"auto"`` when the budget covers n columns or the diagonal is stored,
        XNysTrace and NA-Hutch++ when the budget covers n columns. By default, never."""
        return False

    def supports(self, quantity: str) -> bool:
        """Whether this estimator overrides ``trace`` or ``diagonal``."""
        own = getattr(type(self), quantity, None)
        return own is not None and own is not getattr(Estimator, quantity)

    def probe_kind(self, quantity: str, requested: str | None) -> str:
        """The probe kind this estimator draws for ``quantity`` when the caller asked for
        ``requested`` (``None``: nothing asked)."""
        if self.probe is not None:
            return self.probe
        if requested is not None:
            return requested
        default = self.default_probe
        return default.get(quantity, "rademacher") if isinstance(default, dict) else default

    def _config(self) -> tuple[Any, ...]:
        return (type(self), tuple(sorted(vars(self).items())))

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        try:
            return isinstance(other, Estimator) and self._config() == other._config()
        except (TypeError, ValueError):  # settings that do not compare (arrays)
            return False

    def __hash__(self) -> int:
        try:
            return hash(self._config())
        except TypeError:  # a plug-in holding unhashable settings: itself only
            return id(self)

    def __repr__(self) -> str:
        arguments = ", ".join(f"{key}={value!r}" for key, value in sorted(vars(self).items()))
        return f"{type(self).__name__}({arguments})"


class ProbeOption(Estimator):
    """An estimator whose constructor may fix the probe kind (``probe=``), overriding the
    ``probe=`` argument of :func:`~linop_trace.trace`; ``None`` keeps the caller's (or the
    estimator's ``default_probe``). The draws come from the request's random source."""

    def __init__(self, probe: str | None = None) -> None:
        self.probe = probe

    def __repr__(self) -> str:
        return f"{type(self).__name__}(probe={self.probe!r})"
