"""Blocked ragged convolution: pad each item to a whole number of blocks, not to a bucket.

Every pair ``(x_i, k_i)`` of a rank-1 ragged batch is ordered as (longer, shorter)
operand; convolution is commutative, so the output is the same. Items are then put
in classes by the length of the shorter operand (one class per octave: 1–8, 9–16,
17–32, …). Inside a class, the longer operand of every item is cut into blocks of
``P`` output samples (overlap-save), and all blocks of all items of the class form one
dense ``[blocks, P + S - 1]`` batch, where ``S`` is the class's longest short operand.

Padded work is therefore at most one partly filled block per item plus the
short-operand slack of its class, whatever the spread of the long lengths. A batch
with lengths 8 … 2048 costs about what its items' own lengths cost. Bucketing by
``(cap_a, cap_b)`` either pads small items to their group's longest member or runs
many small groups, and each group costs a fixed overhead.

Per class the engine runs ``direct`` (shift-and-add over the class's taps, 8 taps per
pass) or ``fft`` (overlap-save with one FFT length for the class), whichever the
engine's ``CostModel`` predicts faster. Block and FFT lengths are chosen for the class, never
from the batch-wide maximum.

Layout of the result (``FlatRagged``): one flat array per class; every item's output
lies contiguously in array ``part[i]`` at ``offsets[i]``, with
``lengths[i] = len(x_i) + len(k_i) - 1`` (0 when either operand is empty).

The host plan depends only on the items' lengths. The 64 most recent plans are
cached, so a batch whose lengths repeat (epochs over a fixed dataset) skips planning.
``vs.conv`` runs this plan on a padded batch (``engine``); ``conv_packed`` runs it on
lists of arrays and returns the packed ``FlatRagged`` (no padded batch on either
side). The device program is differentiable with respect to the packed input
(``conv_blocked_values``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vsla_jax.capacity import CapacityPolicy
from vsla_jax.conv import kernels
from vsla_jax.conv.cost import STATIC_COST_MODEL, CostModel
from vsla_jax.errors import ShapeError, VSLATypeError
from vsla_jax.util import aligned_empty, as_arrays, is_traced

METHODS = ("auto", "direct", "fft")

#: Output samples per block for ``direct`` classes.
DIRECT_BLOCK = 256
#: Every class's block is a multiple of this, so all class outputs are rows of
#: ``BLOCK_QUANTUM`` samples and the padded output is one row gather.
BLOCK_QUANTUM = DIRECT_BLOCK
#: Largest FFT length tried for ``fft`` classes.
MAX_FFT = 16384
#: A ladder for each class's taps and block count (ratio <= 1.25 between rungs), for
#: ``plan_blocks(ladder=...)``. Not the default: with several classes per batch, new
#: batches rarely land on the same rungs of every class (measured on lognormal batches),
#: so it added padding without sharing programs; ``engine.LayoutBudget`` bounds
#: compilations instead.
LAYOUT_LADDER = CapacityPolicy(minimum=1, alignment=1, growth=1.25)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FlatRagged:
    """Ragged 1-D items stored back to back in a few flat arrays (one per class).

    Attributes:
      values: flat arrays; item ``i`` is
        ``values[part[i]][offsets[i] : offsets[i] + lengths[i]]``. Samples between
        items are scratch (block tails) and carry no meaning.
      part: ``int64[n]`` which array holds item ``i`` (-1 for an empty item).
      offsets: ``int64[n]`` start of item ``i`` in its array.
      lengths: ``int64[n]`` length of item ``i``.
    """

    values: tuple[jax.Array, ...]
    part: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    def items(self) -> list[jax.Array]:
        """Exact-length JAX items in their original order (slices: also under ``jit``
        and ``grad``)."""
        dtype = self.values[0].dtype if self.values else jnp.float32
        return [self.values[p][o : o + n] if p >= 0 else jnp.zeros(0, dtype)
                for p, o, n in zip(self.part.tolist(), self.offsets.tolist(),
                                   self.lengths.tolist())]

    def to_list(self) -> list[np.ndarray]:
        """Exact-length NumPy items in their original order (one copy per array)."""
        host = [np.asarray(v) for v in self.values]
        dtype = host[0].dtype if host else np.float32
        return [host[p][o : o + n] if p >= 0 else np.zeros(0, dtype) for p, o, n in zip(
            self.part.tolist(), self.offsets.tolist(), self.lengths.tolist())]


@dataclasses.dataclass(frozen=True)
class ClassLayout:
    """Static shape of one class of the blocked program.

    Attributes:
      method: ``"direct"`` or ``"fft"``.
      taps: ``S``, the longest short operand of the class.
      block: ``P``, output samples per block.
      fft_length: a fast FFT size ``N >= P + S - 1`` for ``fft`` classes, else 0.
      blocks: number of blocks in the class.
      items: number of items in the class.
      data: offset of the class in the packed input (``blocks * (block + taps)`` values:
        the blocked long operands, then every block's taps).
    """

    method: str
    taps: int
    block: int
    fft_length: int
    blocks: int
    items: int
    data: int


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """Host plan of one ragged batch (depends on the lengths only).

    Attributes:
      layout: one ``ClassLayout`` per class.
      members: per class, the items in it (``int64``, ascending).
      swap: ``bool[n]``: the kernel is the longer operand of item ``i``.
      first: ``bool[blocks]`` over all classes: the block starts an item.
      source: ``int64[total_in]``: for every packed input value, its index in the flat
        input (all signals, then all kernels, then one zero), or the zero's index.
      part, offsets, lengths: where every output lies in ``FlatRagged.values``.
      total_in: size of the packed input.
      seconds: the cost model's prediction for the device program.
    """

    layout: tuple[ClassLayout, ...]
    members: tuple[np.ndarray, ...]
    swap: np.ndarray
    first: np.ndarray
    source: np.ndarray
    part: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    total_in: int
    seconds: float = 0.0


def _rung(n: int, ladder: CapacityPolicy | None) -> int:
    return ladder.bucket(n) if ladder is not None and n else n


def _fft_choice(out_len: np.ndarray, taps: int, cost: CostModel,
                ladder: CapacityPolicy | None = None) -> tuple[float, int, int, int]:
    """Cheapest ``(seconds, N, P, blocks)``: blocks of ``P`` outputs (a multiple of
    ``BLOCK_QUANTUM``, at least ``taps``) and the fast FFT length ``N >= P + taps - 1``."""
    best = (math.inf, 0, 0, 0)
    m = max(1, -(-taps // BLOCK_QUANTUM))
    while True:
        p = m * BLOCK_QUANTUM
        n = kernels.fast_fft_length(p + taps - 1)
        blocks = _rung(int((-(-out_len // p)).sum()), ladder)
        t = cost.fft(n, blocks)
        if t < best[0]:
            best = (t, n, p, blocks)
        if n > MAX_FFT:
            return best
        m = max(m + 1, int(m * 1.25))


def class_method(out_len, taps: int, method: str, cost: CostModel,
                 ladder: CapacityPolicy | None = None) -> tuple[str, int, int, int, float]:
    """``(method, block, fft_length, blocks, seconds)`` for one class (``blocks`` on
    ``ladder``, so that similar batches share one program)."""
    # the halo of a block must fit in the previous block
    block = max(DIRECT_BLOCK, -(-taps // BLOCK_QUANTUM) * BLOCK_QUANTUM)
    d_blocks = _rung(int((-(-out_len // block)).sum()), ladder)
    t_direct = cost.direct(d_blocks * block * (-(-taps // kernels.UNROLL) * kernels.UNROLL))
    if method == "direct":
        return "direct", block, 0, d_blocks, t_direct
    t_fft, n_fft, p_fft, f_blocks = _fft_choice(out_len, taps, cost, ladder)
    if method == "fft" or t_fft < t_direct:
        return "fft", p_fft, n_fft, f_blocks, t_fft
    return "direct", block, 0, d_blocks, t_direct


def plan_blocks(len_a, len_b, method: str = "auto", cost: CostModel | None = None,
                start_a=None, start_b=None, zero: int | None = None,
                ladder: CapacityPolicy | None = None) -> BlockPlan:
    """Host plan for signals of lengths ``len_a`` and kernels of lengths ``len_b``.

    With ``ladder``, each class's taps and block count are rounded up on it (the
    padding blocks read zeros); the default fits the layout exactly.

    ``source`` indexes a flat input where signal ``i`` starts at ``start_a[i]``, kernel
    ``i`` at ``start_b[i]`` and ``zero`` holds a zero. The default is the items back to
    back (all signals, then all kernels, then the zero). Vectorised NumPy: O(classes)
    Python steps, not O(items).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    cost = cost or STATIC_COST_MODEL
    la = np.asarray(len_a, np.int64).reshape(-1)
    lb = np.asarray(len_b, np.int64).reshape(-1)
    if start_a is None:
        starts = np.concatenate([[0], np.cumsum(np.concatenate([la, lb]))]).astype(np.int64)
        start_a, start_b, zero = starts[: la.size], starts[la.size : -1], int(starts[-1])
    swap = lb > la
    long_len, short_len = np.maximum(la, lb), np.minimum(la, lb)
    out_len = np.where(short_len > 0, long_len + short_len - 1, 0)
    # octave classes of the short length: 1-8 -> 0, 9-16 -> 1, 17-32 -> 2, ...
    cls = np.where(out_len > 0, np.maximum(
        np.ceil(np.log2(np.maximum(short_len, 1))).astype(np.int64) - 3, 0), -1)
    long_at = np.where(swap, start_b, start_a)
    short_at = np.where(swap, start_a, start_b)
    layout, members, first, source = [], [], [], []
    offsets = np.zeros(la.size, np.int64)
    part = np.full(la.size, -1, np.int64)
    data_at, seconds = 0, 0.0
    for c in np.unique(cls[cls >= 0]).tolist():
        mem = np.flatnonzero(cls == c)
        taps = _rung(int(short_len[mem].max()), ladder)
        meth, block, n_fft, blocks, t = class_method(out_len[mem], taps, method, cost, ladder)
        seconds += t
        nb = -(-out_len[mem] // block)
        real = int(nb.sum())
        first_block = np.concatenate([[0], np.cumsum(nb)[:-1]])
        is_first = np.ones(blocks, bool)  # padding blocks start no item: zero halo
        is_first[:real] = False
        is_first[first_block] = True
        first.append(is_first)
        # long operands, blocked: [blocks * block] values (padding blocks read the zero)
        local = np.arange(real * block) - np.repeat(first_block * block, nb * block)
        source.append(np.where(local < np.repeat(long_len[mem], nb * block),
                               np.repeat(long_at[mem], nb * block) + local, zero))
        source.append(np.full((blocks - real) * block, zero, np.int64))
        # every block's copy of its item's short operand: [blocks, taps]
        j = np.arange(taps)
        source.append(np.where(j < np.repeat(short_len[mem], nb)[:, None],
                               np.repeat(short_at[mem], nb)[:, None] + j, zero).reshape(-1))
        source.append(np.full((blocks - real) * taps, zero, np.int64))
        offsets[mem] = first_block * block
        part[mem] = len(layout)
        members.append(mem)
        layout.append(ClassLayout(meth, taps, block, n_fft, blocks, mem.size, data_at))
        data_at += blocks * (block + taps)
    cat = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt)
    return BlockPlan(tuple(layout), tuple(members), swap, cat(first, bool),
                     cat(source, np.int64), part, offsets, out_len, data_at, seconds)


@functools.lru_cache(maxsize=64)
def cached_plan(key_a: bytes, key_b: bytes, method: str, cost: CostModel):
    """``plan_blocks`` of back-to-back items, memoised by the lengths' bytes (int64)."""
    plan = plan_blocks(np.frombuffer(key_a, np.int64), np.frombuffer(key_b, np.int64),
                       method, cost)
    with jax.ensure_compile_time_eval():  # cached: a device array, never a tracer
        return plan, jax.device_put(plan.first)


def pack_blocks(plan: BlockPlan, xs: Sequence[np.ndarray], ks: Sequence[np.ndarray],
                dtype) -> np.ndarray | jax.Array:
    """The packed ``[plan.total_in]`` host input of ``conv_blocked_values``.

    Per class: every item's longer operand, zero-padded to its blocks
    (``[blocks, block]`` row-major), then every block's copy of its item's shorter
    operand, zero-padded to ``taps`` (``[blocks, taps]``). One ``np.concatenate`` and
    one ``np.take`` with the plan's ``source`` index (``jnp`` ops when an operand is
    traced, so that ``conv_packed`` works under ``jit`` and ``grad``).
    """
    if any(map(is_traced, (*xs, *ks))):
        if not plan.source.size:
            return jnp.zeros(1, dtype)
        flat = jnp.concatenate([*(jnp.asarray(a, dtype) for a in (*xs, *ks)),
                                jnp.zeros(1, dtype)])
        return jnp.take(flat, plan.source, mode="clip")
    flat = np.concatenate([*xs, *ks, np.zeros(1, dtype)], dtype=dtype, casting="unsafe")
    if not plan.source.size:
        return np.zeros(1, dtype)
    # mode="clip": with mode="raise" (the default) NumPy buffers `out` through a temporary
    return np.take(flat, plan.source, out=aligned_empty(plan.source.size, dtype), mode="clip")


def _class_conv(packed, first, c: ClassLayout):
    """``[blocks, block]`` outputs of one class (slices and reshapes only, no gathers)."""
    nb, p, s = c.blocks, c.block, c.taps
    x = packed[c.data : c.data + nb * p].reshape(nb, p)
    w = packed[c.data + nb * p : c.data + nb * (p + s)].reshape(nb, s)
    if s > 1:  # overlap-save halo: the last s-1 samples of the previous block of the item
        prev = jnp.concatenate([jnp.zeros((1, s - 1), x.dtype), x[:-1, p - s + 1 :]])
        x = jnp.concatenate([jnp.where(first[:, None], 0, prev), x], axis=1)
    if c.method == "fft":
        ft = jnp.promote_types(x.dtype, jnp.float32)  # XLA's FFT takes no half floats
        y = jnp.fft.irfft(jnp.fft.rfft(x.astype(ft), c.fft_length) *
                          jnp.fft.rfft(w.astype(ft), c.fft_length), c.fft_length)
        return y[:, s - 1 : s - 1 + p].astype(x.dtype)
    return kernels.shift_add(x, w, (p,), 1, 1)


@functools.partial(jax.jit, static_argnames=("layout",))
def conv_blocked_values(packed: jax.Array, first: jax.Array,
                        layout: tuple[ClassLayout, ...]) -> tuple[jax.Array, ...]:
    """Device part of the blocked plan: packed inputs -> per-class flat outputs.

    Differentiable with respect to ``packed``. The classes stay separate arrays:
    joining them would cost one more copy of every output.

    Args:
      packed: ``[plan.total_in]`` from ``pack_blocks``.
      first: ``bool[blocks]``, the plan's ``first``.
      layout: the plan's static ``layout``.

    Returns:
      One ``[blocks * block]`` array per class; item ``i`` at ``plan.offsets[i]`` of
      array ``plan.part[i]``.
    """
    return class_outputs(packed, first, layout)


def class_outputs(packed, first, layout) -> tuple[jax.Array, ...]:
    """Traceable body of ``conv_blocked_values``."""
    outs, at = [], 0
    for c in layout:
        outs.append(_class_conv(packed, first[at : at + c.blocks], c).reshape(-1))
        at += c.blocks
    return tuple(outs)


def row_index(plan: BlockPlan, out_cap: int) -> np.ndarray:
    """``int32[n, ceil(out_cap / BLOCK_QUANTUM)]``: for every item, the rows of the joined
    class outputs (``[rows, BLOCK_QUANTUM]``) that hold its output, in order; rows past
    the item's end point past the last row (they read zeros)."""
    q = BLOCK_QUANTUM
    sizes = np.array([c.blocks * c.block // q for c in plan.layout], np.int64)
    base = np.concatenate([[0], np.cumsum(sizes)])
    start = np.where(plan.part >= 0, base[np.maximum(plan.part, 0)] + plan.offsets // q, 0)
    width = -(-out_cap // q)
    j = np.arange(width)
    used = -(-plan.lengths // q)
    return np.where(j[None, :] < used[:, None], start[:, None] + j[None, :],
                    base[-1]).astype(np.int32)


def join_outputs(outs, dtype) -> jax.Array:
    """The per-class flat outputs as one ``[rows, BLOCK_QUANTUM]`` array."""
    if not outs:
        return jnp.zeros((0, BLOCK_QUANTUM), dtype)
    return jnp.concatenate([o.reshape(-1, BLOCK_QUANTUM) for o in outs])


def gather_rows(joined, rows, lengths, out_cap: int) -> jax.Array:
    """``[n, out_cap]`` zero-padded outputs: one row gather of ``joined`` (whole rows of
    ``BLOCK_QUANTUM`` samples, ``rows`` from ``row_index``), masked to ``lengths``."""
    n = rows.shape[0]
    if not joined.shape[0]:  # every item is empty
        return jnp.zeros((n, out_cap), joined.dtype)
    got = jnp.take(joined, rows, axis=0, mode="fill", fill_value=0)
    got = got.reshape(n, -1)[:, :out_cap]
    valid = jnp.arange(out_cap, dtype=jnp.int32)[None, :] < lengths[:, None]
    return jnp.where(valid, got, jnp.zeros((), got.dtype))


def conv_packed(
    xs: Sequence[Any],
    ks: Sequence[Any],
    method: str = "auto",
    cost: CostModel | None = None,
    accumulate_f64: bool = False,
) -> FlatRagged:
    """Model A (full) convolution of ragged rank-1 items into the packed ``FlatRagged``.

    The zero-copy form of ``vs.conv`` for users who want flat outputs: no padded batch
    is built on the way in or out. Assumes finite input (``vs.conv`` handles ``inf`` and
    ``nan`` exactly like NumPy).

    Args:
      xs: ``n`` 1-D arrays (NumPy, JAX or nested lists), any lengths including 0.
      ks: ``n`` 1-D kernels, one per item.
      method: ``"auto"`` (cost model per class), ``"direct"`` or ``"fft"``.
      cost: the cost model (default: the static one; pass ``vs.calibrate()`` for this
        machine's fit).
      accumulate_f64: compute f32 inputs in f64 (needs ``jax_enable_x64``).

    Returns:
      A ``FlatRagged`` of the ``n`` outputs, in input order, in the inputs' dtype.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    items, dts_a = _rank1_arrays(xs, "item")
    kernels_, dts_b = _rank1_arrays(ks, "kernel")
    if len(kernels_) != len(items):
        raise ShapeError(f"conv_packed: {len(kernels_)} kernels for {len(items)} items "
                         "(one kernel per item)")
    dtype, out_dtype = compute_dtype(dts_a | dts_b or {np.float32}, method, accumulate_f64,
                                     "conv_packed")
    la = np.fromiter(map(len, items), np.int64, len(items))
    lb = np.fromiter(map(len, kernels_), np.int64, len(kernels_))
    plan, first = cached_plan(la.tobytes(), lb.tobytes(), method, cost or STATIC_COST_MODEL)
    values = conv_blocked_values(pack_blocks(plan, items, kernels_, dtype), first, plan.layout)
    if dtype != out_dtype:
        values = tuple(v.astype(out_dtype) for v in values)
    return FlatRagged(values, plan.part, plan.offsets, plan.lengths)


def compute_dtype(dtypes, method: str, accumulate_f64: bool, who: str
                  ) -> tuple[np.dtype, np.dtype]:
    """``(compute dtype, output dtype)`` for operands of ``dtypes``.

    Integers are promoted to the default float (except for ``method="fft"``, which
    raises); ``accumulate_f64`` computes in f64 and returns the input dtype.
    """
    dtype = np.result_type(*dtypes)
    if not jnp.issubdtype(dtype, jnp.floating):  # bfloat16 is not a NumPy floating
        if method == "fft" or not jnp.issubdtype(dtype, jnp.integer):
            raise VSLATypeError(f"{who}(method={method!r}) needs floating data, got {dtype}")
        dtype = np.dtype(jnp.result_type(float))
    dtype = np.dtype(jax.dtypes.canonicalize_dtype(dtype))  # f64 -> f32 unless x64 is on
    out_dtype = dtype
    if accumulate_f64:
        if not jax.config.jax_enable_x64:
            raise VSLATypeError("accumulate_f64 needs jax_enable_x64 (jax.enable_x64(True))")
        dtype = np.dtype(np.float64)
    return dtype, out_dtype


_DTYPE, _NDIM = operator.attrgetter("dtype"), operator.attrgetter("ndim")


def _rank1_arrays(values, what: str) -> tuple[list, set]:
    """``values`` as a list of 1-D numeric arrays, and the set of their dtypes.

    A list of NumPy arrays is checked with a few C-level ``map`` passes; anything else
    goes through ``as_arrays`` (conversion, and its error messages).
    """
    arrays = list(values)
    if set(map(type, arrays)) - {np.ndarray}:
        arrays = as_arrays(arrays, what)
    dtypes = set(map(_DTYPE, arrays))
    if any(d.kind not in "biuf" for d in dtypes):
        arrays = as_arrays(arrays, what)  # raises with the item's index
        dtypes = set(map(_DTYPE, arrays))
    if set(map(_NDIM, arrays)) - {1}:
        bad = next(i for i, a in enumerate(arrays) if a.ndim != 1)
        raise ShapeError(f"conv_packed takes rank-1 items: {what} {bad} has rank "
                         f"{arrays[bad].ndim} (use vs.conv on a stacked batch for higher ranks)")
    return arrays, dtypes
