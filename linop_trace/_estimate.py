"""``Estimate``: the result of every trace, diagonal and row-sum computation.

Its arrays stay in the operator's library and on its device. Scalars that only shape the
interval (degrees of freedom, the samples' skewness and kurtosis) and checks that raise
(a non-finite product, an operator that is not what the method needs) are read on the
host only when the user reads the estimate, so computing one never waits for a device.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import _backend as backend

__all__ = [
    "Choice",
    "DeferredCheck",
    "Estimate",
    "chosen_estimate",
    "edgeworth_quantile",
    "shape_statistics",
]


def shape_statistics(samples: Any, xp: Any) -> tuple[Any, Any]:
    """Unbiased sample skewness G1 and excess kurtosis G2 along the first axis, as arrays
    (NaN where the samples have no spread); ``(None, None)`` for complex samples or fewer
    than 4. From a stop-gradient copy: the shape only steers the interval. Under JAX one
    compiled program (eagerly, its twenty operations would each be a dispatch, and each
    compile anew for every sample count of an adaptive run)."""
    return backend.jit(xp, _shape_statistics)(xp, samples)  # type: ignore[no-any-return]


def _shape_statistics(xp: Any, samples: Any) -> tuple[Any, Any]:
    m = int(samples.shape[0])
    if m < 4 or backend.is_complex_dtype(xp, samples.dtype):
        return None, None
    samples = backend.stop_gradient(samples)
    deviation = samples - xp.mean(samples, axis=0)
    # scaled to max |deviation| = 1 first: G1 and G2 are scale-free, and the powers of
    # deviations of 1e80 (or 1e-85, or 1e10 in float32) would overflow (underflow)
    size = xp.max(xp.abs(deviation), axis=0)
    spread = (size > 0) & xp.isfinite(size)
    deviation = deviation / xp.where(spread, size, xp.ones_like(size))
    square = deviation * deviation
    second = xp.mean(square, axis=0)
    spread = spread & (second > 0)
    second = xp.where(spread, second, xp.ones_like(second))
    g1 = xp.mean(square * deviation, axis=0) / (second * xp.sqrt(second))
    g2 = xp.mean(square * square, axis=0) / (second * second) - 3
    skewness = g1 * (math.sqrt(m * (m - 1)) / (m - 2))
    kurtosis = ((m - 1) / ((m - 2) * (m - 3))) * ((m + 1) * g2 + 6)
    nan = xp.full_like(second, math.nan)
    return xp.where(spread, skewness, nan), xp.where(spread, kurtosis, nan)


def edgeworth_quantile(t_quantile: Any, level: float, m: int, skewness: Any, kurtosis: Any) -> Any:
    """Student-t quantile corrected to second order for the samples' shape.

    For the studentized mean T, P(|T| <= x) = 2 Phi(x) - 1 + (2/m) q(x) phi(x) + O(m^-2)
    with q(x) = x [kurtosis (x^2 - 3) / 12 - skewness^2 (x^4 + 2x^2 - 3) / 18 - (x^2 + 3)/4]
    (Hall 1992, The Bootstrap and Edgeworth Expansion, Sec. 2.6). The last term is the
    normal-theory part the t quantile already carries; the shape terms move the quantile
    by ``-x [...] / m``. Never below the normal quantile. Host numbers (floats or NumPy
    arrays); a ``None`` or non-finite shape leaves the t quantile as it is.

    Examples
    --------
    >>> from linop_trace._estimate import edgeworth_quantile
    >>> round(edgeworth_quantile(2.0, 0.95, 60, 2.0, 6.0), 4)  # skewed: a wider interval
    2.1274
    """
    if skewness is None or kurtosis is None:
        return t_quantile
    from scipy import stats

    z = float(stats.norm.ppf(0.5 + level / 2))
    skewness, kurtosis = np.asarray(skewness, dtype=float), np.asarray(kurtosis, dtype=float)
    shape = kurtosis * (z * z - 3) / 12 - skewness**2 * (z**4 + 2 * z * z - 3) / 18
    corrected = np.maximum(t_quantile - z * shape / m, z)
    corrected = np.where(np.isfinite(corrected), corrected, t_quantile)
    return float(corrected) if corrected.ndim == 0 else corrected


@dataclass(frozen=True)
class DeferredCheck:
    """A check of an estimate that needs a value from the device, run when it is read.

    ``failed`` is a 0-d boolean array (True: raise); ``evidence`` holds arrays (0-d, or
    vectors of several numbers) whose values the message needs; ``error(*numbers)``
    builds the exception from their entries, in order.
    """

    failed: Any
    evidence: tuple[Any, ...]
    error: Callable[..., Exception]

    def run(self) -> None:
        """Read the flag (and the evidence) and raise; a no-op for abstract JAX values."""
        if backend.is_tracer(self.failed):
            return  # under jax.jit, grad, vmap: no value to check
        if getattr(self.failed, "ndim", 0):  # a batch of estimates (returned by jax.vmap)
            failing = np.argwhere(np.asarray(backend.to_numpy(self.failed)))
            if not len(failing):
                return
            at = tuple(int(i) for i in failing[0])  # (the first that failed speaks)
            evidence = tuple(x[at] for x in self.evidence)
            replace(self, failed=self.failed[at], evidence=evidence).run()
            return
        if backend.read_bool(self.failed):
            numbers: list[Any] = []
            for x in self.evidence:  # (0-d arrays, or vectors of several numbers)
                if x.ndim == 0:
                    numbers.append(backend.read_float(x))
                else:
                    numbers.extend(backend.concrete_floats(x) or [])
            raise self.error(*numbers)


def _deferred_check(failed: Any, evidence: tuple[Any, ...], error: Any) -> DeferredCheck:
    """``DeferredCheck(failed, evidence, error)`` without the frozen dataclass's
    ``__init__`` (one ``object.__setattr__`` per field): made for every compiled result."""
    check = object.__new__(DeferredCheck)
    check.__dict__.update(failed=failed, evidence=evidence, error=error)
    return check


class EstimateInterrupted(KeyboardInterrupt):
    """A :class:`KeyboardInterrupt` (Ctrl-C) during :func:`~linop_trace.trace` or
    :func:`~linop_trace.diagonal`, carrying what the completed probe blocks give.

    Attributes
    ----------
    partial : Estimate or None
        For Hutchinson's estimators (trace and diagonal, fixed budget or adaptive, and
        ``method="auto"`` when it runs them): the estimate from the probe blocks completed
        before the interrupt, with ``converged=False`` and its interval; ``num_matvecs``
        counts every column spent. ``None`` where the method has no meaningful partial
        result (the sketching methods need all their products) or fewer than two probes
        were done.

    Being a ``KeyboardInterrupt``, it stops a program that does not catch it as Ctrl-C
    always did.
    """

    def __init__(self, partial: Estimate | None = None) -> None:
        self.partial = partial
        if partial is None:
            message = "interrupted; no partial estimate (none for this method, or too few probes)"
        else:
            message = f"interrupted; partial estimate from {partial.num_matvecs} products"
        super().__init__(message)


class Estimate:
    """A value with its standard error and what it cost.

    Attributes
    ----------
    value : array
        In the operator's library: a 0-d array for a trace, a vector for a diagonal or
        row sums. Differentiable where the operator is.
    stderr : array or None
        Standard error of ``value`` (same shape); zeros for exact results, ``None`` where
        the method has no honest error estimate.
    num_matvecs : int
        Columns that passed through the operator (operator applications).
    method : str
        Name of the method that produced the value.
    converged : bool or None
        With ``rtol``/``atol``: whether the interval met the tolerance within the budget.
        ``None`` when no tolerance was asked for.
    dof : int or None
        Degrees of freedom of the Student-t quantile used by :meth:`ci`; ``None`` uses
        the normal quantile.
    skewness, kurtosis : float or None
        Of the samples whose mean ``value`` is, when the interval is shape-corrected
        (Hutchinson-type estimates, see :meth:`quantile`).
    confidence : float
        The level :meth:`ci` and :meth:`quantile` use when not given one: the
        ``confidence`` of the call that made the estimate (0.95 by default).
    info : dict
        Method-specific extras (e.g. the plain XTrace error estimate). Where it holds
        ``"systematic_error"`` (stochastic Lanczos quadrature's estimated quadrature
        error, not random), :meth:`ci` adds it to the half-width.

    Notes
    -----
    On libraries whose arrays live on a device (torch, CuPy, JAX) nothing is read on the
    host while the estimate is computed: ``dof``, ``skewness`` and ``kurtosis`` are read
    when first asked for, and a failed check (a non-finite product with
    ``check_finite=True``, or XNysTrace's evidence that the operator is not positive
    semidefinite) raises when ``value``, ``stderr``, an interval or ``float()`` is first
    read. On NumPy such checks raise at once.

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import trace
    >>> est = trace(np.diag([1.0, 2.0, 3.0]), method="exact")
    >>> float(est), est.num_matvecs, est.ci()
    (6.0, 0, (6.0, 6.0))
    """

    def __init__(
        self,
        value: Any,
        stderr: Any,
        num_matvecs: int,
        method: str,
        converged: bool | None = None,
        dof: Any = None,
        info: dict | None = None,
        *,
        shape_of: Any = None,
        checks: tuple[DeferredCheck, ...] = (),
    ) -> None:
        self._value = value
        self._stderr = stderr
        self.num_matvecs = int(num_matvecs)
        self._method = method
        self.converged = converged
        self._dof = dof
        self._info = {} if info is None else dict(info)
        # a method chosen on the device (method="auto"): name, info, sample shape and
        # refinement state are the chosen estimate's, known when first read
        self._choice: Choice | None = None
        self._shape_of = shape_of
        self._shape: tuple[Any, Any] | None = None
        self._checks = tuple(checks)
        self._verified = False
        self.confidence = 0.95
        # what refine() continues from (set by the estimator) and the continuation itself
        # (set by trace/diagonal): None for estimates that cannot be refined
        self._state: Any = None
        self._resume: Callable[..., Estimate] | None = None
        if self._checks and _reads_are_free(value):
            self._verify()

    # -------------------------------------------------------------- lazy reading
    @property
    def method(self) -> str:
        self._settle()
        return self._method

    @property
    def info(self) -> dict:
        self._settle()
        return self._info

    def _settle(self) -> None:
        """Where the method was chosen on the device (see :class:`Choice`): read the
        choice and take the chosen estimate's name, info, sample shape and refinement
        state (the value, stderr and dof were selected on the device already). Under a
        JAX trace the choice has no value: the name stays the chooser's."""
        choice = self._choice
        first = self._decide()
        if choice is None or first is None:
            return
        if choice.per_member is not None:  # a batch (jax.vmap) whose members differ
            self._choice = None
            self._info["methods"] = np.where(
                choice.per_member, choice.first._method, choice.second._method
            ).tolist()
            self._state = None
            return
        chosen = choice.first if first else choice.second
        if choice.scale is not None:  # (its info's arrays in the units of A)
            chosen = chosen.divided_by(choice.scale)
        self._choice = None
        self._method = chosen._method
        self._info = {**chosen._info, **self._info}
        self._shape_of, self._shape = chosen._shape_of, None
        if chosen._state is None:  # (the state kept is the other's: nothing to refine)
            self._state = None

    def _decide(self) -> bool | None:
        """Whether the first of a :class:`Choice` was chosen, read once (``None``: no
        choice, or a traced one), its notice given then: what reading the value needs,
        before the name and info are settled (when asked for)."""
        choice = self._choice
        if choice is None or backend.is_tracer(choice.first_chosen):
            return None
        if choice.decision is None:
            flag = choice.first_chosen
            if getattr(flag, "ndim", 0):  # a batch of estimates (jax.vmap): a choice each
                flags = np.asarray(backend.to_numpy(flag))
                if flags.all() != flags.any():  # (they differ: the batch keeps its name)
                    choice.per_member = flags
                choice.decision = bool(flags.all())
            else:
                choice.decision = backend.read_bool(flag)
            if not choice.decision and choice.notice is not None:
                choice.notice(self, choice.first, choice.second)
        return choice.decision

    def _verify(self) -> None:
        # the checks first (a chosen estimate's are its products'): a non-finite product
        # is named as such, not by the notice of the choice it spoiled
        if not self._verified:
            for check in self._checks:
                check.run()
            self._verified = True
        self._decide()

    @property
    def value(self) -> Any:
        self._verify()
        return self._poisoned(self._value)

    @property
    def stderr(self) -> Any:
        self._verify()
        return self._poisoned(self._stderr)

    def _poisoned(self, x: Any) -> Any:
        """``x`` read under a JAX trace, NaN where a check failed: the checks raise when an
        Estimate is read outside ``jax.jit``, but a function that returns only the value
        returned garbage (XNysTrace on an indefinite matrix: 5.5e16) without them."""
        if x is None or not self._checks or not backend.is_tracer(x):
            return x
        flags = [check.failed for check in self._checks if backend.is_tracer(check.failed)]
        if not flags:
            return x
        xp = backend.array_namespace(x)
        failed = flags[0] if len(flags) == 1 else xp.any(xp.stack(flags))
        return xp.where(failed, xp.asarray(math.nan, dtype=x.dtype), x)

    @property
    def dof(self) -> int | None:
        return _whole_number(self._dof)

    def _sample_shape(self) -> tuple[Any, Any]:
        """The samples' skewness and kurtosis, computed (on the device) when first asked."""
        self._settle()
        if self._shape is None:
            samples = self._shape_of
            if samples is None:
                self._shape = (None, None)
            else:
                self._shape = shape_statistics(samples, backend.array_namespace(samples))
        return self._shape

    @property
    def skewness(self) -> Any:
        """Skewness of the samples whose mean ``value`` is (``None`` if not such an
        estimate, fewer than 4 or complex samples, or no spread)."""
        return _host_number(self._sample_shape()[0])

    @property
    def kurtosis(self) -> Any:
        """Excess kurtosis of those samples (``None`` as for :attr:`skewness`)."""
        return _host_number(self._sample_shape()[1])

    def divided_by(self, scale: Any) -> Estimate:
        """The estimate of A from one of ``scale * A`` (a 0-d array, a power of two, so
        the division is exact): value, stderr and every floating array of ``info`` (all
        linear in A for the built-in methods) divided; dof and the samples' shape are
        scale-free, and ``info["auto"]``'s predicted variances go by ``scale**2``."""
        xp = backend.array_namespace(scale)
        info = dict(self._info)
        floating = {key: item for key, item in info.items() if _scaled_with(xp, item)}
        predictions = info.get("auto")
        squares = (  # predicted variances: arrays where the choice was made on the device
            {key: item for key, item in predictions.items() if _scaled_with(xp, item)}
            if isinstance(predictions, dict)
            else {}
        )
        # one compiled program under JAX (eagerly, a dispatch per array otherwise)
        value, stderr, scaled, squares = backend.jit(xp, _divided)(
            xp, scale, self._value, self._stderr, floating, squares
        )
        info.update(scaled)
        if isinstance(predictions, dict):
            floats = any(isinstance(item, float) for item in predictions.values())
            factor = backend.read_float(scale) if floats and not backend.is_tracer(scale) else None
            info["auto"] = {
                key: (item / factor / factor if factor and isinstance(item, float) else item)
                for key, item in predictions.items()
            }
            info["auto"].update(squares)
        divided = self._replaced(value=value, stderr=stderr, info=info)
        if self._choice is not None:
            divided._choice = self._choice.divided_by(scale)
        return divided

    def real_part(self) -> Estimate:
        """The estimate of a quantity known to be real (a Hermitian operator's trace or
        diagonal): the real part of the value and of the samples (their imaginary part
        is round-off, or noise of zero mean that the estimator left out of the stderr);
        the stderr, dof and info as they are. The estimate itself where it is real."""
        xp = backend.array_namespace(self._value)
        if not backend.is_complex_dtype(xp, self._value.dtype):
            return self
        samples = self._shape_of
        if samples is not None and backend.is_complex_dtype(xp, samples.dtype):
            samples = backend.real_part(xp, samples)
        real = self._replaced(value=backend.real_part(xp, self._value), shape_of=samples)
        if self._choice is not None:  # (the chosen one's samples give the interval's shape)
            real._choice = self._choice.real_part()
        return real

    def with_checks(
        self, checks: tuple[DeferredCheck, ...], num_matvecs: int, *, first: bool = False
    ) -> Estimate:
        """The same estimate with more checks and the counted ``num_matvecs`` (used by
        :func:`~linop_trace.trace` and :func:`~linop_trace.diagonal` on every result).
        ``first``: the new checks run before the estimate's own (the products' finiteness,
        whose failure makes the others fail too, with a message about a consequence)."""
        combined = tuple(checks) + self._checks if first else self._checks + tuple(checks)
        return self._replaced(num_matvecs=num_matvecs, checks=combined)

    def _replaced(self, **changes: Any) -> Estimate:
        """A new estimate with ``changes`` (``value``, ``stderr``, ``num_matvecs``,
        ``info``, ``shape_of``, ``checks``) and the rest of this one: its method,
        convergence, dof and (:meth:`_carrying`) refinement state, choice and level."""
        fields = {
            "value": self._value,
            "stderr": self._stderr,
            "num_matvecs": self.num_matvecs,
            "info": self._info,
            "shape_of": self._shape_of,
            "checks": self._checks,
        }
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"an Estimate has no field {sorted(unknown)}")
        fields.update(changes)
        return self._carrying(
            Estimate(
                fields["value"],
                fields["stderr"],
                fields["num_matvecs"],
                self._method,
                self.converged,
                self._dof,
                fields["info"],
                shape_of=fields["shape_of"],
                checks=fields["checks"],
            )
        )

    def _carrying(self, other: Estimate) -> Estimate:
        """``other`` with this estimate's refinement state, continuation, choice and
        confidence level."""
        other._state, other._resume, other._choice = self._state, self._resume, self._choice
        other.confidence = self.confidence
        return other

    # ------------------------------------------------------------------ refinement
    def refine(
        self,
        A: Any,
        num_matvecs: int | None = None,
        *,
        rtol: float | None = None,
        atol: float | None = None,
        max_matvecs: int | None = None,
    ) -> Estimate:
        """This estimate continued with more probes, without redoing the products it has.

        The new probes continue the random stream of the run. For Hutchinson's trace and
        diagonal the result is the estimate that one run of the total budget with the
        same seed gives, to rounding (a BLAS may round a narrower product differently:
        OpenBLAS's SkylakeX kernel differs by about 5e-15 relative below 20 columns;
        torch on CUDA and CuPy draw probes by the block, see ``docs/backends.rst``).
        Hutch++ keeps its sketch and adds residual probes: one run of the total budget
        would size its sketch for that budget instead. This estimate is left as it is;
        refine it again for the same result.

        Hutchinson's trace and diagonal estimates refine (``method="auto"`` ones too, when
        it ran Hutchinson), fixed or adaptive, and Hutch++'s residual phase (its sketch
        stays). Other methods raise ``ValueError``: their probes enter a sketch or a
        factorization whose size is fixed by the budget, so more probes mean a new run.

        Parameters
        ----------
        A : operator
            The operator this estimate is of: the same shape, library, dtype and device
            (its products are not checked against the first run's).
        num_matvecs : int, optional
            Spend exactly this many more products.
        rtol, atol : float, optional
            Instead, add probe blocks (doubling the probes so far, as an adaptive run does)
            until the interval meets ``max(atol, rtol * |value|)``.
        max_matvecs : int, optional
            With a tolerance: the most products in all, this estimate's included (default
            ``max(1000, 2 * num_matvecs)``).

        Examples
        --------
        >>> import numpy as np
        >>> from linop_trace import trace
        >>> A = np.diag(np.arange(1.0, 101.0))
        >>> first = trace(A, method="hutchinson", num_matvecs=40, seed=0)
        >>> more = first.refine(A, num_matvecs=60)
        >>> whole = trace(A, method="hutchinson", num_matvecs=100, seed=0)
        >>> more.num_matvecs, float(more) == float(whole)
        (100, True)
        """
        self._settle()
        if self._resume is None and self._state is not None:  # (rebuilt from its arrays)
            raise ValueError(
                f"this {self.method!r} estimate came out of a JAX transformation (jax.jit, "
                "jax.vmap) or was rebuilt from its arrays, which keep the samples but not "
                "the operator's probe stream; run the estimate eagerly to refine it, or "
                "run it again with a larger num_matvecs"
            )
        if self._resume is None or self._state is None:
            raise ValueError(
                f"a {self.method!r} estimate cannot be refined: only Hutchinson's trace and "
                "diagonal estimates (method='hutchinson', or 'auto' when it ran Hutchinson) "
                "and Hutch++'s residual phase keep what refining needs; run the method "
                "again with a larger num_matvecs"
            )
        try:
            refined = self._resume(A, num_matvecs, rtol, atol, max_matvecs, self._state)
        except EstimateInterrupted as interrupted:  # (its partial at this level too)
            if interrupted.partial is not None:
                interrupted.partial.confidence = self.confidence
            raise
        refined.confidence = self.confidence
        return refined

    # ------------------------------------------------------------------ intervals
    def quantile(self, level: float | None = None) -> Any:
        """The two-sided quantile that :meth:`ci` multiplies the standard error by, at
        ``level`` (by default :attr:`confidence`, the level the estimate was asked for).

        Student-t with ``dof`` degrees of freedom (normal without), corrected to second
        order for the samples' skewness and kurtosis where the estimate carries them
        (:func:`~linop_trace._stats.edgeworth_quantile`). A float, or a NumPy
        array for an estimate whose entries have shapes of their own.
        """
        if level is None:
            level = self.confidence
        if not 0 < level < 1:
            raise ValueError(f"confidence level must lie in (0, 1), got {level}")
        from scipy import stats

        tail = 0.5 + level / 2
        if backend.is_tracer(self._dof) or any(
            backend.is_tracer(x) for x in self._sample_shape() if x is not None
        ):
            raise ValueError(
                "the interval's quantile needs the estimate's degrees of freedom and its "
                "samples' shape as numbers, which a JAX transformation (jax.jit, jax.vmap) "
                "does not have: return the Estimate from the transformed function and "
                "call ci() or quantile() on it outside"
            )
        dof = self.dof
        if dof is None:
            return float(stats.norm.ppf(tail))
        base = float(stats.t.ppf(tail, dof))
        skewness, kurtosis = self.skewness, self.kurtosis
        if skewness is None or kurtosis is None:
            return base
        return edgeworth_quantile(base, level, dof + 1, skewness, kurtosis)

    def ci(self, level: float | None = None) -> tuple[Any, Any]:
        """The ``level`` confidence interval ``(low, high)`` from ``stderr`` (plus
        ``info["systematic_error"]`` where the method reports one); by default at
        :attr:`confidence`, the level the estimate was asked for (``trace(...,
        confidence=0.99)`` gives a 99% interval, as its tolerance was met at 99%).

        Scalars come back as Python floats, vectors as arrays of the value's library.
        """
        stderr = self.stderr
        if stderr is None:
            raise ValueError(f"method {self.method!r} reports no error estimate, so no interval")
        value = self.value
        xp = backend.array_namespace(value)
        if backend.is_complex_dtype(xp, value.dtype):
            raise ValueError("a confidence interval needs a real value; this estimate is complex")
        # intervals are reported, not differentiated: detach before leaving the library
        value = backend.stop_gradient(value)
        quantile = self.quantile(level)
        if not isinstance(quantile, float):
            quantile = xp.asarray(quantile, dtype=stderr.dtype, device=backend.device_of(stderr))
        half_width = quantile * backend.stop_gradient(stderr)
        systematic = self.info.get("systematic_error")
        if systematic is not None:  # a bias bound (SLQ's quadrature error) widens it
            half_width = half_width + backend.stop_gradient(systematic)
        low, high = value - half_width, value + half_width
        if value.ndim == 0:
            return float(low), float(high)
        return low, high

    # ------------------------------------------------------------------- numbers
    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        """``np.asarray(estimate)``: the value as a NumPy array, where its library can
        give one without a device copy (NumPy, and torch and JAX on the CPU; torch and
        CuPy refuse GPU arrays, as they do for their own arrays: move the value with the
        library first). The standard error stays in ``stderr``."""
        value = self.value
        if copy:
            return np.array(value, dtype=dtype, copy=True)
        return np.asarray(value, dtype=dtype)

    def __float__(self) -> float:
        value = backend.stop_gradient(self.value)
        if backend.is_complex_dtype(backend.array_namespace(value), value.dtype):
            # (NumPy dropped the imaginary part with a warning, torch spoke of overflow)
            raise TypeError(
                "float() of a complex estimate: use complex(estimate), or the real part "
                "of its value"
            )
        return float(value)

    def __complex__(self) -> complex:
        return complex(backend.stop_gradient(self.value))

    # ------------------------------------------------------------ copies and pickles
    def __getstate__(self) -> dict[str, Any]:
        """The estimate's state for ``pickle``: its checks run (a failed one raises here,
        as reading the value would) and a choice made on the device read first; without
        the continuation that :meth:`refine` needs (it holds the run's probe stream), so
        an unpickled estimate is not refinable."""
        self._verify()
        self._settle()
        state = dict(self.__dict__)
        state.update(_resume=None, _checks=(), _choice=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __copy__(self) -> Estimate:
        """A shallow copy, refinable as this estimate is (nothing is run or read)."""
        duplicate = type(self).__new__(type(self))
        duplicate.__dict__.update(self.__dict__)
        return duplicate

    def __deepcopy__(self, memo: dict[int, Any]) -> Estimate:
        """A deep copy that refines as this estimate does (it shares the continuation,
        which leaves the estimate it refines as it is)."""
        duplicate = type(self).__new__(type(self))
        memo[id(self)] = duplicate
        duplicate.__dict__.update(copy.deepcopy(self.__getstate__(), memo))
        duplicate._resume = self._resume
        return duplicate

    def __repr__(self) -> str:
        def short(x: Any) -> str:
            if x is None:
                return "None"
            if getattr(x, "ndim", 1) == 0:
                if backend.is_tracer(x):
                    return repr(x)
                return (
                    f"{complex(x):.6g}"
                    if backend.is_complex_dtype(backend.array_namespace(x), x.dtype)
                    else f"{float(backend.stop_gradient(x)):.6g}"
                )
            return f"<{backend.library_name(x)} array of shape {tuple(x.shape)}>"

        conv = "" if self.converged is None else f", converged={self.converged}"
        return (
            f"Estimate(value={short(self.value)}, stderr={short(self.stderr)}, "
            f"num_matvecs={self.num_matvecs}, method={self.method!r}{conv})"
        )

    # ---------------------------------------------------- JAX pytree (compiled runs)
    def _tree_flatten(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        # the children: the arrays, and what stands where the tree this Estimate was
        # rebuilt from had arrays (its layout), so that a tree rebuilt from other leaves
        # (JAX 0.6's vmap rebuilds its output from placeholders; a user's tree_map to
        # numbers) keeps its structure
        dof_was_child, (array_keys, nested_keys) = self.__dict__.get("_layout", _NO_LAYOUT)
        was_child: set[tuple[str, ...]] = {(key,) for key in array_keys}
        was_child.update((key, name) for key, names, _ in nested_keys for name in names)
        is_array = backend.is_array_like

        def child(item: Any, path: tuple[str, ...]) -> bool:
            return path in was_child or is_array(item)

        arrays = {key: item for key, item in self._info.items() if child(item, (key,))}
        # dicts of arrays (auto's predicted variances, made on the device): their arrays
        # are children too (in the static part they leaked tracers out of a program)
        nested = {
            key: [name for name, part in item.items() if child(part, (key, name))]
            for key, item in self._info.items()
            if isinstance(item, dict) and key not in arrays
        }
        nested = {key: names for key, names in nested.items() if names}
        static = tuple(
            (key, item)
            for key, item in self._info.items()
            if key not in arrays and key not in nested
        )
        nested_keys = tuple(
            (
                key,
                tuple(names),
                _Static(tuple((n, p) for n, p in self._info[key].items() if n not in names)),
            )
            for key, names in nested.items()
        )
        dof_child = dof_was_child or is_array(self._dof)
        children = (
            self._value,
            self._stderr,
            self._dof if dof_child else None,
            self._shape_of,
            tuple(arrays.values()),
            tuple(tuple(self._info[key][name] for name in names) for key, names in nested.items()),
            tuple((check.failed, check.evidence) for check in self._checks),
            self._state,
            self._choice,
        )
        aux = (
            self.num_matvecs,
            self._method,
            self.converged,
            None if dof_child else self._dof,
            (tuple(arrays), nested_keys),
            _Static(static),
            tuple(check.error for check in self._checks),
            self.confidence,
        )
        return children, aux

    @classmethod
    def _tree_unflatten(cls, aux: tuple[Any, ...], children: tuple[Any, ...]) -> Estimate:
        # every compiled estimate's result comes through here, 7 us of a 250 us estimate
        # at n = 512 when built field by field: the fields the structure fixes are made
        # once per structure (its aux, the same object at every call of a program) and
        # copied; the info dict is built only from the parts it has
        value, stderr, dof, shape_of, arrays, nested, checks, state, choice = children
        static = aux[5]
        fixed = static.fields
        if fixed is None or fixed["_layout"][0] != (dof is not None):
            fixed = static.fields = _fixed_fields(aux, dof is not None)
        info = dict(static.info)
        array_keys, nested_keys = aux[4]
        if array_keys:
            info.update(zip(array_keys, arrays))
        for (key, names, rest), parts in zip(nested_keys, nested):
            info[key] = {**dict(rest.items), **dict(zip(names, parts))}
        errors = aux[6]
        made: tuple[DeferredCheck, ...]
        if len(errors) == 1:
            ((failed, evidence),) = checks
            made = (_deferred_check(failed, evidence, errors[0]),)
        else:
            made = tuple(
                _deferred_check(failed, evidence, error)
                for (failed, evidence), error in zip(checks, errors)
            )
        estimate = cls.__new__(cls)
        fields = estimate.__dict__
        fields.update(fixed)
        fields["_value"] = value
        fields["_stderr"] = stderr
        if dof is not None:
            fields["_dof"] = dof
        fields["_info"] = info
        fields["_choice"] = choice
        fields["_shape_of"] = shape_of
        fields["_checks"] = made
        fields["_state"] = state
        return estimate


def _fixed_fields(aux: tuple[Any, ...], dof_is_child: bool) -> dict[str, Any]:
    """The fields of an Estimate rebuilt from a tree with this ``aux`` that its leaves do
    not give (see :meth:`Estimate._tree_unflatten`)."""
    num_matvecs, method, converged, static_dof, keys, _, _, confidence = aux
    return {
        "num_matvecs": num_matvecs,
        "_method": method,
        "converged": converged,
        "_dof": static_dof,
        "_shape": None,
        "_verified": False,
        "confidence": confidence,
        "_resume": None,
        "_layout": (dof_is_child, keys),
    }


#: The layout of an Estimate not rebuilt from a tree (whether its dof was a child, and
#: the info keys that were, as in the tree's aux): only its arrays are children.
_NO_LAYOUT: tuple[bool, Any] = (False, ((), ()))


class Choice:
    """Which of two estimates of one run a method chose on the device (``method="auto"``
    on torch, JAX and CuPy, where reading the deciding numbers would make the run wait):
    ``first`` where the 0-d boolean array ``first_chosen`` is true, else ``second``.

    The estimate that carries it (:func:`chosen_estimate`) has the chosen value, stderr
    and dof (selected on the device); its ``method``, ``info``, sample shape and
    refinement state are the chosen one's, read when first asked for, as its checks are.
    ``notice(estimate, first, second)``, when given, runs then if ``second`` was chosen:
    it may warn, or raise what the first's checks raise. ``scale``: the power of two the
    two estimates' products were multiplied by (a 0-d array; ``None``: none), undone in
    the chosen one when it is read (one division, not two, while the run goes on)."""

    def __init__(
        self,
        first_chosen: Any,
        first: Estimate,
        second: Estimate,
        notice: Callable[[Estimate, Estimate, Estimate], None] | None = None,
        scale: Any = None,
    ) -> None:
        self.first_chosen = first_chosen
        self.first, self.second = first, second
        self.notice = notice
        self.scale = scale
        #: The choice read on the host (``None``: not yet; for a batch of estimates that
        #: chose differently, False, and ``per_member`` holds each member's choice).
        self.decision: bool | None = None
        self.per_member: np.ndarray | None = None

    def real_part(self) -> Choice:
        """The same choice between the real parts of the two estimates."""
        return Choice(
            self.first_chosen,
            self.first.real_part(),
            self.second.real_part(),
            self.notice,
            self.scale,
        )

    def divided_by(self, scale: Any) -> Choice:
        """The same choice between the two estimates of A from those of ``scale * A``."""
        total = scale if self.scale is None else self.scale * scale
        return Choice(self.first_chosen, self.first, self.second, self.notice, total)

    def _tree_flatten(self) -> tuple[tuple[Any, ...], Any]:
        return (self.first_chosen, self.first, self.second, self.scale), self.notice

    @classmethod
    def _tree_unflatten(cls, notice: Any, children: tuple[Any, ...]) -> Choice:
        first_chosen, first, second, scale = children
        return cls(first_chosen, first, second, notice, scale)


backend.register_pytree(Choice, Choice._tree_flatten, Choice._tree_unflatten)


def chosen_estimate(
    first_chosen: Any,
    first: Estimate,
    second: Estimate,
    info: dict[str, Any] | None = None,
    notice: Callable[[Estimate, Estimate, Estimate], None] | None = None,
    method: str = "auto",
) -> Estimate:
    """The estimate of a run that chose between ``first`` and ``second`` on the device
    (see :class:`Choice`): no read on the host. Its value, stderr and dof are selected
    where the arrays live; ``info`` holds what both share (added to the chosen one's);
    ``method`` names the chooser until the choice is read (and under a JAX trace). The
    two estimates' own checks are not kept: the choice, and ``notice``, stand for them.
    The refinement state kept is the one estimate's that has one."""
    xp = backend.array_namespace(first._value)
    static = tuple(None if backend.is_array_like(e._dof) else e._dof for e in (first, second))
    arrays = tuple(e._dof if backend.is_array_like(e._dof) else None for e in (first, second))
    value, stderr, dof = backend.jit(xp, _selected, num_static=2)(
        xp,
        static,
        first_chosen,
        (first._value, second._value),
        (first._stderr, second._stderr),
        arrays,
    )
    estimate = Estimate(
        value, stderr, max(first.num_matvecs, second.num_matvecs), method, dof=dof, info=info
    )
    estimate._choice = Choice(first_chosen, first, second, notice)
    estimate._state = first._state if first._state is not None else second._state
    return estimate


def _selected(
    xp: Any,
    static_dofs: tuple[Any, Any],
    first_chosen: Any,
    values: tuple[Any, Any],
    stderrs: tuple[Any, Any],
    dofs: tuple[Any, Any],
) -> tuple[Any, Any, Any]:
    """Value, stderr and dof of the chosen estimate; a missing stderr or dof is NaN (the
    dof then reads as ``None``: the normal quantile)."""
    value = xp.where(first_chosen, values[0], values[1])
    real = backend.real_dtype_for(xp, value.dtype)
    device = backend.device_of(value)

    def filled(x: Any, number: Any, shape: tuple[int, ...]) -> Any:
        if x is not None:
            return xp.astype(x, real)
        number = math.nan if number is None else float(number)
        return xp.full(shape, number, dtype=real, device=device)

    stderr = None
    if stderrs[0] is not None or stderrs[1] is not None:
        pair = [filled(x, None, value.shape) for x in stderrs]
        stderr = xp.where(first_chosen, pair[0], pair[1])
    pair = [filled(x, number, ()) for x, number in zip(dofs, static_dofs)]
    return value, stderr, xp.where(first_chosen, pair[0], pair[1])


class _Static:
    """Static (non-array) info entries: equal when their items are."""

    def __init__(self, items: tuple[tuple[str, Any], ...]) -> None:
        self.items = items
        self.info = dict(items)
        #: The fixed fields of the Estimates rebuilt with the aux that holds this (made
        #: at the first, :func:`_fixed_fields`).
        self.fields: dict[str, Any] | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Static) and repr(self.items) == repr(other.items)

    def __hash__(self) -> int:
        return hash(repr(self.items))


backend.register_pytree(Estimate, Estimate._tree_flatten, Estimate._tree_unflatten)


def _reads_are_free(value: Any) -> bool:
    try:
        return backend.reads_are_free(backend.array_namespace(value))
    except TypeError:
        return True


def _host_number(x: Any) -> Any:
    """A float (or NumPy array for vectors) of a device scalar; ``None`` for ``None``, a
    traced value or a NaN scalar (no shape to correct for)."""
    if x is None:
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if backend.is_tracer(x):
        return None
    if getattr(x, "ndim", 0) == 0:
        number = float(backend.stop_gradient(x))
        return number if math.isfinite(number) else None
    return backend.to_numpy(backend.stop_gradient(x))


def _whole_number(x: Any) -> int | None:
    if x is None:
        return None
    if isinstance(x, int):
        return x
    if backend.is_tracer(x):
        return None
    value = float(backend.stop_gradient(x))
    return int(math.floor(value)) if math.isfinite(value) else None


def _scaled_with(xp: Any, x: Any) -> bool:
    """Whether ``x``, an item of an estimate's ``info``, is a floating array (or NumPy's 0-d
    result) of the library ``xp`` that :meth:`Estimate.divided_by` divides."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or not hasattr(x, "shape"):
        return False
    if backend.compiles_estimates(xp) and not backend.is_jax_array(x):
        return False  # (a NumPy number in a JAX estimate's info stays as it is)
    return bool(xp.isdtype(dtype, ("real floating", "complex floating")))


def _divided(
    xp: Any,
    scale: Any,
    value: Any,
    stderr: Any,
    floating: dict[str, Any],
    squares: dict[str, Any],
) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """``value``, ``stderr`` (or ``None``) and the arrays of ``floating`` over ``scale`` (a
    power of two: multiplied by its inverse, computed once per real dtype, exactly), and
    those of ``squares`` (variances) over its square."""
    inverses: dict[Any, Any] = {}

    def down(x: Any) -> Any:
        real = backend.real_dtype_for(xp, x.dtype)
        if real not in inverses:
            inverses[real] = 1 / xp.astype(scale, real)
        inverse = inverses[real]
        if inverse.ndim:  # a batch of estimates (jax.vmap): a scale per member, leading
            inverse = xp.reshape(inverse, inverse.shape + (1,) * (x.ndim - inverse.ndim))
        return x * inverse

    return (
        down(value),
        None if stderr is None else down(stderr),
        {key: down(item) for key, item in floating.items()},
        {key: down(down(item)) for key, item in squares.items()},
    )
