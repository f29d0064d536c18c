"""The calls a new user writes first: constructors on tracers, batches as Python
sequences, and clear errors for the bad inputs found by trying the library."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vsla_jax as vs


def test_batch_len_iteration_and_index_errors():
    xs = [np.arange(n, dtype=np.float32) for n in (2, 5, 1, 4)]
    batch = vs.stack(xs)
    assert len(batch) == 4
    items = list(batch)  # terminates: out-of-range indices raise IndexError
    assert len(items) == 4
    for item, x in zip(items, xs):
        np.testing.assert_array_equal(item.to_numpy(), x)
    windows = [w for w in vs.window(xs, 3)]  # the natural loop over windows ends
    assert len(windows) == 2 and windows[1].lengths.tolist() == [1, 4]
    one = vs.stack([np.ones(3, np.float32)])
    with pytest.raises(IndexError, match="out of range"):
        one[5]
    with pytest.raises(IndexError):
        one[-2]
    np.testing.assert_array_equal(batch[-1].to_numpy(), xs[-1])
    with pytest.raises(IndexError):
        batch[np.array([0, 9])]
    with pytest.raises(TypeError, match="unbatched"):
        len(vs.tensor([1.0, 2.0]))
    nested = vs.stack([np.ones((2, 3)), np.ones((1, 1))])
    assert [item.lengths.tolist() for item in nested] == [[2, 3], [1, 1]]


def test_constructors_on_tracers_under_jit_grad_and_vmap():
    x = jnp.arange(1.0, 4.0)
    eager = vs.tensor(x)
    traced = jax.jit(lambda x: vs.tensor(x))(x)
    chex.assert_trees_all_equal(traced, eager)  # same capacity, data and lengths
    # grad through stack of traced items, with a dense feature axis
    g = jax.grad(lambda a: vs.sum(vs.stack([a, 2 * a[:1]], rank=1)).sum())(jnp.ones((3, 2)))
    np.testing.assert_array_equal(g, [[3.0, 3.0], [1.0, 1.0], [1.0, 1.0]])
    # vmap: every example is one item of its static shape
    norms = jax.vmap(lambda row: vs.norm(vs.tensor(row)))(jnp.ones((5, 4)))
    np.testing.assert_allclose(norms, np.full(5, 2.0))
    # from_padded on traced data and lengths
    d = jnp.ones((2, 4))
    y = jax.jit(lambda d, n: vs.from_padded(d, n, rank=1).data)(d, jnp.array([1, 3]))
    np.testing.assert_array_equal(y, [[1, 0, 0, 0], [1, 1, 1, 0]])
    # stacking VarTensors with traced data keeps their lengths
    a = vs.stack([np.ones(2, np.float32), np.ones(5, np.float32)])
    s = jax.jit(lambda d: vs.stack([vs.VarTensor(d, a.lengths)[0], vs.tensor(d[1])]).lengths)(
        a.data)
    assert s.tolist() == [[2], [a.capacity[0]]]


def test_scalars_and_bad_ranks_raise_typed_errors():
    with pytest.raises(vs.ShapeError, match="scalar"):
        vs.tensor(3.0)
    with pytest.raises(vs.ShapeError, match="scalar"):
        vs.stack([1.0, 2.0])
    with pytest.raises(vs.ShapeError, match="rank must be a positive integer"):
        vs.tensor([1.0, 2.0], rank=-1)
    with pytest.raises(vs.ShapeError, match="rank must be a positive integer"):
        vs.stack([[1.0]], rank=0)
    with pytest.raises(vs.ShapeError, match="has 1 axes, expected rank 2"):
        vs.tensor([1.0, 2.0], rank=2)
    x = vs.stack([[1.0, 2.0], [3.0]])
    with pytest.raises(vs.VSLATypeError, match="width"):
        x.to_padded(2.5)
    with pytest.raises(vs.LengthError, match="non-negative"):
        x.to_padded(-1)


def test_direct_vartensor_construction_validates_concrete_lengths():
    data = np.zeros((2, 8), np.float32)
    with pytest.raises(vs.LengthError, match="exceed capacity"):
        vs.VarTensor(data, [[9], [3]])
    with pytest.raises(vs.LengthError, match="negative"):
        vs.VarTensor(data, [[1], [-3]])
    with pytest.raises(vs.ShapeError, match="batch shape"):
        vs.VarTensor(data, [[1], [2], [3]])
    with pytest.raises(vs.VSLATypeError, match="integers"):
        vs.VarTensor(data, [[1.5], [2.0]])
    ok = vs.VarTensor(data, [[8], [0]])
    assert ok.lengths.dtype == jnp.int32 and [t.shape for t in ok.to_list()] == [(8,), (0,)]
    # traced lengths are trusted, and JAX's own unflattening never re-validates
    jax.jit(lambda d, n: vs.VarTensor(d, n).data)(jnp.asarray(data), jnp.array([[1], [2]]))
    leaves, tree = jax.tree_util.tree_flatten(ok)
    assert jax.tree_util.tree_unflatten(tree, leaves).model == "A"
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(ok)[0]]
    assert paths == [".data", ".lengths"]


def test_from_padded_needs_rank_when_ambiguous():
    with pytest.raises(vs.ShapeError, match="ambiguous"):
        vs.from_padded(np.ones((2, 4)), [1, 2])
    batch = vs.from_padded(np.ones((2, 4)), [1, 2], rank=1)
    assert batch.batch_shape == (2,) and batch.lengths.tolist() == [[1], [2]]
    one = vs.from_padded(np.ones((3, 4)), [1, 2])
    assert one.batch_shape == () and one.rank == 2  # data.shape[0] != 2: not a batch
    single = vs.from_padded(np.ones((1, 4)), [3], rank=1)
    assert single.batch_shape == (1,)


def test_operands_must_be_vartensors_and_say_how():
    t = vs.tensor([1.0, 2.0])
    with pytest.raises(vs.VSLATypeError, match=r"vs.stack"):
        vs.add(t, np.ones(2))
    with pytest.raises(vs.VSLATypeError, match="Scalars are not VSLA operands"):
        t - 1
    np.testing.assert_array_equal((t * 2).to_numpy(), [2.0, 4.0])  # scale stays
