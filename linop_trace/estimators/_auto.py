"""``method="auto"``: exact when that is no dearer than the budget, else the randomized
method that suits the spectrum, chosen from products that the chosen method then reuses.

Trace. Half of the budget goes to probes Omega (s columns) and Y = A Omega. These products
are both s plain Hutchinson samples w_i^H A w_i and the first half of XTrace, so after
them either method can be completed without wasting a column:

- Hutchinson: m - s more probes; its variance is predicted as var(samples) / m.
- XTrace: the products A Q; its variance is predicted from what the sketch leaves out.
  For each i, with P_i the projector onto range(Y without column i) and mu = tr/n,
  |(I - P_i)(A - mu I) w_i|^2 is an unbiased estimate of |(I - P_i)(A - mu I)|_F^2,
  which bounds the variance 2 |B_i - (tr B_i / d) (I - P_i)|_F^2 of XTrace's Hutchinson
  term on B_i = (I - P_i) A (I - P_i); it is computed from the s x s matrices of the
  QR of Y without any product (the leave-one-out downdate of :mod:`._xtrace`). The
  prediction for the estimate is twice its mean over s (half for complex probes).

The cheaper prediction wins. Flat spectra keep Hutchinson (XTrace would spend half the
budget on a sketch that captures nothing); decaying ones get XTrace (measured accuracy:
docs/estimators/auto.rst). The chosen method reuses the products that chose it, so the
estimate is not independent of the choice: between the two regimes at small budgets
Hutchinson's branch is biased low (measured, with its coverage, in that page).

Operators tagged ``"positive_semidefinite"`` get XNysTrace with the whole budget (if
its products contradict the tag, Hutchinson's estimate from the same products).

Where a read would wait for a device (GPUs) or has no value (a JAX trace), the choice is
made on the device instead of read: the second half's product is of XTrace's basis or of
Hutchinson's next probes, selected there; both estimates are completed and one is
selected (:func:`~linop_trace._estimate.chosen_estimate`).

Diagonal: exact when cheap, else ``"xdiag"`` when registered (looked up at call time),
the probes are Rademacher or Steinhaus (the default) and the operator has an adjoint
(XDiag needs A^H); else Diag++ when the operator has an adjoint, else Hutchinson's
diagonal estimator.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

from .. import _backend as backend
from .._estimate import Estimate, chosen_estimate
from ._base import EstimationRequest, Estimator
from ._linalg import (
    column_inner,
    downdate_directions,
    hermitian_transpose,
    orthonormal_factors,
)
from ._registry import available_methods, builtin, get_estimator

__all__ = ["Auto", "predict_variances"]

#: Probes XDiag accepts (unit modulus); with others the diagonal goes to Diag++.
XDIAG_PROBES = ("rademacher", "steinhaus")


def _finishing_builtin(name: str) -> Any:
    """The package's own estimator ``name``, typed for its ``finish_trace``: the entry
    point that continues from products already made."""
    return builtin(name)


def predict_variances(
    probes: Any, images: Any, num_matvecs: int, xp: Any
) -> tuple[float, float, Any, Any, Any]:
    """Predicted variances of Hutchinson (all ``num_matvecs`` columns as probes) and of
    XTrace (``probes.shape[1]`` probes) from the first products ``images = A @ probes``,
    and XTrace's basis Q of range(images), the triangular R = Q^H images of that QR
    factorization and R's downdate directions (so that XTrace, if chosen, does not
    compute them again).

    Pure linear algebra, no operator. The two variances are read on the host (the choice
    is made there; one read), NaN when the products have no value (JAX tracers under
    ``jit``).

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace.estimators._auto import predict_variances
    >>> rng = np.random.default_rng(0)
    >>> U = rng.standard_normal((50, 3))
    >>> probes = rng.standard_normal((50, 6))
    >>> hutch, xtrace, _, _, _ = predict_variances(probes, U @ (U.T @ probes), 12, np)
    >>> bool(xtrace < hutch)  # rank 3 < 6 probes: the sketch captures A
    True
    """
    s = probes.shape[1]
    spread, rho_mean, basis, triangular, sdir = backend.jit(xp, _prediction_terms)(
        xp, probes, images
    )
    factor = 1.0 if backend.is_complex_dtype(xp, probes.dtype) else 2.0
    numbers = backend.read_floats(xp, [spread, rho_mean])
    if numbers is None:
        return math.nan, math.nan, basis, triangular, sdir
    spread_value, rho_mean = numbers
    hutch = spread_value / max(s - 1, 1) / num_matvecs
    xtrace = factor * rho_mean / s
    return hutch, xtrace, basis, triangular, sdir


def _prediction_terms(xp: Any, probes: Any, images: Any) -> tuple[Any, Any, Any, Any, Any]:
    """The device side of :func:`predict_variances` (one compiled program under JAX):
    the samples' squared spread, the mean of the leave-one-out residuals rho_i, the basis
    Q of range(images), R = Q^H images from the same factorization (no product of
    O(n s^2) for it: on a sparse operator at n = 10^5, s = 50, such a product took a
    fifth of auto's choice) and R's downdate directions (by substitution)."""
    n = probes.shape[0]
    samples = column_inner(probes, images, xp)
    mean = xp.mean(samples)
    deviation = samples - mean
    spread = xp.sum(backend.abs2(xp, deviation))
    mu = mean / n
    basis, r = orthonormal_factors(images, xp)
    w = hermitian_transpose(basis, xp) @ probes
    sdir = downdate_directions(r, xp, upper=True)
    sh = hermitian_transpose(sdir, xp)
    alpha = xp.linalg.diagonal(sh @ w)  # s_i^H w_i
    beta = xp.linalg.diagonal(sh @ r)  # s_i^H Q^H y_i
    outside = backend.real_part(xp, column_inner(probes, probes, xp)) - xp.sum(
        backend.abs2(xp, w), axis=0
    )
    rho = backend.abs2(xp, mu) * outside + backend.abs2(xp, beta - mu * alpha)
    return spread, xp.mean(rho), basis, r, sdir


class Auto(Estimator):
    """Exact when n <= the budget (or the operator stores its diagonal), else the
    randomized method that suits the spectrum.

    For a trace, half the budget is spent on probes whose products serve both Hutchinson
    and XTrace; from them the variance of each is predicted (see the module docstring)
    and the better one is completed with the other half, reusing every product. The
    result's ``method`` is the method used (``"hutchinson"`` or ``"xtrace"``) and
    ``info["auto"]`` holds the two predictions. On CPU arrays the predictions are read
    to choose; on a GPU and under a JAX trace the choice is made on the device, with no
    read (both methods completed from the same products, one selected: see
    docs/estimators/auto.rst). For a diagonal: XDiag when registered
    and the probes are Rademacher/Steinhaus, else Diag++ (operators with an adjoint),
    else Hutchinson's diagonal estimator; with a tolerance (XDiag has no adaptive
    stopping) Diag++ or Hutchinson from a first budget of 32, as for traces. Estimates
    need ``num_matvecs >= 2``.

    Parameters
    ----------
    trace_method, diagonal_method : Estimator, optional
        Fixed randomized methods to use instead of the automatic choice.

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import trace
    >>> trace(np.eye(3), num_matvecs=10).method
    'exact'
    >>> from linop_trace import LinearOperator
    >>> rng = np.random.default_rng(0)
    >>> U = np.linalg.qr(rng.standard_normal((500, 500)))[0]
    >>> def implicit(M):  # known only through products: no stored diagonal
    ...     return LinearOperator.from_callable(matvec=lambda x: M @ x, shape=M.shape)
    >>> trace(implicit((U * 0.7 ** np.arange(500)) @ U.T), num_matvecs=100, seed=0).method
    'xtrace'
    >>> trace(implicit((U * np.linspace(1, 3, 500)) @ U.T), num_matvecs=100, seed=0).method
    'hutchinson'
    """

    name = "auto"
    unit_scaled = ("trace", "diagonal")
    supports_tolerance = True
    #: Sphere probes for traces (XTrace's improved normalization needs them; Hutchinson
    #: with them matches Rademacher on all but near-diagonal matrices), Rademacher for
    #: diagonals (XDiag needs them).
    default_probe = {"trace": "sphere", "diagonal": "rademacher"}

    def __init__(
        self, trace_method: Estimator | None = None, diagonal_method: Estimator | None = None
    ) -> None:
        self.trace_method = trace_method
        self.diagonal_method = diagonal_method

    def __repr__(self) -> str:
        return f"Auto(trace_method={self.trace_method!r}, diagonal_method={self.diagonal_method!r})"

    @property
    def jit_compatible(self) -> bool:  # type: ignore[override]
        """Whether a fixed-budget estimate reads nothing on the host: the choice between
        Hutchinson and XTrace (or XNysTrace and its fallback) is made on the device, so
        it is, unless a method it hands the work to reads (a fixed method given, or an
        ``"xdiag"`` registered in place of the built-in one)."""
        methods = [self.trace_method, self.diagonal_method]
        if "xdiag" in available_methods("diagonal"):
            methods.append(get_estimator("xdiag", "diagonal"))
        return all(getattr(m, "jit_compatible", False) for m in methods if m is not None)

    def uses_exact(self, request: EstimationRequest) -> bool:
        """Whether ``request`` is computed exactly: the budget (``max_matvecs`` with a
        tolerance) covers n columns, or the operator stores its diagonal. What
        :func:`~linop_trace.computes_exactly` answers."""
        budget = request.max_matvecs if request.adaptive else request.num_matvecs
        return request.n <= (budget or 0) or request.has_stored_diagonal()

    def _check_budget(self, request: EstimationRequest) -> None:
        """Estimates need two columns for an error bar (as ``method="hutchinson"``)."""
        if max(request.num_matvecs, request.max_matvecs or 0) < 2:
            raise ValueError(
                "method 'auto' needs num_matvecs >= 2 unless the operator is small enough to "
                f"compute exactly (n <= num_matvecs), got num_matvecs={request.num_matvecs}"
            )

    def trace(self, request: EstimationRequest) -> Estimate:
        if self.uses_exact(request):
            return builtin("exact").trace(request)
        self._check_budget(request)
        if self.trace_method is not None:
            return self.trace_method.trace(request)
        xp = request.xp
        budget = request.num_matvecs
        if request.adaptive:  # the tolerance decides the size; start with a useful sketch
            budget = max(budget, min(32, request.max_matvecs or budget))
        if budget < 4:  # too few columns to split between two passes
            return builtin("hutchinson").trace(request)
        if not request.adaptive and "positive_semidefinite" in request.tags:
            return self._psd_trace(request)
        s = max(2, min(budget // 2, request.n))
        probes = request.probes.independent(s)
        images = request.matmat(probes)
        if not _chooses_on_host(request, images):
            return _chosen_on_device(request, budget, probes, images)
        try:
            hutch_var, xtrace_var, basis, triangular, directions = predict_variances(
                probes, images, budget, xp
            )
        except (ValueError, ArithmeticError):
            # a non-finite product is named as such: on Dask, the read of the prediction
            # computes its solve, which SciPy refuses for a NaN before any check is read
            request.matmat.check_now()
            raise
        choice = {"hutchinson_variance": hutch_var, "xtrace_variance": xtrace_var}
        if xtrace_var < hutch_var:  # False for NaN (no values to compare): Hutchinson
            return _finishing_builtin("xtrace").finish_trace(
                request,
                probes,
                images,
                basis,
                directions,
                info={"auto": choice},
                triangular=triangular,
            )
        samples = [column_inner(probes, images, xp)]
        request = dataclasses.replace(request, num_matvecs=max(budget, s))
        return _finishing_builtin("hutchinson").finish_trace(
            request, samples, info={"auto": choice}
        )

    def _psd_trace(self, request: EstimationRequest) -> Estimate:
        """XNysTrace for operators tagged positive semidefinite (one pass, and far more
        accurate than XTrace on decaying spectra). If the products contradict the tag,
        the same products give Hutchinson's estimate instead (no column is wasted); to
        know, the estimate is read once."""
        xp = request.xp
        m = _finishing_builtin("xnystrace").sketch_width(request)  # (exact at n and more)
        probes = request.probes.independent(m)
        images = request.matmat(probes)
        if not _chooses_on_host(request, images):  # both completed, chosen on the device
            nystrom = _finishing_builtin("xnystrace").finish_trace(request, probes, images)
            samples = [column_inner(probes, images, xp)]
            request = dataclasses.replace(request, num_matvecs=m)
            hutchinson = _finishing_builtin("hutchinson").finish_trace(request, samples)
            failed = [check.failed for check in nystrom._checks]
            passed = ~(failed[0] if len(failed) == 1 else xp.any(xp.stack(failed)))
            return chosen_estimate(passed, nystrom, hutchinson, notice=_fell_back)
        # a non-finite product is named as such, before XNysTrace's check (which would
        # read it as an overflow of its sketch) or a fallback on it
        request.matmat.check_now()
        try:
            estimate = _finishing_builtin("xnystrace").finish_trace(request, probes, images)
            estimate.value  # noqa: B018 - runs its positive-semidefiniteness check
        except ValueError as error:
            warnings.warn(
                f"{error}; the operator is tagged positive_semidefinite, so method='auto' "
                "falls back to Hutchinson's estimate from the same products",
                RuntimeWarning,
                stacklevel=4,
            )
            samples = [column_inner(probes, images, xp)]
            request = dataclasses.replace(request, num_matvecs=m)
            return _finishing_builtin("hutchinson").finish_trace(
                request, samples, info={"auto": str(error)}
            )
        return estimate

    def diagonal(self, request: EstimationRequest) -> Estimate:
        if self.uses_exact(request):
            return builtin("exact").diagonal(request)
        self._check_budget(request)
        method = self.diagonal_method
        if method is None and request.adaptive:
            # XDiag has no adaptive stopping: Diag++ (or Hutchinson) grows until the
            # tolerance is met, from a useful first budget as for traces
            budget = max(request.num_matvecs, min(32, request.max_matvecs or 0))
            request = dataclasses.replace(request, num_matvecs=budget)
            diagpp = builtin("diag++")
            if request.has_adjoint and budget >= diagpp.min_matvecs:
                method = diagpp
            else:
                method = builtin("hutchinson")
        if method is None:
            adjoint = request.has_adjoint
            if (
                request.probes.kind in XDIAG_PROBES
                and "xdiag" in available_methods("diagonal")
                and adjoint
            ):
                candidate = get_estimator("xdiag", "diagonal")
                if request.num_matvecs >= getattr(candidate, "min_matvecs", 1):
                    method = candidate
            diagpp = builtin("diag++")
            if method is None and adjoint and request.num_matvecs >= diagpp.min_matvecs:
                method = diagpp  # any probe; deflation helps decaying spectra
            if method is None:
                method = builtin("hutchinson")
        return method.diagonal(request)


def _chooses_on_host(request: EstimationRequest, products: Any) -> bool:
    """Whether the choice is read on the host: where the arrays are on the CPU and have
    values (NumPy, torch, JAX outside a trace; there the read waits for no device, and
    completing only the chosen method costs less), on Dask (a read computes the graph
    built so far, once) and in adaptive runs (which read once per round anyway). On an
    accelerator, and under a JAX trace (where no value can be read: ``jax.jit``, the
    estimate's own compiled program), both estimates are completed from the same
    products and the choice is made on the device."""
    xp = request.xp
    if request.adaptive or backend.reads_are_free(xp) or backend.is_dask_namespace(xp):
        return True
    return not backend.is_tracer(products) and not backend.is_accelerator(request.device)


def _chosen_on_device(
    request: EstimationRequest, budget: int, probes: Any, images: Any
) -> Estimate:
    """Auto's trace with no read on the host. The second half of the budget is one
    product of the same width either way: of XTrace's basis Q where XTrace is predicted
    better (its last column, for an odd budget, being Hutchinson's next probe, so that the
    count is that of the host's choice plus that column), else of Hutchinson's next probes
    (drawn from the stream as the host's choice draws them). Both estimates are then
    completed from these products, and the prediction selects one on the device: the
    estimate the host's choice gives, to rounding."""
    xp = request.xp
    s = int(probes.shape[1])
    hutch_var, xtrace_var, use_xtrace, basis, triangular, directions = backend.jit(
        xp, _device_choice, num_static=2
    )(xp, budget, probes, images)
    rest = budget - s
    drawn = [request.probes(width) for width in request.blocks(rest)]
    fresh = drawn[0] if len(drawn) == 1 else xp.concat(drawn, axis=1)
    sketch = basis if rest == s else xp.concat([basis, backend.split(xp, fresh, (s,))[1]], axis=1)
    products = request.matmat(xp.where(use_xtrace, sketch, fresh))
    xtrace = _finishing_builtin("xtrace").finish_trace(
        request,
        probes,
        images,
        basis,
        directions,
        basis_images=backend.split(xp, products, (s,))[0],
        triangular=triangular,
    )
    samples = [xp.concat([column_inner(probes, images, xp), column_inner(fresh, products, xp)])]
    request = dataclasses.replace(request, num_matvecs=budget)
    hutchinson = _finishing_builtin("hutchinson").finish_trace(request, samples)
    info = {"auto": {"hutchinson_variance": hutch_var, "xtrace_variance": xtrace_var}}
    return chosen_estimate(use_xtrace, xtrace, hutchinson, info=info)


def _device_choice(xp: Any, budget: int, probes: Any, images: Any) -> tuple[Any, ...]:
    """:func:`predict_variances` with the comparison on the device: the two predicted
    variances, whether XTrace's is the smaller (False for NaN), the basis, R and the
    downdate directions."""
    s = probes.shape[1]
    spread, rho_mean, basis, triangular, directions = _prediction_terms(xp, probes, images)
    factor = 1.0 if backend.is_complex_dtype(xp, probes.dtype) else 2.0
    hutch_var = spread / max(s - 1, 1) / budget
    xtrace_var = factor * rho_mean / s
    return hutch_var, xtrace_var, xtrace_var < hutch_var, basis, triangular, directions


def _fell_back(estimate: Estimate, nystrom: Estimate, hutchinson: Estimate) -> None:
    """XNysTrace's check failed, so the estimate is Hutchinson's from the same products:
    its error says why (raised where the Gram matrix overflowed, else given as a warning
    and kept in ``info["auto"]``), as when the choice is made on the host."""
    try:
        for check in nystrom._checks:
            check.run()
    except ValueError as error:
        members = ""
        flag = nystrom._checks[0].failed if nystrom._checks else None
        if getattr(flag, "ndim", 0):  # a batch of estimates (jax.vmap): some members
            flags = backend.to_numpy(flag)
            members = f" in {int(flags.sum())} of {flags.size} members of the batch"
        warnings.warn(
            f"{error}; the operator is tagged positive_semidefinite, so method='auto' "
            f"falls back to Hutchinson's estimate from the same products{members}",
            RuntimeWarning,
            stacklevel=5,
        )
        estimate._info["auto"] = str(error)
