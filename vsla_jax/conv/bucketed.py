"""The bucketed plan: items grouped by ``(capacity_a, capacity_b)`` bucket.

Each group gathers its items' rows from the padded batch, convolves them at the group's
capacities (``direct`` or ``fft`` per group, from the cost model) and scatters the
results back into the padded output, all in one compiled program. Group item counts
are padded on a count ladder so that batches with a similar profile reuse the program.
Neighbouring groups of one signal capacity merge while the cost model predicts that the
merged group is cheaper. Works for any rank and feature shape.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from vsla_jax.capacity import CapacityPolicy
from vsla_jax.conv.cost import CostModel
from vsla_jax.conv.kernels import conv_output_lengths, prod
from vsla_jax.conv.padded import conv_arrays
from vsla_jax.tensor import VarTensor, zero_slack


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """One group: capacities, its items (ascending), padded item count and method."""

    cap_a: tuple[int, ...]
    cap_b: tuple[int, ...]
    members: tuple[int, ...]
    slots: int
    method: str


def _group_cost(ca, cb, slots: int, feat: int, cost: CostModel) -> float:
    """Convolution, row copies in and out, and one more fixed cost for the group's
    gathers, scatter and finiteness check."""
    return cost.best(ca, cb, slots * feat) + cost.direct_overhead_s + cost.copy(
        slots * feat * (prod(ca) + prod(cb) + prod(p + q - 1 for p, q in zip(ca, cb))))


def _merge(groups: dict, count: CapacityPolicy | None, feat: int, cost: CostModel) -> dict:
    """Greedy merge, per signal capacity, of groups with adjacent kernel capacities."""
    slots = lambda n: count.bucket(n) if count else n
    by_a: dict[tuple, list] = {}
    for (ca, cb), members in sorted(groups.items()):
        by_a.setdefault(ca, []).append([cb, list(members)])
    out = {}
    for ca, runs in by_a.items():
        merged = [runs[0]]
        for cb, members in runs[1:]:
            pcb, pmem = merged[-1]
            big = tuple(max(p, q) for p, q in zip(pcb, cb))
            apart = (_group_cost(ca, pcb, slots(len(pmem)), feat, cost)
                     + _group_cost(ca, cb, slots(len(members)), feat, cost))
            if _group_cost(ca, big, slots(len(pmem) + len(members)), feat, cost) < apart:
                merged[-1] = [big, pmem + members]
            else:
                merged.append([cb, members])
        for cb, members in merged:
            out[(ca, cb)] = sorted(members)
    return out


def plan_groups(la: np.ndarray, lb: np.ndarray, cap_a, cap_b, method: str, cost: CostModel,
                capacity: CapacityPolicy, count: CapacityPolicy | None, feat: int = 1,
                merge: bool = True) -> list[GroupPlan]:
    """Groups for lengths ``la`` ``[n, rank]`` and ``lb`` (``[n, rank]``, or ``[1, rank]``
    for one kernel shared by every item), bounded by the batch capacities."""
    la = np.asarray(la, np.int64)
    lb = np.broadcast_to(np.asarray(lb, np.int64), la.shape)
    ka = np.minimum(capacity.bucket_array(la), np.asarray(cap_a, np.int64))
    kb = np.minimum(capacity.bucket_array(lb), np.asarray(cap_b, np.int64))
    ka, kb = np.maximum(ka, 1), np.maximum(kb, 1)
    keys = np.concatenate([ka, kb], axis=1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    splits = np.cumsum(np.bincount(inverse, minlength=len(uniq)))[:-1]
    rank = la.shape[1]
    groups = {(tuple(int(v) for v in u[:rank]), tuple(int(v) for v in u[rank:])): m.tolist()
              for u, m in zip(uniq, np.split(order, splits))}
    if merge:
        groups = _merge(groups, count, feat, cost)
    out = []
    for (ca, cb), members in sorted(groups.items()):
        slots = count.bucket(len(members)) if count else len(members)
        m = cost.choose(ca, cb, slots * feat) if method == "auto" else method
        out.append(GroupPlan(ca, cb, tuple(members), slots, m))
    return out


def plan_seconds(groups: list[GroupPlan], feat: int, cost: CostModel) -> float:
    """Predicted seconds of the bucketed program (convolutions and row copies)."""
    return sum(_group_cost(g.cap_a, g.cap_b, g.slots, feat, cost) for g in groups)


def group_indices(groups: list[GroupPlan], n: int) -> tuple[np.ndarray, ...]:
    """Per group, ``int32[slots]`` item indices; padding slots hold ``n`` (out of range)."""
    return tuple(np.asarray(list(g.members) + [n] * (g.slots - len(g.members)), np.int32)
                 for g in groups)


def _rows(x, idx, cap):
    """Rows ``idx`` of ``x`` cropped to capacities ``cap``; out-of-range rows are zero."""
    crop = (slice(None),) + tuple(slice(0, c) for c in cap)
    return jnp.take(x[crop], idx, axis=0, mode="fill", fill_value=0)


@functools.partial(jax.jit, static_argnames=("layout", "fallback", "pallas_mode"))
def run_groups(a: VarTensor, b: VarTensor, idx: tuple[jax.Array, ...], layout: tuple,
               fallback: bool = True, pallas_mode: str | None = None) -> VarTensor:
    """The bucketed program. ``a`` has batch ``(n,)``; ``b`` batch ``(n,)`` or ``()``.

    ``layout``: per group ``(cap_a, cap_b, method)`` (static). Output capacity is
    ``cap_a + cap_b - 1`` of the batches, as on the padded plan.
    """
    a, b = zero_slack(a), zero_slack(b)
    n, rank, feat = a.batch_shape[0], a.rank, a.features
    out_cap = tuple(p + q - 1 for p, q in zip(a.capacity, b.capacity))
    dt = jnp.result_type(a.dtype, b.dtype)
    out = jnp.zeros((n, *out_cap, *feat), dt)
    for (ca, cb, method), ix in zip(layout, idx):
        xa, la = _rows(a.data, ix, ca), jnp.take(a.lengths, ix, axis=0, mode="fill",
                                                 fill_value=0)
        if b.batch_ndim:
            xb, lb = _rows(b.data, ix, cb), jnp.take(b.lengths, ix, axis=0, mode="fill",
                                                     fill_value=0)
        else:
            crop = tuple(slice(0, c) for c in cb)
            xb = jnp.broadcast_to(b.data[crop], (ix.shape[0],) + b.data[crop].shape)
            lb = jnp.broadcast_to(b.lengths, (ix.shape[0], rank))
        y = conv_arrays(xa, xb, la, lb, 1, rank, method, fallback and method == "fft",
                        pallas_mode)
        region = (ix,) + tuple(slice(0, c) for c in y.shape[1 : 1 + rank])
        out = out.at[region].set(y, mode="drop")
    lb_all = b.lengths if b.batch_ndim else jnp.broadcast_to(b.lengths, (n, rank))
    out = VarTensor.trusted(out, conv_output_lengths(a.lengths, lb_all), a.model)
    # FFT round-off leaves O(eps) values past each item's end: restore zero slack.
    return zero_slack(out) if any(m == "fft" for _, _, m in layout) else out
