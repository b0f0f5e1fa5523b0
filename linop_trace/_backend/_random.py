"""Seeded random numbers in each library: column streams of probe blocks."""

from __future__ import annotations

import collections
import functools
import os
from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np

from ._dask import dask_probe_block, is_dask_array, is_dask_namespace
from ._device import is_tracer, placed, stop_gradient
from ._identity import namespace_name

__all__ = ["RandomSource", "fold_seed", "jax_key_of", "jax_seed", "make_random_source"]


class RandomSource:
    """Seeded random numbers in one library on one device.

    Built by :func:`make_random_source`; wraps a NumPy ``Generator``, a
    ``torch.Generator`` on the operator's device, a JAX key with a column counter or a
    CuPy ``Generator``, or for Dask a key of a counter-based generator by row page
    (:func:`~linop_trace._backend._dask.dask_probe_block`). Libraries without a random
    module (array_api_strict) draw with a
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
      against 2.2 ms (``jax.random.rademacher``, which draws a float per entry). torch
      on the CPU looks the bytes of a small block up in a table of signs instead
      (:data:`SIGN_TABLE_ENTRIES`).
    """

    def __init__(self, xp: Any, device: Any, kind: str, state: Any, columns: int = 0) -> None:
        self.xp = xp
        self.device = device
        self._kind = kind
        self._state = state
        #: Columns drawn from the stream so far.
        self.columns = columns
        #: JAX: the width of the first draw, in whose chunks wider blocks are drawn.
        self._unit: int | None = None

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
        if kind == "dask":  # counter-based, by row page (see _dask)
            key, matrix = state
            return dask_probe_block("normal", key, shape, self.columns - k, dtype, anchor=matrix)
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
            return self._jax_draw("normal", shape, dtype)
        if kind == "cupy":
            return state.standard_normal(shape, dtype=dtype)
        return self._from_numpy(state.standard_normal((k, n)).T, dtype)

    def rademacher(self, shape: tuple[int, int], dtype: Any) -> Any:
        """An ``(n, k)`` block of independent +-1 entries (probability 1/2 each), real
        floating ``dtype``."""
        kind, state = self._kind, self._state
        n, k = shape
        self.columns += k
        if kind == "dask":  # counter-based, by row page (see _dask)
            key, matrix = state
            return dask_probe_block(
                "rademacher", key, shape, self.columns - k, dtype, anchor=matrix
            )
        if kind == "torch":
            import torch

            if not self.column_streams:  # three kernels, not a bit unpacking
                signs = torch.randint(0, 2, shape, generator=state, device=self.device, dtype=dtype)
                return signs.mul_(2).sub_(1)
            if k * n <= SIGN_TABLE_ENTRIES:  # the same bytes, each looked up as 8 signs
                raw = torch.randint(0, 256, (k, -(-n // 8)), generator=state, device=self.device)
                table = _sign_table(dtype, self.device)
                signs = torch.nn.functional.embedding(raw, table).reshape(k, -1)[:, :n]
                return signs.T.contiguous()
            raw = torch.randint(
                0, 256, (k, -(-n // 8)), generator=state, device=self.device, dtype=torch.uint8
            )
            shifts = torch.arange(8, device=self.device, dtype=torch.uint8)
            bits = ((raw[:, :, None] >> shifts) & 1).reshape(k, -1)[:, :n]
            signs = bits.to(torch.int8).mul_(2).sub_(1)  # +-1 in the bytes, then one copy
            return _transposed(signs, dtype)
        if kind == "jax":
            return self._jax_draw("rademacher", shape, dtype)
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
        if kind == "dask":  # counter-based, by row page (see _dask)
            key, matrix = state
            return dask_probe_block("uniform", key, shape, self.columns - k, dtype, anchor=matrix)
        if kind == "torch":
            import torch

            if not self.column_streams:
                return torch.rand(shape, generator=state, dtype=dtype, device=self.device)
            drawn = torch.rand((k, n), generator=state, dtype=dtype, device=self.device)
            return _transposed(drawn, dtype)
        if kind == "jax":
            return self._jax_draw("uniform", shape, dtype)
        if kind == "cupy":
            return state.random(shape, dtype=dtype)
        return self._from_numpy(state.random((k, n)).T, dtype)

    def _jax_draw(self, name: str, shape: tuple[int, int], dtype: Any) -> Any:
        """A JAX block from the compiled draw ``name``. Eagerly, a block at least twice as
        wide as this source's first draw comes in chunks of that first width (and a
        narrower rest), the same columns as one draw (column j's key is ``fold_in(key,
        j)``): each width is a program of its own, whose threefry takes 0.3 - 1 s to
        compile on a CPU, and an adaptive estimate doubles its block every round."""
        program = _jax_programs()[name]
        n, k = shape
        unit = self._unit
        key, drawn = self._state if isinstance(self._state, tuple) else (self._state, None)
        if unit is None or k < 2 * unit or is_tracer(key):
            if unit is None:
                self._unit = k
            drawn, values = program(key, drawn, (n, k), dtype)
            self._state = (key, drawn)
            return values
        pieces = []
        for start in range(0, k, unit):
            drawn, piece = program(key, drawn, (n, min(unit, k - start)), dtype)
            pieces.append(piece)
        self._state = (key, drawn)
        return self.xp.concat(pieces, axis=1)

    def snapshot(self) -> RandomSource:
        """An independent copy that draws what this source would draw next."""
        kind, state = self._kind, self._state
        if kind == "torch":
            import torch

            copy = torch.Generator(device=self.device)
            copy.set_state(state.get_state())
            return RandomSource(self.xp, self.device, kind, copy, self.columns)
        if kind in ("jax", "dask"):  # immutable arrays; (a key, a Dask matrix)
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
            import jax.numpy as jnp

            shape, dtype = tuple(block.shape), block.dtype
            rademacher = _jax_programs()["rademacher"]
            key, drawn = self._state if isinstance(self._state, tuple) else (self._state, None)
            drawn = jnp.zeros((), jnp.uint32) if drawn is None else drawn

            def keep_going(carry: Any) -> Any:
                count, candidate, _ = carry
                return (count < tries) & reject(candidate)

            def step(carry: Any) -> Any:
                count, _, drawn = carry
                drawn, candidate = rademacher(key, drawn, shape, dtype)
                return count + 1, candidate, drawn

            _, block, drawn = jax.lax.while_loop(keep_going, step, (0, block, drawn))
            self._state = (key, drawn)
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


#: torch on the CPU: a block of at most this many Rademacher entries unpacks its random
#: bytes by looking each up in a 256 x 8 table of signs (4 operations; 17 us against 37 us
#: for the shifts and masks at n = 200, k = 20, one thread), a larger one by shifts and
#: masks on the bytes (the table's gathered floats cost more memory traffic there: 1.1-1.2
#: ms against 0.75 ms at 4000 x 100). The signs are the same either way.
SIGN_TABLE_ENTRIES = 2**17


@functools.lru_cache(maxsize=8)
def _sign_table(dtype: Any, device: Any) -> Any:
    """Row b: the signs 2 bit_i(b) - 1 of byte b, lowest bit first (a (256, 8) tensor)."""
    import torch

    bits = (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1
    return (2 * bits - 1).to(dtype)


def _transposed(drawn: Any, dtype: Any) -> Any:
    """A torch ``(k, n)`` draw as a row-major ``(n, k)`` block of ``dtype`` (one copy)."""
    import torch

    out = torch.empty((drawn.shape[1], drawn.shape[0]), dtype=dtype, device=drawn.device)
    return out.copy_(drawn.T)


@functools.lru_cache(maxsize=1)
def _jax_programs() -> dict[str, Callable[..., Any]]:
    """The compiled draws: ``(key, drawn, shape, dtype) -> (drawn + k, values)``, with
    ``drawn`` the columns drawn so far (a device count; ``None`` before the first draw, so
    that no array is made for it). Column j of the stream comes from ``fold_in(key, j)``.
    The key is not returned: it never changes, and a key among a program's outputs costs
    JAX's dispatch about 20 us a call (a typed key array is rebuilt in Python), where the
    whole draw of a 512 x 20 block takes 25 us."""
    import jax
    import jax.numpy as jnp

    # Threefry itself, named: the default implementation may be another (``rbg``, set by
    # ``jax_default_prng_impl``), whose keys go through jax.random's own draws; taken as
    # the default at the first draw, an rbg default sent every key down the threefry path
    # (a TypeError on its key data), and a threefry key drew other values in a process
    # whose default was rbg (found by a review)
    threefry = jax.random.key_impl(jax.random.key(0, impl="threefry2x32"))

    def column_keys(key: Any, drawn: Any, count: int) -> tuple[Any, Any]:
        """The keys ``fold_in(key, j)`` of columns j = drawn .. drawn + count - 1: for a
        threefry key, threefry2x32 of the pairs (0, j), written out (as the stream's
        words, :func:`threefry_2x32`)."""
        drawn = jnp.zeros((), jnp.uint32) if drawn is None else drawn
        index = drawn + jnp.arange(count, dtype=drawn.dtype)
        if jax.random.key_impl(key) != threefry:
            return drawn + count, jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, index)
        pair = jax.random.key_data(key)
        y0, y1 = threefry_2x32_hash(pair[0], pair[1], jnp.zeros_like(index), index)
        data = kept(jnp.stack([y0, y1], axis=1), pair[0])  # (each read by many words)
        keys = jax.random.wrap_key_data(data, impl=threefry)
        return drawn + count, keys

    def stream_words(key: Any, count: int) -> Any:
        """``count`` 32-bit words of one column's key: for a threefry key, threefry2x32
        of the key over the counters, both words of each hash kept (``jax.random.bits``
        XORs the two under JAX's partitionable threefry, twice the hashing: 0.46-0.54 of
        a 512 x 512 x 20 product for 10 Gaussian columns on the CPU); other key
        implementations through ``jax.random.bits``."""
        if jax.random.key_impl(key) != threefry:
            return jax.random.bits(key, (count,), dtype=jnp.uint32)
        pair = jax.random.key_data(key)
        return threefry_2x32(pair[0], pair[1], count)

    def normal(key: Any, drawn: Any, shape: tuple[int, int], dtype: Any) -> tuple[Any, Any]:
        n, k = shape
        drawn, keys = column_keys(key, drawn, k)
        narrow = jnp.float32 if dtype == jnp.float64 else dtype  # (see RandomSource)
        if narrow != jnp.float32:
            columns = jax.vmap(lambda key: jax.random.normal(key, (n,), dtype=narrow))(keys)
            return drawn, columns.T.astype(dtype)
        bits = jax.vmap(lambda key: stream_words(key, n))(keys)
        # 23 random mantissa bits: a float32 in [1, 2), less 1; then (-1, 1) open, as
        # jax.random.normal maps it, and the inverse error function
        unit = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32)
        low = np.nextafter(np.float32(-1.0), np.float32(0.0))
        inside = jnp.maximum(low, (unit - 1.0) * (1.0 - low) + low)
        columns = np.float32(np.sqrt(2.0)) * jax.lax.erf_inv(inside)
        return drawn, columns.T.astype(dtype)

    def rademacher(key: Any, drawn: Any, shape: tuple[int, int], dtype: Any) -> tuple[Any, Any]:
        n, k = shape
        drawn, keys = column_keys(key, drawn, k)
        words_per_column = -(-n // 32)
        words = jax.vmap(lambda key: stream_words(key, words_per_column))(keys)
        words = kept(words, words[0, 0])  # (each read for 32 signs)
        bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
        signs = 2 * bits.reshape(k, -1)[:, :n].astype(dtype) - 1
        return drawn, signs.T

    def uniform(key: Any, drawn: Any, shape: tuple[int, int], dtype: Any) -> tuple[Any, Any]:
        n, k = shape
        drawn, keys = column_keys(key, drawn, k)
        columns = jax.vmap(lambda key: jax.random.uniform(key, (n,), dtype=dtype))(keys)
        return drawn, columns.T

    return {
        name: jax.jit(program, static_argnums=(2, 3))
        for name, program in (("normal", normal), ("rademacher", rademacher), ("uniform", uniform))
    }


#: Threefry-2x32's rotations, by group of four rounds (even groups, odd groups).
THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry_2x32(k0: Any, k1: Any, count: int) -> Any:
    """``jax.extend.random.threefry_2x32((k0, k1), arange(count))``, word for word:
    the counters in two halves (a zero appended to an odd count), each pair hashed
    by Threefry-2x32 (20 rounds, Salmon et al. 2011), the two halves of the words
    concatenated. Written out, the 20 rounds fuse into one loop over the words; JAX
    lowers its own to a rolled loop of five steps on the CPU, each a pass of its
    own: for 10 Gaussian columns at n = 512, a draw and its product took 1.30 - 1.32
    of the product alone with JAX's, 1.02 - 1.10 written out."""
    import jax.numpy as jnp

    odd = count % 2
    half = (count + odd) // 2
    counters = jnp.arange(2 * half, dtype=jnp.uint32)
    if odd:
        counters = counters.at[-1].set(0)
    x0, x1 = threefry_2x32_hash(k0, k1, counters[:half], counters[half:])
    words = jnp.concatenate([x0, x1])
    return words[:count]


def kept(words: Any, salt: Any) -> Any:
    """``words`` (unsigned integers), made in a pass of their own in a compiled program.

    XLA fuses cheap elementwise work into the consumer, and a consumer that reads each
    element several times then recomputes it at every read: the 20 Threefry rounds of a
    word read for 32 Rademacher signs ran 32 times, 0.22 - 0.28 of a 512 x 512 x 20
    product on the CPU (and a column's key hashed again for every word of the column
    took minutes to compile). An integer division is an operation XLA does not fuse
    into such a consumer, so the words are divided by 1, a 1 the compiler cannot know
    (``(salt | 1) // (salt | 1)``, ``salt`` a scalar of the program's)."""
    one = (salt | 1) // (salt | 1)
    return words // one


def threefry_2x32_hash(k0: Any, k1: Any, x0: Any, x1: Any) -> tuple[Any, Any]:
    """Threefry-2x32 with key ``(k0, k1)`` of each pair ``(x0[i], x1[i])`` (uint32
    arrays): 20 rounds of add, rotate and xor, the key injected after every four."""
    import jax.numpy as jnp

    schedule = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
    x0, x1 = x0 + schedule[0], x1 + schedule[1]
    for group in range(5):
        for rotation in THREEFRY_ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = (x1 << jnp.uint32(rotation)) | (x1 >> jnp.uint32(32 - rotation))
            x1 = x1 ^ x0
        x0 = x0 + schedule[(group + 1) % 3]
        x1 = x1 + schedule[(group + 2) % 3] + jnp.uint32(group + 1)
    return x0, x1


def make_random_source(xp: Any, device: Any, seed: Any, like: Any = None) -> RandomSource:
    """Turn ``seed`` into the library's own generator on ``device``.

    ``seed`` is an ``int``, ``None`` (fresh entropy), or the library's own generator:
    a ``numpy.random.Generator`` (NumPy, array_api_strict), a ``torch.Generator``, a
    JAX PRNG key, a ``cupy.random.Generator``. An existing :class:`RandomSource` is
    returned as it is. ``like``: the operator's stored matrix, if any; a Dask matrix's
    column chunks become the probe blocks' row chunks, each drawn next to the matrix's
    blocks that multiply it (:func:`~linop_trace._backend._dask.dask_probe_block`; the
    values do not depend on the chunks).
    """
    if isinstance(seed, RandomSource):
        return seed
    if seed is not None and not isinstance(seed, (int, np.integer, np.random.Generator)):
        if not _is_native_generator(xp, seed):
            from ._identity import library_name

            other = library_name(seed) if hasattr(seed, "shape") else None
            hint = (
                f" (the operator is {namespace_name(xp)}'s: an operator made with "
                "LinearOperator.from_callable is NumPy's unless like= gives an array of "
                "its library)"
                if other not in (None, "unknown", namespace_name(xp))
                else ""
            )
            raise TypeError(
                f"seed must be an int, None or a {namespace_name(xp)} generator/key, "
                f"got {type(seed).__module__}.{type(seed).__name__}{hint}"
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
            key = _jax_key(fold_seed(int(seed), 63))
        elif seed is None:
            key = _fresh_jax_key()
        elif isinstance(seed, np.random.Generator):
            key = jax.random.key(int(seed.integers(0, 2**31 - 1)))
        elif array_api_compat.is_jax_array(seed) and _is_integer_jax_seed(seed):
            key = jax.random.key(seed)
        else:
            key = seed
        if isinstance(device, jax.sharding.NamedSharding) and not is_tracer(key):
            # an operator over a sharded array: its probes are drawn on its mesh (a key
            # left on one device would draw the probes there, which the operator refuses)
            key = jax.device_put(key, device)
        elif device is not None and not is_tracer(key):
            # an operator on another device than the default one (a second GPU): the
            # draws follow their key (made on the default device, they were refused)
            key = placed(key, device)
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
    if is_dask_namespace(xp):
        # a 64-bit key of the page generator: probes depend on (seed, row, column) only
        if isinstance(seed, (int, np.integer)):
            page_key = fold_seed(int(seed), 64)
        else:
            rng = seed if seed is not None else np.random.default_rng()
            page_key = int(rng.integers(0, 2**63 - 1))
        anchor = like if is_dask_array(like) and like.ndim == 2 else None
        return RandomSource(xp, device, "dask", (page_key, anchor))
    numpy_generator = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    kind = "numpy" if array_api_compat.is_numpy_namespace(xp) else "foreign"
    return RandomSource(xp, device, kind, numpy_generator)


#: Keys made from integer seeds outside a trace: (seed, PRNG implementation, default
#: device) -> key, the most recently made kept. Making one eagerly takes 35 us, an eighth
#: of an estimate's product at n = 512, and the estimate that takes a key not yet computed
#: waits for it: a loop over fresh seeds ran 380 us an estimate against 265 us with keys
#: made before. Keys are immutable, so one serves every estimate with its seed.
_JAX_KEYS: collections.OrderedDict[tuple[int, str, Any, bool], Any] = collections.OrderedDict()
JAX_KEYS_KEPT = 256
#: Keys a loop over seeds gets made at once (:func:`_jax_key`).
JAX_KEY_BATCH = 64
#: A stride between seeds up to which a loop's next keys are made in a batch.
JAX_KEY_MAX_STRIDE = 1024
#: The last two seeds asked for (a loop's stride).
_RECENT_SEEDS: list[int] = []


def _jax_key(value: int) -> Any:
    """``jax.random.key(value)``, the same key object again for the same seed, PRNG
    implementation and default device (a key made inside a trace is not kept).

    Seeds in a loop (``seed=i``, or ``i`` times a stride up to JAX_KEY_MAX_STRIDE, seen
    for three calls running) get their next JAX_KEY_BATCH keys made in one program, 4 us
    a key and ready when the estimates need them (:func:`_key_batch`); the keys are those
    ``jax.random.key`` makes one by one."""
    import jax

    config = jax.config
    impl, device = str(config.jax_default_prng_impl), config.jax_default_device  # type: ignore[attr-defined]
    # (with 64-bit integers off JAX keeps a seed's low 32 bits: x64 is part of the slot,
    # or a key made with it on came back after it was turned off; found by a review)
    wide = bool(config.jax_enable_x64)  # type: ignore[attr-defined]
    slot = (value, impl, device, wide)
    recent = _RECENT_SEEDS[-2:]
    _RECENT_SEEDS[:] = [*recent[-1:], value]
    key = _JAX_KEYS.get(slot)
    if key is not None:
        return key
    stride = value - recent[-1] if len(recent) == 2 else 0
    if 0 < stride <= JAX_KEY_MAX_STRIDE and recent[1] - recent[0] == stride:
        seeds = _key_batch(value, stride)
        if seeds is not None:
            keys = list(_key_maker(impl)(seeds))
            if not is_tracer(keys[0]):
                for seed, made in zip(seeds.tolist(), keys):
                    _keep_key((seed, impl, device, wide), made)
            return keys[0]
    key = jax.random.key(value)
    if not is_tracer(key):
        _keep_key(slot, key)
    return key


def _keep_key(slot: tuple[int, str, Any, bool], key: Any) -> None:
    _JAX_KEYS.pop(slot, None)  # (then last: the most recently made)
    _JAX_KEYS[slot] = key
    while len(_JAX_KEYS) > JAX_KEYS_KEPT:
        _JAX_KEYS.popitem(last=False)


def _key_batch(value: int, stride: int) -> np.ndarray | None:
    """The seeds ``value, value + stride, ...`` (JAX_KEY_BATCH of them) as JAX's integer
    type takes them, or ``None`` where the last does not fit it."""
    import jax

    wide = bool(jax.config.jax_enable_x64)  # type: ignore[attr-defined]
    last = value + stride * (JAX_KEY_BATCH - 1)
    if last >= (2**63 if wide else 2**31):
        return None
    return np.arange(value, last + 1, stride, dtype=np.int64 if wide else np.int32)


@functools.lru_cache(maxsize=8)
def _key_maker(impl: str) -> Callable[[Any], Any]:
    """``jax.random.key`` of each seed of a vector, compiled (one program per batch)."""
    import jax

    return jax.jit(jax.vmap(functools.partial(jax.random.key, impl=impl)))


#: ``seed=None`` under JAX: keys of fresh entropy, split a batch at a time off a key of the
#: operating system's entropy (:func:`_fresh_jax_key`).
FRESH_KEY_BATCH = 64
_FRESH_KEYS: dict[tuple[str, Any], list[Any]] = {}


def _fresh_jax_key() -> Any:
    """A key no earlier call got, for ``seed=None`` (fresh entropy) under JAX.

    Making a key eagerly takes 35 us, and a NumPy integer seed sends a compiled estimate
    through JAX's Python dispatch (30 us), next to 250 us for the product of an n = 512
    estimate; so keys are split 64 at a time (260 us) off one key from the operating
    system's entropy, per PRNG implementation and default device, and handed out one by
    one. A forked child starts a pool of its own (it would otherwise repeat its parent's
    keys); keys made inside a trace are used there and never kept."""
    import jax

    config = jax.config
    slot = (str(config.jax_default_prng_impl), config.jax_default_device)  # type: ignore[attr-defined]
    pool = _FRESH_KEYS.get(slot)
    if not pool:
        base = jax.random.key(int(np.random.default_rng().integers(0, 2**31 - 1)))
        keys = jax.random.split(base, FRESH_KEY_BATCH)
        if is_tracer(keys):
            return keys[0]
        pool = _FRESH_KEYS[slot] = list(keys)
    return pool.pop()


if hasattr(os, "register_at_fork"):  # (not on Windows, which does not fork)
    os.register_at_fork(after_in_child=_FRESH_KEYS.clear)


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
    """A JAX program's seed argument and whether it is a key: a key as it is; an int as
    its key ``jax.random.key(seed)``, made once per seed (:func:`_jax_key`); ``None``
    (fresh entropy) as a fresh key (:func:`_fresh_jax_key`); a NumPy generator (its next
    draw) as a NumPy integer that :func:`jax_key_of` turns into ``jax.random.key(seed)``
    inside the program, as :func:`make_random_source` would outside it.

    A NumPy integer argument takes JAX's Python dispatch path (the compiled call's
    C++ path takes JAX arrays): passing the kept key instead cut 30 us from an estimate
    at n = 512, an eighth of its product."""
    if type(seed) is int and 0 <= seed < _JAX_SEED_LIMIT:  # (the common case, first)
        return _jax_key(seed), True
    if isinstance(seed, bool):
        raise TypeError("seed must be an int, None or a generator, got a bool")
    if isinstance(seed, (int, np.integer)):
        if seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed}")
        return _jax_key(fold_seed(int(seed), 63)), True
    elif seed is None:
        return _fresh_jax_key(), True
    elif isinstance(seed, np.random.Generator):
        value = int(seed.integers(0, 2**31 - 1))
    elif array_api_compat.is_jax_array(seed):
        if _is_integer_jax_seed(seed):  # (a jit argument, a vmapped seed): its key inside
            return seed, False
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


#: Integer seeds a JAX key takes as they are (larger ones are folded: :func:`fold_seed`).
_JAX_SEED_LIMIT = 2**63


def _is_integer_jax_seed(seed: Any) -> bool:
    """Whether a JAX array is an integer seed, a 0-d array of an integer dtype (taken as
    ``jax.random.key(seed)``, as a Python int is), rather than a key (typed, or the raw
    uint32 pair of ``jax.random.PRNGKey``); other arrays are refused."""
    import jax

    if jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return False
    if seed.ndim == 0 and jax.numpy.issubdtype(seed.dtype, jax.numpy.integer):
        return True
    if seed.ndim >= 1 and seed.dtype == jax.numpy.uint32:
        return False  # raw key data
    raise TypeError(
        "a JAX seed must be a key (jax.random.key), raw key data (jax.random.PRNGKey) or "
        f"a 0-d integer array, got an array of shape {tuple(seed.shape)} and dtype {seed.dtype}"
    )


def jax_key_of(seed: Any) -> Any:
    """``jax.random.key(seed)`` of an integer (traced) seed."""
    import jax

    return jax.random.key(seed)


def _is_native_generator(xp: Any, seed: Any) -> bool:
    if array_api_compat.is_torch_namespace(xp):
        import torch

        return isinstance(seed, torch.Generator)
    if array_api_compat.is_jax_namespace(xp):
        return array_api_compat.is_jax_array(seed)
    if array_api_compat.is_cupy_namespace(xp):
        import cupy

        return isinstance(seed, cupy.random.Generator)
    return False
