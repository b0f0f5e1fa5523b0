"""The statistics every estimate reports with: means, standard errors, interval shapes and
degrees of freedom, all computed where the samples live (no value is read on the host).

Below the estimators, the autodiff operators and the functions layer, which all import it;
it imports only the backend and the :class:`~linop_trace.Estimate`.

- :func:`sample_mean`: the mean of i.i.d. samples, its standard error, and the skewness
  and kurtosis that correct its t-interval (Hutchinson, Hutch++'s residual samples,
  Frobenius norms, divergences).
- :class:`RatioSums`: Bekas et al.'s entrywise ratio estimator ``sum y / sum x`` and its
  standard error from running sums, O(n) memory however many probe blocks.
- :func:`exchangeable_error`: the cross-jackknife error of exchangeable estimates (XTrace,
  XNysTrace), corrected to second order (:func:`second_order_sum`), and its Satterthwaite
  degrees of freedom; :func:`entrywise_exchangeable_error` the same entry by entry (XDiag).
- :func:`edgeworth_quantile`: the shape-corrected t quantile, evaluated on the host when an
  interval is asked for.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import _backend as backend
from ._estimate import Estimate, edgeworth_quantile, shape_statistics

__all__ = [
    "ERROR_PROBES",
    "ExchangeableError",
    "RatioSums",
    "SampleMean",
    "edgeworth_quantile",
    "entrywise_exchangeable_error",
    "exchangeable_error",
    "exchangeable_estimate",
    "low_rank_rounding_size",
    "mean_and_stderr",
    "median_dof",
    "rounding_factor",
    "rounding_floor",
    "sample_mean",
    "second_order_products",
    "second_order_sum",
    "shape_statistics",
    "with_rounding",
]
# (edgeworth_quantile and shape_statistics live with the Estimate, whose intervals they
# shape; they are re-exported here with the rest of the statistics)

#: Entries per row chunk of the ratio sums on a CPU (their temporaries stay in cache).
ROW_CHUNK_ENTRIES = 2**18

#: Probes an exchangeable estimate needs for an error estimate. With two, both
#: leave-one-out estimates are one symmetric function of the pair on every diagonal
#: operator under Rademacher probes (XDiag's d^(1) = d^(2), XTrace's t_1 = t_2 on c I), so
#: their spread is 0 while the error is of order 1 / sqrt(n): no stderr (None) then.
ERROR_PROBES = 3


# ------------------------------------------------------------------ sample means
@backend.register_pytree_dataclass
@dataclass(frozen=True)
class SampleMean:
    """The mean of m i.i.d. samples (along the first axis) and what its interval needs.

    ``value`` is ``offset + mean``; ``stderr`` is ``std(ddof=1) / sqrt(m)`` (``None`` for
    m < 2). The samples' skewness and kurtosis, which correct the t-interval, are computed
    from ``samples`` only when an interval is asked for (:meth:`shape`).
    """

    value: Any
    stderr: Any
    count: int = field(metadata={"static": True})
    samples: Any

    def shape(self, xp: Any) -> tuple[Any, Any]:
        """Skewness and excess kurtosis of the samples (:func:`shape_statistics`)."""
        return shape_statistics(self.samples, xp)

    @property
    def dof(self) -> int | None:
        return self.count - 1 if self.count >= 2 else None

    def estimate(
        self,
        num_matvecs: int,
        method: str,
        converged: bool | None = None,
        info: dict[str, Any] | None = None,
    ) -> Estimate:
        """The :class:`~linop_trace.Estimate`: a t-interval with m - 1 degrees of freedom,
        shape-corrected (:func:`edgeworth_quantile`); ``info["samples"]`` the samples."""
        return Estimate(
            self.value,
            self.stderr,
            num_matvecs,
            method,
            converged=converged,
            dof=self.dof,
            info={"samples": self.samples, **(info or {})},
            shape_of=self.samples,
        )


def sample_mean(
    samples: Any, xp: Any, offset: Any = None, terms: int = 0, offset_size: Any = None
) -> SampleMean:
    """:class:`SampleMean` of ``samples`` (shape (m,) or (m, B): B means at once).

    ``terms``: how many products each sample sums (n for a quadratic form z^H A z); with
    it the standard error is kept from falling below the samples' rounding
    (:func:`mean_and_stderr`), which ``offset_size`` (the sum of the moduli of the terms
    the ``offset`` was summed from) adds to."""
    mean, stderr = mean_and_stderr(samples, xp, terms, offset_size)
    return SampleMean(
        mean if offset is None else offset + mean, stderr, int(samples.shape[0]), samples
    )


def mean_and_stderr(
    samples: Any, xp: Any, terms: int = 0, offset_size: Any = None
) -> tuple[Any, Any]:
    """Mean along the first axis and its standard error std(ddof=1)/sqrt(m) (complex: of
    |s - mean|); the stderr is ``None`` for fewer than two samples. Under JAX one compiled
    program: eager, its eight operations cost 0.1 ms, a third of a product at n = 512.

    With ``terms`` (each sample a sum of that many products) the standard error has a
    floor for the value's rounding (:func:`rounding_floor`): the samples' own, of size
    ``|mean|`` (where they do not spread, the one case where the floor matters, that is
    every sample's size), and all of a shared part's, of size ``offset_size`` (the sum of
    the moduli of the terms an ``offset`` was summed from: Hutch++'s low-rank trace)."""
    if offset_size is None:
        return backend.jit(xp, _mean_and_stderr, num_static=2)(xp, terms, samples)
    return backend.jit(xp, _mean_and_stderr, num_static=2)(xp, terms, samples, offset_size)


#: The block length of the rounding model: BLAS dot products and sums add in blocks
#: (SIMD lanes, unrolled accumulators), whose error grows as sqrt(b) + sqrt(n / b).
ROUNDING_BLOCK = 32


def rounding_floor(
    xp: Any, stderr: Any, factor: float, count: int, varying: Any = None, common: Any = None
) -> Any:
    """``stderr`` with the rounding that its samples' spread cannot show, added in
    quadrature (entry by entry; every input but ``stderr`` is a constant to the gradient).

    A value summed from ``n`` rounded terms of total modulus ``size`` is off by about
    ``eps (sqrt(b) + sqrt(n / b)) size`` (blocked summation with blocks of
    b = :data:`ROUNDING_BLOCK`: BLAS dot products and sums add in SIMD lanes and unrolled
    accumulators; Higham and Mary's probabilistic error analysis), that is ``factor size``
    with ``factor`` from :func:`rounding_factor`. Two parts:

    - ``common``: the size of a part every sample shares, computed once (Hutch++'s
      low-rank trace, XTrace's tr(Q^H A Q), Diag++'s and XDiag's low-rank diagonals):
      its rounding is in no spread, and all of it is added;
    - ``varying``: the size of each sample. Rounding that differs from sample to sample
      is part of their spread ``s = stderr sqrt(count)`` already; what they share is at
      most ``r - s`` (r = ``factor varying``), and ``max(r - s, 0)`` is added.

    It matters only where the samples cannot spread: Rademacher probes of a diagonal
    matrix (every sample is the same rounded sum) or a sketch that captures A (Hutch++ of
    full rank, XTrace below its rank: the samples or leave-one-out estimates agree but
    for rounding), where intervals a few ulps wide missed. Where the samples spread
    (float32 on a large operator included) it changes nothing. Measured rounding of
    NumPy's column sums on a diagonal matrix: up to 1.8, 3.3, 24 and 157 eps |sum| at
    n = 200, 10^4, 10^5 and 10^6, against the model's 8, 23, 62 and 182; torch's sums
    were exact there. Its blind spot: terms that cancel (a traceless diagonal matrix),
    whose rounding is that of their moduli, not of their sum."""
    hidden = None
    if varying is not None:
        spread = backend.stop_gradient(stderr) * math.sqrt(count)
        hidden = backend.positive_part(xp, backend.stop_gradient(varying) * factor - spread)
    if common is not None:
        shared = backend.stop_gradient(common) * factor
        hidden = shared if hidden is None else hidden + shared
    if hidden is None:
        return stderr
    floored = backend.hypot(xp, stderr, hidden)
    # (NumPy 1.x: a float32 scalar times a Python float is float64)
    return floored if floored.dtype == stderr.dtype else xp.astype(floored, stderr.dtype)


def low_rank_rounding_size(xp: Any, basis: Any, image: Any) -> Any:
    """Entry k: ``|Q_k,:| |W_k,:|``, the scale of the rounding of a low-rank diagonal
    ``sum_l conj(Q_kl) W_kl`` (W = A^H Q). Not ``sum_l |Q_kl W_kl|``: each W_kl is itself
    a rounded sum, off by about eps |A_k,:| |q_l| whatever its size (a W_kl of a column
    outside range(A), for a sketch wider than the rank, is rounding alone); where the
    sketch captures A, ``|W_k,:|`` is ``|A_k,:|``. Nor ``|W_k,:|`` alone (``|Q_k,:|`` <= 1):
    a basis spread over the entries has ``|Q_k,:|`` near sqrt(s / n), and the floor was
    then that much too large, 2.8 times a float32 Diag++ stderr at n = 30000 (found by a
    review)."""
    return xp.sqrt(
        xp.sum(backend.abs2(xp, basis), axis=1) * xp.sum(backend.abs2(xp, image), axis=1)
    )


def with_rounding(stderr: Any, size: Any, terms: int, xp: Any) -> Any:
    """:func:`rounding_floor` of an entrywise ``stderr`` for a common part summed from
    ``terms`` products of total modulus ``size`` (Diag++'s and XDiag's exact low-rank
    diagonals). ``None`` stays ``None`` (no error bar)."""
    if stderr is None:
        return None
    return backend.jit(xp, _with_rounding, num_static=2)(xp, terms, stderr, size)


def _with_rounding(xp: Any, terms: int, stderr: Any, size: Any) -> Any:
    factor = rounding_factor(xp, stderr.dtype, terms)
    return rounding_floor(xp, stderr, factor, 1, common=size)


@functools.lru_cache(maxsize=64)
def rounding_factor(xp: Any, dtype: Any, terms: int) -> float:
    """``eps (sqrt(b) + sqrt(terms / b))`` for ``dtype``'s precision: the rounding of a sum
    of ``terms`` terms relative to their total modulus (:func:`rounding_floor`). Looked up
    once: on NumPy a ``finfo`` costs as much as the floor's array operations."""
    eps = float(xp.finfo(backend.real_dtype_for(xp, dtype)).eps)
    return eps * (math.sqrt(ROUNDING_BLOCK) + math.sqrt(terms / ROUNDING_BLOCK))


def _mean_and_stderr(xp: Any, terms: int, samples: Any, offset_size: Any = None) -> tuple[Any, Any]:
    m = samples.shape[0]
    # each sample over m before the sum: a mean that fits never overflows on the way (20
    # float32 samples of 5e37 sum to 1e39, past the largest float32)
    mean = xp.sum(samples / m, axis=0)
    if m < 2:
        return mean, None
    # deviations over their largest (a constant to the gradient): squares of samples of
    # 1e160 (Frobenius norms of entries 1e80) neither overflow nor underflow
    deviation, size = backend.divide_by_largest(
        xp, samples - mean, axis=0 if samples.ndim > 1 else None
    )
    # (a plain sum of squares, not vector_norm: NumPy 2.5's vector_norm is a dot product,
    # whose rounding depends on the array's alignment, and the NumPy estimate of a trace is
    # the same to the bit whatever the block size)
    stderr = size * xp.sqrt(xp.sum(backend.abs2(xp, deviation), axis=0) * (1.0 / ((m - 1) * m)))
    if terms:
        factor = rounding_factor(xp, samples.dtype, terms)
        stderr = rounding_floor(xp, stderr, factor, m, xp.abs(mean), offset_size)
    real = backend.real_dtype_for(xp, samples.dtype)
    if stderr.dtype != real:  # NumPy 1.x: a float32 scalar over an int is float64
        stderr = xp.astype(xp.asarray(stderr), real)
    return mean, stderr


# -------------------------------------------------------------- ratio estimator
class RatioSums:
    """Bekas et al.'s entrywise ratio estimator from running sums (O(n) state).

        d_i ~ sum_j y_ji / sum_j x_ji,   y = conj(z) * (A z),  x = |z|^2,

    and the ratio estimator's standard error

        se_i = sqrt(sum_j |y_ji - d_i x_ji|^2 / x_ji / ((k - 1) sum_j x_ji))

    (for x = 1: the sample std over sqrt(k)). For Gaussian probes it is exact: given the
    i-th entries z_ji, y_ji = a_ii x_ji + z_ji w_j with w_j = sum_{l != i} a_il z_jl
    independent N(0, s^2), a regression through the origin with Var(y | x) = s^2 x, whose
    t-statistic (d_i - a_ii) / se_i is Student-t with k - 1 degrees of freedom. The
    delta method's sqrt(sum |y - d x|^2 / (k - 1)) sqrt(k) / sum x, used before, weighs
    every residual alike: its 95% intervals covered 0.87 of Gaussian diagonals at k = 5,
    0.90 at k = 10 (n = 40, 400 seeds), against 0.95 for Rademacher probes. A probe with
    x_ji = 0 (y_ji = 0 then) adds nothing to the residual sum.

    The residual sum is kept about a shift c (the first block's estimate): with u = y - c x
    and delta = d - c, sum |y - d x|^2 / x = sum |u|^2 / x - 2 Re(conj(delta) sum u) +
    |delta|^2 sum x, which loses nothing to cancellation while delta is small, and is the
    two-pass sum exactly when all probes came in one block (delta = 0). Unit-modulus
    probes (Rademacher, Steinhaus: x = 1) keep no x sums (``denominators=None``).
    """

    def __init__(self, xp: Any, real: bool = False) -> None:
        self.xp = xp
        self.count = 0
        self.shift: Any = None
        self.unit_modulus = True
        #: Keep the real part of the numerators y: for a Hermitian operator, whose
        #: diagonal is real, the imaginary part of y is noise of zero mean (the estimate
        #: and its stderr are then those of the real part).
        self.real = real
        # sums over the probes, per entry: u, |u|^2 (general probes: |u|^2 / x), and x
        self.u: Any = None
        self.uu: Any = None
        self.x: Any = None

    def __getstate__(self) -> dict[str, Any]:
        """Without the namespace (a module: neither pickled nor deep-copied), which the
        sums' arrays give back (:meth:`__setstate__`)."""
        return {**self.__dict__, "xp": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.u is not None:
            self.xp = backend.array_namespace(self.u)

    def add(self, numerators: Any, denominators: Any | None) -> None:
        """One block: ``numerators`` y and ``denominators`` x, both (n, k) (x ``None``: ones)."""
        if self.real:
            numerators = backend.real_part(self.xp, numerators)
        self._accumulate(
            lambda a, b: (
                numerators[a:b, :],
                None if denominators is None else denominators[a:b, :],
            ),
            numerators,
            denominators is None,
        )

    def add_products(self, probes: Any, image: Any, unit_modulus: bool) -> None:
        """One block given as probes Z and image A Z: y = conj(Z) * (A Z), x = |Z|^2 formed
        row chunk by row chunk on a CPU (no (n, k) temporary beyond the two blocks). Under
        JAX one compiled program (eagerly, a dozen operations would each be a dispatch)."""
        xp = self.xp
        if backend.compiles_estimates(xp):  # (the count is not the program's: no recompile)
            first = self.count == 0
            self.shift, self.u, self.uu, self.x = backend.jit(xp, _with_products, num_static=4)(
                xp, unit_modulus, first, self.real, self._arrays(), probes, image
            )
            if first:
                self.unit_modulus = unit_modulus
            self.count += int(probes.shape[1])
            return
        self._add_products(probes, image, unit_modulus)

    def _add_products(self, probes: Any, image: Any, unit_modulus: bool) -> None:
        xp = self.xp

        def numerators(a: int, b: int) -> Any:
            y = backend.conj(xp, probes[a:b, :]) * image[a:b, :]
            return backend.real_part(xp, y) if self.real else y

        self._accumulate(
            lambda a, b: (
                numerators(a, b),
                None if unit_modulus else backend.abs2(xp, probes[a:b, :]),
            ),
            probes,
            unit_modulus,
        )

    def _accumulate(
        self, chunk: Callable[[int, int], tuple[Any, Any]], like: Any, unit_modulus: bool
    ) -> None:
        xp = self.xp
        n, k = int(like.shape[0]), int(like.shape[1])
        whole = backend.prefers_whole_arrays(xp, backend.device_of(like))
        rows = n if whole else max(256, ROW_CHUNK_ENTRIES // max(k, 1))
        first = self.count == 0
        if first:
            self.unit_modulus = unit_modulus
        parts = []
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            parts.append(self._chunk_sums(*chunk(start, stop), start, stop, first))
        sums = [pieces[0] if len(pieces) == 1 else xp.concat(pieces) for pieces in zip(*parts)]
        if first:
            self.shift = sums.pop(0)
        self.u = _running_sum(self.u, sums[0])
        self.uu = _running_sum(self.uu, sums[1])
        if not unit_modulus:
            self.x = _running_sum(self.x, sums[2])
        self.count += k

    def _chunk_sums(self, y: Any, x: Any, start: int, stop: int, first: bool) -> tuple[Any, ...]:
        """The shift (first block only: the rows' own estimate) and the sums u, |u|^2 (or,
        with x, |u|^2 / x and x) of the rows ``start:stop``."""
        xp = self.xp
        if first:
            if x is None:
                shift = xp.mean(y, axis=1)
            else:
                shift = xp.sum(y, axis=1) / _cast_to(xp.sum(x, axis=1), y.dtype, xp)
        else:
            shift = self.shift[start:stop]
        sums: tuple[Any, ...]
        if x is None:
            residual = y - shift[:, None]
            sums = (xp.sum(residual, axis=1), xp.sum(backend.abs2(xp, residual), axis=1))
        else:
            weights = _cast_to(x, y.dtype, xp)
            residual = y - shift[:, None] * weights
            # |u|^2 / x, 0 where x = 0 (then y = 0 and u = 0)
            safe = xp.where(x > 0, x, xp.ones_like(x))
            sums = (
                xp.sum(residual, axis=1),
                xp.sum(backend.abs2(xp, residual) / safe, axis=1),
                xp.sum(x, axis=1),
            )
        return ((shift,) + sums) if first else sums

    def estimate(self) -> tuple[Any, Any, int]:
        """``(value, stderr, number of probes)``; the stderr is ``None`` below two probes."""
        value, stderr = backend.jit(self.xp, _ratio_estimate)(self.xp, self)
        return value, stderr, self.count

    def _estimate(self) -> tuple[Any, Any]:
        xp, k = self.xp, self.count
        if self.unit_modulus:
            delta = self.u / k
            value = self.shift + delta
            if k < 2:
                return value, None
            # sum |u - delta|^2 = sum |u|^2 - k |delta|^2
            square = self.uu - k * backend.abs2(xp, delta)
            square = xp.maximum(square, xp.zeros_like(square))
            return value, xp.sqrt(square / ((k - 1) * k))
        delta = self.u / _cast_to(self.x, self.u.dtype, xp)
        value = self.shift + delta
        if k < 2:
            return value, None
        # sum |u - delta x|^2 / x = sum |u|^2 / x - 2 Re(conj(delta) sum u) + |delta|^2 sum x
        square = (
            self.uu
            - 2 * backend.real_part(xp, backend.conj(xp, delta) * self.u)
            + backend.abs2(xp, delta) * self.x
        )
        square = xp.maximum(square, xp.zeros_like(square))
        return value, xp.sqrt(square / ((k - 1) * self.x))

    def _arrays(self) -> tuple[Any, ...]:
        return (self.shift, self.u, self.uu, self.x)

    def copy(self) -> RatioSums:
        """An independent copy (the sums are replaced, never changed in place, as blocks
        are added: the arrays are shared)."""
        other = RatioSums(self.xp, self.real)
        other.__dict__.update(self.__dict__)
        return other


def _flatten_sums(sums: RatioSums) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    children = (sums.shift, sums.u, sums.uu, sums.x)
    return children, (sums.xp, sums.count, sums.unit_modulus, sums.real)


def _unflatten_sums(aux: tuple[Any, ...], children: tuple[Any, ...]) -> RatioSums:
    sums = RatioSums(aux[0], aux[3])
    sums.count, sums.unit_modulus = aux[1], aux[2]
    sums.shift, sums.u, sums.uu, sums.x = children
    return sums


backend.register_pytree(RatioSums, _flatten_sums, _unflatten_sums)


def _with_products(
    xp: Any,
    unit_modulus: bool,
    first: bool,
    real: bool,
    arrays: tuple[Any, ...],
    probes: Any,
    image: Any,
) -> tuple[Any, ...]:
    """The sums' arrays with one more block of probes and their image added."""
    sums = RatioSums(xp, real)
    sums.shift, sums.u, sums.uu, sums.x = arrays
    sums.count = 0 if first else 1  # (only whether it is the first block matters here)
    sums.unit_modulus = unit_modulus
    sums._add_products(probes, image, unit_modulus)
    return sums._arrays()


def _ratio_estimate(xp: Any, sums: RatioSums) -> tuple[Any, Any]:
    return sums._estimate()


def _running_sum(total: Any, part: Any) -> Any:
    return part if total is None else total + part


def _cast_to(x: Any, dtype: Any, xp: Any) -> Any:
    return x if x.dtype == dtype else xp.astype(x, dtype)


# ------------------------------------------------------- exchangeable estimates
@backend.register_pytree_dataclass
@dataclass(frozen=True)
class ExchangeableError:
    """The error estimate of the mean of s exchangeable estimates t_i.

    ``stderr`` is the honest one, sqrt(max(V, sum (t_i - t_bar)^2) / (s (s - 1))) with
    V = C + min(J - C, C) / (s - 2), C = sum (t_i - t_bar)(p_i - p_bar) and
    J = sum (p_i - p_bar)^2 (p_i the jackknife pseudo-values; :func:`second_order_sum`);
    ``stderr_plain`` the literature's std(t_i) / sqrt(s); ``stderr_jackknife`` the usual
    jackknife's sqrt(var(p) / s); ``dof`` Satterthwaite's degrees of freedom of V (a
    0-d float array, whole and in [2, s - 1]). All ``None`` below ``ERROR_PROBES``
    estimates.
    """

    stderr: Any
    stderr_plain: Any
    stderr_jackknife: Any
    dof: Any


def exchangeable_error(
    estimates: Any, pseudo: Any, value: Any, xp: Any, terms: int = 0, size: Any = None
) -> ExchangeableError:
    """:class:`ExchangeableError` of the estimates t_i (mean ``value``) and pseudo-values p_i.

    The variance estimate is the covariance of the leave-one-out estimates with their
    pseudo-values (an exact variance identity for exchangeable estimates, see
    ``estimators/_xtrace.py``) with its second-order correction
    (:func:`second_order_sum`), floored at the plain term. Its degrees of freedom
    are Satterthwaite's ``2 s mean(u)^2 / var(u)`` of its per-probe terms u_i
    (:func:`second_order_products`; s - 1 for normal t_i, fewer when a few
    probes dominate), clipped to [2, s - 1] and rounded down; 2 when the mean of the u_i
    is not positive, else s - 1 when they are constant.

    With ``terms`` (the products' length n) the error has the floor of
    :func:`rounding_floor` for estimates of size ``|value|`` and a shared part of size
    ``size`` (the sum of the moduli of the terms of the low-rank trace). Where the sketch
    captures A (rank below s, or c I) every t_i is exact but for rounding, and the spread
    of the t_i alone gave intervals a few ulps wide that missed.
    """
    s = int(estimates.shape[0])
    if s < ERROR_PROBES:
        return ExchangeableError(None, None, None, None)
    dev_t = estimates - value
    dev_p = pseudo - xp.mean(pseudo)
    cross = backend.real_part(xp, backend.conj(xp, dev_t) * dev_p)
    square = backend.abs2(xp, dev_t)
    jackknife = backend.abs2(xp, dev_p)
    honest_sum, capped = second_order_sum(xp, xp.sum(cross), xp.sum(jackknife), s)
    products = second_order_products(xp, cross, jackknife, s, capped)
    plain_var = xp.sum(square) / (s * (s - 1))
    honest_var = honest_sum / (s * (s - 1))
    stderr = xp.sqrt(xp.maximum(honest_var, plain_var))
    if terms:
        factor = rounding_factor(xp, estimates.dtype, terms)
        # the estimates' own size: |value| (their mean |t_i| where they agree) less the
        # shared part it holds, which is added whole (counted twice, it doubled the
        # floor, and a float32 adaptive XTrace spent its whole budget: found by a review)
        own = xp.abs(value)
        if size is not None:
            own = backend.positive_part(xp, own - size)
        stderr = rounding_floor(xp, stderr, factor, s, own, size)
    return ExchangeableError(
        stderr,
        xp.sqrt(plain_var),
        xp.sqrt(xp.sum(jackknife) / (s * (s - 1))),
        satterthwaite_dof(products[:, None], xp)[0],
    )


def second_order_sum(xp: Any, cross: Any, jackknife: Any, s: int) -> tuple[Any, Any]:
    """From the sums C = sum_i c_i of the cross products c_i = Re conj(t_i - t_bar)(p_i -
    p_bar) and J = sum_i |p_i - p_bar|^2 of s exchangeable estimates t_i and their jackknife
    pseudo-values p_i: ``(C + min(J - C, C) / (s - 2), capped)``. Over s (s - 1) it
    estimates the variance of their mean without bias up to second order, where C / (s
    (s - 1)) falls short by up to a factor (s - 2) / (s - 1) (below); ``capped`` says
    where the correction was held at C / (s - 2) (:func:`second_order_products` gives the
    per-probe terms of either form, for the degrees of freedom).

    Why (a Hoeffding expansion to second order). Write t_i = theta + a_i + sum_{j != i}
    g_ij, with a_i = a(w_i) and g_ij = g(w_i, w_j) of zero mean given either probe (t_i is
    unbiased given the other probes, which build its sketch). Leaving probe i out of probe
    j's sketch removes g_ji, so p_i = theta + a_i + sum_{j != i} (g_ij + g_ji). With
    alpha = Var a, gamma = Var g_ij and kappa = Cov(g_ij, g_ji),

        s (s - 1) Var(t_bar) = (s - 1) alpha + (s - 1)^2 (gamma + kappa),
        E C = (s - 1) alpha + (s - 1)(s - 2)(gamma + kappa),
        E J = (s - 1) alpha + 2 (s - 1)(s - 2)(gamma + kappa),

    so C + (J - C) / (s - 2) is unbiased. Where the pair terms vanish (a sketch that
    captures A up to a Hutchinson residual) it is C; where only they are left (alpha = 0
    and g_ij = g_ji: XDiag on c I or a diagonal, the sketch capturing nothing) C has
    (s - 2) / (s - 1) of the variance, 0.929 at s = 15, as measured for XDiag on c I at
    n = 2000 (0.929 of the estimates' variance over 300 runs; the corrected sum 1.000).

    What the expansion leaves out: t_j^(i)'s sketch has s - 2 probes (and XTrace's
    normalization n - s + 2), so its first-order term differs from t_j's too, which adds
    (s - 1)(Var da - Cov(a, da)) to E (J - C) (da that difference). Where the
    first-order term is large, the correction overshoots: XTrace at n = 80, s = 15
    (10,000 runs; flat, random diagonal, indefinite) had C at 0.96 - 0.98 of the
    variance and has the corrected sum at 1.02 - 1.04, its intervals missing 4.6 - 4.7%
    of the time against 5.1 - 5.2%. The same expansion gives E (J - C) <= E C; the
    jackknife's higher-order terms (the ones that make var(p) / s too large) push a
    sample's J - C beyond C, most on decaying spectra, and the correction is held at
    C / (s - 2) there: XDiag's coverage on a polynomial spectrum (n = 300, s = 30,
    two-sided) went 0.965 -> 0.971 uncapped, 0.967 capped. At the smallest s the held
    correction is large: C (s - 1) / (s - 2) is 2 C at s = 3, where XTrace's variance
    estimate on poly went from 1.22 to 1.91 of the mean squared error (coverage 92.9% ->
    93.8%: at dof 2 the t-interval's tails still fall short)."""
    capped = jackknife - cross > cross
    correction = xp.where(capped, cross, jackknife - cross)
    return cross + correction / (s - 2), capped


def second_order_products(xp: Any, cross: Any, jackknife: Any, s: int, capped: Any) -> Any:
    """The per-probe terms u_i of :func:`second_order_sum` (their sum is its value), for
    Satterthwaite's degrees of freedom: ((s - 3) c_i + j_i) / (s - 2), or (s - 1) c_i /
    (s - 2) where the correction was capped (``capped``: broadcast over the probes)."""
    return xp.where(capped, (s - 1) * cross, (s - 3) * cross + jackknife) / (s - 2)


def exchangeable_estimate(
    value: Any,
    estimates: Any,
    pseudo: Any,
    error: ExchangeableError,
    num_matvecs: int,
    method: str,
    info: dict[str, Any],
    converged: bool | None = None,
) -> Estimate:
    """The :class:`~linop_trace.Estimate` of the mean of exchangeable estimates (XTrace,
    XNysTrace): the honest stderr and its Satterthwaite dof; ``info`` gains the estimates,
    their pseudo-values and the plain and jackknife errors."""
    return Estimate(
        value,
        error.stderr,
        num_matvecs,
        method,
        converged=converged,
        dof=error.dof,
        info={
            **info,
            "num_probes": int(estimates.shape[0]),
            "estimates": estimates,
            "pseudo_values": pseudo,
            "stderr_plain": error.stderr_plain,
            "stderr_jackknife": error.stderr_jackknife,
        },
    )


def satterthwaite_dof(products: Any, xp: Any) -> Any:
    """Per column j of ``products`` (s, B): Satterthwaite's ``2 s mean^2 / var`` of the
    variance estimate ``sum(products) / (s (s - 1))``, clipped to [2, s - 1] and rounded
    down; 2 where the mean is not positive, else s - 1 where the products are constant."""
    s = int(products.shape[0])
    # the dof is scale-free, and squares of 1e160 are not finite
    products, _ = backend.divide_by_largest(xp, backend.stop_gradient(products), axis=0)
    mean = xp.mean(products, axis=0)
    spread = xp.sum((products - mean) ** 2, axis=0) / (s - 1)
    varies = spread > 0
    dof = 2 * s * (mean / xp.sqrt(xp.where(varies, spread, xp.ones_like(spread)))) ** 2
    dof = xp.where(varies, dof, xp.full_like(dof, s - 1))
    dof = xp.where(mean > 0, dof, xp.full_like(dof, 2))  # (before the constant case)
    dof = xp.minimum(xp.maximum(dof, xp.full_like(dof, 2)), xp.full_like(dof, s - 1))
    return xp.floor(dof)


def entrywise_exchangeable_error(
    deviation: Any, pairs: Any, xp: Any, dof_step: int, dof_first: int = 0
) -> tuple[Any, Any, Any]:
    """The entrywise cross-jackknife errors of XDiag from the deviations d^(i) - dbar
    (rows: entries, columns: probes) and any ``pairs`` that differ from minus the
    pseudo-values by the same vector in every column.

    Each entry's variance estimate is that of :func:`exchangeable_error`: the second-order
    sum (:func:`second_order_sum`) floored at the plain sum of squares, over s (s - 1).

    Returns ``(stderr, stderr_plain, dof_rows)``: ``dof_rows`` the (square, u, floored)
    per-probe products of the entries ``dof_first, dof_first + dof_step, ...``, from which
    :func:`entrywise_dofs` gives their Satterthwaite dofs (``None`` when the block holds
    none of them).

    With sum_i conj(dev_i) = 0 up to round-off, which the first term keeps, the cross sum
    sum_i conj(dev_i) (p_i - pbar) is pbar' conj(sum_i dev_i) - sum_i conj(dev_i) pairs_i,
    pbar' the row means of ``pairs``. The jackknife sum |p_i - pbar|^2 is taken from the
    centred ``pairs`` (an (n, s) temporary of the caller's row block; fused into its sum
    by XLA), not as sum |pairs_i|^2 - s |pbar'|^2, which cancels where the pairs share a
    large offset.
    """
    n, s = deviation.shape
    pair_mean = xp.mean(pairs, axis=1)
    cross_sum = pair_mean * backend.conj(xp, xp.sum(deviation, axis=1)) - backend.row_inner(
        xp, deviation, pairs
    )
    square_sum = backend.row_inner(xp, deviation, deviation)
    centered = pairs - pair_mean[:, None]  # (minus the pseudo-values' deviations)
    jackknife_sum = backend.real_part(xp, backend.row_inner(xp, centered, centered))
    cross_sum, square_sum = backend.real_part(xp, cross_sum), backend.real_part(xp, square_sum)
    honest_sum, capped = second_order_sum(xp, cross_sum, jackknife_sum, s)
    floored = honest_sum < square_sum
    variance = xp.where(floored, square_sum, honest_sum) / (s * (s - 1))
    stderr = xp.sqrt(variance)
    plain = xp.sqrt(square_sum / (s * (s - 1)))
    if dof_first >= n:  # no dof entry in this block
        return stderr, plain, None
    deviation = deviation[dof_first::dof_step, :]
    pseudo_deviation = pair_mean[dof_first::dof_step][:, None] - pairs[dof_first::dof_step, :]
    cross = backend.real_part(xp, backend.conj(xp, deviation) * pseudo_deviation)
    square = backend.real_part(xp, backend.conj(xp, deviation) * deviation)
    jackknife = backend.abs2(xp, pseudo_deviation)
    honest = second_order_products(xp, cross, jackknife, s, capped[dof_first::dof_step][:, None])
    return stderr, plain, (square, honest, floored[dof_first::dof_step])


def entrywise_dofs(rows: tuple[Any, Any, Any], xp: Any) -> Any:
    """Each entry's Satterthwaite dof for the variance estimate it uses (the squares where
    the floor applies, the second-order products u_i otherwise), before rounding."""
    square, cross, floored = rows
    return xp.where(
        floored,
        _unrounded_dof(xp.matrix_transpose(square), xp),
        _unrounded_dof(xp.matrix_transpose(cross), xp),
    )


def _unrounded_dof(products: Any, xp: Any) -> Any:
    """Satterthwaite's dof per column before rounding (their median is rounded): s - 1
    where the products are constant (exact entries), else 2 where their mean is not
    positive, clipped to [2, s - 1]."""
    s = int(products.shape[0])
    products, _ = backend.divide_by_largest(xp, products, axis=0)
    mean = xp.mean(products, axis=0)
    spread = xp.sum((products - mean) ** 2, axis=0) / (s - 1)
    varies = spread > 0
    dof = 2 * s * mean**2 / xp.where(varies, spread, xp.ones_like(spread))
    dof = xp.where(mean > 0, dof, xp.full_like(dof, 2))
    dof = xp.where(varies, dof, xp.full_like(dof, s - 1))
    return xp.minimum(xp.maximum(dof, xp.full_like(dof, 2)), xp.full_like(dof, s - 1))


def median_dof(dofs: Any, xp: Any, largest: int) -> Any:
    """The reported dof of an entrywise estimate: the median of the entries' dofs (the
    lower one for an even count), rounded down, as a 0-d array; the dofs lie in
    [2, ``largest``] (:func:`entrywise_dofs`: ``largest`` = s - 1), NaN where most are NaN.

    Counted, not sorted: rounding down commutes with taking the median, so it is the
    least integer v in [2, largest] with more than half of the dofs below v + 1. One
    comparison of the (at most 1024) dofs with the s - 2 candidates, O(1024 s), which is
    below XDiag's own O(n s^2); a sort of 512 entries took 35 us of XDiag's compiled
    program at n = 512 under JAX on the CPU (its O(n s^2) algebra 90 us), and is a
    multi-kernel sort on a GPU.

    >>> import array_api_compat.numpy as xp
    >>> import numpy as np
    >>> float(median_dof(np.array([5.5, 2.5, 4.5, 3.5]), xp, 9))
    3.0
    """
    count = dofs.shape[0]
    device = backend.device_of(dofs)
    candidates = xp.arange(2, max(largest, 2) + 1, dtype=dofs.dtype, device=device)
    below = xp.sum(xp.astype(dofs[:, None] < candidates[None, :] + 1, xp.int32), axis=0)
    reached = below > (count - 1) // 2  # at least the lower median's rank
    median = 2 + xp.sum(xp.astype(~reached, dofs.dtype))  # (reached grows with v)
    return xp.where(reached[-1], median, xp.asarray(math.nan, dtype=dofs.dtype, device=device))
