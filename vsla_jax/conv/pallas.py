"""Pallas kernel: batched direct variable-length 1-D convolution (GPU; interpret on CPU).

Grid ``(items, output tiles)``. Program ``(i, t)`` computes output positions
``[t*T, (t+1)*T)`` of item ``i`` as ``sum_{j < lb_i} b_i[j] * a_i[n - j]``. The tap loop
stops at the item's real kernel length, and a tile at or past the item's real output
length ``la_i + lb_i - 1`` runs zero iterations, so padded tiles cost a store only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from vsla_jax.conv import kernels
from vsla_jax.util import next_pow2

DEFAULT_TILE = 128


def _kernel(len_ref, a_ref, b_ref, o_ref, *, tile: int, cap_b: int):
    t = pl.program_id(1)
    la = len_ref[0]
    lb = len_ref[1]
    n_out = jnp.where((la > 0) & (lb > 0), la + lb - 1, 0)
    start = t * tile
    trips = jnp.where(start < n_out, lb, 0)

    def body(j, acc):
        seg = a_ref[pl.ds(start + cap_b - 1 - j, tile)]
        return acc + b_ref[j] * seg.astype(acc.dtype)

    acc_dtype = jnp.promote_types(o_ref.dtype, jnp.float32)
    acc = jax.lax.fori_loop(0, trips, body, jnp.zeros((tile,), acc_dtype))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("tile", "interpret"))
def pallas_direct_conv(
    a: jax.Array, b: jax.Array, la: jax.Array, lb: jax.Array,
    tile: int = DEFAULT_TILE, interpret: bool = False,
) -> jax.Array:
    """Full convolution of zero-slack rows.

    Args:
      a: ``[B, cap_a]``; b: ``[B, cap_b]`` (zero beyond ``la`` / ``lb``).
      la, lb: ``int32[B]`` real lengths.
      tile: output positions per program (a power of two).
      interpret: run the kernel in the Pallas interpreter (CPU testing).

    Returns:
      ``[B, cap_a + cap_b - 1]``.
    """
    n_items, cap_a = a.shape
    cap_b = b.shape[1]
    cap_o = cap_a + cap_b - 1
    n_tiles = pl.cdiv(cap_o, tile)
    # left pad by cap_b - 1 so every slice start is >= 0; right pad to a power of two
    width = next_pow2(n_tiles * tile + cap_b - 1)
    a_pad = jnp.pad(a, ((0, 0), (cap_b - 1, width - cap_a - cap_b + 1)))
    b_pad = jnp.pad(b, ((0, 0), (0, next_pow2(cap_b) - cap_b)))
    lens = jnp.stack([la, lb], axis=1).astype(jnp.int32)
    lens = jnp.pad(lens, ((0, 0), (0, 6)))  # [B, 8]: a power-of-two block
    out = pl.pallas_call(
        functools.partial(_kernel, tile=tile, cap_b=cap_b),
        out_shape=jax.ShapeDtypeStruct((n_items, n_tiles * tile), a.dtype),
        grid=(n_items, n_tiles),
        in_specs=[
            pl.BlockSpec((None, 8), lambda i, t: (i, 0)),
            pl.BlockSpec((None, width), lambda i, t: (i, 0)),
            pl.BlockSpec((None, b_pad.shape[1]), lambda i, t: (i, 0)),
        ],
        out_specs=pl.BlockSpec((None, tile), lambda i, t: (i, t)),
        interpret=interpret,
    )(lens, a_pad, b_pad)
    return out[:, :cap_o]


def _rows(a, b, la, lb, nb: int, interpret: bool):
    """Flatten batch and feature axes into rows and run the kernel (rank 1)."""
    batch, feat = a.shape[:nb], a.shape[nb + 1 :]
    nf = len(feat)
    perm = tuple(range(nb)) + tuple(range(nb + 1, nb + 1 + nf)) + (nb,)
    rows_a = jnp.transpose(a, perm).reshape(-1, a.shape[nb])
    rows_b = jnp.transpose(b, perm).reshape(-1, b.shape[nb])
    rep = lambda n: jnp.broadcast_to(n[..., 0].reshape(batch + (1,) * nf), batch + feat)
    out = pallas_direct_conv(rows_a, rows_b, rep(la).reshape(-1), rep(lb).reshape(-1),
                             interpret=interpret)
    out = out.reshape(batch + feat + (out.shape[-1],))
    inv = tuple(int(i) for i in np.argsort(perm))
    return jnp.transpose(out, inv)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def direct_conv_pallas(a, b, la, lb, nb: int, interpret: bool):
    """Rank-1 ``kernels.direct_conv`` through the Pallas kernel (skips padded tiles).

    ``la``/``lb`` are the ``int32[*batch, 1]`` lengths. Tangents use the XLA kernel.
    """
    return _rows(a, b, la, lb, nb, interpret)


@direct_conv_pallas.defjvp
def _direct_conv_pallas_jvp(nb, interpret, primals, tangents):
    a, b, la, lb = primals
    da, db = tangents[:2]
    out = direct_conv_pallas(a, b, la, lb, nb, interpret)
    return out, kernels.full_shift_add(da, b, nb, 1) + kernels.full_shift_add(db, a, nb, 1)
