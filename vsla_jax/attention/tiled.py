"""Flash-style tiled attention: the ``tiled`` backend and ``TilingStrategy``.

Items run one after another (``lax.map``); each runs ``ceil(lq / tq)`` query-tile trips
and, per query tile, ``ceil(lk / tk)`` key-tile trips (causal: up to the diagonal), so
fully padded tiles are never computed. An online softmax keeps one running maximum, sum
and accumulator per query row. The custom VJP recomputes the scores tile by tile from
the saved log-sum-exp (no ``[Lq, Lk]`` matrix is stored); the Pallas backend reuses it
(``flash_backward``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from vsla_jax.errors import VSLAError
from vsla_jax.tensor import VarTensor, rows_within
from vsla_jax.util import cdiv, float0_zeros, neg_inf, next_pow2, pad_axis


# -- one item ---------------------------------------------------------------------------
def _key_tiles(lk, i, tq: int, tk: int, causal: bool):
    """Key tiles that query tile ``i`` needs: up to the item's length (and the diagonal)."""
    n_k = cdiv(lk, tk)
    return jnp.minimum(n_k, cdiv((i + 1) * tq, tk)) if causal else n_k


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
    """One item. q [Cq, H, D], k [Ck, Hkv, D], v [Ck, Hkv, Dv] (padded to tile
    multiples).

    Returns out [Cq, H, Dv] and lse [H, Cq] (log-sum-exp of the scaled scores).
    """
    cq, h = q.shape[:2]
    d = v.shape[-1]  # the value head size (may differ from the query/key one)
    g = h // k.shape[1]
    ct = jnp.promote_types(q.dtype, jnp.float32)  # compute dtype
    neg = neg_inf(ct)
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
        # rows without keys have lsum == 0; a NaN lsum (NaN/inf input) stays NaN
        valid = (qpos < lq)[None, :] & (lsum != 0)
        safe = jnp.where(lsum != 0, lsum, 1)
        o = jnp.where(valid[..., None], acc / safe[..., None], 0)
        out = jax.lax.dynamic_update_slice_in_dim(
            out, jnp.transpose(o, (1, 0, 2)).astype(out.dtype), i * tq, axis=0)
        lse_t = jnp.where(valid, m + jnp.log(safe), neg)
        lse = jax.lax.dynamic_update_slice_in_dim(lse, lse_t, i * tq, axis=1)
        return out, lse

    return jax.lax.fori_loop(0, cdiv(lq, tq), q_body, (out0, lse0))


def _flash_bwd_item(q, k, v, lq, lk, out, lse, dout, causal, scale, tq, tk):
    """Gradients for one item, recomputing scores tile by tile (flash backward)."""
    h, d = q.shape[1:]
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
            fold = lambda x: x.reshape(tk, hk, g, x.shape[-1]).sum(axis=2)  # GQA: sum groups
            dk = jax.lax.dynamic_update_slice_in_dim(
                dk, jax.lax.dynamic_slice_in_dim(dk, j * tk, tk) + fold(dk_t), j * tk, axis=0)
            dv = jax.lax.dynamic_update_slice_in_dim(
                dv, jax.lax.dynamic_slice_in_dim(dv, j * tk, tk) + fold(dv_t), j * tk, axis=0)
            return dq_t, dk, dv

        dq_t, dk, dv = jax.lax.fori_loop(0, n_k, k_body, (jnp.zeros((tq, h, d), ct), dk, dv))
        dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_t, i * tq, axis=0)
        return dq, dk, dv

    dq, dk, dv = jax.lax.fori_loop(0, cdiv(lq, tq), q_body, (dq0, dk0, dv0))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# -- the batch --------------------------------------------------------------------------
SECOND_ORDER = ("tiled attention: reverse-mode derivatives of its gradient (grad of grad, "
                "jax.hessian through jacrev) are not supported: its loops skip padded tiles "
                "with trip counts that depend on the lengths, which JAX cannot reverse. Use "
                "backend='xla' or 'bucketed' for second-order gradients.")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _map_items(fn, xs):
    return jax.lax.map(lambda args: fn(*args), xs)


def _map_items_fwd(fn, xs):
    return _map_items(fn, xs), None


def _map_items_bwd(fn, res, ct):
    raise VSLAError(SECOND_ORDER)


_map_items.defvjp(_map_items_fwd, _map_items_bwd)


def _items(fn, *xs):
    """Run ``fn`` item by item (``lax.map``): every item keeps its own trip counts.

    Reverse-mode differentiation of this map (which only second-order gradients ask
    for: the first order goes through ``flash_attention``'s custom VJP) raises
    ``VSLAError`` naming the alternatives, instead of JAX's error about ``while_loop``.
    """
    return _map_items(fn, xs)


def _flash_fwd(qd, kd, vd, lq, lk, causal, scale, tq, tk):
    cq = qd.shape[1]
    # NaN or inf in a slack must not reach a result through 0 * x; inside the custom VJP
    # (no autodiff of the masks) and saved masked for the backward
    qd, kd, vd = rows_within(qd, lq), rows_within(kd, lk), rows_within(vd, lk)
    qp, kp, vp = pad_axis(qd, tq, axis=1), pad_axis(kd, tk, axis=1), pad_axis(vd, tk, axis=1)
    out, lse = _items(lambda q, k, v, a, b: _flash_fwd_item(q, k, v, a, b, causal, scale, tq, tk),
                      qp, kp, vp, lq, lk)
    return out[:, :cq], (qp, kp, vp, lq, lk, out, lse)


def flash_backward(q, k, v, lq, lk, out, lse, dout, causal, scale, tq, tk, cq, ck):
    """Tile-by-tile recomputing backward for all items; pads to tile multiples first.

    q ``[B, *, H, D]``, k ``[B, *, Hkv, D]``, v ``[B, *, Hkv, Dv]``, out/dout ``[B, *, H,
    Dv]``, lse ``[B, H, *]``; ``cq``/``ck``
    the unpadded capacities of the gradients. Returns the cotangents of
    ``(q, k, v, lq, lk)``.
    """
    # the cotangent's rows past the lengths (inf where a loss took log(0) of the zero
    # slack) must not reach the gradients through 0 * x; q, k and v come zero there (the
    # forwards save them so) and ``out`` is zero there
    qp, outp = pad_axis(q, tq, axis=1), pad_axis(out, tq, axis=1)
    dop = pad_axis(rows_within(dout, lq), tq, axis=1)
    kp, vp = pad_axis(k, tk, axis=1), pad_axis(v, tk, axis=1)
    lsep = pad_axis(lse, tq, axis=2)
    dq, dk, dv = _items(
        lambda q, k, v, a, b, o, s, do: _flash_bwd_item(q, k, v, a, b, o, s, do, causal, scale,
                                                        tq, tk),
        qp, kp, vp, lq, lk, outp, lsep, dop)
    return dq[:, :cq], dk[:, :ck], dv[:, :ck], float0_zeros(lq), float0_zeros(lk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def flash_attention(qd, kd, vd, lq, lk, causal, scale, tq, tk):
    """Flash-style attention on padded arrays: qd ``[B, Cq, H, D]``, kd ``[B, Ck, Hkv,
    D]``, vd ``[B, Ck, Hkv, Dv]``, lq/lk ``[B]`` -> ``[B, Cq, H, Dv]``; tiles ``tq``/``tk``
    need not divide the capacities."""
    return _flash_fwd(qd, kd, vd, lq, lk, causal, scale, tq, tk)[0]


def _flash_fwd_rule(qd, kd, vd, lq, lk, causal, scale, tq, tk):
    out, res = _flash_fwd(qd, kd, vd, lq, lk, causal, scale, tq, tk)
    return out, (res, qd.shape[1], kd.shape[1])


def _flash_bwd_rule(causal, scale, tq, tk, saved, dout):
    (qp, kp, vp, lq, lk, out, lse), cq, ck = saved
    return flash_backward(qp, kp, vp, lq, lk, out, lse, dout, causal, scale, tq, tk, cq, ck)


flash_attention.defvjp(_flash_fwd_rule, _flash_bwd_rule)


# -- tiling strategy --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TilingStrategy:
    """Tile sizes from the length distribution, head size, dtype and a memory budget.

    ``compute_optimal_tile_size`` picks, among ``candidates`` that fit the budget, the
    tile minimising padded work ``sum(ceil(L / t) * t)`` plus a per-tile overhead of
    ``overhead_positions`` (loop and dispatch cost expressed in sequence positions).
    ``available_memory`` (bytes for one tile's working set) defaults per platform.
    """

    candidates: tuple[int, ...] = (16, 32, 64, 128, 256)
    overhead_positions: int | None = None
    available_memory: int | None = None

    def overhead(self) -> int:
        """Per-tile overhead in positions: the loop and dispatch cost of one tile is far
        higher on CPU (256 positions) than on GPU (16); ``overhead_positions`` overrides."""
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
        for one tile's working set (default ``self.available_memory``, else 16 MiB on
        CPU, where caches are large and big tiles amortise loop overhead, and 192 KiB on
        GPU, about one SM's shared memory). ``constraints``: ``heads``, ``head_dim``,
        ``itemsize``, ``multiple_of``."""
        if available_memory is None:
            available_memory = self.available_memory
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


# -- backend ----------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("causal", "scale", "tq", "tk"))
def _tiled_call(q: VarTensor, k: VarTensor, v: VarTensor, causal: bool, scale, tq: int,
                tk: int):
    out = flash_attention(q.data, k.data, v.data, q.lengths[:, 0], k.lengths[:, 0], causal,
                          scale, tq, tk)
    return VarTensor.trusted(out, q.lengths, q.model)


class TiledBackend:
    """Flash-style tiles (``flash_attention``); tile sizes from ``strategy``."""

    name = "tiled"

    def __init__(self, strategy: TilingStrategy | None = None):
        self.strategy = strategy or TilingStrategy()

    def optimize_tiling(self, q, k) -> dict:
        """``{"tq", "tk"}`` from the concrete lengths (else the capacities), at most the
        next power of two above each capacity."""
        h, d = q.features
        c = dict(heads=h, head_dim=d, itemsize=q.data.dtype.itemsize)
        lens_q, lens_k = q.host_lengths, k.host_lengths
        tq = self.strategy.compute_optimal_tile_size(
            lens_q[:, 0] if lens_q is not None else q.capacity[0], constraints=c)
        tk = self.strategy.compute_optimal_tile_size(
            lens_k[:, 0] if lens_k is not None else k.capacity[0], constraints=c)
        return dict(tq=min(tq, next_pow2(q.capacity[0])), tk=min(tk, next_pow2(k.capacity[0])))

    def prepare(self, q, k, v) -> dict:
        return self.optimize_tiling(q, k)

    def compute(self, q, k, v, causal, scale, plan) -> VarTensor:
        return _tiled_call(q, k, v, causal, scale, plan["tq"], plan["tk"])
