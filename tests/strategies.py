"""Hypothesis strategies: ragged batches with zero lengths and length == capacity."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

import vsla_jax as vs

# A small ladder (4, 7, 11, ...) so that length == capacity happens often.
SMALL_POLICY = vs.CapacityPolicy(minimum=4, alignment=1, growth=1.5)


@st.composite
def item_shapes(draw, rank: int, k: int, max_len: int = 6):
    return [
        tuple(draw(st.integers(0, max_len)) for _ in range(rank)) for _ in range(k)
    ]


def make_items(shapes, feat=(), seed=0, integer_valued=False):
    rng = np.random.default_rng(seed)
    out = []
    for s in shapes:
        shape = tuple(s) + tuple(feat)
        if integer_valued:
            out.append(rng.integers(-3, 4, size=shape).astype(np.float32))
        else:
            out.append(rng.standard_normal(shape).astype(np.float32))
    return out


def make_batch(items, rank, exact_capacity=False, model="A"):
    """A VarTensor batch from items; ``exact_capacity`` makes capacity == max length."""
    if not exact_capacity:
        return vs.stack(items, policy=SMALL_POLICY, model=model, rank=rank)
    lengths = np.array([it.shape[:rank] for it in items], np.int32).reshape(len(items), rank)
    cap = np.maximum(lengths.max(axis=0), 1) if len(items) else np.ones(rank, int)
    feat = items[0].shape[rank:] if items else ()
    data = np.zeros((len(items), *cap, *feat), np.float32)
    for i, it in enumerate(items):
        data[(i, *(slice(0, n) for n in it.shape[:rank]))] = it
    return vs.from_padded(data, lengths, model=model)


@st.composite
def ragged_pair(draw, max_rank=3, max_len=5, allow_features=True, same_k=True):
    """Two ragged batches of the same rank: (items_a, items_b, rank, feat, exact, seed)."""
    rank = draw(st.integers(1, max_rank))
    k = draw(st.integers(1, 4))
    kb = k if same_k else draw(st.sampled_from([1, k]))
    feat = draw(st.sampled_from([(), (2,)])) if allow_features else ()
    sa = draw(item_shapes(rank, k, max_len))
    sb = draw(item_shapes(rank, kb, max_len))
    exact = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return sa, sb, rank, feat, exact, seed
