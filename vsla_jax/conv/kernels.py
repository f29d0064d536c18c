"""Convolution kernels over the variable axes of zero-slack padded arrays (XLA paths).

Layout: ``[*batch, *cap, *feat]`` with ``nb`` batch axes and ``rank`` variable axes;
both operands share batch and feature shapes (depthwise over features).

- ``shift_add``: THE shift-and-add kernel, ``out[p] = sum_j w[j] * x[p + S - 1 - j]``
  over ``UNROLL`` taps per pass. Every direct path (padded, bucketed, blocked) uses it.
- ``direct_conv``: full convolution through ``shift_add``, looping over the operand with
  fewer taps. Its tangent rule keeps the loop over a primal operand's taps, so reverse
  mode stores one tap value per iteration, never a shifted copy of the signal. With
  validity masks it skips every product outside the operands' logical extents, so
  ``inf``/``nan`` reach exactly the outputs NumPy's ``convolve`` gives them.
- ``fft_conv``: real FFTs of a fast length ``>= cap_a + cap_b - 1``, per call (never a
  batch-wide maximum). A non-finite input value spreads through its whole item.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

#: Taps fused into one pass over the output by ``shift_add``.
UNROLL = 8
FAST_RADICES = (2, 3, 5, 7)


def prod(xs) -> int:
    return int(math.prod(xs))


def _unravel(t, shape):
    """Flat index (traced or int) -> tuple of indices (row-major)."""
    idx = []
    for s in reversed(shape):
        idx.append(t % s)
        t = t // s
    return tuple(reversed(idx))


def _slice_var(x, starts, sizes, nb: int, rank: int):
    """``dynamic_slice`` on the variable axes only."""
    zero = jnp.zeros((), jnp.int32)
    start = [zero] * nb + [jnp.asarray(s, jnp.int32) for s in starts] + [zero] * (
        x.ndim - nb - rank)
    size = list(x.shape[:nb]) + list(sizes) + list(x.shape[nb + rank :])
    return jax.lax.dynamic_slice(x, start, size)


def shift_add(x, w, out_cap, nb: int, rank: int, xmask=None, wmask=None):
    """``out[p] = sum_j w[j] * x[p + cap_w - 1 - j]`` for ``p < out_cap`` (per axis).

    ``x`` must extend at least ``out_cap + cap_w - 1`` on every variable axis. ``UNROLL``
    taps per loop iteration fuse into one pass over the output. ``xmask``/``wmask``
    (boolean, shaped like ``x``/``w`` without feature axes) drop every product whose
    factors are not both valid, instead of multiplying by a zero.
    """
    cap_w = tuple(w.shape[nb : nb + rank])
    out_cap = tuple(out_cap)
    out_shape = x.shape[:nb] + out_cap + x.shape[nb + rank :]
    dt = jnp.result_type(x.dtype, w.dtype)
    n_taps = prod(cap_w)
    acc = jnp.zeros(out_shape, dt)
    if n_taps == 0:
        return acc
    unroll = min(UNROLL, n_taps)
    n_iter = -(-n_taps // unroll)
    n_feat = x.ndim - nb - rank
    feat = lambda m: m.reshape(m.shape + (1,) * n_feat)

    def body(t, acc):
        for u in range(unroll):
            flat = t * unroll + u
            last = jnp.minimum(flat, n_taps - 1) if isinstance(flat, jax.Array) else min(
                flat, n_taps - 1)
            j = _unravel(last, cap_w)
            tap = _slice_var(w, j, (1,) * rank, nb, rank)
            starts = [q - 1 - jk for q, jk in zip(cap_w, j)]
            seg = _slice_var(x, starts, out_cap, nb, rank)
            term = tap * seg
            if xmask is not None:
                ok = _slice_var(xmask, starts, out_cap, nb, rank) & _slice_var(
                    wmask, j, (1,) * rank, nb, rank)
                term = jnp.where(feat(ok), term, jnp.zeros((), dt))
            if n_taps % unroll:  # only the last iteration can run past the taps
                term = jnp.where(flat < n_taps, term, jnp.zeros((), dt))
            acc = acc + term
        return acc

    if n_iter == 1:
        return body(0, acc)
    return jax.lax.fori_loop(0, n_iter, body, acc)


def full_shift_add(x, w, nb: int, rank: int, xmask=None, wmask=None):
    """Full convolution ``x * w`` looping over the taps of ``w``."""
    cap_x = x.shape[nb : nb + rank]
    cap_w = w.shape[nb : nb + rank]
    cap_o = tuple(p + q - 1 for p, q in zip(cap_x, cap_w))
    pads = [(0, 0)] * nb + [(q - 1, q - 1) for q in cap_w]
    px = jnp.pad(x, pads + [(0, 0)] * (x.ndim - nb - rank))
    if xmask is not None:
        xmask = jnp.pad(xmask, pads)
    return shift_add(px, w, cap_o, nb, rank, xmask, wmask)


def _longer_first(a, b, nb: int, rank: int) -> bool:
    return prod(a.shape[nb : nb + rank]) >= prod(b.shape[nb : nb + rank])


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def direct_conv(a: jax.Array, b: jax.Array, nb: int, rank: int) -> jax.Array:
    """Full N-D convolution of zero-slack operands, looping over the one with fewer taps."""
    if _longer_first(a, b, nb, rank):
        return full_shift_add(a, b, nb, rank)
    return full_shift_add(b, a, nb, rank)


@direct_conv.defjvp
def _direct_conv_jvp(nb, rank, primals, tangents):
    a, b = primals
    da, db = tangents
    # Each term loops over the taps of a primal operand (linear in the tangent).
    return direct_conv(a, b, nb, rank), (full_shift_add(da, b, nb, rank)
                                         + full_shift_add(db, a, nb, rank))


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def direct_conv_masked(a, b, ma, mb, nb: int, rank: int) -> jax.Array:
    """``direct_conv`` that skips products with an operand's slack (``ma``/``mb``: the
    boolean extents ``[*batch, *cap]``): exact on non-finite input, like NumPy."""
    if _longer_first(a, b, nb, rank):
        return full_shift_add(a, b, nb, rank, ma, mb)
    return full_shift_add(b, a, nb, rank, mb, ma)


@direct_conv_masked.defjvp
def _direct_conv_masked_jvp(nb, rank, primals, tangents):
    a, b, ma, mb = primals
    da, db = tangents[:2]
    return (direct_conv_masked(a, b, ma, mb, nb, rank),
            full_shift_add(da, b, nb, rank) + full_shift_add(db, a, nb, rank))


@functools.lru_cache(maxsize=4096)
def fast_fft_length(n: int) -> int:
    """Smallest ``m >= n`` whose prime factors are all in {2, 3, 5, 7}."""
    m = max(int(n), 1)
    while True:
        r = m
        for p in FAST_RADICES:
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def fft_conv(a: jax.Array, b: jax.Array, nb: int, rank: int) -> jax.Array:
    """Full N-D convolution through real FFTs of fast lengths ``>= cap_a + cap_b - 1``."""
    cap_a = a.shape[nb : nb + rank]
    cap_b = b.shape[nb : nb + rank]
    cap_o = tuple(p + q - 1 for p, q in zip(cap_a, cap_b))
    sizes = tuple(fast_fft_length(c) for c in cap_o)
    axes = tuple(range(nb, nb + rank))
    dt = jnp.result_type(a.dtype, b.dtype)
    ft = jnp.promote_types(dt, jnp.float32)  # XLA's FFT takes float32/float64, not halves
    a, b = a.astype(ft), b.astype(ft)
    # each item scaled by a power of two to |x| <= 1 (exact): the spectra of large finite
    # items (|x| ~ 1e36 in float32) would overflow where the result itself does not
    sa, sb = pow2_scale(a, nb), pow2_scale(b, nb)
    fa = jnp.fft.rfftn(a / sa, s=sizes, axes=axes)
    fb = jnp.fft.rfftn(b / sb, s=sizes, axes=axes)
    out = jnp.fft.irfftn(fa * fb, s=sizes, axes=axes)
    idx = tuple([slice(None)] * nb + [slice(0, c) for c in cap_o])
    return (out[idx] * sa * sb).astype(dt)


def pow2_scale(x: jax.Array, nb: int) -> jax.Array:
    """Per item (all axes after the ``nb`` batch axes, kept as size 1): the power of two
    ``2**e >= max |x|`` (1 for all-zero or non-finite items), within the normal range of
    ``x.dtype``. Dividing by it is exact; it carries no gradient."""
    peak = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=tuple(range(nb, x.ndim)),
                                         keepdims=True, initial=0))
    info = jnp.finfo(x.dtype)
    e = jnp.clip(jnp.frexp(peak)[1], info.minexp, info.maxexp - 1)
    return jnp.exp2(e.astype(x.dtype))


def conv_output_lengths(la, lb):
    """Model A output lengths: ``la + lb - 1`` per axis (0 on an axis where either is 0).

    Any zero length makes the result empty; keeping the other axes as ``la + lb - 1``
    makes ``[1]`` an exact identity, also for empty operands of shape ``(0, n)``.
    Works on NumPy and JAX integer arrays.
    """
    xp = jnp if isinstance(la, (jax.Array, jax.core.Tracer)) or isinstance(
        lb, (jax.Array, jax.core.Tracer)) else np
    return xp.where((la > 0) & (lb > 0), la + lb - 1, 0).astype(xp.int32)


# -- work counts used by the cost model ---------------------------------------------------
def direct_macs(cap_a, cap_b, items: int) -> float:
    """Multiply-adds of ``items`` padded direct convolutions: ``items·prod(cap_a)·prod(cap_b)``."""
    return float(items) * prod(cap_a) * prod(cap_b)


def fft_flops_at(n: int, items: int) -> float:
    """Nominal ``3 * 2.5 N log2 N`` for two forward and one inverse real FFT of ``N``
    points, plus the product, per item."""
    return items * (7.5 * n * max(np.log2(max(n, 1)), 1.0) + 3.0 * n)


def fft_size(cap_a, cap_b) -> int:
    """Points of the N-D FFT that ``fft_conv`` runs for these capacities."""
    return prod(fast_fft_length(p + q - 1) for p, q in zip(cap_a, cap_b))
