"""Stacking operators: merge a batch into one tensor, windows and pyramids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from vsla_jax.capacity import CapacityPolicy
from vsla_jax.errors import ShapeError
from vsla_jax.tensor import VarTensor, stack, zero_slack

PARTIAL_MODES = ("flush", "discard")


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
    if not isinstance(w, (int, np.integer)) or w < 1:
        raise ValueError(f"window size must be a positive integer, got {w!r}")
    if partial not in PARTIAL_MODES:
        raise ValueError(f"partial must be one of {PARTIAL_MODES}, got {partial!r}")
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
    if not isinstance(levels, (int, np.integer)) or levels < 1:
        raise ValueError(f"levels must be a positive integer, got {levels!r}")
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
