"""Activation-sparse FFN down projection: execute only the neuron tiles a token group uses.

The FFN computes ``f = gelu(h @ W1 + b1)`` (``[T, F]``) and then ``f @ W2 + b2``. Neurons
are split into tiles of ``tile`` consecutive neurons and tokens into groups of ``group``
consecutive rows; a tile is *active for a group* when any token of the group has an
active neuron in it. ``sparse_down`` runs the down projection over at most ``k_cap``
active tiles per group (the most active ones): neurons inside an executed tile contribute
exactly, all others nothing. Which neurons share a tile decides how many tiles run, so a
co-activation permutation of the ``F`` neurons (``perm``) lowers the cost.

``tile``, ``group`` and ``k_cap`` are static Python ints; ``f`` and ``active`` may be
traced (everything here runs under ``jax.jit``). ``choose_k_cap`` calibrates ``k_cap`` on
the host.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np

import vsla_jax as vs
from icd_jax.adapters import meta
from icd_jax.cost import check_permutation
from icd_jax.errors import ConfigError, ShapeError

TRANSFORM = "ffn_sparsity"


def _positive_int(name: str, value) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise ConfigError(f"{name} must be a positive int, got {value!r}") from None
    if isinstance(value, bool) or v < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return v


def _real(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None


def _mean(x) -> float:
    x = np.asarray(x, np.float64)
    return float(x.mean()) if x.size else 0.0


def _n_tiles(active, tile: int, group: int) -> int:
    """Validate ``active [T, F]``, ``tile`` (dividing F) and ``group``; return F // tile."""
    if active.ndim != 2:
        raise ShapeError(f"active must be [T, F], got shape {active.shape}")
    tile, group = _positive_int("tile", tile), _positive_int("group", group)
    if active.shape[1] % tile:
        raise ConfigError(f"tile={tile} does not divide the {active.shape[1]} neurons (F)")
    return active.shape[1] // tile


def _check_selection(n_neurons: int, threshold, top_k) -> None:
    if (threshold is None) == (top_k is None):
        raise ConfigError("give exactly one of threshold and top_k, got "
                          f"threshold={threshold!r}, top_k={top_k!r}")
    if top_k is not None and _positive_int("top_k", top_k) > n_neurons:
        raise ConfigError(f"top_k={top_k} exceeds the {n_neurons} neurons (F)")


def active_mask(f: jax.Array, *, threshold: float | None = None,
                top_k: int | None = None) -> jax.Array:
    """``bool[T, F]``: ``|f| > threshold``, or the ``top_k`` neurons of each row by ``|f|``
    (exactly one of the two)."""
    if f.ndim != 2:
        raise ShapeError(f"f must be [T, F], got shape {f.shape}")
    _check_selection(f.shape[1], threshold, top_k)
    mag = jnp.abs(f)
    if threshold is not None:
        return mag > threshold
    _, idx = jax.lax.top_k(mag, int(top_k))
    rows = jnp.arange(f.shape[0])[:, None]
    return jnp.zeros(f.shape, bool).at[rows, idx].set(True)


def tile_counts(active: jax.Array, tile: int, group: int) -> jax.Array:
    """``int32[G, F // tile]``: active neurons per token group (``G = ceil(T / group)``,
    the last group padded with inactive rows) and tile."""
    n_t = _n_tiles(active, tile, group)
    t = active.shape[0]
    n_g = -(-t // group)
    a = jnp.pad(jnp.asarray(active, bool), ((0, n_g * group - t), (0, 0)))
    return a.reshape(n_g, group, n_t, tile).sum(axis=(1, 3), dtype=jnp.int32)


def tiles_per_group(active: jax.Array, tile: int, group: int) -> jax.Array:
    """``int32[G]``: the number of active tiles of each token group."""
    return (tile_counts(active, tile, group) > 0).sum(axis=1, dtype=jnp.int32)


def plan_tiles(active: jax.Array, *, tile: int, group: int,
               k_cap: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The tiles each group executes.

    Returns ``(tiles int32[G, k_cap], valid bool[G, k_cap], overflow int32[])``: per group
    up to ``k_cap`` active tiles, most active first (ties: lower tile index first);
    invalid slots point at tile 0. ``overflow`` counts the active (group, tile) pairs
    dropped because more than ``k_cap`` tiles were active.
    """
    k_cap = _positive_int("k_cap", k_cap)
    counts = tile_counts(active, tile, group)
    kk = min(k_cap, counts.shape[1])
    top, idx = jax.lax.top_k(counts, kk)
    pad = ((0, 0), (0, k_cap - kk))
    valid = jnp.pad(top > 0, pad)
    tiles = jnp.where(valid, jnp.pad(idx.astype(jnp.int32), pad), 0)
    overflow = (counts > 0).sum(dtype=jnp.int32) - valid.sum(dtype=jnp.int32)
    return tiles, valid, overflow


def _check_ffn(f, w2, b2) -> None:
    if f.ndim != 2 or w2.ndim != 2 or b2.ndim != 1:
        raise ShapeError(f"need f [T, F], w2 [F, H], b2 [H]; got shapes {f.shape}, "
                         f"{w2.shape}, {b2.shape}")
    if w2.shape[0] != f.shape[1] or b2.shape[0] != w2.shape[1]:
        raise ShapeError(f"f {f.shape}, w2 {w2.shape} and b2 {b2.shape} do not chain: "
                         "need f [T, F], w2 [F, H], b2 [H]")


@functools.partial(jax.jit, static_argnames=("tile", "group", "k_cap"))
def sparse_down(f: jax.Array, w2: jax.Array, b2: jax.Array, active: jax.Array, *,
                tile: int, group: int, k_cap: int) -> jax.Array:
    """``[T, H]`` (dtype of ``f``): ``f @ w2 + b2`` over the tiles of ``plan_tiles`` only.

    ``f [T, F]``, ``w2 [F, H]``, ``b2 [H]``, ``active bool[T, F]``; accumulates in float32.
    Two exact formulations, chosen from the static shapes by the bytes of ``w2`` read: when
    the ``G * k_cap`` tile loads are fewer than the ``F // tile`` tiles of ``w2`` (small
    batches), the selected tile rows of ``f`` (``[G, group, k_cap, tile]``) and ``w2``
    (``[G, k_cap, tile, H]``) are gathered and contracted over (slot, neuron); otherwise
    ``f`` is masked to the executed tiles and multiplied densely (no ``[G, k_cap, tile,
    H]`` intermediate). The Pallas kernel (``ffn_pallas``) is the tile-skipping GPU path.
    """
    _check_ffn(f, w2, b2)
    if active.shape != f.shape:
        raise ShapeError(f"active {active.shape} must have the shape of f {f.shape}")
    tiles, valid, _ = plan_tiles(active, tile=tile, group=group, k_cap=k_cap)
    (t, n), h = f.shape, w2.shape[1]
    n_g, n_t = tiles.shape[0], n // tile
    if n_g * k_cap < n_t:
        fg = jnp.pad(f, ((0, n_g * group - t), (0, 0))).reshape(n_g, group, n_t, tile)
        f_sel = jnp.take_along_axis(fg, tiles[:, None, :, None], axis=2)
        f_sel = jnp.where(valid[:, None, :, None], f_sel, jnp.zeros((), f.dtype))
        w_sel = w2.reshape(n_t, tile, h)[tiles]
        out = jnp.einsum("gqkt,gkth->gqh", f_sel, w_sel, preferred_element_type=jnp.float32)
        out = out.reshape(n_g * group, h)[:t]
    else:
        hits = jnp.zeros((n_g, n_t), jnp.int32).at[jnp.arange(n_g)[:, None], tiles].add(
            valid.astype(jnp.int32))
        run = jnp.broadcast_to((hits > 0)[:, None, :, None], (n_g, group, n_t, tile))
        f_run = jnp.where(run.reshape(n_g * group, n)[:t], f, jnp.zeros((), f.dtype))
        out = jnp.dot(f_run, w2, preferred_element_type=jnp.float32)
    return (out + b2.astype(jnp.float32)).astype(f.dtype)


def choose_k_cap(active, tile: int, group: int,
                 policy: vs.CapacityPolicy | None = None) -> int:
    """Host helper: the ``policy`` bucket (default ``CapacityPolicy.pow2(minimum=1)``) of
    the most active tiles any group of ``active`` uses, capped at ``F // tile``."""
    policy = vs.CapacityPolicy.pow2(minimum=1) if policy is None else policy
    act = jnp.asarray(active, bool)
    n_t = _n_tiles(act, tile, group)
    per_group = np.asarray(tiles_per_group(act, tile, group))
    return int(min(policy.bucket(int(per_group.max(initial=0))), n_t))


def apply_ffn_sparsity(f, w2, b2, *, threshold: float | None = None, top_k: int | None = None,
                       tile: int = 16, group: int = 1, k_cap: int | None = None, perm=None,
                       strict: bool = False) -> tuple[jax.Array, dict]:
    """Activation-sparse ``f @ w2 + b2`` and its ``meta`` record.

    ``f [T, F]``, ``w2 [F, H]``, ``b2 [H]``; active neurons by ``threshold`` or ``top_k``
    (see ``active_mask``). ``perm`` (position -> original neuron) reorders the columns of
    ``f`` and rows of ``w2`` first (the dense product is unchanged; the tiles are not).
    ``k_cap`` defaults to ``choose_k_cap`` on this input. Besides ``meta.KEYS``, meta holds
    ``tiles_per_group`` (mean active tiles per group), ``tiles_per_token`` (the same for
    single tokens), ``tile_frac`` (mean executed tiles / ``F // tile``), ``overflow`` and
    ``k_cap``. On failure returns the dense product with ``ok=False``.
    """
    f, w2, b2 = jnp.asarray(f), jnp.asarray(w2), jnp.asarray(b2)
    _check_ffn(f, w2, b2)
    _check_selection(f.shape[1], threshold, top_k)
    if threshold is not None and not np.isfinite(_real("threshold", threshold)):
        raise ConfigError(f"threshold must be a finite number, got {threshold!r}")
    n_t = _n_tiles(f, tile, group)
    if k_cap is not None:
        k_cap = _positive_int("k_cap", k_cap)
    order = None if perm is None else check_permutation(perm, f.shape[1])
    settings = dict(threshold=threshold, top_k=top_k, tile=tile, group=group, k_cap=k_cap,
                    perm=order is not None)
    dense = (f @ w2 + b2).astype(f.dtype)

    def body():
        fp, wp = (f, w2) if order is None else (f[:, order], w2[order])
        act = active_mask(fp, threshold=threshold, top_k=top_k)
        kc = choose_k_cap(act, tile, group) if k_cap is None else k_cap
        out = sparse_down(fp, wp, b2, act, tile=tile, group=group, k_cap=kc)
        _, valid, overflow = plan_tiles(act, tile=tile, group=group, k_cap=kc)
        stats = dict(
            tiles_per_group=_mean(tiles_per_group(act, tile, group)),
            tiles_per_token=_mean(tiles_per_group(act, tile, 1)),
            tile_frac=_mean(valid.sum(axis=1)) / n_t, overflow=int(overflow), k_cap=kc)
        return out, meta.make(
            TRANSFORM, settings, repermute=True,
            reason="which neurons share a tile decides the tiles executed: a co-activation "
                   "permutation of the FFN neurons lowers it",
            error=dict(rel_fro=meta.rel_error(dense, out)),
            expected_quality="exact for neurons in executed tiles; the error is the dropped "
                             "contribution of unexecuted tiles (small when inactive "
                             "neurons are near zero and overflow is 0)",
            **stats)

    return meta.guarded(TRANSFORM, settings, dense, body, strict)
