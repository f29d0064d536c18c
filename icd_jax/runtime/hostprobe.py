"""The host probe: does int8 pay on this CPU? float32 vs int8 GEMM rates at a model's shapes.

int8 x int8 -> int32 matmuls beat float32 only on CPUs with VNNI or AMX (the same XLA
program is slower than float32 on an AVX2-only host). ``gemm_rates`` times both, plus the
int8 matmul with its activation quantisation (what a W8A8 layer runs), at the model's own
``(m, k, n)`` shapes, so ``metrics.json`` and the report say why int8 is or is not faster
here. The CPU flags that decide it are read from ``/proc/cpuinfo``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")
#: int8 must beat float32 by this factor (whole W8A8 layer) for "fast int8".
FAST_INT8 = 1.3


def cpu_flags(names: Sequence[str] = FLAGS, path: str = "/proc/cpuinfo") -> dict[str, bool]:
    """``{flag: present}`` for ``names`` from the first ``flags`` line of ``path`` (all
    False where the file is absent, e.g. off Linux)."""
    try:
        with open(path) as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        line = ""
    have = set(line.split(":", 1)[-1].split())
    return {n: n in have for n in names}


def _median_s(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


@jax.jit
def _f32(x, w):
    return x @ w


@jax.jit
def _i8(xq, wq):
    return lax.dot_general(xq, wq, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)


@jax.jit
def _w8a8(x, wq, s):
    amax = jnp.abs(x).max(axis=-1, keepdims=True)
    sx = jnp.where(amax > 0, amax / 127.0, 1.0)
    xq = jnp.clip(jnp.round(x / sx), -127, 127).astype(jnp.int8)
    return _i8(xq, wq).astype(jnp.float32) * sx * s


def gemm_rates(shapes: Sequence[tuple[int, int, int]], repeats: int = 10,
               seed: int = 0) -> dict:
    """float32 vs int8 rates (GOP/s, ``2 m k n`` ops per call) at each ``(m, k, n)``.

    Returns ``{"shapes": [{m, k, n, f32_gops, int8_gops, w8a8_gops}], "f32_gops",
    "int8_gops", "w8a8_gops"`` (op-weighted over shapes), ``"int8_speedup"`` (int8 dot
    alone vs f32), ``"w8a8_speedup"`` (with activation quantisation vs f32),
    ``"fast_int8"`` (``w8a8_speedup >= FAST_INT8``), ``"flags"`` and ``"method"``}.
    """
    rng = np.random.default_rng(seed)
    rows, ops, t_f, t_i, t_w = [], 0.0, 0.0, 0.0, 0.0
    for m, k, n in shapes:
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
        xq = jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8)
        wq = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
        s = jnp.ones((n,), jnp.float32)
        op = 2.0 * m * k * n
        f, i, q = (_median_s(_f32, (x, w), repeats), _median_s(_i8, (xq, wq), repeats),
                   _median_s(_w8a8, (x, wq, s), repeats))
        rows.append(dict(m=m, k=k, n=n, f32_gops=op / f / 1e9, int8_gops=op / i / 1e9,
                         w8a8_gops=op / q / 1e9))
        ops, t_f, t_i, t_w = ops + op, t_f + f, t_i + i, t_w + q
    out = dict(shapes=rows, f32_gops=ops / t_f / 1e9, int8_gops=ops / t_i / 1e9,
               w8a8_gops=ops / t_w / 1e9, int8_speedup=t_f / t_i, w8a8_speedup=t_f / t_w,
               flags=cpu_flags(), backend=jax.default_backend(),
               method=f"median of {repeats} jitted calls per shape after one warm-up; "
                      "int8: int8 x int8 -> int32 dot_general; w8a8: the same with "
                      "per-token activation quantisation")
    out["fast_int8"] = bool(out["w8a8_speedup"] >= FAST_INT8)
    return out


def describe(probe: dict | None) -> str:
    """One line for gates and summaries: the rates and the flags that decide them."""
    if not probe:
        return "host probe not run"
    flags = ", ".join(f for f, on in probe.get("flags", {}).items() if on) or "none"
    return (f"host probe: float32 {probe['f32_gops']:.0f} GOP/s, int8 "
            f"{probe['int8_gops']:.0f} GOP/s, W8A8 layer {probe['w8a8_gops']:.0f} GOP/s "
            f"({probe['w8a8_speedup']:.2f}x float32; CPU flags: {flags})")
