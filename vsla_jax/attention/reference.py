"""Dense masked attention over the padded batch: the ``xla`` backend (the reference).

``masked_softmax`` is the one masked softmax of the package: the reference, the
approximate mode and every step of the ``bucketed`` backend call it (the flash-style
``tiled`` backend and the Pallas kernel keep an online softmax instead).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vsla_jax.tensor import VarTensor, rows_within
from vsla_jax.util import neg_inf


def masked_softmax(s: jax.Array, mask: jax.Array | None = None):
    """Unnormalised softmax of the scores ``s`` over the last axis, restricted to ``mask``.

    Returns ``(p, m, den)``: ``p = exp(s - m)`` (exactly 0 where ``mask`` is False), the
    row maximum ``m`` (gradient stopped; masked scores count as ``neg_inf``) and the row
    sum ``den`` (both with a trailing axis of 1). Divide after the value matmul,
    ``(p @ v) / den``, which touches ``D`` numbers per row instead of ``Lk``; rows without
    any allowed key have ``den == 0`` (use ``safe_den``). ``m + log(den)`` is the row's
    log-sum-exp. ``mask=None``: masking is already in ``s`` (an additive ``neg_inf``
    bias), and rows without keys are the caller's to zero.
    """
    if mask is not None:
        s = jnp.where(mask, s, neg_inf(s.dtype))
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - m)
    if mask is not None:
        p = jnp.where(mask, p, 0)
    return p, m, jnp.sum(p, axis=-1, keepdims=True)


def safe_den(den: jax.Array) -> jax.Array:
    """``den`` with zeros replaced by 1 (rows without keys divide to 0, not NaN)."""
    return jnp.where(den > 0, den, 1)


def dense_attention(qd, kd, vd, lq, lk, causal: bool, scale: float, *, key_mask=None,
                    key_bias=None):
    """qd ``[B, Cq, H, D]``, kd ``[B, Ck, Hkv, D]``, vd ``[B, Ck, Hkv, Dv]``, lq/lk ``[B]``
    -> ``[B, Cq, H, Dv]``.

    Query ``i`` of item ``b`` attends to keys ``j < lk[b]`` (and ``j <= i`` when causal);
    rows ``i >= lq[b]`` and rows without keys are 0. ``key_mask`` ``[B, Ck]`` bool
    replaces the key-length mask (keys that take part); ``key_bias`` ``[B, Ck]`` is added
    to the scaled scores. Autodiff gives the gradients.
    """
    h, hk = qd.shape[2], kd.shape[2]
    dtype, ct = qd.dtype, jnp.promote_types(qd.dtype, jnp.float32)  # scores in >= f32
    qd = rows_within(qd, lq).astype(ct)  # NaN/inf in a slack must not reach 0 * x
    if key_mask is None:
        kd, vd = rows_within(kd, lk), rows_within(vd, lk)
    else:
        kd, vd = (jnp.where(key_mask[:, :, None, None], x, jnp.zeros((), x.dtype))
                  for x in (kd, vd))
    kd = jnp.repeat(kd.astype(ct), h // hk, axis=2)
    vd = jnp.repeat(vd.astype(ct), h // hk, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", qd, kd, precision="highest") * scale
    if key_bias is not None:
        s = s + key_bias[:, None, None, :]
    qpos, kpos = jnp.arange(qd.shape[1]), jnp.arange(kd.shape[1])
    keys = kpos[None, :] < lk[:, None] if key_mask is None else key_mask
    mask = keys[:, None, None, :]
    if causal:
        mask = mask & (kpos[None, None, None, :] <= qpos[None, None, :, None])
    p, _, den = masked_softmax(s, mask)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, vd, precision="highest")
    out = out / jnp.swapaxes(safe_den(den), 1, 2)
    return jnp.where((qpos[None, :] < lq[:, None])[:, :, None, None], out, 0).astype(dtype)


@functools.partial(jax.jit, static_argnames=("causal", "scale"))
def _xla_call(q: VarTensor, k: VarTensor, v: VarTensor, causal: bool, scale: float):
    out = dense_attention(q.data, k.data, v.data, q.lengths[:, 0], k.lengths[:, 0], causal,
                          scale)
    return VarTensor.trusted(out, q.lengths, q.model)


class XLABackend:
    """Dense masked attention over the padded batch (``dense_attention``): costs
    ``capacity^2`` per item whatever its length; every other backend is tested against
    it."""

    name = "xla"

    def prepare(self, q, k, v) -> dict:
        return {}

    def optimize_tiling(self, q, k) -> dict:
        return {}

    def compute(self, q, k, v, causal, scale, plan) -> VarTensor:
        return _xla_call(q, k, v, causal, scale)
