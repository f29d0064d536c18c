"""The CPU path of ``vs.conv``: ragged Model A convolution of rank-1 items in the C++
kernels of ``csrc/conv.cc``.

One XLA FFI custom call per batch runs the forward (direct summation over each item's
logical extent only, tiled and threaded over items; see ``docs/kernels.md``), and one
runs each correlation of the backward (``grad_a`` and ``grad_b``). Both are JAX
primitives (``conv_p``, ``corr_p``) whose JVP and transpose rules call each other, so
every transformation (``grad``, ``jvp``, ``jacfwd`` of a jitted function, ``hessian``,
``vmap``) runs on the kernels. The lengths are arguments of the custom call, so the path
works under ``jit`` with traced lengths, never reads them on the host there and never
builds a padded copy. Under ``vmap`` the mapped axis becomes one more batch axis of the call.

``ragged_conv(a, b)`` returns the engine's result shape exactly: data
``[*batch, cap_a + cap_b - 1]`` with zero slack, lengths ``la + lb - 1`` (0 when either
is 0). It returns None where it cannot run (no extension build or not on CPU, after one
``KernelFallbackWarning``; rank > 1, feature axes, a zero capacity, or a dtype other
than float32/float64), and the caller takes the XLA engine.

Gradients are zero in the operands' slack (the kernels never read it), like the
engine's blocked plan; on the logical extents they equal the engine's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad

from vsla_jax import kernels
from vsla_jax.conv.kernels import direct_conv_masked
from vsla_jax.errors import LengthError, ShapeError
from vsla_jax.primitive import bilinear_jvp, is_zero, kernel_primitive
from vsla_jax.tensor import VarTensor, check_pair, check_pair_shapes, extent_mask

FWD, CORR = "vsla_conv_fwd", "vsla_conv_corr"


def _registered(symbol: str) -> str:
    """``symbol``, registered as an FFI target (once); VSLAError where the extension
    lacks it (the callers of the primitives check ``kernels.target`` first)."""
    return kernels.required(symbol, "cpu conv",
                            "vs.conv falls back to the XLA engine")


DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))


def forward_call(da, db, la, lb, *, max_threads: int):
    """da ``[*batch, Ca]``, db ``[*batch, Cb]`` (one float dtype), la/lb int32 ``[*batch]``
    -> ``(out [*batch, Ca + Cb - 1], out_lengths int32 [*batch])``."""
    out = (jax.ShapeDtypeStruct(da.shape[:-1] + (da.shape[-1] + db.shape[-1] - 1,),
                                da.dtype),
           jax.ShapeDtypeStruct(la.shape, jnp.int32))
    return jax.ffi.ffi_call(_registered(FWD), out)(da, db, la, lb,
                                                  max_threads=np.int64(max_threads))


def corr_call(g, w, lo, lw, *, max_threads: int):
    """g ``[*batch, Cy + Cw - 1]``, w ``[*batch, Cw]``, lo/lw int32 ``[*batch]`` ->
    ``(y [*batch, Cy],)`` with ``y[p] = sum_{j < lw} g[p + j] w[j]`` for ``p < lo``, zero
    from ``lo`` on (all zero when ``lo`` or ``lw`` is 0)."""
    out = jax.ShapeDtypeStruct(g.shape[:-1] + (g.shape[-1] - w.shape[-1] + 1,), g.dtype)
    return (jax.ffi.ffi_call(_registered(CORR), out)(g, w, lo, lw,
                                                     max_threads=np.int64(max_threads)),)


def _extent(lengths: jax.Array, cap: int) -> jax.Array:
    """``[*batch]`` lengths -> the boolean extents ``[*batch, cap]``."""
    return extent_mask(lengths[..., None], (cap,))


def portable_forward(da, db, la, lb, *, max_threads: int):
    """``forward_call`` in XLA ops (exact on non-finite values: slack never multiplies)."""
    del max_threads
    nb = da.ndim - 1
    out = direct_conv_masked(da, db, _extent(la, da.shape[-1]), _extent(lb, db.shape[-1]),
                             nb, 1)
    lengths = jnp.where((la > 0) & (lb > 0), la + lb - 1, 0).astype(jnp.int32)
    return out.astype(da.dtype), lengths


def portable_corr(g, w, lo, lw, *, max_threads: int):
    """``corr_call`` in XLA ops: the full convolution of g with w reversed, sliced."""
    del max_threads
    nb, cw = g.ndim - 1, w.shape[-1]
    cy = g.shape[-1] - cw + 1
    full = direct_conv_masked(g, w[..., ::-1], jnp.ones(g.shape, bool),
                              _extent(lw, cw)[..., ::-1], nb, 1)
    keep = _extent(lo, cy) & (lw > 0)[..., None]
    return (jnp.where(keep, full[..., cw - 1: cw - 1 + cy], 0).astype(g.dtype),)


# conv(a, b; la, lb) is bilinear in (a, b) and so is corr(g, w; lo, lw); the transposes
# of each are the other or itself (docs/kernels.md, "Gradients"):
#   conv  w.r.t. a: corr(ct, b; la, lb)    w.r.t. b: corr(ct, a; lb, la)
#   corr  w.r.t. g: conv(h, w; lo, lw)     w.r.t. w: corr(g, h; lw, lo)
# so reverse mode runs the correlation kernel, and forward mode, jvp of jit and higher
# orders all stay on the kernels.
conv_p = kernel_primitive("vsla_ragged_conv", forward_call, merge_batch=False,
                          portable=portable_forward)
corr_p = kernel_primitive("vsla_ragged_corr", corr_call, merge_batch=False,
                          portable=portable_corr)


def _bilinear_transpose(wrt_x, wrt_y):
    """The transpose rule of ``prim(x, y, l1, l2)``, linear in whichever of x, y is
    undefined: ``wrt_x(ct, y, l1, l2)`` or ``wrt_y(ct, x, l1, l2)``."""
    def rule(cts, x, y, l1, l2, *, max_threads):
        ct = cts[0]
        if is_zero(ct):
            return [None] * 4
        if ad.is_undefined_primal(x):
            return [wrt_x(ct.astype(x.aval.dtype), y, l1, l2, max_threads), None, None, None]
        return [None, wrt_y(ct.astype(y.aval.dtype), x, l1, l2, max_threads), None, None]
    return rule


def _corr(g, w, lo, lw, max_threads):
    return corr_p.bind(g, w, lo, lw, max_threads=max_threads)[0]


def _conv(a, b, la, lb, max_threads):
    return conv_p.bind(a, b, la, lb, max_threads=max_threads)[0]


ad.primitive_jvps[conv_p] = bilinear_jvp(conv_p)
ad.primitive_transposes[conv_p] = _bilinear_transpose(
    _corr, lambda ct, a, la, lb, n: _corr(ct, a, lb, la, n))
ad.primitive_jvps[corr_p] = bilinear_jvp(corr_p)
ad.primitive_transposes[corr_p] = _bilinear_transpose(
    _conv, lambda h, g, lo, lw, n: _corr(g, h, lw, lo, n))


def conv_with_lengths(da, db, la, lb, max_threads: int = 0):
    """Full convolution of each item's logical extent (the slack is never read), and the
    output lengths, both from the one custom call.

    da ``[*batch, Ca]``, db ``[*batch, Cb]`` (float32 or float64, one dtype), la/lb int32
    ``[*batch]`` -> ``(out [*batch, Ca + Cb - 1], lengths int32 [*batch])``: ``out`` is
    zero from ``la + lb - 1`` on (all zero when ``la`` or ``lb`` is 0) and ``lengths``
    is ``la + lb - 1`` (0 when either is 0). ``max_threads=0`` uses XLA's whole
    intra-op pool. Computing the lengths in the kernel keeps the program one custom call:
    a separate XLA fusion for them cost more than the convolution of a small batch.
    Differentiable in every mode (``conv_p``); gradients are zero in the slack.
    """
    out, lengths = conv_p.bind(da, db, la, lb, max_threads=int(max_threads))
    return out, lengths


def conv_arrays(da, db, la, lb, max_threads: int = 0):
    """``conv_with_lengths(...)[0]``: da ``[*batch, Ca]``, db ``[*batch, Cb]`` ->
    ``[*batch, Ca + Cb - 1]``."""
    return conv_with_lengths(da, db, la, lb, max_threads)[0]


def supported(a: VarTensor, b: VarTensor) -> bool:
    """Whether the kernels take this pair: rank-1 items without features, nonzero
    capacities, float32/float64 data (the target itself is checked separately)."""
    return supported_signature(a.lengths.shape, a.data.shape, a.data.dtype,
                               b.lengths.shape, b.data.shape, b.data.dtype)


@functools.lru_cache(maxsize=1024)
def supported_signature(lengths_a: tuple, data_a: tuple, dtype_a, lengths_b: tuple,
                        data_b: tuple, dtype_b) -> bool:
    """``supported`` on the operands' shapes and dtypes (cached: a hot path)."""
    # rank 1 without features: data [*batch, C] beside lengths [*batch, 1]
    for ls, ds in ((lengths_a, data_a), (lengths_b, data_b)):
        if ls[-1] != 1 or len(ds) != len(ls) or not ds[-1]:
            return False
    return (dtype_a if dtype_a == dtype_b else jnp.result_type(dtype_a, dtype_b)) in DTYPES


def check_lengths(x: VarTensor, name: str) -> None:
    """Raise ``LengthError`` when concrete lengths leave ``[0, capacity]`` (traced lengths
    are checked by the kernel, which returns InvalidArgument; lengths checked when ``x``
    was built are not read again)."""
    if x.lengths_checked:
        return
    lengths = x.host_lengths
    if lengths is None or lengths.size == 0:
        return
    cap = x.capacity[0]
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 0 or hi > cap:
        raise LengthError(f"conv: lengths of {name} must lie in [0, capacity {cap}], got "
                          f"min {lo}, max {hi}")


@functools.partial(jax.jit, static_argnames=("max_threads",))
def _cpu_arrays(da, la, db, lb, max_threads: int = 0):
    """da ``[*batch_a, Ca]``, la ``[*batch_a, 1]``, db/lb likewise (batch shapes
    broadcast) -> ``(out [*batch, Ca + Cb - 1], lengths int32 [*batch, 1])``. Arrays in
    and out: VarTensor pytrees cost the jitted call's dispatch ~15 us more."""
    batch = tuple(jnp.broadcast_shapes(da.shape[:-1], db.shape[:-1]))
    dt = jnp.result_type(da.dtype, db.dtype)
    da = jnp.broadcast_to(da.astype(dt), batch + da.shape[-1:])
    db = jnp.broadcast_to(db.astype(dt), batch + db.shape[-1:])
    la = jnp.broadcast_to(la[..., 0], batch).astype(jnp.int32)
    lb = jnp.broadcast_to(lb[..., 0], batch).astype(jnp.int32)
    out, lengths = conv_with_lengths(da, db, la, lb, max_threads)
    return out, lengths[..., None]


def _cpu_call(a: VarTensor, b: VarTensor, max_threads: int = 0) -> VarTensor:
    out, lengths = _cpu_arrays(a.data, a.lengths, b.data, b.lengths, max_threads=max_threads)
    return VarTensor.trusted(out, lengths, a.model)


def concrete_conv(a, b) -> VarTensor | None:
    """``vs.conv(a, b)`` with the default method and policy, on the kernels, for the
    common call: two concrete float32/float64 rank-1 batches on CPU whose lengths were
    checked when they were built (``lengths_checked``). None for anything else, and the
    caller takes the full path, which raises the errors this one never does.

    On a batch of small items the full path's checks (each cached, but many) cost about
    as much as the jitted kernel call itself; this one reads each operand's shapes and
    dtypes once and asks one cached question of them (experiments/bench_front_door.py).
    """
    if type(a) is not VarTensor or type(b) is not VarTensor or a.model != b.model:
        return None
    da, la, db, lb = a.data, a.lengths, b.data, b.lengths
    tracer = jax.core.Tracer  # util.is_traced, inlined (a hot path)
    if (isinstance(da, tracer) or isinstance(db, tracer) or isinstance(la, tracer)
            or isinstance(lb, tracer)):
        return None
    if not takes_signature(la.shape, da.shape, da.dtype, lb.shape, db.shape, db.dtype):
        return None
    if not (a.lengths_checked and b.lengths_checked and kernels.registered(FWD)
            and kernels.registered(CORR)):
        return None
    if not kernels.on_cpu(da, db):
        return None
    out, lengths = _cpu_arrays(da, la, db, lb)
    return VarTensor.trusted(out, lengths, a.model)


@functools.lru_cache(maxsize=1024)
def takes_signature(lengths_a: tuple, data_a: tuple, dtype_a, lengths_b: tuple,
                    data_b: tuple, dtype_b) -> bool:
    """Whether ``concrete_conv`` takes operands of these shapes and dtypes: a valid pair
    (``check_pair``'s shape rules) of float32/float64 data the kernels support."""
    try:
        check_pair_shapes(lengths_a, data_a, lengths_b, data_b, "conv")
    except ShapeError:
        return False
    return (dtype_a in DTYPES and dtype_b in DTYPES
            and supported_signature(lengths_a, data_a, dtype_a, lengths_b, data_b, dtype_b))


def ragged_conv(a: VarTensor, b: VarTensor, max_threads: int = 0) -> VarTensor | None:
    """Model A product of rank-1 batches through the C++ kernels, or None.

    ``a``: data ``[*batch_a, Ca]``, ``b``: ``[*batch_b, Cb]`` (batch shapes broadcast;
    float32/float64) -> VarTensor ``[*batch, Ca + Cb - 1]`` of dtype
    ``result_type(a, b)``, lengths ``la + lb - 1`` (0 when either is 0), exactly the
    shape ``vs.conv`` returns. None when the kernels cannot run here, do not take the
    pair (the caller then runs the XLA engine). Concrete lengths outside ``[0, capacity]``
    raise ``LengthError``. Differentiable in the data, in every mode.
    """
    a, b = check_pair(a, b, "conv")
    return ragged_conv_checked(a, b, max_threads)


def ragged_conv_checked(a: VarTensor, b: VarTensor, max_threads: int = 0) -> VarTensor | None:
    """``ragged_conv`` for a pair that already passed ``check_pair`` (``vs.conv``)."""
    if not supported(a, b) or kernels.target(FWD, a.data, b.data) is None:
        return None
    if not kernels.registered(CORR):  # same device as FWD: registration only
        return None
    check_lengths(a, "a")
    check_lengths(b, "b")
    return _cpu_call(a, b, max_threads=int(max_threads))
