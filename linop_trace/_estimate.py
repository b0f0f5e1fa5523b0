"""``Estimate``: the result of every trace, diagonal and row-sum computation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import _backend as backend

__all__ = ["Estimate"]


@dataclass(frozen=True, repr=False)
class Estimate:
    """A value with its standard error and what it cost.

    Attributes
    ----------
    value : array
        In the operator's library: a 0-d array for a trace, a vector for a diagonal or
        row sums. Differentiable where the operator is.
    stderr : array or None
        Standard error of ``value`` (same shape); zeros for exact results, ``None`` where
        the method has no honest error estimate.
    num_matvecs : int
        Columns that passed through the operator (operator applications).
    method : str
        Name of the method that produced the value.
    converged : bool or None
        With ``rtol``/``atol``: whether the interval met the tolerance within the budget.
        ``None`` when no tolerance was asked for.
    dof : int or None
        Degrees of freedom of the Student-t quantile used by :meth:`ci`; ``None`` uses
        the normal quantile.
    info : dict
        Method-specific extras (e.g. the plain XTrace error estimate).

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import trace
    >>> est = trace(np.diag([1.0, 2.0, 3.0]), method="exact")
    >>> float(est), est.num_matvecs, est.ci()
    (6.0, 0, (6.0, 6.0))
    """

    value: Any
    stderr: Any
    num_matvecs: int
    method: str
    converged: bool | None = None
    dof: int | None = None
    info: dict = field(default_factory=dict)

    def quantile(self, level: float = 0.95) -> float:
        """The two-sided quantile that :meth:`ci` multiplies the standard error by."""
        if not 0 < level < 1:
            raise ValueError(f"confidence level must lie in (0, 1), got {level}")
        from scipy import stats

        tail = 0.5 + level / 2
        if self.dof is None:
            return float(stats.norm.ppf(tail))
        return float(stats.t.ppf(tail, self.dof))

    def ci(self, level: float = 0.95) -> tuple[Any, Any]:
        """The ``level`` confidence interval ``(low, high)`` from ``stderr``.

        Scalars come back as Python floats, vectors as arrays of the value's library.
        """
        if self.stderr is None:
            raise ValueError(f"method {self.method!r} reports no error estimate, so no interval")
        xp = backend.array_namespace(self.value)
        if backend.is_complex_dtype(xp, self.value.dtype):
            raise ValueError("a confidence interval needs a real value; this estimate is complex")
        # intervals are reported, not differentiated: detach before leaving the library
        value = backend.stop_gradient(self.value)
        half_width = self.quantile(level) * backend.stop_gradient(self.stderr)
        low, high = value - half_width, value + half_width
        if value.ndim == 0:
            return float(low), float(high)
        return low, high

    def __float__(self) -> float:
        return float(backend.stop_gradient(self.value))

    def __complex__(self) -> complex:
        return complex(self.value)

    def __repr__(self) -> str:
        def short(x: Any) -> str:
            if x is None:
                return "None"
            if getattr(x, "ndim", 1) == 0:
                try:
                    return (
                        f"{complex(x):.6g}"
                        if backend.is_complex_dtype(backend.array_namespace(x), x.dtype)
                        else f"{float(x):.6g}"
                    )
                except Exception:  # tracers
                    return repr(x)
            return f"<{backend.library_name(x)} array of shape {tuple(x.shape)}>"

        conv = "" if self.converged is None else f", converged={self.converged}"
        return (
            f"Estimate(value={short(self.value)}, stderr={short(self.stderr)}, "
            f"num_matvecs={self.num_matvecs}, method={self.method!r}{conv})"
        )
