"""K (key-block dropping): attention over the key/value blocks with the most estimated mass.

The keys and values of each sequence are cut into blocks of ``block`` consecutive tokens
(after sorting its valid tokens by a cheap mass proxy, ``token_scores``, when
``permute_tokens``); ``n_drop(nb, drop)`` of its ``nb`` valid blocks, those with the lowest
mean proxy score, are dropped, and attention runs over the rest (``kv_drop_attention``).
Kept blocks stay in block order and only the last block can be partial, so the kept
tokens form a prefix of a ``[B, kept_capacity(C, block, drop)]`` buffer. Shapes are
static (``block``, ``drop``, capacities); lengths may be traced. ``apply_kvcache`` is the
adapter on a padded ``(k, v, lengths)`` cache.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

import vsla_jax as vs
from icd_jax.adapters import meta
from icd_jax.errors import ConfigError, ShapeError
from vsla_jax.attention.reference import masked_softmax, safe_den


def check_settings(block, drop) -> tuple[int, float]:
    """``(block, drop)`` as ``(int, float)``; ``ConfigError`` unless ``block >= 1`` is an
    integer and ``0 <= drop < 1``."""
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ConfigError(f"kv: block must be a positive integer, got {block!r}")
    if isinstance(drop, bool) or not isinstance(drop, (int, float, np.integer, np.floating)) \
            or not 0 <= drop < 1:
        raise ConfigError(f"kv: drop must be a number with 0 <= drop < 1, got {drop!r}")
    return int(block), float(drop)


def n_drop(nb: int, drop: float) -> int:
    """Blocks dropped from a sequence of ``nb`` valid blocks: ``drop * nb`` rounded half up,
    at most ``nb - 1`` (one block always stays); 0 when ``nb == 0``."""
    return 0 if nb <= 0 else min(math.floor(drop * nb + 0.5), nb - 1)


def kept_capacity(capacity: int, block: int, drop: float) -> int:
    """Static capacity of the kept keys: ``block * max(nb - n_drop(nb))`` over the
    ``nb = 0 .. ceil(capacity / block)`` a sequence of capacity ``capacity`` can have."""
    block, drop = check_settings(block, drop)
    return block * max(nb - n_drop(nb, drop) for nb in range(-(-capacity // block) + 1))


def token_scores(q: jax.Array, k: jax.Array, lengths: jax.Array) -> jax.Array:
    """Mass proxy ``float32[B, Ck]``: the mean valid query dotted with each key over
    ``sqrt(D)``, averaged over heads; ``-inf`` on slack. ``q`` ``[B, Cq, H, D]``, ``k``
    ``[B, Ck, H, D]``, ``lengths`` ``int[B]`` (shared by queries and keys)."""
    lengths = jnp.asarray(lengths, jnp.int32)
    qmask = jnp.arange(q.shape[1])[None, :] < lengths[:, None]
    qsum = jnp.where(qmask[:, :, None, None], q.astype(jnp.float32), 0.0).sum(axis=1)
    qmean = qsum / jnp.maximum(lengths, 1)[:, None, None].astype(jnp.float32)
    s = (qmean[:, None] * k.astype(jnp.float32)).sum((2, 3))  # cheaper to compile than a dot
    s = s / (k.shape[2] * math.sqrt(k.shape[3]))
    return jnp.where(jnp.arange(k.shape[1])[None, :] < lengths[:, None], s, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("block", "drop", "permute_tokens"))
def select(q: jax.Array, k: jax.Array, lengths: jax.Array, *, block: int, drop: float,
           permute_tokens: bool = True) -> tuple[jax.Array, jax.Array]:
    """Keys kept per sequence: ``(index int32[B, kept_cap], kept_lengths int32[B])``.

    ``index[b, :kept_lengths[b]]`` are positions into ``k``'s capacity ``C`` (the kept
    blocks in block order); slack slots hold ``C`` (gather with ``mode="fill"``).
    ``q`` ``[B, Cq, H, D]`` and ``k`` ``[B, C, H, D]`` feed ``token_scores``."""
    block, drop = check_settings(block, drop)
    b, c = k.shape[:2]
    nb_cap, kept_cap = -(-c // block), kept_capacity(c, block, drop)
    lengths = jnp.minimum(jnp.asarray(lengths, jnp.int32), c)
    scores = token_scores(q, k, lengths)
    valid = jnp.arange(c)[None, :] < lengths[:, None]
    if permute_tokens:  # valid tokens by descending score, slack after them
        order = jnp.argsort(jnp.where(valid, -scores, jnp.inf), axis=1, stable=True)
    else:
        order = jnp.broadcast_to(jnp.arange(c), (b, c))
    pad = ((0, 0), (0, nb_cap * block - c))
    blocks = jnp.pad(valid, pad).reshape(b, nb_cap, block)  # valid positions stay valid
    ps = jnp.pad(jnp.where(valid, take(scores, order), 0.0), pad)
    count = blocks.sum(axis=2)
    bscore = ps.reshape(b, nb_cap, block).sum(axis=2) / jnp.maximum(count, 1)
    bvalid = count > 0
    nd = jnp.asarray([n_drop(n, drop) for n in range(nb_cap + 1)], jnp.int32)[bvalid.sum(1)]
    by_score = jnp.argsort(jnp.where(bvalid, bscore, jnp.inf), axis=1, stable=True)
    rank = jnp.argsort(by_score, axis=1, stable=True)  # ascending score rank of each block
    keep = bvalid & (rank >= nd[:, None])
    kept_blocks = jnp.argsort(~keep, axis=1, stable=True)[:, :kept_cap // block]
    slot = jnp.arange(kept_cap)
    blk = kept_blocks[:, slot // block]
    pos = blk * block + slot % block
    ok = take(keep, blk) & (pos < lengths[:, None])
    src = take(order, pos)  # pos >= c only where not ok
    return jnp.where(ok, src, c).astype(jnp.int32), ok.sum(axis=1).astype(jnp.int32)


def take(x: jax.Array, index: jax.Array) -> jax.Array:
    """``x`` ``[B, C, ...]`` at ``index`` ``int[B, K]`` (clipped to ``[0, C)``) along C:
    ``[B, K, ...]``."""
    idx = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1, mode="clip")


def gather_tokens(x: jax.Array, index: jax.Array) -> jax.Array:
    """``x`` ``[B, C, ...]`` at ``index`` ``int[B, K]`` along C: ``[B, K, ...]``, zeros
    where ``index >= C`` (as ``mode="fill"``, and cheaper to compile)."""
    out = take(x, index)
    return jnp.where((index < x.shape[1]).reshape(out.shape[:2] + (1,) * (x.ndim - 2)), out, 0)


def attend(q, k, v, lq, lk, backend: str = "xla") -> jax.Array:
    """``vs.attention`` on padded arrays: q ``[B, Cq, H, D]``, k/v ``[B, Ck, H, D]``,
    lengths ``int[B]`` -> ``[B, Cq, H, D]`` (zero on slack queries)."""
    def vt(x, n):
        return vs.VarTensor.trusted(x, jnp.asarray(n, jnp.int32)[:, None])
    return vs.attention(vt(q, lq), vt(k, lk), vt(v, lk), backend=backend).data


@functools.partial(jax.jit, static_argnames=("block", "drop", "permute_tokens", "backend"))
def kv_drop_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *,
                      block: int, drop: float, permute_tokens: bool = True,
                      backend: str = "xla") -> jax.Array:
    """Attention of ``q`` over the kept key/value blocks (``select``): q, k, v
    ``[B, C, H, D]`` float, ``lengths`` ``int32[B]`` -> ``[B, C, H, D]`` like ``q``."""
    index, kept = select(q, k, lengths, block=block, drop=drop,
                         permute_tokens=permute_tokens)
    return attend(q, gather_tokens(k, index), gather_tokens(v, index), lengths, kept, backend)


@jax.jit
def kept_mass_sums(q, k, lengths, index, kept_lengths) -> tuple[jax.Array, jax.Array]:
    """Per item: exact softmax mass on the kept keys summed over valid queries and heads,
    and the number of those (query, head) rows: two ``float32[B]``."""
    lengths = jnp.asarray(lengths, jnp.int32)
    b, c = k.shape[:2]
    slot_ok = jnp.arange(index.shape[1])[None, :] < kept_lengths[:, None]
    kept = jnp.zeros((b, c + 1), bool).at[jnp.arange(b)[:, None], index].set(slot_ok)[:, :c]
    kmask = jnp.arange(c)[None, :] < lengths[:, None]
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32),
                   precision="highest") / math.sqrt(q.shape[-1])
    p, _, den = masked_softmax(s, kmask[:, None, None, :])
    frac = jnp.where(kept[:, None, None, :], p, 0.0).sum(-1) / safe_den(den[..., 0])
    qmask = jnp.arange(q.shape[1])[None, :] < lengths[:, None]
    rows = qmask[:, None, :] & (den[..., 0] > 0)
    return jnp.where(rows, frac, 0.0).sum((1, 2)), rows.sum((1, 2)).astype(jnp.float32)


def mass_kept_per_item(q, k, lengths, index, kept_lengths) -> jax.Array:
    """``float32[B]``: mean over valid queries and heads of the softmax mass (full attention
    over the valid keys) on the kept keys; 1 for items without tokens."""
    total, rows = kept_mass_sums(q, k, lengths, index, kept_lengths)
    return jnp.where(rows > 0, total / jnp.maximum(rows, 1), 1.0)


def mass_kept(q, k, lengths, index, kept_lengths) -> jax.Array:
    """``float32`` scalar: ``mass_kept_per_item`` averaged over every valid (query, head)
    row of the batch; 1 when there is none."""
    total, rows = kept_mass_sums(q, k, lengths, index, kept_lengths)
    return jnp.where(rows.sum() > 0, total.sum() / jnp.maximum(rows.sum(), 1), 1.0)


def check_cache(cache, queries) -> tuple[jax.Array, ...]:
    """``(k, v, lengths, q)`` as jax arrays; ``ShapeError`` naming what does not fit."""
    if not isinstance(cache, (tuple, list)) or len(cache) != 3:
        raise ShapeError("kv: cache must be a tuple (k, v, lengths)")
    k, v, lengths = (x if isinstance(x, jax.Array) else np.asarray(x) for x in cache)
    q = k if queries is None else queries if isinstance(queries, jax.Array) \
        else np.asarray(queries)
    for name, x, rank in (("k", k, 4), ("v", v, 4), ("lengths", lengths, 1),
                          ("queries", q, 4)):
        if np.ndim(x) != rank:
            raise ShapeError(f"kv: {name} must have rank {rank}, got shape {np.shape(x)}")
    for name, x in (("k", k), ("v", v), ("queries", q)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ShapeError(f"kv: {name} must be floating, got {x.dtype}")
    if v.shape != k.shape:
        raise ShapeError(f"kv: v shape {v.shape} differs from k shape {k.shape}")
    lens = np.asarray(lengths)
    if not np.issubdtype(lens.dtype, np.integer):
        raise ShapeError(f"kv: lengths must be integers, got {lens.dtype}")
    b, c = k.shape[:2]
    if lens.shape[0] != b or q.shape[0] != b or q.shape[2:] != k.shape[2:]:
        raise ShapeError(f"kv: lengths {lens.shape} / queries {q.shape} do not match k "
                         f"{k.shape} (B, H, D)")
    if lens.size and (lens.min() < 0 or lens.max() > min(c, q.shape[1])):
        raise ShapeError(f"kv: lengths must lie in [0, {min(c, q.shape[1])}] (the key and "
                         f"query capacity), got {lens.tolist()}")
    return jnp.asarray(k), jnp.asarray(v), jnp.asarray(lens, jnp.int32), jnp.asarray(q)


def apply_kvcache(cache, block: int = 128, drop: float = 0.1, *, queries=None,
                  permute_tokens: bool = True, strict: bool = False) -> tuple[tuple, dict]:
    """Drop the lowest-mass key/value blocks of a padded cache ``(k, v, lengths)``
    (``[B, C, H, D]``, ``[B, C, H, D]``, ``int[B]``) -> ``((k_kept, v_kept,
    kept_lengths), meta)`` with ``[B, kept_capacity, H, D]`` arrays and ``int32[B]``.

    ``queries`` ``[B, Cq, H, D]`` (same lengths) drive the proxy and the error figures;
    None uses the keys. On an internal failure returns ``cache`` unchanged, ``ok=False``.
    """
    block, drop = check_settings(block, drop)
    if not isinstance(permute_tokens, (bool, np.bool_)):
        raise ConfigError(f"kv: permute_tokens must be a bool, got {permute_tokens!r}")
    settings = dict(block=block, drop=drop, permute_tokens=bool(permute_tokens))
    k, v, lengths, q = check_cache(cache, queries)

    def body():
        index, kept = select(q, k, lengths, block=block, drop=drop,
                             permute_tokens=bool(permute_tokens))
        k_kept, v_kept = gather_tokens(k, index), gather_tokens(v, index)
        rel = meta.rel_error(attend(q, k, v, lengths, lengths),
                             attend(q, k_kept, v_kept, lengths, kept))
        mass = float(mass_kept(q, k, lengths, index, kept))
        lens, kl = np.asarray(lengths, np.int64), np.asarray(kept, np.int64)
        nb, kb = -(-lens // block), -(-kl // block)  # only the last kept block is partial
        error = dict(rel_fro=rel, mass_dropped=max(0.0, 1.0 - mass),
                     blocks_dropped_frac=(nb - kb).sum() / max(nb.sum(), 1),
                     tokens_dropped_frac=(lens - kl).sum() / max(lens.sum(), 1))
        quality = (f"attention keeps {mass:.1%} of the softmax mass over "
                   f"{1 - error['tokens_dropped_frac']:.1%} of the keys (output rel. error "
                   f"{rel:.3g}); quality drops as the dropped mass grows")
        return (k_kept, v_kept, kept), meta.make(
            "kv", settings, repermute=True,
            reason="token order decides which blocks survive: a layout that gathers "
                   "high-mass keys into few blocks lets the same drop keep more mass",
            error=error, expected_quality=quality, kept_capacity=int(index.shape[1]))

    return meta.guarded("kv", settings, cache, body, strict)
