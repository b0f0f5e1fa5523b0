"""Eigenvalue densities of self-adjoint operators from stochastic Lanczos quadrature.

Each probe's k Lanczos steps give a k-point quadrature rule (Ritz values theta_ji with
weights w_ji summing to 1) for the spectral measure seen from that probe; their average
over m probes estimates the operator's eigenvalue distribution
mu = (1/n) sum_i delta(lambda_i) (Lin, Saad and Yang 2016). Smoothing the atoms with a
Gaussian kernel gives a density on a grid, as PyHessian plots a network's Hessian spectrum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _backend as backend
from ._estimate import Estimate
from ._operators import aslinearoperator
from ._spectral import trace_function
from ._stats import sample_mean

__all__ = ["SpectralDensity", "spectral_density"]


def _identity(x: Any) -> Any:
    return x


class SpectralDensity:
    """The estimated eigenvalue distribution of an n x n self-adjoint operator.

    Attributes
    ----------
    nodes, weights : array, shape (m, k)
        Per probe, the Ritz values and their quadrature weights (each row sums to 1), in
        the operator's library.
    squared_norms : array, shape (m,)
        ``||z_j||^2`` of each probe (n for Rademacher probes).
    n : int
        The operator's size.
    num_matvecs : int
        Operator columns spent (probes x Lanczos steps).

    The distribution is (1/m) sum_j sum_i w_ji delta(theta_ji): atoms at the Ritz values
    with masses that sum to 1. :meth:`density` smooths it, :meth:`cdf` counts it,
    :meth:`integrate` estimates ``tr f(A)`` from it with a standard error over the probes.
    """

    def __init__(
        self, nodes: Any, weights: Any, squared_norms: Any, n: int, num_matvecs: int
    ) -> None:
        self.nodes = nodes
        self.weights = weights
        self.squared_norms = squared_norms
        self.n = int(n)
        self.num_matvecs = int(num_matvecs)

    def __repr__(self) -> str:
        m, k = self.nodes.shape
        return f"<SpectralDensity of n={self.n}: {m} probes x {k} Lanczos nodes>"

    # ------------------------------------------------------------------- the atoms
    def atoms(self) -> tuple[np.ndarray, np.ndarray]:
        """``(values, masses)`` as NumPy vectors: every Ritz value and its mass
        w_ji / m (the masses sum to 1). For plotting and for distances between
        distributions (e.g. ``scipy.stats.wasserstein_distance(values, eigenvalues,
        masses)``)."""
        values = backend.to_numpy(self.nodes).astype(float).ravel()
        masses = backend.to_numpy(self.weights).astype(float)
        masses = (masses / masses.shape[0]).ravel()
        return values, masses

    def default_width(self) -> float:
        """The kernel width when none is given: the atoms' range divided by 4k (k
        Lanczos nodes resolve the spectrum to about range / k; a quarter of that keeps
        isolated eigenvalues apart while smoothing the ghosts and the probes' jitter)."""
        values, _ = self.atoms()
        k = self.nodes.shape[1]
        spread = float(values.max() - values.min())
        return spread / (4 * k) if spread > 0 else max(abs(float(values.max())), 1.0) * 1e-3

    def grid(self, num: int = 512, width: float | None = None) -> np.ndarray:
        """``num`` points from the smallest atom minus 3 widths to the largest plus 3."""
        values, _ = self.atoms()
        width = self.default_width() if width is None else float(width)
        return np.linspace(values.min() - 3 * width, values.max() + 3 * width, int(num))

    def density(self, points: Any = None, width: float | None = None) -> np.ndarray:
        """The Gaussian-smoothed density at ``points`` (default: :meth:`grid`), which
        integrates to 1: sum_ji (w_ji / m) N(t; theta_ji, width^2). NumPy arrays (a
        density is for plots and reports)."""
        width = self.default_width() if width is None else float(width)
        if not width > 0:
            raise ValueError(f"width must be positive, got {width}")
        t = self.grid(width=width) if points is None else np.asarray(points, dtype=float)
        values, masses = self.atoms()
        scaled = (t[..., None] - values) / width
        return np.exp(-0.5 * scaled**2) @ masses / (width * math.sqrt(2 * math.pi))

    def cdf(self, points: Any) -> np.ndarray:
        """The estimated fraction of eigenvalues at or below each of ``points``."""
        values, masses = self.atoms()
        order = np.argsort(values)
        cumulative = np.concatenate([[0.0], np.cumsum(masses[order])])
        return cumulative[np.searchsorted(values[order], np.asarray(points), side="right")]

    def integrate(self, f: Callable[[Any], Any]) -> Estimate:
        """``tr f(A)`` from the same quadrature rules: the mean over probes of
        ``||z_j||^2 sum_i w_ji f(theta_ji)``, with its standard error (``f`` gets an
        array of the operator's library). The quadrature error is not included here; use
        :func:`~linop_trace.trace_function` for an interval that bounds it."""
        xp = backend.array_namespace(self.nodes)
        samples = self.squared_norms * xp.sum(self.weights * f(self.nodes), axis=1)
        return sample_mean(samples, xp).estimate(self.num_matvecs, "slq")

    def plot(
        self,
        ax: Any = None,
        num: int = 512,
        width: float | None = None,
        log: bool = False,
        **style: Any,
    ) -> Any:
        """Draw the smoothed density (matplotlib, an optional dependency) and return the
        axes. ``log=True`` uses a logarithmic density axis, where a network Hessian's few
        outliers stay visible next to its bulk."""
        try:
            import matplotlib.pyplot as plt
        except ImportError as error:  # pragma: no cover - depends on the installation
            raise ImportError(
                "SpectralDensity.plot needs matplotlib (pip install matplotlib)"
            ) from error
        if ax is None:
            _, ax = plt.subplots()
        points = self.grid(num, width)
        ax.plot(points, self.density(points, width), **style)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        return ax


def spectral_density(
    A: Any,
    num_matvecs: int | None = None,
    lanczos_steps: int | None = None,
    seed: Any = None,
    probe: str = "rademacher",
    reorthogonalize: bool = False,
    block_size: int | None = None,
    check_finite: bool = True,
) -> SpectralDensity:
    """Estimate the eigenvalue distribution of a self-adjoint operator (stochastic Lanczos
    quadrature: each probe's Lanczos nodes and weights, all probes in one ``matmat`` per
    step).

    Parameters
    ----------
    A : LinearOperator or matrix
        Self-adjoint: Lanczos assumes it and cannot check it.
    num_matvecs, lanczos_steps, seed, probe, reorthogonalize, block_size, check_finite
        As for :func:`~linop_trace.trace_function` (by default 20 probes of 20 steps).
        More steps resolve finer detail: k steps place about k nodes per probe.

    Returns
    -------
    SpectralDensity

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import spectral_density
    >>> eigenvalues = np.concatenate([np.linspace(0.0, 1.0, 300), [5.0, 6.0]])
    >>> density = spectral_density(np.diag(eigenvalues), num_matvecs=600, seed=0)
    >>> round(float(density.cdf(2.0)), 2)  # 300 of 302 eigenvalues lie below 2
    0.99
    """
    operator = aslinearoperator(A)
    backend.refuse_dask(operator.xp, "spectral_density")
    if operator.shape[0] != operator.shape[1]:
        raise ValueError(f"spectral_density needs a square operator, got shape {operator.shape}")
    if operator.shape[0] == 0:
        raise ValueError("spectral_density needs a non-empty operator")
    estimate = trace_function(
        operator,
        _identity,
        num_matvecs=num_matvecs,
        lanczos_steps=lanczos_steps,
        seed=seed,
        probe=probe,
        reorthogonalize=reorthogonalize,
        block_size=block_size,
        check_finite=check_finite,
    )
    estimate._verify()  # the products' finiteness (read once: a density is for the host)
    info = estimate.info
    return SpectralDensity(
        info["nodes"],
        info["weights"],
        info["squared_norms"],
        operator.shape[0],
        estimate.num_matvecs,
    )
