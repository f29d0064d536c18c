"""Packed token batches of the ``minilm`` encoder: the capacity ladders (``PackPolicy``),
the host arrays of one batch (``Packed``) and ``pack``.

A batch's tokens are packed into ``T`` rows (``T`` a bucket of the total token count);
``gather``/``scatter`` map them to and from the padded ``[B, C]`` slots attention uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

import vsla_jax as vs


@dataclasses.dataclass(frozen=True)
class PackPolicy:
    """Capacity ladders of one packed batch.

    Attributes:
      tokens: ladder of the packed token count ``T``.
      length: ladder of the attention capacity ``C`` (the longest item).
      items: ladder of the item count ``B``.
    """

    tokens: vs.CapacityPolicy = vs.CapacityPolicy.octave(steps=4, minimum=64)
    length: vs.CapacityPolicy = vs.CapacityPolicy.octave(steps=4, minimum=8)
    items: vs.CapacityPolicy = vs.CapacityPolicy.pow2(minimum=1)


@dataclasses.dataclass(frozen=True)
class Packed:
    """One batch of tokenised items, packed (all host ``int32`` arrays).

    Attributes:
      ids, positions, segment: ``[T]`` token ids, positions within the item, item index
        (``B`` for slack rows).
      gather: ``[B, C]`` row of each padded slot in the packed tokens (``T`` for slack).
      scatter: ``[T]`` padded slot (``b * C + i``) of each packed row (0 for slack).
      lengths: ``[B]`` tokens per item (0 for slack items).
      n_items, n_tokens: the real counts.
    """

    ids: np.ndarray
    positions: np.ndarray
    segment: np.ndarray
    gather: np.ndarray
    scatter: np.ndarray
    lengths: np.ndarray
    n_items: int
    n_tokens: int

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.ids, self.positions, self.segment, self.gather, self.scatter, self.lengths

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(T, B, C)``: the capacities that decide the compiled program."""
        return self.ids.shape[0], self.gather.shape[0], self.gather.shape[1]


#: The default capacity ladders.
DEFAULT_POLICY = PackPolicy()


def pack(items: Sequence[Sequence[int]], policy: PackPolicy = PackPolicy(),
         padded: bool = False) -> Packed:
    """Pack token-id lists into one ``Packed`` batch at bucketed capacities.

    ``padded=True`` lays the items out padded instead (item ``b`` in rows
    ``b * C ... b * C + C - 1``, ``T = B * C``), so the dense layers compute on the
    padding too: the layout a padded-batch model runs, kept for comparison.
    """
    lens = np.fromiter((len(t) for t in items), np.int64, len(items))
    n, total = len(items), int(lens.sum())
    b_cap = policy.items.bucket(n)
    c_cap = policy.length.bucket(int(lens.max()) if n else 0)
    t_cap = b_cap * c_cap if padded else policy.tokens.bucket(total)
    starts = (np.arange(n, dtype=np.int64) * c_cap if padded else
              np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64) if n else lens)
    item = np.repeat(np.arange(n, dtype=np.int32), lens)
    pos = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
    rows = np.repeat(starts, lens) + pos
    ids = np.zeros(t_cap, np.int32)
    if total:
        ids[rows] = np.concatenate([np.asarray(t, np.int32) for t in items])
    segment = np.full(t_cap, b_cap, np.int32)
    segment[rows] = item
    positions = np.zeros(t_cap, np.int32)
    positions[rows] = pos
    gather = np.full((b_cap, c_cap), t_cap, np.int32)
    slot = np.arange(c_cap)
    gather[:n] = np.where(slot < lens[:, None], starts[:, None] + slot, t_cap)
    if not padded:
        scatter = np.zeros(t_cap, np.int32)
        scatter[rows] = item * c_cap + pos
    else:
        scatter = np.arange(t_cap, dtype=np.int32)
    lengths = np.zeros(b_cap, np.int32)
    lengths[:n] = lens
    return Packed(ids, positions, segment, gather, scatter, lengths, n, total)
