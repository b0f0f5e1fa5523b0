"""The one module that knows array libraries by name.

Everything above this layer talks to an array namespace ``xp`` (array-api-compat) and
calls the helpers here for the few things the array API standard does not cover:
sparse matrices, random numbers, vectorizing maps and moving data to NumPy for I/O.
Optional libraries (torch, jax, cupy) are imported lazily, only when an array of theirs
is already in the user's hands, so ``import linop_trace`` never imports them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "RandomSource",
    "array_namespace",
    "default_float_dtype",
    "describe",
    "device_of",
    "dtype_name",
    "is_complex_dtype",
    "is_sparse",
    "library_name",
    "make_random_source",
    "promote_to_float",
    "to_numpy",
]


# --------------------------------------------------------------------------- identity


def _module_loaded(name: str) -> bool:
    return name in sys.modules


def _is_scipy_sparse(x: Any) -> bool:
    if not _module_loaded("scipy.sparse"):
        return False
    import scipy.sparse

    return scipy.sparse.issparse(x)


def _is_torch_sparse(x: Any) -> bool:
    if not _module_loaded("torch"):
        return False
    import torch

    return isinstance(x, torch.Tensor) and x.layout != torch.strided


def _is_jax_sparse(x: Any) -> bool:
    if not _module_loaded("jax.experimental.sparse"):
        return False
    from jax.experimental import sparse as jsparse

    return isinstance(x, jsparse.JAXSparse)


def _is_cupy_sparse(x: Any) -> bool:
    if not _module_loaded("cupyx.scipy.sparse"):
        return False
    import cupyx.scipy.sparse

    return cupyx.scipy.sparse.issparse(x)


def is_sparse(x: Any) -> bool:
    """Whether ``x`` is a sparse matrix of a supported library."""
    return _is_scipy_sparse(x) or _is_torch_sparse(x) or _is_jax_sparse(x) or _is_cupy_sparse(x)


def library_name(x: Any) -> str:
    """A short human name for the library that owns ``x`` (used in error messages)."""
    if _is_scipy_sparse(x):
        return "scipy.sparse"
    if _is_cupy_sparse(x):
        return "cupyx.scipy.sparse"
    if _is_jax_sparse(x):
        return "jax"
    if array_api_compat.is_numpy_array(x):
        return "numpy"
    if array_api_compat.is_torch_array(x):
        return "torch"
    if array_api_compat.is_jax_array(x):
        return "jax"
    if array_api_compat.is_cupy_array(x):
        return "cupy"
    namespace_of = getattr(x, "__array_namespace__", None)
    if namespace_of is not None and array_api_compat.is_array_api_strict_namespace(namespace_of()):
        return "array_api_strict"
    module = type(x).__module__.split(".")[0]
    return module or type(x).__name__


def namespace_name(xp: Any) -> str:
    """The library behind an array namespace, for messages."""
    if array_api_compat.is_numpy_namespace(xp):
        return "numpy"
    if array_api_compat.is_torch_namespace(xp):
        return "torch"
    if array_api_compat.is_jax_namespace(xp):
        return "jax"
    if array_api_compat.is_cupy_namespace(xp):
        return "cupy"
    if array_api_compat.is_array_api_strict_namespace(xp):
        return "array_api_strict"
    return getattr(xp, "__name__", repr(xp))


def array_namespace(*arrays: Any) -> Any:
    """The array-api-compat namespace shared by ``arrays`` (sparse matrices included).

    Raises
    ------
    TypeError
        If the arrays come from different libraries (both are named).
    """
    spaces = []
    for a in arrays:
        if _is_scipy_sparse(a):
            import array_api_compat.numpy as np_compat

            spaces.append((np_compat, a))
        elif _is_jax_sparse(a):
            import jax.numpy as jnp

            spaces.append((jnp, a))
        elif _is_cupy_sparse(a):
            import array_api_compat.cupy as cp_compat

            spaces.append((cp_compat, a))
        else:
            try:
                spaces.append((array_api_compat.array_namespace(a), a))
            except TypeError:
                raise TypeError(
                    f"expected an array of a supported library (numpy, scipy.sparse, torch, "
                    f"jax, cupy or any array API library), got {type(a).__module__}."
                    f"{type(a).__name__}"
                ) from None
    first_xp, first = spaces[0]
    for xp, a in spaces[1:]:
        if xp is not first_xp:
            raise TypeError(
                f"arrays of two libraries are mixed: {describe(first)} and {describe(a)}"
            )
    return first_xp


def device_of(x: Any) -> Any:
    """The device that holds ``x``."""
    if _is_scipy_sparse(x):
        return "cpu"
    if _is_jax_sparse(x):
        return array_api_compat.device(x.data)
    if _is_cupy_sparse(x):
        return array_api_compat.device(x.data)
    return array_api_compat.device(x)


def same_device(a: Any, b: Any) -> bool:
    """Whether two device objects name the same device."""
    return a == b or str(a) == str(b)


def dtype_name(dtype: Any) -> str:
    """``float64`` rather than ``torch.float64`` or ``dtype('float64')``."""
    text = str(dtype)
    for prefix in ("torch.", "array_api_strict.", "dtype("):
        text = text.replace(prefix, "")
    return text.strip("')\"")


def describe(x: Any) -> str:
    """``'a torch array on cpu (float32, shape (3, 4))'`` for error messages."""
    shape = tuple(getattr(x, "shape", ()))
    dtype = getattr(x, "dtype", None)
    kind = "sparse matrix" if is_sparse(x) else "array"
    try:
        dev = device_of(x)
    except Exception:  # pragma: no cover - exotic objects
        dev = "?"
    return f"a {library_name(x)} {kind} on {dev} ({dtype_name(dtype)}, shape {shape})"


# ---------------------------------------------------------------------------- dtypes


def is_complex_dtype(xp: Any, dtype: Any) -> bool:
    return xp.isdtype(dtype, "complex floating")


_JITTED: dict[Callable[..., Any], Callable[..., Any]] = {}


def jit(xp: Any, function: Callable[..., Any], num_static: int = 1) -> Callable[..., Any]:
    """``function(xp, *args)`` compiled by ``jax.jit`` for JAX (once, cached; ``xp`` and the
    next ``num_static - 1`` arguments static), as it is for other libraries.

    For the pure array algebra after an estimator's operator products: JAX runs dozens
    of small eager operations much slower than one compiled program. The function must
    not need concrete values (``concrete_float`` returns ``None`` inside)."""
    if not array_api_compat.is_jax_namespace(xp):
        return function
    compiled = _JITTED.get(function)
    if compiled is None:
        import jax

        ensure_pytrees()
        static = tuple(range(num_static))

        @functools.wraps(function)
        def precise(*args: Any) -> Any:
            with jax.default_matmul_precision("highest"):
                return function(*args)

        compiled = _JITTED[function] = jax.jit(precise, static_argnums=static)
    return compiled


def compiles_whole(xp: Any) -> bool:
    """Whether estimators should hand this library their post-product algebra as one
    compiled program (:func:`jit`) rather than work through it in cache-sized row blocks:
    JAX, whose eager operations each cost tens of microseconds and whose compiler fuses
    the passes (its arrays are immutable, so blocks would be copies anyway)."""
    return array_api_compat.is_jax_namespace(xp)


def row_inner(xp: Any, x: Any, y: Any) -> Any:
    """``sum_k conj(x[i, k]) y[i, k]`` for each row i of two ``(n, k)`` arrays.

    NumPy 2's ``vecdot`` is a single-pass ufunc; elsewhere (JAX's ``vecdot`` traces a
    ``vmap`` on every eager call, NumPy 1.x's is a batched matmul) multiply and sum."""
    if array_api_compat.is_numpy_namespace(xp) and hasattr(np, "vecdot"):
        return np.vecdot(x, y, axis=1)  # type: ignore[call-overload]
    if xp.isdtype(x.dtype, "complex floating"):
        x = xp.conj(x)
    return xp.sum(x * y, axis=1)


#: Entries per row chunk of :func:`column_inner` on torch's CPU: the product of two
#: chunks stays in cache, where a fresh (n, k) temporary would be faulted in page by page.
COLUMN_CHUNK_ENTRIES = 2**18


def column_inner(xp: Any, x: Any, y: Any) -> Any:
    """``sum_i conj(x[i, j]) y[i, j]`` for each column j of two ``(n, k)`` arrays.

    The column reduction of every Hutchinson-type estimator, so it is done without an
    (n, k) temporary where the library allows: NumPy's ``einsum`` (4x faster than
    ``sum(x * y, axis=0)`` at n = 10^5, k = 100), torch on the CPU in row chunks that stay
    in cache (6x faster than one product whose fresh pages are faulted in); JAX fuses the
    product and the sum, and GPU allocators reuse their memory."""
    if xp.isdtype(x.dtype, "complex floating"):
        x = xp.conj(x)
    if array_api_compat.is_numpy_namespace(xp) and type(x) is np.ndarray:
        return np.einsum("ij,ij->j", x, y)
    if array_api_compat.is_torch_namespace(xp) and x.device.type == "cpu":
        n, k = x.shape
        rows = max(256, COLUMN_CHUNK_ENTRIES // max(k, 1))
        if n > rows:
            total = None
            for start in range(0, n, rows):
                part = xp.sum(x[start : start + rows, :] * y[start : start + rows, :], axis=0)
                total = part if total is None else total + part
            return total
    return xp.sum(x * y, axis=0)


def frobenius_norm(xp: Any, x: Any) -> Any:
    """``sqrt(sum |x|^2)`` over all entries, in one pass where the library allows."""
    flat = xp.reshape(x, (1, -1))
    square = row_inner(xp, flat, flat)[0]
    return xp.sqrt(xp.real(square) if xp.isdtype(square.dtype, "complex floating") else square)


def is_float_dtype(xp: Any, dtype: Any) -> bool:
    return xp.isdtype(dtype, ("real floating", "complex floating"))


def default_float_dtype(xp: Any, device: Any = None) -> Any:
    """The library's default real floating dtype (float64 in NumPy, float32 in torch)."""
    info = xp.__array_namespace_info__()
    try:
        return info.default_dtypes(device=device)["real floating"]
    except TypeError:  # pragma: no cover - older namespaces without ``device=``
        return info.default_dtypes()["real floating"]


def promote_to_float(xp: Any, dtype: Any, device: Any = None) -> Any:
    """Integer and bool dtypes become the default float; float and complex stay as they are."""
    if is_float_dtype(xp, dtype):
        return dtype
    return default_float_dtype(xp, device)


def complex_dtype_for(xp: Any, dtype: Any) -> Any:
    """The complex dtype with the precision of a real floating ``dtype``."""
    if xp.isdtype(dtype, "complex floating"):
        return dtype
    return xp.complex64 if dtype == xp.float32 else xp.complex128


def real_dtype_for(xp: Any, dtype: Any) -> Any:
    """The real dtype with the precision of ``dtype`` (complex128 -> float64)."""
    if xp.isdtype(dtype, "complex floating"):
        return xp.float32 if dtype == xp.complex64 else xp.float64
    return dtype


# ------------------------------------------------------------------------ sparse ops


def sparse_astype(matrix: Any, dtype: Any) -> Any:
    """A sparse matrix with its values cast to ``dtype`` (no copy if unchanged)."""
    if matrix.dtype == dtype:
        return matrix
    if _is_jax_sparse(matrix):
        return matrix.astype(dtype)
    if _is_torch_sparse(matrix):
        return matrix.to(dtype)
    return matrix.astype(dtype)


def sparse_matmat(matrix: Any, block: Any) -> Any:
    """``matrix @ block`` for a sparse matrix and a dense 2-d block of its library."""
    if _is_scipy_sparse(matrix) or _is_cupy_sparse(matrix):
        return matrix @ block
    if _is_torch_sparse(matrix):
        import torch

        return (
            torch.sparse.mm(matrix, block) if matrix.layout == torch.sparse_coo else matrix @ block
        )
    return matrix @ block


def sparse_adjoint(matrix: Any) -> Any:
    """The conjugate transpose of a sparse matrix, in its library and (where it can) format."""
    if _is_scipy_sparse(matrix) or _is_cupy_sparse(matrix):
        return matrix.conj().T.tocsr()
    if _is_torch_sparse(matrix):
        import torch

        coo = matrix if matrix.layout == torch.sparse_coo else matrix.to_sparse_coo()
        adjoint = coo.t().coalesce()
        if adjoint.is_complex():
            adjoint = adjoint.conj().coalesce()
        return adjoint.to_sparse_csr() if matrix.layout == torch.sparse_csr else adjoint
    if _is_jax_sparse(matrix):
        from jax.experimental import sparse as jsparse

        transposed = matrix.T
        return jsparse.BCOO((transposed.data.conj(), transposed.indices), shape=transposed.shape)
    raise TypeError(f"not a supported sparse matrix: {type(matrix)!r}")  # pragma: no cover


def sparse_to_dense(matrix: Any) -> Any:
    """A dense array of the same library holding the sparse matrix."""
    if _is_scipy_sparse(matrix):
        return matrix.toarray()
    if _is_cupy_sparse(matrix):
        return matrix.toarray()
    if _is_torch_sparse(matrix):
        return matrix.to_dense()
    return matrix.todense()


def sparse_diagonal(matrix: Any) -> Any:
    """The main diagonal of a square sparse matrix as a dense 1-d array, O(nnz) work."""
    if _is_scipy_sparse(matrix) or _is_cupy_sparse(matrix):
        return matrix.diagonal()
    if _is_torch_sparse(matrix):
        import torch

        coo = matrix if matrix.layout == torch.sparse_coo else matrix.to_sparse_coo()
        coo = coo.coalesce()
        rows, cols = coo.indices()
        values = coo.values()
        on_diag = rows == cols
        out = torch.zeros(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
        return out.index_add(0, rows[on_diag], values[on_diag])
    if _is_jax_sparse(matrix):
        import jax.numpy as jnp

        rows, cols = matrix.indices[:, 0], matrix.indices[:, 1]
        values = jnp.where(rows == cols, matrix.data, 0)
        return jnp.zeros(matrix.shape[0], dtype=matrix.dtype).at[rows].add(values)
    raise TypeError(f"not a supported sparse matrix: {type(matrix)!r}")  # pragma: no cover


def prepare_sparse(matrix: Any) -> Any:
    """Normalize a sparse input to a format with fast products (CSR for SciPy/CuPy)."""
    if _is_scipy_sparse(matrix) or _is_cupy_sparse(matrix):
        return matrix.tocsr()
    if _is_torch_sparse(matrix):
        import torch

        if matrix.layout == torch.sparse_coo:
            return matrix.coalesce()
        if matrix.layout in (torch.sparse_csr,):
            return matrix
        return matrix.to_sparse_csr()
    return matrix


# ------------------------------------------------------------------------ batching


def vmap_columns(function: Callable[[Any], Any], xp: Any) -> Callable[[Any], Any] | None:
    """``function`` (vector -> vector) mapped over the columns of a block, or ``None``.

    Uses the library's own vectorizing map (torch.func.vmap, jax.vmap); other libraries
    have none and the caller falls back to a loop.
    """
    if array_api_compat.is_torch_namespace(xp):
        import torch

        return torch.func.vmap(function, in_dims=1, out_dims=1)
    if array_api_compat.is_jax_namespace(xp):
        import jax

        return jax.vmap(function, in_axes=1, out_axes=1)
    return None


# ---------------------------------------------------------------------------- random


class RandomSource:
    """Seeded random numbers in one library on one device.

    Built by :func:`make_random_source`; wraps a NumPy ``Generator``, a
    ``torch.Generator`` on the operator's device, a JAX key with a column counter or a
    CuPy ``Generator``. Libraries without a random module (array_api_strict) draw with a
    NumPy generator and move the numbers with ``xp.asarray``.

    **Column streams.** The draws are ``(n, k)`` probe blocks, and a block's columns are
    the stream's next k columns, whatever the blocks are cut into: blocks of k1 and then
    k2 columns are the block of k1 + k2 columns drawn at once. So an estimate does not
    depend on its block size, and one that is continued (``Estimate.refine``) is the
    estimate of the whole budget. NumPy and torch on the CPU draw each column as the next
    n numbers of their sequential stream (the block transposed: a (k, n) draw); JAX
    derives column j's key as ``fold_in(key, j)``. torch on CUDA and CuPy draw a block at
    once (their samplers lay numbers out by the launch grid, which follows the block's
    size), so there the probes depend on the block widths.

    Two draws are shaped by what the libraries' samplers cost (one thread, 4000 x 100
    entries, 2026-12-01):

    - float64 Gaussians in torch and JAX are drawn in float32 and widened: their float64
      samplers take 8 ms, the float32 ones 1.7 ms (torch) and 3.5 ms (JAX), next to 75-125
      ms for the product with a dense 4000 x 4000 matrix. The entries are then multiples
      of 2^-24 relative and their tails end near 5.5 sigma, which moves the probes'
      moments by about 1e-7 relative: far below the Monte Carlo error of any estimate
      (which uses the probes it was given exactly, whatever their precision). NumPy's
      float64 ziggurat is as fast as its float32 one and is kept.
    - Rademacher signs are unpacked from random bytes / words (one random bit per entry,
      each column from whole words): 0.9 ms against 1.6 ms (torch ``randint``), 0.35 ms
      against 2.2 ms (``jax.random.rademacher``, which draws a float per entry).
    """

    def __init__(self, xp: Any, device: Any, kind: str, state: Any, columns: int = 0) -> None:
        self.xp = xp
        self.device = device
        self._kind = kind
        self._state = state
        #: Columns drawn from the stream so far.
        self.columns = columns

    @property
    def column_streams(self) -> bool:
        """Whether blocks are partition-independent (see the class notes)."""
        if self._kind == "torch":
            return not str(self.device).startswith("cuda")
        return self._kind != "cupy"

    def standard_normal(self, shape: tuple[int, int], dtype: Any) -> Any:
        """An ``(n, k)`` block of independent N(0, 1) entries of real floating ``dtype``."""
        kind, state = self._kind, self._state
        n, k = shape
        self.columns += k
        if kind == "torch":
            import torch

            # float64: float32 draws, widened (see the class notes)
            narrow = torch.float32 if dtype == torch.float64 else dtype
            if not self.column_streams:
                return torch.randn(shape, generator=state, dtype=narrow, device=self.device).to(
                    dtype
                )
            # torch's CPU sampler pairs numbers within runs of 16 and redraws a ragged
            # tail: columns padded to a multiple of 16 keep each column's numbers its own
            padded = -(-n // 16) * 16
            drawn = torch.randn((k, padded), generator=state, dtype=narrow, device=self.device)
            return _transposed(drawn[:, :n], dtype)
        if kind == "jax":
            self._state, values = _jax_programs()["normal"](self._state, tuple(shape), dtype)
            return values
        if kind == "cupy":
            return state.standard_normal(shape, dtype=dtype)
        return self._from_numpy(state.standard_normal((k, n)).T, dtype)

    def rademacher(self, shape: tuple[int, int], dtype: Any) -> Any:
        """An ``(n, k)`` block of independent +-1 entries (probability 1/2 each), real
        floating ``dtype``."""
        kind, state = self._kind, self._state
        n, k = shape
        self.columns += k
        if kind == "torch":
            import torch

            if not self.column_streams:  # three kernels, not a bit unpacking
                signs = torch.randint(0, 2, shape, generator=state, device=self.device, dtype=dtype)
                return signs.mul_(2).sub_(1)
            raw = torch.randint(
                0, 256, (k, -(-n // 8)), generator=state, device=self.device, dtype=torch.uint8
            )
            shifts = torch.arange(8, device=self.device, dtype=torch.uint8)
            bits = ((raw[:, :, None] >> shifts) & 1).reshape(k, -1)[:, :n]
            signs = bits.to(torch.int8).mul_(2).sub_(1)  # +-1 in the bytes, then one copy
            return _transposed(signs, dtype)
        if kind == "jax":
            self._state, values = _jax_programs()["rademacher"](self._state, tuple(shape), dtype)
            return values
        if kind == "cupy":
            return (2 * state.integers(0, 2, size=shape) - 1).astype(dtype)
        # One random bit per entry from whole 64-bit words per column: about 8x faster
        # than integers(0, 2), which spends a 64-bit draw on every entry.
        words = state.integers(0, 2**64, size=(k, -(-n // 64)), dtype=np.uint64)
        unpacked = np.unpackbits(words.view(np.uint8), axis=1, count=n, bitorder="little")
        ones = unpacked.view(np.int8)  # +-1 formed in the bytes: one pass over the floats
        ones *= 2
        ones -= 1
        return self._from_numpy(ones.T, dtype)

    def uniform(self, shape: tuple[int, int], dtype: Any) -> Any:
        """An ``(n, k)`` block of independent U[0, 1) entries of real floating ``dtype``."""
        kind, state = self._kind, self._state
        n, k = shape
        self.columns += k
        if kind == "torch":
            import torch

            if not self.column_streams:
                return torch.rand(shape, generator=state, dtype=dtype, device=self.device)
            drawn = torch.rand((k, n), generator=state, dtype=dtype, device=self.device)
            return _transposed(drawn, dtype)
        if kind == "jax":
            self._state, values = _jax_programs()["uniform"](self._state, tuple(shape), dtype)
            return values
        if kind == "cupy":
            return state.random(shape, dtype=dtype)
        return self._from_numpy(state.random((k, n)).T, dtype)

    def snapshot(self) -> RandomSource:
        """An independent copy that draws what this source would draw next."""
        kind, state = self._kind, self._state
        if kind == "torch":
            import torch

            copy = torch.Generator(device=self.device)
            copy.set_state(state.get_state())
            return RandomSource(self.xp, self.device, kind, copy, self.columns)
        if kind == "jax":  # immutable arrays
            return RandomSource(self.xp, self.device, kind, state, self.columns)
        import copy as copying

        return RandomSource(self.xp, self.device, kind, copying.deepcopy(state), self.columns)

    def skipped(self, columns: int) -> RandomSource:
        """A JAX source positioned ``columns`` further on its stream (column j's key is
        ``fold_in(key, j)``: skipping costs nothing)."""
        if self._kind != "jax":
            raise TypeError(f"a {self._kind} random stream cannot skip ahead")
        import jax.numpy as jnp

        key, drawn = self._state if isinstance(self._state, tuple) else (self._state, 0)
        state = (key, jnp.asarray(drawn + columns, dtype=jnp.uint32))
        return RandomSource(self.xp, self.device, "jax", state, self.columns + columns)

    def redraw_while(
        self,
        block: Any,
        reject: Callable[[Any], Any],
        tries: int,
        draw: Callable[[], Any],
    ) -> Any:
        """``block`` drawn again (by ``draw()``, a Rademacher block of the same shape) while
        ``reject(block)`` holds, at most ``tries`` times. Compiled JAX decides on the device
        (``lax.while_loop`` carrying the random state: the same draws as the host loop);
        other libraries read ``reject`` on the host (eager JAX too)."""
        if self._kind == "jax" and is_tracer(block):  # compiled: decide on the device
            import jax

            shape, dtype = tuple(block.shape), block.dtype
            rademacher = _jax_programs()["rademacher"]

            def keep_going(carry: Any) -> Any:
                count, candidate, _ = carry
                return (count < tries) & reject(candidate)

            def step(carry: Any) -> Any:
                count, _, state = carry
                state, candidate = rademacher(state, shape, dtype)
                return count + 1, candidate, state

            _, block, self._state = jax.lax.while_loop(keep_going, step, (0, block, self._state))
            return block
        for _ in range(tries):
            if not bool(stop_gradient(reject(block))):
                return block
            block = draw()
        return block

    def _from_numpy(self, values: np.ndarray, dtype: Any) -> Any:
        """NumPy draws (a transposed ``(k, n)`` draw is made row-major) in the library."""
        if self._kind == "numpy":
            return values.astype(dtype, order="C", copy=not values.flags.c_contiguous)
        values = np.ascontiguousarray(values)
        return self.xp.asarray(values, dtype=dtype, device=self.device)


def _transposed(drawn: Any, dtype: Any) -> Any:
    """A torch ``(k, n)`` draw as a row-major ``(n, k)`` block of ``dtype`` (one copy)."""
    import torch

    out = torch.empty((drawn.shape[1], drawn.shape[0]), dtype=dtype, device=drawn.device)
    return out.copy_(drawn.T)


@functools.lru_cache(maxsize=1)
def _jax_programs() -> dict[str, Callable[..., Any]]:
    """The compiled draws: ``(state, shape, dtype) -> (next state, values)``. The state is
    ``(key, columns drawn)``, a bare key before the first draw; column j of the stream
    comes from ``fold_in(key, j)``, and the count stays on the device (no host number per
    draw)."""
    import jax
    import jax.numpy as jnp

    def column_keys(state: Any, count: int) -> tuple[Any, Any]:
        # a bare key before the first draw: none drawn (no array made for the count)
        key, drawn = state if isinstance(state, tuple) else (state, jnp.zeros((), jnp.uint32))
        index = drawn + jnp.arange(count, dtype=drawn.dtype)
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, index)
        return (key, drawn + count), keys

    def normal(state: Any, shape: tuple[int, int], dtype: Any) -> tuple[Any, Any]:
        n, k = shape
        state, keys = column_keys(state, k)
        narrow = jnp.float32 if dtype == jnp.float64 else dtype  # (see RandomSource)
        columns = jax.vmap(lambda key: jax.random.normal(key, (n,), dtype=narrow))(keys)
        return state, columns.T.astype(dtype)

    def rademacher(state: Any, shape: tuple[int, int], dtype: Any) -> tuple[Any, Any]:
        n, k = shape
        state, keys = column_keys(state, k)
        words = jax.vmap(lambda key: jax.random.bits(key, (-(-n // 32),), dtype=jnp.uint32))(keys)
        bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
        signs = 2 * bits.reshape(k, -1)[:, :n].astype(dtype) - 1
        return state, signs.T

    def uniform(state: Any, shape: tuple[int, int], dtype: Any) -> tuple[Any, Any]:
        n, k = shape
        state, keys = column_keys(state, k)
        columns = jax.vmap(lambda key: jax.random.uniform(key, (n,), dtype=dtype))(keys)
        return state, columns.T

    return {
        name: jax.jit(program, static_argnums=(1, 2))
        for name, program in (("normal", normal), ("rademacher", rademacher), ("uniform", uniform))
    }


def make_random_source(seed: Any, xp: Any, device: Any) -> RandomSource:
    """Turn ``seed`` into the library's own generator on ``device``.

    ``seed`` is an ``int``, ``None`` (fresh entropy), or the library's own generator:
    a ``numpy.random.Generator`` (NumPy, array_api_strict), a ``torch.Generator``, a
    JAX PRNG key, a ``cupy.random.Generator``. An existing :class:`RandomSource` is
    returned as it is.
    """
    if isinstance(seed, RandomSource):
        return seed
    if seed is not None and not isinstance(seed, (int, np.integer, np.random.Generator)):
        if not _is_native_generator(seed, xp):
            raise TypeError(
                f"seed must be an int, None or a {namespace_name(xp)} generator/key, "
                f"got {type(seed).__module__}.{type(seed).__name__}"
            )
    if isinstance(seed, bool):
        raise TypeError("seed must be an int, None or a generator, got a bool")
    if isinstance(seed, (int, np.integer)) and seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed}")
    if array_api_compat.is_torch_namespace(xp):
        import torch

        if isinstance(seed, torch.Generator):
            generator = seed
        else:
            generator = torch.Generator(device=device)
            if seed is None:
                generator.seed()
            elif isinstance(seed, np.random.Generator):
                generator.manual_seed(int(seed.integers(0, 2**63 - 1)))
            else:
                generator.manual_seed(fold_seed(int(seed), 64))
        return RandomSource(xp, device, "torch", generator)
    if array_api_compat.is_jax_namespace(xp):
        import jax

        if isinstance(seed, (int, np.integer)):
            key = jax.random.key(fold_seed(int(seed), 63))
        elif seed is None or isinstance(seed, np.random.Generator):
            rng = seed if seed is not None else np.random.default_rng()
            key = jax.random.key(int(rng.integers(0, 2**31 - 1)))
        else:
            key = seed
        return RandomSource(xp, device, "jax", key)  # (key, columns drawn) once it draws
    if array_api_compat.is_cupy_namespace(xp):
        import cupy

        if isinstance(seed, cupy.random.Generator):
            return RandomSource(xp, device, "cupy", seed)
        entropy = (
            None
            if seed is None
            else int(seed)
            if not isinstance(seed, np.random.Generator)
            else int(seed.integers(0, 2**63 - 1))
        )
        return RandomSource(xp, device, "cupy", cupy.random.default_rng(entropy))
    numpy_generator = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    kind = "numpy" if array_api_compat.is_numpy_namespace(xp) else "foreign"
    return RandomSource(xp, device, kind, numpy_generator)


def plain_array(x: Any) -> Any:
    """``x``, with a NumPy ``ndarray`` subclass turned into a plain ``ndarray``: in an
    ``np.matrix`` (what SciPy's ``todense()`` returns) ``*`` is a matrix product and every
    reduction keeps two dimensions, which would make the estimators' arithmetic wrong."""
    if isinstance(x, np.ndarray) and type(x) is not np.ndarray:
        if isinstance(x, np.ma.MaskedArray):
            raise TypeError(
                "a product returned a masked array; an operator's products must be plain "
                "arrays (no entry of A x can be missing)"
            )
        return np.asarray(x)
    return x


def plain_matrix(matrix: Any) -> Any:
    """A NumPy matrix given to :func:`~linop_trace.aslinearoperator` as a plain ``ndarray``: an
    ``np.matrix`` as its array, a masked array without masked entries as its data; a
    masked array with masked entries is refused (a trace or diagonal of a matrix with
    missing entries is not defined, and its data under the mask is arbitrary)."""
    if not isinstance(matrix, np.ndarray) or type(matrix) is np.ndarray:
        return matrix
    if isinstance(matrix, np.ma.MaskedArray):
        masked = int(np.count_nonzero(np.ma.getmaskarray(matrix)))
        if masked:
            raise ValueError(
                f"the matrix is a masked array with {masked} masked entries; a trace or "
                "diagonal needs every entry: fill them (matrix.filled(value)) or drop the mask"
            )
        return np.asarray(matrix.data)
    return np.asarray(matrix)


def is_half_precision(xp: Any, dtype: Any) -> bool:
    """Whether ``dtype`` is a 16-bit float (float16, bfloat16) or torch's 32-bit complex."""
    try:
        if xp.isdtype(dtype, "real floating"):
            return int(xp.finfo(dtype).bits) == 16
        if xp.isdtype(dtype, "complex floating"):
            return int(xp.finfo(dtype).bits) <= 16  # finfo of complex32: its parts' bits
    except (TypeError, ValueError):
        return False
    return False


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says that the host or a device ran out of memory: MemoryError, an
    ``OutOfMemoryError`` (torch's, CuPy's), or a message with "out of memory" (torch on
    CUDA and MPS) or "RESOURCE_EXHAUSTED" (XLA)."""
    if isinstance(error, MemoryError):
        return True
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(error).__mro__):
        return True
    message = str(error).lower()
    return "out of memory" in message or "resource_exhausted" in message


def fold_seed(seed: int, bits: int) -> int:
    """``seed`` if it is below ``2**bits``, else a ``bits``-bit seed derived from all of its
    digits (NumPy's ``SeedSequence``): torch seeds take 64 bits and JAX keys 63, while
    NumPy takes any non-negative int. Distinct large seeds stay distinct but for a hash
    collision (probability ~2**-bits)."""
    if seed < 2**bits:
        return seed
    words = np.random.SeedSequence(seed).generate_state(2, np.uint32)
    return (int(words[0]) << 32 | int(words[1])) & ((1 << bits) - 1)


def jax_seed(seed: Any) -> tuple[Any, bool]:
    """A JAX program's seed argument and whether it is a key: a key as it is; an int (or
    ``None``: fresh entropy, or a NumPy generator: its next draw) as a NumPy integer that
    :func:`jax_key_of` turns into ``jax.random.key(seed)`` inside the program, as
    :func:`make_random_source` would outside it."""
    if isinstance(seed, bool):
        raise TypeError("seed must be an int, None or a generator, got a bool")
    if isinstance(seed, (int, np.integer)):
        if seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed}")
        value = fold_seed(int(seed), 63)
    elif seed is None or isinstance(seed, np.random.Generator):
        rng = seed if seed is not None else np.random.default_rng()
        value = int(rng.integers(0, 2**31 - 1))
    elif array_api_compat.is_jax_array(seed):
        return seed, True
    else:
        raise TypeError(
            "seed must be an int, None or a jax generator/key, got "
            f"{type(seed).__module__}.{type(seed).__name__}"
        )
    import jax

    wide = bool(jax.config.jax_enable_x64)  # type: ignore[attr-defined]
    if value < 2**31 or (wide and value < 2**63):
        return np.int64(value) if wide else np.int32(value), False
    return jax.random.key(value), True


def jax_key_of(seed: Any) -> Any:
    """``jax.random.key(seed)`` of an integer (traced) seed."""
    import jax

    return jax.random.key(seed)


def _is_native_generator(seed: Any, xp: Any) -> bool:
    if array_api_compat.is_torch_namespace(xp):
        import torch

        return isinstance(seed, torch.Generator)
    if array_api_compat.is_jax_namespace(xp):
        return array_api_compat.is_jax_array(seed)
    if array_api_compat.is_cupy_namespace(xp):
        import cupy

        return isinstance(seed, cupy.random.Generator)
    return False


# ------------------------------------------------------------------------- transfer


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy copy of ``x`` (for files, printing and tests; never on a compute path)."""
    if is_sparse(x):
        x = sparse_to_dense(x)
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().resolve_conj().numpy()
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_numpy_array(x):
        return np.asarray(x)
    if array_api_compat.is_jax_array(x):
        return np.asarray(x)
    # array_api_strict and other libraries: via DLPack, then the buffer protocol.
    try:
        return np.from_dlpack(x)
    except Exception:
        return np.asarray(x)


def synchronize(device: Any) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU); used by benchmarks."""
    text = str(device)
    if text.startswith("cuda") and _module_loaded("torch"):
        import torch

        torch.cuda.synchronize(device)


def block_until_ready(x: Any) -> Any:
    """Wait until ``x`` is computed (JAX dispatches asynchronously); returns ``x``."""
    if array_api_compat.is_jax_array(x):
        return x.block_until_ready()
    return x


# ------------------------------------------------------------- building from NumPy
# Used by the command line: a matrix read from a file (NumPy or SciPy sparse) moved to
# the library and device the user picked.

#: Libraries a matrix can be moved to with :func:`from_numpy` / :func:`sparse_from_scipy`.
LIBRARIES = ("numpy", "torch", "jax", "cupy")


def import_library(library: str) -> Any:
    """Import and return ``library`` (one of :data:`LIBRARIES`).

    Raises
    ------
    ValueError
        For a name that is not one of :data:`LIBRARIES`.
    ImportError
        When the library is not installed (the message names it).
    """
    if library not in LIBRARIES:
        raise ValueError(f"unknown backend {library!r}; known backends are {', '.join(LIBRARIES)}")
    try:
        if library == "jax":
            import jax
            import jax.numpy  # noqa: F401

            return jax
        import importlib

        return importlib.import_module(library)
    except ImportError:
        raise ImportError(f"backend {library!r} needs {library}, which is not installed") from None


def resolve_device(library: str, device: str | None) -> Any:
    """The device object of ``library`` named by ``device`` (``"cpu"``, ``"cuda:0"``, ...).

    ``None`` means the library's default (the CPU for NumPy and torch).

    Raises
    ------
    ValueError
        If the name is malformed or the device is not present on this machine.
    """
    lib = import_library(library)
    if library == "numpy":
        if device not in (None, "cpu"):
            raise ValueError(f"device {device!r} is not available to numpy (only 'cpu')")
        return "cpu"
    if library == "torch":
        if device is None:
            return lib.device("cpu")
        try:
            parsed = lib.device(device)
        except (RuntimeError, ValueError, TypeError):
            raise ValueError(f"{device!r} is not a torch device name") from None
        if parsed.type == "cuda":
            if not lib.cuda.is_available():
                raise ValueError(
                    f"device {device!r} is not available to torch: CUDA is not available here"
                )
            count = lib.cuda.device_count()
            if parsed.index is not None and parsed.index >= count:
                raise ValueError(
                    f"device {device!r} is not available to torch: {count} CUDA devices"
                )
        elif parsed.type != "cpu":
            try:
                lib.empty(0, device=parsed)
            except Exception:
                raise ValueError(f"device {device!r} is not available to torch here") from None
        return parsed
    if library == "jax":
        if device is None:
            return lib.devices()[0]
        platform, _, index_text = str(device).partition(":")
        try:
            index = int(index_text) if index_text else 0
        except ValueError:
            raise ValueError(f"{device!r} is not a jax device name (e.g. 'cpu', 'gpu:0')") from None
        try:
            devices = lib.devices(platform)
        except RuntimeError:
            present = sorted({d.platform for d in lib.devices()})
            raise ValueError(
                f"device {device!r} is not available to jax: platforms present are "
                f"{', '.join(present)}"
            ) from None
        if not 0 <= index < len(devices):
            raise ValueError(
                f"device {device!r} is not available to jax: {len(devices)} {platform} devices"
            )
        return devices[index]
    # cupy
    try:
        count = lib.cuda.runtime.getDeviceCount()
    except Exception as error:  # pragma: no cover - needs cupy without a driver
        raise ValueError(f"cupy is installed but CUDA is unusable: {error}") from None
    platform, _, index_text = str(device or "cuda").partition(":")  # pragma: no cover
    if platform not in ("cuda", "gpu"):  # pragma: no cover
        raise ValueError(f"device {device!r} is not available to cupy (CUDA devices only)")
    index = int(index_text) if index_text else 0  # pragma: no cover
    if not 0 <= index < count:  # pragma: no cover
        raise ValueError(f"device {device!r} is not available to cupy: {count} CUDA devices")
    return lib.cuda.Device(index)  # pragma: no cover


def enable_float64(library: str) -> None:
    """Let ``library`` hold 64-bit floats (JAX keeps them off unless asked; a global switch)."""
    if library == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)


def _native_dtype(lib: Any, library: str, dtype: Any) -> Any:
    name = np.dtype(dtype).name
    if library == "jax":
        import jax.numpy as jnp

        return getattr(jnp, name)
    return getattr(lib, name)


def from_numpy(array: np.ndarray, library: str, device: Any = None, dtype: Any = None) -> Any:
    """A dense array of ``library`` on ``device`` holding the NumPy ``array``.

    Parameters
    ----------
    array : numpy.ndarray
    library : {"numpy", "torch", "jax", "cupy"}
    device : device object or str, optional
        As returned by :func:`resolve_device` (strings are resolved with it).
    dtype : numpy dtype or name, optional
        Cast to this dtype first (default: keep the array's dtype).

    Examples
    --------
    >>> import numpy as np
    >>> from linop_trace._backend import from_numpy
    >>> from_numpy(np.eye(2), "numpy", dtype="float32").dtype
    dtype('float32')
    """
    array = np.asarray(array)
    if dtype is not None:
        array = array.astype(np.dtype(dtype), copy=False)
    if device is None or isinstance(device, str):
        device = resolve_device(library, device)
    lib = import_library(library)
    if library == "numpy":
        return array
    if library == "torch":
        return lib.from_numpy(np.ascontiguousarray(array)).to(device)
    if library == "jax":
        native = _native_dtype(lib, library, array.dtype)
        return lib.device_put(lib.numpy.asarray(array, dtype=native), device)
    with device:  # pragma: no cover - needs a GPU
        return lib.asarray(array)


def sparse_from_scipy(matrix: Any, library: str, device: Any = None, dtype: Any = None) -> Any:
    """A sparse matrix of ``library`` on ``device`` holding the SciPy sparse ``matrix``.

    SciPy stays SciPy (CSR); torch gets a CSR tensor, JAX a ``BCOO``, CuPy a cupyx CSR.

    Examples
    --------
    >>> import scipy.sparse as sp
    >>> from linop_trace._backend import sparse_from_scipy
    >>> sparse_from_scipy(sp.eye(3), "numpy").format
    'csr'
    """
    import warnings

    import scipy.sparse as sp

    matrix = sp.csr_array(matrix)
    if dtype is not None:
        matrix = matrix.astype(np.dtype(dtype))
    matrix.sum_duplicates()
    if device is None or isinstance(device, str):
        device = resolve_device(library, device)
    lib = import_library(library)
    if library == "numpy":
        return matrix
    if library == "torch":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return lib.sparse_csr_tensor(
                lib.from_numpy(matrix.indptr.astype(np.int64)),
                lib.from_numpy(matrix.indices.astype(np.int64)),
                lib.from_numpy(np.ascontiguousarray(matrix.data)),
                size=matrix.shape,
                check_invariants=False,  # SciPy's sum_duplicates above made it canonical
            ).to(device)
    if library == "jax":
        from jax.experimental import sparse as jsparse

        coo = matrix.tocoo()
        native = _native_dtype(lib, library, coo.dtype)
        indices = np.stack([coo.row, coo.col], axis=1).astype(np.int32)
        data = lib.numpy.asarray(coo.data, dtype=native)
        bcoo = jsparse.BCOO((data, lib.numpy.asarray(indices)), shape=coo.shape)
        return lib.device_put(bcoo, device)
    import cupyx.scipy.sparse as csp  # pragma: no cover - needs a GPU

    with device:  # pragma: no cover
        return csp.csr_matrix(matrix)


def thin_qr(xp: Any, matrix: Any) -> tuple[Any, Any]:
    """Thin Householder QR ``(Q, R)`` of a tall ``(n, k)`` array of the library ``xp``.

    NumPy arrays go through LAPACK via SciPy on a Fortran-ordered copy (no transposed
    copies inside, about 2x faster than ``numpy.linalg.qr`` for tall-skinny blocks);
    every other library uses its own ``xp.linalg.qr``.
    """
    if type(matrix) is np.ndarray and array_api_compat.is_numpy_namespace(xp):
        import scipy.linalg

        work = np.array(matrix, order="F", copy=True)
        return scipy.linalg.qr(work, mode="economic", overwrite_a=True, check_finite=False)
    return xp.linalg.qr(matrix)


def divide_by_largest(xp: Any, x: Any, axis: int | None = None) -> tuple[Any, Any]:
    """``(x / size, size)`` with ``size`` = max |x| (over ``axis``, kept real; the smallest
    normal number where it is below that, 0 included), the size cut from the gradient.
    Scale-free statistics (variances over their own size, skewness, dofs) then neither
    overflow nor underflow for entries of 1e160 or 1e-160. Two operations besides the
    division (on a GPU every operation is a kernel launch).

    >>> import array_api_compat.numpy as xp
    >>> import numpy as np
    >>> scaled, size = divide_by_largest(xp, np.array([[2.0, -4.0], [0.0, 0.0]]), axis=1)
    >>> scaled, size[0]
    (array([[ 0.5, -1. ],
           [ 0. ,  0. ]]), np.float64(4.0))
    """
    size = xp.max(xp.abs(stop_gradient(x)), axis=axis)
    size = xp.clip(size, min=float(xp.finfo(size.dtype).smallest_normal))
    divisor = size if axis is None else xp.expand_dims(size, axis=axis)
    if divisor.dtype != x.dtype:
        divisor = xp.astype(divisor, x.dtype)
    return x / divisor, size


def stop_gradient(x: Any) -> Any:
    """``x`` cut from automatic differentiation (torch ``detach``, JAX ``stop_gradient``).

    For statistics that only steer the computation (interval shape, stopping tests):
    they may then be turned into Python numbers without touching the gradient of the
    estimate. Other libraries: ``x`` itself.
    """
    if array_api_compat.is_torch_array(x):
        return x.detach()
    if array_api_compat.is_jax_array(x):
        import jax

        return jax.lax.stop_gradient(x)
    return x


def is_concrete(x: Any) -> bool:
    """Whether ``x`` has a value now (False for an abstract JAX tracer, e.g. under ``jit``)."""
    if not _module_loaded("jax"):
        return True
    import jax

    return not isinstance(x, jax.core.Tracer)


def all_finite(xp: Any, x: Any) -> bool | None:
    """Whether every entry of ``x`` is finite; ``None`` when ``x`` has no value yet (JAX
    jit).

    The sum first: one pass with no boolean ``(n, k)`` temporary (torch's entrywise test
    takes 1.4 ms for 4000 x 100 entries, its sum 0.3 ms). A finite sum proves every entry
    finite (a NaN or an infinity makes the sum NaN or infinite); only a sum that is not
    finite, which finite entries can also give by overflowing, runs the entrywise test."""
    with np.errstate(over="ignore", invalid="ignore"):  # NumPy's warnings: not the user's
        total = stop_gradient(xp.sum(x))
    if not is_concrete(total):
        return None
    if bool(xp.isfinite(total)):
        return True
    return bool(xp.all(xp.isfinite(stop_gradient(x))))


def concrete_float(x: Any) -> float | None:
    """``float(x)`` of a real scalar without its gradient; ``None`` when it has no value yet
    (an abstract JAX tracer), so callers can take a path that needs no concrete number."""
    x = stop_gradient(x)
    if not is_concrete(x):
        return None
    return float(x)


def concrete_floats(x: Any) -> list[float] | None:
    """The entries of a real vector as Python floats in one transfer (no gradient);
    ``None`` when it has no value yet (an abstract JAX tracer)."""
    x = stop_gradient(x)
    if not is_concrete(x):
        return None
    return [float(value) for value in to_numpy(x).tolist()]


def column_norms(xp: Any, x: Any) -> Any:
    """``sqrt(sum_i |x[i, j]|^2)`` for each column j of an ``(n, k)`` array, in one pass
    with no ``(n, k)`` temporary where the library allows."""
    if array_api_compat.is_numpy_namespace(xp):
        if np.iscomplexobj(x):
            return np.sqrt(np.einsum("ij,ij->j", x.conj(), x).real)
        return np.sqrt(np.einsum("ij,ij->j", x, x))
    if array_api_compat.is_torch_namespace(xp) or array_api_compat.is_jax_namespace(xp):
        return xp.linalg.vector_norm(x, axis=0)
    square = xp.real(xp.conj(x) * x) if xp.isdtype(x.dtype, "complex floating") else x * x
    return xp.sqrt(xp.sum(square, axis=0))


# ------------------------------------------------------------ device-resident execution
# Estimators never read a value of a device library (torch, CuPy, JAX) on the host while
# they run: a read waits for the device. They ask here instead whether a value can be read
# for free (NumPy and array_api_strict compute on the host, so their values are there
# already) and take a path that needs no value otherwise.


def reads_are_free(xp: Any) -> bool:
    """Whether reading a value of this library costs no wait for a device (NumPy,
    array_api_strict: host libraries whose operations have finished when they return)."""
    return array_api_compat.is_numpy_namespace(
        xp
    ) or array_api_compat.is_array_api_strict_namespace(xp)


def known_value(xp: Any, x: Any) -> Any:
    """``x`` as a Python number when reading it costs nothing (:func:`reads_are_free`), else
    ``None``: the caller then takes the path that works without the value."""
    if not reads_are_free(xp):
        return None
    x = stop_gradient(x)
    if xp.isdtype(x.dtype, "bool"):
        return bool(x)
    return float(x)


def read_float(x: Any) -> float | None:
    """``float(x)`` of a real scalar without its gradient, waiting for the device if it must
    (adaptive runs, once per round; estimates read lazily); ``None`` for a tracer."""
    return concrete_float(x)


def read_bool(x: Any) -> bool:
    """A 0-d boolean array read on the host (waiting for the device). JAX's NumPy view is
    read faster than its ``bool`` (which adds tens of microseconds per call)."""
    if array_api_compat.is_jax_array(x):
        return bool(np.asarray(x))
    return bool(x)


def read_floats(xp: Any, scalars: list[Any]) -> list[float] | None:
    """Real 0-d arrays read on the host in one transfer (one device wait); ``None`` under
    a JAX trace. ``None`` entries stay ``None``."""
    present = [x for x in scalars if x is not None]
    if not present:
        return [None] * len(scalars)  # type: ignore[list-item]
    dtype = present[0].dtype
    stacked = xp.stack(
        [stop_gradient(x if x.dtype == dtype else xp.astype(x, dtype)) for x in present]
    )
    numbers = concrete_floats(stacked)
    if numbers is None:
        return None
    values = iter(numbers)
    return [None if x is None else next(values) for x in scalars]  # type: ignore[misc]


def is_tracer(x: Any) -> bool:
    """Whether ``x`` is an abstract JAX value (inside ``jit``, ``grad``, ``vmap``)."""
    return not is_concrete(x)


def finite_flag(xp: Any, x: Any) -> Any:
    """A 0-d boolean array: whether every entry of ``x`` is finite, computed where ``x``
    lives (no read). ``sum(0 * x)`` is 0 for finite entries and NaN otherwise, and never
    overflows, unlike ``sum(x)``; on NumPy the plain sum (one pass, no temporary) decides
    when it is finite."""
    x = stop_gradient(x)
    if array_api_compat.is_numpy_namespace(xp):
        return np.bool_(all_finite(xp, x))
    return xp.isfinite(xp.sum(x * 0))


def prefers_whole_arrays(xp: Any, device: Any) -> bool:
    """Whether row-block loops (sized for a CPU cache) should process the whole array at
    once: under JAX (one fused program) and on accelerators (one kernel per operation, each
    launch costs more than the cache saves)."""
    if array_api_compat.is_jax_namespace(xp):
        return True
    return not str(device).lower().startswith("cpu") and str(device) not in ("", "None")


def is_accelerator(device: Any) -> bool:
    """Whether ``device`` is a GPU (or another accelerator) rather than the CPU."""
    text = str(device).lower()
    platform = getattr(device, "platform", None)
    if platform is not None:
        return str(platform).lower() != "cpu"
    return not (text.startswith("cpu") or text in ("", "none"))


def solve(xp: Any, matrix: Any, rhs: Any) -> Any:
    """``matrix^{-1} rhs`` without a host check of the factorization (torch's ``solve``
    reads its LAPACK status, a device wait on a GPU; ``solve_ex`` does not). A singular
    matrix gives non-finite entries or raises (NumPy), which callers test for."""
    if array_api_compat.is_torch_namespace(xp):
        import torch

        return torch.linalg.solve_ex(matrix, rhs)[0]
    return xp.linalg.solve(matrix, rhs)


def materialized(xp: Any, x: Any) -> Any:
    """``x`` computed as it stands, not folded into its neighbours by XLA
    (``optimization_barrier``: differentiable and batchable); the identity elsewhere.

    Two rewrites of XLA's CPU compiler cost more than they save here: a transpose folded
    into a matrix product makes it a transposed-operand product, which runs at half speed
    (A^H X as (X^H A)^H: 1.9x A @ X at n = 512); and a sum of column sums rewritten as a
    sum over the whole block gives that block a second reader, which stops the product
    from fusing with its column sums (Hutchinson at n = 4000: 1.3x the product)."""
    if not array_api_compat.is_jax_namespace(xp):
        return x
    import jax

    return jax.lax.optimization_barrier(x)


def solve_triangular(xp: Any, matrix: Any, rhs: Any, *, lower: bool) -> Any:
    """``matrix^{-1} rhs`` for a triangular ``matrix`` (lower or upper): one substitution,
    where a general solve factorizes (LU, pivot search and permutation: under JAX on a CPU
    a 10 x 10 inverse by LU is five times the operations of one triangular solve). An exact
    zero on the diagonal gives non-finite entries, or raises (NumPy, SciPy).
    Libraries without a triangular solver use their general ``solve``."""
    if array_api_compat.is_torch_namespace(xp):
        import torch

        return torch.linalg.solve_triangular(matrix, rhs, upper=not lower)
    if array_api_compat.is_jax_namespace(xp):
        import jax.scipy.linalg

        return jax.scipy.linalg.solve_triangular(matrix, rhs, lower=lower)
    if array_api_compat.is_cupy_namespace(xp):
        import cupyx.scipy.linalg

        return cupyx.scipy.linalg.solve_triangular(matrix, rhs, lower=lower)
    if array_api_compat.is_numpy_namespace(xp) and type(matrix) is np.ndarray:
        import scipy.linalg

        return scipy.linalg.solve_triangular(matrix, rhs, lower=lower, check_finite=False)
    return solve(xp, matrix, rhs)


def cholesky(xp: Any, matrix: Any) -> Any:
    """The lower Cholesky factor, without a host check (torch: ``cholesky_ex``); a matrix
    that is not positive definite gives non-finite entries or raises (NumPy)."""
    if array_api_compat.is_torch_namespace(xp):
        import torch

        factor, info = torch.linalg.cholesky_ex(matrix)
        return torch.where(info == 0, factor, torch.full_like(factor, math.nan))
    return xp.linalg.cholesky(matrix)


def device_cond(
    xp: Any,
    flag: Any,
    if_true: Callable[..., Any],
    if_false: Callable[..., Any],
    *operands: Any,
) -> Any:
    """``if_true(*operands)`` where ``flag`` holds, else ``if_false(*operands)``, decided
    without a host read: ``jax.lax.cond`` under JAX (only the taken branch runs), a host
    ``if`` where reads are free. Other libraries cannot branch on the device:
    ``NotImplementedError`` (callers check :func:`can_branch` first)."""
    known = known_value(xp, flag)
    if known is None and array_api_compat.is_jax_namespace(xp) and not is_tracer(flag):
        # eager JAX (operators of user functions, adaptive rounds) runs op by op anyway:
        # read the flag rather than trace both branches anew at every call
        known = bool(np.asarray(flag))
    if known is not None:
        return if_true(*operands) if known else if_false(*operands)
    if array_api_compat.is_jax_namespace(xp):
        import jax

        return jax.lax.cond(flag, if_true, if_false, *operands)
    raise NotImplementedError(f"{namespace_name(xp)} cannot branch on a device value")


def can_branch(xp: Any) -> bool:
    """Whether :func:`device_cond` works for this library (host libraries and JAX)."""
    return reads_are_free(xp) or array_api_compat.is_jax_namespace(xp)


def free_memory(xp: Any, device: Any) -> int | None:
    """Bytes free on ``device`` for new arrays (``None`` when the library does not say).

    CUDA devices report their own free memory (torch, CuPy, JAX's memory statistics); on
    the CPU it is the memory the operating system reports available."""
    text = str(device).lower()
    try:
        if array_api_compat.is_torch_namespace(xp) and text.startswith("cuda"):
            import torch

            free, _ = torch.cuda.mem_get_info(device)
            return int(free)
        if array_api_compat.is_cupy_namespace(xp):
            import cupy

            with cupy.cuda.Device(getattr(device, "id", 0)):
                free, _ = cupy.cuda.runtime.memGetInfo()
            pool = cupy.get_default_memory_pool()
            return int(free + pool.free_bytes())  # blocks the pool holds are reusable
        if array_api_compat.is_jax_namespace(xp) and device is not None:
            stats = device.memory_stats() if hasattr(device, "memory_stats") else None
            if stats and "bytes_limit" in stats:
                return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    except Exception:  # a device that cannot say: fall back to the host's figure
        pass
    return host_free_memory()


_HOST_MEMORY: list[float] = []
#: Seconds a reading of the host's free memory is reused (block sizes need no more).
HOST_MEMORY_SECONDS = 1.0


def host_free_memory() -> int | None:
    """``MemAvailable`` of /proc/meminfo (Linux), else free physical pages, else None;
    read at most once per ``HOST_MEMORY_SECONDS``."""
    import time

    now = time.monotonic()
    if _HOST_MEMORY and now - _HOST_MEMORY[0] < HOST_MEMORY_SECONDS:
        return int(_HOST_MEMORY[1]) if _HOST_MEMORY[1] >= 0 else None
    value = _read_host_free_memory()
    _HOST_MEMORY[:] = [now, -1 if value is None else value]
    return value


def _read_host_free_memory() -> int | None:
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


# ---------------------------------------------------------------- JAX compilation
# Under JAX a fixed-budget estimate runs as one compiled program: operators and estimates
# are pytrees (their arrays are the program's arguments and results, not constants), and
# the program is compiled once per estimator, settings, shapes and dtypes.

_PYTREES: list[tuple[type, Callable[..., Any], Callable[..., Any]]] = []
_REGISTERED: set[type] = set()


def register_pytree(cls: type, flatten: Callable[..., Any], unflatten: Callable[..., Any]) -> None:
    """Make ``cls`` a JAX pytree (now if JAX is loaded, else when it first compiles)."""
    _PYTREES.append((cls, flatten, unflatten))
    if _module_loaded("jax"):
        ensure_pytrees()


def register_pytree_dataclass(cls: type) -> type:
    """Make a dataclass a JAX pytree (a class decorator): its fields are children, except
    those whose ``metadata`` says ``static`` (Python values: flags, counts), which the
    compiled program keeps as part of its structure."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("static")]
    static = [f.name for f in dataclasses.fields(cls) if f.metadata.get("static")]

    def flatten(value: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        return (
            tuple(getattr(value, name) for name in names),
            tuple(getattr(value, name) for name in static),
        )

    def unflatten(aux: tuple[Any, ...], children: tuple[Any, ...]) -> Any:
        return cls(**dict(zip(names, children)), **dict(zip(static, aux)))

    register_pytree(cls, flatten, unflatten)
    return cls


def ensure_pytrees() -> None:
    """Register every class given to :func:`register_pytree` with JAX (once each)."""
    import jax

    for cls, flatten, unflatten in _PYTREES:
        if cls not in _REGISTERED:
            jax.tree_util.register_pytree_node(cls, flatten, unflatten)
            _REGISTERED.add(cls)


def is_array_like(x: Any) -> bool:
    """Whether ``x`` is an array (or a JAX tracer), not a Python number or string."""
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (int, float))


_PROGRAMS: dict[Any, Callable[..., Any]] = {}


def compiled(function: Callable[..., Any], num_static: int) -> Callable[..., Any]:
    """``function`` compiled whole by ``jax.jit`` (its first ``num_static`` arguments
    static), with the estimator's own matrix products at full precision (on NVIDIA GPUs
    JAX's default float32 product is TF32, with a 10-bit mantissa): the operator's products
    go through :func:`product_precision`, at the caller's. Built once per function."""
    program = _PROGRAMS.get(function)
    if program is None:
        import jax

        ensure_pytrees()

        @functools.wraps(function)
        def precise(*args: Any) -> Any:
            with jax.default_matmul_precision("highest"):
                return function(*args)

        program = _PROGRAMS[function] = jax.jit(precise, static_argnums=tuple(range(num_static)))
    return program


def caller_precision(xp: Any) -> str | None:
    """The matrix-product precision the caller's own ``A @ Z`` gets (JAX's
    ``jax_default_matmul_precision``; ``None``: the default, TF32 for float32 on NVIDIA
    GPUs), so that the operator's products inside an estimate are those of the caller."""
    if not array_api_compat.is_jax_namespace(xp):
        return None
    import jax

    return jax.config.jax_default_matmul_precision  # type: ignore[attr-defined,no-any-return]


def product_precision(xp: Any, precision: str | None) -> Any:
    """A context for an operator product at ``precision`` (JAX; a no-op elsewhere)."""
    if not array_api_compat.is_jax_namespace(xp):
        return contextlib.nullcontext()
    import jax

    return jax.default_matmul_precision(precision)


# ------------------------------------------------------------------ product failures

#: Words in an error's message that mean a device or the host ran out of memory: torch
#: ("CUDA out of memory", "MPS backend out of memory") and XLA ("RESOURCE_EXHAUSTED").
_OUT_OF_MEMORY_MESSAGES = ("out of memory", "resource_exhausted")

#: What torch.func and JAX raise when a function does not support a transform:
#: RuntimeError (torch: ``.item()``, in-place ops, data-dependent control flow, batching
#: rules; NotImplementedError: no forward-mode rule; torch.compile's errors), TypeError
#: (JAX's tracer errors: ConcretizationTypeError, TracerArrayConversionError,
#: TracerBoolConversionError, UnexpectedTracerError; custom_vjp under jvp), IndexError
#: (JAX: slices with traced bounds) and ValueError (vmap: outputs that are not arrays,
#: or vectors where a block is mapped).
_TRANSFORM_ERRORS = (RuntimeError, TypeError, IndexError, ValueError)


def is_transient_error(error: BaseException) -> bool:
    """Whether ``error`` says nothing about the function that raised it.

    True for interrupts and exits (any non-``Exception``, such as KeyboardInterrupt), a
    MemoryError, any ``OutOfMemoryError`` (torch's, CuPy's) and an error whose message
    says the memory ran out (torch's "out of memory", XLA's "RESOURCE_EXHAUSTED"). The
    same call may succeed later, or with a smaller block, so a caller must not trade a
    product route for another on it.
    """
    if not isinstance(error, Exception) or isinstance(error, MemoryError):
        return True
    # by name: torch.OutOfMemoryError is a RuntimeError, and naming it needs no import
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(error).__mro__):
        return True
    message = str(error).lower()
    return any(words in message for words in _OUT_OF_MEMORY_MESSAGES)


def is_unsupported_transform_error(error: BaseException) -> bool:
    """Whether ``error`` may mean that the function does not support a transform (vmap,
    jvp, grad, jit), so that a route without it (another mode, a loop) may work.

    True for the error types transforms raise (RuntimeError, TypeError, IndexError,
    ValueError and their subclasses, JAX's tracer errors among them), unless
    :func:`is_transient_error`. Other errors (AssertionError, KeyError, OSError, ...) come
    from the function itself and would come from any route.
    """
    return isinstance(error, _TRANSFORM_ERRORS) and not is_transient_error(error)
