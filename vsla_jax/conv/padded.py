"""Model A convolution of two padded VarTensor batches: one program per capacity bucket.

This is the plan that needs no host work: it runs at the operands' own capacities, so
it is what ``vs.conv`` runs under ``jit`` with traced lengths, and what the engine picks
when the batch is uniform enough that padding costs less than re-packing.

Non-finite input: ``direct`` first checks that every value is finite (one pass over the
operands); if one is not, it runs the masked kernel that skips products with slack, so
``inf``/``nan`` reach exactly the outputs NumPy gives them. ``fft`` spreads a non-finite
value through its whole item; ``auto`` therefore falls back to the exact direct kernel
when an operand holds one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vsla_jax.conv import kernels, pallas
from vsla_jax.conv.kernels import conv_output_lengths
from vsla_jax.errors import VSLATypeError
from vsla_jax.tensor import VarTensor, broadcast_operands, extent_mask, zero_slack

#: ``pallas`` modes: ``"gpu"`` compiles the kernel, ``"interpret"`` runs it in the
#: Pallas interpreter (CPU tests), ``None`` uses the XLA kernel.
PALLAS_MODES = (None, "gpu", "interpret")


def all_finite(*xs) -> jax.Array:
    """Scalar bool: every value of every array is finite.

    ``sum(x * 0)`` is 0 for finite ``x`` and NaN as soon as one value is ``inf`` or
    ``nan``; a sum reduction runs faster on XLA:CPU than a boolean ``all``.
    """
    out = jnp.asarray(True)
    for x in xs:
        out = out & jnp.isfinite(jnp.sum(x * jnp.zeros((), x.dtype)))
    return out


def check_dtypes(a: VarTensor, b: VarTensor, method: str) -> None:
    """Raise ``VSLATypeError`` unless both operands hold floating or complex data (real
    only for ``method="fft"``)."""
    check_conv_dtypes(a.data.dtype, b.data.dtype, method)


@functools.lru_cache(maxsize=64)
def check_conv_dtypes(dtype_a, dtype_b, method: str) -> None:
    """``check_dtypes`` on the dtypes themselves (cached: a hot path of small calls)."""
    if not jnp.issubdtype(dtype_a, jnp.inexact) or not jnp.issubdtype(dtype_b, jnp.inexact):
        raise VSLATypeError(f"conv needs floating or complex data, got {dtype_a} and {dtype_b}")
    if method == "fft" and (jnp.issubdtype(dtype_a, jnp.complexfloating)
                            or jnp.issubdtype(dtype_b, jnp.complexfloating)):
        raise VSLATypeError("conv(method='fft') supports real data only")


def conv_arrays(da, db, la, lb, nb: int, rank: int, method: str, fallback: bool = False,
                pallas_mode: str | None = None) -> jax.Array:
    """Full convolution of zero-slack padded arrays with equal batch and feature shapes.

    ``method`` is ``"direct"`` or ``"fft"``; ``fallback=True`` (the engine's ``auto``)
    makes ``fft`` fall back to the exact direct kernel on non-finite input.
    """
    dt = jnp.result_type(da.dtype, db.dtype)
    da, db = da.astype(dt), db.astype(dt)
    cap_a = da.shape[nb : nb + rank]
    cap_b = db.shape[nb : nb + rank]

    def exact(da, db):
        ma, mb = extent_mask(la, cap_a), extent_mask(lb, cap_b)
        return kernels.direct_conv_masked(da, db, ma, mb, nb, rank)

    if method == "direct":
        if pallas_mode is not None and rank == 1:
            fast = lambda x, y: pallas.direct_conv_pallas(x, y, la, lb, nb,
                                                          pallas_mode == "interpret")
        else:
            fast = lambda x, y: kernels.direct_conv(x, y, nb, rank)
    elif method == "fft":
        fast = lambda x, y: kernels.fft_conv(x, y, nb, rank)
        if not fallback:
            return fast(da, db)
    else:
        raise ValueError(f"method must be 'direct' or 'fft' here, got {method!r}")
    return jax.lax.cond(all_finite(da, db), fast, exact, da, db)


@functools.partial(jax.jit, static_argnames=("method", "fallback", "pallas_mode"))
def conv_padded(a: VarTensor, b: VarTensor, method: str, fallback: bool = False,
                pallas_mode: str | None = None) -> VarTensor:
    """Model A product of two batches at their own capacities (batch shapes broadcast).

    Output capacity is ``cap_a + cap_b - 1`` per axis; feature axes are convolved
    channel by channel (depthwise).
    """
    batch, da, la, db, lb = broadcast_operands(a, b)
    if 0 in a.capacity + b.capacity:  # an operand with no room: every item is empty
        cap = tuple(max(p + q - 1, 0) for p, q in zip(a.capacity, b.capacity))
        dt = jnp.result_type(da.dtype, db.dtype)
        return VarTensor.trusted(jnp.zeros(batch + cap + a.features, dt),
                                 conv_output_lengths(la, lb), a.model)
    out = conv_arrays(da, db, la, lb, len(batch), a.rank, method, fallback, pallas_mode)
    out = VarTensor.trusted(out, conv_output_lengths(la, lb), a.model)
    # FFT round-off leaves O(eps) values in the slack: restore the invariant exactly.
    return zero_slack(out) if method == "fft" else out
