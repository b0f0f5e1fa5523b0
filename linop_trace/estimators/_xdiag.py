"""XDiag (Epperly, Tropp and Webber 2024, Section 4): the exchangeable diagonal estimator.

With probes Omega = [w_1..w_s], Y = A Omega = QR, each probe is used once in the sketch
of all the others and once as a Hutchinson probe of what they leave:

    d^(i) = diag(Q_(i) Q_(i)^H A) + conj(w_i) * (I - Q_(i) Q_(i)^H) A w_i,

Q_(i) an orthonormal basis of Y without column i. Q_(i) Q_(i)^H = QQ^H - q_i q_i^H with
q_i = Q s_i, s_i the i-th column of R^{-H} normalized (a rank-one downdate), so with
Z = A^H Q and T = Z^H Omega = Q^H A Omega:

    d^(i) = diag(Q Z^H) - (Q s_i) * conj(Z s_i) + conj(w_i) * (y_i - Q t_i + Q s_i (s_i^H t_i)).

The estimate is the mean of the s estimates d^(i); the error estimate (the XTrace one,
elementwise) is their sample std over sqrt(s). The d^(i) are exchangeable but positively
correlated, so that error estimate tends to be small (see the coverage measured in
``tests/estimators/test_diagonal.py``).
"""

from __future__ import annotations

import math
from typing import Any

from .. import _backend as backend
from .._estimate import Estimate
from .._operators import LinearOperator
from ._base import EstimationRequest, Estimator
from ._hutchpp import Matmat, adjoint_product, blocked_matmat, conj, hermitian_transpose

__all__ = ["XDiag", "xdiag_core"]


def xdiag_core(matmat: Matmat, adjoint: Matmat | None, probes: Any, xp: Any) -> tuple[Any, Any]:
    """The s exchangeable estimates d^(i) as columns of an ``(n, s)`` array.

    Parameters
    ----------
    matmat : callable
        ``X -> A X``.
    adjoint : callable or None
        ``X -> A^H X``; ``None`` when A is self-adjoint (``A Q`` is used).
    probes : array (n, s)
        Rademacher (real) or unit-modulus (complex) probes: the estimator needs
        ``conj(w) * w = 1``.
    xp : namespace

    Returns
    -------
    estimates : array (n, s)
        d^(i) in column i; their row means are the XDiag estimate.
    low_rank_diagonal : array (n,)
        ``diag(QQ^H A)``.
    """
    image = matmat(probes)
    basis, triangular = backend.thin_qr(xp, image)
    adjoint_basis = matmat(basis) if adjoint is None else adjoint(basis)  # Z = A^H Q
    projected = hermitian_transpose(adjoint_basis, xp) @ probes  # T = Q^H A Omega
    downdate = hermitian_transpose(xp.linalg.inv(triangular), xp)  # R^{-H}
    norms = xp.sqrt(xp.sum(xp.abs(downdate) ** 2, axis=0))
    downdate = downdate / (
        xp.astype(norms, downdate.dtype) if norms.dtype != downdate.dtype else norms
    )
    count = probes.shape[1]
    weights = xp.sum(conj(downdate, xp) * projected, axis=0)  # s_i^H t_i
    # one product for Q (T - S diag(s_i^H t_i)) and Q S
    both = basis @ xp.concat([projected - downdate * weights[None, :], downdate], axis=1)
    left_out = image - both[:, :count]  # (I - Q_(i) Q_(i)^H) A w_i, column by column
    basis_down = both[:, count:]  # columns q_i = Q s_i
    adjoint_down = adjoint_basis @ downdate  # Z s_i
    low_rank_diagonal = xp.sum(basis * conj(adjoint_basis, xp), axis=1)  # diag(Q Z^H)
    estimates = (
        low_rank_diagonal[:, None]
        - basis_down * conj(adjoint_down, xp)
        + conj(probes, xp) * left_out
    )
    return estimates, low_rank_diagonal


class XDiag(Estimator):
    """XDiag: every probe serves both the low-rank sketch and the residual estimate.

    With ``num_matvecs = m``: s = floor(m/2) probes, ``A Omega`` then ``A^H Q`` (the
    forward product for operators tagged ``"symmetric"``/``"hermitian"``, ``rmatmat``
    otherwise): 2 s <= m columns in two operator calls. Rademacher probes for real
    operators, unit-modulus for complex ones (other probe kinds raise ``ValueError``).
    Exact when rank(A) < s.

    ``stderr`` is the elementwise XTrace-style error estimate std(d^(i)) / sqrt(s), the
    one of the paper; it is not a calibrated interval (the d^(i) are positively
    correlated), so ``ci`` is optimistic.

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import diagonal
    >>> rng = np.random.default_rng(0)
    >>> U = rng.standard_normal((100, 8))
    >>> A = U @ U.T  # rank 8 < s = 15
    >>> est = diagonal(A, method="xdiag", num_matvecs=30, seed=0)
    >>> bool(np.allclose(est.value, np.diag(A))), est.num_matvecs
    (True, 30)
    """

    name = "xdiag"
    min_matvecs = 2

    def diagonal(self, operator: LinearOperator, request: EstimationRequest) -> Estimate:
        xp = operator.xp
        if request.probes.kind not in ("rademacher", "steinhaus"):
            raise ValueError(
                f"method 'xdiag' needs Rademacher (or unit-modulus) probes, got "
                f"probe={request.probes.kind!r}; use method='diag++' for other probes"
            )
        count = request.num_matvecs // 2
        estimates, low_rank = xdiag_core(
            blocked_matmat(operator, request),
            adjoint_product(operator, request, self.name),
            request.probes(count),
            xp,
        )
        value = xp.mean(estimates, axis=1)
        stderr = None
        if count > 1:
            deviation = estimates - value[:, None]
            square = (
                xp.abs(deviation) ** 2
                if xp.isdtype(deviation.dtype, "complex floating")
                else deviation**2
            )
            stderr = xp.sqrt(xp.sum(square, axis=1) / (count - 1)) / math.sqrt(count)
        return Estimate(
            value,
            stderr,
            request.matmat.columns,
            self.name,
            converged=None,
            dof=None,
            info={"num_probes": count, "low_rank_diagonal": low_rank},
        )
