"""Ops on VarTensors: ambient arithmetic, semiring products, reductions, shrink.

Every op is jit-compiled once per (capacity bucket, dtype, model); lengths are traced.
Inputs are masked to their logical extent first, so gradients have zero slack.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from vsla_jax.conv.engine import conv
from vsla_jax.errors import ShapeError, VSLATypeError
from vsla_jax.tensor import (
    VarTensor,
    align_batch,
    broadcast_operands,
    check_pair,
    expand_mask,
    extent_mask,
    require,
    resize_capacity,
    zero_slack,
)

__all__ = [
    "add", "sub", "hadamard", "scale", "neg", "conv", "kron", "multiply",
    "sum", "norm", "mean", "shrink",
]


def _typed_jit(op: str, *names: str):
    """``jax.jit(fn)`` whose VarTensor arguments (the first ``len(names)``, called
    ``names`` in errors) are checked before tracing: a NumPy array or a number passed by
    mistake is named as such, not as the tracer ``jit`` would turn it into."""
    def wrap(fn):
        jitted = jax.jit(fn)

        @functools.wraps(fn)
        def call(*args):
            for x, name in zip(args, names):
                require(x, name, op)
            return jitted(*args)
        return _jit_api(call, jitted)
    return wrap


def _jit_api(call, jitted):
    """``call`` with the jitted function's ``lower``, ``trace``, ``eval_shape``,
    ``clear_cache`` and cache-size hook, so it reads like the ``jax.jit`` it wraps."""
    for name in ("lower", "trace", "eval_shape", "clear_cache", "_cache_size"):
        if hasattr(jitted, name):
            setattr(call, name, getattr(jitted, name))
    return call


def no_bool(dtype, op: str) -> None:
    """``VSLATypeError`` for a bool result ``dtype``, which ``op`` (a subtraction) does
    not define."""
    if dtype == jnp.bool_:
        raise VSLATypeError(f"{op}: bool tensors have no negation or difference; build "
                            "them with a numeric dtype (vs.tensor(x, dtype=jnp.int32))")


def _ambient(a: VarTensor, b: VarTensor, fn) -> VarTensor:
    cap = tuple(max(ca, cb) for ca, cb in zip(a.capacity, b.capacity))
    nb = max(a.batch_ndim, b.batch_ndim)
    a, b = zero_slack(a), zero_slack(b)
    da, la = align_batch(a, nb)
    db, lb = align_batch(b, nb)
    da = resize_capacity(da, nb, a.capacity, cap)
    db = resize_capacity(db, nb, b.capacity, cap)
    return VarTensor.trusted(fn(da, db), jnp.maximum(la, lb), a.model)


@_typed_jit("add", "a", "b")
def add(a: VarTensor, b: VarTensor) -> VarTensor:
    """Ambient sum: both operands zero-extended to the per-axis maximum length."""
    a, b = check_pair(a, b, "add")
    return _ambient(a, b, jnp.add)


@_typed_jit("sub", "a", "b")
def sub(a: VarTensor, b: VarTensor) -> VarTensor:
    """Ambient difference ``a - b``."""
    a, b = check_pair(a, b, "sub")
    no_bool(jnp.result_type(a.dtype, b.dtype), "sub")
    return _ambient(a, b, jnp.subtract)


@_typed_jit("hadamard", "a", "b")
def hadamard(a: VarTensor, b: VarTensor) -> VarTensor:
    """Elementwise product at the ambient shape; entries present in one operand are 0."""
    a, b = check_pair(a, b, "hadamard")
    out = _ambient(a, b, jnp.multiply)
    # Only where both operands have an entry: an inf/nan of one operand times the other's
    # zero extension would otherwise be nan where the result is defined as 0.
    la, lb = align_batch(a, out.batch_ndim)[1], align_batch(b, out.batch_ndim)[1]
    both = expand_mask(extent_mask(jnp.minimum(la, lb), out.capacity), len(out.features))
    return VarTensor.trusted(jnp.where(both, out.data, jnp.zeros((), out.dtype)),
                             out.lengths, out.model)


def scale(x: VarTensor, s) -> VarTensor:
    """``s * x`` for a scalar or a per-item array of shape ``x.batch_shape``; the result
    dtype follows JAX's promotion (an int tensor times 0.5 is float, times 1j complex)."""
    require(x, "x", "scale")
    if not (isinstance(s, (numbers.Number, np.ndarray, np.generic, jax.Array)) and
            not isinstance(s, bool) and jnp.issubdtype(jnp.result_type(s), jnp.number)):
        raise VSLATypeError(f"scale: s must be a number or a numeric array of shape () or "
                            f"{x.batch_shape}, got {type(s).__name__}")
    if isinstance(s, int) and not isinstance(s, bool):
        bits = 64 if jax.config.jax_enable_x64 else 32
        if not -(2 ** (bits - 1)) <= s < 2 ** (bits - 1):
            raise VSLATypeError(f"scale: s = {s} does not fit in int{bits}, JAX's integer "
                                f"type here; pass a float (or enable jax_enable_x64)")
    return _scale(x, s)


@jax.jit
def _scale(x: VarTensor, s) -> VarTensor:
    """``scale`` after its argument checks."""
    x = zero_slack(x)
    s = jnp.asarray(s)
    if s.ndim:
        if s.shape != x.batch_shape:
            want = (f"a scalar or one factor per item, shape {x.batch_shape}" if x.batch_shape
                    else "a scalar: the tensor is one item")
            raise ShapeError(f"scale: s has shape {s.shape}, expected {want} (to multiply "
                             "by another ragged item, wrap it with vs.tensor / vs.stack)")
        s = s.reshape(s.shape + (1,) * (x.data.ndim - s.ndim))
    return dataclasses.replace(x, data=x.data * s)


_jit_api(scale, _scale)


@_typed_jit("neg", "x")
def neg(x: VarTensor) -> VarTensor:
    """``-x``."""
    no_bool(x.dtype, "neg")
    x = zero_slack(x)
    return dataclasses.replace(x, data=-x.data)


# -- semiring products ------------------------------------------------------------------
def _vmap_batch(fn, n: int):
    for _ in range(n):
        fn = jax.vmap(fn)
    return fn


def _kron_item(da, la, db, lb, cap_a, cap_b, n_feat):
    rank = len(cap_a)
    idx_a, idx_b, valid = [], [], []
    for k in range(rank):
        p = jnp.arange(cap_a[k] * cap_b[k], dtype=jnp.int32)
        lbk = jnp.maximum(lb[k], 1)
        v = p < la[k] * lb[k]
        idx_a.append(jnp.where(v, p // lbk, 0))
        idx_b.append(jnp.where(v, p % lbk, 0))
        valid.append(v)
    ga = da[jnp.ix_(*idx_a)]
    gb = db[jnp.ix_(*idx_b)]
    mask = valid[0]
    for k in range(1, rank):
        mask = mask[..., None] & valid[k].reshape((1,) * k + (-1,))
    mask = expand_mask(mask, n_feat)
    return jnp.where(mask, ga * gb, jnp.zeros((), ga.dtype))


@_typed_jit("kron", "a", "b")
def kron(a: VarTensor, b: VarTensor) -> VarTensor:
    """Model B product with N-D ``np.kron`` semantics: ``out[i*n + j] = a[i] * b[j]``.

    Not commutative: ``[1, 2] ⊗ [3, 4] = [3, 4, 6, 8]``. Output capacity is
    ``cap_a * cap_b`` per axis; feature axes multiply elementwise.
    """
    a, b = check_pair(a, b, "kron")
    batch, da, la, db, lb = broadcast_operands(a, b)
    dt = jnp.result_type(da.dtype, db.dtype)
    fn = lambda x, lx, y, ly: _kron_item(
        x.astype(dt), lx, y.astype(dt), ly, a.capacity, b.capacity, len(a.features)
    )
    out = _vmap_batch(fn, len(batch))(da, la, db, lb)
    return VarTensor(out, (la * lb).astype(jnp.int32), a.model)


def multiply(a: VarTensor, b: VarTensor) -> VarTensor:
    """Semiring product of the operands' model: ``conv`` for A, ``kron`` for B."""
    a, b = check_pair(a, b, "multiply")
    return conv(a, b) if a.model == "A" else kron(a, b)


# -- operators on VarTensor (attached here: ops depends on tensor, not the reverse) -------
def _mul(self, other):
    """``x * y``: the semiring product for a VarTensor, else a (per-item) scale."""
    return multiply(self, other) if isinstance(other, VarTensor) else scale(self, other)


def _rmul(self, other):
    return _mul(self, other)


VarTensor.__add__ = lambda self, other: add(self, other)
VarTensor.__radd__ = lambda self, other: add(other, self)  # names a non-VarTensor `a`
VarTensor.__sub__ = lambda self, other: sub(self, other)
VarTensor.__rsub__ = lambda self, other: sub(other, self)
VarTensor.__neg__ = lambda self: neg(self)
VarTensor.__mul__ = _mul
VarTensor.__rmul__ = _rmul


# -- reductions -------------------------------------------------------------------------
@_typed_jit("sum", "x")
def sum(x: VarTensor) -> jax.Array:  # noqa: A001 - mirrors jnp.sum
    """Sum over each item's logical entries: ``[*batch, *features]``."""
    x = zero_slack(x)
    return jnp.sum(x.data, axis=x.var_axes)


@_typed_jit("norm", "x")
def norm(x: VarTensor) -> jax.Array:
    """Frobenius norm over each item's logical entries: ``[*batch, *features]``.

    The gradient at a zero tensor is defined as zero.
    """
    x = zero_slack(x)
    data = x.data.astype(inexact_dtype(x.dtype))  # int8 [100, 100] squared would wrap
    sq = jnp.sum(jnp.real(data * jnp.conj(data)), axis=x.var_axes)
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def inexact_dtype(dtype):
    """``dtype`` if it is a float or complex type, else JAX's default float."""
    return dtype if jnp.issubdtype(dtype, jnp.inexact) else jnp.result_type(float)


@_typed_jit("mean", "x")
def mean(x: VarTensor) -> jax.Array:
    """Mean over each item's logical entries: ``[*batch, *features]`` (0 if empty), in
    the data's float dtype (the default float for integer and bool data)."""
    x = zero_slack(x)
    ft = inexact_dtype(x.dtype)  # counts in int8 or bool wrapped: 200 -> -56, 3 -> True
    count = jnp.prod(x.lengths, axis=-1).astype(ft)
    count = count.reshape(count.shape + (1,) * len(x.features))
    total = jnp.sum(x.data.astype(ft), axis=x.var_axes)
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1), 0)


@_typed_jit("shrink", "x")
def shrink(x: VarTensor) -> VarTensor:
    """Minimal representative: drop trailing all-zero hyperplanes on every axis.

    Lowers lengths only; capacity and data are unchanged. An all-zero tensor becomes
    empty (all lengths 0). ``shrink([3, 2, 0]) == [3, 2]``.
    """
    x = zero_slack(x)
    nz = x.data != 0
    feat_axes = tuple(range(x.batch_ndim + x.rank, x.data.ndim))
    if feat_axes:
        nz = jnp.any(nz, axis=feat_axes)
    new = []
    for k, ax in enumerate(x.var_axes):
        others = tuple(a for a in x.var_axes if a != ax)
        hit = jnp.any(nz, axis=others) if others else nz  # [*batch, cap_k]
        pos = jnp.arange(1, x.capacity[k] + 1, dtype=jnp.int32)
        new.append(jnp.max(jnp.where(hit, pos, 0), axis=-1))
    lengths = jnp.stack(new, axis=-1).astype(jnp.int32)
    return dataclasses.replace(x, lengths=jnp.minimum(lengths, x.lengths))
