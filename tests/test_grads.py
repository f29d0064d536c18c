"""Gradients: finite differences (check_grads, f64), explicit VJP references, zero slack."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import vsla_jax as vs
from tests import reference as ref
from tests.strategies import make_batch, make_items

SHAPES_A = {1: [(3,), (0,), (5,)], 2: [(2, 3), (3, 1), (0, 2)]}
SHAPES_B = {1: [(2,), (4,), (1,)], 2: [(1, 2), (2, 2), (2, 1)]}

BINARY = {
    "add": vs.add, "sub": vs.sub, "hadamard": vs.hadamard, "kron": vs.kron,
    "conv_direct": lambda a, b: vs.conv(a, b, method="direct"),
    "conv_fft": lambda a, b: vs.conv(a, b, method="fft"),
}
UNARY = {
    "neg": vs.neg, "scale": lambda x: vs.scale(x, 1.7), "shrink": vs.shrink,
}
REDUCE = {"sum": vs.sum, "norm": vs.norm, "mean": vs.mean}


def _batches(rank, model="A"):
    ia = [x.astype(np.float64) for x in make_items(SHAPES_A[rank], seed=rank)]
    ib = [x.astype(np.float64) for x in make_items(SHAPES_B[rank], seed=rank + 10)]
    with jax.enable_x64(True):
        a = make_batch(ia, rank, model=model)
        b = make_batch(ib, rank, model=model)
        a = vs.VarTensor(a.data.astype(jnp.float64), a.lengths, model)
        b = vs.VarTensor(b.data.astype(jnp.float64), b.lengths, model)
    return ia, ib, a, b


def _slack_is_zero(x: vs.VarTensor, g):
    m = np.asarray(x.mask())
    assert np.all(np.asarray(g)[~m] == 0), "gradient has nonzero slack"


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_grads(name, rank):
    op = BINARY[name]
    model = "B" if name == "kron" else "A"
    _, _, a, b = _batches(rank, model)
    with jax.enable_x64(True):
        f = lambda da, db: op(
            vs.VarTensor(da, a.lengths, model), vs.VarTensor(db, b.lengths, model)
        ).data
        check_grads(f, (a.data, b.data), order=1, modes=["rev", "fwd"], atol=1e-6, rtol=1e-6)
        w = jnp.asarray(np.random.default_rng(0).standard_normal(f(a.data, b.data).shape))
        ga, gb = jax.grad(lambda da, db: jnp.sum(w * f(da, db)), argnums=(0, 1))(a.data, b.data)
    _slack_is_zero(a, ga)
    _slack_is_zero(b, gb)


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("name", sorted(UNARY) + sorted(REDUCE))
def test_unary_grads(name, rank):
    op = {**UNARY, **REDUCE}[name]
    _, _, a, _ = _batches(rank)
    with jax.enable_x64(True):
        def f(da):
            out = op(vs.VarTensor(da, a.lengths))
            return out.data if isinstance(out, vs.VarTensor) else out

        check_grads(f, (a.data,), order=1, modes=["rev", "fwd"], atol=1e-6, rtol=1e-6)
        g = jax.grad(lambda d: jnp.sum(jnp.sin(f(d))))(a.data)
    _slack_is_zero(a, g)


@pytest.mark.parametrize("method", ["direct", "fft"])
def test_conv_vjp_is_correlation(method):
    """d/da sum(w * (a conv b)) = full correlation of w with b, restricted to a's extent."""
    ia, ib, a, b = _batches(1)
    with jax.enable_x64(True):
        out = vs.conv(a, b, method=method)
        w = np.random.default_rng(3).standard_normal(out.data.shape)
        ga = jax.grad(lambda d: jnp.sum(
            w * vs.conv(vs.VarTensor(d, a.lengths), b, method=method).data))(a.data)
    for i, (x, y) in enumerate(zip(ia, ib)):
        n, m = len(x), len(y)
        if n == 0:
            assert np.all(np.asarray(ga[i]) == 0)
            continue
        wi = w[i, : n + m - 1]
        expected = np.array([sum(wi[p + q] * y[q] for q in range(m)) for p in range(n)])
        np.testing.assert_allclose(np.asarray(ga[i, :n]), expected, rtol=1e-9, atol=1e-12)


def test_add_vjp_restricts_to_extent():
    a = vs.stack([[1.0, 2.0]])
    b = vs.stack([[1.0, 2.0, 3.0, 4.0]])
    g = jax.grad(lambda d: jnp.sum(vs.add(vs.VarTensor(d, a.lengths), b).data))(a.data)
    np.testing.assert_array_equal(np.asarray(g)[0, :4], [1, 1, 0, 0])
    assert ref is not None
