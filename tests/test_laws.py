"""Algebraic laws of the two VSLA semirings, checked on random ragged tensors."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import vsla_jax as vs
from tests.strategies import SMALL_POLICY, item_shapes, make_items


@st.composite
def triple(draw, max_rank=2, max_len=4):
    rank = draw(st.integers(1, max_rank))
    shapes = draw(item_shapes(rank, 3, max_len))
    seed = draw(st.integers(0, 2**16))
    return shapes, seed


def _t(arr, model="A"):
    return vs.tensor(arr, model=model, policy=SMALL_POLICY)


def same(x: vs.VarTensor, y: vs.VarTensor, tol=1e-4):
    """Equal as VSLA elements: equal after removing trailing zeros (minimal representative)."""
    p, q = vs.shrink(x).to_numpy(), vs.shrink(y).to_numpy()
    assert p.shape == q.shape, (p.shape, q.shape)
    np.testing.assert_allclose(p, q, rtol=tol, atol=tol)


def exact_same(x, y, tol=1e-4):
    p, q = x.to_numpy(), y.to_numpy()
    assert p.shape == q.shape
    np.testing.assert_allclose(p, q, rtol=tol, atol=tol)


@given(triple())
def test_addition_laws(case):
    shapes, seed = case
    a, b, c = (_t(x) for x in make_items(shapes, seed=seed))
    exact_same(a + b, b + a)
    exact_same((a + b) + c, a + (b + c))
    empty = _t(np.zeros((0,) * a.rank, np.float32))
    exact_same(a + empty, a)


@given(triple())
def test_conv_laws(case):
    shapes, seed = case
    a, b, c = (_t(x) for x in make_items(shapes, seed=seed))
    exact_same(a * b, b * a)
    exact_same((a * b) * c, a * (b * c))
    same(a * (b + c), a * b + a * c)
    one = _t(np.ones((1,) * a.rank, np.float32))
    exact_same(a * one, a)
    empty = _t(np.zeros((0,) * a.rank, np.float32))
    assert (a * empty).to_numpy().size == 0  # the empty tensor annihilates


@given(triple(max_len=3))
def test_kron_laws(case):
    shapes, seed = case
    a, b, c = (_t(x, "B") for x in make_items(shapes, seed=seed))
    exact_same((a * b) * c, a * (b * c))
    one = _t(np.ones((1,) * a.rank, np.float32), "B")
    exact_same(a * one, a)
    exact_same(one * a, a)


def test_kron_not_commutative():
    a, b = _t([1.0, 2.0], "B"), _t([3.0, 4.0], "B")
    assert not np.array_equal((a * b).to_numpy(), (b * a).to_numpy())


@given(triple())
def test_shrink_idempotent(case):
    shapes, seed = case
    x = make_items(shapes, seed=seed, integer_valued=True)[0]
    t = vs.shrink(_t(np.where(np.abs(x) > 1, x, 0)))
    np.testing.assert_array_equal(np.asarray(vs.shrink(t).lengths), np.asarray(t.lengths))
