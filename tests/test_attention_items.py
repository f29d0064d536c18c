"""Attention of single items: ``vs.attention(vs.tensor(q), vs.tensor(k), vs.tensor(v))``
for one sequence, and ``jax.vmap`` over a batch (which hands each call single items)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vsla_jax as vs
from vsla_jax.attention import BACKENDS
from vsla_jax.errors import ShapeError

from .test_attention import np_attention


def _data(n: int, m: int, h: int = 2, d: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, h, d)).astype(np.float32)
    k = rng.standard_normal((m, h, d)).astype(np.float32)
    v = rng.standard_normal((m, h, d)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("backend", ("auto",) + BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_one_sequence_matches_the_loop_reference(backend, causal):
    q, k, v = _data(5, 7)
    out = vs.attention(vs.tensor(q), vs.tensor(k), vs.tensor(v), causal=causal,
                       backend=backend)
    assert out.batch_shape == ()
    want = np_attention(q, k, v, causal, 1 / np.sqrt(4))
    np.testing.assert_allclose(out.to_numpy(), want, rtol=1e-5, atol=1e-6)


def test_one_sequence_gradient_matches_the_batched_one():
    q, k, v = _data(6, 6)
    f_item = lambda x: (vs.attention(vs.tensor(x), vs.tensor(x), vs.tensor(x)).data ** 2).sum()
    f_batch = lambda x: (vs.attention(*(vs.stack([x], rank=1),) * 3).data ** 2).sum()
    g_item = jax.jit(jax.grad(f_item))(jnp.asarray(q))
    g_batch = jax.grad(f_batch)(jnp.asarray(q))
    np.testing.assert_allclose(g_item, g_batch, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ("auto", "xla", "bucketed", "tiled"))
def test_vmap_over_a_batch_is_the_batched_call(backend):
    q, _, _ = _data(9, 9, seed=1)
    batch = vs.stack([q, q[:3], q[:0], q[:1]], rank=1)
    mapped = jax.vmap(lambda x: vs.attention(x, x, x, causal=True, backend=backend).data)
    got = np.asarray(jax.jit(mapped)(batch))
    want = vs.attention(batch, batch, batch, causal=True, backend=backend).data
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-6)
    for i, n in enumerate((9, 3, 0, 1)):
        np.testing.assert_allclose(got[i, :n], np_attention(q[:n], q[:n], q[:n], True, 0.5),
                                   rtol=1e-5, atol=1e-6)
        assert not got[i, n:].any()


def test_batches_and_items_do_not_mix():
    q, _, _ = _data(3, 3)
    batch = vs.stack([q], rank=1)
    with pytest.raises(ShapeError, match="all be batches or all be single items"):
        vs.attention(vs.tensor(q), batch, batch)


def test_small_default_calls_take_the_cached_kernel_path_with_the_same_result(monkeypatch):
    from vsla_jax.attention import api

    rng = np.random.default_rng(2)
    items = [rng.standard_normal((n, 2, 8)).astype(np.float32) for n in (3, 1, 6)]
    calls = []
    for q in (vs.stack(items, rank=1), vs.stack(items)):  # rank 1, and every axis variable
        want = vs.attention(q, q, q, causal=True, config=api.AttentionConfig()).data
        monkeypatch.setattr(api, "check_layouts", lambda *a: calls.append(a))
        got = vs.attention(q, q, q, causal=True).data
        monkeypatch.undo()
        assert calls == []  # the per-tensor layout and the per-signature plan were enough
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    bad = vs.stack([items[0], rng.standard_normal((2, 3, 8)).astype(np.float32)])
    with pytest.raises(ShapeError, match="ragged trailing axes"):  # still the full path's
        vs.attention(bad, bad, bad)
    q = vs.stack(items, rank=1)
    k = vs.stack(items[:2], rank=1)
    with pytest.raises(ShapeError, match="batch shapes differ"):
        vs.attention(q, k, k)


@pytest.mark.parametrize("rank", [1, 3])
def test_the_cached_kernel_path_equals_the_full_path_on_every_default_variant(rank):
    """GQA, a value head size of its own, cross lengths, half dtypes, causal and scale:
    the cached path (every setting at its default) and the full path (a config given)
    agree to the bit, in values, dtype, shape, lengths and rank."""
    import jax.numpy as jnp

    from vsla_jax.attention import api

    rng = np.random.default_rng(rank)

    def batch(lens, heads, dim, dtype):
        xs = [rng.standard_normal((n, heads, dim)).astype(dtype) for n in lens]
        return vs.stack(xs, rank=1) if rank == 1 else vs.stack(xs)

    for dtype in (np.float32, jnp.bfloat16, np.float16):
        for heads, kv_heads in ((4, 4), (6, 3)):
            q = batch([3, 1, 6], heads, 8, dtype)
            k, v = batch([5, 2, 4], kv_heads, 8, dtype), batch([5, 2, 4], kv_heads, 16, dtype)
            for causal, scale in ((False, None), (True, 0.3)):
                got = vs.attention(q, k, v, causal=causal, scale=scale)
                want = vs.attention(q, k, v, causal=causal, scale=scale,
                                    config=api.AttentionConfig())
                assert (got.data.dtype, got.data.shape, got.rank) == (
                    want.data.dtype, want.data.shape, want.rank)
                np.testing.assert_array_equal(np.asarray(got.data, np.float32),
                                              np.asarray(want.data, np.float32))
                np.testing.assert_array_equal(np.asarray(got.lengths),
                                              np.asarray(want.lengths))
