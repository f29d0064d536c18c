"""Every op against an independent NumPy reference, over ragged batches of rank 1-3."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import vsla_jax as vs
from tests import reference as ref
from tests.strategies import SMALL_POLICY, make_batch, make_items, ragged_pair


def assert_zero_slack(x: vs.VarTensor):
    data = np.asarray(x.data)
    mask = np.asarray(x.mask()).reshape(data.shape[: x.batch_ndim + x.rank] + (1,) * len(
        x.features))
    assert np.all(np.where(mask, 0, data) == 0), "slack is not zero"


def assert_items_close(x: vs.VarTensor, expected, rtol=1e-5, atol=1e-5):
    got = x.to_list()
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape, (g.shape, e.shape)
        np.testing.assert_allclose(g, e, rtol=rtol, atol=atol)
    assert_zero_slack(x)


# -- DESIGN.md examples -----------------------------------------------------------------
def test_design_examples():
    t = vs.tensor
    np.testing.assert_array_equal((t([1, 2, 3]) + t([4, 5])).to_numpy(), [5, 7, 3])
    np.testing.assert_array_equal(vs.hadamard(t([2, 3]), t([4, 5, 6])).to_numpy(), [8, 15, 0])
    np.testing.assert_array_equal((t([1, 2]) * t([3, 4])).to_numpy(), [3, 10, 8])
    kb = t([1, 2], model="B") * t([3, 4], model="B")
    np.testing.assert_array_equal(kb.to_numpy(), [3, 4, 6, 8])
    d = t([5, 3, 2]) - t([2, 1, 2])
    np.testing.assert_array_equal(d.to_numpy(), [3, 2, 0])
    np.testing.assert_array_equal(vs.shrink(d).to_numpy(), [3, 2])
    assert vs.stack([]).batch_shape == (0,)


def _pair(sa, sb, rank, feat, exact, seed, model="A"):
    ia = make_items(sa, feat, seed)
    ib = make_items(sb, feat, seed + 1)
    return ia, ib, make_batch(ia, rank, exact, model), make_batch(ib, rank, exact, model)


@given(ragged_pair())
@pytest.mark.parametrize(
    "op,npop", [(vs.add, np.add), (vs.sub, np.subtract), (vs.hadamard, np.multiply)]
)
def test_ambient_ops(op, npop, case):
    sa, sb, rank, feat, exact, seed = case
    ia, ib, a, b = _pair(sa, sb, rank, feat, exact, seed)
    out = op(a, b)
    assert_items_close(out, [ref.ambient(x, y, rank, npop) for x, y in zip(ia, ib)])


@given(ragged_pair(), st.integers(0, 2**31 - 1))
def test_hadamard_of_non_finite_items_is_zero_where_one_operand_has_no_entry(case, salt):
    """inf/nan in one operand never reach positions the other operand lacks (docs:
    entries present in one operand only are 0), in values or gradients."""
    sa, sb, rank, feat, exact, seed = case
    rng = np.random.default_rng(salt)
    ia, ib = (make_items(s, feat, seed + k) for k, s in enumerate((sa, sb)))
    for x in ia + ib:
        x[rng.random(x.shape) < 0.3] = rng.choice([np.inf, -np.inf, np.nan])
    a, b = make_batch(ia, rank, exact, "A"), make_batch(ib, rank, exact, "A")
    with np.errstate(invalid="ignore"):
        want = [ref.hadamard_nd(x, y, rank) for x, y in zip(ia, ib)]
    got = vs.hadamard(a, b).to_list()
    for g, e in zip(got, want):
        np.testing.assert_array_equal(g, e)


@given(ragged_pair(same_k=False))
@pytest.mark.parametrize("method", ["direct", "fft"])
def test_conv_matches_loop_reference(method, case):
    sa, sb, rank, feat, exact, seed = case
    ia, ib, a, b = _pair(sa, sb, rank, feat, exact, seed)
    if b.batch_shape[0] == 1 and a.batch_shape[0] > 1:
        b = b[0]  # one kernel broadcast over the batch
        ib = ib * len(ia)
    out = vs.conv(a, b, method=method)
    assert_items_close(out, [ref.conv_nd(x, y, rank) for x, y in zip(ia, ib)], 1e-4, 1e-4)


@given(ragged_pair(max_rank=2, max_len=4))
def test_kron_matches_numpy(case):
    sa, sb, rank, feat, exact, seed = case
    ia, ib, a, b = _pair(sa, sb, rank, feat, exact, seed, model="B")
    out = a * b
    assert out.model == "B"
    assert_items_close(out, [ref.kron_nd(x, y, rank) for x, y in zip(ia, ib)])


@given(ragged_pair(), st.floats(-3, 3, allow_nan=False))
def test_scale_and_neg(case, s):
    sa, _, rank, feat, exact, seed = case
    ia = make_items(sa, feat, seed)
    a = make_batch(ia, rank, exact)
    assert_items_close(vs.scale(a, s), [np.float32(s) * x for x in ia])
    assert_items_close(s * a, [np.float32(s) * x for x in ia])
    assert_items_close(-a, [-x for x in ia])


@given(ragged_pair())
def test_reductions(case):
    sa, _, rank, feat, exact, seed = case
    ia = make_items(sa, feat, seed)
    a = make_batch(ia, rank, exact)
    axes = tuple(range(rank))
    np.testing.assert_allclose(
        vs.sum(a), np.stack([x.sum(axis=axes) for x in ia]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        vs.norm(a), np.stack([np.sqrt((x**2).sum(axis=axes)) for x in ia]), rtol=1e-5, atol=1e-5)
    means = [x.mean(axis=axes) if x.size else np.zeros(x.shape[rank:]) for x in ia]
    np.testing.assert_allclose(vs.mean(a), np.stack(means), rtol=1e-5, atol=1e-5)


@given(ragged_pair())
def test_shrink_matches_reference(case):
    sa, _, rank, feat, exact, seed = case
    # integer values with many zeros so that trailing zero hyperplanes are common
    ia = [np.where(np.abs(x) > 1, x, 0) for x in make_items(sa, feat, seed, True)]
    a = make_batch(ia, rank, exact)
    s = vs.shrink(a)
    assert s.capacity == a.capacity
    assert_items_close(s, [ref.shrink(x, rank) for x in ia])


def test_batch_shapes_broadcast_2d():
    rng = np.random.default_rng(1)
    items = [rng.standard_normal((n,)).astype(np.float32) for n in [3, 0, 5, 2]]
    a = make_batch(items, 1)
    a2 = vs.VarTensor(a.data.reshape(2, 2, -1), a.lengths.reshape(2, 2, 1))
    k = vs.tensor([1.0, -2.0, 0.5], policy=SMALL_POLICY)
    out = vs.conv(a2, k)
    assert out.batch_shape == (2, 2)
    got = out.to_list()
    flat = [got[0][0], got[0][1], got[1][0], got[1][1]]
    for g, x in zip(flat, items):
        np.testing.assert_allclose(g, ref.conv_nd(x, np.array([1, -2, 0.5]), 1), atol=1e-5)
    s = vs.add(a2, a2[0])  # (2,2) + (2,) broadcast over the first batch axis
    np.testing.assert_allclose(s.to_list()[1][0], ref.ambient(items[2], items[0], 1, np.add))
