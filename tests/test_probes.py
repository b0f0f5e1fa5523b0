"""Probe blocks: shape, library, dtype, device, and the moment E[z z^H] = I."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import numpy_of

import linop_trace as lt
from linop_trace._backend import array_namespace


@pytest.mark.parametrize("probe", [lt.rademacher, lt.gaussian, lt.sphere])
@pytest.mark.parametrize("dtype", ["float32", "float64", "complex128"])
def test_probe_blocks_follow_the_operator(backend, probe, dtype):
    A = lt.aslinearoperator(backend.matrix(np.eye(6, dtype=dtype)))
    Z = probe(A, 4, seed=0)
    assert tuple(Z.shape) == (6, 4)
    assert Z.dtype == A.dtype
    assert array_namespace(Z) is A.xp


def test_rademacher_entries_and_steinhaus_modulus(backend):
    Z = numpy_of(lt.rademacher(backend.matrix(np.eye(8)), 50, seed=1))
    assert set(np.unique(Z)) == {-1.0, 1.0}
    W = numpy_of(lt.rademacher(backend.matrix(np.eye(8, dtype=complex)), 50, seed=1))
    np.testing.assert_allclose(np.abs(W), 1.0, rtol=1e-12)
    np.testing.assert_allclose(
        np.abs(numpy_of(lt.steinhaus(backend.matrix(np.eye(8, dtype=complex)), 5, seed=0))),
        1.0,
        rtol=1e-12,
    )


def test_sphere_probes_have_norm_sqrt_n(backend):
    Z = numpy_of(lt.sphere(backend.matrix(np.eye(16)), 7, seed=2))
    np.testing.assert_allclose(np.linalg.norm(Z, axis=0), 4.0, rtol=1e-12)
    Z = numpy_of(lt.sphere(backend.matrix(np.eye(16, dtype=complex)), 7, seed=2))
    assert np.iscomplexobj(Z)
    np.testing.assert_allclose(np.linalg.norm(Z, axis=0), 4.0, rtol=1e-12)


@pytest.mark.parametrize(
    ("kind", "dtype"),
    [
        ("rademacher", float),
        ("gaussian", float),
        ("sphere", float),
        ("steinhaus", complex),
        ("rademacher", complex),  # unit-modulus on complex operators
        ("gaussian", complex),
        ("sphere", complex),
    ],
)
def test_second_moment_is_identity(kind, dtype):
    """Mean of z z^H over k probes: each entry has standard error <= sqrt(E|z_i z_j|^2 / k).
    E|z_i|^2|z_j|^2 <= 3 for all these distributions (real Gaussian diagonal: E g^4 = 3;
    complex Gaussian: E|g|^4 = 2), so with k = 40,000 every entry lies within
    6 * sqrt(3 / k) = 0.052 of the identity. For complex probes the pseudo-moment
    mean of z z^T has the same standard errors and expectation 0 (circular symmetry)."""
    n, k = 5, 40_000
    sampler = lt._probes.ProbeSampler(
        kind, n, array_namespace(np.ones(1)), np.dtype(dtype), "cpu", 11
    )
    Z = sampler(k)
    assert Z.dtype == np.dtype(dtype)
    moment = Z @ Z.conj().T / k
    assert np.abs(moment - np.eye(n)).max() < 6 * np.sqrt(3 / k)
    if dtype is complex:
        assert np.abs(Z @ Z.T / k).max() < 6 * np.sqrt(3 / k)
        if kind == "rademacher":
            np.testing.assert_allclose(np.abs(Z), 1.0, rtol=1e-12)
        if kind == "sphere":
            np.testing.assert_allclose(np.linalg.norm(Z, axis=0), np.sqrt(n), rtol=1e-12)


@pytest.mark.parametrize("probe", [lt.rademacher, lt.gaussian])
def test_probe_entries_are_uncorrelated_on_every_backend(backend, probe):
    """torch and JAX unpack Rademacher signs from random bits and draw float64 Gaussians
    in float32: a slip in either shows as a bias or a correlation between entries a few
    places apart in the flattened block (bits of one word). Each entry and each product
    z_a z_b (a != b) has variance 1, so means over N values have standard error
    1/sqrt(N); 6 of those bound every one of them. n * k = 20,993 is not a multiple of the
    32- or 8-bit words, so the last partial word is in the test too."""
    n, k = 7, 2999
    Z = numpy_of(probe(backend.matrix(np.eye(n)), k, seed=5)).reshape(-1)
    N = Z.size
    assert abs(Z.mean()) < 6 / np.sqrt(N)
    assert abs((Z**2).mean() - 1) < 6 * np.sqrt(2 / N)  # Var z^2 <= 2 (Gaussian)
    for lag in range(1, 65):
        products = Z[:-lag] * Z[lag:]
        assert abs(products.mean()) < 6 / np.sqrt(products.size), lag


@pytest.mark.parametrize("probe", [lt.rademacher, lt.gaussian])
def test_same_seed_same_probes_in_float32_and_float64(backend, probe):
    """One seed gives one probe block, whatever the operator's precision (to float32
    rounding): float64 Gaussians are float32 draws widened in torch and JAX, float64
    draws narrowed for float32 in NumPy."""
    Z64 = numpy_of(probe(backend.matrix(np.eye(9)), 4, seed=3))
    Z32 = numpy_of(probe(backend.matrix(np.eye(9, dtype=np.float32)), 4, seed=3))
    assert Z64.dtype == np.float64 and Z32.dtype == np.float32
    np.testing.assert_array_equal(Z64.astype(np.float32), Z32)


def test_steinhaus_needs_complex_operator():
    with pytest.raises(ValueError, match="need a complex operator"):
        lt.steinhaus(np.eye(3), 2)


@pytest.mark.parametrize("shape", [(200, 20), (1001, 7), (5, 3)])
def test_torch_small_rademacher_blocks_are_the_unpacked_bytes(shape, monkeypatch):
    """On torch's CPU a small Rademacher block looks its random bytes up in a table of
    signs, a large one unpacks them with shifts and masks: the same signs, bit for bit,
    so the block's columns do not depend on which way it was drawn."""
    torch = pytest.importorskip("torch")
    from linop_trace import _backend
    from linop_trace._backend import _random

    def draw() -> np.ndarray:
        source = _backend.make_random_source(torch, torch.device("cpu"), 3)
        block = source.rademacher(shape, torch.float64)
        assert block.is_contiguous() and tuple(block.shape) == shape
        return block.numpy()

    looked_up = draw()
    monkeypatch.setattr(_random, "SIGN_TABLE_ENTRIES", 0)
    unpacked = draw()
    assert np.array_equal(looked_up, unpacked)
    assert set(np.unique(looked_up)) == {-1.0, 1.0}


def test_jax_threefry_written_out_gives_jax_threefry_words():
    """The draws' Threefry-2x32, written out so that its rounds fuse (JAX lowers its own to
    a rolled loop on the CPU), gives the words of ``jax.extend.random.threefry_2x32`` over
    the counters 0..count-1: odd and even counts, keys with high bits set, compiled; and
    a Rademacher draw's columns are the bits of their keys' words."""
    pytest.importorskip("jax")
    import jax
    import jax.extend.random
    import jax.numpy as jnp

    from linop_trace._backend import _random

    written_out = jax.jit(_random.threefry_2x32, static_argnums=2)
    rng = np.random.default_rng(5)
    for count in (1, 2, 3, 16, 511, 512, 4001):
        for _ in range(3):
            k0, k1 = (jnp.uint32(word) for word in rng.integers(0, 2**32, size=2))
            counters = jnp.arange(count, dtype=jnp.uint32)
            expected = jax.extend.random.threefry_2x32((k0, k1), counters)
            np.testing.assert_array_equal(
                np.asarray(written_out(k0, k1, count)), np.asarray(expected)
            )
    # a Rademacher column j: bit i % 32 of word i // 32 of column j's key fold_in(key, j)
    # (the words and the keys each made once, in a pass of their own: ``kept``)
    key = jax.random.key(2**40 + 9)
    drawn, signs = _random._jax_programs()["rademacher"](key, None, (100, 7), jnp.float64)
    for j in range(7):
        pair = jax.random.key_data(jax.random.fold_in(key, j))
        words = np.asarray(
            jax.extend.random.threefry_2x32((pair[0], pair[1]), jnp.arange(4, dtype=jnp.uint32))
        )
        bits = (words[np.arange(100) // 32] >> (np.arange(100) % 32).astype(np.uint32)) & 1
        np.testing.assert_array_equal(np.asarray(signs)[:, j], 2.0 * bits - 1)


def test_jax_gaussian_columns_are_standard_normal_from_both_words_of_each_hash():
    """JAX's Gaussian column j comes from the words threefry2x32(fold_in(key, j)) gives
    for the counters 0..n-1, both words of each hash kept (half the hashes of
    ``jax.random.bits``, which XORs them): a float32 uniform on (-1, 1) from 23 bits,
    sqrt(2) erfinv. Over N = 200,000 entries the mean lies within 6 sqrt(1 / N) = 0.013
    of 0, the variance within 6 sqrt(2 / N) = 0.019 of 1, the fourth moment within
    6 sqrt(96 / N) = 0.13 of 3 (Var g^4 = E g^8 - 9 = 96), and the Kolmogorov-Smirnov
    distance to N(0, 1) below 1.63 / sqrt(N) (its 1% point); columns drawn in two blocks
    are those of one."""
    pytest.importorskip("jax")
    import jax
    import jax.extend.random
    import jax.numpy as jnp
    from scipy import stats

    from linop_trace._backend import _random

    jax.config.update("jax_enable_x64", True)
    normal = _random._jax_programs()["normal"]
    key = jax.random.key(11)
    drawn, Z = normal(key, None, (4000, 50), jnp.float64)
    Z = np.asarray(Z)
    x = Z.ravel()
    N = x.size
    assert abs(x.mean()) < 6 * np.sqrt(1 / N)
    assert abs(x.var() - 1) < 6 * np.sqrt(2 / N)
    assert abs((x**4).mean() - 3) < 6 * np.sqrt(96 / N)
    assert stats.kstest(x, "norm").statistic < 1.63 / np.sqrt(N)
    _, first = normal(key, None, (4000, 20), jnp.float64)
    _, rest = normal(key, jnp.asarray(20, jnp.uint32), (4000, 30), jnp.float64)
    np.testing.assert_array_equal(np.hstack([np.asarray(first), np.asarray(rest)]), Z)
    pair = jax.random.key_data(jax.random.fold_in(key, 3))
    words = np.asarray(
        jax.extend.random.threefry_2x32((pair[0], pair[1]), jnp.arange(4000, dtype=jnp.uint32))
    )
    unit = (words >> 9 | np.uint32(0x3F800000)).view(np.float32) - np.float32(1)
    low = np.nextafter(np.float32(-1), np.float32(0))
    inside = np.maximum(low, unit * (np.float32(1) - low) + low)
    expected = np.float32(np.sqrt(2)) * np.asarray(jax.lax.erf_inv(jnp.asarray(inside)))
    np.testing.assert_allclose(Z[:, 3], expected.astype(np.float64), rtol=1e-6, atol=1e-6)
