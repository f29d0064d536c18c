"""Pallas flash-attention forward with per-item lengths (GPU; interpret mode on CPU).

Grid ``(items, heads, query tiles)``. Each program loads one query tile and loops over
key tiles with a trip count read from the item's key length (and the causal diagonal),
so padded key tiles are never loaded; a query tile past the item's query length runs
zero iterations. Lengths need not be multiples of the tile sizes: partial tiles are
masked. Returns the output and the log-sum-exp rows used by the backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, tq, tk, scale, causal):
    i = pl.program_id(2)
    lq = len_ref[0]
    lk = len_ref[1]
    neg = jnp.float32(-0.7 * 3.4e38)
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
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        corr = jnp.exp(m - m_new)
        return m_new, lsum * corr + p.sum(axis=1), acc * corr[:, None] + jnp.dot(p, vt)

    d = q.shape[1]
    m, lsum, acc = jax.lax.fori_loop(
        0, n_k, body, (jnp.full((tq,), neg), jnp.zeros((tq,)), jnp.zeros((tq, d))))
    valid = (qpos < lq) & (lsum > 0)
    safe = jnp.where(lsum > 0, lsum, 1.0)
    o_ref[...] = jnp.where(valid[:, None], acc / safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(valid, m + jnp.log(safe), neg)


def _pad_axis1(x, multiple):
    extra = (-x.shape[1]) % multiple
    return jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2)) if extra else x


@functools.partial(jax.jit, static_argnames=("causal", "scale", "tq", "tk", "interpret"))
def pallas_flash_forward(q, k, v, lq, lk, *, causal: bool, scale: float, tq: int = 64,
                         tk: int = 64, interpret: bool = False):
    """q ``[B, Cq, H, D]``, k/v ``[B, Ck, Hkv, D]``, lq/lk ``int32[B]``.

    Returns ``(out [B, Cq, H, D], lse [B, H, Cq] float32)``. ``tq``/``tk``: powers of two.
    """
    b, cq, h, d = q.shape
    hk = k.shape[2]
    g = h // hk
    qp = _pad_axis1(q, tq)
    ck_pad = 1 << max(int(k.shape[1]) - 1, 0).bit_length()
    ck_pad = max(ck_pad, tk)
    kp = jnp.pad(k, [(0, 0), (0, ck_pad - k.shape[1]), (0, 0), (0, 0)])
    vp = jnp.pad(v, [(0, 0), (0, ck_pad - v.shape[1]), (0, 0), (0, 0)])
    lens = jnp.pad(jnp.stack([lq, lk], axis=1).astype(jnp.int32), ((0, 0), (0, 6)))
    n_q = qp.shape[1] // tq
    out, lse = pl.pallas_call(
        functools.partial(_kernel, tq=tq, tk=tk, scale=scale, causal=causal),
        out_shape=(jax.ShapeDtypeStruct(qp.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, qp.shape[1]), jnp.float32)),
        grid=(b, h, n_q),
        in_specs=[
            pl.BlockSpec((None, 8), lambda bi, hi, i: (bi, 0)),
            pl.BlockSpec((None, tq, None, d), lambda bi, hi, i: (bi, i, hi, 0)),
            pl.BlockSpec((None, ck_pad, None, d), lambda bi, hi, i: (bi, 0, hi // g, 0)),
            pl.BlockSpec((None, ck_pad, None, d), lambda bi, hi, i: (bi, 0, hi // g, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, tq, None, d), lambda bi, hi, i: (bi, i, hi, 0)),
            pl.BlockSpec((None, None, tq), lambda bi, hi, i: (bi, hi, i)),
        ],
        interpret=interpret,
    )(lens, qp, kp, vp)
    return out[:, :cq], lse[:, :, :cq]
