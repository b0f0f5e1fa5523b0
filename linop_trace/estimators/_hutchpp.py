"""Hutch++ (Meyer, Musco, Musco and Woodruff 2021) and NA-Hutch++, with error bars.

Hutch++ splits the trace into the part a randomized range sketch captures and a deflated
remainder that Hutchinson's estimator handles with a much smaller variance:

    tr(A) = tr(Q^H A Q) + tr((I - QQ^H) A (I - QQ^H)),    Q = orth(A S),

exact for any square A because tr((I - QQ^H) A QQ^H) = 0. The second term is estimated
by the residual samples g'^H A g' with g' = (I - QQ^H) g, which, given Q, are independent
and unbiased; the standard error is their sample std over sqrt(#samples), the interval
Hutchinson's shape-corrected Student-t one (:class:`~._hutchinson.Hutchinson`).
NA-Hutch++ replaces the sequential sketch by a single-pass generalized Nystrom
approximation A R (S^H A R)^+ S^H A (Meyer et al., Algorithm 2; Persson, Cortinovis and
Kressner 2022).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import _backend as backend
from .._estimate import Estimate
from .._stats import SampleMean, sample_mean
from ._adaptive import (
    Progress,
    remaining,
    sample_mean_progress,
    tolerance_target,
    traced_tolerance_error,
    until_met,
)
from ._base import (
    EstimationRequest,
    Estimator,
    RefineState,
    cover,
    covered_product,
    deflation_split,
)
from ._linalg import column_inner, extend_basis, project_out

__all__ = [
    "HutchPlusPlus",
    "HutchPlusPlusResult",
    "deflated_samples",
    "hutchpp_core",
    "hutchpp_split",
    "predicted_residual_probes",
]

Matmat = Callable[[Any], Any]


# ------------------------------------------------------------------------ Hutch++ core
#: The budget split (shared with Diag++): m = 100 gives 34 sketch columns, 34 for A Q and
#: 32 residual probes.
hutchpp_split = deflation_split


@backend.register_pytree_dataclass
@dataclass(frozen=True)
class HutchPlusPlusResult:
    """What :func:`hutchpp_core` computes: ``low_rank_trace`` = tr(Q^H A Q), the
    ``residual`` sample mean of g_j'^H A g_j' (g_j' = (I - QQ^H) g_j), and the ``basis`` Q
    (for further residual samples with :func:`deflated_samples`). The estimate is
    ``residual.value`` (the low-rank trace is its offset). ``low_rank_size`` is
    sum_j |q_j^H A q_j|, the size of the low-rank trace's rounding (its standard error
    includes it: with a sketch of full rank the residual samples are rounding alone)."""

    low_rank_trace: Any
    residual: SampleMean
    basis: Any
    low_rank_size: Any = None


def hutchpp_core(matmat: Matmat, sketch: Any, residual_probes: Any, xp: Any) -> HutchPlusPlusResult:
    """Hutch++ in two products: ``A S``, then ``A [Q, (I - QQ^H) G]`` stacked.

    Parameters
    ----------
    matmat : callable
        ``X -> A X``.
    sketch : array (n, s)
        Range-sketch probes S.
    residual_probes : array (n, g)
        Probes G for the deflated remainder.
    xp : namespace
    """
    basis, _ = backend.thin_qr(xp, matmat(sketch))
    width = basis.shape[1]
    deflated = project_out(basis, residual_probes, xp)
    # one product of both, and one column reduction of it: q_j^H A q_j (their sum is the
    # low-rank trace) and the residual samples g_j'^H A g_j'. The columns' inner products
    # are the product's only reader, so XLA fuses the two (its CPU dot then takes 0.74x
    # the product alone), and they carry its finiteness check (dense n = 4000, m = 99
    # under JAX: 95 ms with the basis' and the samples' parts reduced apart, 81 - 82 ms
    # so, against 82 ms for a 99-column product and 87 - 90 ms for traceax's Hutch++)
    block = xp.concat([basis, deflated], axis=1)
    image = covered_product(matmat, block)
    inner = cover(matmat, backend.materialized(xp, column_inner(block, image, xp)))
    head, samples = backend.split(xp, inner, (width,))
    low_rank_trace, low_rank_size = xp.sum(head), xp.sum(xp.abs(head))
    n = int(sketch.shape[0])
    residual = sample_mean(samples, xp, offset=low_rank_trace, terms=n, offset_size=low_rank_size)
    return HutchPlusPlusResult(low_rank_trace, residual, basis, low_rank_size)


def deflated_samples(matmat: Matmat, basis: Any, probes: Any, xp: Any) -> Any:
    """More residual samples ``g'^H A g'``, ``g' = (I - QQ^H) g``, in one product."""
    deflated = project_out(basis, probes, xp)
    image = covered_product(matmat, deflated)  # (checked through the samples)
    return cover(matmat, backend.materialized(xp, column_inner(deflated, image, xp)))


# ------------------------------------------------------------------------- estimators
def _residual_estimate(
    name: str,
    result: SampleMean,
    low_rank_trace: Any,
    request: EstimationRequest,
    converged: bool | None,
    info: dict,
    basis: Any = None,
    low_rank_size: Any = None,
) -> Estimate:
    """The estimate of the residual sample mean ``result``; with the sketch ``basis`` it
    keeps what :meth:`HutchPlusPlus.refine` continues from."""
    count = result.count
    info = dict(info, low_rank_trace=low_rank_trace, num_residual_probes=count)
    estimate = result.estimate(request.columns, name, converged, info)
    if basis is not None:
        estimate._state = RefineState(
            "hutch++",
            samples=result.samples,
            offset=low_rank_trace,
            offset_size=low_rank_size,
            basis=basis,
        )
    return estimate


def predicted_residual_probes(
    variance: float, target: float, confidence: float, minimum: int = 2
) -> float:
    """Residual probes ``l`` whose t-interval half-width would meet ``target``.

    ``l = (t_{l-1} sigma / target)^2`` with ``sigma^2 = variance`` the per-sample variance
    of the residual samples: the normal quantile gives a first ``l``, one fixed-point step
    puts the Student-t quantile of ``l - 1`` degrees of freedom in. ``inf`` for a zero
    ``target``; never below ``minimum``.

    Examples
    --------
    >>> from linop_trace.estimators._hutchpp import predicted_residual_probes
    >>> round(predicted_residual_probes(200.0, 2.0, 0.95), 1)  # (t sigma / eps)^2
    194.5
    """
    if variance <= 0:
        return float(minimum)
    if not target > 0:
        return math.inf
    from scipy import stats

    tail = 0.5 + confidence / 2
    ratio = math.sqrt(variance) / target  # sigma / target: no square of a tiny target
    if not ratio < 1e150:  # more probes than any float count (or an infinite ratio)
        return math.inf
    first = (float(stats.norm.ppf(tail)) * ratio) ** 2
    quantile = float(stats.t.ppf(tail, max(first, float(minimum)) - 1))
    return max(float(minimum), (quantile * ratio) ** 2)


class HutchPlusPlus(Estimator):
    """Hutch++: a range sketch takes the top of the spectrum, Hutchinson the rest.

    Budget split for ``num_matvecs = m``: s = ceil(m/3) sketch columns, s columns for
    ``A Q`` and g = m - 2s residual probes (m = 100: 34 + 34 + 32), at most m columns in
    all, in two operator calls when the blocks fit in ``block_size``. Needs m >= 3.

    The error bar comes from the g residual samples (std / sqrt(g), Student-t quantile
    with g - 1 degrees of freedom, corrected to second order for the samples' skewness
    and kurtosis as in :class:`Hutchinson`); given the sketch they are i.i.d. Measured
    coverage: docs/estimators/hutchpp.rst.

    Adaptive stopping (``rtol``/``atol``) is A-Hutch++ (Persson, Cortinovis and Kressner
    2022): the sketch grows while that lowers the total cost, then residual probes are
    added until the interval meets the tolerance.

    1. Start with Hutch++ on ``num_matvecs`` columns (the split above); if its interval
       already meets the tolerance, stop.
    2. For a sketch Q of r columns, the residual probes that the tolerance
       ``eps = max(atol, rtol |estimate|)`` needs at level ``confidence`` are, by the
       central limit theorem behind our t-interval,

           l(r) = (t_{l-1} sigma_r / eps)^2,     cost(r) = 2 r + l(r)

       (2 columns per sketch vector, ``A s`` and ``A q``, plus l residual probes), with
       ``sigma_r^2`` the variance of one residual sample ``g'^H A g'``,
       ``g' = (I - QQ^H) g``, estimated by the sample variance of a block of at least
       ``b = max(g, 8)`` of them. For Gaussian probes and real symmetric A,
       ``sigma_r^2 = 2 ||R_r||_F^2`` with R_r = (I - QQ^H) A (I - QQ^H), the bound the paper
       uses; we take the CLT form rather than its Hanson-Wright constant
       ``4 log(2/delta) / eps^2``. For Rademacher probes ``sigma_r^2 = 2 sum_{i != j}
       (R_r)_ij^2``, which the Frobenius bound can overstate by far.
       ``cost(0)`` uses the first sketch block's own Hutchinson samples ``s^H A s``.
    3. Grow the sketch by a block while ``cost(r)`` decreases. The images ``A g_j'`` of the
       current residual probes, orthogonalized against Q, are the next sketch block (a
       range finder on R_r: no product is wasted); ``A`` on it is stacked with the next
       residual block in one product. ``cost(0)`` against ``cost(r_0)`` compares sample
       variances (with Rademacher probes deflation can raise the variance: the projector
       spoils the exact cancellation of A's diagonal, ~2 I on a flat spectrum); later
       steps estimate ``l(r_prev) = l(r) F(r_prev) / F(r)`` from the residual Frobenius
       estimates ``F(r) = mean_j ||(I - QQ^H) A g_j'||^2`` (unbiased for ``||R_r||_F^2``,
       far less scattered than the sample variance of heavy-tailed samples). Growth stops
       when the cost no longer decreases, when it cannot pay (``l(r) - g <= g + b`` for
       g samples in hand), or when the next block would not fit in ``max_matvecs`` or n.
       Unless it stopped on the cost, the last residual block is absorbed into the sketch
       as well, so the interval is built from samples drawn after the sketch is fixed.
    4. Then residual probes are drawn in blocks sized by the predicted need
       ``l(r) - count`` (at least count/4, at most doubling, first block ``l(r)``) until
       the half-width of the shape-corrected t-interval (the one stopping rule of
       :mod:`._adaptive`) meets
       ``eps`` (``converged=True``) or ``max_matvecs``, a hard cap, is spent
       (``converged=False`` with the best estimate).

    All columns are accounted for: ``num_matvecs = 2 sketch_size + residual_probes``.
    ``info`` holds ``sketch_size``, ``residual_probes``, ``predicted_residual_probes``
    (l at the last sketch step), ``sketch_path`` ((r, l(r)) per step, r = 0 first) and
    ``residual_frobenius_squared`` (F at the last step). Measured matvec counts
    and coverage: docs/estimators/hutchpp.rst.

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import trace
    >>> rng = np.random.default_rng(0)
    >>> U = rng.standard_normal((200, 10))
    >>> A = U @ U.T  # rank 10 <= sketch size 34: Hutch++ is exact
    >>> est = trace(A, method="hutch++", num_matvecs=100, seed=1)
    >>> bool(np.isclose(float(est), np.trace(A))), est.num_matvecs
    (True, 100)

    Adaptive: the sketch grows to the decaying part of the spectrum, then stops.

    >>> from linop_trace._testing import test_matrix
    >>> B = test_matrix("slowexp", 300, seed=0)
    >>> est = trace(B, method="hutch++", rtol=1e-3, num_matvecs=30, seed=0)
    >>> est.converged, est.num_matvecs == 2 * est.info["sketch_size"] + est.info[
    ...     "residual_probes"]
    (True, True)
    """

    name = "hutch++"
    min_matvecs = 3
    supports_tolerance = True

    #: Smallest sketch-growth block in the adaptive path (fewer samples estimate l(r)
    #: too roughly to compare costs).
    min_growth_block = 8

    jit_compatible = True

    def trace(self, request: EstimationRequest) -> Estimate:
        if request.adaptive:
            return self._adaptive_trace(request)
        xp = request.xp
        sketch_size, residual_size = hutchpp_split(request.num_matvecs)
        sketch_size = min(sketch_size, request.n)  # n columns already span it all
        sketch = request.probes(sketch_size)
        result = hutchpp_core(request.matmat, sketch, request.probes(residual_size), xp)
        return _residual_estimate(
            self.name,
            result.residual,
            result.low_rank_trace,
            request,
            None,
            {"sketch_size": int(result.basis.shape[1]), "probe": request.probes.kind},
            result.basis,
            result.low_rank_size,
        )

    def refine(self, quantity: str, request: EstimationRequest, state: RefineState) -> Estimate:
        """The residual phase continued: the sketch Q and tr(Q^H A Q) kept, more residual
        probes (fixed, or doubling until the tolerance is met)."""
        xp, basis = request.xp, state.basis
        samples = [state.samples]

        def draw(width: int) -> None:
            samples.append(deflated_samples(request.matmat, basis, request.probes(width), xp))

        for width in request.blocks(request.num_matvecs):
            draw(width)
        converged = None
        if request.adaptive:

            def measure() -> Progress:
                return sample_mean_progress(
                    _residual_mean(state.offset, samples, xp, request.n, state.offset_size),
                    request,
                )

            def grow() -> bool:
                left = remaining(request)
                if left <= 0:
                    return False
                count = sum(int(block.shape[0]) for block in samples)
                for width in request.blocks(min(count, left)):  # (doubling, in blocks)
                    draw(width)
                return True

            converged = until_met(request, measure, grow)
        return _residual_estimate(
            self.name,
            _residual_mean(state.offset, samples, xp, request.n, state.offset_size),
            state.offset,
            request,
            converged,
            {"sketch_size": int(basis.shape[1]), "probe": request.probes.kind},
            basis,
            state.offset_size,
        )

    def _adaptive_trace(self, request: EstimationRequest) -> Estimate:
        """A-Hutch++ (see the class docstring): grow the sketch, then the residual probes."""
        xp = request.xp
        n = request.n
        matmat = request.matmat
        cap = request.cap
        sketch_size, residual_size = hutchpp_split(request.num_matvecs)
        # 1. Hutch++ on num_matvecs columns (the draws of the non-adaptive path)
        sketch = request.probes(sketch_size)
        first_image = matmat(sketch)
        basis, _ = backend.thin_qr(xp, first_image)
        deflated = project_out(basis, request.probes(residual_size), xp)
        width = int(basis.shape[1])
        image = matmat(xp.concat([basis, deflated], axis=1))
        basis_image, residual_image = backend.split(xp, image, (width,))
        low_rank_trace, low_rank_size = _low_rank_terms(basis, basis_image, xp)
        state = _SketchState(basis, low_rank_trace, residual_image, deflated, xp, low_rank_size)
        state.frobenius = [_mean_square_norm(first_image, xp), state.residual_frobenius()]
        state.ranks = [0, width]
        state.first_block = sketch_size
        samples = [state.samples]
        # r = 0: the sketch block's own Hutchinson samples s^H A s give l(0)
        hutchinson = column_inner(sketch, first_image, xp)
        initial = _needed_probes(0 * low_rank_trace, [hutchinson], request)
        state.path.append((0, math.inf if initial is None else initial))

        def measure() -> Progress:
            return sample_mean_progress(state.residual_mean(samples), request)

        request.matmat.check_now()
        first = measure()
        if not first.decidable:
            raise traced_tolerance_error()
        converged = first.met(request)
        needed: float | None = math.inf
        if not converged:
            needed = self._grow_sketch(state, request, n, cap, residual_size)
            samples = [state.samples]
            # the samples that steered the growth go into the sketch (no product
            # wasted, no selection bias); fresh residual probes follow
            if needed is not None and state.stopped != "cost":
                if state.absorb(matmat, request, n, cap):
                    samples = []
            # 4. residual probes, each block sized by the predicted need (at most doubling)
            minimum = max(residual_size, self.min_growth_block)

            def grow() -> bool:
                nonlocal needed
                left = remaining(request)
                if left <= 0:
                    return False
                count = sum(int(block.shape[0]) for block in samples)
                if count:
                    needed = _needed_probes(state.low_rank_trace, samples, request)
                    if needed is None:
                        return False
                    more = math.ceil(needed) - count if math.isfinite(needed) else count
                    width = min(count, max(more, math.ceil(count / 4)))
                else:  # first block after the sketch: l(r) from the steering samples
                    finite = needed is not None and math.isfinite(needed)
                    width = math.ceil(needed) if finite and needed is not None else minimum
                width = max(1, min(max(width, minimum if not count else 1), left))
                samples.append(deflated_samples(matmat, state.basis, request.probes(width), xp))
                return True

            converged = until_met(request, measure, grow, measure_first=False)
        rank = int(state.basis.shape[1])
        result = state.residual_mean(samples)
        return _residual_estimate(
            self.name,
            result,
            state.low_rank_trace,
            request,
            converged,
            {
                "sketch_size": rank,
                "residual_probes": result.count,
                "predicted_residual_probes": state.path[-1][1] if state.path else None,
                "sketch_path": state.path,
                "residual_frobenius_squared": state.frobenius[-1],
                "probe": request.probes.kind,
            },
            state.basis,
            state.low_rank_size,
        )

    def _grow_sketch(
        self,
        state: _SketchState,
        request: EstimationRequest,
        n: int,
        cap: int,
        residual_size: int,
    ) -> float | None:
        """Step 3 of the rule: grow ``state`` while ``2 r + l(r)`` decreases; returns the
        last predicted ``l(r)`` (``None`` without concrete values)."""
        matmat = request.matmat
        growth = max(residual_size, self.min_growth_block)
        while True:
            count = int(state.samples.shape[0])
            rank = int(state.basis.shape[1])
            if count < growth:  # too few samples to judge l(r): top up to a full block
                more = min(growth - count, cap - request.matmat.columns - 1)
                if more > 0 and rank < n:
                    state.top_up(matmat, request.probes(more))
                    count = int(state.samples.shape[0])
            needed = _needed_probes(state.low_rank_trace, [state.samples], request)
            if needed is None or state.frobenius[-1] is None:
                return None
            state.path.append((rank, needed))
            if _cost_stopped_falling(state, growth):
                state.stopped = "cost"
                return needed  # the total cost 2 r + l(r) stopped decreasing
            absorbed = min(count, n - rank)  # the sketch never exceeds n columns
            step = absorbed + growth  # A on the absorbed block, then a fresh residual block
            if needed - count <= step:
                state.stopped = "need"
                return needed  # growing cannot pay: l(r) - g <= g + b
            if request.matmat.columns + step + count > cap or absorbed <= 0:
                state.stopped = "size"
                return needed
            state.grow(matmat, request.probes(growth))


def _cost_stopped_falling(state: _SketchState, growth: int) -> bool:
    """Whether ``2 r + l(r)`` at the last sketch size is no lower than at the one before.

    ``l(r_prev) = l(r) F_prev / F_r`` with ``F`` the residual Frobenius estimates (the
    variance taken proportional to ``||R||_F^2``; ``F`` scatters far less than a sample
    variance of heavy-tailed samples). From r = 0 to the initial sketch, the sample
    variances must agree (``l(0)`` from the first sketch block's Hutchinson samples
    ``s^H A s``, when it has at least ``growth`` of them): with Rademacher probes
    deflation can raise the variance (the projector spoils the exact cancellation of A's
    diagonal), which no Frobenius norm shows.
    """
    (previous_rank, previous_need), (rank, needed) = state.path[-2], state.path[-1]
    before, now = state.frobenius[-2], state.frobenius[-1]
    if before is None or now is None or not now > 0:
        return False
    stopped = 2 * (rank - previous_rank) >= needed * (before / now - 1)
    if previous_rank == 0:
        by_variance = 2 * rank + needed >= previous_need
        return state.first_block >= growth and by_variance and stopped
    return stopped


class _SketchState:
    """The growing sketch of adaptive Hutch++: basis Q, ``tr(Q^H A Q)``, and the current
    residual probes ``G' = (I - QQ^H) G`` with their images ``A G'`` and samples."""

    def __init__(
        self,
        basis: Any,
        low_rank_trace: Any,
        image: Any,
        deflated: Any,
        xp: Any,
        low_rank_size: Any,
    ):
        self.xp = xp
        self.basis = basis
        self.low_rank_trace = low_rank_trace
        #: sum_j |q_j^H A q_j| (the size of the low-rank trace's rounding)
        self.low_rank_size = low_rank_size
        self.image = image
        self.samples = column_inner(deflated, image, xp)
        self.frobenius: list[float | None] = []
        self.ranks: list[int] = []
        self.path: list[tuple[int, float]] = []
        self.stopped = ""
        self.first_block = 0

    def residual_mean(self, samples: list[Any]) -> SampleMean:
        """The estimate from the residual sample blocks ``samples`` (its standard error
        with the rounding of ``n`` terms and of the low-rank trace)."""
        n = int(self.basis.shape[0])
        return _residual_mean(self.low_rank_trace, samples, self.xp, n, self.low_rank_size)

    def residual_frobenius(self) -> float | None:
        """``mean_j ||(I - QQ^H) A g_j'||^2``, unbiased for ``||R||_F^2`` (E[g g^H] = I)."""
        return _mean_square_norm(project_out(self.basis, self.image, self.xp), self.xp)

    def _extend(self, matmat: Matmat, more: Any | None) -> tuple[Any, Any]:
        """Orthogonalize the residual images into the basis; one product ``A [new, more]``."""
        xp = self.xp
        room = int(self.basis.shape[0]) - int(self.basis.shape[1])  # Q fills C^n at most
        images = (
            self.image
            if int(self.image.shape[1]) <= room
            else backend.split(xp, self.image, (room,))[0]
        )
        new = extend_basis(self.basis, images, xp)
        self.basis = xp.concat([self.basis, new], axis=1)
        width = int(new.shape[1])
        block = new if more is None else xp.concat([new, project_out(self.basis, more, xp)], axis=1)
        image = matmat(block)
        new_image, residual_image = backend.split(xp, image, (width,))
        more_trace, more_size = _low_rank_terms(new, new_image, xp)
        self.low_rank_trace = self.low_rank_trace + more_trace
        self.low_rank_size = self.low_rank_size + more_size
        self.ranks.append(int(self.basis.shape[1]))
        return backend.split(xp, block, (width,))[1], residual_image

    def top_up(self, matmat: Matmat, probes: Any) -> None:
        """More residual probes for the same sketch (their images kept for absorbing)."""
        xp = self.xp
        deflated = project_out(self.basis, probes, xp)
        image = matmat(deflated)
        self.image = xp.concat([self.image, image], axis=1)
        self.samples = xp.concat([self.samples, column_inner(deflated, image, xp)])
        self.frobenius[-1] = self.residual_frobenius()

    def grow(self, matmat: Matmat, probes: Any) -> None:
        """Absorb the residual block into the sketch, draw the next one (one product)."""
        deflated, self.image = self._extend(matmat, probes)
        self.samples = column_inner(deflated, self.image, self.xp)
        self.frobenius.append(self.residual_frobenius())

    def absorb(self, matmat: Matmat, request: EstimationRequest, n: int, cap: int) -> bool:
        """Absorb the residual block without drawing another, if it fits (returns whether)."""
        rank = int(self.basis.shape[1])
        count = min(int(self.samples.shape[0]), n - rank)
        if count <= 0 or request.matmat.columns + count + 1 > cap:
            return False
        self._extend(matmat, None)
        return True


def _residual_mean(
    low_rank_trace: Any,
    samples: list[Any],
    xp: Any,
    n: int = 0,
    low_rank_size: Any = None,
) -> SampleMean:
    """The estimate ``low_rank_trace + mean(samples)`` of the residual sample blocks; with
    ``n`` its standard error includes the rounding (:func:`~linop_trace._stats.sample_mean`),
    of size ``low_rank_size`` in the low-rank trace."""
    drawn = samples[0] if len(samples) == 1 else xp.concat(samples)
    return sample_mean(drawn, xp, offset=low_rank_trace, terms=n, offset_size=low_rank_size)


def _low_rank_terms(basis: Any, image: Any, xp: Any) -> tuple[Any, Any]:
    """``sum_j q_j^H A q_j`` and ``sum_j |q_j^H A q_j|`` from the basis and its image."""
    head = column_inner(basis, image, xp)
    return xp.sum(head), xp.sum(xp.abs(head))


def _scaled_squares(xp: Any, block: Any) -> tuple[Any, Any]:
    """The sum of ``block``'s squares over its largest modulus, and that modulus."""
    peak = xp.max(xp.abs(block))
    scaled = block / xp.where(peak > 0, peak, xp.ones_like(peak))
    return xp.sum(backend.abs2(xp, scaled)), peak


def _mean_square_norm(block: Any, xp: Any) -> float | None:
    """``mean_j ||block_j||^2`` read as a float (``None`` without a value: JAX jit), its
    squares taken over the largest modulus and the scale put back in Python's float64
    (float32 products of 2^70 overflowed their squares, and the adaptive run moved)."""
    if int(block.shape[1]) == 0:
        return None
    numbers = backend.read_floats(xp, list(backend.jit(xp, _scaled_squares)(xp, block)))
    if numbers is None:
        return None
    ratio, largest = numbers
    largest = largest if largest > 0 else 1.0
    return ratio * largest * largest / int(block.shape[1])  # (inf, not OverflowError)


def _needed_probes(
    low_rank_trace: Any, samples: list[Any], request: EstimationRequest
) -> float | None:
    """:func:`predicted_residual_probes` from the samples in hand (one read; ``None``
    without values)."""
    xp = request.xp
    result = _residual_mean(low_rank_trace, samples, xp)
    if result.stderr is None:
        return math.inf
    numbers = backend.read_floats(xp, [xp.abs(result.value), result.stderr])
    if numbers is None:
        return None
    magnitude, spread = numbers
    target = tolerance_target(request, magnitude)
    # (spread * spread: inf, where spread**2 raised an OverflowError on Python floats)
    return predicted_residual_probes(spread * spread * result.count, target, request.confidence)
