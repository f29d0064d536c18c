"""The ``cpu`` backend: variable-length attention in the C++ kernels of ``csrc/attention.cc``.

One XLA FFI custom call per batch runs the flash-style forward (online softmax over key
tiles clipped to each item's lengths; padding is never computed) and one runs the
FlashAttention-2 style backward (scores recomputed from the saved log-sum-exp); a
``jax.custom_vjp`` ties them together. Lengths are arguments of the custom call, so the
backend works under ``jit`` with traced lengths and never reads them on the host; under
``vmap`` the call runs once per mapped element (``vmap_method="sequential"``).

Where the kernels cannot run (no extension build, or not on CPU; ``kernels.target``
returns None after one ``KernelFallbackWarning``), ``compute`` runs the ``fallback``
backend (``bucketed`` by default) instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vsla_jax import kernels
from vsla_jax.attention.bucketed import BucketedBackend
from vsla_jax.errors import VSLAError, VSLATypeError
from vsla_jax.tensor import VarTensor
from vsla_jax.util import float0_zeros

FWD, BWD = "vsla_attention_fwd", "vsla_attention_bwd"
DTYPES = (jnp.float32, jnp.float64)


def _kernel_dtype(dtype) -> jnp.dtype:
    """The dtype the kernels run in: float32/float64 as is, narrower floats in float32."""
    return jnp.dtype(dtype) if jnp.dtype(dtype) in DTYPES else jnp.dtype(jnp.float32)


def _target(symbol: str, *arrays) -> str:
    """The registered FFI target ``symbol``; VSLAError where the kernels cannot run."""
    name = kernels.target(symbol, *arrays)
    if name is None:
        raise VSLAError(f"cpu attention: the C++ kernel {symbol} cannot run here (no build "
                        "of vsla_jax.cpu_kernels, or not on CPU); use CPUBackend, which "
                        "falls back to the XLA path")
    return name


def _merged(shape: tuple) -> tuple:
    """``[B, C, H, D]`` -> ``[B, C, H * D]``: the shape the kernels' outputs are declared
    with, reshaped (a bitcast) to four dimensions outside the custom call.

    The kernels leave the padding of an output as pages never touched, which read as the
    zero page, so a mostly padded output costs no memory traffic. An elementwise op that
    XLA ran in place on such a buffer (where the output dies in that op, e.g. ``o + x``
    or an SGD step on the gradients) would read-map every padding page to the zero page
    and then copy it on write, with a TLB flush each. XLA only lets an elementwise user
    share an operand's buffer when both have the same shape; through the bitcast they
    differ, so the user writes a fresh buffer instead (``docs/kernels.md``).
    """
    return (*shape[:-2], shape[-2] * shape[-1])


def _fwd_call(qd, kd, vd, lq, lk, causal: bool, scale: float, sizes=None):
    """qd ``[B, Cq, H, D]``, kd ``[B, Ck, Hkv, D]``, vd ``[B, Ck, Hkv, Dv]`` (one float
    dtype), lq/lk int32 ``[B]`` or ``[B, R]`` (column 0 is the sequence length; a
    VarTensor's lengths as they are) -> (o ``[B, Cq, H, Dv]``, lse ``[B, H, Cq]``,
    out_lengths int32 ``[B, 1]``, column 0 of ``lq``).

    ``sizes = (H, D, Hkv, Dv)``: the kernel reads ``[..., :H, :D]`` of larger buffers
    (strides, no copy); None: the buffers' own sizes. The kernel reads the lengths'
    column 0 in place and returns it as the output lengths, so the program is one custom
    call: XLA slices beside it cost more than the kernel on small batches."""
    b, cq = qd.shape[:2]
    h, _, _, dv = sizes or (qd.shape[2], qd.shape[3], kd.shape[2], vd.shape[3])
    out = (jax.ShapeDtypeStruct(_merged((b, cq, h, dv)), qd.dtype),
           jax.ShapeDtypeStruct((b, h, cq), qd.dtype),
           jax.ShapeDtypeStruct((b, 1), jnp.int32))
    o, lse, lengths = jax.ffi.ffi_call(_target(FWD, qd), out, vmap_method="sequential")(
        qd, kd, vd, lq, lk, causal=bool(causal), scale=np.float64(scale), **_sizes(sizes))
    return o.reshape(b, cq, h, dv), lse, lengths


def _sizes(sizes) -> dict:
    """The kernels' logical-size attributes (0: the buffer's own size)."""
    return dict(zip(("heads", "head_dim", "kv_heads", "v_head_dim"),
                    map(np.int64, sizes or (0, 0, 0, 0))))


def _bwd_call(qd, kd, vd, lq, lk, o, lse, do, causal: bool, scale: float, sizes=None):
    """The cotangents (dq, dk, dv), shaped like (qd, kd, vd) (zero in head padding past
    ``sizes``, as in ``_fwd_call``)."""
    out = tuple(jax.ShapeDtypeStruct(_merged(x.shape), x.dtype) for x in (qd, kd, vd))
    grads = jax.ffi.ffi_call(_target(BWD, qd), out, vmap_method="sequential")(
        qd, kd, vd, lq, lk, o, lse, do, causal=bool(causal), scale=np.float64(scale),
        **_sizes(sizes))
    return tuple(g.reshape(x.shape) for g, x in zip(grads, (qd, kd, vd)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def attention_with_lengths(qd, kd, vd, lq, lk, causal: bool, scale: float, sizes=None):
    """Attention on ``[..., :H, :D]`` of the buffers and the output lengths, from one
    custom call.

    qd ``[B, Cq, Hc, Dc]`` (``Hc >= H``, ``Dc >= D``), kd/vd likewise, ``sizes = (H, D,
    Hkv, Dv)`` (None: the buffers' own sizes); lq/lk int32 ``[B]`` or ``[B, R]``
    (column 0 is read) -> (o ``[B, Cq, H, Dv]``, lengths int32 ``[B, 1]``). Both kernels
    read the buffers through strides (no cropped copy); the gradients have the buffers'
    shapes, zero in the head padding."""
    o, _, lengths = _fwd_call(qd, kd, vd, lq, lk, causal, scale, sizes)
    return o, lengths


def _fwd_rule(qd, kd, vd, lq, lk, causal, scale, sizes):
    o, lse, lengths = _fwd_call(qd, kd, vd, lq, lk, causal, scale, sizes)
    return (o, lengths), (qd, kd, vd, lq, lk, o, lse)


def _bwd_rule(causal, scale, sizes, saved, cts):
    qd, kd, vd, lq, lk, o, lse = saved
    do = cts[0].astype(o.dtype)
    grads = _bwd_call(qd, kd, vd, lq, lk, o, lse, do, causal, scale, sizes)
    return (*grads, float0_zeros(lq), float0_zeros(lk))


attention_with_lengths.defvjp(_fwd_rule, _bwd_rule)


def cpu_attention(qd, kd, vd, lq, lk, causal: bool, scale: float):
    """Varlen attention on padded arrays through the C++ kernels (float32/float64).

    qd ``[B, Cq, H, D]``, kd ``[B, Ck, Hkv, D]``, vd ``[B, Ck, Hkv, Dv]``, lq/lk int32
    ``[B]`` -> ``[B, Cq, H, Dv]``, zero at rows ``>= lq`` and for items without keys.
    Differentiable (reverse mode) through the backward kernel.
    """
    return attention_with_lengths(qd, kd, vd, lq, lk, causal, scale, None)[0]


@functools.partial(jax.jit, static_argnames=("causal", "scale", "sizes"))
def kernel_call(qd, kd, vd, lengths_q, lengths_k, causal: bool, scale: float,
                sizes: tuple | None):
    """qd/kd/vd ``[B, C, Hc, Dc]`` (any float dtypes; the kernels run in float32 or
    float64, the output has qd's dtype), lengths ``[B, rank]`` -> (o, output lengths
    int32 ``[B, 1]``). Arrays in and out, and one custom call inside: VarTensor pytrees
    or XLA slices of the lengths cost the call more than a small batch's kernel."""
    ct = _kernel_dtype(jnp.result_type(qd, kd, vd))
    out, lengths = attention_with_lengths(
        qd.astype(ct), kd.astype(ct), vd.astype(ct), lengths_q.astype(jnp.int32),
        lengths_k.astype(jnp.int32), causal, scale, sizes)
    return out.astype(qd.dtype), lengths


class CPUBackend:
    """The C++ flash kernels (``cpu_attention``); ``fallback`` (default ``bucketed``)
    where ``kernels.target`` says they cannot run. Kernel tiles are fixed (64 x 64), so
    there is nothing to plan: ``prepare``/``optimize_tiling`` return ``{}``."""

    name = "cpu"

    def __init__(self, fallback=None):
        self.fallback = fallback if fallback is not None else BucketedBackend()

    def available(self, *arrays) -> bool:
        """Whether both kernels can run on ``arrays`` here."""
        return kernels.target(FWD, *arrays) is not None and kernels.registered(BWD)

    def prepare(self, q, k, v) -> dict:
        return {}

    def optimize_tiling(self, q, k) -> dict:
        return {}

    def compute(self, q, k, v, causal, scale, plan) -> VarTensor:
        if not jnp.issubdtype(q.dtype, jnp.floating):
            raise VSLATypeError(f"cpu attention: q must be floating, got {q.dtype}")
        if not self.available(q.data, k.data, v.data):
            return self.fallback.compute(q, k, v, causal, scale,
                                         self.fallback.prepare(q, k, v))
        out, lengths = kernel_call(q.data, k.data, v.data, q.lengths, k.lengths,
                                   bool(causal), float(scale), None)
        return VarTensor.trusted(out, lengths, q.model)

    def compute_strided(self, q: VarTensor, k: VarTensor, v: VarTensor, sizes: tuple,
                        causal: bool, scale: float) -> VarTensor | None:
        """Attention over ``[..., :H, :D]`` of q/k/v data ``[B, C, Hc, Dc]`` (rank-3
        batches from ``vs.stack`` keep their capacity-padded head axes), ``sizes = (H,
        D, Hkv, Dv)`` (ints), without cropping copies; lengths ``[B, >= 1]`` (column 0
        is the sequence). None where the kernels cannot run here (the caller crops and
        takes ``compute``, which falls back)."""
        if not self.available(q.data, k.data, v.data):
            return None
        out, lengths = kernel_call(q.data, k.data, v.data, q.lengths, k.lengths,
                                   bool(causal), float(scale), sizes)
        return VarTensor.trusted(out, lengths, q.model)
