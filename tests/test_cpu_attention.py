"""The ``cpu`` attention backend (C++ kernels of csrc/attention.cc) against NumPy and the
``xla`` backend: values, gradients, jit with traced lengths, threads, bad input and the
fallback when the kernels cannot run."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import vsla_jax as vs
from vsla_jax import kernels
from vsla_jax.attention.cpu import CPUBackend, cpu_attention

pytestmark = pytest.mark.skipif(kernels.target("vsla_attention_fwd") is None,
                                reason="vsla_jax.cpu_kernels not built")


def numpy_attention(q, k, v, lq, lk, causal: bool, scale: float) -> np.ndarray:
    """q ``[B, Cq, H, D]``, k ``[B, Ck, Hkv, D]``, v ``[B, Ck, Hkv, Dv]`` -> ``[B, Cq, H,
    Dv]`` in float64, item by item over the valid rows only."""
    b, cq, h, _ = q.shape
    g = h // k.shape[2]
    out = np.zeros((b, cq, h, v.shape[-1]))
    for i in range(b):
        if lq[i] == 0 or lk[i] == 0:
            continue
        kk = np.repeat(k[i, :lk[i]], g, axis=1).astype(np.float64)
        vv = np.repeat(v[i, :lk[i]], g, axis=1).astype(np.float64)
        s = np.einsum("qhd,khd->hqk", q[i, :lq[i]].astype(np.float64), kk) * scale
        if causal:
            allowed = np.arange(lk[i])[None, :] <= np.arange(lq[i])[:, None]
            s = np.where(allowed[None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[i, :lq[i]] = np.einsum("hqk,khd->qhd", p, vv)
    return out


def batch(rng, lengths, cap, heads, dim, dtype=np.float32) -> vs.VarTensor:
    """A VarTensor ``[B, cap, heads, dim]`` with random data (garbage in the padding)."""
    data = rng.standard_normal((len(lengths), cap, heads, dim)).astype(dtype)
    return vs.VarTensor(jnp.asarray(data), jnp.asarray(np.asarray(lengths)[:, None], jnp.int32))


def qkv(rng, lq, lk, cq, ck, h=4, hkv=2, d=8, dv=8, dtype=np.float32):
    q = batch(rng, lq, cq, h, d, dtype)
    k = batch(rng, lk, ck, hkv, d, dtype)
    v = vs.VarTensor(batch(rng, lk, ck, hkv, dv, dtype).data, k.lengths)
    return q, k, v


def check_forward(q, k, v, causal, tol):
    scale = 1 / np.sqrt(q.features[1])
    out = vs.attention(q, k, v, causal=causal, backend=CPUBackend())
    lq, lk = np.asarray(q.lengths[:, 0]), np.asarray(k.lengths[:, 0])
    ref = numpy_attention(*(np.asarray(x.data) for x in (q, k, v)), lq, lk, causal, scale)
    np.testing.assert_allclose(np.asarray(out.data), ref, atol=tol, rtol=tol)
    xla = vs.attention(q, k, v, causal=causal, backend="xla")
    np.testing.assert_allclose(np.asarray(out.data), np.asarray(xla.data), atol=tol, rtol=tol)


lengths = st.integers(1, 4).flatmap(
    lambda b: st.tuples(st.lists(st.integers(0, 70), min_size=b, max_size=b),
                        st.lists(st.integers(0, 70), min_size=b, max_size=b)))


@given(lens=lengths, causal=st.booleans(), gqa=st.sampled_from([(2, 2), (4, 1), (4, 2)]),
       dv=st.sampled_from([3, 8, 17]), exact=st.booleans())
def test_forward_matches_numpy_and_xla(lens, causal, gqa, dv, exact):
    lq, lk = lens
    cq = max(max(lq), 1) if exact else max(lq) + 5
    ck = max(max(lk), 1) if exact else max(lk) + 3
    q, k, v = qkv(np.random.default_rng(len(lq)), lq, lk, cq, ck, h=gqa[0], hkv=gqa[1], d=5,
                  dv=dv)
    check_forward(q, k, v, causal, 2e-5)


ISA_SCRIPT = r"""
import ctypes, json, sys
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
import vsla_jax as vs
from vsla_jax import kernels
from vsla_jax.attention.cpu import CPUBackend
sys.path.insert(0, sys.argv[1])
from test_cpu_attention import numpy_attention, qkv
errs = {"isa": kernels.library().vsla_selftest_attention_isa()}
for dt in (np.float32, np.float64):
    for d, dv in ((64, 64), (5, 17)):
        rng = np.random.default_rng(d)
        q, k, v = qkv(rng, [70, 0, 33, 1, 130], [66, 5, 130, 0, 129], 131, 130, h=4, hkv=2,
                      d=d, dv=dv, dtype=dt)
        for causal in (False, True):
            out = vs.attention(q, k, v, causal=causal, backend=CPUBackend())
            ref = numpy_attention(*(np.asarray(x.data) for x in (q, k, v)),
                                  np.asarray(q.lengths[:, 0]), np.asarray(k.lengths[:, 0]),
                                  causal, 1 / np.sqrt(d))
            def grads(backend):
                def loss(qd, kd, vd):
                    o = vs.attention(vs.VarTensor(qd, q.lengths), vs.VarTensor(kd, k.lengths),
                                     vs.VarTensor(vd, k.lengths), causal=causal,
                                     backend=backend)
                    return jnp.sum(jnp.sin(o.data))
                return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q.data, k.data, v.data)
            g_cpu, g_xla = grads(CPUBackend()), grads("xla")
            key = f"{np.dtype(dt).name} d={d} causal={causal}"
            rel = [np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max()
                   for a, b in zip(g_cpu, g_xla)]
            errs[key] = [float(np.abs(np.asarray(out.data) - ref).max())] + [float(e) for e in rel]
    # rank 3 (vs.stack of [n, 4, 16] items: heads padded to 8): strided gradients whose
    # gaps the units write, in memory last holding NaN; against the rank-1 stacking
    items = [[np.random.default_rng(i).standard_normal((n, 4, 16)).astype(dt)
              for n in (37, 0, 70, 1)] for i in range(3)]
    def rank_grads(rank):
        q, k, v = (vs.stack(x, rank=rank) for x in items)
        def loss(qd, kd, vd):
            o = vs.attention(vs.VarTensor(qd, q.lengths), vs.VarTensor(kd, k.lengths),
                             vs.VarTensor(vd, v.lengths), backend=CPUBackend())
            return jnp.sum(jnp.sin(o.data))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q.data, k.data, v.data)
    want = rank_grads(1)
    poison = jax.block_until_ready([jnp.full((4, 76, 8, 16), jnp.nan, dt) for _ in range(3)])
    del poison
    got = [np.asarray(g) for g in rank_grads(3)]
    inside = [float(np.abs(g[:, :, :4] - np.asarray(w)).max() / np.abs(w).max())
              for g, w in zip(got, want)]
    outside = [float(np.abs(g[:, :, 4:]).max()) for g in got]
    errs[f"{np.dtype(dt).name} rank3"] = [max(outside)] + inside
print(json.dumps(errs))
"""


@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_every_instruction_set_path_matches_numpy_and_xla(isa):
    """The GEMM, transposes and output stores have AVX-512, AVX2 and baseline builds,
    picked at run time; capped with VSLA_CPU_ISA (read once, so in a fresh process),
    each must give the same forward and gradients, float32 and float64, whole-vector
    (D=64) and ragged (D=5, Dv=17) heads, causal or not; and rank-3 gradients whose head
    gaps the units write (exactly zero there, in memory that held NaN)."""
    import json
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, VSLA_CPU_ISA=isa, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", ISA_SCRIPT, here], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    errs = json.loads(run.stdout.strip().splitlines()[-1])
    assert errs.pop("isa") == {"avx2": 1, "base": 0}[isa]
    assert len(errs) == 10
    for key, (fwd, *grads) in errs.items():
        tol = 3e-5 if key.startswith("float32") else 1e-11
        assert fwd < tol, (key, fwd)
        assert max(grads) < 20 * tol, (key, grads)


@pytest.mark.parametrize("causal", [False, True])
def test_long_items_cross_several_tiles_in_float64(causal):
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        q, k, v = qkv(rng, [200, 64, 1, 0], [130, 65, 200, 7], 200, 200, h=4, hkv=2, d=16,
                      dv=24, dtype=np.float64)
        check_forward(q, k, v, causal, 1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_pass_check_grads_in_float64(causal):
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        q, k, v = qkv(rng, [5, 0, 9, 1], [7, 3, 9, 0], 9, 10, h=4, hkv=2, d=3, dv=5,
                      dtype=np.float64)

        def f(qd, kd, vd):
            return cpu_attention(qd, kd, vd, q.lengths[:, 0], k.lengths[:, 0], causal, 0.7)

        jax.test_util.check_grads(f, (q.data, k.data, v.data), order=1, modes=("rev",))


@pytest.mark.parametrize("causal", [False, True])
def test_float32_gradients_match_the_xla_backend(causal):
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, [70, 0, 33, 1, 64], [66, 5, 130, 0, 64], 70, 130, h=4, hkv=1, d=8,
                  dv=6)

    def grads(backend):
        def loss(qd, kd, vd):
            o = vs.attention(vs.VarTensor(qd, q.lengths), vs.VarTensor(kd, k.lengths),
                             vs.VarTensor(vd, k.lengths), causal=causal, backend=backend)
            return jnp.sum(jnp.sin(o.data))
        return jax.grad(loss, argnums=(0, 1, 2))(q.data, k.data, v.data)

    for ours, ref in zip(grads(CPUBackend()), grads("xla")):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=2e-5, rtol=1e-4)


def test_jit_with_traced_lengths_and_two_threads():
    cpu = CPUBackend()
    f = jax.jit(lambda q, k, v: vs.attention(q, k, v, causal=True, backend=cpu).data)
    cases = [qkv(np.random.default_rng(i), [i + 1, 40 - i], [50 - i, i], 40, 50)
             for i in range(6)]
    expected = [np.asarray(vs.attention(*c, causal=True, backend="xla").data) for c in cases]
    out = [None] * len(cases)

    def work(i):
        for _ in range(3):
            out[i] = np.asarray(f(*cases[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(out, expected):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_vmap_runs_the_kernel_per_element():
    rng = np.random.default_rng(5)
    q, k, v = qkv(rng, [3, 6], [6, 2], 6, 6)
    lq, lk = q.lengths[:, 0], k.lengths[:, 0]
    stacked = [jnp.stack([x.data, 2 * x.data]) for x in (q, k, v)]
    out = jax.vmap(lambda a, b, c: cpu_attention(a, b, c, lq, lk, False, 0.5))(*stacked)
    for i in range(2):
        want = cpu_attention(stacked[0][i], stacked[1][i], stacked[2][i], lq, lk, False, 0.5)
        np.testing.assert_allclose(np.asarray(out[i]), np.asarray(want), rtol=1e-6)


@pytest.mark.parametrize("bad", [[3, 9], [-1, 2]])
def test_bad_lengths_raise_before_the_kernel_runs(bad):
    rng = np.random.default_rng(6)
    q, k, v = qkv(rng, [3, 4], [3, 4], 8, 8)
    f = jax.jit(lambda lq: cpu_attention(q.data, k.data, v.data, lq, k.lengths[:, 0], False,
                                         1.0))
    with pytest.raises(jax.errors.JaxRuntimeError, match="query length .* outside"):
        jax.block_until_ready(f(jnp.asarray(bad, jnp.int32)))
    with pytest.raises(vs.LengthError):
        vs.VarTensor(q.data, jnp.asarray(np.asarray(bad)[:, None], jnp.int32))


def test_bad_shapes_raise_a_clear_error():
    x = jnp.ones((2, 4, 3, 8), jnp.float32)
    lens = jnp.asarray([4, 4], jnp.int32)
    with pytest.raises(jax.errors.JaxRuntimeError, match="not a multiple"):
        jax.block_until_ready(cpu_attention(x, x[:, :, :2], x[:, :, :2], lens, lens, False, 1.))
    with pytest.raises(jax.errors.JaxRuntimeError, match="lengths must be int32"):
        jax.block_until_ready(cpu_attention(x, x, x, lens[:1], lens[:1], False, 1.0))


def test_fallback_when_the_target_is_missing(monkeypatch):
    rng = np.random.default_rng(7)
    q, k, v = qkv(rng, [5, 0, 12], [9, 4, 12], 12, 12)
    monkeypatch.setattr(kernels, "target", lambda *a, **kw: None)
    out = vs.attention(q, k, v, causal=True, backend=CPUBackend())
    ref = vs.attention(q, k, v, causal=True, backend="xla")
    np.testing.assert_allclose(np.asarray(out.data), np.asarray(ref.data), atol=2e-5)


def test_padding_is_never_read_forward_and_backward():
    """NaN in every padded row of q, k and v changes nothing: the kernels read only rows
    below the lengths, and write zeros past them (output and gradients)."""
    rng = np.random.default_rng(8)
    lq, lk = [5, 0, 70, 1, 33], [9, 4, 65, 0, 70]
    q, k, v = qkv(rng, lq, lk, 72, 70, h=4, hkv=2, d=8, dv=8)

    def poisoned(x):
        pad = ~np.asarray(x.mask())[:, :, None, None]
        return vs.VarTensor(jnp.where(pad, jnp.nan, x.data), x.lengths)

    def run(q, k, v):
        def loss(qd, kd, vd):
            o = vs.attention(vs.VarTensor(qd, q.lengths), vs.VarTensor(kd, k.lengths),
                             vs.VarTensor(vd, v.lengths), causal=True, backend=CPUBackend())
            return jnp.sum(o.data * o.data), o.data
        (_, o), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
            q.data, k.data, v.data)
        return [np.asarray(x) for x in (o, *g)]

    clean, dirty = run(q, k, v), run(poisoned(q), poisoned(k), poisoned(v))
    for a, b in zip(clean, dirty):
        assert np.isfinite(b).all()
        np.testing.assert_array_equal(a, b)
    qpad = ~np.asarray(q.mask())
    kpad = ~np.asarray(k.mask())
    assert not clean[0][qpad].any() and not clean[1][qpad].any()
    assert not clean[2][kpad].any() and not clean[3][kpad].any()


def test_backward_hands_back_only_padding_pages_of_the_saved_output():
    """The backward kernel returns the zero pages of the saved output's padding to the OS
    (ranges >= 256 KiB, so items of ~1 MiB here): the output the user also holds keeps
    every valid row and stays zero past the lengths, on every call."""
    rng = np.random.default_rng(13)
    lq, lk = [3, 1100, 0, 517, 1100], [1100, 9, 5, 0, 1100]
    q, k, v = qkv(rng, lq, lk, 1100, 1100, h=4, hkv=4, d=16, dv=64)

    @jax.jit
    def step(qd, kd, vd):
        def loss(qd, kd, vd):
            o = vs.attention(vs.VarTensor(qd, q.lengths), vs.VarTensor(kd, k.lengths),
                             vs.VarTensor(vd, v.lengths), backend=CPUBackend())
            return jnp.sum(o.data * o.data), o.data
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(qd, kd, vd)

    want = numpy_attention(*(np.asarray(x.data) for x in (q, k, v)), lq, lk, False, 0.25)
    for _ in range(2):
        (_, o), grads = step(q.data, k.data, v.data)
        np.testing.assert_allclose(np.asarray(o), want, rtol=2e-5, atol=2e-6)
        assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_an_elementwise_user_never_writes_in_place_into_a_kernel_output(where):
    """The kernels leave output padding as untouched pages (docs/kernels.md); XLA must not
    run a dying elementwise user in place there. Proof from XLA's buffer assignment: the
    kernel's output stays a temporary of its own (in place, the temporaries would hold
    only lse), and the user reads the merged ``[B, C, H * D]`` kernel result."""
    rng = np.random.default_rng(12)
    q, k, v = qkv(rng, [3, 40, 17], [5, 40, 2], 40, 40, h=4, hkv=4, d=8, dv=8)
    attend = lambda qd: vs.attention(vs.VarTensor(qd, q.lengths), k, v,
                                     backend=CPUBackend()).data
    if where == "forward":
        f = lambda qd: attend(qd) + 1.0
    else:
        f = lambda qd: qd - 0.5 * jax.grad(lambda x: jnp.sum(attend(x) ** 2))(qd)
    compiled = jax.jit(f).lower(q.data).compile()
    assert compiled.memory_analysis().temp_size_in_bytes >= q.data.nbytes
    merged = f"f32[3,40,{4 * 8}]"
    assert any(merged in line and "custom-call" in line
               for line in compiled.as_text().splitlines())
    if where == "forward":  # and the values are what the unfused call gives
        np.testing.assert_allclose(np.asarray(jax.jit(f)(q.data)),
                                   np.asarray(attend(q.data)) + 1.0, rtol=1e-6)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_values_stay_in_their_item_and_match_numpy(value):
    rng = np.random.default_rng(9)
    q, k, v = qkv(rng, [20, 7, 70], [30, 7, 66], 70, 66, h=2, hkv=2, d=8, dv=8)
    kd = np.asarray(k.data).copy()
    kd[0, 3, 1, 2] = value  # one key of item 0, head 1
    k = vs.VarTensor(jnp.asarray(kd), k.lengths)
    out = np.asarray(vs.attention(q, k, v, backend=CPUBackend()).data)
    with np.errstate(invalid="ignore"):  # inf - inf in the reference, as in the kernel
        ref = numpy_attention(np.asarray(q.data), kd, np.asarray(v.data), [20, 7, 70],
                              [30, 7, 66], False, 1 / np.sqrt(8))
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    fin = ~np.isnan(ref)
    np.testing.assert_allclose(out[fin], ref[fin], atol=2e-5, rtol=2e-5)
    assert np.isfinite(out[1:]).all()


@pytest.mark.parametrize("backend", ["auto", "cpu", "bucketed", "tiled"])
def test_forward_mode_autodiff_on_every_backend(backend):
    """The kernels' primitives (auto, cpu) take forward mode themselves; the custom_vjp
    backends (bucketed, tiled) are reverse-mode only, and under jvp/jacfwd/hessian
    vs.attention runs the XLA backend for them. Either way forward mode agrees with xla."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        q, k, v = qkv(rng, [5, 0, 3], [4, 2, 6], 5, 6, h=2, hkv=1, d=3, dv=4,
                      dtype=np.float64)

        def run(b):
            return lambda qd, kd: vs.attention(vs.VarTensor(qd, q.lengths),
                                               vs.VarTensor(kd, k.lengths), v, causal=True,
                                               backend=b).data

        f, ref = run(backend), run("xla")
        jax.test_util.check_grads(f, (q.data, k.data), order=2, modes=("fwd",))
        # reverse over reverse: the kernels' primitives take it; bucketed and tiled do not
        # (second-order reverse through their custom_vjp backward)
        modes = ("fwd", "rev") if backend in ("auto", "cpu") else ("rev",)
        jax.test_util.check_grads(f, (q.data, k.data), order=2 if len(modes) == 2 else 1,
                                  modes=modes)
        tq, tk = jnp.ones_like(q.data), jnp.full_like(k.data, 0.5)
        for a, b in zip(jax.jvp(f, (q.data, k.data), (tq, tk)),
                        jax.jvp(ref, (q.data, k.data), (tq, tk))):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        loss = lambda qd: jnp.sum(f(qd, k.data) ** 2)
        ref_loss = lambda qd: jnp.sum(ref(qd, k.data) ** 2)
        np.testing.assert_allclose(jax.jit(jax.hessian(loss))(q.data),
                                   jax.hessian(ref_loss)(q.data), rtol=1e-9, atol=1e-12)


def moves_floats(hlo: str) -> list[str]:
    """Instructions of a compiled program that slice, pad or copy float data (the int32
    lengths may be sliced), fused ones included."""
    return [line for line in hlo.splitlines() if " = f" in line and any(
        f" {op}(" in line for op in ("slice", "pad", "copy", "dynamic-slice"))]


def stacked_heads(rng, lengths, heads, dim, dtype=np.float32) -> tuple[vs.VarTensor, list]:
    """``vs.stack`` of ``[n, heads, dim]`` items: a rank-3 batch whose head axes the
    capacity ladder pads (heads 3 -> 8, dim 13 -> 16, ...); and the items."""
    items = [rng.standard_normal((n, heads, dim)).astype(dtype) for n in lengths]
    return vs.stack(items), items


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_rank3_stacked_batches_read_through_strides_match_numpy(dtype, causal):
    """vs.stack of [n, H, D] items keeps padded head axes (H 3 -> capacity 8, D 13 -> 16,
    Dv 22 -> 24); both kernels read [.., :H, :D] through strides: no cropped copy or
    padded gradient in the compiled programs, results and jit(grad) equal to NumPy and
    the xla backend, gradients zero in the head padding."""
    rng = np.random.default_rng(7)
    lens = [5, 0, 19, 1]
    with jax.enable_x64(dtype == np.float64):
        (q, qi), (k, ki), (v, vi) = (stacked_heads(rng, lens, h, d, dtype)
                                     for h, d in ((6, 13), (3, 13), (3, 22)))
        assert q.rank == 3 and q.data.shape[2:] != (6, 13)  # the ladder padded them
        out = vs.attention(q, k, v, causal=causal)
        assert out.data.shape[2:] == (6, 22) and out.rank == 1
        pad = lambda items, cap: np.stack([np.pad(x, ((0, cap - len(x)), (0, 0), (0, 0)))
                                           for x in items])
        cap = q.capacity[0]
        ref = numpy_attention(pad(qi, cap), pad(ki, cap), pad(vi, cap), np.array(lens),
                              np.array(lens), causal, 1 / np.sqrt(13))
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(np.asarray(out.data), ref, atol=tol, rtol=tol)
        from vsla_jax.attention import cpu
        hlo = cpu.kernel_call.lower(q.data, k.data, v.data, q.lengths, k.lengths, causal,
                                     1 / np.sqrt(13), (6, 13, 3, 22)).compile().as_text()
        assert not moves_floats(hlo), hlo
        # the lengths' column 0 is read by the kernel: no slice fusions beside it
        assert "fusion(" not in hlo and hlo.count("custom-call(") == 1, hlo

        def loss(backend, qd, kd, vd):
            o = vs.attention(vs.VarTensor(qd, q.lengths), vs.VarTensor(kd, k.lengths),
                             vs.VarTensor(vd, v.lengths), causal=causal, backend=backend)
            return jnp.sum(o.data * jnp.arange(o.data.size, dtype=o.dtype).reshape(
                o.data.shape) / o.data.size)

        step = jax.jit(jax.grad(lambda *a: loss("auto", *a), (0, 1, 2)))
        hlo = step.lower(q.data, k.data, v.data).compile().as_text()
        assert not moves_floats(hlo), hlo
        got = step(q.data, k.data, v.data)
        want = jax.grad(lambda *a: loss("xla", *a), (0, 1, 2))(q.data, k.data, v.data)
        for g, w, x in zip(got, want, (q, k, v)):
            assert g.shape == x.data.shape
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=tol * 10,
                                       rtol=tol * 10)
            feats = np.asarray(g)[:, :, x.lengths[0, 1]:], np.asarray(g)[..., x.lengths[0, 2]:]
            assert not any(f.any() for f in feats), "gradient must be zero in head padding"


def stacked_step(items: list, rank: int):
    """``jit(value_and_grad)`` of ``sum(sin(o))`` for attention on ``vs.stack(x, rank=rank)``
    of three item lists: a callable returning ``((loss, o data), (dq, dk, dv))``, and the
    stacked data's shape."""
    q, k, v = (vs.stack(x, rank=rank) for x in items)

    def loss(qd, kd, vd):
        o = vs.attention(vs.VarTensor(qd, q.lengths), vs.VarTensor(kd, k.lengths),
                         vs.VarTensor(vd, v.lengths), backend=CPUBackend())
        return jnp.sum(jnp.sin(o.data)), o.data
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    return (lambda: fn(q.data, k.data, v.data)), q.data.shape


@pytest.mark.parametrize("heads,dim", [(4, 16), (4, 80), (3, 13)])
def test_rank3_gradients_in_reused_memory_are_zero_in_the_head_gaps(heads, dim):
    """In a gradient buffer that malloc hands out again (here after a NaN-filled buffer of
    its size was freed), the backward units write the gaps between the heads beside their
    values (aligned rows with streaming stores: D 16 and 80; unaligned ones: D 13), and
    the per-item pass zeroes the rows past the lengths. Values equal the same items
    stacked at rank 1; every other entry is exactly zero, on every call."""
    rng = np.random.default_rng(heads * dim)
    lens = np.array([37, 0, 64, 1, 70])
    items = [[rng.standard_normal((int(n), heads, dim)).astype(np.float32) for n in lens]
             for _ in range(3)]

    (strided, shape), (dense, _) = stacked_step(items, 3), stacked_step(items, 1)
    assert shape[2:] != (heads, dim)  # the ladder padded the head axes
    want = [np.asarray(w) for w in dense()[1]]
    rows = np.arange(shape[1])[None, :] < lens[:, None]
    for _ in range(3):
        poison = [jnp.full(shape, jnp.nan, jnp.float32) for _ in range(3)]
        jax.block_until_ready(poison)
        del poison
        for g, w in zip(strided()[1], want):
            g = np.asarray(g)
            np.testing.assert_allclose(g[:, :, :heads, :dim], w, rtol=1e-5, atol=1e-6)
            assert not g[~rows].any()
            assert not g[:, :, heads:].any() and not g[..., dim:].any()


def test_outputs_of_32_mib_and_more_are_zero_wherever_the_units_do_not_write():
    """Outputs of 32 MiB or more, which malloc maps fresh on every call, are zeroed whole
    by handing their pages back (``fresh_output``) instead of item by item. Here the
    rank-3 gradients (4 -> 8 heads, 80 -> 112 dims: 96 MiB each) and the output (35 MiB)
    take that road on two calls: values equal those of the same items stacked at rank 1
    (smaller buffers, cleared item by item), and every entry outside the items' rows and
    heads is exactly zero."""
    rng = np.random.default_rng(23)
    lens = rng.integers(1, 845, 32)
    lens[[0, 5, 9]] = (844, 0, 1)
    items = [[rng.standard_normal((int(n), 4, 80)).astype(np.float32) for n in lens]
             for _ in range(3)]

    (big, _), (small, _) = stacked_step(items, 3), stacked_step(items, 1)
    for _ in range(2):
        (_, want_o), want_g = small()
        for g in want_g:  # reused heap memory: cleared item by item
            rows = np.arange(g.shape[1])[None, :] < lens[:, None]
            assert not np.asarray(g)[~rows].any()
        (_, o), grads = big()
        assert o.nbytes >= 32 << 20 and all(g.nbytes >= 32 << 20 for g in grads)
        np.testing.assert_allclose(np.asarray(o).reshape(want_o.shape), want_o, rtol=1e-5,
                                   atol=1e-6)
        for g, w in zip(grads, want_g):
            g = np.asarray(g)
            assert g.shape[2:] == (8, 112)
            np.testing.assert_allclose(g[:, :, :4, :80], w, rtol=1e-5, atol=1e-6)
            rows = np.arange(g.shape[1])[None, :] < lens[:, None]
            assert not g[~rows].any() and not g[:, :, 4:].any() and not g[..., 80:].any()


@pytest.mark.parametrize("rows,cap,heads,hcap,width,dcap", [
    (5, 9, 3, 8, 13, 16),   # both head axes padded (rank-3 batch)
    (0, 4, 3, 8, 13, 16),   # an item without rows: all of it zero
    (7, 7, 2, 2, 5, 8),     # only D padded, no rows past the length
    (3, 6, 3, 4, 16, 16),   # only H padded
    (4, 600, 2, 2, 64, 64),  # dense rows: only the rows past the length (256 KiB+)
])
def test_gradient_items_are_cleared_exactly_where_the_units_do_not_write(
        rows, cap, heads, hcap, width, dcap):
    """``clear_gradient_item`` on memory full of NaN (a reused buffer): rows past the
    length and the gaps between the heads of written rows become zero; the heads' own
    values, which the backward units write next, are left alone."""
    import ctypes

    buf = np.full((cap, hcap, dcap), np.nan, np.float32)
    kernels.library().vsla_selftest_clear_gradient_item(
        ctypes.c_void_p(buf.ctypes.data), *(ctypes.c_int64(n) for n in (
            rows, hcap * dcap, cap, heads, dcap, width)))
    owned = np.zeros(buf.shape, bool)
    owned[:rows, :heads, :width] = True
    assert np.isnan(buf[owned]).all()
    np.testing.assert_array_equal(buf[~owned], 0.0)


def _attention_calls(fn, *args) -> tuple[int, int, bool]:
    """(forward kernel calls, backward kernel calls, any XLA dot) in the lowered jit(fn)."""
    hlo = jax.jit(fn).lower(*args).as_text()
    return (hlo.count("@vsla_attention_fwd("), hlo.count("@vsla_attention_bwd("),
            "dot_general" in hlo)


@pytest.mark.parametrize("rank", [1, 3])
def test_transformations_of_a_jitted_attention_stay_on_the_kernels(rank):
    """jvp / jacfwd / hessian of an already jitted function (a custom_vjp cannot take
    them: JAX refuses forward mode after tracing), reverse over reverse, vmap of grad and
    grad of vmap agree with the xla backend; reverse mode runs the two kernels and no XLA
    product. rank 3: vs.stack's padded head axes, read through strides (sizes)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(8)
        shapes = [(5, 0, 3), (4, 2, 6)]
        items = [[rng.standard_normal((n, h, d)) for n in lens]
                 for lens, (h, d) in zip(shapes + [shapes[1]], [(4, 3), (2, 3), (2, 5)])]
        q, k, v = (vs.stack(it, rank=rank) for it in items)
        lq, lk = q.lengths, k.lengths

        def make(backend):
            def f(qd, kd, vd):
                o = vs.attention(vs.VarTensor(qd, lq), vs.VarTensor(kd, lk),
                                 vs.VarTensor(vd, lk), causal=True, backend=backend)
                return jnp.sum(jnp.sin(o.data) ** 2)
            return f

        ours, ref = make("auto"), make("xla")
        jours = jax.jit(ours)
        args = (q.data, k.data, v.data)
        t = (jnp.cos(q.data), jnp.ones_like(k.data), jnp.sin(v.data))
        close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-11)
        close(jax.jvp(jours, args, t)[1], jax.jvp(ref, args, t)[1])
        for got, want in zip(jax.jacfwd(jours, argnums=(0, 1, 2))(*args),
                             jax.jacfwd(ref, argnums=(0, 1, 2))(*args)):
            close(got, want)
        for i in range(3):
            close(jax.hessian(jours, argnums=i)(*args), jax.hessian(ref, argnums=i)(*args))
        rr = lambda f: jax.grad(lambda *x: jnp.sum(jax.grad(f, argnums=1)(*x) ** 2))
        close(rr(jours)(*args), rr(ref)(*args))
        qs = jnp.stack([q.data, -q.data])
        close(jax.vmap(jax.grad(jours), (0, None, None))(qs, k.data, v.data),
              jax.vmap(jax.grad(ref), (0, None, None))(qs, k.data, v.data))
        vsum = lambda f: lambda x: jnp.sum(jax.vmap(f, (0, None, None))(x, k.data, v.data))
        close(jax.grad(vsum(ours))(qs), jax.grad(vsum(ref))(qs))
        assert _attention_calls(jax.grad(ours, argnums=(0, 1, 2)), *args) == (1, 1, False)
        assert _attention_calls(jax.grad(ref), *args)[:2] == (0, 0)


def test_check_grads_of_the_kernels_in_both_modes_to_second_order():
    with jax.enable_x64(True):
        rng = np.random.default_rng(9)
        q, k, v = qkv(rng, [4, 0, 3], [3, 2, 0], 4, 4, h=2, hkv=1, d=3, dv=2,
                      dtype=np.float64)

        def f(qd, kd, vd):
            return cpu_attention(qd, kd, vd, q.lengths[:, 0], k.lengths[:, 0], True, 0.6)

        jax.test_util.check_grads(f, (q.data, k.data, v.data), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("rank", [1, 3])
def test_jax_export_lowers_the_kernels_to_portable_xla(rank):
    """jax.export of vs.attention and of its gradient carries no custom call, and the
    deserialised programs give the kernels' results (rank 3: strided head axes)."""
    from jax import export

    rng = np.random.default_rng(10)
    items = [[rng.standard_normal((n, 4, 6)).astype(np.float32) for n in (5, 1, 7)]
             for _ in range(3)]
    items[1] = [x[:, :2] for x in items[1]]  # GQA: 2 K/V heads
    items[2] = [x[:, :2] for x in items[2]]
    q, k, v = (vs.stack(it, rank=rank) for it in items)
    k = vs.VarTensor(k.data, jnp.asarray(np.array([[4], [0], [7]]) if rank == 1 else
                                         np.array([[4, 2, 6], [0, 2, 6], [7, 2, 6]]),
                                         jnp.int32))
    v = vs.VarTensor(v.data, k.lengths)

    def f(qd, kd, vd):
        return vs.attention(vs.VarTensor(qd, q.lengths), vs.VarTensor(kd, k.lengths),
                            vs.VarTensor(vd, v.lengths), causal=True).data

    grad = jax.grad(lambda *x: jnp.sum(jnp.sin(f(*x))), argnums=(0, 1, 2))
    args = (q.data, k.data, v.data)
    for fn in (f, grad):
        exported = export.export(jax.jit(fn))(*args)
        assert "stablehlo.custom_call" not in exported.mlir_module()
        assert _attention_calls(fn, *args)[0] == 1  # the kernels, outside export
        restored = export.deserialize(exported.serialize())
        for got, want in zip(jax.tree.leaves(restored.call(*args)),
                             jax.tree.leaves(jax.jit(fn)(*args))):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5,
                                       atol=2e-6)
