"""The convolution engine behind ``vs.conv``: plans, methods, routing, calibration.

Every plan (padded, bucketed, blocked) and method is checked against NumPy/SciPy on
the natural call ``vs.conv(vs.stack(xs), vs.stack(ks))``.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
from hypothesis import given, settings
from hypothesis import strategies as st

import vsla_jax as vs
from tests.events import count_compiles
from tests.reference import assert_items_match, convolve_items
from vsla_jax.conv import bucketed, cost, engine
from vsla_jax.conv.kernels import fast_fft_length

STATIC = vs.ConvPolicy(calibrate=False)
PLANS = ["padded", "bucketed", "blocked", "auto"]


def policy(plan="auto", **kw):
    return vs.ConvPolicy(plan=plan, calibrate=False, **kw)


def _check_items(out, xs, ks, rtol=1e-4, atol=1e-4):
    assert_items_match(out.to_list(), convolve_items(xs, ks), rtol, atol)


def _lognormal_batch(rng, n, med_a, max_a, med_b, max_b):
    la = np.clip(rng.lognormal(np.log(med_a), 1.0, n), 0, max_a).astype(int)
    lb = np.clip(rng.lognormal(np.log(med_b), 1.0, n), 0, max_b).astype(int)
    xs = [rng.standard_normal(m).astype(np.float32) for m in la]
    ks = [rng.standard_normal(m).astype(np.float32) for m in lb]
    return xs, ks


def test_profile_matches_numpy():
    lengths = [8, 15, 142, 7, 456]
    p = vs.heterogeneity_profile(lengths, policy=STATIC)
    assert p.n == 5
    assert p.max_min_ratio == pytest.approx(456 / 7)
    assert p.max_median_ratio == pytest.approx(456 / 15)
    assert p.mean_var_ratio == pytest.approx(np.mean(lengths) / np.var(lengths))
    assert p.n_buckets == len({vs.CapacityPolicy().bucket(n) for n in lengths})
    assert not p.prefer_direct  # 65 < 100
    extreme = vs.heterogeneity_profile([2, 3, 1000, 5, 2000], [3, 64, 16, 8, 32], policy=STATIC)
    assert extreme.prefer_direct and extreme.max_min_ratio == 1000
    with pytest.raises(vs.ShapeError):
        vs.heterogeneity_profile([])


def test_policy_thresholds_are_configurable():
    strict = vs.ConvPolicy(calibrate=False, direct_max_min_ratio=10, bucketing_min_buckets=2)
    p = vs.heterogeneity_profile([8, 15, 142, 7, 456], policy=strict)
    assert p.prefer_direct and p.needs_bucketing


def _smooth(m):
    for q in (2, 3, 5, 7):
        while m % q == 0:
            m //= q
    return m == 1


@given(st.integers(1, 5000))
def test_fast_fft_length(n):
    m = fast_fft_length(n)
    assert m >= n and _smooth(m)
    assert not any(_smooth(k) for k in range(n, m))  # the smallest such length


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("method", ["auto", "direct", "fft"])
def test_natural_call_matches_numpy_on_every_plan(plan, method):
    rng = np.random.default_rng(0)
    xs, ks = _lognormal_batch(rng, 24, 150, 900, 15, 120)
    xs[0], ks[1] = xs[0][:0], ks[1][:0]  # empty signal, empty kernel
    xs[2], ks[2] = xs[2][:1], ks[2][:1]  # single elements
    xs[3], ks[3] = ks[3][:9], xs[3][:400]  # kernel longer than the signal
    a, k = vs.stack(xs), vs.stack(ks)
    out = vs.conv(a, k, method=method, policy=policy(plan))
    assert isinstance(out, vs.VarTensor) and out.capacity == (a.capacity[0] + k.capacity[0] - 1,)
    _check_items(out, xs, ks)
    assert np.all(np.asarray(out.data)[~np.asarray(out.mask())] == 0)  # zero slack


@settings(max_examples=8, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 70), st.integers(0, 70)), min_size=1, max_size=10),
       st.sampled_from(["padded", "bucketed", "blocked"]), st.sampled_from(["direct", "fft"]),
       st.integers(0, 2**16))
def test_edge_lengths_match_numpy(pairs, plan, method, seed):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal(a).astype(np.float32) for a, _ in pairs]
    ks = [rng.standard_normal(b).astype(np.float32) for _, b in pairs]
    _check_items(vs.conv(vs.stack(xs), vs.stack(ks), method=method, policy=policy(plan)),
                 xs, ks)


@pytest.mark.parametrize("plan", ["padded", "bucketed", "blocked"])
def test_shared_kernel_broadcasts(plan):
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal(n).astype(np.float32) for n in [3, 300, 1, 40]]
    k = rng.standard_normal(7).astype(np.float32)
    out = vs.conv(vs.stack(xs), vs.tensor(k), policy=policy(plan))
    _check_items(out, xs, [k] * 4)


@pytest.mark.parametrize("plan", ["padded", "bucketed"])
def test_rank2_and_feature_axes(plan):
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((n, m)) for n, m in [(3, 4), (20, 2), (1, 1)]]
    k = rng.standard_normal((2, 3))
    for method in ["direct", "fft"]:
        out = vs.conv(vs.stack(xs), vs.tensor(k), method=method, policy=policy(plan)).to_list()
        for o, x in zip(out, xs):
            np.testing.assert_allclose(o, scipy.signal.convolve(x, k), rtol=1e-4, atol=1e-4)
    feats = [rng.standard_normal((n, 3)).astype(np.float32) for n in [5, 50, 9]]
    kf = [rng.standard_normal((m, 3)).astype(np.float32) for m in [2, 4, 30]]
    out = vs.conv(vs.stack(feats, rank=1), vs.stack(kf, rank=1), policy=policy(plan)).to_list()
    for o, x, kk in zip(out, feats, kf):
        ref = np.stack([np.convolve(x[:, c], kk[:, c]) for c in range(3)], axis=1)
        np.testing.assert_allclose(o, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(vs.ShapeError, match="rank-1 items without feature"):
        vs.conv(vs.stack(feats, rank=1), vs.stack(kf, rank=1), policy=policy("blocked"))


def _tol_ok(x, y, atol, rtol):
    """Normwise bound: |x - y| <= atol + rtol * max(max|x|, max|y|) (FFT error is normwise)."""
    scale = max(np.abs(x).max(initial=0), np.abs(y).max(initial=0))
    return np.abs(x - y).max(initial=0) <= atol + rtol * scale


SIZE_GRID = [(1, 1), (7, 3), (64, 64), (300, 17), (1000, 250), (2048, 256)]


@pytest.mark.parametrize("n,m", SIZE_GRID)
def test_fft_vs_direct_error_bounds(n, m):
    rng = np.random.default_rng(n * 7 + m)
    x, k = rng.standard_normal((4, n)), rng.standard_normal((4, m))
    a32, b32 = vs.stack(list(x.astype(np.float32))), vs.stack(list(k.astype(np.float32)))
    d = np.asarray(vs.conv(a32, b32, method="direct").data)
    f = np.asarray(vs.conv(a32, b32, method="fft").data)
    assert _tol_ok(d, f, 1e-6, 1e-4)
    with jax.enable_x64(True):
        a64 = vs.VarTensor(jnp.asarray(np.pad(x, [(0, 0), (0, a32.capacity[0] - n)])),
                           a32.lengths)
        b64 = vs.VarTensor(jnp.asarray(np.pad(k, [(0, 0), (0, b32.capacity[0] - m)])),
                           b32.lengths)
        d64 = np.asarray(vs.conv(a64, b64, method="direct").data)
        f64 = np.asarray(vs.conv(a64, b64, method="fft").data)
    assert d64.dtype == np.float64
    assert _tol_ok(d64, f64, 1e-12, 1e-9)
    ref = np.stack([np.convolve(x[i], k[i]) for i in range(4)])
    assert _tol_ok(d64[:, : n + m - 1], ref, 1e-12, 1e-9)


def test_accumulate_f64():
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal(n).astype(np.float32) for n in [100, 2000]]
    k = rng.standard_normal(50).astype(np.float32)
    pol = vs.ConvPolicy(calibrate=False, accumulate_f64=True)
    with pytest.raises(vs.VSLATypeError, match="x64"):
        vs.conv(vs.stack(xs), vs.tensor(k), policy=pol)
    with jax.enable_x64(True):
        out = vs.conv(vs.stack(xs), vs.tensor(k), method="fft", policy=pol)
    assert out.dtype == jnp.float32
    for o, x in zip(out.to_list(), xs):
        ref = np.convolve(x.astype(np.float64), k.astype(np.float64))
        np.testing.assert_allclose(o, ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("plan", ["padded", "bucketed", "blocked"])
def test_gradients_agree_with_the_padded_reference(plan):
    x = vs.stack([np.arange(1, n + 1, dtype=np.float32) for n in [5, 300, 2, 40]])
    k = vs.stack([np.linspace(-1, 1, n, dtype=np.float32) for n in [3, 7, 1, 30]])
    w = np.random.default_rng(0).standard_normal((4, x.capacity[0] + k.capacity[0] - 1))

    def loss(plan, method):
        pol = policy(plan)
        return lambda dx, dk: jnp.sum(w * vs.conv(
            vs.VarTensor(dx, x.lengths), vs.VarTensor(dk, k.lengths), method, pol).data)

    ref = jax.grad(loss("padded", "direct"), argnums=(0, 1))(x.data, k.data)
    for method in ["direct", "fft"]:
        got = jax.grad(loss(plan, method), argnums=(0, 1))(x.data, k.data)
        for a, b in zip(got, ref):
            assert _tol_ok(np.asarray(a), np.asarray(b), 1e-5, 1e-4)
            assert np.all(np.asarray(a)[~np.asarray(x.mask() if a.shape == x.data.shape
                                                    else k.mask())] == 0)  # zero slack


@pytest.mark.parametrize("plan", ["bucketed", "blocked"])
def test_check_grads_f64(plan):
    from jax.test_util import check_grads

    with jax.enable_x64(True):
        rng = np.random.default_rng(6)
        x = vs.stack([rng.standard_normal(n) for n in [6, 1, 13]])
        k = vs.stack([rng.standard_normal(n) for n in [4, 3, 9]])
        f = lambda dx, dk: vs.conv(vs.VarTensor(dx, x.lengths), vs.VarTensor(dk, k.lengths),
                                   "direct", policy(plan)).data
        check_grads(f, (x.data, k.data), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_grad_through_tensor_constructors():
    """The natural gradient call: constructors on tracers, conv, sum."""
    x, b = jnp.array([1.0, 2.0, 3.0]), jnp.array([1.0, 2.0])
    g = jax.grad(lambda x: vs.sum(vs.conv(vs.tensor(x), vs.tensor(b))))(x)
    np.testing.assert_allclose(g, [3.0, 3.0, 3.0])  # d/dx_i sum(x * b) = sum(b)
    xs = [jnp.arange(n, dtype=jnp.float32) for n in (3, 5)]
    g = jax.grad(lambda xs: vs.sum(vs.conv(vs.stack(xs), vs.tensor(b))).sum())(xs)
    for gi, xi in zip(g, xs):
        np.testing.assert_allclose(gi, np.full(xi.shape, 3.0))


@pytest.mark.parametrize("plan", ["padded", "bucketed", "blocked"])
def test_non_finite_input_matches_numpy_exactly(plan):
    xs = [np.array([1.0, np.inf, 2.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32),
          np.array([3.0, np.nan, 1.0, 1.0, 1.0, 1.0], np.float32)]
    ks = [np.array([1.0, 0.0, 2.0], np.float32), np.array([np.inf], np.float32),
          np.array([1.0, 1.0], np.float32)]
    for method in ["auto", "direct"]:
        got = vs.conv(vs.stack(xs), vs.stack(ks), method, policy(plan)).to_list()
        with np.errstate(invalid="ignore"):
            for o, x, k in zip(got, xs, ks):
                np.testing.assert_array_equal(o, np.convolve(x, k))  # same inf/nan pattern
    # an explicit FFT spreads a non-finite value through its whole item (documented);
    # the blocked plan falls back to the exact direct kernel whatever the method
    fft = vs.conv(vs.stack(xs[:1]), vs.stack(ks[:1]), "fft", policy(plan)).to_list()[0]
    if plan == "blocked":
        np.testing.assert_array_equal(fft, np.convolve(xs[0], ks[0]))
    else:
        assert not np.isfinite(fft).any()


def test_traced_lengths_under_jit_run_the_padded_plan():
    rng = np.random.default_rng(3)
    xs, ks = _lognormal_batch(rng, 12, 50, 500, 8, 60)
    a, k = vs.stack(xs), vs.stack(ks)
    assert engine.choose_plan(a, k, policy=STATIC)[0] in ("padded", "bucketed", "blocked")
    out = jax.jit(lambda a, k: vs.conv(a, k))(a, k)
    _check_items(out, xs, ks)
    with pytest.raises(vs.ShapeError, match="concrete lengths"):
        jax.jit(lambda a, k: vs.conv(a, k, policy=policy("blocked")))(a, k)


def test_uniform_batch_prefers_padded_and_spread_batch_does_not():
    rng = np.random.default_rng(4)
    uni = vs.stack([rng.standard_normal(512).astype(np.float32) for _ in range(16)])
    ku = vs.stack([rng.standard_normal(64).astype(np.float32) for _ in range(16)])
    assert engine.choose_plan(uni, ku, policy=STATIC)[0] == "padded"
    xs, ks = _lognormal_batch(rng, 256, 100, 4000, 16, 300)
    choice, costs = engine.choose_plan(vs.stack(xs), vs.stack(ks), policy=STATIC)
    assert choice != "padded" and costs[choice] < costs["padded"]


def test_bucketed_planner_groups_by_bucket_and_sizes_fft_per_group():
    la = np.array([[8], [15], [142], [7], [456]])
    lb = np.array([[3], [3], [40], [3], [40]])
    groups = bucketed.plan_groups(la, lb, (456,), (40,), "fft", cost.STATIC_COST_MODEL,
                                  vs.CapacityPolicy(), vs.COUNT_POLICY, merge=False)
    pol = vs.CapacityPolicy()
    for g in groups:  # ladder capacities, never above the batch's own capacities
        for i in g.members:
            assert g.cap_a[0] == min(pol.bucket(la[i, 0]), 456)
            assert g.cap_b[0] == min(pol.bucket(lb[i, 0]), 40)
        assert g.slots == vs.COUNT_POLICY.bucket(len(g.members))
    small = [g for g in groups if 0 in g.members][0]
    # FFT length per group, never the batch-wide maximum (which needs >= 456 + 40 - 1)
    assert fast_fft_length(small.cap_a[0] + small.cap_b[0] - 1) < 64
    assert sorted(i for g in groups for i in g.members) == list(range(5))


def test_merge_groups_keeps_every_item_and_reduces_groups():
    rng = np.random.default_rng(7)
    la = np.exp(rng.uniform(np.log(8), np.log(2048), 128)).astype(int)[:, None]
    lb = np.exp(rng.uniform(np.log(4), np.log(256), 128)).astype(int)[:, None]
    args = ((2048,), (256,), "auto", cost.STATIC_COST_MODEL, vs.CapacityPolicy(),
            vs.COUNT_POLICY)
    plain = bucketed.plan_groups(la, lb, *args, merge=False)
    merged = bucketed.plan_groups(la, lb, *args, merge=True)
    assert len(merged) < len(plain)
    assert sorted(i for g in merged for i in g.members) == list(range(128))
    for g in merged:  # every member fits its group's capacities
        for i in g.members:
            assert la[i, 0] <= g.cap_a[0] and lb[i, 0] <= g.cap_b[0]


def test_bad_input():
    a = vs.stack([np.ones(3, np.float32)])
    with pytest.raises(ValueError, match="'auto'"):
        vs.conv(a, a, method="winograd")
    with pytest.raises(vs.VSLATypeError, match="floating"):
        vs.conv(vs.VarTensor(jnp.ones((4,), jnp.int32), jnp.array([3])),
                vs.VarTensor(jnp.ones((4,), jnp.int32), jnp.array([3])))
    with pytest.raises(vs.ModelMismatchError):
        vs.conv(vs.tensor([1.0]), vs.tensor([1.0], model="B"))
    with pytest.raises(vs.VSLATypeError, match=r"vs.tensor\(x\)"):
        vs.conv(vs.tensor([1.0]), np.ones(3))
    with pytest.raises(vs.VSLATypeError, match="traced JAX array"):
        jax.jit(lambda x: vs.conv(vs.tensor([1.0]), x))(jnp.ones(3))
    with pytest.raises(vs.VSLATypeError, match="Scalars"):
        vs.tensor([1.0]) - 1
    with pytest.raises(ValueError, match="plan"):
        vs.ConvPolicy(plan="fastest")


@pytest.mark.parametrize("bad,match", [
    ("padded", "policy must be a vs.ConvPolicy or None, got str"),
    (vs.CapacityPolicy(), "policy must be a vs.ConvPolicy or None, got CapacityPolicy"),
])
def test_conv_policy_argument_of_the_wrong_type_is_named(bad, match):
    a = vs.stack([np.ones(3, np.float32), np.ones(5, np.float32)])
    with pytest.raises(vs.VSLATypeError, match=match):
        vs.conv(a, a, policy=bad)


@pytest.mark.parametrize("fields,error,match", [
    (dict(capacity=8), vs.VSLATypeError, "capacity must be CapacityPolicy, got int"),
    (dict(count="x"), vs.VSLATypeError, "count must be CapacityPolicy or None, got str"),
    (dict(calibrate="no"), vs.VSLATypeError, "calibrate must be bool, got str"),
    (dict(cpu_kernels=1), vs.VSLATypeError, "cpu_kernels must be bool, got int"),
    (dict(cost="static"), vs.VSLATypeError, "cost must be CostModel or None"),
    (dict(bucketing_min_buckets=True), vs.VSLATypeError, "bucketing_min_buckets must be"),
    (dict(fft_min_efficiency=float("nan")), vs.PolicyError, "fft_min_efficiency must be"),
    (dict(direct_max_min_ratio=0), vs.PolicyError, "direct_max_min_ratio must be"),
    (dict(plan=["auto"]), vs.PolicyError, "plan must be one of"),
])
def test_conv_policy_fields_are_checked(fields, error, match):
    with pytest.raises(error, match=match):
        vs.ConvPolicy(**fields)
    assert vs.ConvPolicy(direct_max_min_ratio=np.float32(50), bucketing_min_buckets=np.int64(4))


def test_conv_exports_with_a_symbolic_batch_on_every_method():
    """jax.export of vs.conv with a symbolic item count, on the XLA engine too (the cost
    model's item count used to force the batch size to a constant)."""
    from jax import export
    (n,) = export.symbolic_shape("n")
    spec = vs.VarTensor(jax.ShapeDtypeStruct((n, 8), jnp.float32),
                        jax.ShapeDtypeStruct((n, 1), jnp.int32))
    x = vs.stack([np.arange(3.0, dtype=np.float32), np.arange(5.0, dtype=np.float32),
                  np.ones(8, np.float32)])
    want = [np.convolve(v, v) for v in x.to_list()]
    for kw in (dict(), dict(method="direct"), dict(method="fft"),
               dict(policy=vs.ConvPolicy(cpu_kernels=False))):
        exp = export.export(jax.jit(lambda a, kw=kw: vs.conv(a, a, **kw)))(spec)
        for got, w in zip(exp.call(x).to_list(), want):
            np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-4)


def test_calibration_is_explicit_cached_and_survives_corruption(tmp_path, monkeypatch):
    monkeypatch.setattr(cost, "CALIBRATION_SHAPES", {"direct": ((4, 32, 8), (4, 32, 16)),
                                                     "fft": ((4, 64), (4, 128)),
                                                     "copy": (256, 1024)})
    monkeypatch.setattr(cost, "CALIBRATION_ROUNDS", 2)
    cost.forget_calibrations()
    assert cost.calibrated_or_none(tmp_path) is None  # nothing measured or read yet
    m1 = vs.calibrate(cache_dir=tmp_path)
    assert m1.source.startswith("calibrated")
    assert m1.fft_overhead_s >= m1.direct_overhead_s > 0  # noise never favours FFT
    assert m1.choose((2,), (2,), 1) == "direct"
    (f,) = tmp_path.iterdir()
    assert f.name.startswith("conv_cost_")
    assert json.loads(f.read_text())["jax"] == jax.__version__
    assert vs.calibrate(cache_dir=tmp_path) is m1  # memoised: the file is read once
    cost.forget_calibrations()  # as in a new process: the file is read
    m2 = vs.calibrate(cache_dir=tmp_path)
    assert m2.source.startswith("cache") and m2.direct_s_per_mac == m1.direct_s_per_mac
    f.write_text("{not json")
    cost.forget_calibrations()
    assert vs.calibrate(cache_dir=tmp_path).source.startswith("calibrated")
    assert os.path.exists(f) and json.loads(f.read_text())  # rewritten atomically


def test_no_measurement_while_tracing(monkeypatch):
    cost.forget_calibrations()
    monkeypatch.delenv("VSLA_CACHE_DIR", raising=False)  # no file to read a fit from

    def boom(*a, **k):
        raise AssertionError("calibration ran while tracing")

    monkeypatch.setattr(cost, "measure", boom)
    a = vs.stack([np.ones(n, np.float32) for n in (3, 9)])
    # the XLA engine's calibration (the C++ kernels plan nothing)
    pol = vs.ConvPolicy(calibrate=True, cache_dir=None, cpu_kernels=False)
    jax.jit(lambda a: vs.conv(a, a, policy=pol))(a)  # traced lengths
    jax.jit(lambda d: vs.conv(vs.VarTensor(d, a.lengths), a, policy=pol).data)(a.data)
    with pytest.raises(AssertionError, match="calibration ran"):
        vs.conv(a, a, policy=pol)  # the first eager call calibrates lazily


def test_cost_model_prefers_fft_for_long_kernels():
    cm = cost.STATIC_COST_MODEL
    assert cm.choose((16,), (4,), 8) == "direct"
    assert cm.choose((2048,), (2048,), 64) == "fft"


def _count_compiles(fn):
    with count_compiles() as events:
        fn()
    return len(events)


def _stream(rng, n_batches):
    """Similar heterogeneous batches that share capacities (one long item in each)."""
    out = []
    for _ in range(n_batches):
        xs, ks = _lognormal_batch(rng, 64, 100, 1200, 10, 90)
        xs[0], ks[0] = rng.standard_normal(1500).astype(np.float32), np.ones(100, np.float32)
        out.append((vs.stack(xs), vs.stack(ks), xs, ks))
    return out


def test_layout_budget_bounds_compilations_of_auto():
    budget = engine.LayoutBudget(max_layouts=2)
    pol = vs.ConvPolicy(calibrate=False, layouts=budget, cpu_kernels=False)  # XLA engine
    batches = _stream(np.random.default_rng(12), 12)
    # warm the padded program of this capacity family
    vs.conv(batches[0][0], batches[0][1], policy=dataclasses.replace(pol, plan="padded"))

    def run():
        for a, k, _, _ in batches:
            jax.block_until_ready(vs.conv(a, k, policy=pol).data)

    assert _count_compiles(run) <= 2 * 3  # at most two new layouts (a few programs each)
    (layouts,) = budget.compiled.values()
    assert len(layouts) <= 2
    for a, k, xs, ks in batches[-2:]:
        _check_items(vs.conv(a, k, policy=pol), xs, ks)
    with pytest.raises(ValueError, match="max_layouts"):
        engine.LayoutBudget(-1)
