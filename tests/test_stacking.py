"""stack / window / pyramid / merge_batch against a NumPy zero-padded stack reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

import vsla_jax as vs
from tests.strategies import SMALL_POLICY, item_shapes, make_items


def np_stack(items, rank):
    """VSLA stack: shape (k, max n_1, ...), zero-extended."""
    if not items:
        return np.zeros((0,) * (rank + 1))
    shape = [max(it.shape[a] for it in items) for a in range(rank)]
    out = np.zeros((len(items), *shape))
    for i, it in enumerate(items):
        out[(i, *(slice(0, n) for n in it.shape))] = it
    return out


@given(st.integers(1, 2), st.integers(0, 9), st.integers(1, 4),
       st.sampled_from(["flush", "discard"]), st.data())
def test_window_matches_reference(rank, k, w, partial, data):
    items = make_items(data.draw(item_shapes(rank, k, 4)), seed=k)
    out = vs.window(vs.stack(items, policy=SMALL_POLICY, rank=rank), w, partial=partial)
    n_windows = -(-k // w) if partial == "flush" else k // w
    assert out.batch_shape == (n_windows,) and out.rank == rank + 1
    data, mask = np.asarray(out.data), np.asarray(out.mask())
    assert np.all(data[~mask] == 0), "window output has nonzero slack"
    got = out.to_list()
    for j in range(n_windows):
        np.testing.assert_allclose(got[j], np_stack(items[j * w : (j + 1) * w], rank))


def test_window_examples():
    out = vs.window([[1.0], [2.0, 3.0], [4.0]], 2)
    a, b = out.to_list()
    np.testing.assert_array_equal(a, [[1, 0], [2, 3]])
    np.testing.assert_array_equal(b, [[4]])
    assert vs.window([[1.0], [2.0, 3.0], [4.0]], 2, partial="discard").batch_shape == (1,)
    with pytest.raises(ValueError, match="partial"):
        vs.window([[1.0]], 2, partial="keep")
    with pytest.raises(ValueError, match="window size"):
        vs.window([[1.0]], 0)


def test_pyramid_levels():
    items = [np.arange(n, dtype=np.float32) + 1 for n in [1, 2, 3, 4, 5, 6, 7, 8]]
    levels = vs.pyramid(items, levels=2, w=2)
    assert [lv.rank for lv in levels] == [2, 3]
    assert levels[0].batch_shape == (4,) and levels[1].batch_shape == (2,)
    top = levels[1].to_list()[0]
    shape = [2, 2, 4]
    ref = np.zeros(shape)
    ref[0, :, :2] = np_stack(items[0:2], 1)
    ref[1, :, :4] = np_stack(items[2:4], 1)
    np.testing.assert_array_equal(top, ref)
    assert vs.pyramid(items[:3], levels=2, w=2, partial="discard")[1].batch_shape == (0,)


def test_merge_batch():
    items = [np.ones((2, 1)), np.ones((1, 3))]
    m = vs.merge_batch(vs.stack(items))
    np.testing.assert_array_equal(m.to_numpy(), np_stack(items, 2))
    assert m.to_numpy().shape == (2, 2, 3)
    assert vs.merge_batch(vs.stack([])).to_numpy().shape == (0, 0)


def test_window_and_merge_gradients():
    x = vs.stack([[1.0, 2.0], [3.0], [4.0, 5.0, 6.0]])

    def f(d):
        t = vs.VarTensor(d, x.lengths)
        return vs.norm(vs.window(t, 2)) + vs.sum(vs.merge_batch(t))

    check_grads(f, (x.data,), order=1, modes=["rev"], eps=1e-2, atol=1e-2, rtol=1e-2)
    g = jax.grad(lambda d: jnp.sum(f(d)))(x.data)
    assert np.all(np.asarray(g)[~np.asarray(x.mask())] == 0)
