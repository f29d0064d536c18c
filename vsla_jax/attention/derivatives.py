"""XLA forms of the attention kernels' derivatives, on the kernels' own layout.

The C++ kernels (``attention/cpu.py``) run the forward and the reverse-mode backward.
What they do not run is written here in ``jnp``, over the same operands: the forward-mode
tangent (``tangent``) and the backward as a function of all of its inputs (``backward``,
whose JVP serves forward-over-reverse, e.g. ``jax.hessian``). Both take the saved
log-sum-exp, as the backward kernel does, so they agree with the kernels' outputs.
``forward`` and ``backward`` are also what ``jax.export`` lowers in place of the kernels.

Layout (as the kernels): q ``[B, Cq, Hc, Dc]``, k ``[B, Ck, Hkc, Dc']``, v ``[B, Ck,
Hkc, Dvc]``, of which ``[..., :H, :D]`` etc. are read (``sizes = (H, D, Hkv, Dv)``);
lq/lk int ``[B]`` or ``[B, R]`` (column 0); o ``[B, Cq, H * Dv]`` (heads merged), lse
``[B, H, Cq]`` (-inf on rows without keys). Query i of item b attends keys j < lk[b]
(and j <= i when causal); rows i >= lq[b] are zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vsla_jax.attention.reference import masked_softmax, safe_den


def _column0(lengths: jax.Array) -> jax.Array:
    return lengths if lengths.ndim == 1 else lengths[:, 0]


def _crop(q, k, v, sizes):
    h, d, hkv, dv = sizes
    return q[:, :, :h, :d], k[:, :, :hkv, :d], v[:, :, :hkv, :dv]


def _pad_to(x: jax.Array, shape: tuple) -> jax.Array:
    return jnp.pad(x, [(0, s - n) for n, s in zip(x.shape, shape)])


def _group(x: jax.Array, heads: int) -> jax.Array:
    """K/V heads ``[B, C, Hkv, D]`` -> one per query head ``[B, C, H, D]`` (GQA)."""
    return jnp.repeat(x, heads // x.shape[2], axis=2)


def _ungroup(x: jax.Array, kv_heads: int) -> jax.Array:
    """Gradients per query head ``[B, C, H, D]`` -> summed per K/V head."""
    b, c, h, d = x.shape
    return x.reshape(b, c, kv_heads, h // kv_heads, d).sum(3)


def probabilities(q, k, lq, lk, lse, causal: bool, scale: float):
    """``(P [B, H, Cq, Ck], mask)`` from the cropped q ``[B, Cq, H, D]`` and grouped k
    ``[B, Ck, H, D]`` and the saved lse; zero (and finite everywhere, so that no NaN
    reaches a derivative) where ``mask`` is False."""
    cq, ck = q.shape[1], k.shape[1]
    i, j = jnp.arange(cq)[:, None], jnp.arange(ck)[None, :]
    lq, lk = _column0(lq), _column0(lk)
    mask = (j < lk[:, None, None]) & (i < lq[:, None, None])
    if causal:
        mask = mask & (j <= i)
    mask = mask[:, None] & jnp.isfinite(lse)[..., None]
    s = scale * jnp.einsum("bihd,bjhd->bhij", q, k)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]
    p = jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - safe), 0.0)
    return p, mask


def forward(q, k, v, lq, lk, *, causal: bool, scale: float, sizes):
    """What the forward kernel computes, ``(o [B, Cq, H * Dv], lse [B, H, Cq], lengths
    int32 [B, 1])``, in XLA ops (what ``jax.export`` lowers)."""
    h, _, _, dv = sizes
    qc, kc, vc = _crop(q, k, v, sizes)
    kg, vg = _group(kc, h), _group(vc, h)
    finite = jnp.zeros(q.shape[:1] + (h, q.shape[1]), q.dtype)  # every row, for the mask
    _, mask = probabilities(qc, kg, lq, lk, finite, causal, scale)
    p, m, den = masked_softmax(scale * jnp.einsum("bihd,bjhd->bhij", qc, kg), mask)
    lse = jnp.where(den[..., 0] > 0, m[..., 0] + jnp.log(safe_den(den[..., 0])), -jnp.inf)
    o = jnp.einsum("bhij,bjhd->bihd", p / safe_den(den), vg)
    b, cq = q.shape[:2]
    lengths = _column0(lq).astype(jnp.int32)[:, None]
    return o.reshape(b, cq, h * dv).astype(q.dtype), lse.astype(q.dtype), lengths


def tangent(q, k, v, lq, lk, o, lse, tq, tk, tv, *, causal: bool, scale: float, sizes):
    """The forward-mode tangent of (o, lse) for tangents (tq, tk, tv) of (q, k, v): linear
    in them. Returns ``(t_o [B, Cq, H * Dv], t_lse [B, H, Cq])``."""
    del o
    h, _, _, dv = sizes
    qc, kc, vc = _crop(q, k, v, sizes)
    tqc, tkc, tvc = _crop(tq, tk, tv, sizes)
    kg, vg, tkg, tvg = (_group(x, h) for x in (kc, vc, tkc, tvc))
    p, mask = probabilities(qc, kg, lq, lk, lse, causal, scale)
    ts = scale * (jnp.einsum("bihd,bjhd->bhij", tqc, kg) + jnp.einsum("bihd,bjhd->bhij", qc, tkg))
    ts = jnp.where(mask, ts, 0.0)
    t_lse = jnp.sum(p * ts, axis=-1)
    tp = p * (ts - t_lse[..., None])
    t_o = jnp.einsum("bhij,bjhd->bihd", tp, vg) + jnp.einsum("bhij,bjhd->bihd", p, tvg)
    b, cq = q.shape[:2]
    return t_o.reshape(b, cq, h * dv).astype(q.dtype), t_lse.astype(lse.dtype)


def backward(q, k, v, lq, lk, o, lse, do, *, causal: bool, scale: float, sizes):
    """What the backward kernel computes, ``(dq, dk, dv)`` with heads merged (shapes of
    q, k, v with their last two axes merged, zero in the padding), as a function of all
    of its inputs (FlashAttention-2's formulas over the saved o and lse)."""
    h, d, hkv, dv = sizes
    qc, kc, vc = _crop(q, k, v, sizes)
    kg, vg = _group(kc, h), _group(vc, h)
    b, cq = q.shape[:2]
    o4 = o.reshape(b, cq, h, dv)
    do4 = do.reshape(b, cq, h, dv)
    p, mask = probabilities(qc, kg, lq, lk, lse, causal, scale)
    dp = jnp.einsum("bihd,bjhd->bhij", do4, vg)
    di = jnp.einsum("bihd,bihd->bhi", do4, o4)
    ds = jnp.where(mask, p * (dp - di[..., None]), 0.0)
    dq = scale * jnp.einsum("bhij,bjhd->bihd", ds, kg)
    dk = _ungroup(scale * jnp.einsum("bhij,bihd->bjhd", ds, qc), hkv)
    dvv = _ungroup(jnp.einsum("bhij,bihd->bjhd", p, do4), hkv)
    out = []
    for g, x in ((dq, q), (dk, k), (dvv, v)):
        full = _pad_to(g.astype(x.dtype), x.shape)
        out.append(full.reshape(*x.shape[:2], x.shape[2] * x.shape[3]))
    return tuple(out)
