"""Hutchinson's estimator (Hutchinson 1990; variance: Avron and Toledo 2011).

tr(A) = E[z^H A z] for any probe with E[z z^H] = I. With m probes the estimate is the
sample mean, its standard error the sample standard deviation over sqrt(m).
"""

from __future__ import annotations

from typing import Any, Callable

from .. import _backend as backend
from .._estimate import Estimate
from .._operators import LinearOperator
from ._base import EstimationRequest, Estimator

__all__ = ["Hutchinson", "hutchinson_trace_samples"]


def hutchinson_trace_samples(matmat: Callable[[Any], Any], probes: Any, xp: Any) -> Any:
    """Per-probe samples z_j^H A z_j for the columns z_j of ``probes`` (one matmat)."""
    image = matmat(probes)
    return xp.sum(xp.conj(probes) * image, axis=0) if backend.is_complex_dtype(xp, probes.dtype) else xp.sum(probes * image, axis=0)


def mean_and_stderr(samples: Any, xp: Any) -> tuple[Any, Any]:
    """Sample mean and its standard error std(ddof=1)/sqrt(m) (complex: of |s - mean|)."""
    m = samples.shape[0]
    mean = xp.mean(samples)
    if m < 2:
        return mean, None
    deviation = samples - mean
    square = xp.real(xp.conj(deviation) * deviation) if backend.is_complex_dtype(xp, samples.dtype) else deviation * deviation
    variance = xp.sum(square) / (m - 1)
    return mean, xp.sqrt(variance / m)


class Hutchinson(Estimator):
    """Hutchinson's trace estimator with batched probes and adaptive stopping.

    Parameters
    ----------
    probe : str, optional
        Overrides the ``probe=`` argument of :func:`trace`.

    Notes
    -----
    Per-probe variance with S = (A + A^T)/2: ``2 ||S||_F^2`` for Gaussian probes,
    ``2 sum_{i != j} S_ij^2`` for Rademacher probes. Cost: m operator applications in
    ``ceil(m / block_size)`` matmat calls. The interval uses a Student-t quantile with
    m - 1 degrees of freedom. With ``rtol``/``atol`` probe blocks are added until the
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

    def __init__(self, probe: str | None = None) -> None:
        self.probe = probe

    def __repr__(self) -> str:
        return f"Hutchinson(probe={self.probe!r})"

    def _sampler(self, request: EstimationRequest) -> Any:
        if self.probe is None or self.probe == request.probes.kind:
            return request.probes
        from .._probes import ProbeSampler

        base = request.probes
        return ProbeSampler(self.probe, base.n, base.xp, base.dtype, base.device, base.random)

    def trace(self, operator: LinearOperator, request: EstimationRequest) -> Estimate:
        xp = operator.xp
        sampler = self._sampler(request)
        samples = [
            hutchinson_trace_samples(request.matmat, sampler(width), xp)
            for width in request.blocks(request.num_matvecs)
        ]
        converged = None
        if request.adaptive:
            converged = False
            from scipy import stats

            cap = request.max_matvecs or request.num_matvecs
            while True:
                drawn = xp.concat(samples) if len(samples) > 1 else samples[0]
                mean, stderr = mean_and_stderr(drawn, xp)
                m = drawn.shape[0]
                quantile = stats.t.ppf(0.5 + request.confidence / 2, m - 1)
                target = max(request.atol or 0.0, (request.rtol or 0.0) * abs(complex(mean)))
                if float(quantile * stderr) <= target:
                    converged = True
                    break
                remaining = cap - m
                if remaining <= 0:
                    break
                # grow geometrically (double the probes so far), within block and budget
                width = min(max(m, 1), remaining, request.block_size)
                samples.append(hutchinson_trace_samples(request.matmat, sampler(width), xp))
        drawn = xp.concat(samples) if len(samples) > 1 else samples[0]
        mean, stderr = mean_and_stderr(drawn, xp)
        m = int(drawn.shape[0])
        return Estimate(
            mean,
            stderr,
            request.matmat.columns,
            self.name,
            converged=converged,
            dof=m - 1,
            info={"probe": sampler.kind, "samples": drawn},
        )


