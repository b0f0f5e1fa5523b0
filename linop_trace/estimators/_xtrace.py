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

The honest error estimate
-------------------------
The literature reports std(t_i) / sqrt(s). The t_i are exchangeable but positively
correlated, so that underestimates the variance (measured: 86-91% coverage of the 95%
interval). Write e_i = t_i - tr(A) and t_j^(i) for the estimate of probe j when probe i
is left out of the sketch too (projector onto range(Y without columns i, j), same
normalization with n - s + 2). Since t_j^(i) does not depend on w_i while
E[e_i | w_k, k != i] = 0, E[e_i (t_j^(i) - tr(A))] = 0, hence

    Var(mean t) = (1/s) E[e_i (p_i - tr(A))],   p_i = t_i + sum_{j != i} (t_j - t_j^(i)),

exactly, by exchangeability. p_i is the jackknife pseudo-value of probe i
(p_i = s t_bar - (s - 1) t_bar_(i) with t_bar_(i) the XTrace estimate without probe i).
So the variance is the covariance of the leave-one-out estimates t_i with the pseudo-values
p_i over s; we estimate it by their sample covariance over s (a "cross" jackknife):

    stderr^2 = max(sum_i (t_i - t_bar)(p_i - p_bar), sum_i (t_i - t_bar)^2) / (s (s - 1)),

i.e. floored at the plain value. The plain estimate is var(t)/s and the usual jackknife
var(p)/s; they bracket it (the first too small, the second too large by the higher-order
terms: 1.4x on the flat spectrum, 5x-25x on decaying ones). All pairs (i, j) come from the
same s x s matrices (a rank-two downdate): O(s^3) flops, no extra product. The interval
uses a Student-t quantile with Satterthwaite's degrees of freedom for that variance
estimate, 2 s mean(c)^2 / var(c) with c_i = (t_i - t_bar)(p_i - p_bar), clipped to
[2, s - 1]: about s - 1 on flat spectra, 10-13 at s = 30 on decaying ones, where a few
probes dominate the variance estimate.

Degenerate sketches. When Y is numerically rank deficient (rank(A) < s) R is singular:
its inverse gets a round-off shift, and a pair whose directions are parallel
(1 - |s_i^H s_j|^2 below sqrt(eps), e.g. every pair when rank(A) = s - 1) takes
t_j^(i) = t_j instead of dividing round-off by round-off, as XDiag's pairs do. Below
rank s - 1 every t_i is exact and the stderr is 0 whatever the pairs; at rank s - 1 the
t_i are still exact (it was a NaN stderr before this guard). Short Rademacher blocks
(n <= 64, n - s >= 10) are drawn with independent columns
(:meth:`~linop_trace._probes.ProbeSampler.independent`; with fewer spare entries they
stay i.i.d., since conditioning would bias the estimates), and an LU solve that still
meets an exact zero pivot is redone with a wider shift.

Measured coverage of the 95% interval (sphere probes, n = 300, num_matvecs = 60, so
s = 30; the mean of the variance estimate is 0.99, 0.95, 0.95, 0.90 of the true mean
squared error on flat, poly, slowexp, smallstep):

=========  ================  ==================  =====================
spectrum   1000 runs         400 runs            plain, 400 runs
=========  ================  ==================  =====================
flat       95.8%             95.0% (380)         93.3%
poly       95.4%             96.8% (387)         91.0%
slowexp    96.0%             96.3% (385) [*]     85.8% [*]
smallstep  94.4%             95.8% (383) [*]     83.0% [*]
=========  ================  ==================  =====================

(1000 runs: Haar matrix seed 1, probe seeds 5000-5999; 400 runs: ``test_matrix(seed=0)``,
seeds 0-399, [*] ``seed=1``; "plain" is std(t_i)/sqrt(s) with the same quantile.) The
literature's estimate std(t_i)/sqrt(s) stays available as ``info["stderr_plain"]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .. import _backend as backend
from .._estimate import Estimate
from .._operators import LinearOperator
from ._base import (
    EstimationRequest,
    ProbeChoice,
    blocked_matmat,
    column_inner,
    conj,
    hermitian_transpose,
)
from ._hutchinson import concrete_magnitude

__all__ = ["XTrace", "xtrace_core", "xtrace_estimates"]

#: Probes an exchangeable estimate needs for an error estimate. With two, both
#: leave-one-out estimates are one symmetric function of the pair on every diagonal
#: operator under Rademacher probes (XDiag's d^(1) = d^(2), XTrace's t_1 = t_2 on c I), so
#: their spread is 0 while the error is of order 1 / sqrt(n): no stderr (None) then.
ERROR_PROBES = 3

#: Probes for which the improved normalization is unbiased (rotation invariant).
ROTATION_INVARIANT = ("sphere", "gaussian")


def _abs2(x: Any, xp: Any) -> Any:
    return xp.real(xp.conj(x) * x) if backend.is_complex_dtype(xp, x.dtype) else x * x


def _real(x: Any, xp: Any) -> Any:
    return xp.real(x) if backend.is_complex_dtype(xp, x.dtype) else x


def _diag(x: Any, xp: Any) -> Any:
    return xp.linalg.diagonal(x)


def orthonormal_basis(block: Any, xp: Any) -> Any:
    """An orthonormal basis Q of range(block) (the Q of :func:`orthonormal_factors`)."""
    return orthonormal_factors(block, xp)[0]


def orthonormal_factors(block: Any, xp: Any) -> tuple[Any, Any]:
    """A thin QR factorization ``block = Q R``: Q orthonormal, R upper triangular.

    Cholesky QR twice (BLAS-3 products, several times faster than Householder QR on tall
    blocks) when the block is well conditioned, which the first pass reveals; R is then
    the product of the two Cholesky factors, so Q^H block costs no further product.
    Householder QR otherwise (the sketches of decaying spectra are ill conditioned)."""
    try:
        basis, triangular, good = backend.jit(xp, _cholesky_qr2)(xp, block)
    except Exception:  # Cholesky failed (NumPy, torch raise): numerically rank deficient
        good = False
    else:
        good = backend.is_concrete(good) and bool(backend.stop_gradient(good))
    if good:
        return basis, triangular
    return backend.thin_qr(xp, block)


def _cholesky_qr2(xp: Any, block: Any) -> tuple[Any, Any, Any]:
    """Cholesky QR twice, ``(Q, R, worked)``: worked when the first pass's Q^H Q is
    within 0.1 of I (then the second pass restores orthogonality to working precision) and
    no entry is non-finite (JAX's Cholesky returns NaN where others raise).

    block = F L1^H and F = Q L2^H, so R = L2^H L1^H = (L1 L2)^H."""
    first, lower_1 = _cholesky_pass(xp, block, hermitian_transpose(block, xp) @ block)
    gram = hermitian_transpose(first, xp) @ first
    k = gram.shape[0]
    eye = xp.eye(k, dtype=gram.dtype, device=backend.device_of(gram))
    close = xp.max(xp.abs(gram - eye)) < 0.1 if k else xp.asarray(True)
    second, lower_2 = _cholesky_pass(xp, first, gram)
    triangular = hermitian_transpose(lower_1 @ lower_2, xp)
    return second, triangular, close & xp.all(xp.isfinite(second))


def _cholesky_pass(xp: Any, block: Any, gram: Any) -> tuple[Any, Any]:
    """``(block @ L^{-H}, L)`` with ``L L^H = gram = block^H block``."""
    lower = xp.linalg.cholesky(gram)
    return block @ hermitian_transpose(xp.linalg.inv(lower), xp), lower


def extend_basis(basis: Any, block: Any, xp: Any) -> Any:
    """Orthonormal columns spanning range(block) outside range(basis) (block Gram-Schmidt
    with re-orthogonalization, so ``[basis, new]`` is orthonormal to working precision)."""
    for _ in range(2):
        block = block - basis @ (hermitian_transpose(basis, xp) @ block)
    new = orthonormal_basis(block, xp)
    new = new - basis @ (hermitian_transpose(basis, xp) @ new)
    return orthonormal_basis(new, xp)


def regularized_inverse_h(triangular: Any, xp: Any) -> Any:
    """R^{-H} of the triangular factor of a sketch, finite even when R is singular.

    A numerically singular R (A of low rank, or zero on the probes: exact zeros on the
    diagonal of R) gets a shift at round-off level, eps max|R_ij| (eps when R = 0), so
    its columns stay finite; the directions they give only matter where Y has rank to
    spare. Should the LU factorization of the solve still meet an exact zero pivot (two
    equal +-1 probes make R singular with round-off diagonals above that shift), the
    shift is sqrt(eps) max|R_ij| instead. Without branches under JAX jit (both solves,
    the finite one kept), so it compiles with the rest of the algebra."""
    s = triangular.shape[0]
    eye = xp.eye(s, dtype=triangular.dtype, device=backend.device_of(triangular))
    if not s:
        return eye
    eps = float(xp.finfo(_real(triangular, xp).dtype).eps)
    fixed = xp.abs(backend.stop_gradient(triangular))
    scale = xp.max(fixed)
    scale = xp.where(scale > 0, scale, xp.ones_like(scale))
    small = xp.any(_diag(fixed, xp) < eps * scale)
    shifted = xp.where(small, triangular + _as(eps * scale, triangular.dtype, xp) * eye, triangular)
    try:
        inverse_h = xp.linalg.solve(hermitian_transpose(shifted, xp), eye)
        finite = backend.all_finite(xp, inverse_h)
    except Exception:  # NumPy and torch raise on an exact zero pivot
        inverse_h, finite = None, False
    if finite:
        return inverse_h
    wider = triangular + _as(math.sqrt(eps) * scale, triangular.dtype, xp) * eye
    fallback = xp.linalg.solve(hermitian_transpose(wider, xp), eye)
    if inverse_h is None or finite is False:
        return fallback
    return xp.where(xp.all(xp.isfinite(inverse_h)), inverse_h, fallback)  # JAX jit


def _downdate_directions(triangular: Any, xp: Any) -> Any:
    """Columns of R^{-H}, normalized: s_i spans range(Q) minus range(Y without column i)
    (:func:`regularized_inverse_h` when R is singular)."""
    inverse_h = regularized_inverse_h(triangular, xp)
    norms = xp.sqrt(xp.sum(_abs2(inverse_h, xp), axis=0))
    return inverse_h / xp.astype(norms, inverse_h.dtype)


def xtrace_estimates(
    probes: Any,
    images: Any,
    basis: Any,
    basis_images: Any,
    xp: Any,
    improved: bool = True,
    directions: Any = None,
    triangular: Any = None,
) -> dict[str, Any]:
    """The XTrace leave-one-out estimates and the pseudo-values, from given products.

    Pure linear algebra, no operator and no randomness.

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
    directions : array (s, s), optional
        The downdate directions of ``Q^H Y`` for this very ``basis`` (computed if absent).
    triangular : array (s, s), optional
        ``R = Q^H Y`` for this very ``basis`` (computed if absent), e.g. from
        :func:`orthonormal_factors`.

    Returns
    -------
    dict
        ``estimates`` t_i (s,), ``pseudo`` p_i (s,), ``value`` mean of t_i,
        ``stderr`` (honest), ``stderr_plain`` (std(t)/sqrt(s)).
    """
    program = backend.jit(xp, _xtrace_program, num_static=2)
    out = program(xp, improved, probes, images, basis, basis_images, directions, triangular)
    s = probes.shape[1]
    if s < ERROR_PROBES:
        out.update(stderr=None, stderr_plain=None, dof=None)
        out.pop("cross_mean", None)
        out.pop("cross_spread", None)
        return out
    out["dof"] = satterthwaite_dof(s, out.pop("cross_mean"), out.pop("cross_spread"))
    return out


def _xtrace_program(
    xp: Any,
    improved: bool,
    probes: Any,
    images: Any,
    basis: Any,
    basis_images: Any,
    directions: Any,
    triangular: Any,
) -> dict[str, Any]:
    """Everything after the products: estimates, pseudo-values and error terms (JAX
    compiles it as one program; eager JAX pays for every small operation)."""
    r = hermitian_transpose(basis, xp) @ images if triangular is None else triangular  # Q^H Y
    sdir = _downdate_directions(r, xp) if directions is None else directions
    estimates, pseudo = _xtrace_algebra(xp, improved, probes, images, basis, basis_images, r, sdir)
    s = probes.shape[1]
    value = xp.mean(estimates)
    out = {"estimates": estimates, "pseudo": pseudo, "value": value}
    if s >= 2:
        out.update(exchangeable_error_terms(estimates, pseudo, value, xp))
    return out


def exchangeable_error_terms(estimates: Any, pseudo: Any, value: Any, xp: Any) -> dict[str, Any]:
    """:func:`error_terms` of exchangeable estimates t_i (mean ``value``) and their
    pseudo-values p_i, and the usual jackknife's ``stderr_jackknife`` sqrt(var(p) / s)."""
    s = int(estimates.shape[0])
    dev_t = estimates - value
    dev_p = pseudo - xp.mean(pseudo)
    out = error_terms(_real(conj(dev_t, xp) * dev_p, xp), _abs2(dev_t, xp), xp)
    out["stderr_jackknife"] = xp.sqrt(xp.sum(_abs2(dev_p, xp)) / (s * (s - 1)))
    return out


def _xtrace_algebra(
    xp: Any,
    improved: bool,
    probes: Any,
    images: Any,
    basis: Any,
    basis_images: Any,
    r: Any,
    sdir: Any,
) -> tuple[Any, Any]:
    """The estimates t_i and pseudo-values p_i: pure array algebra after the products and
    the downdate directions (JAX compiles it as one program)."""
    n, s = probes.shape
    ctype = probes.dtype
    qh = hermitian_transpose(basis, xp)
    h = qh @ basis_images  # Q^H A Q
    w = qh @ probes  # Q^H Omega
    t = hermitian_transpose(basis_images, xp) @ probes  # (A Q)^H Omega: column j is Q^H A^H w_j
    omega_y = column_inner(probes, images, xp)  # w_j^H A w_j
    omega_norm2 = _real(column_inner(probes, probes, xp), xp)
    w_norm2 = xp.sum(_abs2(w, xp), axis=0)
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
    trace_h = xp.sum(_diag(h, xp))
    residual_norm2 = omega_norm2 - w_norm2  # |wbar_j|^2

    # one left out: P_i w_i = Q s_i alpha_i
    alpha = _diag(sw, xp)
    shs_d = _diag(shs, xp)
    quad = a + _diag(vs, xp) * alpha + conj(alpha, xp) * _diag(su, xp) + _abs2(alpha, xp) * shs_d
    xnorm2 = residual_norm2 + _abs2(alpha, xp)
    scale = (n - s + 1) / xnorm2 if improved else 1.0
    estimates = trace_h - shs_d + _as(scale, ctype, xp) * quad

    # two left out [i, j]: probe i removed, j the Hutchinson probe; projector onto
    # span(s_i, s_j) in the s-space with Gram [[1, c], [conj c, 1]], c = s_i^H s_j.
    # Where 1 - |c|^2 = |s_i - conj(c) s_j|^2 vanishes (s_i parallel to s_j: Y numerically
    # rank deficient, e.g. rank(A) = s - 1) span(s_i, s_j) = span(s_j): the pair takes
    # t_j^(i) = t_j instead of dividing round-off by round-off (as XDiag's pairs do)
    c = gram
    det = 1 - _abs2(c, xp)
    eye = xp.eye(s, dtype=det.dtype, device=backend.device_of(det))
    parallel = (det <= math.sqrt(float(xp.finfo(det.dtype).eps))) & (eye == 0)
    det = xp.where(parallel, xp.ones_like(det), det) + eye  # the diagonal is unused
    sw_jj = alpha[None, :]
    coef_i = (sw - c * sw_jj) / _as(det, ctype, xp)
    coef_j = (sw_jj - conj(c, xp) * sw) / _as(det, ctype, xp)
    quad2 = (
        a[None, :]
        + xp.matrix_transpose(vs) * coef_i
        + _diag(vs, xp)[None, :] * coef_j
        + conj(coef_i, xp) * su
        + conj(coef_j, xp) * _diag(su, xp)[None, :]
        + _abs2(coef_i, xp) * shs_d[:, None]
        + conj(coef_i, xp) * coef_j * shs
        + conj(coef_j, xp) * coef_i * xp.matrix_transpose(shs)
        + _abs2(coef_j, xp) * shs_d[None, :]
    )
    proj_norm2 = (
        _abs2(coef_i, xp) + _abs2(coef_j, xp) + 2 * _real(conj(coef_i, xp) * c * coef_j, xp)
    )
    xnorm2_pair = residual_norm2[None, :] + proj_norm2
    trace_pair = (
        shs_d[:, None] + shs_d[None, :] - c * xp.matrix_transpose(shs) - conj(c, xp) * shs
    ) / _as(det, ctype, xp)
    scale2 = (n - s + 2) / (xnorm2_pair + eye) if improved else 1.0
    pair = trace_h - trace_pair + _as(scale2, ctype, xp) * quad2
    pair = xp.where(parallel, xp.broadcast_to(estimates[None, :], pair.shape), pair)
    offdiag = 1 - eye
    # p_i = t_i + sum_{j != i} (t_j - t_j^(i))
    influence = xp.sum(_as(offdiag, ctype, xp) * (estimates[None, :] - pair), axis=1)
    pseudo = estimates + influence

    return estimates, pseudo


def honest_error(cross: Any, square: Any, xp: Any) -> dict[str, Any]:
    """Standard errors and Student-t degrees of freedom from the per-probe products.

    ``cross`` holds (t_i - t_bar)(p_i - p_bar), ``square`` (t_i - t_bar)^2. The variance
    estimate is ``max(sum cross, sum square) / (s (s - 1))``; its degrees of freedom are
    Satterthwaite's ``2 s mean(cross)^2 / var(cross)`` (s - 1 for normal t_i, fewer when a
    few probes dominate), clipped to [2, s - 1] and rounded down.
    """
    out = error_terms(cross, square, xp)
    out["dof"] = satterthwaite_dof(
        int(cross.shape[0]), out.pop("cross_mean"), out.pop("cross_spread")
    )
    return out


def error_terms(cross: Any, square: Any, xp: Any) -> dict[str, Any]:
    """The arrays behind :func:`honest_error` (pure, compilable): ``stderr``,
    ``stderr_plain``, and the mean and sample variance of ``cross`` over max |cross|
    (gradient cut: they only shape the interval) for the degrees of freedom."""
    s = int(cross.shape[0])
    plain_var = xp.sum(square) / (s * (s - 1))
    cross_var = xp.sum(cross) / (s * (s - 1))
    # the dof is scale-free; squares of 1e160 are not finite
    fixed, _ = backend.divide_by_largest(xp, backend.stop_gradient(cross))
    mean = xp.mean(fixed)
    return {
        "stderr": xp.sqrt(xp.maximum(cross_var, plain_var)),
        "stderr_plain": xp.sqrt(plain_var),
        "cross_mean": mean,
        "cross_spread": xp.sum((fixed - mean) ** 2) / (s - 1),
    }


def satterthwaite_dof(s: int, mean: Any, spread: Any) -> int:
    """Satterthwaite's ``2 s mean^2 / spread`` clipped to [2, s - 1], rounded down; s - 1
    (normal theory) when the values are not concrete (JAX jit)."""
    mean = backend.concrete_float(mean)
    spread = backend.concrete_float(spread) if mean is not None else None
    if mean is None or spread is None:
        return s - 1
    raw = s - 1 if spread == 0 or s < 3 else 2 * s * (mean / math.sqrt(spread)) ** 2
    return int(min(max(raw if mean > 0 else 2, 2), s - 1))


def _as(x: Any, dtype: Any, xp: Any) -> Any:
    """Cast a real array (or float) to the working dtype for mixed products."""
    if isinstance(x, float):
        return x
    return x if x.dtype == dtype else xp.astype(x, dtype)


def xtrace_core(
    matmat: Callable[[Any], Any], probes: Any, xp: Any, improved: bool = True
) -> dict[str, Any]:
    """XTrace with the probe block ``probes`` (n, s): products ``A Omega`` then ``A Q``.

    Parameters
    ----------
    matmat : callable
        ``X -> A X`` (two calls with s columns each).
    probes : array (n, s)
    xp : namespace
    improved : bool
        The improved normalization (rotation-invariant probes only).

    Returns
    -------
    dict
        What :func:`xtrace_estimates` returns, plus the products ``probes``,
        ``images``, ``basis``, ``basis_images`` (to extend the estimate later).
    """
    images = matmat(probes)
    basis = orthonormal_basis(images, xp)
    basis_images = matmat(basis)
    out = xtrace_estimates(probes, images, basis, basis_images, xp, improved)
    out.update(probes=probes, images=images, basis=basis, basis_images=basis_images)
    return out


class XTrace(ProbeChoice):
    """XTrace: exchangeable trace estimation with an honest error bar.

    Uses ``num_matvecs // 2`` probes (at most n) and as many products with their
    orthonormalized images, in two block products (more if ``block_size`` is smaller).

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
    (an exact variance identity for exchangeable estimates), floored at the plain
    estimate; ``dof`` (Satterthwaite) sets the Student-t quantile of :meth:`ci`.
    Measured coverage of the 95% interval (n = 300, num_matvecs = 60, 400 seeded runs):
    95.0% on the flat spectrum and 96.8% on the polynomial one, where the literature's
    std(t_i) / sqrt(s) covers 93.3% and 91.0% (1000 runs: 95.8% and 95.4%). That
    plain estimate is kept as ``info["stderr_plain"]`` for comparison with the
    literature, the usual jackknife (too large) as ``info["stderr_jackknife"]``.

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

    def trace(self, operator: LinearOperator, request: EstimationRequest) -> Estimate:
        sampler = self._sampler(request)
        improved = sampler.kind in ROTATION_INVARIANT
        n = operator.shape[0]
        num_probes = min(request.num_matvecs // 2, n)
        state = xtrace_start(operator, request, sampler, num_probes)
        return xtrace_finish(operator, request, sampler, state, improved, self.name)


def xtrace_start(
    operator: LinearOperator,
    request: EstimationRequest,
    sampler: Any,
    num_probes: int,
    probes: Any = None,
    images: Any = None,
) -> dict[str, Any]:
    """Probes and their images (the first half of XTrace's products).

    ``probes``/``images`` already multiplied (by ``method="auto"``) are completed to
    ``num_probes`` columns rather than drawn again. A caller that has the basis of
    ``images`` (and its downdate directions) may add them to the state as ``"basis"``
    (and ``"directions"``) when no columns were added."""
    xp = operator.xp
    product = blocked_matmat(operator, request)
    have = 0 if probes is None else int(probes.shape[1])
    if have < num_probes:
        fresh = sampler.independent(num_probes - have, probes)
        fresh_images = product(fresh)
        probes = fresh if probes is None else xp.concat([probes, fresh], axis=1)
        images = fresh_images if images is None else xp.concat([images, fresh_images], axis=1)
    return {"probes": probes, "images": images}


def xtrace_finish(
    operator: LinearOperator,
    request: EstimationRequest,
    sampler: Any,
    state: dict[str, Any],
    improved: bool,
    name: str,
) -> Estimate:
    """The second half of XTrace (A Q), then the estimate; doubling with a tolerance."""
    xp = operator.xp
    n = operator.shape[0]
    product = blocked_matmat(operator, request)
    probes, images = state["probes"], state["images"]
    basis, triangular = state.get("basis"), None
    if basis is None:
        basis, triangular = orthonormal_factors(images, xp)
    basis_images = product(basis)
    result = xtrace_estimates(
        probes, images, basis, basis_images, xp, improved, state.get("directions"), triangular
    )
    converged = None
    if request.adaptive:
        from scipy import stats

        converged = False
        cap = request.max_matvecs or request.num_matvecs
        while True:
            s = int(probes.shape[1])
            if result["stderr"] is not None:
                magnitude = concrete_magnitude(result["value"])
                spread = backend.concrete_float(result["stderr"])
                if magnitude is None or spread is None:  # undecidable (JAX jit)
                    break
                quantile = float(stats.t.ppf(0.5 + request.confidence / 2, result["dof"]))
                target = max(request.atol or 0.0, (request.rtol or 0.0) * magnitude)
                if quantile * spread <= target:
                    converged = True
                    break
            more = min(s, (cap - request.matmat.columns) // 2, n - s)
            if more < 1:
                break
            fresh = sampler.independent(more, probes)
            fresh_images = product(fresh)
            new_basis = extend_basis(basis, fresh_images, xp)
            new_images = product(new_basis)
            probes = xp.concat([probes, fresh], axis=1)
            images = xp.concat([images, fresh_images], axis=1)
            basis = xp.concat([basis, new_basis], axis=1)
            basis_images = xp.concat([basis_images, new_images], axis=1)
            result = xtrace_estimates(probes, images, basis, basis_images, xp, improved)
    return exchangeable_estimate(
        result, request, sampler, int(probes.shape[1]), improved, name, converged
    )


def exchangeable_estimate(
    result: dict[str, Any],
    request: EstimationRequest,
    sampler: Any,
    num_probes: int,
    improved: bool,
    name: str,
    converged: bool | None = None,
) -> Estimate:
    """The :class:`Estimate` of XTrace or XNysTrace from their estimates' dict."""
    return Estimate(
        result["value"],
        result["stderr"],
        request.matmat.columns,
        name,
        converged=converged,
        dof=result["dof"],
        info={
            "probe": sampler.kind,
            "num_probes": num_probes,
            "normalization": "improved" if improved else "plain",
            "estimates": result["estimates"],
            "pseudo_values": result["pseudo"],
            "stderr_plain": result["stderr_plain"],
            "stderr_jackknife": result.get("stderr_jackknife"),
        },
    )
