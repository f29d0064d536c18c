"""LOSSY approximate attention (opt-in, never used by ``attention``).

Keys are cut into tiles; a tile whose keys barely differ keeps only every ``s``-th key,
and each kept key stands for the positions it replaces (``+log(count)`` on its score),
so tiles of identical keys and values are exact without ``causal`` (with it, a kept key
may stand for positions on both sides of a query's diagonal). The implementation is the dense
reference (``reference.dense_attention``) with a key mask and a key bias: it measures
the error of the approximation, not a speed-up.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from vsla_jax.attention.api import check_causal, check_inputs, check_scale
from vsla_jax.attention.reference import dense_attention
from vsla_jax.tensor import VarTensor
from vsla_jax.util import pad_axis


@dataclasses.dataclass(frozen=True)
class ApproxConfig:
    """Settings of the LOSSY approximate attention (never used unless asked for).

    Keys are cut into tiles of ``tile`` positions. A tile's statistic is the relative
    spread of its keys, ``mean ||k_j - mean(k)||^2 / mean ||k_j||^2`` (over heads);
    its resolution is ``r = clip(spread / spread_ref, r_min, 1)``, rounded down to a power
    of two ``1/s``. A tile at resolution ``1/s`` keeps every ``s``-th key, and each kept
    key stands for the ``s`` positions it replaces (its score gets ``+ log(count)``), so a
    tile of identical keys and values is represented exactly.
    """

    tile: int = 16
    r_min: float = 0.25
    spread_ref: float = 0.5

    def __post_init__(self):
        if not 0 < self.r_min <= 1 or self.tile < 1 or self.spread_ref <= 0:
            raise ValueError(f"invalid ApproxConfig {self}")


def _approx_keep(kd, lk, cfg: ApproxConfig):
    """Per key position: kept (bool) and multiplicity (float), ``[B, Ck]`` each, and the
    stride of every key tile ``[B, n_tiles]``."""
    b, ck = kd.shape[:2]
    t = cfg.tile
    kp = pad_axis(kd.astype(jnp.float32), t, axis=1)
    n_tiles = kp.shape[1] // t
    pos = jnp.arange(kp.shape[1])
    valid = pos[None, :] < lk[:, None]  # [B, C]
    vt = valid.reshape(b, n_tiles, t)
    kt = kp.reshape(b, n_tiles, t, -1) * vt[..., None]
    cnt = jnp.maximum(vt.sum(-1, keepdims=True), 1)
    mean = kt.sum(2, keepdims=True) / cnt[..., None]
    spread = (((kt - mean) ** 2).sum(-1) * vt).sum(-1) / cnt[..., 0]
    energy = ((kt ** 2).sum(-1) * vt).sum(-1) / cnt[..., 0]
    rel = spread / jnp.maximum(energy, 1e-30)
    r = jnp.clip(rel / cfg.spread_ref, cfg.r_min, 1.0)
    stride = 2 ** jnp.floor(jnp.log2(1.0 / r)).astype(jnp.int32)  # [B, n_tiles]
    s = jnp.repeat(stride, t, axis=1)  # per position
    within = pos % t
    keep = (within[None, :] % s == 0) & valid
    # multiplicity: valid positions in [j, j + s) inside the same tile
    group_end = jnp.minimum(pos[None, :] + s, (pos[None, :] // t + 1) * t)
    mult = jnp.clip(jnp.minimum(group_end, lk[:, None]) - pos[None, :], 1, None)
    return keep[:, :ck], mult[:, :ck].astype(jnp.float32), stride


@functools.partial(jax.jit, static_argnames=("causal", "scale", "cfg"))
def _approx_call(q, k, v, causal, scale, cfg):
    lq, lk = q.lengths[:, 0], k.lengths[:, 0]
    keep, mult, stride = _approx_keep(k.data, lk, cfg)
    out = dense_attention(q.data, k.data, v.data, lq, lk, causal, scale, key_mask=keep,
                          key_bias=jnp.log(mult))
    kept = keep.sum() / jnp.maximum(lk.sum(), 1)
    return VarTensor.trusted(out, q.lengths, q.model), kept, stride


def approximate_attention(q: VarTensor, k: VarTensor, v: VarTensor, *, causal: bool = False,
                          scale: float | None = None,
                          config: ApproxConfig | None = None) -> tuple[VarTensor, dict]:
    """LOSSY attention that subsamples low-information key tiles (see ``ApproxConfig``).

    Exact attention (``attention``) is the default everywhere; use this only when an
    error against exact attention has been measured and accepted. Returns the output
    and ``{"kept_fraction", "tile_strides"}`` (the fraction of real keys kept, and the
    stride chosen for every key tile). The reference implementation is dense and masked:
    it shows the error, not a speed-up; a tiled kernel would skip the dropped keys.
    """
    q, k, v = check_inputs(q, k, v)
    scale = check_scale(scale, q.features[1])
    out, kept, stride = _approx_call(q, k, v, check_causal(causal), scale, config or ApproxConfig())
    return out, dict(kept_fraction=float(kept), tile_strides=np.asarray(stride))
