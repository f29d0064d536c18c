"""Bucketed dense attention: items grouped by capacity bucket, one program per group.

The host reads the (concrete) lengths, puts every item in a bucket of the octave ladder
``16, 20, 24, 28, 32, 40, ...`` (at most 25% padding per axis), and merges neighbouring
buckets when the padded work a merge adds costs less than running one more group
(``plan_groups``, an exact DP over the buckets). Each group then runs one compiled
program whose shapes depend only on the bucket capacities and the item-count rung, never
on exact lengths:

* gather ``ips`` items at a time straight from the padded batch (no copy of the batch);
* dense masked attention per step, the queries cut into static chunks of ``qc`` rows
  so that a step's score block ``[ips, H, qc, ck]`` stays near ``block_bytes`` (in cache);
* a loop whose trip count is the group's real number of steps (count-ladder padding
  slots are never computed);
* the group's rows written into the output (in place when the output is donated).

An eager call whose plan signature repeats can run all groups in one compiled program
(``BucketPlan.fuse_after``); the backend object counts the signatures it has run
(``SignatureCounter``), so the decision is explicit state, not a module global.

With traced lengths (inside ``jit``) no host planning is possible; ``switched_attention``
maps over the items instead and ``lax.switch``es each one to the dense kernel of its
bucket on a coarser static ladder (``switch_caps``), so an item still costs about
``bucket(n)^2`` rather than ``capacity^2``.

Gradients: a custom VJP recomputes the scores of each step from the saved log-sum-exp
(no ``[L, L]`` matrix is stored between forward and backward).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from vsla_jax.attention.reference import masked_softmax
from vsla_jax.capacity import COUNT_POLICY, CapacityPolicy
from vsla_jax.tensor import VarTensor, rows_within
from vsla_jax.util import float0_zeros, is_traced, neg_inf, pad_axis_to, prev_pow2

#: Attention buckets: 4 rungs per doubling from 16 (16, 20, 24, 28, 32, 40, ...).
ATTENTION_POLICY = CapacityPolicy.octave(steps=4, minimum=16)


# -- planning (host) --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Group:
    """One bucket group: ``idx`` the items (int32, padded with ``B`` up to ``n_pad``),
    ``cq``/``ck`` query/key capacities, ``ips`` items per step, ``qc`` query rows per
    chunk, ``steps`` the real number of steps."""

    idx: np.ndarray
    cq: int
    ck: int
    ips: int
    qc: int
    steps: int

    @property
    def meta(self) -> np.ndarray:
        """``idx`` and ``steps`` packed in one int32 vector: the group program's one
        dynamic argument besides the batch (one host transfer per call)."""
        return np.append(self.idx, np.int32(self.steps)).astype(np.int32, copy=False)


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """Settings of the bucketed backend.

    Attributes:
      policy: capacity ladder of the buckets.
      block_bytes: target bytes of one step's float32 score block ``[ips, H, qc, ck]``
        (8 MiB: the best of 1-32 MiB on the 2-core benchmark machine).
      group_overhead_flops: cost of running one more group, in FLOPs of dense attention;
        neighbouring buckets merge when the padded work the merge adds is smaller.
      fuse_after: an eager call whose plan *signature* (the groups' static shapes, not
        the lengths) has been run this many times by the same backend object runs all
        groups in one compiled program (one dispatch, groups scheduled together) instead
        of one program per group. A fused program compiles once per signature,
        per-group programs once per group shape, so fusing pays off when batch profiles
        repeat (epochs over a dataset, a serving loop). 1: always fuse; 0: never.
    """

    policy: CapacityPolicy = ATTENTION_POLICY
    block_bytes: int = 8 << 20
    group_overhead_flops: float = 2.5e7
    fuse_after: int = 2

    def __post_init__(self):
        if self.block_bytes < 1 or self.group_overhead_flops < 0 or self.fuse_after < 0:
            raise ValueError(f"BucketPlan needs block_bytes >= 1, group_overhead_flops >= 0 "
                             f"and fuse_after >= 0, got {self}")


def step_shape(cq: int, ck: int, heads: int, block_bytes: int) -> tuple[int, int]:
    """``(ips, qc)``: items per step and query rows per chunk for a score block of
    about ``block_bytes`` (float32 ``[ips, heads, qc, ck]``); chunks keep at least 16
    rows (or all ``cq``), so a tiny budget cannot shatter a step into row-sized dots."""
    row = 4 * heads * max(ck, 1)
    if row * cq <= block_bytes:
        return max(1, block_bytes // (row * max(cq, 1))), cq
    return 1, min(cq, max(16, prev_pow2(block_bytes // row)))


def merge_buckets(caps: np.ndarray, counts: np.ndarray, cost_per_item, overhead: float):
    """Partition sorted bucket capacities into contiguous runs minimising
    ``sum(overhead + count * cost_per_item(run's largest cap))`` (exact DP, O(m^2)).

    Returns the list of ``(first, last)`` bucket indices of each run."""
    caps, counts = [int(c) for c in caps], [int(c) for c in counts]  # Python scalars: fast
    m = len(caps)
    best = [0.0] + [math.inf] * m
    cut = [0] * (m + 1)
    csum = [0] + list(itertools.accumulate(counts))
    for j in range(1, m + 1):
        unit = cost_per_item(caps[j - 1])
        for i in range(j):
            c = best[i] + overhead + (csum[j] - csum[i]) * unit
            if c < best[j]:
                best[j], cut[j] = c, i
    runs, j = [], m
    while j > 0:
        runs.append((cut[j], j - 1))
        j = cut[j]
    return runs[::-1]


def plan_groups(lq: np.ndarray, lk: np.ndarray, cap_q: int, cap_k: int, heads: int,
                head_dim: int, plan: BucketPlan = BucketPlan()) -> list[Group]:
    """Host planning from concrete lengths ``lq``/``lk`` ``[B]``: which items run together,
    at which capacities and step shapes. Groups are ordered by capacity.

    Buckets above the batch capacity are clipped to it before merging (a bucket of 480
    in a batch of capacity 454 costs 454^2 per item, not 480^2)."""
    b, cap_q, cap_k = len(lq), int(cap_q), int(cap_k)
    key = plan.policy.bucket_array(np.maximum(lq, lk)) if b else np.zeros(0, np.int64)
    key = np.minimum(key, max(cap_q, cap_k))
    caps, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    flops = lambda c: 4.0 * heads * head_dim * float(c) * float(c)
    groups = []
    for first, last in merge_buckets(caps, counts, flops, plan.group_overhead_flops):
        members = np.flatnonzero((inverse >= first) & (inverse <= last)).astype(np.int32)
        cq = min(int(plan.policy.bucket(int(lq[members].max()))), cap_q)
        ck = min(int(plan.policy.bucket(int(lk[members].max()))), cap_k)
        ips, qc = step_shape(cq, ck, heads, plan.block_bytes)
        n = len(members)
        ips = min(ips, n)
        steps = -(-n // ips)
        n_pad = COUNT_POLICY.bucket(steps) * ips
        idx = np.full(n_pad, b, np.int32)
        idx[:n] = members
        groups.append(Group(idx=idx, cq=cq, ck=ck, ips=ips, qc=qc, steps=steps))
    return groups


# -- one step: dense attention of `ips` items -------------------------------------------
def _heads_first(q, hk):
    """``[n, c, H, D]`` -> ``[n, Hkv, g, c, D]`` (query heads grouped by their K/V head)."""
    n, c, h, d = q.shape
    return q.reshape(n, c, hk, h // hk, d).transpose(0, 2, 3, 1, 4)


def _key_bias(lk, ck, dtype):
    """Additive key mask ``[n, 1, 1, 1, ck]``: 0 inside the item, a large negative outside."""
    kpos = jnp.arange(ck)
    return jnp.where(kpos[None, :] < lk[:, None], 0, neg_inf(dtype)).astype(dtype)[
        :, None, None, None, :]


def _chunk_scores(qj, kt, bias, q0, causal, scale):
    """Masked scaled scores ``[n, Hkv, g, qc, ck]`` of query rows ``q0..q0+qc``.

    Masked keys get a large negative score, so ``exp(s - rowmax)`` is exactly 0 there
    whenever the row has at least one key (rows of items without keys are zeroed by
    the caller)."""
    s = jnp.einsum("nhgqd,nhkd->nhgqk", qj * scale, kt, precision="highest") + bias
    if causal:
        kpos = jnp.arange(kt.shape[2])
        qpos = q0 + jnp.arange(qj.shape[3])
        s = jnp.where((kpos[None, :] <= qpos[:, None])[None, None, None], s,
                      neg_inf(s.dtype))
    return s


def _key_end(q0: int, rows: int, ck: int, causal: bool) -> int:
    """Keys a query chunk can see: all ``ck``, or (causal) those up to its last row."""
    return min(ck, q0 + rows) if causal else ck


def causal_chunk(qc: int, cq: int) -> int:
    """Query rows per chunk for causal attention: buckets of 128 and more run in (at
    least) two chunks, and the first one skips the keys above the diagonal (a quarter of
    the dense work). Two chunks measured best of 1, 2, 4 and 8 on the 2-core CPU: more
    chunks skip more work but run more, smaller operations."""
    return min(qc, -(-cq // 2)) if cq >= 128 else qc


def _row_valid(lq, lk, q0, qc):
    """Rows with a real query and at least one key: ``[n, 1, 1, qc]``."""
    qpos = q0 + jnp.arange(qc)
    return ((qpos[None, :] < lq[:, None]) & (lk[:, None] > 0))[:, None, None, :]


def _step_fwd(q, k, v, lq, lk, causal, scale, qc, with_lse=True, masked=False):
    """q ``[n, cq, H, D]``, k ``[n, ck, Hkv, D]``, v ``[n, ck, Hkv, Dv]`` -> out ``[n, cq,
    H, Dv]`` (compute dtype) and, when ``with_lse``, lse ``[n, Hkv, g, cq]``."""
    hk = k.shape[2]
    ct = jnp.promote_types(q.dtype, jnp.float32)
    if not masked:  # NaN or inf in a slack must not reach a result through 0 * x
        q, k, v = rows_within(q, lq), rows_within(k, lk), rows_within(v, lk)
    qt = _heads_first(q.astype(ct), hk)
    kt, vt = (x.astype(ct).transpose(0, 2, 1, 3) for x in (k, v))
    bias = _key_bias(lk, kt.shape[2], ct)
    outs, lses = [], []
    for j in range(0, q.shape[1], qc):
        qj = qt[:, :, :, j:j + qc]
        e = _key_end(j, qj.shape[3], kt.shape[2], causal)
        p, m, den = masked_softmax(_chunk_scores(qj, kt[:, :, :e], bias[..., :e], j, causal,
                                                 scale))
        o = jnp.einsum("nhgqk,nhkd->nhgqd", p, vt[:, :, :e], precision="highest") / den
        valid = _row_valid(lq, lk, j, qj.shape[3])
        outs.append(jnp.where(valid[..., None], o, 0))
        if with_lse:
            lses.append(jnp.where(valid, (m + jnp.log(den))[..., 0], neg_inf(ct)))
    cat = lambda xs: jnp.concatenate(xs, axis=3) if len(xs) > 1 else xs[0]
    n, cq, h = q.shape[:3]
    o = cat(outs).transpose(0, 3, 1, 2, 4).reshape(n, cq, h, v.shape[3])
    return (o, cat(lses)) if with_lse else (o, None)


def _step_bwd(q, k, v, lq, lk, o, lse, do, causal, scale, qc, masked=False):
    """Recomputing backward of ``_step_fwd``: dq ``[n, cq, H, D]``, dk ``[n, ck, Hkv, D]``
    and dv ``[n, ck, Hkv, Dv]`` in the compute dtype."""
    hk = k.shape[2]
    ct = jnp.promote_types(q.dtype, jnp.float32)
    # rows past the lengths (NaN in a slack; inf in a cotangent where a loss took log(0)
    # of the zero slack) must not reach the gradients through 0 * x (o is zero there)
    do = rows_within(do, lq)
    if not masked:
        q, k, v = rows_within(q, lq), rows_within(k, lk), rows_within(v, lk)
    qt, ot, dot = (_heads_first(x.astype(ct), hk) for x in (q, o, do))
    kt, vt = (x.astype(ct).transpose(0, 2, 1, 3) for x in (k, v))
    delta = (dot * ot).sum(-1)  # [n, hk, g, cq]
    bias = _key_bias(lk, kt.shape[2], ct)
    dk = jnp.zeros(kt.shape, ct)
    dv = jnp.zeros(vt.shape, ct)
    dqs = []
    for j in range(0, q.shape[1], qc):
        qj, doj = qt[:, :, :, j:j + qc], dot[:, :, :, j:j + qc]
        e = _key_end(j, qj.shape[3], kt.shape[2], causal)
        kj, vj = kt[:, :, :e], vt[:, :, :e]
        s = _chunk_scores(qj, kj, bias[..., :e], j, causal, scale)
        valid = _row_valid(lq, lk, j, qj.shape[3])
        # invalid rows have lse = neg_inf, so s - lse overflows to inf there: zero the
        # argument too, or differentiating this backward (grad of grad) gives 0 * inf
        arg = jnp.where(valid[..., None], s - lse[:, :, :, j:j + qc, None], 0)
        p = jnp.where(valid[..., None], jnp.exp(arg), 0)
        dv = dv.at[:, :, :e].add(jnp.einsum("nhgqk,nhgqd->nhkd", p, doj, precision="highest"))
        dp = jnp.einsum("nhgqd,nhkd->nhgqk", doj, vj, precision="highest")
        ds = p * (dp - delta[:, :, :, j:j + qc, None]) * scale
        dqs.append(jnp.einsum("nhgqk,nhkd->nhgqd", ds, kj, precision="highest"))
        dk = dk.at[:, :, :e].add(jnp.einsum("nhgqk,nhgqd->nhkd", ds, qj, precision="highest"))
    dq = jnp.concatenate(dqs, axis=3) if len(dqs) > 1 else dqs[0]
    n, cq, h, d = q.shape
    return (dq.transpose(0, 3, 1, 2, 4).reshape(n, cq, h, d), dk.transpose(0, 2, 1, 3),
            dv.transpose(0, 2, 1, 3))


# -- one group: a loop over steps with a dynamic trip count ------------------------------
def _rows(x, ids, c):
    """Rows ``ids`` of ``x [B, C, ...]`` cut to capacity ``c``; ids == B give zeros."""
    return x.at[ids, :c].get(mode="fill", fill_value=0)


def _flat(lengths):
    """``[B]`` or ``[B, 1]`` lengths as ``[B]`` (VarTensor lengths pass straight in)."""
    return lengths.reshape(lengths.shape[0])


def _unpack(meta):
    """A group's packed int32 ``meta = [idx (n_pad items), steps]`` (see ``Group.meta``)."""
    return meta[:-1], meta[-1]


def _step_inputs(s, idx, ips, lq, lk):
    ids = jax.lax.dynamic_slice_in_dim(idx, s * ips, ips)
    get = lambda x: x.at[ids].get(mode="fill", fill_value=0)
    return ids, get(lq), get(lk)


def _group_fwd(out, qd, kd, vd, meta, lq, lk, *, causal, scale, cq, ck, ips, qc, with_lse,
               masked=False):
    """Write the group's rows into ``out [B, Cq, H, Dv]``; also return its log-sum-exp
    ``[n_pad, Hkv, g, cq]`` when ``with_lse`` (for the backward pass).

    ``meta``: the group's items and step count packed in one int32 vector (one host
    transfer per call). The loop fills a compact ``[n_pad, cq, H, D]`` buffer; one
    scatter after the loop writes it into ``out`` (a scatter inside the loop measured
    slower on CPU)."""
    idx, steps = _unpack(meta)
    lq, lk = _flat(lq), _flat(lk)
    h, dv = out.shape[2:]
    hk = kd.shape[2]
    ct = jnp.promote_types(qd.dtype, jnp.float32)
    n_pad = idx.shape[0]
    o0 = jnp.zeros((n_pad, cq, h, dv), out.dtype)
    lse0 = jnp.full((n_pad, hk, h // hk, cq) if with_lse else (), neg_inf(ct), ct)

    def body(s, carry):
        o_all, lse = carry
        ids, a, b = _step_inputs(s, idx, ips, lq, lk)
        o, lse_s = _step_fwd(_rows(qd, ids, cq), _rows(kd, ids, ck), _rows(vd, ids, ck), a,
                             b, causal, scale, qc, with_lse, masked)
        o_all = jax.lax.dynamic_update_slice_in_dim(o_all, o.astype(o_all.dtype), s * ips, 0)
        if with_lse:
            lse = jax.lax.dynamic_update_slice_in_dim(lse, lse_s, s * ips, axis=0)
        return o_all, lse

    if n_pad == ips:  # one padded step (count rung 1) is the real step: no loop at all
        o_all, lse = body(0, (o0, lse0))
    else:
        o_all, lse = jax.lax.fori_loop(0, steps, body, (o0, lse0))
    return out.at[idx, :cq].set(o_all, mode="drop"), lse


def _group_bwd(dq, dk, dv, qd, kd, vd, meta, lq, lk, out, lse, dout, *, causal, scale, cq,
               ck, ips, qc):
    """Add the group's gradients into ``dq``/``dk``/``dv`` (full batch shapes); ``qd``,
    ``kd``, ``vd`` are zero past their lengths (as ``_bucketed_fwd`` saves them)."""
    idx, steps = _unpack(meta)
    lq, lk = _flat(lq), _flat(lk)
    n_pad = idx.shape[0]
    compact = lambda x, c: jnp.zeros((n_pad, c) + x.shape[2:], x.dtype)

    def body(s, carry):
        ids, a, b = _step_inputs(s, idx, ips, lq, lk)
        g = _step_bwd(_rows(qd, ids, cq), _rows(kd, ids, ck), _rows(vd, ids, ck), a, b,
                      _rows(out, ids, cq), jax.lax.dynamic_slice_in_dim(lse, s * ips, ips),
                      _rows(dout, ids, cq), causal, scale, qc, masked=True)
        return tuple(jax.lax.dynamic_update_slice_in_dim(acc, x.astype(acc.dtype), s * ips, 0)
                     for acc, x in zip(carry, g))

    init = (compact(dq, cq), compact(dk, ck), compact(dv, ck))
    gq, gk, gv = body(0, init) if n_pad == ips else jax.lax.fori_loop(0, steps, body, init)
    put = lambda acc, x, c: acc.at[idx, :c].add(x, mode="drop")
    return put(dq, gq, cq), put(dk, gk, ck), put(dv, gv, ck)


_STATIC = ("causal", "scale", "cq", "ck", "ips", "qc")
# Two compiled versions of each: eager calls own the buffer they thread through the
# groups and let XLA update it in place (donated); traced calls (under jit/grad) inline.
_FWD = {False: jax.jit(_group_fwd, static_argnames=_STATIC + ("with_lse", "masked")),
        True: jax.jit(_group_fwd, static_argnames=_STATIC + ("with_lse", "masked"),
                      donate_argnums=0)}
_BWD = {False: jax.jit(_group_bwd, static_argnames=_STATIC),
        True: jax.jit(_group_bwd, static_argnames=_STATIC, donate_argnums=(0, 1, 2))}


def _eager(*xs) -> bool:
    return not any(is_traced(x) for x in jax.tree_util.tree_leaves(xs))


def _shapes(g: Group, causal: bool) -> tuple[int, int, int, int]:
    """Static ``(cq, ck, ips, qc)`` of a group; causal groups get narrower query chunks."""
    return g.cq, g.ck, g.ips, causal_chunk(g.qc, g.cq) if causal else g.qc


def _static(shape: tuple[int, int, int, int]) -> dict:
    """``_shapes`` as the keyword arguments of ``_group_fwd``/``_group_bwd``."""
    return dict(zip(("cq", "ck", "ips", "qc"), shape))


def _run_groups(qd, kd, vd, lq, lk, metas, shapes, causal, scale, with_lse, call,
                masked=False):
    out, lses = jnp.zeros(qd.shape[:3] + vd.shape[3:], qd.dtype), []
    for meta, shp in zip(metas, shapes):
        out, lse = call(out, qd, kd, vd, meta, lq, lk, causal=causal, scale=scale,
                        with_lse=with_lse, masked=masked, **_static(shp))
        lses.append(lse)
    return out, lses


@functools.partial(jax.jit, static_argnames=("shapes", "sizes", "causal", "scale", "with_lse"))
def _fused(qd, kd, vd, lq, lk, packed, *, shapes, sizes, causal, scale, with_lse):
    """Every group in one program, keyed by the groups' static shapes only. ``packed``:
    every group's items, then every group's step count (``sizes[i]`` items for group
    ``i``), in one int32 vector: one host transfer per call."""
    ends = tuple(itertools.accumulate(sizes))
    total = ends[-1]
    metas = [jnp.concatenate([packed[e - n:e], packed[total + i:total + i + 1]])
             for i, (n, e) in enumerate(zip(sizes, ends))]
    return _run_groups(qd, kd, vd, lq, lk, metas, shapes, causal, scale, with_lse,
                       _group_fwd)


def _run_fwd(qd, kd, vd, lq, lk, groups, causal, scale, with_lse, fuse, masked=False):
    eager = _eager(qd, kd, vd, lq, lk)
    shapes = tuple(_shapes(g, causal) for g in groups)
    if eager and fuse and groups:
        packed = np.concatenate([g.idx for g in groups] +
                                [np.asarray([g.steps for g in groups], np.int32)])
        return _fused(qd, kd, vd, lq, lk, packed, shapes=shapes,
                      sizes=tuple(len(g.idx) for g in groups), causal=causal, scale=scale,
                      with_lse=with_lse)
    return _run_groups(qd, kd, vd, lq, lk, [g.meta for g in groups], shapes, causal, scale,
                       with_lse, _FWD[eager], masked)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _bucketed(qd, kd, vd, lq, lk, groups, causal, scale, fuse):
    """``bucketed_attention`` under a trace."""
    qd, kd, vd = _zero_past(qd, kd, vd, lq, lk)
    return _run_fwd(qd, kd, vd, lq, lk, groups, causal, scale, False, fuse, True)[0]


def _zero_past(qd, kd, vd, lq, lk):
    """The inputs with their rows past the lengths zeroed: NaN or inf in a slack must not
    reach a result through 0 * x (done once, inside the custom VJP: no autodiff of it)."""
    a, b = _flat(lq), _flat(lk)
    return rows_within(qd, a), rows_within(kd, b), rows_within(vd, b)


def _bucketed_fwd(qd, kd, vd, lq, lk, groups, causal, scale, fuse):
    qd, kd, vd = _zero_past(qd, kd, vd, lq, lk)  # saved zeroed for the backward
    out, lses = _run_fwd(qd, kd, vd, lq, lk, groups, causal, scale, True, fuse, True)
    return out, (qd, kd, vd, lq, lk, out, lses)


def _bucketed_bwd(groups, causal, scale, fuse, saved, dout):
    qd, kd, vd, lq, lk, out, lses = saved
    call = _BWD[_eager(saved, dout)]
    ct = jnp.promote_types(qd.dtype, jnp.float32)
    dq, dk, dv = (jnp.zeros(x.shape, ct) for x in (qd, kd, vd))
    for g, lse in zip(groups, lses):
        dq, dk, dv = call(dq, dk, dv, qd, kd, vd, g.meta, lq, lk, out, lse, dout,
                          causal=causal, scale=scale, **_static(_shapes(g, causal)))
    return (dq.astype(qd.dtype), dk.astype(kd.dtype), dv.astype(vd.dtype), float0_zeros(lq),
            float0_zeros(lk))


_bucketed.defvjp(_bucketed_fwd, _bucketed_bwd)


def bucketed_attention(qd, kd, vd, lq, lk, groups: list[Group], causal: bool,
                       scale: float, fuse: bool = False) -> jax.Array:
    """Run every group of ``plan_groups`` into one ``[B, Cq, H, Dv]`` output (zero slack).

    qd ``[B, Cq, H, D]``, kd ``[B, Ck, Hkv, D]``, vd ``[B, Ck, Hkv, Dv]``, lq/lk ``[B]`` or
    ``[B, 1]`` int32.
    ``fuse``: run the eager forward as one compiled program over all groups (keyed by
    the groups' static shapes) instead of one program per group. Differentiable in qd,
    kd, vd (custom VJP: scores are recomputed per step from the saved log-sum-exp;
    gradients accumulate group by group into one buffer per operand). On concrete
    arrays nothing can be differentiating, so the forward runs without the custom-VJP
    machinery (its per-call host cost is that of a small program here)."""
    groups, fuse = tuple(groups), bool(fuse)
    if _eager(qd, kd, vd, lq, lk):  # each step zeroes its rows past the lengths
        return _run_fwd(qd, kd, vd, lq, lk, groups, causal, scale, False, fuse)[0]
    return _bucketed(qd, kd, vd, lq, lk, groups, causal, scale, fuse)


def plan_signature(groups, causal: bool, q_shape, k_shape, dtype, scale) -> tuple:
    """What a fused program is compiled for: the groups' static shapes and item-count
    rungs, the batch shapes, dtype, causality and scale (never the exact lengths)."""
    return (tuple(_shapes(g, causal) for g in groups), tuple(len(g.idx) for g in groups),
            tuple(q_shape), tuple(k_shape), str(dtype), causal, scale)


class SignatureCounter:
    """How many times each plan signature has been run (a bounded LRU of counts).

    Held by a ``BucketedBackend``: its ``fuse_after`` decision is state of that object,
    visible and resettable (``clear``), not a module-level table."""

    def __init__(self, maxsize: int = 4096):
        self.maxsize = maxsize
        self._counts: collections.OrderedDict = collections.OrderedDict()

    def bump(self, signature) -> int:
        """Count one more run of ``signature``; return its count so far."""
        n = self._counts.pop(signature, 0) + 1
        self._counts[signature] = n
        if len(self._counts) > self.maxsize:
            self._counts.popitem(last=False)
        return n

    def __len__(self) -> int:
        return len(self._counts)

    def clear(self) -> None:
        self._counts.clear()


# -- traced lengths: per-item switch over static bucket capacities ----------------------
#: Bucket capacities for traced lengths: 2 rungs per doubling (16, 24, 32, 48, 64, ...),
#: each one branch of the per-item switch (fewer branches, a little more padding).
SWITCH_POLICY = CapacityPolicy.octave(steps=2, minimum=16)


def switch_caps(cap_q: int, cap_k: int, policy: CapacityPolicy = SWITCH_POLICY):
    """Static branch capacities for traced lengths: ladder rungs below ``max(cap_q,
    cap_k)`` plus that capacity itself (the last branch holds every item)."""
    top = max(cap_q, cap_k, 1)
    return tuple(c for c in policy.ladder(top) if c < top) + (top,)


def _bucket_index(caps, lq, lk):
    return jnp.searchsorted(jnp.asarray(caps, jnp.int32), jnp.maximum(lq, lk), side="left")


def _branch_shape(c, cq_all, ck_all, heads, block_bytes, causal):
    """``(cq, ck, qc)`` of the switch branch for bucket capacity ``c``."""
    cq, ck = min(c, cq_all), min(c, ck_all)
    qc = step_shape(cq, ck, heads, block_bytes)[1]
    return cq, ck, causal_chunk(qc, cq) if causal else qc


def _switch_fwd(qd, kd, vd, lq, lk, causal, scale, caps, block_bytes):
    """``lax.map`` over items; each item runs dense attention at its bucket's capacity.

    Returns out ``[B, Cq, H, Dv]`` and lse ``[B, Hkv, g, Cq]``."""
    cq_all, ck_all, h = qd.shape[1], kd.shape[1], qd.shape[2]
    ct = jnp.promote_types(qd.dtype, jnp.float32)

    def branch(c):
        cq, ck, qc = _branch_shape(c, cq_all, ck_all, h, block_bytes, causal)

        def run(q, k, v, a, b):
            o, lse = _step_fwd(q[None, :cq], k[None, :ck], v[None, :ck], a[None], b[None],
                               causal, scale, qc, True)
            return (pad_axis_to(o[0].astype(qd.dtype), cq_all, 0),
                    pad_axis_to(lse[0], cq_all, 2, neg_inf(ct)))
        return run

    branches = [branch(c) for c in caps]

    def item(args):
        q, k, v, a, b = args
        return jax.lax.switch(_bucket_index(caps, a, b), branches, q, k, v, a, b)

    return jax.lax.map(item, (qd, kd, vd, lq, lk))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def switched_attention(qd, kd, vd, lq, lk, causal, scale, caps, block_bytes):
    """Bucketed attention for traced lengths (inside ``jit``): one compiled program whose
    per-item loop switches to the dense kernel of the item's bucket capacity ``caps``
    (static, ascending, the last one the batch capacity), so an item of length ``n``
    costs about ``bucket(n)^2``, not ``capacity^2``. Custom VJP recomputing scores."""
    return _switch_fwd(qd, kd, vd, lq, lk, causal, scale, caps, block_bytes)[0]


def _switched_fwd_rule(qd, kd, vd, lq, lk, causal, scale, caps, block_bytes):
    out, lse = _switch_fwd(qd, kd, vd, lq, lk, causal, scale, caps, block_bytes)
    return out, (qd, kd, vd, lq, lk, out, lse)


def _switched_bwd_rule(causal, scale, caps, block_bytes, saved, dout):
    qd, kd, vd, lq, lk, out, lse = saved
    cq_all, ck_all, h = qd.shape[1], kd.shape[1], qd.shape[2]

    def branch(c):
        cq, ck, qc = _branch_shape(c, cq_all, ck_all, h, block_bytes, causal)

        def run(q, k, v, a, b, o, lse_i, do):
            g = _step_bwd(q[None, :cq], k[None, :ck], v[None, :ck], a[None], b[None],
                          o[None, :cq], lse_i[None, :, :, :cq], do[None, :cq], causal, scale,
                          qc)
            return (pad_axis_to(g[0][0].astype(qd.dtype), cq_all, 0),
                    pad_axis_to(g[1][0].astype(kd.dtype), ck_all, 0),
                    pad_axis_to(g[2][0].astype(vd.dtype), ck_all, 0))
        return run

    branches = [branch(c) for c in caps]

    def item(args):
        q, k, v, a, b, o, lse_i, do = args
        return jax.lax.switch(_bucket_index(caps, a, b), branches, q, k, v, a, b, o, lse_i, do)

    dq, dk, dv = jax.lax.map(item, (qd, kd, vd, lq, lk, out, lse, dout))
    return dq, dk, dv, float0_zeros(lq), float0_zeros(lk)


switched_attention.defvjp(_switched_fwd_rule, _switched_bwd_rule)


# -- backend ----------------------------------------------------------------------------
class BucketedBackend:
    """Items grouped by capacity bucket; dense attention per bucket.

    With concrete lengths (eager calls, or lengths closed over by a ``jit``-ed function):
    the host buckets items on the octave ladder of ``max(lq, lk)``, merges neighbouring
    buckets by a cost model, and runs one program per group, a few items per step (all
    groups in one program once a plan signature has been run ``plan.fuse_after`` times
    by this object, see ``seen``). With traced lengths (inside ``jit``): one program maps
    over the items and switches each to the dense kernel of its bucket capacity
    (``switch_caps``)."""

    name = "bucketed"

    def __init__(self, plan: BucketPlan | None = None):
        self.plan = plan or BucketPlan()
        self.seen = SignatureCounter()

    def optimize_tiling(self, q, k) -> dict:
        lq, lk = q.host_lengths, k.host_lengths
        if lq is None or lk is None:
            return dict(caps=switch_caps(q.capacity[0], k.capacity[0]))
        h, d = q.features
        return dict(groups=plan_groups(lq[:, 0], lk[:, 0], q.capacity[0], k.capacity[0], h, d,
                                       self.plan))

    def prepare(self, q, k, v) -> dict:
        return self.optimize_tiling(q, k)

    def compute(self, q, k, v, causal, scale, plan) -> VarTensor:
        if "caps" in plan:
            args = (q.data, k.data, v.data, q.lengths[:, 0], k.lengths[:, 0])
            out = switched_attention(*args, causal, scale, plan["caps"], self.plan.block_bytes)
        else:
            args = (q.data, k.data, v.data, q.lengths, k.lengths)  # [B, 1]: no slicing op
            groups = plan["groups"]
            fuse = self.plan.fuse_after > 0 and _eager(*args) and self.seen.bump(
                plan_signature(groups, causal, q.data.shape, k.data.shape, q.dtype, scale)
            ) >= self.plan.fuse_after
            out = bucketed_attention(*args, groups, causal, scale, fuse)
        return VarTensor.trusted(out, q.lengths, q.model)
