"""Variable-length attention over ragged batches, with interchangeable backends.

``attention(q, k, v, causal=False, scale=None, backend="auto", tile=None)`` takes
VarTensors with ``rank=1`` and ``features=(H, D)`` (K/V may have fewer heads: grouped-
query attention when ``H % H_kv == 0``) and returns a VarTensor shaped like ``q`` with
zero slack. Query ``i`` of item ``b`` attends to keys ``j < lk[b]`` (and ``j <= i`` when
causal, positions aligned at the start); items with no keys return zeros.

Backends (all exact):
  ``xla``       dense masked attention over the padded batch (the reference);
  ``bucketed``  items grouped by capacity bucket, dense attention per bucket;
  ``tiled``     flash-style online softmax; loops run ``ceil(len / tile)`` trips per
                item, so fully padded query and key tiles are never computed; custom
                VJP that recomputes scores tile by tile instead of storing them;
  ``pallas``    a Pallas kernel with per-item dynamic trip counts (GPU; the Pallas
                interpreter elsewhere, which is slow and meant for tests), with the
                ``tiled`` recomputing backward.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from vsla_jax.attention.bucketed import (
    BucketPlan,
    _neg,
    bucketed_attention,
    plan_groups,
    switch_caps,
    switched_attention,
)
from vsla_jax.errors import LengthError, ShapeError, VSLATypeError
from vsla_jax.tensor import VarTensor

BACKENDS = ("xla", "bucketed", "tiled", "pallas")


# -- validation -------------------------------------------------------------------------
def _check(q: VarTensor, k: VarTensor, v: VarTensor):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, VarTensor):
            raise VSLATypeError(f"attention: {name} must be a VarTensor")
        if x.rank != 1 or len(x.features) != 2 or x.batch_ndim != 1:
            raise ShapeError(
                f"attention: {name} must be a batch (B,) of rank-1 items with features (H, D); "
                f"got batch {x.batch_shape}, rank {x.rank}, features {x.features}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise VSLATypeError(f"attention: {name} must be floating, got {x.dtype}")
    if not (q.batch_shape == k.batch_shape == v.batch_shape):
        raise ShapeError(f"attention: batch shapes differ {q.batch_shape}, {k.batch_shape}, "
                         f"{v.batch_shape}")
    (h, d), (hk, dk), (hv, _) = q.features, k.features, v.features
    if dk != d or hk != hv or k.capacity != v.capacity:
        raise ShapeError(f"attention: k/v features {k.features}/{v.features} or capacities "
                         f"{k.capacity}/{v.capacity} do not match q head size {d}")
    if h % hk:
        raise ShapeError(f"attention: {h} query heads are not a multiple of {hk} K/V heads")
    if not isinstance(k.lengths, jax.core.Tracer) and not isinstance(v.lengths, jax.core.Tracer):
        if not np.array_equal(np.asarray(k.lengths), np.asarray(v.lengths)):
            raise LengthError("attention: k and v lengths differ")


# -- xla (reference) --------------------------------------------------------------------
def _dense(qd, kd, vd, lq, lk, causal: bool, scale: float):
    """qd [B, Cq, H, D], kd/vd [B, Ck, Hkv, D]; lq/lk [B] -> [B, Cq, H, D]."""
    h, hk = qd.shape[2], kd.shape[2]
    kd = jnp.repeat(kd, h // hk, axis=2)
    vd = jnp.repeat(vd, h // hk, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", qd, kd, precision="highest") * scale
    qpos = jnp.arange(qd.shape[1])
    kpos = jnp.arange(kd.shape[1])
    mask = kpos[None, None, None, :] < lk[:, None, None, None]
    if causal:
        mask = mask & (kpos[None, None, None, :] <= qpos[None, None, :, None])
    s = jnp.where(mask, s, _neg(s.dtype))
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - m) * mask
    den = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(den > 0, den, 1)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, vd, precision="highest")
    return jnp.where((qpos[None, :] < lq[:, None])[:, :, None, None], out, 0).astype(qd.dtype)


# -- tiled (flash-style, skips padded tiles) --------------------------------------------
def _pad_to(x, multiple):
    n = x.shape[0]
    extra = (-n) % multiple
    return jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1)) if extra else x


def _cdiv(a, b):
    return (a + b - 1) // b


def _key_tiles(lk, i, tq: int, tk: int, causal: bool):
    """Key tiles that query tile ``i`` needs: up to the item's length (and the diagonal)."""
    n_k = _cdiv(lk, tk)
    return jnp.minimum(n_k, _cdiv((i + 1) * tq, tk)) if causal else n_k


def _kv_tile(k, v, j, tk: int, g: int, dtype):
    """Key/value tile ``j`` with K/V heads repeated ``g`` times (GQA), in ``dtype``."""
    kt = jax.lax.dynamic_slice_in_dim(k, j * tk, tk)
    vt = jax.lax.dynamic_slice_in_dim(v, j * tk, tk)
    return jnp.repeat(kt, g, axis=1).astype(dtype), jnp.repeat(vt, g, axis=1).astype(dtype)


def _tile_scores(qt, kt, j, tk: int, lk, qpos, causal: bool, scale: float):
    """Scaled scores ``[H, tq, tk]`` of a query tile against key tile ``j`` and the mask
    of keys inside the item (and at or before each query when causal)."""
    s = jnp.einsum("qhd,khd->hqk", qt, kt, precision="highest") * scale
    kpos = j * tk + jnp.arange(tk)
    mask = (kpos < lk)[None, None, :]
    if causal:
        mask = mask & (kpos[None, :] <= qpos[:, None])[None]
    return s, mask


def _flash_fwd_item(q, k, v, lq, lk, causal, scale, tq, tk):
    """One item. q [Cq, H, D], k/v [Ck, Hkv, D] (padded to tile multiples).

    Returns out [Cq, H, D] and lse [H, Cq] (log-sum-exp of the scaled scores).
    """
    cq, h, d = q.shape
    g = h // k.shape[1]
    ct = jnp.promote_types(q.dtype, jnp.float32)  # compute dtype
    neg = _neg(ct)
    out0 = jnp.zeros((cq, h, d), q.dtype)
    lse0 = jnp.full((h, cq), neg, ct)

    def q_body(i, carry):
        out, lse = carry
        qt = jax.lax.dynamic_slice_in_dim(q, i * tq, tq).astype(ct)  # [tq, H, D]
        qpos = i * tq + jnp.arange(tq)
        n_k = _key_tiles(lk, i, tq, tk, causal)

        def k_body(j, c):
            m, lsum, acc = c
            kt, vt = _kv_tile(k, v, j, tk, g, ct)
            s, mask = _tile_scores(qt, kt, j, tk, lk, qpos, causal, scale)
            s = jnp.where(mask, s, neg)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.exp(s - m_new[..., None]) * mask
            corr = jnp.exp(m - m_new)
            lsum = lsum * corr + p.sum(axis=-1)
            acc = acc * corr[..., None] + jnp.einsum("hqk,khd->hqd", p, vt,
                                                     precision="highest")
            return m_new, lsum, acc

        init = (jnp.full((h, tq), neg, ct), jnp.zeros((h, tq), ct), jnp.zeros((h, tq, d), ct))
        m, lsum, acc = jax.lax.fori_loop(0, n_k, k_body, init)
        valid = (qpos < lq)[None, :] & (lsum > 0)
        o = jnp.where(valid[..., None], acc / jnp.where(lsum > 0, lsum, 1)[..., None], 0)
        out = jax.lax.dynamic_update_slice_in_dim(
            out, jnp.transpose(o, (1, 0, 2)).astype(out.dtype), i * tq, axis=0)
        lse_t = jnp.where(valid, m + jnp.log(jnp.where(lsum > 0, lsum, 1)), neg)
        lse = jax.lax.dynamic_update_slice_in_dim(lse, lse_t, i * tq, axis=1)
        return out, lse

    return jax.lax.fori_loop(0, _cdiv(lq, tq), q_body, (out0, lse0))


def _flash_bwd_item(q, k, v, lq, lk, out, lse, dout, causal, scale, tq, tk):
    """Gradients for one item, recomputing scores tile by tile (flash backward)."""
    cq, h, d = q.shape
    hk = k.shape[1]
    g = h // hk
    ct = jnp.promote_types(q.dtype, jnp.float32)
    delta = jnp.einsum("qhd,qhd->hq", dout.astype(ct), out.astype(ct))
    dq0 = jnp.zeros(q.shape, ct)
    dk0 = jnp.zeros(k.shape, ct)
    dv0 = jnp.zeros(v.shape, ct)

    def q_body(i, carry):
        dq, dk, dv = carry
        qt = jax.lax.dynamic_slice_in_dim(q, i * tq, tq).astype(ct)
        dot = jax.lax.dynamic_slice_in_dim(dout, i * tq, tq).astype(ct)
        lse_t = jax.lax.dynamic_slice_in_dim(lse, i * tq, tq, axis=1)
        dl_t = jax.lax.dynamic_slice_in_dim(delta, i * tq, tq, axis=1)
        qpos = i * tq + jnp.arange(tq)
        n_k = _key_tiles(lk, i, tq, tk, causal)

        def k_body(j, c):
            dq_t, dk, dv = c
            kt, vt = _kv_tile(k, v, j, tk, g, ct)
            s, mask = _tile_scores(qt, kt, j, tk, lk, qpos, causal, scale)
            mask = mask & (qpos < lq)[None, :, None]
            p = jnp.where(mask, jnp.exp(s - lse_t[..., None]), 0)
            dv_t = jnp.einsum("hqk,qhd->khd", p, dot, precision="highest")
            dp = jnp.einsum("qhd,khd->hqk", dot, vt, precision="highest")
            ds = p * (dp - dl_t[..., None]) * scale
            dq_t = dq_t + jnp.einsum("hqk,khd->qhd", ds, kt, precision="highest")
            dk_t = jnp.einsum("hqk,qhd->khd", ds, qt, precision="highest")
            fold = lambda x: x.reshape(tk, hk, g, d).sum(axis=2)  # GQA: sum head groups
            dk = jax.lax.dynamic_update_slice_in_dim(
                dk, jax.lax.dynamic_slice_in_dim(dk, j * tk, tk) + fold(dk_t), j * tk, axis=0)
            dv = jax.lax.dynamic_update_slice_in_dim(
                dv, jax.lax.dynamic_slice_in_dim(dv, j * tk, tk) + fold(dv_t), j * tk, axis=0)
            return dq_t, dk, dv

        dq_t, dk, dv = jax.lax.fori_loop(0, n_k, k_body, (jnp.zeros((tq, h, d), ct), dk, dv))
        dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_t, i * tq, axis=0)
        return dq, dk, dv

    dq, dk, dv = jax.lax.fori_loop(0, _cdiv(lq, tq), q_body, (dq0, dk0, dv0))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(qd, kd, vd, lq, lk, causal, scale, tq, tk):
    out, _ = _flash_fwd(qd, kd, vd, lq, lk, causal, scale, tq, tk)
    return out


def _items(fn, *xs):
    """Run ``fn`` item by item (``lax.map``): every item keeps its own trip counts."""
    return jax.lax.map(lambda args: fn(*args), xs)


def _flash_fwd(qd, kd, vd, lq, lk, causal, scale, tq, tk):
    cq = qd.shape[1]
    qp = jnp.swapaxes(_pad_to(jnp.swapaxes(qd, 0, 1), tq), 0, 1)
    kp = jnp.swapaxes(_pad_to(jnp.swapaxes(kd, 0, 1), tk), 0, 1)
    vp = jnp.swapaxes(_pad_to(jnp.swapaxes(vd, 0, 1), tk), 0, 1)
    out, lse = _items(lambda q, k, v, a, b: _flash_fwd_item(q, k, v, a, b, causal, scale, tq, tk),
                      qp, kp, vp, lq, lk)
    return out[:, :cq], (qp, kp, vp, lq, lk, out, lse)


def _flash_fwd_rule(qd, kd, vd, lq, lk, causal, scale, tq, tk):
    out, res = _flash_fwd(qd, kd, vd, lq, lk, causal, scale, tq, tk)
    return out, (res, qd.shape[1], kd.shape[1])


def _flash_bwd_rule(causal, scale, tq, tk, saved, dout):
    (qp, kp, vp, lq, lk, out, lse), cq, ck = saved
    return _flash_backward(qp, kp, vp, lq, lk, out, lse, dout, causal, scale, tq, tk, cq, ck)


def _pad_seq(x, multiple, axis=1):
    extra = (-x.shape[axis]) % multiple
    if not extra:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, extra)
    return jnp.pad(x, pads)


def _flash_backward(q, k, v, lq, lk, out, lse, dout, causal, scale, tq, tk, cq, ck):
    """Tile-by-tile recomputing backward for all items; pads to tile multiples first.

    q/out/dout ``[B, *, H, D]``, k/v ``[B, *, Hkv, D]``, lse ``[B, H, *]``.
    """
    qp, outp, dop = (_pad_seq(x, tq) for x in (q, out, dout))
    kp, vp = _pad_seq(k, tk), _pad_seq(v, tk)
    lsep = _pad_seq(lse, tq, axis=2)
    dq, dk, dv = _items(
        lambda q, k, v, a, b, o, s, do: _flash_bwd_item(q, k, v, a, b, o, s, do, causal, scale,
                                                        tq, tk),
        qp, kp, vp, lq, lk, outp, lsep, dop)
    zero_int = lambda x: np.zeros(x.shape, jax.dtypes.float0)
    return dq[:, :cq], dk[:, :ck], dv[:, :ck], zero_int(lq), zero_int(lk)


_flash.defvjp(_flash_fwd_rule, _flash_bwd_rule)


# -- tiling strategy --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TilingStrategy:
    """Tile sizes from the length distribution, head size, dtype and a memory budget.

    ``compute_optimal_tile_size`` picks, among ``candidates`` that fit the budget, the
    tile minimising padded work ``sum(ceil(L / t) * t)`` plus a per-tile overhead of
    ``overhead_positions`` (loop and dispatch cost expressed in sequence positions).
    """

    candidates: tuple[int, ...] = (16, 32, 64, 128, 256)
    overhead_positions: int | None = None

    def overhead(self) -> int:
        """Per-tile overhead in positions: measured loop/dispatch cost is far higher per
        tile on CPU (256) than on GPU (16); set ``overhead_positions`` to override."""
        if self.overhead_positions is not None:
            return self.overhead_positions
        return 16 if jax.default_backend() == "gpu" else 256

    def working_set_bytes(self, tile: int, heads: int, head_dim: int, itemsize: int) -> int:
        # q tile, k and v tiles, score tile, accumulator (float32)
        return (3 * tile * heads * head_dim * itemsize
                + 4 * heads * tile * tile + 4 * heads * tile * head_dim)

    def compute_optimal_tile_size(self, seq_len, available_memory: int | None = None,
                                  constraints: dict | None = None) -> int:
        """``seq_len``: one length or an array of lengths. ``available_memory``: bytes
        for one tile's working set (default 16 MiB on CPU, where caches are large and
        big tiles amortise loop overhead; 192 KiB on GPU, about one SM's shared memory).
        ``constraints``: ``heads``, ``head_dim``, ``itemsize``, ``multiple_of``."""
        if available_memory is None:
            available_memory = (192 << 10) if jax.default_backend() == "gpu" else (16 << 20)
        c = dict(heads=8, head_dim=64, itemsize=4, multiple_of=1) | (constraints or {})
        lengths = np.atleast_1d(np.asarray(seq_len, np.int64))
        best, best_cost = None, math.inf
        for t in self.candidates:
            if t % c["multiple_of"]:
                continue
            if self.working_set_bytes(t, c["heads"], c["head_dim"], c["itemsize"]) > (
                    available_memory) and best is not None:
                continue
            tiles = -(-lengths // t)
            cost = float((tiles * t).sum() + self.overhead() * tiles.sum())
            if cost < best_cost:
                best, best_cost = t, cost
        return int(best if best is not None else self.candidates[0])

    def split_into_tiles(self, lengths, tile: int) -> list[tuple[int, int, int]]:
        """``(item, start, size)`` for every tile holding at least one real position."""
        out = []
        for b, n in enumerate(np.asarray(lengths, np.int64).reshape(-1)):
            out.extend((b, s, int(min(tile, n - s))) for s in range(0, int(n), tile))
        return out


# -- backends ---------------------------------------------------------------------------
class AttentionBackend(Protocol):
    name: str

    def prepare(self, q: VarTensor, k: VarTensor, v: VarTensor) -> dict: ...

    def compute(self, q, k, v, causal: bool, scale: float, plan: dict) -> VarTensor: ...

    def optimize_tiling(self, q: VarTensor, k: VarTensor) -> dict: ...


@functools.partial(jax.jit, static_argnames=("causal", "scale"))
def _xla_call(q: VarTensor, k: VarTensor, v: VarTensor, causal: bool, scale):
    out = _dense(q.data, k.data, v.data, q.lengths[:, 0], k.lengths[:, 0], causal, scale)
    return VarTensor(out, q.lengths, q.model)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "tq", "tk"))
def _tiled_call(q: VarTensor, k: VarTensor, v: VarTensor, causal: bool, scale, tq: int,
                tk: int):
    out = _flash(q.data, k.data, v.data, q.lengths[:, 0], k.lengths[:, 0], causal, scale, tq,
                 tk)
    return VarTensor(out, q.lengths, q.model)


class XLABackend:
    name = "xla"

    def prepare(self, q, k, v):
        return {}

    def optimize_tiling(self, q, k):
        return {}

    def compute(self, q, k, v, causal, scale, plan):
        return _xla_call(q, k, v, causal, scale)


class TiledBackend:
    name = "tiled"

    def __init__(self, strategy: TilingStrategy | None = None):
        self.strategy = strategy or TilingStrategy()

    def optimize_tiling(self, q, k):
        h, d = q.features
        c = dict(heads=h, head_dim=d, itemsize=q.data.dtype.itemsize)
        lens_q, lens_k = _concrete(q), _concrete(k)
        tq = self.strategy.compute_optimal_tile_size(
            lens_q if lens_q is not None else q.capacity[0], constraints=c)
        tk = self.strategy.compute_optimal_tile_size(
            lens_k if lens_k is not None else k.capacity[0], constraints=c)
        return dict(tq=min(tq, _pow2_at_least(q.capacity[0])),
                    tk=min(tk, _pow2_at_least(k.capacity[0])))

    def prepare(self, q, k, v):
        return self.optimize_tiling(q, k)

    def compute(self, q, k, v, causal, scale, plan):
        return _tiled_call(q, k, v, causal, scale, plan["tq"], plan["tk"])


def _concrete(x: VarTensor) -> np.ndarray | None:
    """Host copy of a batch's first-axis lengths, or None when they are traced."""
    if isinstance(x.lengths, jax.core.Tracer):
        return None
    return np.asarray(x.lengths)[:, 0]


def _pow2_at_least(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


class BucketedBackend:
    """Items grouped by capacity bucket; dense attention per bucket.

    With concrete lengths (eager calls, or lengths closed over by a ``jit``-ed function):
    the host buckets items on the octave ladder of ``max(lq, lk)``, merges neighbouring
    buckets by a cost model, and runs one program per group, a few items per step.
    With traced lengths (inside ``jit``): one program maps over the items and switches
    each to the dense kernel of its bucket capacity (``switch_caps``). See
    ``vsla_jax.bucketed_attention``."""

    name = "bucketed"

    def __init__(self, plan: BucketPlan | None = None):
        self.plan = plan or BucketPlan()

    def optimize_tiling(self, q, k):
        lq, lk = _concrete(q), _concrete(k)
        if lq is None or lk is None:
            return dict(caps=switch_caps(q.capacity[0], k.capacity[0]))
        h, d = q.features
        return dict(groups=plan_groups(lq, lk, q.capacity[0], k.capacity[0], h, d, self.plan))

    def prepare(self, q, k, v):
        return self.optimize_tiling(q, k)

    def compute(self, q, k, v, causal, scale, plan):
        args = (q.data, k.data, v.data, q.lengths[:, 0], k.lengths[:, 0])
        if "caps" in plan:
            out = switched_attention(*args, causal, scale, plan["caps"], self.plan.block_bytes)
        else:
            out = bucketed_attention(*args, plan["groups"], causal, scale,
                                     self.plan.fuse_after)
        return VarTensor(out, q.lengths, q.model)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _pallas_attn(qd, kd, vd, lq, lk, causal, scale, tq, tk, interpret):
    from vsla_jax.attention.pallas import pallas_flash_forward

    return pallas_flash_forward(qd, kd, vd, lq, lk, causal=causal, scale=scale, tq=tq, tk=tk,
                                interpret=interpret)[0]


def _pallas_fwd(qd, kd, vd, lq, lk, causal, scale, tq, tk, interpret):
    from vsla_jax.attention.pallas import pallas_flash_forward

    out, lse = pallas_flash_forward(qd, kd, vd, lq, lk, causal=causal, scale=scale, tq=tq,
                                    tk=tk, interpret=interpret)
    return out, (qd, kd, vd, lq, lk, out, lse)


def _pallas_bwd(causal, scale, tq, tk, interpret, saved, dout):
    q, k, v, lq, lk, out, lse = saved
    return _flash_backward(q, k, v, lq, lk, out, lse, dout, causal, scale, tq, tk,
                           q.shape[1], k.shape[1])


_pallas_attn.defvjp(_pallas_fwd, _pallas_bwd)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "tq", "tk", "interpret"))
def _pallas_call(q, k, v, causal, scale, tq, tk, interpret):
    out = _pallas_attn(q.data, k.data, v.data, q.lengths[:, 0], k.lengths[:, 0], causal, scale,
                       tq, tk, interpret)
    return VarTensor(out, q.lengths, q.model)


class PallasBackend(TiledBackend):
    """Pallas flash-attention forward (GPU); backward recomputes tiles with XLA.

    ``interpret=True`` runs the kernel in the Pallas interpreter (CPU tests). Tiles are
    powers of two (at least 16, as Triton requires for ``dot``)."""

    name = "pallas"

    def __init__(self, interpret: bool | None = None):
        super().__init__()
        self.interpret = interpret

    def compute(self, q, k, v, causal, scale, plan):
        interpret = (jax.default_backend() != "gpu") if self.interpret is None else (
            self.interpret)
        tq, tk = (max(16, _pow2_at_least(plan[t])) for t in ("tq", "tk"))
        return _pallas_call(q, k, v, causal, scale, tq, tk, interpret)


_REGISTRY = {"xla": XLABackend(), "tiled": TiledBackend(), "bucketed": BucketedBackend(),
             "pallas": PallasBackend()}


def choose_backend(q: VarTensor, k: VarTensor) -> str:
    """``auto``: ``pallas`` on GPU, ``bucketed`` elsewhere.

    On CPU, ``bucketed`` was the fastest backend on every workload measured (see
    BENCHMARKS.md): with concrete lengths it plans groups on the host; with traced
    lengths (inside ``jit``) it switches each item to its bucket's dense kernel, which
    measured 1.7-8x faster than ``tiled`` there. ``q``/``k`` are accepted so that the
    choice may depend on the length profile."""
    del q, k
    return "pallas" if jax.default_backend() == "gpu" else "bucketed"


def attention(q: VarTensor, k: VarTensor, v: VarTensor, *, causal: bool = False,
              scale: float | None = None, backend: str = "auto",
              tile: int | tuple[int, int] | None = None) -> VarTensor:
    """Exact variable-length attention. See the module docstring for semantics.

    Args:
      q: ``[B, Cq, H, D]`` VarTensor; k, v: ``[B, Ck, H_kv, D]`` with equal lengths.
      causal: query ``i`` sees keys ``j <= i``.
      scale: score scale, default ``1 / sqrt(D)``.
      backend: ``"auto"``, ``"xla"``, ``"bucketed"``, ``"tiled"`` or ``"pallas"``.
      tile: ``tiled``/``pallas``: one tile size or ``(tq, tk)``; default from
        ``TilingStrategy``.
    """
    _check(q, k, v)
    scale = 1.0 / math.sqrt(q.features[1]) if scale is None else float(scale)
    if backend == "auto":
        backend = choose_backend(q, k)
    if backend not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    impl = _REGISTRY[backend]
    plan = impl.prepare(q, k, v)
    if tile is not None and backend in ("tiled", "pallas"):
        tq, tk = (tile, tile) if isinstance(tile, int) else tile
        plan = dict(tq=int(tq), tk=int(tk))
    return impl.compute(q, k, v, causal, scale, plan)


# -- approximate (lossy, opt-in) --------------------------------------------------------
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
    """Per key position: kept (bool) and multiplicity (float), ``[B, Ck]`` each."""
    b, ck = kd.shape[:2]
    t = cfg.tile
    kp = _pad_seq(kd.astype(jnp.float32), t)
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
    qd, kd, vd = q.data, k.data, v.data
    lq, lk = q.lengths[:, 0], k.lengths[:, 0]
    keep, mult, stride = _approx_keep(kd, lk, cfg)
    h, hk = qd.shape[2], kd.shape[2]
    kr, vr = jnp.repeat(kd, h // hk, axis=2), jnp.repeat(vd, h // hk, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", qd, kr, precision="highest") * scale
    s = s + jnp.log(mult)[:, None, None, :]
    qpos, kpos = jnp.arange(qd.shape[1]), jnp.arange(kd.shape[1])
    mask = keep[:, None, None, :]
    if causal:
        mask = mask & (kpos[None, None, None, :] <= qpos[None, None, :, None])
    s = jnp.where(mask, s, _neg(s.dtype))
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - m) * mask
    den = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bhqk,bkhd->bqhd", p / jnp.where(den > 0, den, 1), vr, precision="highest")
    out = jnp.where((qpos[None, :] < lq[:, None])[:, :, None, None], out, 0).astype(qd.dtype)
    kept = keep.sum() / jnp.maximum(lk.sum(), 1)
    return VarTensor(out, q.lengths, q.model), kept, stride


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
    _check(q, k, v)
    scale = 1.0 / math.sqrt(q.features[1]) if scale is None else float(scale)
    out, kept, stride = _approx_call(q, k, v, causal, scale, config or ApproxConfig())
    return out, dict(kept_fraction=float(kept), tile_strides=np.asarray(stride))
