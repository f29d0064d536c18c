"""Constructors, conversions, pytree behaviour and bad-input errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vsla_jax as vs


def test_tensor_metadata_and_round_trip():
    x = vs.tensor([[1, 2, 3], [4, 5, 6]])
    assert x.rank == 2 and x.batch_shape == () and x.capacity == (8, 8)
    assert x.lengths.dtype == jnp.int32 and x.dtype == jnp.float32
    np.testing.assert_array_equal(x.to_numpy(), [[1, 2, 3], [4, 5, 6]])


def test_features_axes():
    tokens = np.arange(12, dtype=np.float32).reshape(3, 4)  # 3 tokens of width 4
    x = vs.tensor(tokens, rank=1)
    assert x.rank == 1 and x.features == (4,) and x.capacity == (8,)
    np.testing.assert_array_equal(x.to_numpy(), tokens)


def test_stack_to_list_and_padded():
    x = vs.stack([[1.0, 2.0, 3.0], [], [4.0]])
    assert x.batch_shape == (3,)
    got = x.to_list()
    assert [g.shape for g in got] == [(3,), (0,), (1,)]
    np.testing.assert_array_equal(x.to_padded(), [[1, 2, 3], [0, 0, 0], [4, 0, 0]])
    assert x.to_padded(5).shape == (3, 5)
    with pytest.raises(vs.LengthError, match="crop"):
        x.to_padded(2)


def test_from_padded_zeroes_slack_and_validates():
    data = np.ones((2, 4), np.float32)
    x = vs.from_padded(data, [2, 3], rank=1)
    np.testing.assert_array_equal(np.asarray(x.data), [[1, 1, 0, 0], [1, 1, 1, 0]])
    with pytest.raises(vs.LengthError, match="negative"):
        vs.from_padded(data, [-1, 3], rank=1)
    with pytest.raises(vs.LengthError, match="exceed capacity"):
        vs.from_padded(data, [2, 5], rank=1)
    with pytest.raises(vs.ShapeError, match="batch shape"):
        vs.from_padded(data, [[2], [3], [1]])
    with pytest.raises(vs.VSLATypeError, match="integers"):
        vs.from_padded(data, [2.0, 3.0], rank=1)
    with pytest.raises(vs.ShapeError, match="fewer than"):
        vs.from_padded(np.ones(4), [[2, 2]])


def test_bad_input_errors():
    with pytest.raises(vs.ShapeError, match="ragged ranks"):
        vs.stack([[1, 2], [[1, 2]]])
    with pytest.raises(vs.ShapeError, match="ragged"):
        vs.tensor([[1, 2], [3]])
    with pytest.raises(vs.VSLATypeError, match="numeric"):
        vs.tensor(["a", "b"])
    with pytest.raises(vs.ShapeError, match="ranks differ"):
        vs.tensor([1.0]) + vs.tensor([[1.0]])
    with pytest.raises(vs.ModelMismatchError, match="models"):
        vs.tensor([1.0]) * vs.tensor([1.0], model="B")
    with pytest.raises(vs.ModelMismatchError, match="model must be"):
        vs.tensor([1.0], model="C")
    with pytest.raises(vs.ShapeError, match="do not broadcast"):
        vs.stack([[1.0], [2.0]]) + vs.stack([[1.0], [2.0], [3.0]])
    with pytest.raises(vs.ShapeError, match="feature"):
        vs.tensor(np.ones((2, 3)), rank=1) + vs.tensor(np.ones((2, 4)), rank=1)
    with pytest.raises(vs.VSLATypeError, match="VarTensor"):
        vs.add(vs.tensor([1.0]), np.ones(3))
    # errors are also the standard Python types
    assert issubclass(vs.LengthError, ValueError) and issubclass(vs.VSLATypeError, TypeError)


def test_pytree_jit_vmap_grad():
    x = vs.stack([[1.0, 2.0], [3.0]])
    leaves, tree = jax.tree_util.tree_flatten(x)
    assert len(leaves) == 2
    y = jax.tree_util.tree_unflatten(tree, leaves)
    assert y.model == x.model
    f = jax.jit(lambda t: vs.sum(t * t))
    np.testing.assert_allclose(f(x), [9, 9])  # sum(x conv x) = sum(x)**2
    per_item = jax.vmap(lambda t: vs.sum(t))(x)
    np.testing.assert_allclose(per_item, [3, 3])
    # lengths are integer leaves: differentiate with allow_int (their cotangent is float0)
    g = jax.grad(lambda t: jnp.sum(vs.sum(t * t)), allow_int=True)(x)
    assert isinstance(g, vs.VarTensor)
    np.testing.assert_allclose(np.asarray(g.data)[:, :3], [[6, 6, 0], [6, 0, 0]])


def test_dlpack_zero_copy_round_trip():
    x = vs.stack([[1.0, 2.0, 3.0], [4.0]])
    data, lengths = x.to_dlpack()
    arr = np.from_dlpack(data)
    np.testing.assert_array_equal(arr, np.asarray(x.data))
    y = vs.from_dlpack(arr, np.from_dlpack(lengths), trust_zero_slack=True)
    assert [a.tolist() for a in y.to_list()] == [[1, 2, 3], [4]]
    # a writable, 64-byte-aligned producer (XLA's CPU alignment) is wrapped without a copy
    buf = np.zeros(2 * 16 * 4 + 64, np.uint8)
    off = (-buf.ctypes.data) % 64
    src = buf[off : off + 2 * 16 * 4].view(np.float32).reshape(2, 16)
    src[0, :3] = [1, 2, 3]
    w = vs.from_dlpack(src, np.array([3, 1]), rank=1, trust_zero_slack=True)
    assert w.data.unsafe_buffer_pointer() == src.ctypes.data
    # a non-trusted wrap zeroes garbage in the slack
    dirty = np.asarray(x.data).copy()
    dirty[1, 5] = 99
    z = vs.from_dlpack(dirty, np.asarray(x.lengths))
    assert float(np.asarray(z.data)[1, 5]) == 0.0


def test_getitem_and_repr():
    x = vs.stack([[1.0], [2.0, 3.0]])
    assert x[1].to_numpy().tolist() == [2, 3]
    assert "capacity=(8,)" in repr(x)
    with pytest.raises(vs.ShapeError):
        x[0][0]
    assert dataclasses.is_dataclass(x)


def test_from_dlpack_strided_input_falls_back_to_a_copy():
    base = np.arange(36, dtype=np.float32).reshape(4, 9)
    x = vs.from_dlpack(base[:, 1:], np.full(4, 3, np.int32), rank=1)
    np.testing.assert_array_equal(x.to_list()[2], [19, 20, 21])
    assert float(np.asarray(x.data)[0, 5]) == 0.0  # slack zeroed


def test_bucketize_with_feature_axes():
    items = [np.ones((n, 3), np.float32) * n for n in [2, 30, 5]]
    rb = vs.bucketize(items, rank=1)
    assert all(b.features == (3,) and b.rank == 1 for b in rb.buckets)
    for a, b in zip(items, rb.to_list()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(vs.ShapeError, match="feature shape"):
        vs.bucketize([np.ones((2, 3)), np.ones((2, 4))], rank=1)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (1,), (5, 7), (4, 3, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int8, np.complex64])
def test_aligned_zeros(shape, dtype):
    from vsla_jax.util import HOST_ALIGN, aligned_zeros

    a = aligned_zeros(shape, dtype)
    assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous
    assert a.size == 0 or a.ctypes.data % HOST_ALIGN == 0
    assert not a.any()
    a[...] = 1  # writable


def test_stack_device_data_matches_items_and_is_not_aliased_to_inputs():
    xs = [np.arange(n, dtype=np.float32) + 1 for n in (3, 0, 5, 1)]
    b = vs.stack(xs)
    xs[0][:] = -7  # the batch owns its data: later writes to the items do not show
    got = np.asarray(b.data)
    assert got.shape[0] == 4 and got.shape[1] >= 5
    for i, n in enumerate((3, 0, 5, 1)):
        np.testing.assert_array_equal(got[i, :n], np.arange(n, dtype=np.float32) + 1)
        assert not got[i, n:].any()


def test_host_lengths_read_once_read_only_and_none_when_traced():
    items = [np.ones((3, 2)), np.ones((5, 2)), np.ones((1, 2))]
    for x in (vs.stack(items), vs.stack(items, rank=1),
              vs.VarTensor(jnp.zeros((2, 4)), jnp.array([[1], [4]], jnp.int32))):
        host = x.host_lengths
        np.testing.assert_array_equal(host, np.asarray(x.lengths))
        assert host is x.host_lengths  # kept on the (immutable) tensor
        assert not host.flags.writeable
        with pytest.raises(ValueError):
            host[0, 0] = 7
        # a tree-mapped copy (new lengths) reads its own lengths, not the old copy
        y = jax.tree.map(lambda a: a + 1 if a.dtype == jnp.int32 else a, x)
        np.testing.assert_array_equal(y.host_lengths, host + 1)
    seen = []
    jax.jit(lambda x: seen.append(x.host_lengths) or x.data)(vs.stack(items))
    assert seen == [None]
    # NumPy lengths handed to trusted are copied, not frozen under their owner
    mine = np.array([[2], [3]], np.int32)
    host = vs.VarTensor.trusted(jnp.zeros((2, 4)), mine).host_lengths
    assert host is not mine and mine.flags.writeable and not host.flags.writeable


@pytest.mark.parametrize("bad", [
    (vs.stack([np.ones(3)]), vs.stack([np.ones((2, 2))])),          # ranks differ
    (vs.stack([np.ones(3)] * 2), vs.stack([np.ones(3)] * 3)),       # batches
    (vs.stack([np.ones((3, 2))], rank=1), vs.stack([np.ones((3, 4))], rank=1)),  # features
])
def test_check_pair_shape_errors_raise_each_call(bad):
    # the shape rules are cached per signature; an error must be raised every time
    for _ in range(2):
        with pytest.raises(vs.ShapeError):
            vs.conv(*bad)
