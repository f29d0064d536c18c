"""Pallas flash-attention forward with per-item lengths: the ``pallas`` backend.

Grid ``(items, heads, query tiles)``. Each program loads one query tile and loops over
key tiles with a trip count read from the item's key length (and the causal diagonal),
so padded key tiles are never loaded; a query tile past the item's query length runs
zero iterations. Lengths need not be multiples of the tile sizes: partial tiles are
masked. Returns the output and the log-sum-exp rows used by the backward pass, which is
the ``tiled`` backend's recomputing backward (``flash_backward``).

On a GPU the kernel compiles through Triton; elsewhere it runs in the Pallas
interpreter (slow, meant for tests). Which one is an argument (``interpret``), never a
global switch. It compiled and matched the XLA path on an H200 once
(``experiments/gpu_pallas_check.py``, BENCHMARKS.md); CI runs it in the interpreter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from vsla_jax.attention.tiled import TiledBackend, TilingStrategy, flash_backward
from vsla_jax.tensor import VarTensor, rows_within
from vsla_jax.util import is_traced, next_pow2, pad_axis, pad_axis_to


def _kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, tq, tk, scale, causal):
    i = pl.program_id(2)
    lq = len_ref[0]
    lk = len_ref[1]
    f32 = jnp.float32  # explicit dtypes: under jax_enable_x64 the defaults are float64
    neg = f32(-0.7 * 3.4e38)
    q = q_ref[...].astype(jnp.float32)  # [tq, D]
    qpos = i * tq + jnp.arange(tq)
    n_k = (lk + tk - 1) // tk
    if causal:
        n_k = jnp.minimum(n_k, ((i + 1) * tq + tk - 1) // tk)
    n_k = jnp.where(i * tq < lq, n_k, 0)

    def body(j, carry):
        m, lsum, acc = carry
        kt = k_ref[pl.ds(j * tk, tk), :].astype(jnp.float32)  # [tk, D]
        vt = v_ref[pl.ds(j * tk, tk), :].astype(jnp.float32)
        s = jnp.dot(q, kt.T) * scale  # [tq, tk]
        kpos = j * tk + jnp.arange(tk)
        mask = kpos[None, :] < lk
        if causal:
            mask = mask & (kpos[None, :] <= qpos[:, None])
        s = jnp.where(mask, s, neg)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), f32(0))
        corr = jnp.exp(m - m_new)
        return m_new, lsum * corr + p.sum(axis=1), acc * corr[:, None] + jnp.dot(p, vt)

    dv = v_ref.shape[-1]  # the value head size (may differ from the query/key one)
    m, lsum, acc = jax.lax.fori_loop(
        0, n_k, body, (jnp.full((tq,), neg, f32), jnp.zeros((tq,), f32),
                       jnp.zeros((tq, dv), f32)))
    # rows without keys have lsum == 0; a NaN lsum (NaN/inf input) stays NaN
    valid = (qpos < lq) & (lsum != 0)
    safe = jnp.where(lsum != 0, lsum, f32(1))
    o_ref[...] = jnp.where(valid[:, None], acc / safe[:, None], f32(0)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(valid, m + jnp.log(safe), neg)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "tq", "tk", "interpret"))
def pallas_flash_forward(q, k, v, lq, lk, *, causal: bool, scale: float, tq: int = 64,
                         tk: int = 64, interpret: bool = False):
    """q ``[B, Cq, H, D]``, k ``[B, Ck, Hkv, D]``, v ``[B, Ck, Hkv, Dv]``, lq/lk
    ``int32[B]``.

    Returns ``(out [B, Cq, H, Dv], lse [B, H, Cq] float32)``. ``tq``/``tk``: powers of two.
    """
    b, cq, h, d = q.shape
    dv = v.shape[3]
    if b == 0:  # an empty batch: no program to run (a zero-size grid cannot index lengths)
        return jnp.zeros((0, cq, h, dv), q.dtype), jnp.zeros((0, h, cq), jnp.float32)
    hk = k.shape[2]
    g = h // hk
    qp = pad_axis(q, tq, axis=1)
    ck_pad = max(next_pow2(k.shape[1]), tk)
    kp, vp = pad_axis_to(k, ck_pad, axis=1), pad_axis_to(v, ck_pad, axis=1)
    lens = jnp.pad(jnp.stack([lq, lk], axis=1).astype(jnp.int32), ((0, 0), (0, 6)))
    n_q = qp.shape[1] // tq
    out, lse = pl.pallas_call(
        functools.partial(_kernel, tq=tq, tk=tk, scale=scale, causal=causal),
        out_shape=(jax.ShapeDtypeStruct(qp.shape[:3] + (dv,), q.dtype),
                   jax.ShapeDtypeStruct((b, h, qp.shape[1]), jnp.float32)),
        grid=(b, h, n_q),
        in_specs=[
            pl.BlockSpec((None, 8), lambda bi, hi, i: (bi, 0)),
            pl.BlockSpec((None, tq, None, d), lambda bi, hi, i: (bi, i, hi, 0)),
            pl.BlockSpec((None, ck_pad, None, d), lambda bi, hi, i: (bi, 0, hi // g, 0)),
            pl.BlockSpec((None, ck_pad, None, dv), lambda bi, hi, i: (bi, 0, hi // g, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, tq, None, dv), lambda bi, hi, i: (bi, i, hi, 0)),
            pl.BlockSpec((None, None, tq), lambda bi, hi, i: (bi, hi, i)),
        ],
        interpret=interpret,
    )(lens, qp, kp, vp)
    return out[:, :cq], lse[:, :, :cq]


# -- backend ----------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def pallas_attention(qd, kd, vd, lq, lk, causal, scale, tq, tk, interpret):
    """Differentiable ``pallas_flash_forward`` (backward: ``tiled.flash_backward``)."""
    return _pallas_fwd(qd, kd, vd, lq, lk, causal, scale, tq, tk, interpret)[0]


def _pallas_fwd(qd, kd, vd, lq, lk, causal, scale, tq, tk, interpret):
    # NaN or inf in a slack must not reach a result through 0 * x: zeroed inside the
    # custom VJP (no autodiff of the masks) and saved zeroed for the backward
    qd, kd, vd = rows_within(qd, lq), rows_within(kd, lk), rows_within(vd, lk)
    out, lse = pallas_flash_forward(qd, kd, vd, lq, lk, causal=causal, scale=scale, tq=tq,
                                    tk=tk, interpret=interpret)
    return out, (qd, kd, vd, lq, lk, out, lse)


def _pallas_bwd(causal, scale, tq, tk, interpret, saved, dout):
    q, k, v, lq, lk, out, lse = saved
    return flash_backward(q, k, v, lq, lk, out, lse, dout, causal, scale, tq, tk,
                          q.shape[1], k.shape[1])


pallas_attention.defvjp(_pallas_fwd, _pallas_bwd)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "tq", "tk", "interpret"))
def _pallas_call(q, k, v, causal, scale, tq, tk, interpret):
    out = pallas_attention(q.data, k.data, v.data, q.lengths[:, 0], k.lengths[:, 0], causal,
                           scale, tq, tk, interpret)
    return VarTensor.trusted(out, q.lengths, q.model)


class PallasBackend(TiledBackend):
    """Pallas flash-attention forward; backward recomputes tiles with XLA.

    ``interpret``: run the kernel in the Pallas interpreter (True), compile it (False), or
    interpret exactly when the default JAX backend is not a GPU (None). Tiles are powers
    of two (at least 16, as Triton requires for ``dot``). The kernel computes in float32;
    float64 inputs run the ``tiled`` backend (the same algorithm in XLA) instead."""

    name = "pallas"

    def __init__(self, interpret: bool | None = None, strategy: TilingStrategy | None = None):
        super().__init__(strategy)
        self.interpret = interpret

    def compute(self, q, k, v, causal, scale, plan) -> VarTensor:
        if q.dtype == jnp.float64:  # the kernel scores in float32: float64 runs tiled
            return super().compute(q, k, v, causal, scale, plan)
        interpret = (jax.default_backend() != "gpu") if self.interpret is None else bool(
            self.interpret)
        tq, tk = (max(16, next_pow2(plan[t])) for t in ("tq", "tk"))
        try:
            return _pallas_call(q, k, v, causal, scale, tq, tk, interpret)
        except AssertionError:
            # Pallas fails this way while tracing its kernel's forward-mode derivative
            # (jax.hessian: jvp of the custom VJP's forward); None: the caller runs xla
            if is_traced(q.data):
                return None
            raise
