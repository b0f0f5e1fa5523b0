"""Diag++ (Baston and Nakatsukasa 2022): Hutch++'s deflation for the diagonal.

    diag(A) = diag(Q Q^H A) + diag((I - QQ^H) A),    Q = orth(A S),

the first term exact from ``Q^H A = (A^H Q)^H``, the second by the Bekas et al. estimator
``conj(g) * (I - QQ^H) A g / |g|^2`` on residual probes g. Unlike the trace, the
cross term diag((I - QQ^H) A QQ^H) does not vanish, so the residual is one-sided.
"""

from __future__ import annotations

from typing import Any

from .. import _backend as backend
from .._estimate import Estimate
from .._operators import LinearOperator
from ._base import EstimationRequest, Estimator
from ._diagonal_hutchinson import UNIT_MODULUS_PROBES, RatioSamples, grow_until_met
from ._hutchpp import (
    Matmat,
    adjoint_product,
    blocked_matmat,
    conj,
    hermitian_transpose,
    hutchpp_split,
)

__all__ = ["DiagPlusPlus", "diagpp_core", "diagpp_residual_samples"]


def _residual_ratio_terms(
    probe_image: Any, basis: Any, adjoint_basis: Any, probes: Any, xp: Any, unit_modulus: bool
) -> tuple[Any, Any]:
    """``conj(G) * (A G - Q (A^H Q)^H G)`` and ``|G|^2`` (``None`` if all ones) from ``A G``."""
    residual = probe_image - basis @ (hermitian_transpose(adjoint_basis, xp) @ probes)
    numerators = conj(probes, xp) * residual
    if unit_modulus:
        return numerators, None
    if xp.isdtype(probes.dtype, "complex floating"):
        return numerators, xp.real(xp.conj(probes) * probes)
    return numerators, probes * probes


def diagpp_residual_samples(
    matmat: Matmat,
    basis: Any,
    adjoint_basis: Any,
    probes: Any,
    xp: Any,
    unit_modulus: bool = False,
) -> tuple[Any, Any]:
    """Numerators ``conj(G) * (I - QQ^H) A G`` and denominators ``|G|^2`` (one product)."""
    return _residual_ratio_terms(matmat(probes), basis, adjoint_basis, probes, xp, unit_modulus)


def diagpp_core(
    matmat: Matmat,
    adjoint: Matmat | None,
    sketch: Any,
    residual_probes: Any,
    xp: Any,
    unit_modulus: bool = False,
) -> tuple[Any, Any, Any, Any, Any]:
    """Diag++ in two operator calls: ``A [S, G]`` then ``A Q`` (self-adjoint A,
    ``adjoint is None``) or ``A^H Q``.

    Returns
    -------
    low_rank_diagonal : array (n,)
        ``diag(Q Q^H A)``.
    numerators, denominators : arrays (n, g)
        Residual samples; the diagonal estimate is ``low_rank_diagonal + sum(num) / sum(den)``.
    basis, adjoint_basis : arrays (n, s)
        Q and ``A^H Q``, for further residual samples.
    """
    if adjoint is None:  # A Q (= A^H Q) and A G in the second call
        basis, _ = backend.thin_qr(xp, matmat(sketch))
        width = basis.shape[1]
        image = matmat(xp.concat([basis, residual_probes], axis=1))
        adjoint_basis, probe_image = image[:, :width], image[:, width:]
    else:  # A S and A G in the first call, A^H Q in the second
        width = sketch.shape[1]
        image = matmat(xp.concat([sketch, residual_probes], axis=1))
        basis, _ = backend.thin_qr(xp, image[:, :width])
        probe_image = image[:, width:]
        adjoint_basis = adjoint(basis)
    low_rank_diagonal = xp.sum(basis * conj(adjoint_basis, xp), axis=1)
    numerators, denominators = _residual_ratio_terms(
        probe_image, basis, adjoint_basis, residual_probes, xp, unit_modulus
    )
    return low_rank_diagonal, numerators, denominators, basis, adjoint_basis


class DiagPlusPlus(Estimator):
    """Diag++: exact diagonal of a range sketch plus a stochastic diagonal of the rest.

    Budget split as Hutch++ (``num_matvecs = m``): s = ceil(m/3) sketch columns, s
    columns for ``A^H Q`` and g = m - 2s residual probes. ``A^H Q`` is the forward
    product for operators tagged ``"symmetric"``/``"hermitian"`` (then stacked with the
    residual probes: two calls in all), else ``rmatmat``. Exact when rank(A) <= s.
    The elementwise standard error is that of the residual ratio estimator; with
    ``rtol``/``atol`` residual probes are added (doubling) until the largest half-width
    meets ``max(atol, rtol * max|d|)``.

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import diagonal
    >>> rng = np.random.default_rng(0)
    >>> U = rng.standard_normal((100, 8))
    >>> A = U @ U.T  # rank 8 <= sketch size 10
    >>> est = diagonal(A, method="diag++", num_matvecs=30, seed=0)
    >>> bool(np.allclose(est.value, np.diag(A))), est.num_matvecs
    (True, 30)
    """

    name = "diag++"
    min_matvecs = 3
    supports_tolerance = True

    def diagonal(self, operator: LinearOperator, request: EstimationRequest) -> Estimate:
        xp = operator.xp
        matmat = blocked_matmat(operator, request)
        sketch_size, residual_size = hutchpp_split(request.num_matvecs)
        unit_modulus = request.probes.kind in UNIT_MODULUS_PROBES
        low_rank, numerators, denominators, basis, adjoint_basis = diagpp_core(
            matmat,
            adjoint_product(operator, request, self.name),
            request.probes(sketch_size),
            request.probes(residual_size),
            xp,
            unit_modulus,
        )
        samples = RatioSamples(xp, unit_modulus)
        samples.add(numerators, denominators)

        def draw(width: int) -> tuple[Any, Any]:
            probes = request.probes(width)
            return diagpp_residual_samples(matmat, basis, adjoint_basis, probes, xp, unit_modulus)

        converged = grow_until_met(samples, request, draw, low_rank)
        residual_value, stderr, count = samples.estimate()
        return Estimate(
            low_rank + residual_value,
            stderr,
            request.matmat.columns,
            self.name,
            converged=converged,
            dof=count - 1 if count > 1 else None,
            info={"sketch_size": int(basis.shape[1]), "num_residual_probes": count},
        )
