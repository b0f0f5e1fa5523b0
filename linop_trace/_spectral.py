"""Spectral sums of self-adjoint operators: ``tr f(A)`` by stochastic Lanczos quadrature.

For a probe z, k steps of Lanczos from q_1 = z / |z| give a k x k tridiagonal T_k whose
eigenvalues theta_i (Ritz values) and first eigenvector components u_1i are the nodes and
square-root weights of a k-point Gauss quadrature of the spectral measure of A seen from
q_1, so that

    z^H f(A) z  ~  |z|^2 sum_i u_1i^2 f(theta_i) = |z|^2 e_1^T f(T_k) e_1

(exact for polynomials of degree 2k - 1). The mean over independent probes estimates
tr f(A) (Ubaru, Chen and Saad 2017). Every probe runs at once: each Lanczos step is one
``matmat`` of all probe columns, through the same counted product as every estimate.

The interval combines two errors: the Monte-Carlo standard error of the probe samples
(a t-interval, shape-corrected as Hutchinson's) and the quadrature error, bounded per
probe by the distance from the Gauss rule to the Gauss-Radau rules with a node fixed at
either end of the spectrum (Golub and Meurant: for log, inverse, exp and sqrt the Gauss
rule and one Radau rule bracket the integral), averaged over the probes; it is reported
as ``info["systematic_error"]`` and added to the interval's half-width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _backend as backend
from ._blocks import probe_block_size
from ._estimate import DeferredCheck, Estimate
from ._operators import LinearOperator, aslinearoperator, widened
from ._probes import ProbeSampler
from ._stats import sample_mean
from ._validation import check_positive_int, check_square, check_tolerance
from .estimators._adaptive import traced_tolerance_error
from .estimators._base import CountingMatmat
from .estimators._linalg import extend_basis, orthonormal_basis, project_out

__all__ = [
    "DEFAULT_LANCZOS_STEPS",
    "DEFAULT_NUM_PROBES",
    "lanczos_quadrature",
    "logdet",
    "trace_exp",
    "trace_function",
    "trace_inverse",
]

#: Lanczos steps per probe when ``lanczos_steps`` is not given: Gauss quadrature with 20
#: nodes integrates log, inverse and exp to near machine precision on spectra with a
#: condition number up to ~10^3 (the error falls like ((sqrt(kappa) - 1) /
#: (sqrt(kappa) + 1))^(2k)); the quadrature error in ``info`` says when it does not.
DEFAULT_LANCZOS_STEPS = 20
#: Probes when ``num_matvecs`` is not given (the budget is probes x Lanczos steps).
DEFAULT_NUM_PROBES = 20
#: Most probes an estimate with ``rtol``/``atol`` runs when ``max_matvecs`` is not given.
DEFAULT_MAX_PROBES = 200
METHODS = ("slq", "slq++", "exact")
#: Share of an ``"slq++"`` budget spent on the block Krylov space that is deflated.
DEFLATION_SHARE = 1 / 3


def _log(xp: Any, x: Any) -> Any:
    return xp.log(x)


def _inverse(xp: Any, x: Any) -> Any:
    return 1 / x


def _exp(xp: Any, x: Any) -> Any:
    return xp.exp(x)


def _sqrt(xp: Any, x: Any) -> Any:
    return xp.sqrt(x)


#: Named functions: (f(xp, eigenvalues), whether it needs a positive definite operator).
NAMED_FUNCTIONS: dict[str, tuple[Callable[[Any, Any], Any], bool]] = {
    "log": (_log, True),
    "inverse": (_inverse, True),
    "exp": (_exp, False),
    "sqrt": (_sqrt, True),
}


def _resolve_function(f: Any) -> tuple[Callable[[Any, Any], Any], str, bool]:
    """``(f(xp, x), name, needs positive definite)`` for a name or a callable ``f(x)``."""
    if isinstance(f, str):
        if f not in NAMED_FUNCTIONS:
            raise ValueError(
                f"unknown function {f!r}; named functions are {', '.join(NAMED_FUNCTIONS)}, "
                "or pass a callable on an array of eigenvalues"
            )
        function, positive = NAMED_FUNCTIONS[f]
        return function, f, positive
    if not callable(f):
        raise TypeError(f"f must be a function name or a callable, got {type(f).__name__}")
    name = getattr(f, "__name__", type(f).__name__)
    return (lambda xp, x: f(x)), name, False


def _on_positive(function: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``function`` with non-positive arguments mapped to NaN first."""

    def guarded(xp: Any, x: Any) -> Any:
        return function(xp, xp.where(x > 0, x, xp.full_like(x, math.nan)))

    return guarded


# ------------------------------------------------------------------------- Lanczos
def batched_lanczos(
    matmat: Callable[[Any], Any], probes: Any, steps: int, xp: Any, reorthogonalize: bool
) -> tuple[Any, Any]:
    """``steps`` Lanczos steps from every column of ``probes`` at once, one ``matmat`` of
    all columns per step. Returns ``(alphas, betas)``, real arrays of shapes (m, steps)
    and (m, steps): ``betas[:, j]`` couples steps j and j + 1, and the last is the norm of
    the residual after the last step (what the Gauss-Radau rules need; no product).

    A column whose Krylov space is exhausted (beta below n eps |T|) stops: its later
    vectors are zero, its couplings zero, and its later diagonal entries repeat its first
    Rayleigh quotient, a point inside the spectrum, so that the decoupled block adds nodes
    of zero weight where f is finite. With ``reorthogonalize``, each new vector is made
    orthogonal to all earlier ones of its column (classical Gram-Schmidt, twice)."""
    n, m = probes.shape
    real = backend.real_dtype_for(xp, probes.dtype)
    norms = xp.sqrt(backend.real_part(xp, backend.column_inner(xp, probes, probes)))
    q = probes / xp.astype(norms, probes.dtype)
    previous = None
    beta = None
    # with reorthogonalisation, every probe's vectors as the rows of one preallocated
    # (m, steps, n) block (probe-major: one batched matrix-vector product per probe);
    # concatenating a growing list copied the whole basis at every step (13x slower at
    # n = 10^5, m = 20, 30 steps)
    basis = (
        xp.empty((m, steps, n), dtype=q.dtype, device=backend.device_of(probes))
        if reorthogonalize
        else None
    )
    alphas: list[Any] = []
    betas: list[Any] = []
    eps = float(xp.finfo(real).eps)
    live = xp.ones((m,), dtype=xp.bool, device=backend.device_of(probes))
    scale = xp.zeros((m,), dtype=real, device=backend.device_of(probes))
    # without reorthogonalisation, where arrays can be written (NumPy, torch's CPU), the
    # recurrence writes into four reused blocks (a fresh (n, m) result per operation
    # costs its page faults: 3x the arithmetic, measured on a 2-d Laplacian, where the
    # products are as cheap as the vector work)
    in_place = not reorthogonalize and backend.writes_in_place(q)
    # the products' finiteness is checked once, through the alphas (cover_all below)
    counting = matmat if isinstance(matmat, CountingMatmat) else None
    covered = counting is not None and counting.check_finite
    work = xp.empty_like(q) if in_place else None
    scratch = xp.empty_like(q) if in_place else None
    for step in range(steps):
        if basis is not None:
            basis = backend.with_slot(
                xp, basis, (slice(None), step, slice(None)), xp.matrix_transpose(q)
            )
        # the product into the block the recurrence writes, where it can (its fresh pages
        # otherwise: torch's CSR products took 3.7x as long, see product_into)
        if counting is not None:
            w = counting(q, out=work if in_place else None, covered=covered)
        else:
            w = matmat(q)
        alpha = backend.real_part(xp, backend.column_inner(xp, q, w))
        alphas.append(alpha)
        writable = in_place and backend.writes_in_place(w)  # (no gradient flows through w)
        if writable:
            w = _three_term_in_place(xp, w, q, alpha, previous, beta, work, scratch)
        else:
            w = w - xp.astype(alpha, w.dtype) * q
            if previous is not None:
                w = w - xp.astype(beta, w.dtype) * previous
        if basis is not None:
            w = _reorthogonalized(w, basis[:, : step + 1, :], xp)
        # the norm with a zero gradient at zero: an exhausted Krylov space (A = 2 I) leaves
        # w = 0 exactly, and sqrt's derivative there made the whole gradient NaN
        squared = backend.real_part(xp, backend.column_inner(xp, w, w))
        positive = squared > 0
        root = xp.sqrt(xp.where(positive, squared, xp.ones_like(squared)))
        beta = xp.where(positive, root, xp.zeros_like(squared))
        scale = xp.maximum(scale, xp.abs(alpha) + beta)
        live = live & (beta > n * eps * scale)
        beta = xp.where(live, beta, xp.zeros_like(beta))
        betas.append(beta)
        if step == steps - 1:
            break  # (the last coupling serves the Gauss-Radau rules; no further vector)
        # 1 / beta where live, 0 where stopped: the next vector in one scaling pass
        safe = xp.where(live, beta, xp.ones_like(beta))
        inverse = xp.astype(xp.where(live, 1 / safe, xp.zeros_like(safe)), w.dtype)
        if writable:  # the block two steps back is free again
            target = xp.empty_like(q) if previous is None else previous
            previous, q = q, xp.multiply(w, inverse, out=target)
        else:
            previous, q = q, w * inverse
    alpha_array = xp.stack(alphas, axis=1)
    if counting is not None and covered:
        counting.cover_all(alpha_array)
    beta_array = xp.stack(betas, axis=1)
    # steps after a column stopped (its couplings are zero from there on): its first
    # Rayleigh quotient on the diagonal
    started = xp.concat(
        [xp.ones((m, 1), dtype=xp.bool, device=backend.device_of(probes)), beta_array[:, :-1] > 0],
        axis=1,
    )
    alpha_array = xp.where(started, alpha_array, alpha_array[:, :1])
    return alpha_array, beta_array


def _reorthogonalized(w: Any, stacked: Any, xp: Any) -> Any:
    """Each column of ``w`` (n, m) made orthogonal to its probe's earlier vectors, the
    rows of ``stacked[probe]`` (m, j, n): classical Gram-Schmidt twice, each pass one
    batched matrix-vector product each way per probe, on ``w`` held probe-major."""
    m, n = stacked.shape[0], stacked.shape[2]
    conjugated = backend.conj(xp, stacked)
    rows = xp.reshape(xp.matrix_transpose(w), (m, 1, n))  # (m, 1, n): a probe's vector a row
    for _ in range(2):
        coefficients = conjugated @ xp.matrix_transpose(rows)  # (m, j, 1)
        rows = rows - xp.matrix_transpose(coefficients) @ stacked  # (m, 1, n)
    return xp.matrix_transpose(xp.reshape(rows, (m, n)))


def _three_term_in_place(
    xp: Any, w: Any, q: Any, alpha: Any, previous: Any, beta: Any, work: Any, scratch: Any
) -> Any:
    """``w - q alpha - previous beta`` (column scalings) written into ``work`` (which may
    be ``w``)."""
    backend.subtract_scaled_columns(xp, w, q, alpha, work, scratch)
    if previous is not None:
        backend.subtract_scaled_columns(xp, work, previous, beta, work, scratch)
    return work


def _tridiagonal(alphas: Any, betas: Any, xp: Any) -> Any:
    """The (m, k, k) symmetric tridiagonal matrices of Lanczos coefficients."""
    k = alphas.shape[1]
    device = backend.device_of(alphas)
    eye = xp.eye(k, dtype=alphas.dtype, device=device)
    upper = xp.eye(k, k, k=1, dtype=alphas.dtype, device=device)
    off = betas[:, :, None] * upper
    return alphas[:, :, None] * eye + off + xp.matrix_transpose(off)


def _rule(alphas: Any, betas: Any, function: Callable[[Any, Any], Any], xp: Any) -> Any:
    """e_1^T f(T) e_1 for each probe's tridiagonal T: the eigenvalues are the nodes, the
    squared first components of the eigenvectors the weights."""
    nodes, vectors = xp.linalg.eigh(_tridiagonal(alphas, betas, xp))
    return xp.sum(vectors[:, 0, :] ** 2 * function(xp, nodes), axis=1)


def _radau_rules(
    alphas: Any,
    betas: Any,
    ends: tuple[Any, Any],
    function: Callable[[Any, Any], Any],
    xp: Any,
    decomposition: tuple[Any, Any],
) -> tuple[Any, Any]:
    """The (k+1)-point Gauss-Radau rules with one node fixed at each of ``ends`` (0-d
    arrays): T_k extended by the last coupling beta_k and the diagonal entry
    phi = end + beta_k^2 e_k^T (T_k - end I)^-1 e_k, which makes ``end`` an eigenvalue.

    e_k^T (T_k - end I)^-1 e_k = sum_i u_ki^2 / (theta_i - end) from T_k's eigenpairs
    ``decomposition`` (no solve: T_k - end I is singular when the Krylov space is
    invariant, e.g. A = c I, where beta_k = 0 and the extension adds a node of weight 0;
    a Ritz value at ``end`` then contributes nothing).

    Both rules' matrices go to one batched ``eigh``: under JAX on the CPU, two batched
    eigensolvers that a program can run at once each wait on the thread pool that the
    other holds (jaxlib 0.10, LAPACK's batches split over the intra-op pool: a program
    of a log-determinant's gradient hung, intermittently, on a two-core machine)."""
    nodes, vectors = decomposition
    last = betas[:, -1]
    m = alphas.shape[0]
    extended_alphas, extended_betas = [], []
    for end in ends:
        gap = nodes - end
        safe = xp.where(gap == 0, xp.ones_like(gap), gap)
        delta = xp.sum(
            xp.where(gap == 0, xp.zeros_like(gap), vectors[:, -1, :] ** 2 / safe), axis=1
        )
        phi = end + last * (last * delta)  # (last**2 overflowed at |A| ~ 1e20 in float32)
        extended_alphas.append(xp.concat([alphas, phi[:, None]], axis=1))
        extended_betas.append(xp.concat([betas, xp.zeros_like(last)[:, None]], axis=1))
    rules = _rule(
        xp.concat(extended_alphas, axis=0), xp.concat(extended_betas, axis=0), function, xp
    )
    return rules[:m], rules[m:]


def spectrum_ends(
    alphas: Any, betas: Any, xp: Any, decomposition: tuple[Any, Any]
) -> tuple[Any, Any]:
    """Estimated ends of the spectrum from every probe's Ritz pairs ``decomposition``
    (the eigenpairs of its tridiagonal): min (theta - r) and max (theta + r) over the
    Ritz values theta with residual norms r = beta_k |u_k| (each [theta - r, theta + r]
    holds an eigenvalue; the extreme Ritz values converge first)."""
    k = alphas.shape[1]
    nodes, vectors = decomposition
    residuals = xp.abs(betas[:, k - 1 : k] * vectors[:, k - 1, :])
    return xp.min(nodes - residuals), xp.max(nodes + residuals)


def lanczos_quadrature(
    alphas: Any,
    betas: Any,
    function: Callable[[Any, Any], Any],
    xp: Any,
    ends: tuple[Any, Any] | None = None,
    positive: bool = False,
) -> tuple[Any, Any, Any, Any]:
    """Gauss quadrature of ``function`` from each probe's Lanczos coefficients, with the
    Gauss-Radau rules at both ends of the spectrum that bound its error.

    Returns ``(values, error, nodes, weights)``: e_1^T f(T_k) e_1 per probe; per probe
    max |R_end - G| over the two Gauss-Radau rules R at ``ends`` (``(low, high)``,
    0-d arrays; estimated by :func:`spectrum_ends` when ``None``, and then with
    ``positive`` the low end is kept above zero, at least the smallest Ritz value over
    :data:`LOW_END_DIVISOR`; either end moved outwards off the Ritz values by a relative
    sqrt(eps)); and the nodes
    (Ritz values) and weights (squared first components, summing to 1), shapes (m, k).

    For f whose derivatives of orders 2k and 2k + 1 keep their signs on the spectrum (log,
    inverse, exp, sqrt), the Gauss rule and one of the Radau rules bracket
    z^H f(A) z / |z|^2 (Golub and Meurant), so ``error`` bounds the quadrature error
    when the ends enclose the spectrum.

    A probe whose coefficients are not all finite (a non-finite product: its check
    raises when the estimate is read) gets NaN throughout: its tridiagonal goes to the
    eigensolver as the identity, since torch's and NumPy's refuse NaN with a LinAlgError
    of their own, which would name the eigensolver instead of the product."""
    finite = xp.all(xp.isfinite(alphas), axis=1) & xp.all(xp.isfinite(betas), axis=1)
    alphas = xp.where(finite[:, None], alphas, xp.ones_like(alphas))
    betas = xp.where(finite[:, None], betas, xp.zeros_like(betas))
    values, error, nodes, weights = _quadrature(alphas, betas, function, xp, ends, positive)
    nan = xp.asarray(math.nan, dtype=values.dtype, device=backend.device_of(values))
    values, error = xp.where(finite, values, nan), xp.where(finite, error, nan)
    nodes = xp.where(finite[:, None], nodes, nan)
    weights = xp.where(finite[:, None], weights, nan)
    return values, error, nodes, weights


#: With ``positive`` and estimated ends, the low end is at least the smallest Ritz value
#: over this divisor (else the residual bound min(theta - r), often <= 0 for an
#: ill-conditioned operator, would put the Gauss-Radau node where f is undefined). An
#: estimate, not a bound: Ritz values approach lambda_min from above, and with few steps
#: on a wide spectrum the smallest is many times lambda_min. Measured 95% coverage over
#: 60 seeds, 20 probes (divisor 2 / 10): eigenvalues logspace(-2, 2), n = 100, tr A^-1 at
#: k = 20 0.58 / 1.00, log det at k = 5 0.02 / 1.00; linspace(1e-3, 1), tr A^-1 at k = 5
#: 0.00 / 0.77; unchanged where the steps resolve the low end (flat 1..3; 0.01 + 5 x
#: 0.98^i at k = 20). Known bounds (``spectrum_bounds``) are used as given.
LOW_END_DIVISOR = 10


def _quadrature(
    alphas: Any,
    betas: Any,
    function: Callable[[Any, Any], Any],
    xp: Any,
    ends: tuple[Any, Any] | None,
    positive: bool,
) -> tuple[Any, Any, Any, Any]:
    """:func:`lanczos_quadrature` of finite coefficients."""
    tridiagonal = _tridiagonal(alphas, betas, xp)
    # the value with the gradient of backend.gauss_rule (torch: not through the
    # eigenvectors), with the nodes and weights for the error bounds and the checks
    values, nodes, vectors = backend.gauss_rule(xp, tridiagonal, function)
    weights = vectors[:, 0, :] ** 2
    if ends is None:
        low, high = spectrum_ends(alphas, betas, xp, (nodes, vectors))
        if positive:  # (an estimate: see lanczos_quadrature)
            low = xp.maximum(low, xp.min(nodes) / LOW_END_DIVISOR)
    else:  # known bounds, as given: a bound raised above lambda_min no longer brackets
        low, high = ends
    # The fixed node kept off the Ritz values by a relative sqrt(eps): a Ritz value that
    # converged onto a given end (the exact lambda_max) left a gap theta - end of rounding
    # size, either sign, and the extended rule a node far outside the spectrum (NaN for
    # log). Moving an end outwards keeps the bracket; the margin is below any error bound
    # that matters.
    margin = math.sqrt(float(xp.finfo(nodes.dtype).eps))
    top, bottom = xp.max(nodes), xp.min(nodes)
    high = xp.maximum(high, top + margin * xp.abs(top))
    if positive:
        low = xp.minimum(low, bottom * (1 - margin))
    else:
        low = xp.minimum(low, bottom - margin * xp.maximum(xp.abs(bottom), xp.abs(top)))
    at_low, at_high = _radau_rules(alphas, betas, (low, high), function, xp, (nodes, vectors))
    error = xp.maximum(xp.abs(at_low - values), xp.abs(at_high - values))
    return values, error, nodes, weights


# ------------------------------------------------------------------------- functions
def trace_function(
    A: Any,
    f: Any,
    method: str = "slq",
    num_matvecs: int | None = None,
    lanczos_steps: int | None = None,
    seed: Any = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_matvecs: int | None = None,
    probe: str = "rademacher",
    reorthogonalize: bool = False,
    spectrum_bounds: tuple[float, float] | None = None,
    block_size: int | None = None,
    check_finite: bool = True,
) -> Estimate:
    """Estimate ``tr f(A)`` of a self-adjoint operator by stochastic Lanczos quadrature.

    Parameters
    ----------
    A : LinearOperator or matrix
        Self-adjoint (symmetric or Hermitian): Lanczos assumes it and cannot check it.
    f : str or callable
        ``"log"``, ``"inverse"``, ``"exp"``, ``"sqrt"``, or a callable applied to an
        array of eigenvalues in the operator's library (e.g. ``lambda x: x**2``).
    method : {"slq", "slq++", "exact"}
        ``"slq"``: stochastic Lanczos quadrature. ``"slq++"``: deflated SLQ, for spectra
        whose top dominates tr f(A) (decaying spectra, f growing): a third of the budget
        builds a block Krylov space of the top of the spectrum, whose part of the trace is
        a block Gauss rule, and SLQ estimates the rest with probes projected off it.
        Measured at equal budget: 10-1000x smaller errors on decaying spectra, 1.2-1.6x
        larger ones on flat spectra, and O(n (bs)^2) more work for the basis (see
        docs/spectral.rst). ``"exact"`` forms the matrix from n products and sums f over
        its eigenvalues (``eigvalsh``): the reference for small operators.
    num_matvecs : int, optional
        Budget of operator columns, probes x ``lanczos_steps``; by default
        ``DEFAULT_NUM_PROBES`` probes. At least two probes.
    lanczos_steps : int, optional
        Lanczos steps (quadrature nodes) per probe, at least 2 and at most n; default
        ``DEFAULT_LANCZOS_STEPS``.
    seed : int, None, or the library's generator/key
    rtol, atol : float, optional
        Adaptive stopping: after the first ``num_matvecs``, rounds of probes (each as
        many as all before it) until the 95% interval's half-width, quadrature error
        included, is at most ``max(atol, rtol * |value|)`` (``converged=True``), or
        ``max_matvecs`` is spent (``converged=False``). One host read per round; under
        ``jax.jit`` one round.
    max_matvecs : int, optional
        Cap of an adaptive estimate; default ``DEFAULT_MAX_PROBES`` probes. Without a
        tolerance it is the budget when ``num_matvecs`` is not given.
    probe : {"rademacher", "gaussian", "sphere", "steinhaus"}
    reorthogonalize : bool
        Full reorthogonalisation of each probe's Lanczos vectors against all earlier
        ones (n x probes x steps entries of memory, O(n m k^2) work). Off by default:
        without it Lanczos repeats converged Ritz values ("ghosts"), but the quadrature
        is as accurate (measured: docs/spectral.rst), while reorthogonalisation costs
        3-26x the products on a cheap sparse operator (a 2-d Laplacian; 1.02-1.16x on
        a dense one).
    spectrum_bounds : (float, float), optional
        Known bounds ``low <= lambda_min`` and ``high >= lambda_max``, for the Gauss-Radau
        rules that bound the quadrature error; by default estimated from the Ritz values
        and their residuals.
    block_size : int, optional
        Most columns per operator call (default: what fits in memory).
    check_finite : bool
        Raise ``FloatingPointError`` when a product is NaN or infinite.

    Returns
    -------
    Estimate
        ``value`` a 0-d real array; ``stderr`` the Monte-Carlo standard error over the
        probes; ``info["systematic_error"]`` the estimated quadrature error, which
        :meth:`~linop_trace.Estimate.ci` adds to the half-width; ``info`` also holds
        ``"lanczos_steps"``, ``"num_probes"``, ``"reorthogonalized"``, and the per-probe
        ``"samples"``, ``"nodes"``, ``"weights"`` and the probes' ``"squared_norms"``;
        with ``"slq++"`` also ``"deflated"`` (the deflated dimension) and
        ``"deflated_trace"`` (its part of the value).

    Raises
    ------
    ValueError
        Non-square operator, unknown function or method, a budget below two probes, or
        (for ``"log"``, ``"inverse"`` and ``"sqrt"``, when the value is read) Ritz values
        that show the operator is not positive definite.

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import trace_function
    >>> A = np.diag(np.linspace(1.0, 2.0, 200))
    >>> est = trace_function(A, "log", num_matvecs=200, lanczos_steps=10, seed=0)
    >>> bool(abs(float(est) - np.log(np.linspace(1.0, 2.0, 200)).sum()) < 1.0)
    True
    """
    function, name, positive = _resolve_function(f)
    if positive:  # Ritz values <= 0 give NaN (no warning); the check names the cause
        function = _on_positive(function)
    operator = widened(aslinearoperator(A))
    backend.refuse_dask(operator.xp, f"trace_function({name!r})")
    n = check_square(operator, f"trace_function({name!r})")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} for trace_function; known: {METHODS}")
    xp = operator.xp
    real = backend.real_dtype_for(xp, operator.dtype)
    if n == 0:
        zero = xp.zeros((), dtype=real, device=operator.device)
        return Estimate(zero, zero, 0, method)
    if method == "exact":
        return _exact(operator, function, name, positive, block_size, check_finite)
    steps = DEFAULT_LANCZOS_STEPS if lanczos_steps is None else lanczos_steps
    steps = min(check_positive_int(steps, "lanczos_steps", 2), n)
    check_tolerance(rtol, atol, 0.95)
    adaptive = rtol is not None or atol is not None
    if max_matvecs is not None:
        max_matvecs = check_positive_int(max_matvecs, "max_matvecs")
    if num_matvecs is None:
        fixed = max_matvecs if max_matvecs is not None and not adaptive else None
        num_matvecs = DEFAULT_NUM_PROBES * steps if fixed is None else fixed
    budget = check_positive_int(num_matvecs, "num_matvecs")
    if max_matvecs is None:
        max_matvecs = max(budget, DEFAULT_MAX_PROBES * steps) if adaptive else budget
    elif max_matvecs < budget:
        raise ValueError(f"`max_matvecs`={max_matvecs} is smaller than `num_matvecs`={budget}")
    deflation = None
    if method == "slq++":
        b, s, q, num_probes = deflation_plan(budget, steps, n)
        deflation = (b, s, q)
    else:
        num_probes = budget // steps
    if num_probes < 2:
        raise ValueError(
            f"trace_function needs at least 2 probes of {steps} Lanczos steps, i.e. "
            f"num_matvecs >= {2 * steps}, got num_matvecs={budget}"
        )
    if block_size is None:
        block_size = probe_block_size(
            operator, limit=max(num_probes, b) if deflation else num_probes
        )
    else:
        block_size = check_positive_int(block_size, "block_size")
    ProbeSampler.check_kind(probe)
    if spectrum_bounds is not None:
        low, high = (float(value) for value in spectrum_bounds)
        if not low <= high:
            raise ValueError(
                f"spectrum_bounds must be (low, high) with low <= high, got {spectrum_bounds}"
            )
        if positive and not low > 0:
            raise ValueError(
                f"f = {name!r} needs a positive definite operator: spectrum_bounds must have "
                f"low > 0 (a bound at or below 0 makes the Gauss-Radau error bound "
                f"infinite), got {spectrum_bounds}"
            )
        spectrum_bounds = (low, high)
    config = _SlqConfig(
        f,
        steps,
        num_probes,
        bool(reorthogonalize),
        spectrum_bounds,
        block_size,
        bool(check_finite),
        backend.caller_precision(xp),
        probe,
        deflation,
        (float(rtol or 0.0), float(atol or 0.0)) if adaptive else None,
        max_matvecs,
    )
    if backend.compiles_estimates(xp) and operator.compilable() and not adaptive:
        # one compiled program (as trace's); an integer seed becomes its key inside
        seed_argument, is_key = backend.jax_seed(seed)
        program = backend.compiled(_compiled_slq, num_static=2)
        return program(config, is_key, operator, seed_argument)  # type: ignore[no-any-return]
    return _slq(config, operator, seed)


@dataclass(frozen=True)
class _SlqConfig:
    """The validated options of one SLQ estimate (hashable: a compiled program's key)."""

    f: Any  # a function name, or the caller's callable
    steps: int
    num_probes: int
    reorthogonalize: bool
    bounds: tuple[float, float] | None
    block_size: int
    check_finite: bool
    precision: str | None
    probe: str
    #: ``"slq++"``: (block size b, block Krylov steps s, blocks deflated q); else None
    deflation: tuple[int, int, int] | None = None
    #: (rtol, atol) of an adaptive estimate, else None; its cap of operator columns
    tolerance: tuple[float, float] | None = None
    max_matvecs: int = 0


def _compiled_slq(config: _SlqConfig, is_key: bool, operator: LinearOperator, seed: Any) -> Any:
    """:func:`_slq` inside one compiled JAX program (operator and seed its arguments)."""
    return _slq(config, operator, seed if is_key else backend.jax_key_of(seed))


def deflation_plan(budget: int, steps: int, n: int) -> tuple[int, int, int, int]:
    """``(b, s, q, probes)`` of an ``"slq++"`` budget: a block Krylov space of s steps
    from b columns (``DEFLATION_SHARE`` of the budget, s = ``steps``; at most half of
    the n dimensions, by fewer columns, then fewer steps), of which the first q = s - 2 blocks are deflated, and SLQ with
    ``probes`` probes of ``steps`` Lanczos steps on the rest. Raises ``ValueError`` when
    fewer than two probes remain."""
    half = n // 2
    if half < 2:  # a space of at least 2 directions, at most half of the n
        raise ValueError(
            f"trace_function(method='slq++') deflates at least 2 and at most half of the n "
            f"dimensions: it needs n >= 4, got n = {n}; use method='slq' or 'exact'"
        )
    s = steps
    b = max(1, int(budget * DEFLATION_SHARE) // s)
    if b * s > half:  # fewer columns first: the depth s is what finds the top
        b = max(1, half // s)
        s = max(2, min(s, half // b))
    q = max(1, s - 2)
    probes = (budget - b * s) // steps
    if probes < 2:
        need = b * s + 2 * steps
        raise ValueError(
            f"trace_function(method='slq++') needs a block Krylov space ({b} x {s} "
            f"columns) and at least 2 probes of {steps} Lanczos steps, i.e. "
            f"num_matvecs >= {need}, got num_matvecs={budget}"
        )
    return b, s, q, probes


def _slq(config: _SlqConfig, operator: LinearOperator, seed: Any) -> Estimate:
    """Stochastic Lanczos quadrature: probes, batched Lanczos, Gauss and Gauss-Radau
    rules, and the estimate with its checks. With a tolerance (``config.tolerance``),
    rounds of probes (each as many as all before it) until the interval's half-width is
    at most ``max(atol, rtol |value|)`` or the cap ``config.max_matvecs`` is spent."""
    function, name, positive = _resolve_function(config.f)
    if positive:  # Ritz values <= 0 give NaN (no warning); the check names the cause
        function = _on_positive(function)
    xp = operator.xp
    n = operator.shape[0]
    real = backend.real_dtype_for(xp, operator.dtype)
    steps = config.steps
    # products scaled by a power of two where A's entries are far from 1: the Lanczos
    # couplings' squares under- or overflowed (float32 at 1e20: the Krylov space stopped
    # early, 20 stderr off); its coefficients are scaled back, exactly, before f
    matmat = CountingMatmat(
        operator, config.check_finite, config.block_size, config.precision, unit_scale=True
    )
    sampler = ProbeSampler(config.probe, n, xp, operator.dtype, operator.device, seed)
    checks: tuple[DeferredCheck, ...] = ()
    kept = None
    offset = None
    offset_error = backend.zeros(xp, (), real, operator.device)
    info: dict[str, Any] = {}
    if config.deflation is not None:
        kept, offset, offset_error, ritz = _deflate(matmat, sampler, config.deflation, function, xp)
        info["deflated"] = kept.shape[1]
        info["deflated_trace"] = offset
        if positive:
            checks += (_positive_definite_check(ritz[None, :], name, xp),)
    ends = None
    if config.bounds is not None:
        ends = tuple(xp.asarray(end, dtype=real, device=operator.device) for end in config.bounds)

    def probe_round(count: int) -> tuple[Any, ...]:
        """(samples, their quadrature errors, nodes, weights, squared norms) of ``count``
        new probes (projected off the deflated space: E[z z^H] = I - QQ^H)."""
        probes = sampler(count)
        start = probes
        if kept is not None:
            drawn = probes
            probes = project_out(kept, drawn, xp)
            # A probe inside the deflated space (a +-1 vector on a small operator) projects
            # to 0, and its sample z^H f(A) z is 0 exactly; normalised, it was 0/0 (a
            # FloatingPointError blaming the operator). Its Lanczos starts from the probe
            # as drawn (Ritz values in the spectrum, for the positive-definite check) and
            # its sample weighs nothing.
            drawn_norms = backend.real_part(xp, backend.column_inner(xp, drawn, drawn))
            projected_norms = backend.real_part(xp, backend.column_inner(xp, probes, probes))
            eps = float(xp.finfo(projected_norms.dtype).eps)
            inside = projected_norms <= eps * drawn_norms
            start = xp.where(inside[None, :], drawn, probes)
        squared_norms = backend.real_part(xp, backend.column_inner(xp, probes, probes))
        alphas, betas = batched_lanczos(matmat, start, steps, xp, config.reorthogonalize)
        # the recurrence ran on the scaled products, the quadrature runs in A's units
        # (the eigensolvers scale a tridiagonal into range themselves)
        alphas, betas = matmat.in_operator_units(alphas, betas)
        values, error, nodes, weights = lanczos_quadrature(
            alphas, betas, function, xp, ends, positive
        )
        return squared_norms * values, squared_norms * error, nodes, weights, squared_norms

    def assemble(rounds: list[tuple[Any, ...]], converged: bool | None) -> Estimate:
        samples, errors, nodes, weights, squared_norms = (
            xp.concat(parts, axis=0) for parts in zip(*rounds, strict=True)
        )
        if steps >= n and config.reorthogonalize:  # the whole space: the quadrature is exact
            systematic = offset_error
        else:
            systematic = xp.mean(errors) + offset_error
        mean = sample_mean(samples, xp, offset)
        info.update(
            {
                "systematic_error": systematic,
                "lanczos_steps": steps,
                "num_probes": int(samples.shape[0]),
                "reorthogonalized": config.reorthogonalize,
                "nodes": nodes,
                "weights": weights,
                "squared_norms": squared_norms,
                "function": name,
            }
        )
        method = "slq" if config.deflation is None else "slq++"
        estimate = mean.estimate(matmat.columns, method, converged=converged, info=info)
        all_checks = matmat.deferred_checks() + checks
        if positive:
            all_checks += (_positive_definite_check(nodes, name, xp),)
        all_checks += (_finite_check(samples, name, operator.dtype, xp),)
        return estimate.with_checks(all_checks, matmat.columns)

    rounds = [probe_round(config.num_probes)]
    if config.tolerance is None:
        return assemble(rounds, None)
    rtol, atol = config.tolerance
    while True:
        estimate = assemble(rounds, None)  # raises on a failed check (a host read)
        if backend.is_tracer(estimate.value):  # under jax.jit: nothing to read
            raise traced_tolerance_error()
        low, high = estimate.ci()
        if (high - low) / 2 <= max(atol, rtol * abs(float(estimate))):
            return assemble(rounds, True)
        count = min(
            sum(int(part[0].shape[0]) for part in rounds),
            (config.max_matvecs - matmat.columns) // steps,
        )
        if count < 1:
            return assemble(rounds, False)
        rounds.append(probe_round(count))


def _deflate(
    matmat: Callable[[Any], Any],
    sampler: ProbeSampler,
    plan: tuple[int, int, int],
    function: Callable[[Any, Any], Any],
    xp: Any,
) -> tuple[Any, Any, Any, Any]:
    """The deflated part of ``"slq++"``: ``(Q, tr Q^H f(A) Q, its quadrature error, Ritz
    values)``.

    s block steps from b random columns build an orthonormal basis V = [V_1 ... V_s] of
    the block Krylov space K_s(A, Omega), which holds the top of the spectrum (the
    directions that dominate tr f(A) for an f growing with |lambda|), and with the s
    products also T = V^H A V, the operator seen from that space. The first q blocks are
    deflated, Q = [V_1 ... V_q], and tr Q^H f(A) Q is the block Gauss rule
    sum_{i <= qb} f(T)_ii: exact for polynomials of degree up to 2 (s - q) + 1, since
    A^j Q stays in the space for j <= s - q (Chen and Hallman's Krylov-aware estimator).
    Its error is estimated by the change from the rule of s - 1 blocks."""
    b, s, q = plan
    blocks = [orthonormal_basis(sampler(b), xp)]
    images = []
    n = blocks[0].shape[0]
    eps = float(xp.finfo(backend.real_dtype_for(xp, blocks[0].dtype)).eps)
    for step in range(s):
        image = matmat(blocks[-1])
        images.append(image)
        if step < s - 1:  # the next block: the new directions of A V_j
            # plus random directions at 100 eps of each column's norm: nothing where A V_j
            # has new directions, new ones where the space is invariant (A = c I), whose
            # projected rounding errors lie along the basis and cannot extend it
            norms = xp.sqrt(backend.real_part(xp, backend.column_inner(xp, image, image)))
            # a zero image (A = 0 on the block) gets jitter of unit size (the products are
            # scaled to about 1): with none, the next block was 0, its QR a repeated unit
            # vector, and the "projection" off the basis added to the probes (tr exp(0)
            # read 131.66 for 30)
            norms = xp.where(norms > 0, norms, xp.ones_like(norms))
            jitter = sampler(b) * xp.astype(norms * (100 * eps / math.sqrt(n)), image.dtype)
            # (differentiated: directions of A V_j outside the space below 1000 eps of its
            # largest column, 10 times the jitter's, are the jitter's and carry no
            # derivative; moving with A at 1 / jitter, the basis gave log det(2 I) a
            # gradient with entries of 4e13)
            floor = 1e3 * eps * xp.max(norms) if backend.may_differentiate(xp, image) else None
            blocks.append(extend_basis(xp.concat(blocks, axis=1), image + jitter, xp, floor))
    basis = xp.concat(blocks, axis=1)
    projected = backend.conj(xp, xp.matrix_transpose(basis)) @ xp.concat(images, axis=1)
    projected = (projected + backend.conj(xp, xp.matrix_transpose(projected))) / 2
    if isinstance(matmat, CountingMatmat):  # (see probe_round)
        (projected,) = matmat.in_operator_units(projected)
    kept = q * b

    # sum_{i < qb} f(T)_ii, differentiated by the Daleckii-Krein formula (eigh's own
    # derivative divides by the gaps of repeated Ritz values: NaN for c I + low rank)
    value, ritz = backend.block_gauss_rule(xp, projected, kept, function)
    previous, _ = backend.block_gauss_rule(
        xp, projected[: (s - 1) * b, : (s - 1) * b], kept, function
    )
    return basis[:, :kept], value, xp.abs(value - previous), ritz


def _finite_check(samples: Any, name: str, dtype: Any, xp: Any) -> DeferredCheck:
    """Raise when f of the Ritz values is not finite (an overflow such as exp beyond the
    dtype's range, or f undefined there): no infinite or NaN estimate is returned."""

    def error() -> Exception:
        return FloatingPointError(
            f"f = {name!r} of the Ritz values is not finite in "
            f"{backend.dtype_name(dtype)}: tr f(A) overflows the dtype or f is undefined on "
            "the spectrum"
        )

    return DeferredCheck(~xp.all(xp.isfinite(samples)), (), error)


def _positive_definite_check(nodes: Any, name: str, xp: Any) -> DeferredCheck:
    """Raise when a Ritz value is <= k n eps times the largest: every Ritz value lies in
    [lambda_min, lambda_max], so one at or below zero shows the operator is indefinite or
    (numerically) singular."""
    real = nodes.dtype
    k = nodes.shape[1]
    eps = float(xp.finfo(real).eps)
    smallest = xp.min(nodes)
    largest = xp.max(xp.abs(nodes))
    failed = smallest <= k * eps * largest

    def error(low: float, high: float) -> Exception:
        return ValueError(
            f"f = {name!r} needs a positive definite operator, but Lanczos found a Ritz value "
            f"{low:.3g} (largest magnitude {high:.3g}): the operator is indefinite or "
            "singular"
        )

    return DeferredCheck(failed, (smallest, largest), error)


def _exact(
    operator: LinearOperator,
    function: Callable[[Any, Any], Any],
    name: str,
    positive: bool,
    block_size: int | None,
    check_finite: bool,
) -> Estimate:
    """``sum f(lambda_i)`` over the eigenvalues of the matrix formed from n products."""
    xp = operator.xp
    n = operator.shape[0]
    real = backend.real_dtype_for(xp, operator.dtype)
    if block_size is None:
        block_size = probe_block_size(operator, limit=n)
    matmat = CountingMatmat(operator, bool(check_finite), block_size, "highest")
    identity = xp.eye(n, dtype=operator.dtype, device=operator.device)
    dense = matmat(identity)
    dense = (dense + backend.conj(xp, xp.matrix_transpose(dense))) / 2
    eigenvalues = xp.linalg.eigvalsh(dense)
    value = xp.sum(function(xp, eigenvalues))
    zero = xp.zeros((), dtype=real, device=operator.device)
    estimate = Estimate(value, zero, matmat.columns, "exact", info={"eigenvalues": eigenvalues})
    checks = matmat.deferred_checks()
    if positive:
        checks += (_positive_definite_check(eigenvalues[None, :], name, xp),)
    return estimate.with_checks(checks, matmat.columns)


def logdet(A: Any, **options: Any) -> Estimate:
    """``log det A`` of a symmetric (Hermitian) positive definite operator:
    :func:`trace_function` with ``f = "log"`` (same options). Raises ``ValueError`` when
    Lanczos shows the operator is not positive definite."""
    return trace_function(A, "log", **options)


def trace_inverse(A: Any, **options: Any) -> Estimate:
    """``tr A^-1`` of a symmetric (Hermitian) positive definite operator:
    :func:`trace_function` with ``f = "inverse"`` (same options)."""
    return trace_function(A, "inverse", **options)


def trace_exp(A: Any, **options: Any) -> Estimate:
    """``tr exp(A)`` of a self-adjoint operator (for a graph's adjacency matrix, its
    Estrada index): :func:`trace_function` with ``f = "exp"`` (same options)."""
    return trace_function(A, "exp", **options)
