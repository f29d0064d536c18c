"""Building batches: one tensor (``tensor``), ragged items into a batch (``stack``), a
batch merged into one tensor (``merge_batch``), windows and pyramids."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vsla_jax.capacity import CapacityPolicy, check_policy
from vsla_jax.errors import ModelMismatchError, ShapeError, VSLATypeError
from vsla_jax.tensor import (
    VarTensor,
    check_int32,
    check_model,
    check_rank,
    resize_capacity,
    zero_slack,
)
from vsla_jax.util import aligned_zeros, as_array, default_float, is_traced, numeric_dtype

PARTIAL_MODES = ("flush", "discard")


def tensor(
    values,
    model: str | None = None,
    policy: CapacityPolicy | None = None,
    rank: int | None = None,
    dtype=None,
) -> VarTensor:
    """One variable-shape tensor from a (nested) list or array.

    Args:
      values: array-like, JAX arrays and tracers included (inside ``jit``, ``grad`` or
        ``vmap`` the logical shape is the static shape); its shape is the logical shape.
      model: ``"A"`` or ``"B"`` (default: a VarTensor's own model, else ``"A"``).
      policy: capacity ladder (default ``CapacityPolicy()``).
      rank: number of leading variable axes (``1 <= rank <= ndim``); trailing axes are
        dense features. Defaults to ``values.ndim``.
      dtype: storage dtype; integer input defaults to the default float dtype.

    Returns:
      An unbatched ``VarTensor`` (``lengths.shape == (rank,)``).
    """
    if isinstance(values, VarTensor):
        arr_ndim = values.rank
    else:
        arr = as_array(values, "values")
        arr_ndim = arr.ndim
        values = arr
    if arr_ndim == 0:
        raise ShapeError(f"vs.tensor needs at least one axis, got a scalar {values!r}; "
                         "write vs.tensor([x]) for a length-1 vector")
    return stack([values], model=model, policy=policy, rank=rank, dtype=dtype)[0]


def stack(
    items: Sequence[Any],
    policy: CapacityPolicy | None = None,
    model: str | None = None,
    rank: int | None = None,
    dtype=None,
) -> VarTensor:
    """Ragged items (arrays, lists or unbatched VarTensors of equal rank) -> a batch.

    The result has batch shape ``(k,)``; per-item lengths are kept and the shared
    capacity is the policy bucket of the per-axis maximum length. ``stack([])`` is a
    batch of zero items (``rank`` defaults to 1). Items may be JAX arrays or tracers:
    under ``jit``/``grad``/``vmap`` the batch is built with ``jnp`` ops, and lengths are
    the items' static shapes.
    """
    policy = check_policy(policy, "stack")
    if isinstance(items, VarTensor):
        raise VSLATypeError("stack takes a sequence of items; this is already a VarTensor "
                            "batch (index it, or use vs.merge_batch to stack its items)")
    if not hasattr(items, "__iter__") or isinstance(items, (str, bytes)):
        raise VSLATypeError(f"stack takes a sequence of items (arrays, lists or unbatched "
                            f"VarTensors), got {type(items).__name__} {items!r:.40}")
    check_rank(rank, None, "")
    if dtype is not None:
        dtype = numeric_dtype(dtype, "stack")
    arrays, lengths, feats, models = [], [], None, set()
    item_rank, traced = rank, False
    fast = _numpy_items(items, rank)
    if fast is not None:  # a list of numeric NumPy arrays: no per-item checks needed
        arrays, lengths, feats, item_rank = fast
        items = ()
    for i, it in enumerate(items):
        if isinstance(it, VarTensor):
            if it.batch_ndim:
                raise ShapeError(f"item {i} is a batch {it.batch_shape}; stack unbatched items")
            models.add(it.model)
            if item_rank is None:
                item_rank = it.rank
            if it.rank != item_rank:
                raise ShapeError(f"item {i} has rank {it.rank}, expected {item_rank}")
            traced = traced or is_traced(it.data) or is_traced(it.lengths)
            arr, f, ln = it, it.features, it.lengths
        else:
            arr = as_array(it, f"item {i}")
            if item_rank is None:
                item_rank = arr.ndim
                if item_rank == 0:
                    raise ShapeError(f"item {i} is a scalar; VSLA items have at least one "
                                     "axis (write [x] for a length-1 vector)")
            if arr.ndim < item_rank:
                raise ShapeError(
                    f"rank={rank} needs items with at least {rank} axes; item {i} has "
                    f"{arr.ndim}" if rank is not None else
                    f"ragged ranks: item {i} has {arr.ndim} axes, expected rank {item_rank}")
            if rank is None and arr.ndim != item_rank:
                raise ShapeError(
                    f"ragged ranks: item {i} has rank {arr.ndim}, item 0 has rank {item_rank}"
                )
            traced = traced or is_traced(arr)
            f, ln = tuple(arr.shape[item_rank:]), arr.shape[:item_rank]
        if feats is None:
            feats = f
        elif f != feats:
            raise ShapeError(f"item {i} has feature shape {f}, item 0 has {feats}")
        arrays.append(arr)
        lengths.append(ln)
    if len(models) > 1:
        raise ModelMismatchError(f"cannot stack items of different models {sorted(models)}")
    if model is not None and models and models != {model}:
        raise ModelMismatchError(f"stack: model={model!r} differs from the items' model "
                                 f"{next(iter(models))!r}")
    tensors = bool(models)  # some items are VarTensors
    model = check_model(model or (next(iter(models)) if models else "A"))
    item_rank = 1 if item_rank is None else item_rank
    feats = feats or ()
    k = len(arrays)
    if dtype is None:
        dts = set(map(operator.attrgetter("dtype"), arrays)) if fast is not None else {
            (a.data if isinstance(a, VarTensor) else a).dtype for a in arrays}
        dtype = np.result_type(*[default_float(np.zeros(0, d)).dtype for d in dts]) if k else (
            jnp.result_type(float))
        dtype = jax.dtypes.canonicalize_dtype(dtype)
    if traced:
        return _stack_traced(arrays, lengths, item_rank, feats, policy, model, dtype)
    len_arr = np.asarray(lengths if not tensors else [np.asarray(n) for n in lengths],
                         np.int64).reshape(k, item_rank)
    check_int32(len_arr, "stack")
    len_arr = len_arr.astype(np.int32)
    maxlen = len_arr.max(axis=0) if k else np.zeros(item_rank, np.int32)
    cap = policy.capacity(maxlen)
    out = aligned_zeros((k, *cap, *feats), dtype)  # adopted by device_put, not copied
    if item_rank == 1 and not tensors:  # the common ragged 1-D batch: plain slice copies
        for i, (a, n) in enumerate(zip(arrays, len_arr[:, 0].tolist())):
            out[i, :n] = a
    else:
        for i, a in enumerate(arrays):
            if isinstance(a, VarTensor):
                a = a.to_numpy()
            out[(i, *(slice(0, n) for n in a.shape[:item_rank]))] = np.asarray(a)
    data, lens = jax.device_put((out, len_arr))
    return VarTensor.trusted(data, lens, model, checked=True, host_lengths=len_arr)


def _numpy_items(items, rank):
    """``(arrays, lengths, features, rank)`` when every item is a numeric NumPy array of
    one ndim and feature shape (checked in a few C-level passes), else None."""
    if not isinstance(items, (list, tuple)) or not items or set(map(type, items)) != {
            np.ndarray}:
        return None
    shapes = list(map(operator.attrgetter("shape"), items))  # C-level passes
    ndims = set(map(len, shapes))
    kinds = {d.kind for d in set(map(operator.attrgetter("dtype"), items))}
    if len(ndims) != 1 or not kinds <= set("biuf"):
        return None
    ndim = ndims.pop()
    r = ndim if rank is None else rank
    if not 1 <= r <= ndim:
        return None
    if r == ndim:
        return list(items), shapes, (), r
    if len({sh[r:] for sh in shapes}) != 1:
        return None
    return list(items), [sh[:r] for sh in shapes], shapes[0][r:], r


def _stack_traced(arrays, lengths, rank: int, feats, policy, model, dtype) -> VarTensor:
    """``stack`` with ``jnp`` ops, for items that are tracers (differentiable)."""
    static = [np.asarray(n) if not is_traced(n) else None for n in lengths]
    if any(s is None for s in static):  # traced VarTensor lengths: bound by capacities
        bound = np.max([a.capacity if isinstance(a, VarTensor) else a.shape[:rank]
                        for a in arrays], axis=0)
    else:
        bound = np.max(np.asarray(static, np.int64).reshape(len(arrays), rank), axis=0)
        check_int32(bound, "stack")
    cap = policy.capacity(bound)
    rows, lens = [], []
    for a, n in zip(arrays, lengths):
        if isinstance(a, VarTensor):
            rows.append(resize_capacity(zero_slack(a).data.astype(dtype), 0, a.capacity, cap))
            lens.append(jnp.asarray(n, jnp.int32))
        else:
            rows.append(resize_capacity(jnp.asarray(a, dtype), 0, a.shape[:rank], cap))
            lens.append(jnp.asarray(np.asarray(n, np.int32)))
    if any(s is None for s in static):
        return VarTensor.trusted(jnp.stack(rows), jnp.stack(lens).astype(jnp.int32), model)
    host = np.asarray(static, np.int32).reshape(len(arrays), rank)  # known on the host
    return VarTensor.trusted(jnp.stack(rows), jnp.asarray(host), model, checked=True,
                             host_lengths=host)


def _as_batch(items: Sequence[Any] | VarTensor, policy: CapacityPolicy | None) -> VarTensor:
    if isinstance(items, VarTensor):
        if items.batch_ndim != 1:
            raise ShapeError(
                f"expected a batch with one batch axis, got batch shape {items.batch_shape}"
            )
        return items
    return stack(list(items), policy=policy)


def window(
    items: Sequence[Any] | VarTensor,
    w: int,
    partial: str = "flush",
    policy: CapacityPolicy | None = None,
) -> VarTensor:
    """Group consecutive items into non-overlapping windows of ``w`` and stack each.

    Args:
      items: k items of rank r (a list, or a VarTensor with batch shape ``(k,)``).
      w: window size (>= 1).
      partial: ``"flush"`` keeps a last window with fewer than ``w`` items,
        ``"discard"`` drops it.

    Returns:
      A batch of windows, batch shape ``(n_windows,)``, rank ``r + 1``: window ``j``
      has lengths ``(items in window, max n_1, ...)`` and capacity ``(w, *cap)``, the
      VSLA stack of its items. Data is reshaped, never copied item by item.
    """
    if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1:
        raise ShapeError(f"window size must be a positive integer, got {w!r}")
    if partial not in PARTIAL_MODES:
        raise ShapeError(f"partial must be one of {PARTIAL_MODES}, got {partial!r}")
    x = zero_slack(_as_batch(items, policy))  # also keeps gradient slack at zero
    k = x.batch_shape[0]
    n_windows = -(-k // w) if partial == "flush" else k // w
    used = min(k, n_windows * w)
    data, lengths = x.data[:used], x.lengths[:used]
    pad = n_windows * w - used
    if pad:
        data = jnp.pad(data, [(0, pad)] + [(0, 0)] * (data.ndim - 1))
        lengths = jnp.pad(lengths, [(0, pad), (0, 0)])
    data = data.reshape((n_windows, w) + data.shape[1:])
    lengths = lengths.reshape(n_windows, w, x.rank)
    counts = np.minimum(w, used - w * np.arange(n_windows)).astype(np.int32)
    inner = jnp.max(lengths, axis=1) if n_windows else jnp.zeros((0, x.rank), jnp.int32)
    new_lengths = jnp.concatenate([jnp.asarray(counts)[:, None], inner], axis=1)
    return VarTensor(data, new_lengths.astype(jnp.int32), x.model)


def pyramid(
    items: Sequence[Any] | VarTensor,
    levels: int,
    w: int,
    partial: str = "flush",
    policy: CapacityPolicy | None = None,
) -> list[VarTensor]:
    """Apply ``window`` level after level; returns every level, the top one last.

    Level ``l`` (1-based) is a batch of rank ``r + l`` tensors.
    """
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 1:
        raise ShapeError(f"levels must be a positive integer, got {levels!r}")
    out, x = [], _as_batch(items, policy)
    for _ in range(levels):
        x = window(x, w, partial=partial)
        out.append(x)
    return out


def merge_batch(x: VarTensor) -> VarTensor:
    """VSLA stack of a batch ``(k,)`` of rank-r items: one rank ``r + 1`` tensor.

    Its lengths are ``(k, max n_1, ...)``; ``merge_batch`` of an empty batch has
    lengths ``(0, 0, ...)``.
    """
    x = _as_batch(x, None)
    k = x.batch_shape[0]
    if k == 0:
        return VarTensor(x.data, jnp.zeros((x.rank + 1,), jnp.int32), x.model)
    return window(x, k)[0]
