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
#: Probe kinds whose entries all have modulus 1.
UNIT_MODULUS = ("rademacher", "steinhaus")
#: Probe kinds whose distribution is rotation invariant.
ROTATION_INVARIANT = ("sphere", "gaussian")
#: :meth:`ProbeSampler.independent` checks real Rademacher blocks up to this length ...
SHORT_PROBES = 64
#: ... when at least this many more entries than columns (n - s) ...
MARGIN = 10
#: ... and draws a dependent one again at most this many times.
REDRAWS = 100


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
        self.check_kind(kind)
        self.complex = backend.is_complex_dtype(xp, dtype)
        #: The kind drawn: Rademacher probes of a complex operator are Steinhaus ones
        #: (its unit-modulus counterpart), and are reported as such.
        self.kind = "steinhaus" if kind == "rademacher" and self.complex else kind
        self.n = n
        self.xp = xp
        self.dtype = dtype
        self.device = device
        self.random = backend.make_random_source(xp, device, seed)
        self.real_dtype = backend.real_dtype_for(xp, dtype)

    @staticmethod
    def check_kind(kind: Any) -> None:
        """``ValueError`` naming the known probes unless ``kind`` is one."""
        if kind not in PROBES:
            raise ValueError(f"unknown probe {kind!r}; known probes are {', '.join(PROBES)}")

    @property
    def unit_modulus(self) -> bool:
        """Whether every entry has modulus 1 (Rademacher, Steinhaus): E[conj(z) z] = 1
        exactly, which the diagonal estimators' denominators and XDiag rely on."""
        return self.kind in UNIT_MODULUS

    @property
    def rotation_invariant(self) -> bool:
        """Whether the distribution is invariant under rotations (Gaussian, sphere): what
        the improved normalization of XTrace and XNysTrace needs to be unbiased."""
        return self.kind in ROTATION_INVARIANT

    def __call__(self, num_probes: int, *, any_length: bool = False) -> Any:
        """A block of ``num_probes`` probes (columns). ``any_length``: the caller's result
        depends on each probe's direction only (XTrace and XNysTrace with the improved
        normalization, which rescales every probe's part outside the sketch to a fixed
        length, and whose sketches see the span of the probes), so sphere probes come as
        the Gaussian columns they are rescaled from: the same directions, without the
        pass that computes the column norms and rescales (a tenth of XTrace's own work at
        n = 512 under JAX). Other kinds are unaffected."""
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
        if kind == "gaussian" or any_length:
            return block
        return backend.jit(xp, _onto_sphere)(xp, block)

    def independent(
        self, num_probes: int, existing: Any = None, *, any_length: bool = False
    ) -> Any:
        """A block like ``self(num_probes)`` whose columns, with those of ``existing``, are
        linearly independent: what the exchangeable estimators (XTrace, XNysTrace, XDiag)
        need, since each probe must add a direction to the others' sketch.

        Only real Rademacher blocks can fail that with a probability that matters (two
        equal or opposite columns: about s^2 2^-n for s columns of length n; continuous
        distributions never do). For them, up to ``SHORT_PROBES`` entries long, a block
        whose columns are dependent (Gram matrix singular: eigenvalue ratio below 1e-10)
        is drawn again (from the same random source, so the seed still decides
        everything). That conditions the probes on independence: given the others, a
        probe is uniform over the +-1 vectors outside their span instead of all 2^n, a
        change of total variation at most 2^(s - 1 - n) (a d-dimensional subspace holds
        at most 2^d +-1 vectors). So it is done only with a margin n - s >= ``MARGIN``
        (total variation <= 2^-11): with nearly n probes the conditioning biases the
        estimates (measured at n = s = 4: XTrace's by 70 standard errors of the mean),
        and the probes stay i.i.d. there, dependent blocks included (use
        ``method="exact"``: n matvecs). Longer blocks are dependent with probability
        below s^2 2^-64 and are not checked. JAX decides on the device (a compiled loop);
        torch and CuPy read the check on the host, a device wait for these short blocks
        only; Dask computes the short block's Gram matrix (no product with the operator).
        """
        block = self(num_probes, any_length=any_length)
        total = int(num_probes) + (0 if existing is None else int(existing.shape[1]))
        short = self.n <= SHORT_PROBES and self.n - total >= MARGIN
        if self.kind != "rademacher" or self.complex or not short:
            return block
        xp = self.xp

        def dependent(candidate: Any) -> Any:
            full = candidate if existing is None else xp.concat([existing, candidate], axis=1)
            # integer entries: the Gram matrix is exact, and singular iff the columns are
            # dependent (its smallest eigenvalue is then 0 up to round-off)
            gram, space = xp.matrix_transpose(full) @ full, xp
            if backend.is_dask_array(gram):  # s x s, and dask.array has no eigvalsh
                gram, space = backend.to_numpy(gram.compute()), backend.numpy_namespace()
            values = space.linalg.eigvalsh(gram)
            return space.min(values) <= 1e-10 * space.max(values)

        return self.random.redraw_while(block, dependent, REDRAWS, lambda: self(num_probes))

    def _gaussian(self, shape: tuple[int, int]) -> Any:
        xp = self.xp
        if not self.complex:
            return self.random.standard_normal(shape, self.dtype)
        # standard complex Gaussian: E|z|^2 = 1; column j's real and imaginary parts are
        # the stream's columns 2j and 2j + 1 (partition-independent, as real draws are)
        parts = self.random.standard_normal((shape[0], 2 * shape[1]), self.real_dtype)
        real, imag = parts[:, 0::2], parts[:, 1::2]
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
