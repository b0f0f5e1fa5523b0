"""Diag++ (Baston and Nakatsukasa 2022): Hutch++'s deflation for the diagonal.

    diag(A) = diag(Q Q^H A) + diag((I - QQ^H) A),    Q = orth(A S),

the first term exact from ``Q^H A = (A^H Q)^H``, the second by the Bekas et al. estimator
``conj(g) * (I - QQ^H) A g / |g|^2`` on residual probes g. Unlike the trace, the
cross term diag((I - QQ^H) A QQ^H) does not vanish, so this residual is one-sided.

For self-adjoint A (the default there) both sides are deflated, with P = QQ^H:

    diag(A) = diag(P A + A P - P A P) + diag((I - P) A (I - P)),

the first term exact from Z = A Q and M = Q^H Z (it is Re sum_l conj(Q_kl) (Z + Zp)_kl
with Zp = Z - Q M), the second by the Bekas estimator on (I - P) A (I - P) g
= A g - Q (Q^H A g) - Zp (Q^H g): no further operator product, and the part of A that an
approximate sketch misses enters the residual to second order instead of first (the
argument for XDiag's two-sided estimates, ``_xdiag.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import _backend as backend
from .._estimate import Estimate
from .._stats import RatioSums, low_rank_rounding_size, with_rounding
from ._adaptive import grow_diagonal
from ._base import EstimationRequest, Estimator, deflation_split
from ._linalg import hermitian_transpose, two_sided_low_rank_diagonal

__all__ = ["DiagPlusPlus", "diagpp_core", "diagpp_residual_samples"]

Matmat = Callable[[Any], Any]


def _resolve_two_sided(adjoint: Any, two_sided: bool | None) -> bool:
    """By default two-sided when A is self-adjoint (``adjoint is None``); ``True`` with an
    adjoint raises ``ValueError``."""
    if two_sided is None:
        return adjoint is None
    if two_sided and adjoint is not None:
        raise ValueError("two-sided Diag++ needs a self-adjoint operator (adjoint=None)")
    return bool(two_sided)


def _residual_ratio_terms(
    probe_image: Any,
    basis: Any,
    adjoint_basis: Any,
    probes: Any,
    xp: Any,
    unit_modulus: bool,
    residual_basis: Any = None,
) -> tuple[Any, Any]:
    """``conj(G) * (A G - Q (A^H Q)^H G)`` and ``|G|^2`` (``None`` if all ones) from ``A G``;
    with ``residual_basis`` Zp = (I - P) A Q the two-sided residual
    ``conj(G) * (A G - Q (Q^H A G) - Zp (Q^H G))``."""
    if residual_basis is None:
        residual = probe_image - basis @ (hermitian_transpose(adjoint_basis, xp) @ probes)
    else:
        width = probes.shape[1]
        both = hermitian_transpose(basis, xp) @ xp.concat([probe_image, probes], axis=1)
        onto_probe_image, onto_probes = backend.split(xp, both, (width,))
        residual = probe_image - basis @ onto_probe_image - residual_basis @ onto_probes
    numerators = backend.conj(xp, probes) * residual
    return numerators, None if unit_modulus else backend.abs2(xp, probes)


def diagpp_residual_samples(
    matmat: Matmat,
    basis: Any,
    adjoint_basis: Any,
    probes: Any,
    xp: Any,
    unit_modulus: bool = False,
    residual_basis: Any = None,
) -> tuple[Any, Any]:
    """Numerators ``conj(G) * (I - QQ^H) A G`` (two-sided: ``(I - P) A (I - P) G``, given
    ``residual_basis``) and denominators ``|G|^2`` (one product)."""
    return _residual_ratio_terms(
        matmat(probes), basis, adjoint_basis, probes, xp, unit_modulus, residual_basis
    )


def diagpp_core(
    matmat: Matmat,
    adjoint: Matmat | None,
    sketch: Any,
    residual_probes: Any,
    xp: Any,
    unit_modulus: bool = False,
    two_sided: bool | None = None,
) -> tuple[Any, Any, Any, Any, Any, Any]:
    """Diag++ in two operator calls: ``A S`` then ``A [Q, G]`` (self-adjoint A,
    ``adjoint is None``), or ``A [S, G]`` then ``A^H Q``.

    ``two_sided`` (default: when ``adjoint is None``) deflates both sides; ``True`` with
    an adjoint raises ``ValueError``.

    Returns
    -------
    low_rank_diagonal : array (n,)
        ``diag(Q Q^H A)``, two-sided ``diag(P A + A P - P A P)``.
    numerators, denominators : arrays (n, g)
        Residual samples; the diagonal estimate is ``low_rank_diagonal + sum(num) / sum(den)``.
    basis, adjoint_basis : arrays (n, s)
        Q and ``A^H Q``, for further residual samples.
    residual_basis : array (n, s) or None
        Two-sided: Zp = (I - P) A Q, for further residual samples; else ``None``.
    """
    two_sided = _resolve_two_sided(adjoint, two_sided)
    if adjoint is None:  # A Q (= A^H Q) and A G in the second call
        basis, _ = backend.thin_qr(xp, matmat(sketch))
        width = basis.shape[1]
        image = matmat(xp.concat([basis, residual_probes], axis=1))
        adjoint_basis, probe_image = backend.split(xp, image, (width,))
    else:  # A S and A G in the first call, A^H Q in the second
        width = sketch.shape[1]
        image = matmat(xp.concat([sketch, residual_probes], axis=1))
        sketch_image, probe_image = backend.split(xp, image, (width,))
        basis, _ = backend.thin_qr(xp, sketch_image)
        adjoint_basis = adjoint(basis)
    # (one compiled program under JAX: eagerly, each operation is a dispatch, and the
    # Python numbers among them are shipped to the device)
    low_rank_diagonal, numerators, denominators, residual_basis = backend.jit(
        xp, _deflated_terms, num_static=3
    )(xp, two_sided, unit_modulus, basis, adjoint_basis, probe_image, residual_probes)
    return low_rank_diagonal, numerators, denominators, basis, adjoint_basis, residual_basis


def _deflated_terms(
    xp: Any,
    two_sided: bool,
    unit_modulus: bool,
    basis: Any,
    adjoint_basis: Any,
    probe_image: Any,
    residual_probes: Any,
) -> tuple[Any, Any, Any, Any]:
    """The algebra of :func:`diagpp_core` after its products: the low-rank diagonal, the
    residual samples' numerators and denominators, and (two-sided) Zp."""
    residual_basis = None
    if two_sided:
        core = hermitian_transpose(basis, xp) @ adjoint_basis  # M = Q^H A Q
        core = (core + hermitian_transpose(core, xp)) / 2
        residual_basis = adjoint_basis - basis @ core  # Zp = (I - P) A Q
        low_rank_diagonal = two_sided_low_rank_diagonal(basis, adjoint_basis, residual_basis, xp)
    else:
        low_rank_diagonal = xp.sum(basis * backend.conj(xp, adjoint_basis), axis=1)
    numerators, denominators = _residual_ratio_terms(
        probe_image, basis, adjoint_basis, residual_probes, xp, unit_modulus, residual_basis
    )
    return low_rank_diagonal, numerators, denominators, residual_basis


def _low_rank_size(xp: Any, basis: Any, adjoint_basis: Any, residual_basis: Any) -> Any:
    """Entry k: ``|Q_k,:| |W_k,:|`` with W = A^H Q (two-sided: ``Z + Zp``), the scale of
    the low-rank diagonal's rounding (:func:`low_rank_rounding_size`)."""
    image = adjoint_basis if residual_basis is None else adjoint_basis + residual_basis
    return low_rank_rounding_size(xp, basis, image)


class DiagPlusPlus(Estimator):
    """Diag++: exact diagonal of a range sketch plus a stochastic diagonal of the rest.

    Budget split as Hutch++ (``num_matvecs = m``): s = ceil(m/3) sketch columns, s
    columns for ``A^H Q`` and g = m - 2s residual probes. ``A^H Q`` is the forward
    product for operators tagged ``"symmetric"``/``"hermitian"`` (then stacked with the
    residual probes: two calls in all), else ``rmatmat``. Exact when rank(A) <= s.
    The elementwise standard error is that of the residual ratio estimator; with
    ``rtol``/``atol`` residual probes are added (doubling) until the largest half-width
    meets ``max(atol, rtol * max|d|)``.

    Parameters
    ----------
    two_sided : bool, optional
        For self-adjoint operators (the default, ``None``, decides by the tag): the exact
        part diag(PA + AP - PAP) and residual probes of (I - P) A (I - P), instead of
        diag(PA) and (I - P) A (module docstring). Same products, a few O(n s g) more
        flops, smaller errors on decaying spectra, larger max errors where a varying
        diagonal dominates its rows (see :class:`XDiag`). ``True`` on an operator not
        tagged self-adjoint raises ``ValueError``.

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
    jit_compatible = True
    unit_scaled = ("diagonal",)

    def __init__(self, two_sided: bool | None = None) -> None:
        self.two_sided = two_sided

    def __repr__(self) -> str:
        return f"{type(self).__name__}(two_sided={self.two_sided!r})"

    def diagonal(self, request: EstimationRequest) -> Estimate:
        xp = request.xp
        matmat = request.matmat
        sketch_size, residual_size = deflation_split(request.num_matvecs)
        unit_modulus = request.probes.unit_modulus
        adjoint = None if request.self_adjoint else request.adjoint
        if self.two_sided and adjoint is not None:
            raise ValueError(
                f"{type(self).__name__}(two_sided=True) needs an operator tagged "
                "'symmetric' or 'hermitian'; use two_sided=None (the default) for others"
            )
        low_rank, numerators, denominators, basis, adjoint_basis, residual_basis = diagpp_core(
            matmat,
            adjoint,
            request.probes(sketch_size),
            request.probes(residual_size),
            xp,
            unit_modulus,
            self.two_sided,
        )
        sums = RatioSums(xp, request.real_valued)
        sums.add(numerators, denominators)

        def draw(width: int) -> None:
            probes = request.probes(width)
            sums.add(
                *diagpp_residual_samples(
                    matmat, basis, adjoint_basis, probes, xp, unit_modulus, residual_basis
                )
            )

        converged = grow_diagonal(request, sums, draw, low_rank) if request.adaptive else None
        residual_value, stderr, count = sums.estimate()
        # the exact part's rounding (with a sketch of full rank the residual is rounding
        # alone, and its spread was the whole error bar: a few ulps, which missed)
        size = backend.jit(xp, _low_rank_size)(xp, basis, adjoint_basis, residual_basis)
        return Estimate(
            low_rank + residual_value,
            with_rounding(stderr, size, request.n, xp),
            request.columns,
            self.name,
            converged=converged,
            dof=count - 1 if count > 1 else None,
            info={
                "sketch_size": int(basis.shape[1]),
                "num_residual_probes": count,
                "two_sided": residual_basis is not None,
            },
        )
