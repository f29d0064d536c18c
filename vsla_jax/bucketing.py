"""Ragged batches stored bucket by bucket, so storage follows each item's length.

A ``VarTensor`` batch shares one capacity; a ``RaggedBatch`` groups items into several
VarTensors, one per capacity bucket, each padded in the item axis to a count bucket so
that a new batch with a similar profile reuses the compiled programs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from vsla_jax.capacity import COUNT_POLICY, CapacityPolicy, check_policy
from vsla_jax.errors import ShapeError
from vsla_jax.tensor import VarTensor, check_model
from vsla_jax.util import as_array, default_float, numeric_dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RaggedBatch:
    """Items of one rank grouped by capacity bucket.

    Attributes:
      buckets: one ``VarTensor`` per bucket, batch shape ``(count_capacity,)``.
      index: per bucket, ``int32[count_capacity]``: the original position of each
        slot, or -1 for padding slots (length 0, all-zero data).
      size: static number of items.
    """

    buckets: tuple[VarTensor, ...]
    index: tuple[np.ndarray, ...]
    size: int = dataclasses.field(metadata=dict(static=True))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> np.ndarray:
        """Item ``i`` (in original order; negative counts from the end) at its exact
        shape, as ``to_list()[i]`` without converting the other items."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"RaggedBatch indices must be integers, got "
                            f"{type(i).__name__} (use to_list() for slices)")
        if not -self.size <= i < self.size:
            raise IndexError(f"item {i} out of range for a RaggedBatch of {self.size}")
        i = int(i) % self.size
        for b, idx in zip(self.buckets, self.index):
            slots = np.flatnonzero(np.asarray(idx) == i)
            if slots.size:
                return b[int(slots[0])].to_numpy()
        raise IndexError(f"item {i} is in no bucket (a RaggedBatch built by hand?)")

    def __iter__(self):
        return iter(self.to_list())

    def map(self, fn: Callable[[VarTensor], VarTensor]) -> RaggedBatch:
        """Apply ``fn`` bucket by bucket (one compiled program per bucket shape)."""
        return dataclasses.replace(self, buckets=tuple(fn(b) for b in self.buckets))

    def to_list(self) -> list[np.ndarray]:
        """Exact-shape items in their original order."""
        out: list[Any] = [None] * self.size
        for b, idx in zip(self.buckets, self.index):
            items = b.to_list()
            for slot, pos in enumerate(np.asarray(idx)):
                if pos >= 0:
                    out[pos] = items[slot]
        return out

    def lengths(self) -> np.ndarray:
        """``int32[size, rank]`` lengths in original order."""
        rank = self.buckets[0].rank if self.buckets else 1
        out = np.zeros((self.size, rank), np.int32)
        for b, idx in zip(self.buckets, self.index):
            idx = np.asarray(idx)
            keep = idx >= 0
            out[idx[keep]] = np.asarray(b.lengths)[keep]
        return out

    def storage_elements(self) -> int:
        """Elements allocated for data across all buckets (slack and padding slots too)."""
        return int(np.sum([b.data.size for b in self.buckets]))

    def logical_elements(self) -> int:
        """Elements inside the items' logical extents."""
        feat = int(np.prod(self.buckets[0].features)) if self.buckets else 1
        return int(np.prod(self.lengths(), axis=1).sum()) * feat


def pack_group(arrays, members, slots: int, cap: tuple[int, ...], dtype):
    """NumPy ``[slots, *cap, *feat]`` data and ``int32[slots, rank]`` lengths for one group.

    ``arrays[i]`` for ``i in members`` fill the first slots; the rest are empty items.
    NumPy leaves go straight into jitted calls (one host-to-device copy each).
    """
    rank = len(cap)
    feat = arrays[members[0]].shape[rank:] if len(members) else ()
    data = np.zeros((slots, *cap, *feat), dtype)
    lengths = np.zeros((slots, rank), np.int32)
    if rank == 1:  # plain slice copies (memcpy) beat a fancy-index scatter here
        for s, i in enumerate(members):
            a = arrays[i]
            n = a.shape[0]
            data[s, :n] = a
            lengths[s, 0] = n
        return data, lengths
    for s, i in enumerate(members):
        a = arrays[i]
        data[(s, *(slice(0, n) for n in a.shape[:rank]))] = a
        lengths[s] = a.shape[:rank]
    return data, lengths


def bucketize(
    items: Sequence[Any],
    policy: CapacityPolicy | None = None,
    count_policy: CapacityPolicy | None = COUNT_POLICY,
    model: str = "A",
    dtype=None,
    rank: int | None = None,
) -> RaggedBatch:
    """Group ragged items (arrays of equal rank, trailing dims = features) by bucket.

    Each item's capacity is ``policy.capacity(item_lengths)``; items with the same
    capacity share one VarTensor whose item axis is padded to ``count_policy.bucket(n)``
    (pass ``count_policy=None`` for exact counts). ``rank`` defaults to ``ndim``.
    """
    policy = check_policy(policy, "bucketize")
    if count_policy is not None:
        count_policy = check_policy(count_policy, "bucketize count_policy")
    check_model(model)
    arrays = [as_array(it, f"item {i}") for i, it in enumerate(items)]
    if not arrays:
        return RaggedBatch((), (), 0)
    ndim = arrays[0].ndim
    rank = ndim if rank is None else rank
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not (
            1 <= rank <= ndim):
        raise ShapeError(f"bucketize: rank must be an integer in [1, {ndim}] (item 0 has "
                         f"{ndim} axes; a scalar item has none: write [x]), got {rank!r}")
    feat = arrays[0].shape[rank:]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(arrays):
        if a.ndim != ndim:
            raise ShapeError(f"ragged ranks: item {i} has rank {a.ndim}, item 0 has {ndim}")
        if a.shape[rank:] != feat:
            raise ShapeError(f"item {i} has feature shape {a.shape[rank:]}, item 0 has {feat}")
        groups.setdefault(policy.capacity(a.shape[:rank]), []).append(i)
    if dtype is None:
        dtype = np.result_type(*[default_float(a[:0]) for a in arrays])
    else:
        dtype = numeric_dtype(dtype, "bucketize")
    dtype = np.dtype(jax.dtypes.canonicalize_dtype(dtype))
    buckets, index = [], []
    for cap in sorted(groups):
        members = groups[cap]
        slots = count_policy.bucket(len(members)) if count_policy else len(members)
        data, lengths = pack_group(arrays, members, slots, cap, dtype)
        buckets.append(VarTensor(jax.device_put(data), jax.device_put(lengths), model))
        index.append(np.asarray(members + [-1] * (slots - len(members)), np.int32))
    return RaggedBatch(tuple(buckets), tuple(index), len(arrays))
