"""The rank-1 fused path of conv_ragged: vectorised plan, flat packing, device gather."""

import dataclasses

import jax
import numpy as np
import pytest

from vsla_jax import conv_engine as ce

NO_CAL = ce.ConvPolicy(calibrate=False)


def _check(out, xs, ks, tol=1e-4):
    for o, x, k in zip(out, xs, ks):
        expected = np.convolve(x, k) if len(x) and len(k) else np.zeros(0)
        assert o.shape == expected.shape
        np.testing.assert_allclose(o, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("method", ["auto", "direct", "fft"])
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_heterogeneous_matches_numpy(method, seed):
    rng = np.random.default_rng(seed)
    la = np.exp(rng.uniform(np.log(1), np.log(700), 60)).astype(int)
    lb = np.exp(rng.uniform(np.log(1), np.log(90), 60)).astype(int)
    la[:3], lb[3:5] = 0, 0  # empty signals and empty kernels
    xs = [rng.standard_normal(n).astype(np.float32) for n in la]
    ks = [rng.standard_normal(n).astype(np.float32) for n in lb]
    res = ce.conv_ragged(xs, ks, method=method, policy=NO_CAL, fuse=True)
    _check(res.to_list(), xs, ks)
    np.testing.assert_array_equal(res.lengths()[:, 0],
                                  [len(x) + len(k) - 1 if len(x) and len(k) else 0
                                   for x, k in zip(xs, ks)])


def test_fused_groups_use_tight_capacities_and_cover_every_item():
    rng = np.random.default_rng(3)
    la = np.resize([2, 3, 1000, 5, 2000], 40)
    lb = rng.integers(3, 65, 40)
    xs = [rng.standard_normal(n).astype(np.float32) for n in la]
    ks = [rng.standard_normal(n).astype(np.float32) for n in lb]
    pol = dataclasses.replace(NO_CAL, count=None)
    plans = ce._plan_flat(la, lb, "auto", pol, ce.STATIC_COST_MODEL)
    assert sorted(i for g in plans for i in g.members) == list(range(40))
    for g in plans:  # capacity = longest member, never a ladder rung above it
        assert g.cap_a[0] == max(la[i] for i in g.members)
        assert g.cap_b[0] == max(lb[i] for i in g.members)
        assert g.slots == len(g.members)
    res = ce.conv_ragged(xs, ks, policy=NO_CAL, fuse=True)
    assert max(b.capacity[0] for b in res.buckets) == 2000 + max(lb[4::5]) - 1
    _check(res.to_list(), xs, ks)


def test_merge_keys_matches_merge_groups():
    rng = np.random.default_rng(7)
    la = np.exp(rng.uniform(np.log(8), np.log(2048), 200)).astype(int)
    lb = np.exp(rng.uniform(np.log(4), np.log(256), 200)).astype(int)
    pol = dataclasses.replace(NO_CAL, count=None)
    cost = ce.CostModel(1.5e-5, 6e-11, 3.8e-5, 9.6e-11)
    caps_a, caps_b = pol.capacity.bucket_array(la), pol.capacity.bucket_array(lb)
    groups: dict = {}
    for i, (a, b) in enumerate(zip(caps_a.tolist(), caps_b.tolist())):
        groups.setdefault(((a,), (b,)), []).append(i)
    ref = ce._merge_groups(groups, pol, cost)
    keys = sorted(groups)
    gid = ce._merge_keys([k[0][0] for k in keys], [k[1][0] for k in keys],
                         [len(groups[k]) for k in keys], cost)
    got: dict = {}
    for k, g in zip(keys, gid.tolist()):
        got.setdefault(g, []).extend(groups[k])
    assert sorted(sorted(m) for m in got.values()) == sorted(ref.values())
    assert len(got) < len(keys)  # something was merged


def test_vector_costs_match_predict():
    cost = ce.CostModel(1.5e-5, 6e-11, 3.8e-5, 9.6e-11)
    a, b, n = np.array([1, 7, 300, 2000]), np.array([1, 64, 5, 256]), np.array([1, 3, 10, 2])
    d, f = ce._vector_costs(cost, a, b, n)
    for i in range(4):
        assert d[i] == pytest.approx(cost.predict("direct", (a[i],), (b[i],), n[i]))
        assert f[i] == pytest.approx(cost.predict("fft", (a[i],), (b[i],), n[i]))


def test_fused_mixed_dtypes_and_jax_items():
    rng = np.random.default_rng(5)
    xs = [rng.integers(-3, 4, n) for n in [4, 17, 1]]
    xs.append(jax.numpy.asarray(rng.standard_normal(9), jax.numpy.float32))
    ks = [rng.standard_normal(n) for n in [2, 5, 3, 1]]
    out = ce.conv_ragged(xs, ks, policy=NO_CAL, fuse=True).to_list()
    _check(out, [np.asarray(x, np.float64) for x in xs], ks)
