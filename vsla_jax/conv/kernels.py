"""Convolution kernels over the variable axes of zero-slack padded arrays (XLA paths).

Layout: ``[*batch, *cap, *feat]`` with ``nb`` batch axes and ``rank`` variable axes;
both operands share batch and feature shapes (depthwise over features).

- ``direct_conv``: shift-and-add over the taps of one operand (``fori_loop``); work
  ``O(cap_a * cap_b)`` per item. Its tangent rule keeps the loop over the primal
  operand's taps, so reverse mode stores one tap value per iteration, never a shifted
  copy of the signal.
- ``fft_conv``: real FFTs of a fast length ``>= cap_a + cap_b - 1``, per call (never a
  batch-wide maximum).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _prod(xs) -> int:
    return int(math.prod(xs))


def _unravel(t, shape):
    """Traced flat index -> tuple of traced indices (row-major)."""
    idx = []
    for s in reversed(shape):
        idx.append(t % s)
        t = t // s
    return tuple(reversed(idx))


def _slice_var(x, starts, sizes, nb, rank):
    """``dynamic_slice`` on the variable axes only."""
    zero = jnp.zeros((), jnp.int32)
    start = [zero] * nb + [jnp.asarray(s, jnp.int32) for s in starts] + [zero] * (
        x.ndim - nb - rank)
    size = list(x.shape[:nb]) + list(sizes) + list(x.shape[nb + rank :])
    return jax.lax.dynamic_slice(x, start, size)


def _pad_var(x, pads, nb, rank):
    cfg = [(0, 0)] * nb + list(pads) + [(0, 0)] * (x.ndim - nb - rank)
    return jnp.pad(x, cfg)


UNROLL = 8


def _shift_add(x, w, nb: int, rank: int):
    """Full convolution looping over the taps of ``w``: ``sum_j w[j] * shift(x, j)``.

    ``UNROLL`` taps per loop iteration fuse into one pass over the output (about 2x
    faster on CPU than one tap per pass, which is memory bound).
    """
    cap_x = x.shape[nb : nb + rank]
    cap_w = w.shape[nb : nb + rank]
    cap_o = tuple(p + q - 1 for p, q in zip(cap_x, cap_w))
    px = _pad_var(x, [(q - 1, q - 1) for q in cap_w], nb, rank)
    out_shape = x.shape[:nb] + cap_o + x.shape[nb + rank :]
    dt = jnp.result_type(x.dtype, w.dtype)
    n_taps = _prod(cap_w)
    unroll = min(UNROLL, n_taps)
    n_iter = -(-n_taps // unroll)

    def body(t, acc):
        for u in range(unroll):
            flat = t * unroll + u
            valid = flat < n_taps
            j = _unravel(jnp.minimum(flat, n_taps - 1), cap_w)
            tap = _slice_var(w, j, (1,) * rank, nb, rank)
            if n_taps % unroll:  # only the last iteration can run past the taps
                tap = jnp.where(valid, tap, jnp.zeros((), tap.dtype))
            starts = [q - 1 - jk for q, jk in zip(cap_w, j)]
            acc = acc + tap * _slice_var(px, starts, cap_o, nb, rank)
        return acc

    return jax.lax.fori_loop(0, n_iter, body, jnp.zeros(out_shape, dt))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def direct_conv(a: jax.Array, b: jax.Array, nb: int, rank: int) -> jax.Array:
    """Full N-D convolution, looping over the operand with fewer taps."""
    cap_a = a.shape[nb : nb + rank]
    cap_b = b.shape[nb : nb + rank]
    if _prod(cap_a) < _prod(cap_b):
        return _shift_add(b, a, nb, rank)
    return _shift_add(a, b, nb, rank)


@direct_conv.defjvp
def _direct_conv_jvp(nb, rank, primals, tangents):
    a, b = primals
    da, db = tangents
    # Each term loops over the taps of a primal operand (linear in the tangent).
    return direct_conv(a, b, nb, rank), _shift_add(da, b, nb, rank) + _shift_add(db, a, nb, rank)


FAST_RADICES = (2, 3, 5, 7)


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
    fa = jnp.fft.rfftn(a.astype(dt), s=sizes, axes=axes)
    fb = jnp.fft.rfftn(b.astype(dt), s=sizes, axes=axes)
    out = jnp.fft.irfftn(fa * fb, s=sizes, axes=axes)
    idx = tuple([slice(None)] * nb + [slice(0, c) for c in cap_o])
    return out[idx].astype(dt)


#: Pallas dispatch for rank-1 direct convolution: "auto" (on GPU backends), "off",
#: or "interpret" (force the kernel through the Pallas interpreter, for CPU tests).
PALLAS_MODE = "auto"


def _pallas_mode(rank: int) -> str | None:
    if rank != 1 or PALLAS_MODE == "off":
        return None
    if PALLAS_MODE == "interpret":
        return "interpret"
    return "gpu" if jax.default_backend() == "gpu" else None


def _pallas_rows(a, b, la, lb, nb: int, interpret: bool):
    """Flatten batch and feature axes into rows and run the Pallas kernel."""
    from vsla_jax.pallas_conv import pallas_direct_conv

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
def direct_conv_varlen(a, b, la, lb, nb: int, rank: int):
    """``direct_conv`` that may use the Pallas kernel (rank 1, GPU), skipping padded tiles.

    ``la``/``lb`` are the ``int32[*batch, rank]`` lengths. Tangents use the XLA path.
    """
    mode = _pallas_mode(rank)
    if mode is None:
        return direct_conv(a, b, nb, rank)
    return _pallas_rows(a, b, la, lb, nb, interpret=mode == "interpret")


@direct_conv_varlen.defjvp
def _direct_conv_varlen_jvp(nb, rank, primals, tangents):
    a, b, la, lb = primals
    da, db = tangents[:2]
    out = direct_conv_varlen(a, b, la, lb, nb, rank)
    return out, _shift_add(da, b, nb, rank) + _shift_add(db, a, nb, rank)


def conv_padded(a: jax.Array, b: jax.Array, nb: int, rank: int, method: str,
                la: jax.Array | None = None, lb: jax.Array | None = None) -> jax.Array:
    """Dispatch ``direct`` or ``fft`` on padded operands of equal batch/feature shape."""
    if method == "direct":
        if la is not None and _pallas_mode(rank) is not None:
            return direct_conv_varlen(a, b, la, lb, nb, rank)
        return direct_conv(a, b, nb, rank)
    if method == "fft":
        return fft_conv(a, b, nb, rank)
    raise ValueError(f"method must be 'direct' or 'fft' here, got {method!r}")


def direct_flops(cap_a, cap_b, items: int) -> float:
    """``2 * prod(cap_a) * prod(cap_b)`` multiply-adds per item."""
    return 2.0 * items * _prod(cap_a) * _prod(cap_b)


def fft_flops(cap_a, cap_b, items: int) -> float:
    """``fft_flops_at`` the fast FFT size of ``cap_a + cap_b - 1``."""
    return fft_flops_at(_prod(fast_fft_length(p + q - 1) for p, q in zip(cap_a, cap_b)), items)


def fft_flops_at(n: int, items: int) -> float:
    """Nominal ``3 * 2.5 N log2 N`` for two forward and one inverse real FFT of ``N``
    points, plus the product, per item."""
    return items * (7.5 * n * max(np.log2(n), 1.0) + 3.0 * n)
