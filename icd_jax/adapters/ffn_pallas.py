"""Pallas kernel for the union tile skip of the FFN down projection (``ffn.skip_down``).

Grid ``(groups,)``. Each program holds its group's rows of ``f`` (``[group, F]``) and
loops over its valid tile slots. The trip count is read from the plan, so unexecuted
tiles are never loaded. Each step slices ``w2[idx * tile : (idx + 1) * tile]`` and the
matching ``f`` columns by the tile index read from an ``int32`` ref, and accumulates
``[group, H]`` in float32. Then it adds ``b2`` and stores. Unlike the XLA path it never
copies the kept rows of ``w2``.

``pallas_union_down`` runs one call as one group: every row shares the union's tiles.

Meant for GPU (Triton). Elsewhere it runs in the Pallas interpreter (slow, for tests).
Which one is an argument (``interpret``), never a global switch. Triton wants
power-of-two block shapes: ``F``, ``H``, the slot count and the rows (at least 16, for
``dot``) are padded here, and ``tile`` should be a power of two of at least 16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from icd_jax.errors import ShapeError


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _kernel(tiles_ref, count_ref, f_ref, w_ref, b_ref, o_ref, *, tile: int):
    def body(s, acc):
        start = pl.multiple_of(tiles_ref[s] * tile, tile)
        w = w_ref[pl.ds(start, tile), :].astype(jnp.float32)  # [tile, H]
        cols = f_ref[:, pl.ds(start, tile)].astype(jnp.float32)  # [group, tile]
        return acc + jnp.dot(cols, w, preferred_element_type=jnp.float32)

    acc = jnp.zeros(o_ref.shape, jnp.float32)
    acc = jax.lax.fori_loop(0, count_ref[0], body, acc)
    o_ref[...] = (acc + b_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("tile", "group", "interpret"))
def pallas_sparse_down(f: jax.Array, w2: jax.Array, b2: jax.Array, tiles: jax.Array,
                       valid: jax.Array, *, tile: int, group: int,
                       interpret: bool = False) -> jax.Array:
    """``[T, H]`` (dtype of ``f``): per group of ``group`` rows, ``f @ w2 + b2`` over the
    group's valid tiles only (every neuron of a valid tile counts: mask ``f`` first).

    ``f [T, F]``, ``w2 [F, H]``, ``b2 [H]``; ``tiles int32[G, k]`` and ``valid bool[G, k]``
    with each row's valid slots first (``ffn.top_tiles`` lists them so), ``G = ceil(T /
    group)``.
    """
    (t, n), h = f.shape, w2.shape[1]
    n_g, k_cap = tiles.shape
    if w2.shape[0] != n or b2.shape != (h,) or valid.shape != tiles.shape or (
            n_g != -(-t // group)) or n % tile:
        raise ShapeError(f"pallas_sparse_down: f {f.shape}, w2 {w2.shape}, b2 {b2.shape}, "
                         f"tiles {tiles.shape}, valid {valid.shape} do not fit tile={tile}, "
                         f"group={group}")
    kp, np_, hp = _pow2(k_cap), _pow2(n), _pow2(h)
    tiles = jnp.pad(jnp.where(valid, tiles, 0).astype(jnp.int32), ((0, 0), (0, kp - k_cap)))
    count = jnp.pad(valid.sum(axis=1, dtype=jnp.int32)[:, None], ((0, 0), (0, 7)))
    fp = jnp.pad(f, ((0, n_g * group - t), (0, np_ - n)))
    wp = jnp.pad(w2, ((0, np_ - n), (0, hp - h)))
    bp = jnp.pad(b2, (0, hp - h))[None, :]
    out = pl.pallas_call(
        functools.partial(_kernel, tile=tile),
        out_shape=jax.ShapeDtypeStruct((n_g * group, hp), f.dtype),
        grid=(n_g,),
        in_specs=[
            pl.BlockSpec((None, kp), lambda g: (g, 0)),
            pl.BlockSpec((None, 8), lambda g: (g, 0)),
            pl.BlockSpec((group, np_), lambda g: (g, 0)),
            pl.BlockSpec((np_, hp), lambda g: (0, 0)),
            pl.BlockSpec((1, hp), lambda g: (0, 0)),
        ],
        out_specs=pl.BlockSpec((group, hp), lambda g: (g, 0)),
        interpret=interpret,
    )(tiles, count, fp, wp, bp)
    return out[:t, :h]


def pallas_union_down(f: jax.Array, w2: jax.Array, b2: jax.Array, active: jax.Array,
                      tiles: jax.Array, valid: jax.Array, *, tile: int,
                      interpret: bool = False) -> jax.Array:
    """``[T, H]`` (dtype of ``f``), equal to ``ffn.gather_down`` for the same arguments
    (``active bool[T, F]``, ``tiles int32[k]`` / ``valid bool[k]`` from
    ``ffn.union_tiles``): ``pallas_sparse_down`` over the masked ``f`` with all ``T`` rows
    in one group, rows padded to a power of two of at least 16."""
    if tiles.ndim != 1 or valid.shape != tiles.shape or active.shape != f.shape:
        raise ShapeError(f"pallas_union_down: need tiles [k], valid [k] and active of f's "
                         f"shape {f.shape}; got {tiles.shape}, {valid.shape}, {active.shape}")
    if not f.shape[0]:
        return jnp.zeros((0, w2.shape[1]), f.dtype)
    f = jnp.where(active, f, jnp.zeros((), f.dtype))
    return pallas_sparse_down(f, w2, b2, tiles[None], valid[None], tile=tile,
                              group=_pow2(max(f.shape[0], 16)), interpret=interpret)
