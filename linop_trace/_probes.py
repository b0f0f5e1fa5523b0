"""Random probe blocks: ``(n, k)`` arrays whose columns z satisfy E[z z^H] = I.

Each probe lives in the operator's library, dtype and device. For complex operators the
real distributions are replaced by their complex counterparts: Rademacher by Steinhaus
(unit-modulus entries exp(2 pi i u)), Gaussian by the standard complex Gaussian.
"""

from __future__ import annotations

import math
from typing import Any

from . import _backend as backend
from ._operators import LinearOperator, aslinearoperator

__all__ = ["PROBES", "ProbeSampler", "gaussian", "rademacher", "sphere", "steinhaus"]

PROBES = ("rademacher", "gaussian", "sphere", "steinhaus")


class ProbeSampler:
    """Draws probe blocks of one distribution for one operator.

    Parameters
    ----------
    kind : {"rademacher", "gaussian", "sphere", "steinhaus"}
    n : int
        Length of each probe.
    xp, dtype, device
        Library namespace, dtype and device of the blocks.
    seed : int, None, generator or key
        Turned into the library's own generator by the backend.
    """

    def __init__(
        self, kind: str, n: int, xp: Any, dtype: Any, device: Any, seed: Any = None
    ) -> None:
        if kind not in PROBES:
            raise ValueError(f"unknown probe {kind!r}; known probes are {', '.join(PROBES)}")
        self.kind = kind
        self.n = n
        self.xp = xp
        self.dtype = dtype
        self.device = device
        self.random = backend.make_random_source(seed, xp, device)
        self.complex = backend.is_complex_dtype(xp, dtype)
        self.real_dtype = backend.real_dtype_for(xp, dtype)

    def __call__(self, num_probes: int) -> Any:
        shape = (self.n, int(num_probes))
        xp = self.xp
        kind = self.kind
        if kind == "steinhaus" or (kind == "rademacher" and self.complex):
            if not self.complex:
                raise ValueError("Steinhaus (unit-modulus) probes need a complex operator")
            angle = (2 * math.pi) * self.random.uniform(shape, self.real_dtype)
            return xp.astype(xp.cos(angle), self.dtype) + 1j * xp.astype(xp.sin(angle), self.dtype)
        if kind == "rademacher":
            return self.random.rademacher(shape, self.dtype)
        block = self._gaussian(shape)
        if kind == "gaussian":
            return block
        return backend.jit(xp, _onto_sphere)(xp, block)

    def _gaussian(self, shape: tuple[int, int]) -> Any:
        xp = self.xp
        if not self.complex:
            return self.random.standard_normal(shape, self.dtype)
        # standard complex Gaussian: E|z|^2 = 1
        real = self.random.standard_normal(shape, self.real_dtype)
        imag = self.random.standard_normal(shape, self.real_dtype)
        scale = 1 / math.sqrt(2)
        return xp.astype(real * scale, self.dtype) + 1j * xp.astype(imag * scale, self.dtype)


def _onto_sphere(xp: Any, block: Any) -> Any:
    """Each column rescaled to norm sqrt(n), so z^H z = n exactly: in place where the
    library allows (the block is ours: no second (n, k) array), one compiled program in
    JAX (eager, its column norms and scaling allocate and fault in a fresh buffer at every
    step: 6 ms instead of 2.4 ms for 4000 x 50 probes right after a large product)."""
    scale = math.sqrt(block.shape[0]) / backend.column_norms(xp, block)
    block *= xp.astype(scale, block.dtype) if xp.isdtype(block.dtype, "complex floating") else scale
    return block


def _sampler(kind: str, operator: Any, seed: Any) -> ProbeSampler:
    operator = operator if isinstance(operator, LinearOperator) else aslinearoperator(operator)
    return ProbeSampler(kind, operator.shape[1], operator.xp, operator.dtype, operator.device, seed)


def rademacher(operator: Any, num_probes: int, seed: Any = None) -> Any:
    """A block of ``num_probes`` Rademacher (+-1) probes for ``operator``.

    Parameters
    ----------
    operator : LinearOperator or matrix
        Gives the length n, the library, dtype and device of the probes.
    num_probes : int
    seed : int, None, or the library's generator/key

    Returns
    -------
    array of shape (n, num_probes)
        Steinhaus (unit-modulus) entries when the operator is complex.

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import rademacher
    >>> Z = rademacher(np.eye(4), 3, seed=0)
    >>> Z.shape, sorted(set(Z.ravel().tolist()))
    ((4, 3), [-1.0, 1.0])
    """
    return _sampler("rademacher", operator, seed)(num_probes)


def gaussian(operator: Any, num_probes: int, seed: Any = None) -> Any:
    """A block of standard Gaussian probes (complex Gaussian for complex operators).

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import gaussian
    >>> gaussian(np.eye(5), 2, seed=1).shape
    (5, 2)
    """
    return _sampler("gaussian", operator, seed)(num_probes)


def sphere(operator: Any, num_probes: int, seed: Any = None) -> Any:
    """Gaussian probes normalized to length sqrt(n) (uniform on that sphere).

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import sphere
    >>> Z = sphere(np.eye(9), 2, seed=0)
    >>> np.allclose(np.linalg.norm(Z, axis=0), 3.0)
    True
    """
    return _sampler("sphere", operator, seed)(num_probes)


def steinhaus(operator: Any, num_probes: int, seed: Any = None) -> Any:
    """Unit-modulus complex probes exp(2 pi i u), u uniform (complex operators only).

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace import steinhaus
    >>> Z = steinhaus(np.eye(3, dtype=complex), 4, seed=0)
    >>> np.allclose(np.abs(Z), 1.0)
    True
    """
    return _sampler("steinhaus", operator, seed)(num_probes)
