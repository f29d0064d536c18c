"""Pallas kernel for the activation-sparse FFN down projection (``ffn.sparse_down``).

Grid ``(groups,)``. Each program holds its group's rows of ``f`` (``[group, F]``) and
loops over its valid tile slots (a trip count read from the plan, so unexecuted tiles are
never loaded), slicing ``w2[idx * tile : (idx + 1) * tile]`` and the matching ``f``
columns by the tile index read from an ``int32`` ref, and accumulates ``[group, H]`` in
float32; then adds ``b2`` and stores.

Meant for GPU (Triton); elsewhere it runs in the Pallas interpreter (slow, for tests).
Which one is an argument (``interpret``), never a global switch. **The kernel has only run
in the interpreter so far (no GPU on the development machine).** Triton wants power-of-two
block shapes (``F``, ``H`` and the slot count are padded here; ``group`` and ``tile``
should be powers of two, at least 16 for ``dot``).
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
    """``[T, H]`` (dtype of ``f``), equal to ``ffn.sparse_down`` for the same plan.

    ``f [T, F]``, ``w2 [F, H]``, ``b2 [H]``; ``tiles int32[G, k_cap]`` and
    ``valid bool[G, k_cap]`` from ``ffn.plan_tiles`` (``G = ceil(T / group)``). Valid slots
    are moved first (stable) so each program loops over exactly its valid ones.
    """
    (t, n), h = f.shape, w2.shape[1]
    n_g, k_cap = tiles.shape
    if w2.shape[0] != n or b2.shape != (h,) or valid.shape != tiles.shape or (
            n_g != -(-t // group)) or n % tile:
        raise ShapeError(f"pallas_sparse_down: f {f.shape}, w2 {w2.shape}, b2 {b2.shape}, "
                         f"tiles {tiles.shape}, valid {valid.shape} do not fit tile={tile}, "
                         f"group={group}")
    order = jnp.argsort(~valid, axis=1, stable=True)
    tiles = jnp.take_along_axis(jnp.where(valid, tiles, 0).astype(jnp.int32), order, axis=1)
    kp, np_, hp = _pow2(k_cap), _pow2(n), _pow2(h)
    tiles = jnp.pad(tiles, ((0, 0), (0, kp - k_cap)))
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
