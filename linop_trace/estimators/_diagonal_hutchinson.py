"""Stochastic diagonal estimation (Bekas, Kokiopoulou and Saad 2007).

    d_i ~ sum_j conj(z_ji) (A z_j)_i / sum_j |z_ji|^2,

a ratio estimator; for Rademacher and unit-modulus probes the denominator is the number
of probes and the estimator is unbiased. Per-probe variance of the numerator of entry i
(real A): Gaussian probes ``sum_j A_ij^2 + A_ii^2``; Rademacher ``sum_{j != i} A_ij^2``.
The elementwise standard error is the ratio estimator's (delta method):

    se_i = sqrt(sum_j |y_ji - d_i x_ji|^2 / (k - 1)) * sqrt(k) / sum_j x_ji,

with y = conj(z) * (A z), x = |z|^2; for x = 1 it is the sample std over sqrt(k).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .. import _backend as backend
from .._estimate import Estimate
from .._operators import LinearOperator
from ._base import EstimationRequest

__all__ = [
    "UNIT_MODULUS_PROBES",
    "RatioSamples",
    "diagonal_hutchinson",
    "diagonal_hutchinson_samples",
    "diagonal_interval_met",
    "grow_until_met",
    "ratio_mean_and_stderr",
]


def diagonal_hutchinson_samples(
    matmat: Callable[[Any], Any], probes: Any, xp: Any, unit_modulus: bool = False
) -> tuple[Any, Any]:
    """Numerators ``conj(Z) * (A Z)`` and denominators ``|Z|^2``, both ``(n, k)``, one product.

    With ``unit_modulus=True`` (Rademacher, Steinhaus: ``|Z| = 1``) the denominators are
    all ones and returned as ``None``, which saves a pass over the block.
    """
    image = matmat(probes)
    if backend.is_complex_dtype(xp, probes.dtype):
        numerators = xp.conj(probes) * image
        return numerators, None if unit_modulus else xp.real(xp.conj(probes) * probes)
    return probes * image, None if unit_modulus else probes * probes


def ratio_mean_and_stderr(numerators: Any, denominators: Any, xp: Any) -> tuple[Any, Any]:
    """Row-wise ratio estimate ``sum y / sum x`` and its delta-method standard error.

    ``denominators=None`` means all ones: the plain mean and std / sqrt(k).
    """
    k = numerators.shape[1]
    complex_ = backend.is_complex_dtype(xp, numerators.dtype)
    if denominators is None:
        value = xp.mean(numerators, axis=1)
        if k < 2:
            return value, None
        residual = numerators - value[:, None]
        square = xp.abs(residual) ** 2 if complex_ else residual * residual
        return value, xp.sqrt(xp.sum(square, axis=1) / ((k - 1) * k))
    total = xp.sum(denominators, axis=1)
    value = xp.sum(numerators, axis=1) / (
        xp.astype(total, numerators.dtype) if numerators.dtype != total.dtype else total
    )
    if k < 2:
        return value, None
    residual = numerators - value[:, None] * denominators
    square = xp.abs(residual) ** 2 if complex_ else residual * residual
    stderr = xp.sqrt(xp.sum(square, axis=1) / (k - 1)) * (math.sqrt(k) / total)
    return value, stderr


UNIT_MODULUS_PROBES = ("rademacher", "steinhaus")


def diagonal_interval_met(value: Any, stderr: Any, dof: int, request: EstimationRequest) -> bool:
    """Max half-width over the entries meets ``max(atol, rtol * max|d|)``."""
    if stderr is None:
        return False
    from scipy import stats

    xp = backend.array_namespace(value)
    quantile = float(stats.t.ppf(0.5 + request.confidence / 2, dof))
    # from stop-gradient copies; undecidable without concrete values (JAX jit)
    scale = backend.concrete_float(xp.max(xp.abs(value))) if value.shape[0] else 0.0
    spread = backend.concrete_float(xp.max(stderr))
    if scale is None or spread is None:
        return False
    target = max(request.atol or 0.0, (request.rtol or 0.0) * scale)
    return quantile * spread <= target


class RatioSamples:
    """The numerator and denominator blocks drawn so far (denominators ``None`` for
    unit-modulus probes), and their ratio estimate."""

    def __init__(self, xp: Any, unit_modulus: bool) -> None:
        self.xp = xp
        self.unit_modulus = unit_modulus
        self.numerators: list[Any] = []
        self.denominators: list[Any] = []

    def add(self, numerators: Any, denominators: Any) -> None:
        self.numerators.append(numerators)
        self.denominators.append(denominators)

    def stacked(self) -> tuple[Any, Any]:
        xp = self.xp
        if len(self.numerators) == 1:
            return self.numerators[0], self.denominators[0]
        if self.unit_modulus:
            return xp.concat(self.numerators, axis=1), None
        return xp.concat(self.numerators, axis=1), xp.concat(self.denominators, axis=1)

    def estimate(self) -> tuple[Any, Any, int]:
        """``(value, stderr, number of probes)`` of the ratio estimator."""
        y, x = self.stacked()
        value, stderr = ratio_mean_and_stderr(y, x, self.xp)
        return value, stderr, int(y.shape[1])


def grow_until_met(
    samples: RatioSamples,
    request: EstimationRequest,
    draw: Callable[[int], tuple[Any, Any]],
    offset: Any = 0,
) -> bool | None:
    """Adaptive stopping of the diagonal estimators: double the probes (within the block
    size and ``max_matvecs``) until the interval of ``offset + estimate`` meets the
    tolerance. ``None`` without a tolerance, else whether it was met."""
    if not request.adaptive:
        return None
    cap = request.max_matvecs or request.num_matvecs
    while True:
        value, stderr, count = samples.estimate()
        if diagonal_interval_met(offset + value, stderr, count - 1, request):
            return True
        remaining = cap - request.matmat.columns
        if remaining <= 0:
            return False
        samples.add(*draw(min(count, remaining, request.block_size)))


def diagonal_hutchinson(
    operator: LinearOperator, request: EstimationRequest, sampler: Any, name: str
) -> Estimate:
    """The diagonal estimator behind ``Hutchinson().diagonal`` (blocks, adaptive stopping)."""
    xp = operator.xp
    unit_modulus = sampler.kind in UNIT_MODULUS_PROBES
    samples = RatioSamples(xp, unit_modulus)

    def draw(width: int) -> tuple[Any, Any]:
        return diagonal_hutchinson_samples(request.matmat, sampler(width), xp, unit_modulus)

    for width in request.blocks(request.num_matvecs):
        samples.add(*draw(width))
    converged = grow_until_met(samples, request, draw)
    value, stderr, count = samples.estimate()
    return Estimate(
        value,
        stderr,
        request.matmat.columns,
        name,
        converged=converged,
        dof=count - 1 if count > 1 else None,
        info={"probe": sampler.kind, "num_probes": count},
    )
