"""The ``cpu`` backend: variable-length attention in the C++ kernels of ``csrc/attention.cc``.

One XLA FFI custom call per batch runs the flash-style forward (online softmax over key
tiles clipped to each item's lengths; padding is never computed) and one runs the
FlashAttention-2 style backward (scores recomputed from the saved log-sum-exp). Both are
JAX primitives whose JVP and transpose rules tie them together, so every transformation
works (below). Lengths are arguments of the custom call, so the backend works under
``jit`` with traced lengths and never reads them on the host; under ``vmap`` the mapped
axis is merged into the batch axis of one call.

Where the kernels cannot run (no extension build, or not on CPU; ``kernels.target``
returns None after one ``KernelFallbackWarning``), ``compute`` runs the ``fallback``
backend (``bucketed`` by default) instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad

from vsla_jax import kernels
from vsla_jax.attention import derivatives
from vsla_jax.attention.bucketed import BucketedBackend
from vsla_jax.errors import VSLATypeError
from vsla_jax.primitive import is_zero, kernel_primitive, zero_like
from vsla_jax.tensor import VarTensor

FWD, BWD = "vsla_attention_fwd", "vsla_attention_bwd"
DTYPES = (jnp.float32, jnp.float64)


def _kernel_dtype(dtype) -> jnp.dtype:
    """The dtype the kernels run in: float32/float64 as is, narrower floats in float32."""
    return jnp.dtype(dtype) if jnp.dtype(dtype) in DTYPES else jnp.dtype(jnp.float32)


def _target(symbol: str, *arrays) -> str:
    """The registered FFI target ``symbol``; VSLAError where the kernels cannot run."""
    return kernels.required(symbol, "cpu attention", "use CPUBackend, which falls back "
                            "to the XLA path", *arrays)


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


def own_sizes(qd, kd, vd) -> tuple:
    """``(H, D, Hkv, Dv)`` of the buffers themselves (nothing cropped)."""
    return (qd.shape[2], qd.shape[3], kd.shape[2], vd.shape[3])


def _sizes(qd, kd, vd, sizes) -> dict:
    """The kernels' logical-size attributes (0: the buffer's own size)."""
    own = sizes is None or tuple(sizes) == own_sizes(qd, kd, vd)
    return dict(zip(("heads", "head_dim", "kv_heads", "v_head_dim"),
                    map(np.int64, (0, 0, 0, 0) if own else sizes)))


def forward_call(qd, kd, vd, lq, lk, *, causal: bool, scale: float, sizes: tuple):
    """qd ``[B, Cq, Hc, Dc]``, kd ``[B, Ck, Hkc, Dc']``, vd ``[B, Ck, Hkc, Dvc]`` (one
    float dtype), lq/lk int32 ``[B]`` or ``[B, R]`` (column 0 is the sequence length; a
    VarTensor's lengths as they are), ``sizes = (H, D, Hkv, Dv)``, the part of the
    buffers read (strides, no copy) -> (o ``[B, Cq, H * Dv]`` (heads merged: ``_merged``),
    lse ``[B, H, Cq]``, out_lengths int32 ``[B, 1]``, column 0 of ``lq``).

    The kernel reads the lengths' column 0 in place and returns it as the output lengths,
    so the program is one custom call: XLA slices beside it cost more than the kernel on
    small batches."""
    b, cq = qd.shape[:2]
    h, _, _, dv = sizes
    out = (jax.ShapeDtypeStruct(_merged((b, cq, h, dv)), qd.dtype),
           jax.ShapeDtypeStruct((b, h, cq), qd.dtype),
           jax.ShapeDtypeStruct((b, 1), jnp.int32))
    return jax.ffi.ffi_call(_target(FWD, qd), out)(
        qd, kd, vd, lq, lk, causal=bool(causal), scale=np.float64(scale),
        **_sizes(qd, kd, vd, sizes))


def backward_call(qd, kd, vd, lq, lk, o, lse, do, *, causal: bool, scale: float, sizes: tuple):
    """The cotangents (dq, dk, dv) of the buffers, each with its last two axes merged
    (zero in the padding and the head padding past ``sizes``); ``o``/``do`` merged."""
    out = tuple(jax.ShapeDtypeStruct(_merged(x.shape), x.dtype) for x in (qd, kd, vd))
    return jax.ffi.ffi_call(_target(BWD, qd), out)(
        qd, kd, vd, lq, lk, o, lse, do, causal=bool(causal), scale=np.float64(scale),
        **_sizes(qd, kd, vd, sizes))


# Three primitives (vsla_jax.primitive) make the kernels differentiable in every mode:
#   attn_fwd_p  (q, k, v, lq, lk) -> (o, lse, lengths): the forward kernel;
#   attn_tan_p  (q, k, v, lq, lk, o, lse, tq, tk, tv) -> (t_o, t_lse): the forward-mode
#               tangent, linear in (tq, tk, tv), in XLA (derivatives.tangent); its
#               transpose is the backward kernel;
#   attn_bwd_p  (q, k, v, lq, lk, o, lse, do) -> (dq, dk, dv): the backward kernel; its
#               JVP is XLA's (derivatives.backward), its transpose in do is attn_tan_p.
# Reverse mode (grad, vjp) runs the two kernels and nothing else; jvp, jacfwd of a
# jitted function and hessian work too, with XLA computing the tangents.
attn_fwd_p = kernel_primitive("vsla_attention", forward_call, merge_batch=True,
                              portable=derivatives.forward)
attn_tan_p = kernel_primitive("vsla_attention_tangent", derivatives.tangent, merge_batch=True)
attn_bwd_p = kernel_primitive("vsla_attention_backward", backward_call, merge_batch=True,
                              portable=derivatives.backward)


def _fwd_jvp(primals, tangents, **params):
    o, lse, lengths = attn_fwd_p.bind(*primals, **params)
    lin = tangents[:3]
    if all(is_zero(t) for t in lin):
        return (o, lse, lengths), (zero_like(o), zero_like(lse), zero_like(lengths))
    t_o, t_lse = attn_tan_p.bind(*primals, o, lse, *map(ad.instantiate_zeros, lin), **params)
    return (o, lse, lengths), (t_o, t_lse, zero_like(lengths))


def _tan_transpose(cts, *args, **params):
    res, lin = args[:7], args[7:]
    ct_o, ct_lse = cts
    if is_zero(ct_o) and is_zero(ct_lse):
        return [None] * len(args)
    shapes = [t.aval.shape if ad.is_undefined_primal(t) else t.shape for t in lin]
    if is_zero(ct_lse):  # the only case reverse mode meets: the backward kernel
        grads = attn_bwd_p.bind(*res, ct_o.astype(res[5].dtype), **params)
        grads = [g.reshape(s) for g, s in zip(grads, shapes)]
    else:  # a cotangent on lse (never from vs.attention, which drops lse): XLA's
        ct = (ad.instantiate_zeros(ct_o), ct_lse)
        specs = [jax.ShapeDtypeStruct(s, x.dtype) for s, x in zip(shapes, res[:3])]
        grads = jax.linear_transpose(
            lambda *t: derivatives.tangent(*res, *t, **params), *specs)(ct)
    return [None] * 7 + [g if ad.is_undefined_primal(t) else None for g, t in zip(grads, lin)]


def _xla_jvp(impl, prim=None):
    """A JVP rule from ``jax.jvp`` of the XLA form ``impl``; the primal output comes from
    ``prim`` (the kernel) when given."""
    def rule(primals, tangents, **params):
        tangents = [ad.instantiate_zeros(t) for t in tangents]
        out, t_out = jax.jvp(lambda *x: impl(*x, **params), tuple(primals), tuple(tangents))
        if prim is not None:
            out = prim.bind(*primals, **params)
        return tuple(out), tuple(t_out)
    return rule


def _bwd_transpose(cts, *args, **params):
    """The backward is linear in ``do``; its transpose is the tangent's o-part."""
    res, do = args[:7], args[7]
    if all(is_zero(c) for c in cts):
        return [None] * 8
    lin = [ad.instantiate_zeros(c).reshape(x.shape) for c, x in zip(cts, res[:3])]
    t_o, _ = attn_tan_p.bind(*res, *lin, **params)
    return [None] * 7 + [t_o.astype(do.aval.dtype)]


ad.primitive_jvps[attn_fwd_p] = _fwd_jvp
ad.primitive_transposes[attn_tan_p] = _tan_transpose
ad.primitive_jvps[attn_tan_p] = _xla_jvp(derivatives.tangent)
ad.primitive_jvps[attn_bwd_p] = _xla_jvp(derivatives.backward, attn_bwd_p)
ad.primitive_transposes[attn_bwd_p] = _bwd_transpose


def attention_with_lengths(qd, kd, vd, lq, lk, causal: bool, scale: float, sizes=None):
    """Attention on ``[..., :H, :D]`` of the buffers and the output lengths, from one
    custom call.

    qd ``[B, Cq, Hc, Dc]`` (``Hc >= H``, ``Dc >= D``), kd/vd likewise, ``sizes = (H, D,
    Hkv, Dv)`` (None: the buffers' own sizes); lq/lk int32 ``[B]`` or ``[B, R]``
    (column 0 is read) -> (o ``[B, Cq, H, Dv]``, lengths int32 ``[B, 1]``). Both kernels
    read the buffers through strides (no cropped copy); the gradients have the buffers'
    shapes, zero in the head padding. Differentiable in every mode (``attn_fwd_p``)."""
    sizes = tuple(int(n) for n in sizes) if sizes is not None else own_sizes(qd, kd, vd)
    o, _, lengths = attn_fwd_p.bind(qd, kd, vd, lq, lk, causal=bool(causal),
                                    scale=float(scale), sizes=sizes)
    return o.reshape(*qd.shape[:2], sizes[0], sizes[3]), lengths


def cpu_attention(qd, kd, vd, lq, lk, causal: bool, scale: float):
    """Varlen attention on padded arrays through the C++ kernels (float32/float64).

    qd ``[B, Cq, H, D]``, kd ``[B, Ck, Hkv, D]``, vd ``[B, Ck, Hkv, Dv]``, lq/lk int32
    ``[B]`` -> ``[B, Cq, H, Dv]``, zero at rows ``>= lq`` and for items without keys.
    Differentiable in every mode; reverse mode runs the backward kernel.
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
