"""Adaptive stopping: one rule and one driver for every method that honours rtol/atol.

The rule: stop when the half-width of the estimate's ``confidence`` interval is at most
``max(atol, rtol * magnitude)``, the magnitude being |value| for a trace and max |d_i|
for a diagonal. The driver reads the estimate on the host once per round (the only
reads an adaptive run makes), checks that the products so far were finite, decides, and
asks the method to grow (more probes, or a larger sketch) until the rule is met or the
budget cap is spent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import _backend as backend
from .._stats import RatioSums, SampleMean, edgeworth_quantile
from ._base import EstimationRequest

__all__ = [
    "Progress",
    "grow_diagonal",
    "read_progress",
    "remaining",
    "sample_mean_progress",
    "tolerance_target",
    "until_met",
]


def tolerance_target(request: EstimationRequest, magnitude: float) -> float:
    """The half-width an adaptive estimate must reach: ``max(atol, rtol * magnitude)``,
    ``atol`` in the units of the products, which may have been scaled by a power of two
    (``magnitude`` is in them already)."""
    atol = request.atol or 0.0
    scale = request.matmat.scale
    if atol and scale is not None:
        atol *= backend.read_float(scale) or 1.0  # (a power of two: never 0)
    return max(atol, (request.rtol or 0.0) * magnitude)


@dataclass(frozen=True)
class Progress:
    """One round's reading of an adaptive estimate (host numbers).

    ``half_width`` is that of the interval (``None`` while the method has no error
    estimate yet), ``magnitude`` the size the relative tolerance scales (``None`` when the
    values cannot be read: abstract JAX values under ``jit``, where no round is decidable).
    """

    half_width: float | None
    magnitude: float | None

    @property
    def decidable(self) -> bool:
        return self.magnitude is not None

    def met(self, request: EstimationRequest) -> bool:
        if self.half_width is None or self.magnitude is None:
            return False
        return self.half_width <= tolerance_target(request, self.magnitude)


def read_progress(half_width: Any, magnitude: Any) -> Progress:
    """A :class:`Progress` from device scalars (one read each; ``None`` stays ``None``)."""
    magnitude = backend.read_float(magnitude) if magnitude is not None else None
    if half_width is None:
        return Progress(None, magnitude)
    return Progress(backend.read_float(half_width), magnitude)


def until_met(
    request: EstimationRequest,
    measure: Callable[[], Progress],
    grow: Callable[[], bool],
    measure_first: bool = True,
) -> bool:
    """Grow until the tolerance is met: each round ``measure()`` the estimate (the round's
    one host read, after the finiteness of the products so far is checked), stop if the
    rule holds (``True``), else ``grow()``; stop when it cannot (``False``: the budget cap
    is spent) or when the estimate cannot be read (``False``). ``measure_first=False``
    grows before the first reading (the state in hand was measured already)."""
    if not measure_first and not grow():
        return False
    while True:
        request.matmat.check_now()
        progress = measure()
        if not progress.decidable:
            raise traced_tolerance_error()
        if progress.met(request):
            return True
        if not grow():
            return False


def traced_tolerance_error() -> ValueError:
    """A tolerance where the estimate has no values to read each round (under
    ``jax.jit`` or ``jax.vmap``): it stopped after its first round, silently."""
    return ValueError(
        "rtol/atol decide after each round from the estimate's values, which a JAX "
        "transformation (jax.jit, jax.vmap) does not have: pass num_matvecs for a fixed "
        "budget inside it, or run the adaptive estimate outside it"
    )


def remaining(request: EstimationRequest) -> int:
    """Columns left under the cap."""
    return request.cap - request.columns


def sample_mean_progress(result: SampleMean, request: EstimationRequest) -> Progress:
    """One read of a sample mean (Hutchinson, Hutch++'s residual samples): its magnitude and
    the half-width of its shape-corrected t-interval at the request's confidence."""
    from scipy import stats

    xp = request.xp
    skewness, kurtosis = result.shape(xp)
    numbers = backend.read_floats(xp, [xp.abs(result.value), result.stderr, skewness, kurtosis])
    if numbers is None:
        return Progress(None, None)
    magnitude, stderr, skewness, kurtosis = numbers
    if stderr is None:
        return Progress(None, magnitude)
    level = request.confidence
    quantile = edgeworth_quantile(
        float(stats.t.ppf(0.5 + level / 2, result.count - 1)),
        level,
        result.count,
        skewness,
        kurtosis,
    )
    return Progress(quantile * stderr, magnitude)


def grow_diagonal(
    request: EstimationRequest,
    sums: RatioSums,
    draw: Callable[[int], None],
    offset: Any = None,
) -> bool:
    """Adaptive stopping of the diagonal estimators (Hutchinson's, Diag++'s residual): double
    the probes (within the block size and the cap) until the largest half-width of
    ``offset + estimate`` (t quantile with the probes' count - 1 dof) meets
    ``max(atol, rtol * max|d|)``. ``draw(width)`` adds a block of probes to ``sums``."""
    from scipy import stats

    xp = request.xp

    def measure() -> Progress:
        value, stderr, count = sums.estimate()
        if offset is not None:
            value = offset + value
        if stderr is None:
            return read_progress(None, _max_or_zero(xp, xp.abs(value)))
        quantile = float(stats.t.ppf(0.5 + request.confidence / 2, count - 1))
        numbers = backend.read_floats(
            xp, [_max_or_zero(xp, xp.abs(value)), _max_or_zero(xp, stderr)]
        )
        if numbers is None:
            return Progress(None, None)
        return Progress(quantile * numbers[1], numbers[0])

    def grow() -> bool:
        left = remaining(request)
        if left <= 0:
            return False
        for width in request.blocks(min(sums.count, left)):  # (doubling, in blocks)
            draw(width)
        return True

    return until_met(request, measure, grow)


def _max_or_zero(xp: Any, x: Any) -> Any:
    """max of a vector (0 for an empty one)."""
    if x.shape[0] == 0:
        return xp.zeros((), dtype=x.dtype, device=backend.device_of(x))
    return xp.max(x)
