"""Run every Pallas kernel of the repository compiled (``interpret=False``) and compare it
with the XLA path of the same op.

Kernels (and the XLA path each is compared with):

- ``attention``: ``vsla_jax.attention.pallas.pallas_flash_forward`` (output and
  log-sum-exp) against ``reference.dense_attention`` (the ``xla`` backend); also the
  public ``vs.attention(backend="pallas")`` and its gradient (the backward is XLA).
- ``conv``: ``vsla_jax.conv.pallas.pallas_direct_conv`` against ``kernels.direct_conv``;
  also ``padded.conv_arrays`` with the Pallas mode against it without.
- ``ffn``: ``icd_jax.adapters.ffn_pallas.pallas_union_down`` against
  ``ffn.gather_down``, and ``pallas_sparse_down`` (several row groups) against a vmapped
  ``gather_down``.

Errors are measured against a float64 NumPy reference (for every path) and between the
Pallas and XLA outputs. Times are the median of ``--iters`` calls after warm-up, each
blocked on. On a backend that is not a GPU the kernels run in the Pallas interpreter
only (small shapes), so the script can be tried on CPU.

    python experiments/gpu_pallas_check.py --json_out /tmp/pallas_gpu.json

Exits non-zero when a counted comparison fails. ``--probes`` adds cases that test a
kernel's limits (reported, not counted).
"""

from __future__ import annotations

import datetime
import importlib
import json
import math
import os
import platform
import sys
import time
import traceback
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

# the repository root, so that ``python experiments/gpu_pallas_check.py`` finds vsla_jax
# and icd_jax without an install
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_string("json_out", None,
                    "where to write the results as JSON (default $OUT/pallas_gpu.json when "
                    "OUT is set, else nowhere)")
flags.DEFINE_integer("iters", 20, "timed calls per path (median reported)")
flags.DEFINE_integer("warmup", 2, "untimed calls after the first (compiling) call")
flags.DEFINE_enum("sizes", "auto", ["auto", "small", "all"],
                  "auto: small and medium shapes on GPU, small only in interpret mode")
flags.DEFINE_list("kernels", ["attention", "conv", "ffn"], "kernels to check")
flags.DEFINE_bool("probes", True, "also run limit probes (reported, not counted)")
flags.DEFINE_integer("seed", 0, "random seed")

# -- tolerances: pass when max|x - ref| <= atol + rtol * max|ref| -------------------------
# Triton computes float32 ``dot`` with TF32 inputs by default (10-bit mantissa), so the
# kernels with matrix products get a looser float32 tolerance on GPU than in the
# interpreter, where the dot is an XLA float32 dot.
TOL = {
    ("dot", "float32", True): (1e-4, 1e-4),     # interpreter
    ("dot", "float32", False): (1e-2, 1e-2),    # compiled: TF32 dot inputs
    ("dot", "bfloat16", True): (3e-2, 3e-2),
    ("dot", "bfloat16", False): (3e-2, 3e-2),
    ("fma", "float32", True): (1e-5, 1e-5),
    ("fma", "float32", False): (1e-5, 1e-5),
}


# -- imports that must not pull in the pipeline (pydantic, scikit-network) --------------
def import_ffn_modules():
    """``(ffn, ffn_pallas, note)``. The plain import loads ``icd_jax``'s package
    ``__init__`` (models, solver, ...); if that fails on this machine, load only
    ``icd_jax.errors``, ``icd_jax.cost``, ``icd_jax.adapters.meta`` and the two modules
    through empty package shells."""
    try:
        from icd_jax.adapters import ffn, ffn_pallas
        return ffn, ffn_pallas, "plain import"
    except Exception as e:  # noqa: BLE001 - any import failure: try the narrow path
        reason = f"{type(e).__name__}: {e}"
    for name in [m for m in sys.modules if m == "icd_jax" or m.startswith("icd_jax.")]:
        del sys.modules[name]
    for pkg, sub in (("icd_jax", "icd_jax"), ("icd_jax.adapters", "icd_jax/adapters")):
        shell = types.ModuleType(pkg)
        shell.__path__ = [os.path.join(ROOT, sub)]
        sys.modules[pkg] = shell
    ffn = importlib.import_module("icd_jax.adapters.ffn")
    ffn_pallas = importlib.import_module("icd_jax.adapters.ffn_pallas")
    return ffn, ffn_pallas, f"narrow import (plain import failed: {reason})"


# -- helpers ------------------------------------------------------------------------------
def block(x):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready(), x)


def bench(fn, args, iters: int, warmup: int):
    """``(first-call s, median ms, output)``: the first call compiles."""
    t0 = time.perf_counter()
    out = block(fn(*args))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        block(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, 1e3 * float(np.median(times)), out


def platform_of(x) -> str:
    leaf = jax.tree_util.tree_leaves(x)[0]
    devs = leaf.devices()
    return ",".join(sorted(f"{d.platform}:{d.device_kind}" for d in devs))


def errors(x, ref) -> tuple[float, float]:
    """``(max abs error, max abs error / max |ref|)`` as float64."""
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(ref, np.float64)
    if x.shape != ref.shape:
        raise ValueError(f"shape {x.shape} != reference {ref.shape}")
    if not x.size:
        return 0.0, 0.0
    if not np.all(np.isfinite(x)):
        return math.inf, math.inf
    err = float(np.max(np.abs(x - ref)))
    scale = float(np.max(np.abs(ref)))
    return err, err / scale if scale > 0 else err


def rounded(x, dtype):
    """``x`` as the float64 values that ``dtype`` holds."""
    return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)


# -- attention ------------------------------------------------------------------------------
def np_attention(q, k, v, lq, lk, causal, scale):
    """float64 reference: q [B, Cq, H, D], k/v [B, Ck, Hkv, Dv] -> [B, Cq, H, Dv]."""
    b, cq, h, _ = q.shape
    g = h // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    out = np.zeros((b, cq, h, v.shape[3]))
    lse = np.full((b, h, cq), -np.inf)
    for i in range(b):
        nq, nk = int(lq[i]), int(lk[i])
        if not nq or not nk:
            continue
        s = np.matmul(q[i, :nq].transpose(1, 0, 2), k[i, :nk].transpose(1, 2, 0)) * scale
        mask = np.ones((nq, nk), bool)
        if causal:
            mask = np.arange(nk)[None, :] <= np.arange(nq)[:, None]
        s = np.where(mask[None], s, -np.inf)
        m = s.max(axis=2, keepdims=True)
        rows = np.isfinite(m[..., 0])  # [h, nq]: rows with at least one key
        p = np.where(mask[None], np.exp(s - np.where(np.isfinite(m), m, 0)), 0.0)
        den = p.sum(axis=2, keepdims=True)
        o = np.matmul(p / np.where(den > 0, den, 1), v[i, :nk].transpose(1, 0, 2))
        out[i, :nq] = o.transpose(1, 0, 2)
        lse[i, :, :nq] = np.where(rows, (m + np.log(np.where(den > 0, den, 1)))[..., 0],
                                  -np.inf)
    return out, lse


def attention_cases(big: bool, probes: bool):
    """(name, spec, counted)."""
    c = []
    f32, bf16 = "float32", "bfloat16"
    # small: ragged, zero- and one-length items, lq != lk, GQA, both masks
    for causal in (False, True):
        c.append((f"small ragged B=6 H=2 D=32 causal={causal}",
                  dict(lq=[0, 1, 5, 17, 33, 8], lk=[0, 1, 5, 17, 33, 8], h=2, hk=2, d=32,
                       causal=causal, tq=16, tk=16, dtype=f32), True))
    c.append(("small cross lq!=lk (lk=0 with lq>0) B=5 H=4 Hkv=2 D=32",
              dict(lq=[3, 1, 20, 0, 9], lk=[0, 7, 40, 5, 1], h=4, hk=2, d=32, causal=False,
                   tq=16, tk=16, dtype=f32), True))
    c.append(("small GQA H=4 Hkv=1 D=64 causal bf16",
              dict(lq=[1, 30, 64, 12], lk=[1, 30, 64, 12], h=4, hk=1, d=64, causal=True,
                   tq=16, tk=32, dtype=bf16), True))
    if big:
        rng = np.random.default_rng(1)
        lens = rng.integers(1, 513, size=16)
        lens[:3] = [0, 1, 512]
        for causal in (False, True):
            c.append((f"medium ragged B=16 (0..512) H=8 Hkv=2 D=64 causal={causal}",
                      dict(lq=lens.tolist(), lk=lens.tolist(), h=8, hk=2, d=64,
                           causal=causal, tq=64, tk=64, dtype=f32), True))
        c.append(("medium ragged B=16 (0..512) H=8 D=128 causal bf16",
                  dict(lq=lens.tolist(), lk=lens.tolist(), h=8, hk=8, d=128, causal=True,
                       tq=64, tk=64, dtype=bf16), True))
        lens2 = rng.integers(0, 2049, size=8)
        lens2[:2] = [1, 2048]
        c.append(("medium ragged B=8 (0..2048) H=12 D=64 causal",
                  dict(lq=lens2.tolist(), lk=lens2.tolist(), h=12, hk=12, d=64, causal=True,
                       tq=64, tk=64, dtype=f32), True))
    if probes:
        c.append(("probe: head dim D=48 (not a power of two)",
                  dict(lq=[5, 17, 0], lk=[5, 17, 3], h=2, hk=2, d=48, causal=False, tq=16,
                       tk=16, dtype=f32), False))
    return c


def run_attention_case(spec, interpret, iters, warmup, rng):
    from vsla_jax.attention import pallas as apallas
    from vsla_jax.attention import reference

    lq, lk = np.asarray(spec["lq"], np.int32), np.asarray(spec["lk"], np.int32)
    b, h, hk, d = len(lq), spec["h"], spec["hk"], spec["d"]
    cq, ck = max(int(lq.max()), 1), max(int(lk.max()), 1)
    dtype = jnp.dtype(spec["dtype"])
    causal, scale = spec["causal"], 1.0 / math.sqrt(d)

    def data(c, heads, lens):
        x = rng.standard_normal((b, c, heads, d))
        x *= (np.arange(c)[None, :] < lens[:, None])[:, :, None, None]
        return rounded(x, dtype)

    qn, kn, vn = data(cq, h, lq), data(ck, hk, lk), data(ck, hk, lk)
    ref, ref_lse = np_attention(qn, kn, vn, lq, lk, causal, scale)
    q, k, v = (jnp.asarray(x, dtype) for x in (qn, kn, vn))
    jlq, jlk = jnp.asarray(lq), jnp.asarray(lk)

    pal = jax.jit(lambda q, k, v, a, b_: apallas.pallas_flash_forward(
        q, k, v, a, b_, causal=causal, scale=scale, tq=spec["tq"], tk=spec["tk"],
        interpret=interpret))
    xla = jax.jit(lambda q, k, v, a, b_: reference.dense_attention(q, k, v, a, b_, causal,
                                                                   scale))
    first_p, ms_p, (out_p, lse_p) = bench(pal, (q, k, v, jlq, jlk), iters, warmup)
    first_x, ms_x, out_x = bench(xla, (q, k, v, jlq, jlk), iters, warmup)
    # lse: rows with at least one key only (others hold a large negative sentinel)
    has = np.isfinite(ref_lse)
    lse_err = float(np.max(np.abs(np.asarray(lse_p, np.float64)[has] - ref_lse[has]))
                    ) if has.any() else 0.0
    lse_scale = float(np.max(np.abs(ref_lse[has]))) if has.any() else 0.0
    return dict(out_p=out_p, out_x=out_x, ref=ref, first_p=first_p, ms_p=ms_p,
                first_x=first_x, ms_x=ms_x,
                extra=dict(lse_max_abs_err=lse_err, lse_max_abs_ref=lse_scale),
                kind="dot", dtype=str(dtype))


def run_attention_api_case(spec, interpret, iters, warmup, rng, grad: bool):
    """``vs.attention(backend="pallas")`` (tiles from ``tile=``) against ``backend="xla"``;
    with ``grad`` the gradient of a weighted sum with respect to q, k and v."""
    import vsla_jax as vs

    lens = np.asarray(spec["lq"], np.int32)
    b, h, d = len(lens), spec["h"], spec["d"]
    c = max(int(lens.max()), 1)
    causal, scale = spec["causal"], 1.0 / math.sqrt(d)
    mask = (np.arange(c)[None, :] < lens[:, None])[:, :, None, None]
    qn, kn, vn = (rng.standard_normal((b, c, h, d)) * mask for _ in range(3))
    wn = rng.standard_normal((b, c, h, d)) * mask
    cfg = vs.AttentionConfig(pallas_interpret=interpret)
    tile = (spec["tq"], spec["tk"])

    def fwd(backend):
        def f(q, k, v):
            t = [vs.from_padded(x, jnp.asarray(lens), rank=1, trust_zero_slack=True)
                 for x in (q, k, v)]
            return vs.attention(*t, causal=causal, scale=scale, backend=backend, tile=tile,
                                config=cfg).data
        return f

    args = tuple(jnp.asarray(x, jnp.float32) for x in (qn, kn, vn))
    if grad:
        w = jnp.asarray(wn, jnp.float32)
        make = lambda backend: jax.jit(jax.grad(
            lambda q, k, v: jnp.sum(fwd(backend)(q, k, v) * w), argnums=(0, 1, 2)))
        # reference gradient: float64 NumPy has no autodiff; use the XLA path in float32
        # at "highest" precision as the reference and report the Pallas-XLA difference
        ref = None
    else:
        make = lambda backend: jax.jit(fwd(backend))
        ref, _ = np_attention(qn, kn, vn, lens, lens, causal, scale)
    first_p, ms_p, out_p = bench(make("pallas"), args, iters, warmup)
    first_x, ms_x, out_x = bench(make("xla"), args, iters, warmup)
    if grad:
        out_p = jnp.concatenate([x.ravel() for x in out_p])
        out_x = jnp.concatenate([x.ravel() for x in out_x])
        ref = np.asarray(out_x, np.float64)
    return dict(out_p=out_p, out_x=out_x, ref=ref, first_p=first_p, ms_p=ms_p,
                first_x=first_x, ms_x=ms_x, extra={}, kind="dot", dtype="float32",
                ref_is_xla=grad)


# -- conv -------------------------------------------------------------------------------------
def np_conv(a, b, la, lb):
    out = np.zeros((a.shape[0], a.shape[1] + b.shape[1] - 1))
    for i in range(a.shape[0]):
        if la[i] and lb[i]:
            out[i, : la[i] + lb[i] - 1] = np.convolve(a[i, : la[i]], b[i, : lb[i]])
    return out


def conv_cases(big: bool):
    c = [("small ragged B=6 cap_a=64 cap_b=33 (lengths 0, 1)",
          dict(la=[0, 1, 3, 17, 40, 64], lb=[1, 0, 5, 2, 16, 33], tile=128), True),
         ("small B=3 tile=16 (output spans several tiles)",
          dict(la=[1, 50, 31], lb=[1, 9, 31], tile=16), True)]
    if big:
        rng = np.random.default_rng(2)
        la = rng.integers(0, 4097, size=64)
        la[:2] = [0, 4096]
        lb = rng.integers(1, 65, size=64)
        lb[2] = 0
        c.append(("medium ragged B=64 cap_a=4096 cap_b=64",
                  dict(la=la.tolist(), lb=lb.tolist(), tile=128), True))
        la = rng.integers(1, 1025, size=256)
        lb = rng.integers(1, 258, size=256)
        c.append(("medium ragged B=256 cap_a=1024 cap_b=257",
                  dict(la=la.tolist(), lb=lb.tolist(), tile=128), True))
    return c


def _conv_data(spec, rng):
    la, lb = np.asarray(spec["la"], np.int32), np.asarray(spec["lb"], np.int32)
    cap_a, cap_b = max(int(la.max()), 1), max(int(lb.max()), 1)
    a = rng.standard_normal((len(la), cap_a)) * (np.arange(cap_a)[None] < la[:, None])
    b = rng.standard_normal((len(lb), cap_b)) * (np.arange(cap_b)[None] < lb[:, None])
    a, b = rounded(a, jnp.float32), rounded(b, jnp.float32)
    return a, b, la, lb


def run_conv_case(spec, interpret, iters, warmup, rng):
    from vsla_jax.conv import kernels
    from vsla_jax.conv import pallas as cpallas

    a, b, la, lb = _conv_data(spec, rng)
    ref = np_conv(a, b, la, lb)
    args = (jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), jnp.asarray(la),
            jnp.asarray(lb))
    tile = spec["tile"]
    pal = jax.jit(lambda a, b, la, lb: cpallas.pallas_direct_conv(a, b, la, lb, tile=tile,
                                                                  interpret=interpret))
    xla = jax.jit(lambda a, b, la, lb: kernels.direct_conv(a, b, 1, 1))
    first_p, ms_p, out_p = bench(pal, args, iters, warmup)
    first_x, ms_x, out_x = bench(xla, args, iters, warmup)
    return dict(out_p=out_p, out_x=out_x, ref=ref, first_p=first_p, ms_p=ms_p,
                first_x=first_x, ms_x=ms_x, extra={}, kind="fma", dtype="float32")


def run_conv_dispatch_case(spec, interpret, iters, warmup, rng):
    """``padded.conv_arrays(method="direct")`` with the Pallas mode against without: the
    path ``vs.conv`` takes for rank-1 direct convolution (finite check, custom JVP)."""
    from vsla_jax.conv import padded

    a, b, la, lb = _conv_data(spec, rng)
    ref = np_conv(a, b, la, lb)
    args = (jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
            jnp.asarray(la)[:, None], jnp.asarray(lb)[:, None])
    mode = "interpret" if interpret else "gpu"
    pal = jax.jit(lambda a, b, la, lb: padded.conv_arrays(a, b, la, lb, 1, 1, "direct",
                                                          False, mode))
    xla = jax.jit(lambda a, b, la, lb: padded.conv_arrays(a, b, la, lb, 1, 1, "direct",
                                                          False, None))
    first_p, ms_p, out_p = bench(pal, args, iters, warmup)
    first_x, ms_x, out_x = bench(xla, args, iters, warmup)
    return dict(out_p=out_p, out_x=out_x, ref=ref, first_p=first_p, ms_p=ms_p,
                first_x=first_x, ms_x=ms_x, extra={}, kind="fma", dtype="float32")


# -- ffn ----------------------------------------------------------------------------------------
def ffn_cases(big: bool):
    """MiniLM's FFN is F=1536, H=384; the skip runs on calls of at most 32 rows."""
    c = [("union T=0", dict(t=0, f=1536, h=384, tile=16, k_cap=24, groups=None), True),
         ("union T=1 F=1536 H=384 tile=16", dict(t=1, f=1536, h=384, tile=16, k_cap=24,
                                                 groups=None), True),
         ("union T=7 F=1536 H=384 tile=16 (k_cap < active: drops tiles)",
          dict(t=7, f=1536, h=384, tile=16, k_cap=8, groups=None), True),
         ("sparse groups T=40 group=16 F=512 H=96 tile=16",
          dict(t=40, f=512, h=96, tile=16, k_cap=16, groups=16), True)]
    if big:
        c += [("union T=32 F=1536 H=384 tile=16", dict(t=32, f=1536, h=384, tile=16,
                                                        k_cap=64, groups=None), True),
              ("union T=32 F=1536 H=384 tile=32", dict(t=32, f=1536, h=384, tile=32,
                                                        k_cap=32, groups=None), True),
              ("union T=32 F=4096 H=1024 tile=64", dict(t=32, f=4096, h=1024, tile=64,
                                                         k_cap=32, groups=None), True),
              ("sparse groups T=256 group=32 F=1536 H=384 tile=32",
               dict(t=256, f=1536, h=384, tile=32, k_cap=24, groups=32), True)]
    return c


def run_ffn_case(spec, interpret, iters, warmup, rng, ffn, ffn_pallas):
    t, n, h, tile, k_cap = spec["t"], spec["f"], spec["h"], spec["tile"], spec["k_cap"]
    n_t = n // tile
    # activations: about a third of the tiles carry activity, sparse inside a tile
    live = rng.random(n_t) < 0.35
    fn = rng.standard_normal((t, n)) * np.repeat(live, tile)[None, :]
    fn *= rng.random((t, n)) < 0.5
    wn = rng.standard_normal((n, h)) / math.sqrt(n * 0.2)
    bn = rng.standard_normal(h) * 0.1
    fn, wn, bn = (rounded(x, jnp.float32) for x in (fn, wn, bn))
    f, w2, b2 = (jnp.asarray(x, jnp.float32) for x in (fn, wn, bn))
    active = jnp.abs(f) > 0.1
    act = np.asarray(active)
    if spec["groups"] is None:
        tiles, valid, _ = ffn.union_tiles(active, tile=tile, k_cap=k_cap)
        tl, vl = np.asarray(tiles)[None], np.asarray(valid)[None]
        rows_of = [np.arange(t)]
        pal = jax.jit(lambda f, w2, b2, a, ti, va: ffn_pallas.pallas_union_down(
            f, w2, b2, a, ti, va, tile=tile, interpret=interpret))
        xla = jax.jit(lambda f, w2, b2, a, ti, va: ffn.gather_down(f, w2, b2, a, ti, va,
                                                                   tile=tile))
        args = (f, w2, b2, active, tiles, valid)
    else:
        g = spec["groups"]
        n_g = -(-t // g)
        pad = n_g * g - t
        grouped = jnp.pad(active, ((0, pad), (0, 0))).reshape(n_g, g, n)
        tiles, valid, _ = jax.vmap(lambda a: ffn.union_tiles(a, tile=tile, k_cap=k_cap))(
            grouped)
        tl, vl = np.asarray(tiles), np.asarray(valid)
        rows_of = [np.arange(i * g, min((i + 1) * g, t)) for i in range(n_g)]
        fm = jnp.where(active, f, 0.0)

        def xla_fn(f, w2, b2, a, ti, va):
            fp = jnp.pad(jnp.where(a, f, 0.0), ((0, pad), (0, 0))).reshape(n_g, g, n)
            out = jax.vmap(lambda fg, tg, vg: ffn.gather_down(
                fg, w2, b2, jnp.ones_like(fg, bool), tg, vg, tile=tile))(fp, ti, va)
            return out.reshape(n_g * g, -1)[:t]

        pal = jax.jit(lambda f, w2, b2, a, ti, va: ffn_pallas.pallas_sparse_down(
            jnp.where(a, f, 0.0), w2, b2, ti, va, tile=tile, group=g, interpret=interpret))
        xla = jax.jit(xla_fn)
        args = (fm, w2, b2, active, tiles, valid)
    # float64 reference: per row group, the active neurons of its valid tiles
    ref = np.tile(bn, (t, 1)).astype(np.float64)
    fa = fn * act
    for gi, rows in enumerate(rows_of):
        keep = np.zeros(n, bool)
        for s in np.asarray(tl[gi])[np.asarray(vl[gi])]:
            keep[s * tile:(s + 1) * tile] = True
        ref[rows] += (fa[rows] * keep[None, :]) @ wn
    kept = int(np.asarray(vl).sum())
    first_p, ms_p, out_p = bench(pal, args, iters, warmup)
    first_x, ms_x, out_x = bench(xla, args, iters, warmup)
    return dict(out_p=out_p, out_x=out_x, ref=ref, first_p=first_p, ms_p=ms_p,
                first_x=first_x, ms_x=ms_x,
                extra=dict(tiles_kept=kept, tiles_total=n_t * len(rows_of)),
                kind="dot", dtype="float32")


# -- main ---------------------------------------------------------------------------------------
def versions() -> dict:
    info = dict(jax=jax.__version__, python=platform.python_version(),
                devices=[str(d) for d in jax.devices()], default_backend=jax.default_backend(),
                device_kind=jax.devices()[0].device_kind)
    try:
        import jaxlib
        info["jaxlib"] = jaxlib.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        info["platform_version"] = jax.devices()[0].client.platform_version
    except Exception:  # noqa: BLE001
        pass
    for mod in ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_plugins.xla_cuda13"):
        try:
            m = importlib.import_module(mod)
            info[mod] = getattr(m, "__version__", "present")
        except Exception:  # noqa: BLE001
            pass
    return info


def write(path, payload):
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1, default=float)
    os.replace(tmp, path)


def capture_warnings(store: list) -> None:
    """Print each distinct warning once (JAX's deprecations are hidden by default) and
    keep it for the JSON."""
    seen = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = f"{category.__name__}: {message}"
        if text not in seen:
            seen.add(text)
            store.append(text)
            print(f"warning: {text}")

    warnings.simplefilter("default")
    warnings.showwarning = show


def main(argv):
    del argv
    json_out = FLAGS.json_out
    if json_out is None and os.environ.get("OUT"):
        json_out = os.path.join(os.environ["OUT"], "pallas_gpu.json")
    gpu = jax.default_backend() == "gpu"
    interpret = not gpu
    big = FLAGS.sizes == "all" or (FLAGS.sizes == "auto" and gpu)
    info = versions()
    print(f"jax {info['jax']} (jaxlib {info.get('jaxlib')}), python {info['python']}")
    print(f"jax.devices(): {jax.devices()}")
    print(f"platform version: {info.get('platform_version')}")
    if not gpu:
        print(f"no GPU: interpret mode only (default backend {jax.default_backend()!r}; "
              "the kernels run in the Pallas interpreter, small shapes)")
    else:
        print("GPU: kernels compiled (interpret=False)")
    rng = np.random.default_rng(FLAGS.seed)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    payload = dict(started=started, interpret=interpret, versions=info,
                   command=" ".join(sys.argv), tolerance_rule="max|x-ref| <= atol + rtol * "
                   "max|ref| (ref: float64 NumPy; gradient case: the XLA path)", results=[],
                   skipped=[], warnings=[])
    capture_warnings(payload["warnings"])

    cases = []
    if "attention" in FLAGS.kernels:
        for name, spec, counted in attention_cases(big, FLAGS.probes):
            cases.append(("attention", name, counted,
                          lambda s=spec: run_attention_case(s, interpret, FLAGS.iters,
                                                            FLAGS.warmup, rng)))
        api = dict(lq=[0, 1, 9, 33] if not big else [0, 1, 100, 384, 257, 31, 64, 2],
                   h=4, d=32 if not big else 64, causal=True, tq=16 if not big else 64,
                   tk=16 if not big else 64)
        for grad in (False, True):
            tag = "grad (Pallas fwd, XLA bwd)" if grad else "forward"
            cases.append(("attention", f"vs.attention backend=pallas causal {tag} "
                          f"B={len(api['lq'])} H={api['h']} D={api['d']}", True,
                          lambda g=grad: run_attention_api_case(api, interpret, FLAGS.iters,
                                                                FLAGS.warmup, rng, g)))
        payload["skipped"].append(dict(
            kernel="attention", case="V head dim != Q head dim",
            reason="not supported by the kernel: its output and V blocks take Q's head dim"))
    if "conv" in FLAGS.kernels:
        for name, spec, counted in conv_cases(big):
            cases.append(("conv", name, counted,
                          lambda s=spec: run_conv_case(s, interpret, FLAGS.iters,
                                                       FLAGS.warmup, rng)))
        spec = conv_cases(big)[-1][1]
        cases.append(("conv", "padded.conv_arrays direct, Pallas mode vs none ("
                      f"B={len(spec['la'])})", True,
                      lambda s=spec: run_conv_dispatch_case(s, interpret, FLAGS.iters,
                                                            FLAGS.warmup, rng)))
    if "ffn" in FLAGS.kernels:
        try:
            ffn, ffn_pallas, how = import_ffn_modules()
            print(f"ffn modules: {how}")
            payload["ffn_import"] = how
            for name, spec, counted in ffn_cases(big):
                cases.append(("ffn", name, counted,
                              lambda s=spec: run_ffn_case(s, interpret, FLAGS.iters,
                                                          FLAGS.warmup, rng, ffn,
                                                          ffn_pallas)))
        except Exception as e:  # noqa: BLE001
            reason = f"import failed: {type(e).__name__}: {e}"
            print(f"SKIP ffn kernel: {reason}")
            payload["skipped"].append(dict(kernel="ffn", case="all", reason=reason))

    failed = 0
    hdr = (f"{'kernel':9s} {'case':66s} {'ran on':14s} {'err(pal)':>9s} {'err(xla)':>9s} "
           f"{'|pal-xla|':>9s} {'tol':>8s} {'ok':4s} {'pal ms':>8s} {'xla ms':>8s} "
           f"{'x/p':>6s}")
    print(hdr)
    for kernel, name, counted, fn in cases:
        row = dict(kernel=kernel, case=name, counted=counted)
        try:
            r = fn()
            atol, rtol = TOL[(r["kind"], r["dtype"], interpret)]
            ref = r["ref"]
            err_p, rel_p = errors(r["out_p"], ref)
            err_x, rel_x = errors(r["out_x"], ref)
            diff, _ = errors(r["out_p"], np.asarray(jnp.asarray(r["out_x"], jnp.float32)))
            bound = atol + rtol * float(np.max(np.abs(ref))) if np.size(ref) else atol
            lse_ok = r["extra"].get("lse_max_abs_err", 0.0) <= (
                atol + rtol * r["extra"].get("lse_max_abs_ref", 0.0))
            ok = err_p <= bound and lse_ok
            row.update(ran_on=platform_of(r["out_p"]), xla_ran_on=platform_of(r["out_x"]),
                       interpret=interpret, dtype=r["dtype"], max_abs_err=err_p,
                       rel_err=rel_p, xla_max_abs_err=err_x, xla_rel_err=rel_x,
                       pallas_vs_xla_max_abs=diff, atol=atol, rtol=rtol, bound=bound,
                       passed=bool(ok), pallas_ms=r["ms_p"], xla_ms=r["ms_x"],
                       ratio_xla_over_pallas=r["ms_x"] / r["ms_p"] if r["ms_p"] else None,
                       pallas_first_call_s=r["first_p"], xla_first_call_s=r["first_x"],
                       reference="xla" if r.get("ref_is_xla") else "float64 numpy",
                       **r["extra"])
            ratio = row["ratio_xla_over_pallas"]
            print(f"{kernel:9s} {name[:66]:66s} {row['ran_on'][:14]:14s} {err_p:9.2e} "
                  f"{err_x:9.2e} {diff:9.2e} {bound:8.1e} {'PASS' if ok else 'FAIL':4s} "
                  f"{r['ms_p']:8.3f} {r['ms_x']:8.3f} {ratio:6.2f}"
                  + ("" if counted else "  (probe, not counted)")
                  + (f"  lse err {r['extra']['lse_max_abs_err']:.1e}"
                     if "lse_max_abs_err" in r["extra"] else ""))
        except Exception as e:  # noqa: BLE001 - report the case and go on
            ok = False
            msg = f"{type(e).__name__}: {e}"
            row.update(passed=False, error=msg[:4000],
                       traceback=traceback.format_exc()[-4000:])
            print(f"{kernel:9s} {name[:66]:66s} ERROR {msg.splitlines()[0][:300]}"
                  + ("" if counted else "  (probe, not counted)"))
        if counted and not ok:
            failed += 1
        payload["results"].append(row)
        payload["failed_counted"] = failed
        write(json_out, payload)
        sys.stdout.flush()
    for s in payload["skipped"]:
        print(f"skipped: {s['kernel']}: {s['case']}: {s['reason']}")
    n_counted = sum(1 for r in payload["results"] if r["counted"])
    print(f"{n_counted - failed}/{n_counted} counted comparisons passed"
          + (" (interpret mode)" if interpret else " (compiled)"))
    payload["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")
    write(json_out, payload)
    if json_out:
        print(f"wrote {json_out}")
    return 1 if failed else 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
