"""Shared by the tests of the diagonal estimators: naive references, random problems and
an operator that counts its calls and columns."""

from __future__ import annotations

import numpy as np

import linop_trace as lt


def naive_bekas(A, Z):
    return np.sum(Z.conj() * (A @ Z), axis=1) / np.sum(np.abs(Z) ** 2, axis=1)


def random_problem(seed, n=30, complex_=False):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    if complex_:
        A = A + 1j * rng.standard_normal((n, n))
    return A, rng


class Counting:
    def __init__(self, A, tags=()):
        self.forward = self.adjoint = self.columns = 0
        self.A = A
        self.op = lt.LinearOperator.from_callable(
            matvec=lambda x: A @ x,
            matmat=self._matmat,
            rmatmat=self._rmatmat,
            shape=A.shape,
            dtype=A.dtype,
            tags=tags,
        )

    def _matmat(self, X):
        self.forward += 1
        self.columns += X.shape[1]
        return self.A @ X

    def _rmatmat(self, X):
        self.adjoint += 1
        self.columns += X.shape[1]
        return self.A.T @ X
