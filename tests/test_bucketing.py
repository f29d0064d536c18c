import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import vsla_jax as vs


@given(st.lists(st.integers(0, 300), min_size=1, max_size=30), st.integers(0, 1000))
def test_bucketize_round_trip_and_storage(lengths, seed):
    rng = np.random.default_rng(seed)
    items = [rng.standard_normal(n).astype(np.float32) for n in lengths]
    rb = vs.bucketize(items)
    back = rb.to_list()
    for a, b in zip(items, back):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(rb.lengths()[:, 0], lengths)
    policy = vs.CapacityPolicy()
    for b, idx in zip(rb.buckets, rb.index):
        real = np.asarray(idx) >= 0
        lens = np.asarray(b.lengths)[real, 0]
        assert all(policy.bucket(n) == b.capacity[0] for n in lens)
        assert b.batch_shape[0] == vs.COUNT_POLICY.bucket(int(real.sum()))
    assert rb.logical_elements() == sum(lengths)
    # a sequence of its items, in the original order
    assert len(rb) == len(items)
    for i in (0, len(items) - 1, -1, -len(items)):
        np.testing.assert_array_equal(rb[i], items[i])
    for a, b in zip(items, rb, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bucketize_map_conv():
    items = [np.ones(n, np.float32) for n in [3, 50, 4]]
    k = vs.tensor([1.0, 1.0])
    out = vs.bucketize(items).map(lambda x: vs.conv(x, k)).to_list()
    assert [o.shape for o in out] == [(4,), (51,), (5,)]
    np.testing.assert_array_equal(out[0], [1, 2, 2, 1])


def test_ragged_batch_indexing_errors():
    rb = vs.bucketize([np.ones(n, np.float32) for n in [3, 50, 4]])
    for bad in (3, -4):
        with pytest.raises(IndexError, match="out of range"):
            rb[bad]
    for bad in (slice(0, 2), 1.0, True, [0, 1]):
        with pytest.raises(TypeError, match="integers"):
            rb[bad]
    assert len(vs.bucketize([])) == 0 and list(vs.bucketize([])) == []
