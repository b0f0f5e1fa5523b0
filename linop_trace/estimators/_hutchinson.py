"""Hutchinson's estimator (Hutchinson 1990; variance: Avron and Toledo 2011) and its
diagonal counterpart (Bekas, Kokiopoulou and Saad 2007).

Trace: tr(A) = E[z^H A z] for any probe with E[z z^H] = I. With m probes the estimate is
the sample mean, its standard error the sample standard deviation over sqrt(m); the
interval's quantile is Student-t corrected to second order for the samples' skewness and
kurtosis (:func:`~linop_trace._stats.edgeworth_quantile`; formula in
:class:`Hutchinson`), since quadratic forms of a matrix with a few dominant eigenvalues
are chi-square-like and strongly skewed, and the plain t-interval then covers less than
its level.

Diagonal: d_i ~ sum_j conj(z_ji) (A z_j)_i / sum_j |z_ji|^2, a ratio estimator (unbiased for
Rademacher and unit-modulus probes, whose denominator is the number of probes), with the
entrywise standard error of :class:`~linop_trace._stats.RatioSums` (the ratio estimator's,
exact for Gaussian probes: a Student-t statistic).
Per-probe variance of the numerator of entry i (real A): Gaussian probes
``sum_j A_ij^2 + A_ii^2``, Rademacher ``sum_{j != i} A_ij^2``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .. import _backend as backend
from .._estimate import Estimate, EstimateInterrupted
from .._stats import RatioSums, SampleMean, sample_mean
from ._adaptive import Progress, grow_diagonal, remaining, sample_mean_progress, until_met
from ._base import EstimationRequest, ProbeOption, RefineState, cover, covered_product
from ._linalg import column_inner

__all__ = [
    "Hutchinson",
    "diagonal_hutchinson_core",
    "diagonal_hutchinson_samples",
    "hutchinson_core",
    "hutchinson_samples",
]

Matmat = Callable[[Any], Any]


def hutchinson_samples(matmat: Matmat, probes: Any, xp: Any) -> Any:
    """Per-probe samples z_j^H A z_j for the columns z_j of ``probes`` (one product; the
    samples carry its finiteness check, so that XLA fuses the product with the sum and
    no pass goes over the product to check it)."""
    image = covered_product(matmat, probes)
    return cover(matmat, backend.materialized(xp, column_inner(probes, image, xp)))


def hutchinson_core(matmat: Matmat, probes: Any, xp: Any) -> SampleMean:
    """Hutchinson's trace estimate from the probe block ``probes`` (n, m): the mean of the
    samples, its standard error, and the samples' shape (one product)."""
    samples = hutchinson_samples(matmat, probes, xp)
    return sample_mean(samples, xp, terms=int(probes.shape[0]))


def diagonal_hutchinson_samples(
    matmat: Matmat, probes: Any, xp: Any, unit_modulus: bool = False
) -> tuple[Any, Any]:
    """Numerators ``conj(Z) * (A Z)`` and denominators ``|Z|^2``, both ``(n, k)``, one product.

    With ``unit_modulus=True`` (Rademacher, Steinhaus: ``|Z| = 1``) the denominators are
    all ones and returned as ``None``, which saves a pass over the block.
    """
    numerators = backend.conj(xp, probes) * matmat(probes)
    return numerators, None if unit_modulus else backend.abs2(xp, probes)


def diagonal_hutchinson_core(
    matmat: Matmat, probes: Any, xp: Any, unit_modulus: bool = False, sums: RatioSums | None = None
) -> RatioSums:
    """Bekas et al.'s diagonal estimator from the probe block ``probes`` (one product):
    its running sums (``sums``, continued, or new), whose ``estimate()`` is the diagonal
    estimate, its entrywise standard error and the number of probes."""
    sums = RatioSums(xp) if sums is None else sums
    sums.add_products(probes, covered_product(matmat, probes), unit_modulus)
    cover(matmat, sums.u)  # every row of the image flows into its row sum
    return sums


class Hutchinson(ProbeOption):
    """Hutchinson's trace estimator with batched probes and adaptive stopping.

    Parameters
    ----------
    probe : str, optional
        Overrides the ``probe=`` argument of :func:`trace`.

    Notes
    -----
    Per-probe variance with S = (A + A^T)/2: ``2 ||S||_F^2`` for Gaussian probes,
    ``2 sum_{i != j} S_ij^2`` for Rademacher probes. Cost: m operator applications in
    ``ceil(m / block_size)`` matmat calls.

    The trace interval ``value +- x * stderr`` is not the plain Student-t one. Its quantile
    x corrects t = t_{m-1} (the Student-t quantile with m - 1 degrees of freedom) to
    second order for the samples' skewness G1 and excess kurtosis G2 (unbiased sample
    estimates; Edgeworth expansion of the studentized mean, Hall 1992, Sec. 2.6;
    :func:`~linop_trace._stats.edgeworth_quantile`):

        x = max(t - z [G2 (z^2 - 3) / 12 - G1^2 (z^4 + 2 z^2 - 3) / 18] / m,  z),

    z the normal quantile of the same level; skewed samples widen the interval. Fewer
    than four samples, complex samples, samples without spread and a non-finite
    correction leave x = t. The adaptive stopping rule uses the same quantile. The
    diagonal's entrywise intervals use t_{k-1} for k probes, uncorrected.

    With ``rtol``/``atol`` probe blocks are added (doubling the probes so far) until the
    half-width of the interval meets the tolerance.

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import trace
    >>> from linop_trace.estimators import Hutchinson
    >>> rng = np.random.default_rng(0)
    >>> A = rng.standard_normal((50, 50))
    >>> est = trace(A, method=Hutchinson(probe="gaussian"), num_matvecs=400, seed=1)
    >>> low, high = est.ci(0.99)
    >>> bool(low < np.trace(A) < high)
    True
    """

    name = "hutchinson"
    supports_tolerance = True
    min_matvecs = 2
    jit_compatible = True
    unit_scaled = ("diagonal",)

    def trace(self, request: EstimationRequest) -> Estimate:
        return self.finish_trace(request, [])

    def finish_trace(
        self, request: EstimationRequest, samples: list[Any], info: dict | None = None
    ) -> Estimate:
        """Hutchinson's estimate from the sample blocks ``samples`` already drawn (by
        ``method="auto"``) and probes for the rest of the budget; adaptive with a
        tolerance."""
        xp = request.xp
        have = sum(int(block.shape[0]) for block in samples)
        widths = request.blocks(max(request.num_matvecs - have, 0))
        if not samples and len(widths) == 1 and not request.adaptive:  # one block: the core
            result = hutchinson_core(request.matmat, request.probes(widths[0]), xp)
            info = {"probe": request.probes.kind, **(info or {})}
            return _with_refine_state(
                result.estimate(request.columns, self.name, None, info), result
            )
        info = {"probe": request.probes.kind, **(info or {})}
        try:
            self._more_samples(request, samples, widths)
        except KeyboardInterrupt as interrupt:
            raise EstimateInterrupted(self._estimate_so_far(request, samples, info)) from interrupt
        converged = None
        if request.adaptive:

            def measure() -> Progress:
                result = sample_mean(_concatenated(samples, xp), xp, terms=request.n)
                return sample_mean_progress(result, request)

            def grow() -> bool:
                left = remaining(request)
                if left <= 0:
                    return False
                count = sum(int(block.shape[0]) for block in samples)
                # a round doubles the samples whatever the block size (a round cut to one
                # block made the stopping points, so the estimate, depend on it)
                for width in request.blocks(min(max(count, 1), left)):
                    samples.append(hutchinson_samples(request.matmat, request.probes(width), xp))
                return True

            try:
                converged = until_met(request, measure, grow)
            except KeyboardInterrupt as interrupt:
                raise EstimateInterrupted(
                    self._estimate_so_far(request, samples, info)
                ) from interrupt
        result = sample_mean(_concatenated(samples, xp), xp, terms=request.n)
        return _with_refine_state(
            result.estimate(request.columns, self.name, converged, info), result
        )

    @staticmethod
    def _more_samples(request: EstimationRequest, samples: list[Any], widths: list[int]) -> None:
        for width in widths:
            samples.append(hutchinson_samples(request.matmat, request.probes(width), request.xp))

    def _estimate_so_far(
        self, request: EstimationRequest, samples: list[Any], info: dict[str, Any]
    ) -> Estimate | None:
        """The estimate from the sample blocks completed before an interrupt (None for
        fewer than two samples: no error bar)."""
        if sum(int(block.shape[0]) for block in samples) < 2:
            return None
        result = sample_mean(_concatenated(samples, request.xp), request.xp, terms=request.n)
        return result.estimate(request.columns, self.name, False, info)

    def diagonal(self, request: EstimationRequest) -> Estimate:
        """Bekas et al. diagonal estimate ``sum z * Az / sum z * z`` with elementwise stderr.

        The probe blocks are summed as they come (O(n) memory besides one block). With
        ``rtol``/``atol``, probe blocks are added (doubling) until the largest half-width
        meets ``max(atol, rtol * max|d|)``.

        Examples
        --------
        >>> import numpy as np
        >>> from linop_trace import diagonal
        >>> A = np.diag([1.0, 2.0, 3.0]) + 0.01 * np.ones((3, 3))
        >>> est = diagonal(A, method="hutchinson", num_matvecs=400, seed=0)
        >>> bool(np.all(np.abs(est.value - np.diag(A)) < 5 * est.stderr))
        True
        """
        return self._continued_diagonal(request, RatioSums(request.xp, request.real_valued))

    def refine(self, quantity: str, request: EstimationRequest, state: RefineState) -> Estimate:
        """The trace or diagonal continued from ``state``: the samples (sums) kept, more
        probe blocks drawn as the run would have drawn them."""
        if quantity == "diagonal":
            return self._continued_diagonal(request, state.sums.copy())
        have = int(state.samples.shape[0])
        request = replace(request, num_matvecs=have + request.num_matvecs)
        return self.finish_trace(request, [state.samples])

    def _continued_diagonal(self, request: EstimationRequest, sums: RatioSums) -> Estimate:
        """``sums`` with ``request.num_matvecs`` more probes, then adaptive growth."""
        xp = request.xp
        unit_modulus = request.probes.unit_modulus

        def draw(width: int) -> None:
            diagonal_hutchinson_core(request.matmat, request.probes(width), xp, unit_modulus, sums)

        try:
            for width in request.blocks(request.num_matvecs):
                draw(width)
            converged = grow_diagonal(request, sums, draw) if request.adaptive else None
        except KeyboardInterrupt as interrupt:  # the blocks summed so far, if two or more
            partial = self._diagonal_estimate(request, sums, False) if sums.count > 1 else None
            raise EstimateInterrupted(partial) from interrupt
        estimate = self._diagonal_estimate(request, sums, converged)
        estimate._state = RefineState("hutchinson", sums=sums)
        return estimate

    def _diagonal_estimate(
        self, request: EstimationRequest, sums: RatioSums, converged: bool | None
    ) -> Estimate:
        value, stderr, count = sums.estimate()
        return Estimate(
            value,
            stderr,
            request.columns,
            self.name,
            converged=converged,
            dof=count - 1 if count > 1 else None,
            info={"probe": request.probes.kind, "num_probes": count},
        )


def _with_refine_state(estimate: Estimate, result: SampleMean) -> Estimate:
    """``estimate`` keeping its samples for :meth:`~linop_trace.Estimate.refine`."""
    estimate._state = RefineState("hutchinson", samples=result.samples)
    return estimate


def _concatenated(samples: list[Any], xp: Any) -> Any:
    return samples[0] if len(samples) == 1 else xp.concat(samples)
