"""XTrace (Epperly, Tropp and Webber 2024): the exchangeable trace estimator.

With probes Omega = [w_1 .. w_s] and Y = A Omega, probe i is used once as a Hutchinson
probe of what the other s - 1 probes leave, and s - 1 times to build the others' sketches:

    t_i = tr(P_i A) + c_i * x_i^H A x_i,    x_i = (I - P_i) w_i,

P_i the orthogonal projector onto range(Y without column i). The estimate is the mean of
the t_i. With Y = QR, P_i = Q (I - s_i s_i^H) Q^H where s_i is the normalized i-th column
of R^{-H} (a rank-one downdate), so every t_i comes from the s x s matrices

    H = Q^H A Q,  W = Q^H Omega,  T = (A Q)^H Omega,  R = Q^H Y

in O(n s^2) flops after two block products (Y = A Omega, then A Q). The "improved"
normalization of ETW 2024 (Section 2.2) rescales x_i to length sqrt(n - s + 1): it is
unbiased for rotation-invariant probes (``"sphere"``, ``"gaussian"``), where x_i / |x_i|
is uniform on the unit sphere of range(I - P_i), and it is only used for them
(c_i = (n - s + 1) / |x_i|^2; c_i = 1 for Rademacher/Steinhaus probes).

The honest error estimate. The literature's std(t_i) / sqrt(s) underestimates the
variance: the t_i are exchangeable but positively correlated. With e_i = t_i - tr(A) and
t_j^(i) the estimate of probe j when probe i also leaves the sketch (projector onto
range(Y without columns i, j), normalization with n - s + 2), t_j^(i) does not depend on
w_i while E[e_i | w_k, k != i] = 0, so by exchangeability, exactly,

    Var(mean t) = (1/s) E[e_i (p_i - tr(A))],   p_i = t_i + sum_{j != i} (t_j - t_j^(i)),

p_i the jackknife pseudo-value of probe i (s t_bar - (s - 1) t_bar_(i), t_bar_(i) the
estimate without probe i). Its sample version (a "cross" jackknife) C = sum_i (t_i -
t_bar)(p_i - p_bar) falls short by the pairs' share of the variance, (s - 2) / (s - 1) of
it on a flat spectrum; with the jackknife sum J = sum_i (p_i - p_bar)^2 the correction
is exact to second order (:func:`~linop_trace._stats.second_order_sum`), and floored at
the plain value,

    stderr^2 = max(C + min(J - C, C) / (s - 2), sum_i (t_i - t_bar)^2) / (s (s - 1)).

The plain var(t)/s and the usual jackknife's var(p)/s bracket it (too small, and too large
by higher-order terms). All pairs (i, j) come from the same s x s matrices (a rank-two
downdate): O(s^3) flops, no extra product. The interval's Student-t quantile has
Satterthwaite's degrees of freedom for that variance estimate, 2 s mean(u)^2 / var(u)
with u_i its per-probe terms, clipped to [2, s - 1]: fewer where a few probes dominate
the variance estimate.

Degenerate sketches. When Y is numerically rank deficient (rank(A) < s) R is singular:
its inverse gets a round-off shift, and a pair whose directions are parallel
(1 - |s_i^H s_j|^2 below sqrt(eps), e.g. every pair when rank(A) = s - 1) takes
t_j^(i) = t_j instead of dividing round-off by round-off, as XDiag's pairs do. At rank
s - 1 and below every t_i is exact, and below it the stderr is 0 whatever the pairs.
Short Rademacher blocks (n <= 64, n - s >= 10) are drawn with independent columns
(:meth:`~linop_trace._probes.ProbeSampler.independent`; with fewer spare entries they
stay i.i.d., since conditioning would bias the estimates), and an LU solve that still
meets an exact zero pivot is redone with a wider shift.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import _backend as backend
from .._estimate import Estimate
from .._stats import ExchangeableError, exchangeable_error, exchangeable_estimate
from ._adaptive import Progress, remaining, until_met
from ._base import EstimationRequest, ProbeOption, cover, covered_product, exact_estimate
from ._linalg import (
    as_dtype,
    column_inner,
    downdate_directions,
    extend_basis,
    hermitian_transpose,
    orthonormal_factors,
)

__all__ = ["XTrace", "XTraceResult", "xtrace_core", "xtrace_estimates"]

Matmat = Callable[[Any], Any]


@backend.register_pytree_dataclass
@dataclass(frozen=True)
class XTraceResult:
    """XTrace's estimate (``value``, the mean of the leave-one-out ``estimates``), their
    jackknife ``pseudo_values``, the error estimate
    (:class:`~linop_trace._stats.ExchangeableError`), and the products it came from (to
    extend the estimate with more probes)."""

    value: Any
    error: ExchangeableError
    estimates: Any
    pseudo_values: Any
    probes: Any
    images: Any
    basis: Any
    basis_images: Any


def xtrace_estimates(
    probes: Any,
    images: Any,
    basis: Any,
    basis_images: Any,
    xp: Any,
    improved: bool = True,
    triangular: Any = None,
    directions: Any = None,
) -> tuple[Any, Any, Any, ExchangeableError]:
    """The XTrace leave-one-out estimates t_i, pseudo-values p_i, their mean and its error,
    from given products: pure linear algebra, no operator and no randomness.

    Parameters
    ----------
    probes : array (n, s)
        Omega.
    images : array (n, s)
        Y = A Omega.
    basis : array (n, s)
        Orthonormal Q with range(Q) = range(Y) (any such basis).
    basis_images : array (n, s)
        Z = A Q.
    xp : namespace
    improved : bool
        Rescale x_i to length sqrt(n - s + 1) (rotation-invariant probes only).
    triangular : array (s, s), optional
        The upper triangular ``R = Q^H Y`` of the QR factorization whose Q is ``basis``
        (then the downdates solve by substitution); computed, and solved by LU, if absent.
    directions : array (s, s), optional
        The downdate directions of R (computed if absent).

    Returns
    -------
    estimates, pseudo_values, value, error
    """
    program = backend.jit(xp, _estimates_and_error, num_static=2)
    n, m = probes.shape
    with backend.one_blas_thread(xp, work=n * m * m):  # the library's own algebra only
        return program(xp, improved, probes, images, basis, basis_images, triangular, directions)


def _estimates_and_error(
    xp: Any,
    improved: bool,
    probes: Any,
    images: Any,
    basis: Any,
    basis_images: Any,
    triangular: Any,
    directions: Any,
) -> tuple[Any, Any, Any, ExchangeableError]:
    """Everything after the products (JAX compiles it as one program when it runs
    eagerly; eager JAX pays for every small operation)."""
    upper = triangular is not None  # R of the QR factorization, else any Q^H Y
    r = triangular if upper else hermitian_transpose(basis, xp) @ images  # Q^H Y
    sdir = downdate_directions(r, xp, upper=upper) if directions is None else directions
    estimates, pseudo, low_rank_size = _leave_one_out_estimates(
        xp, improved, probes, images, basis, basis_images, r, sdir
    )
    value = xp.mean(estimates)
    n = int(probes.shape[0])
    error = exchangeable_error(estimates, pseudo, value, xp, terms=n, size=low_rank_size)
    return estimates, pseudo, value, error


def _leave_one_out_estimates(
    xp: Any,
    improved: bool,
    probes: Any,
    images: Any,
    basis: Any,
    basis_images: Any,
    r: Any,
    sdir: Any,
) -> tuple[Any, Any, Any]:
    """The estimates t_i and pseudo-values p_i: pure array algebra after the products and
    the downdate directions (JAX compiles it as one program); and sum_j |(Q^H A Q)_jj|,
    the size of the low-rank trace's terms (its rounding's scale)."""
    n, s = probes.shape
    ctype = probes.dtype
    probes = backend.materialized(xp, probes)
    # Q^H in a row-major array of its own: XLA's CPU products with a transposed operand
    # (contracting the leading axis of both) ran the three n-long products below at twice
    # the time (n = 512, s = 10)
    qh = backend.materialized(xp, hermitian_transpose(basis, xp))
    h = qh @ basis_images  # Q^H A Q
    w = qh @ probes  # Q^H Omega
    t = hermitian_transpose(basis_images, xp) @ probes  # (A Q)^H Omega: column j is Q^H A^H w_j
    omega_y = column_inner(probes, images, xp)  # w_j^H A w_j
    omega_norm2 = backend.real_part(xp, column_inner(probes, probes, xp))
    w_norm2 = xp.sum(backend.abs2(xp, w), axis=0)
    hw = h @ w
    # wbar_j = (I - QQ^H) w_j;  a_j = wbar_j^H A wbar_j
    a = omega_y - column_inner(t, w, xp) - column_inner(w, r, xp) + column_inner(w, hw, xp)
    u = r - hw  # Q^H A wbar_j
    v = t - hermitian_transpose(h, xp) @ w  # (wbar_j^H A Q)^H
    sh = hermitian_transpose(sdir, xp)
    sw = sh @ w  # s_i^H w_j
    vs = hermitian_transpose(v, xp) @ sdir  # [j, k] = v_j^H s_k
    su = sh @ u  # [k, j] = s_k^H u_j
    shs = sh @ (h @ sdir)  # s_k^H H s_l
    gram = sh @ sdir  # s_k^H s_l
    h_diagonal = xp.linalg.diagonal(h)
    trace_h = xp.sum(h_diagonal)
    residual_norm2 = omega_norm2 - w_norm2  # |wbar_j|^2

    # one left out: P_i w_i = Q s_i alpha_i
    alpha = xp.linalg.diagonal(sw)
    shs_d = xp.linalg.diagonal(shs)
    quad = (
        a
        + xp.linalg.diagonal(vs) * alpha
        + backend.conj(xp, alpha) * xp.linalg.diagonal(su)
        + backend.abs2(xp, alpha) * shs_d
    )
    xnorm2 = residual_norm2 + backend.abs2(xp, alpha)
    scale = (n - s + 1) / xnorm2 if improved else 1.0
    estimates = trace_h - shs_d + as_dtype(scale, ctype, xp) * quad

    # two left out [i, j]: probe i removed, j the Hutchinson probe; projector onto
    # span(s_i, s_j) in the s-space with Gram [[1, c], [conj c, 1]], c = s_i^H s_j.
    # Where 1 - |c|^2 = |s_i - conj(c) s_j|^2 vanishes (s_i parallel to s_j: Y numerically
    # rank deficient, e.g. rank(A) = s - 1) span(s_i, s_j) = span(s_j): the pair takes
    # t_j^(i) = t_j instead of dividing round-off by round-off (as XDiag's pairs do)
    c = gram
    det = 1 - backend.abs2(xp, c)
    eye = xp.eye(s, dtype=det.dtype, device=backend.device_of(det))
    parallel = (det <= math.sqrt(float(xp.finfo(det.dtype).eps))) & (eye == 0)
    det = xp.where(parallel, xp.ones_like(det), det) + eye  # the diagonal is unused
    sw_jj = alpha[None, :]
    coef_i = (sw - c * sw_jj) / as_dtype(det, ctype, xp)
    coef_j = (sw_jj - backend.conj(xp, c) * sw) / as_dtype(det, ctype, xp)
    quad2 = (
        a[None, :]
        + xp.matrix_transpose(vs) * coef_i
        + xp.linalg.diagonal(vs)[None, :] * coef_j
        + backend.conj(xp, coef_i) * su
        + backend.conj(xp, coef_j) * xp.linalg.diagonal(su)[None, :]
        + backend.abs2(xp, coef_i) * shs_d[:, None]
        + backend.conj(xp, coef_i) * coef_j * shs
        + backend.conj(xp, coef_j) * coef_i * xp.matrix_transpose(shs)
        + backend.abs2(xp, coef_j) * shs_d[None, :]
    )
    proj_norm2 = (
        backend.abs2(xp, coef_i)
        + backend.abs2(xp, coef_j)
        + 2 * backend.real_part(xp, backend.conj(xp, coef_i) * c * coef_j)
    )
    xnorm2_pair = residual_norm2[None, :] + proj_norm2
    trace_pair = (
        shs_d[:, None] + shs_d[None, :] - c * xp.matrix_transpose(shs) - backend.conj(xp, c) * shs
    ) / as_dtype(det, ctype, xp)
    scale2 = (n - s + 2) / (xnorm2_pair + eye) if improved else 1.0
    pair = trace_h - trace_pair + as_dtype(scale2, ctype, xp) * quad2
    pair = xp.where(parallel, xp.broadcast_to(estimates[None, :], pair.shape), pair)
    offdiag = 1 - eye
    # p_i = t_i + sum_{j != i} (t_j - t_j^(i))
    influence = xp.sum(as_dtype(offdiag, ctype, xp) * (estimates[None, :] - pair), axis=1)
    pseudo = estimates + influence

    return estimates, pseudo, xp.sum(xp.abs(h_diagonal))


def xtrace_core(
    matmat: Matmat,
    probes: Any,
    xp: Any,
    improved: bool = True,
    *,
    images: Any = None,
    basis: Any = None,
    directions: Any = None,
    basis_images: Any = None,
    triangular: Any = None,
) -> XTraceResult:
    """XTrace with the probe block ``probes`` (n, s): products ``A Omega`` then ``A Q``.

    Parameters
    ----------
    matmat : callable
        ``X -> A X`` (two calls with s columns each).
    probes : array (n, s)
    xp : namespace
    improved : bool
        The improved normalization (rotation-invariant probes only).
    images : array (n, s), optional
        ``A @ probes`` when already multiplied (by ``method="auto"``); then ``basis`` and
        its ``directions`` may come along too, with ``triangular`` (R = Q^H images, upper
        triangular: the QR factorization the basis came from; else computed), and
        ``basis_images`` = ``A @ basis``.
    """
    # the products are checked through the value, not each by a pass of its own: a
    # non-finite entry of Y makes its QR's Q non-finite from that column on, and one of
    # Y or of A Q then reaches tr(Q^H A Q), a term of every t_i
    if images is None:
        images = covered_product(matmat, probes, feeds_products=True)
    if basis is None:
        basis, triangular = orthonormal_factors(images, xp)
        directions = None
    if basis_images is None:
        basis_images = covered_product(matmat, basis)
    estimates, pseudo, value, error = xtrace_estimates(
        probes, images, basis, basis_images, xp, improved, triangular, directions
    )
    cover(matmat, value)
    return XTraceResult(value, error, estimates, pseudo, probes, images, basis, basis_images)


def _with_more_probes(
    result: XTraceResult, matmat: Matmat, fresh: Any, xp: Any, improved: bool
) -> XTraceResult:
    """XTrace with ``fresh`` probes added: every earlier product is reused (the basis is
    extended, never recomputed)."""
    fresh_images = covered_product(matmat, fresh, feeds_products=True)
    new_basis = extend_basis(result.basis, fresh_images, xp)
    new_images = covered_product(matmat, new_basis)
    probes = xp.concat([result.probes, fresh], axis=1)
    images = xp.concat([result.images, fresh_images], axis=1)
    basis = xp.concat([result.basis, new_basis], axis=1)
    basis_images = xp.concat([result.basis_images, new_images], axis=1)
    estimates, pseudo, value, error = xtrace_estimates(
        probes, images, basis, basis_images, xp, improved
    )
    cover(matmat, value)  # (as in xtrace_core: the new columns reach tr(Q^H A Q))
    return XTraceResult(value, error, estimates, pseudo, probes, images, basis, basis_images)


class XTrace(ProbeOption):
    """XTrace: exchangeable trace estimation with an honest error bar.

    Uses ``num_matvecs // 2`` probes and as many products with their orthonormalized
    images, in two block products (more if ``block_size`` is smaller). A fixed budget of
    n or more gets the exact trace instead (n identity columns, ``method="exact"`` in the
    result, ``info["requested_method"]``); a fixed budget's sketch keeps at most n - 1
    probes (of n, its Hutchinson terms divide by residuals that vanish: float32 errors of
    5e-4 - 7e-3); a tolerance's may grow to n.

    Parameters
    ----------
    probe : str, optional
        Overrides the ``probe=`` argument of :func:`~linop_trace.trace`. XTrace's own
        default is ``"sphere"`` (uniform on the sphere of radius sqrt(n)), which the
        improved normalization needs; with ``"rademacher"`` (or ``"steinhaus"``) the
        plain normalization is used.

    Notes
    -----
    See the module docstring for the formulas. ``stderr`` is the honest error estimate:
    the covariance of the leave-one-out estimates with their jackknife pseudo-values
    (an exact variance identity for exchangeable estimates), corrected to second order
    and floored at the plain estimate; ``dof`` (Satterthwaite) sets the Student-t quantile of
    :meth:`~linop_trace.Estimate.ci`. The literature's std(t_i) / sqrt(s) is kept as
    ``info["stderr_plain"]`` for comparison, the usual jackknife (too large) as
    ``info["stderr_jackknife"]``; measured coverage of all three:
    docs/estimators/xtrace.rst.

    With ``rtol``/``atol`` the number of probes is doubled (all earlier products are
    reused: the basis is extended, never recomputed) until the half-width of the
    interval meets the tolerance or ``max_matvecs`` would be exceeded.

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import trace
    >>> rng = np.random.default_rng(0)
    >>> U = np.linalg.qr(rng.standard_normal((200, 200)))[0]
    >>> A = (U * 0.5 ** np.arange(200)) @ U.T  # fast-decaying spectrum
    >>> est = trace(A, method="xtrace", num_matvecs=80, seed=0)
    >>> est.num_matvecs, bool(abs(float(est) - np.trace(A)) < 1e-10)
    (80, True)
    """

    name = "xtrace"
    min_matvecs = 4
    supports_tolerance = True
    default_probe = "sphere"
    jit_compatible = True
    unit_scaled = ("trace",)

    def uses_exact(self, request: EstimationRequest) -> bool:
        """A fixed budget of n or more: n identity columns give the trace exactly. (A
        sketch of n probes, from a budget of 2 n, had float32 errors of 5e-4 - 7e-3 of
        the trace against 3e-6 - 7e-4 with n - 1, and float64 1e-12 - 1e-10 against
        5e-16 - 7e-4: its Hutchinson terms divide by residuals that vanish.) A
        tolerance stops on its own: it starts below n probes and may grow to n, whose
        interval still covers (a sketch capped at n - 1 could not meet a tight one)."""
        return not request.adaptive and request.num_matvecs >= request.n

    def trace(self, request: EstimationRequest) -> Estimate:
        if self.uses_exact(request):
            return exact_estimate(request, "trace", {"requested_method": self.name})
        num_probes = min(request.num_matvecs // 2, max(request.n - 1, 1))
        # (the improved normalization sees each probe's direction only: see _probes)
        improved = request.probes.rotation_invariant
        probes = request.probes.independent(num_probes, any_length=improved)
        return self.finish_trace(request, probes)

    def finish_trace(
        self,
        request: EstimationRequest,
        probes: Any,
        images: Any = None,
        basis: Any = None,
        directions: Any = None,
        info: dict | None = None,
        basis_images: Any = None,
        triangular: Any = None,
    ) -> Estimate:
        """XTrace from ``probes`` (and their ``images``, basis, downdate ``directions``,
        ``basis_images`` = A @ basis and the ``triangular`` R = Q^H images of the basis'
        QR factorization where ``method="auto"`` has them already), doubling with a
        tolerance."""
        xp = request.xp
        improved = request.probes.rotation_invariant
        result = xtrace_core(
            request.matmat,
            probes,
            xp,
            improved,
            images=images,
            basis=basis,
            directions=directions,
            basis_images=basis_images,
            triangular=triangular,
        )
        converged = None
        if request.adaptive:
            from scipy import stats

            def measure() -> Progress:
                error = result.error
                if error.stderr is None:
                    numbers = backend.read_floats(xp, [xp.abs(result.value)])
                    return Progress(None, None if numbers is None else numbers[0])
                numbers = backend.read_floats(xp, [xp.abs(result.value), error.stderr, error.dof])
                if numbers is None:
                    return Progress(None, None)
                magnitude, spread, dof = numbers
                quantile = float(stats.t.ppf(0.5 + request.confidence / 2, dof))
                return Progress(quantile * spread, magnitude)

            def grow() -> bool:
                nonlocal result
                s = int(result.probes.shape[1])
                more = min(s, remaining(request) // 2, request.n - s)
                if more < 1:
                    return False
                fresh = request.probes.independent(more, result.probes, any_length=improved)
                result = _with_more_probes(result, request.matmat, fresh, xp, improved)
                return True

            converged = until_met(request, measure, grow)
        info = {
            "probe": request.probes.kind,
            "normalization": "improved" if improved else "plain",
            **(info or {}),
        }
        return exchangeable_estimate(
            result.value,
            result.estimates,
            result.pseudo_values,
            result.error,
            request.columns,
            self.name,
            info,
            converged,
        )
