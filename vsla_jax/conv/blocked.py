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
``BlockCost`` predicts faster. Block and FFT lengths are chosen for the class, never
from the batch-wide maximum.

Layout of the result (``FlatRagged``): one flat array per class; every item's output
lies contiguously in array ``part[i]`` at ``offsets[i]``, with
``lengths[i] = len(x_i) + len(k_i) - 1`` (0 when either operand is empty).

The host plan depends only on the items' lengths. The 64 most recent plans are
cached, so a batch whose lengths repeat (epochs over a fixed dataset) skips planning.
On a hit the host only packs the values (``pack_blocks``: one ``np.concatenate`` and
one ``np.take``). The device program is differentiable with respect to the packed
input (``conv_blocked_values``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vsla_jax.bucketing import aligned_empty
from vsla_jax.conv_engine import (
    METHODS,
    ConvPolicy,
    _as_arrays,
    _atomic_write_json,
    _cache_path,
    _time_call,
    compute_dtype,
    fit_methods,
    read_cached_model,
)
from vsla_jax.convolution import UNROLL, fast_fft_length, fft_flops_at
from vsla_jax.errors import ShapeError

#: Output samples per block for ``direct`` classes.
DIRECT_BLOCK = 256
#: Largest FFT length tried for ``fft`` classes.
MAX_FFT = 16384


@dataclasses.dataclass(frozen=True)
class BlockCost:
    """Predicted seconds of one class: ``overhead + rate * work`` per method.

    ``direct`` work is ``blocks * block * taps`` multiply-adds; ``fft`` work is the
    nominal ``blocks * (3 * 2.5 N log2 N + 3 N)`` FLOPs of two forward and one inverse
    real FFT of length ``N`` plus the product.
    """

    direct_overhead_s: float = 5e-5
    direct_s_per_mac: float = 1.0 / 12e9
    fft_overhead_s: float = 1e-4
    fft_s_per_flop: float = 1.0 / 8e9
    source: str = "static"

    def direct(self, blocks: int, block: int, taps: int) -> float:
        return self.direct_overhead_s + self.direct_s_per_mac * blocks * block * taps

    def fft(self, blocks: int, n_fft: int) -> float:
        return self.fft_overhead_s + self.fft_s_per_flop * fft_flops_at(n_fft, blocks)


STATIC_BLOCK_COST = BlockCost()
_BLOCK_COEFFS = ("direct_overhead_s", "direct_s_per_mac", "fft_overhead_s", "fft_s_per_flop")
#: ``(blocks, block, taps)`` timed for ``direct`` and ``(blocks, N)`` for ``fft``.
BLOCK_CALIBRATION = {"direct": ((128, 256, 8), (128, 256, 32), (128, 256, 128), (64, 256, 256)),
                     "fft": ((128, 64), (128, 256), (128, 512), (64, 1024))}
CALIBRATION_ROUNDS = 15
_MEMO: dict[str, BlockCost] = {}  # calibrations read or measured in this process, by path


def _blocks_cache_path(cache_dir: str | None) -> str:
    head, name = os.path.split(_cache_path(cache_dir))
    return os.path.join(head, name.replace("conv_cost_", "blocks_cost_"))


def calibrate_blocks(cache_dir: str | None = None, refresh: bool = False) -> BlockCost:
    """Time the two class kernels on this machine once and cache the fit (JSON).

    Uses the same cache folder and key (jax version, platform, device kind) as
    ``conv_engine.calibrate``; takes about 1.5 s the first time, then reads the file
    once per process. ``refresh=True`` measures again.
    """
    path = _blocks_cache_path(cache_dir)
    if not refresh and path in _MEMO:
        return _MEMO[path]
    if not refresh:
        model = read_cached_model(path, BlockCost, _BLOCK_COEFFS)
        if model is not None:  # else missing or corrupt: measure again
            _MEMO[path] = model
            return model
    rng = np.random.default_rng(0)
    shapes = [("direct", b, p, s, 0) for b, p, s in BLOCK_CALIBRATION["direct"]] + [
        ("fft", b, n - n // 4 + 1, n // 4, n) for b, n in BLOCK_CALIBRATION["fft"]]
    calls = []
    for meth, blocks, block, taps, n_fft in shapes:
        c = ClassLayout(meth, taps, block, n_fft, blocks, 1, 0)
        packed = jnp.asarray(rng.standard_normal(blocks * (block + taps)), jnp.float32)
        first = jnp.asarray(np.arange(blocks) % 4 == 0)
        fn = jax.jit(functools.partial(_class_conv, c=c))
        work = blocks * block * taps if meth == "direct" else fft_flops_at(n_fft, blocks)
        calls.append((meth, float(work), fn, packed, first))
    # interleaved rounds, best per shape: the drift of a shared machine hits every
    # shape alike instead of biasing one method against the other
    best = [math.inf] * len(calls)
    for _ in range(CALIBRATION_ROUNDS):
        best = [min(b, _time_call(fn, packed, first, repeats=1))
                for b, (_, _, fn, packed, first) in zip(best, calls)]
    pts: dict[str, list] = {"direct": [], "fft": []}
    for (meth, work, *_), t in zip(calls, best):
        pts[meth].append((work, t))
    model = BlockCost(*fit_methods(pts), source=f"calibrated:{path}")
    _atomic_write_json(path, dataclasses.asdict(model) | {"points": pts,
                                                          "jax": jax.__version__})
    _MEMO[path] = model
    return model


def block_cost_model(policy: ConvPolicy) -> BlockCost:
    """The calibrated ``BlockCost`` if ``policy.calibrate``, else the static one."""
    return calibrate_blocks(policy.cache_dir) if policy.calibrate else STATIC_BLOCK_COST


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
      fft_length: ``N = P + S - 1`` for ``fft`` classes (a fast FFT size), else 0.
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


def _fft_choice(out_len: np.ndarray, taps: int, cost: BlockCost) -> tuple[float, int, int]:
    """Cheapest ``(seconds, N, blocks)`` over fast FFT lengths ``N >= 2 * taps``."""
    best = (math.inf, 0, 0)
    n = fast_fft_length(max(2 * taps, 64))
    while n <= max(MAX_FFT, fast_fft_length(2 * taps)):
        blocks = int((-(-out_len // (n - taps + 1))).sum())
        t = cost.fft(blocks, n)
        if t < best[0]:
            best = (t, n, blocks)
        n = fast_fft_length(int(n * 1.25) + 1)
    return best


def _class_method(out_len, taps: int, method: str, cost: BlockCost) -> tuple[str, int, int, int]:
    """``(method, block, fft_length, blocks)`` for one class."""
    block = max(DIRECT_BLOCK, taps)  # the halo of a block must fit in the previous block
    d_blocks = int((-(-out_len // block)).sum())
    if method == "direct":
        return "direct", block, 0, d_blocks
    t_fft, n_fft, f_blocks = _fft_choice(out_len, taps, cost)
    t_direct = cost.direct(d_blocks, block, -(-taps // UNROLL) * UNROLL)
    if method == "fft" or t_fft < t_direct:
        return "fft", n_fft - taps + 1, n_fft, f_blocks
    return "direct", block, 0, d_blocks


def plan_blocks(len_a, len_b, method: str = "auto", cost: BlockCost | None = None) -> BlockPlan:
    """Host plan for signals of lengths ``len_a`` and kernels of lengths ``len_b``.

    Vectorised NumPy: O(classes) Python steps, not O(items).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    cost = cost or STATIC_BLOCK_COST
    la = np.asarray(len_a, np.int64).reshape(-1)
    lb = np.asarray(len_b, np.int64).reshape(-1)
    swap = lb > la
    long_len, short_len = np.maximum(la, lb), np.minimum(la, lb)
    out_len = np.where(short_len > 0, long_len + short_len - 1, 0)
    # octave classes of the short length: 1-8 -> 0, 9-16 -> 1, 17-32 -> 2, ...
    cls = np.where(out_len > 0, np.maximum(
        np.ceil(np.log2(np.maximum(short_len, 1))).astype(np.int64) - 3, 0), -1)
    starts = np.concatenate([[0], np.cumsum(np.concatenate([la, lb]))]).astype(np.int64)
    zero = int(starts[-1])  # index of the trailing zero of the flat input
    long_at = np.where(swap, starts[la.size : -1], starts[: la.size])
    short_at = np.where(swap, starts[: la.size], starts[la.size : -1])
    layout, members, first, source = [], [], [], []
    offsets = np.zeros(la.size, np.int64)
    part = np.full(la.size, -1, np.int64)
    data_at = 0
    for c in np.unique(cls[cls >= 0]).tolist():
        mem = np.flatnonzero(cls == c)
        taps = int(short_len[mem].max())
        meth, block, n_fft, blocks = _class_method(out_len[mem], taps, method, cost)
        nb = -(-out_len[mem] // block)
        first_block = np.concatenate([[0], np.cumsum(nb)[:-1]])
        is_first = np.zeros(blocks, bool)
        is_first[first_block] = True
        first.append(is_first)
        # long operands, blocked: [blocks * block] values
        local = np.arange(blocks * block) - np.repeat(first_block * block, nb * block)
        source.append(np.where(local < np.repeat(long_len[mem], nb * block),
                               np.repeat(long_at[mem], nb * block) + local, zero))
        # every block's copy of its item's short operand: [blocks, taps]
        j = np.arange(taps)
        source.append(np.where(j < np.repeat(short_len[mem], nb)[:, None],
                               np.repeat(short_at[mem], nb)[:, None] + j, zero).reshape(-1))
        offsets[mem] = first_block * block
        part[mem] = len(layout)
        members.append(mem)
        layout.append(ClassLayout(meth, taps, block, n_fft, blocks, mem.size, data_at))
        data_at += blocks * (block + taps)
    cat = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt)
    return BlockPlan(tuple(layout), tuple(members), swap, cat(first, bool),
                     cat(source, np.int64), part, offsets, out_len, data_at)


@functools.lru_cache(maxsize=64)
def _cached_plan(key_a: bytes, key_b: bytes, method: str, cost: BlockCost):
    plan = plan_blocks(np.frombuffer(key_a, np.int64), np.frombuffer(key_b, np.int64),
                       method, cost)
    return plan, jax.device_put(plan.first)


def pack_blocks(plan: BlockPlan, xs: Sequence[np.ndarray], ks: Sequence[np.ndarray],
                dtype) -> np.ndarray:
    """The packed ``[plan.total_in]`` host input of ``conv_blocked_values``.

    Per class: every item's longer operand, zero-padded to its blocks
    (``[blocks, block]`` row-major), then every block's copy of its item's shorter
    operand, zero-padded to ``taps`` (``[blocks, taps]``). One ``np.concatenate`` and
    one ``np.take`` with the plan's ``source`` index.
    """
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
        y = jnp.fft.irfft(jnp.fft.rfft(x, c.fft_length) * jnp.fft.rfft(w, c.fft_length),
                          c.fft_length)
        return y[:, s - 1 :]
    return _shift_add_valid(x, w, p)


def _shift_add_valid(x, w, block: int):
    """``y[:, p] = sum_j w[:, j] * x[:, p + S - 1 - j]`` for ``p < block`` (8 taps per pass)."""
    s = w.shape[1]
    unroll = min(UNROLL, s)
    n_iter = -(-s // unroll)
    extra = n_iter * unroll - s  # zero taps that pad the last pass
    if extra:
        w = jnp.pad(w, ((0, 0), (0, extra)))
        x = jnp.pad(x, ((0, 0), (extra, 0)))

    def body(i, acc):
        for u in range(unroll):
            j = i * unroll + u
            tap = jax.lax.dynamic_slice_in_dim(w, j, 1, axis=1)
            acc = acc + tap * jax.lax.dynamic_slice_in_dim(x, extra + s - 1 - j, block, axis=1)
        return acc

    acc = jnp.zeros((x.shape[0], block), jnp.result_type(x.dtype, w.dtype))
    if n_iter == 1:
        return body(0, acc)
    return jax.lax.fori_loop(0, n_iter, body, acc)


@functools.partial(jax.jit, static_argnames=("layout",))
def conv_blocked_values(packed: jax.Array, first: jax.Array,
                        layout: tuple[ClassLayout, ...]) -> tuple[jax.Array, ...]:
    """Device part of ``conv_blocked``: packed inputs -> per-class flat outputs.

    Differentiable with respect to ``packed``. The classes stay separate arrays:
    joining them would cost one more copy of every output (measured about 0.2 ms of
    1.3 ms on the heterogeneous benchmark batch).

    Args:
      packed: ``[plan.total_in]`` from ``pack_blocks``.
      first: ``bool[blocks]``, the plan's ``first``.
      layout: the plan's static ``layout``.

    Returns:
      One ``[blocks * block]`` array per class; item ``i`` at ``plan.offsets[i]`` of
      array ``plan.part[i]``.
    """
    outs, at = [], 0
    for c in layout:
        outs.append(_class_conv(packed, first[at : at + c.blocks], c).reshape(-1))
        at += c.blocks
    return tuple(outs)


def conv_blocked(
    xs: Sequence[Any],
    ks: Sequence[Any],
    method: str = "auto",
    policy: ConvPolicy | None = None,
    cost: BlockCost | None = None,
) -> FlatRagged:
    """Model A (full) convolution of ragged rank-1 items, ``xs[i] * ks[i]``.

    Args:
      xs: ``n`` 1-D arrays (NumPy, JAX or nested lists), any lengths including 0.
      ks: ``n`` 1-D kernels, one per item.
      method: ``"auto"`` (cost model per class), ``"direct"`` or ``"fft"``.
      policy: a ``ConvPolicy`` (``calibrate``: time the class kernels once on this
        machine and cache the fit; ``accumulate_f64``).
      cost: override the class cost model (``BlockCost``).

    Returns:
      A ``FlatRagged`` of the ``n`` outputs, in input order, in the inputs' dtype.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    policy = policy or ConvPolicy()
    items, dts_a = _rank1_arrays(xs, "item")
    kernels, dts_b = _rank1_arrays(ks, "kernel")
    if len(kernels) != len(items):
        raise ShapeError(f"conv_blocked: {len(kernels)} kernels for {len(items)} items "
                         "(one kernel per item)")
    dtype, out_dtype = compute_dtype(dts_a | dts_b or {np.float32}, method, policy,
                                     "conv_blocked")
    cost = cost or (block_cost_model(policy) if method == "auto" else STATIC_BLOCK_COST)
    la = np.fromiter(map(len, items), np.int64, len(items))
    lb = np.fromiter(map(len, kernels), np.int64, len(kernels))
    plan, first = _cached_plan(la.tobytes(), lb.tobytes(), method, cost)
    values = conv_blocked_values(pack_blocks(plan, items, kernels, dtype), first, plan.layout)
    if dtype != out_dtype:
        values = tuple(v.astype(out_dtype) for v in values)
    return FlatRagged(values, plan.part, plan.offsets, plan.lengths)


_DTYPE, _NDIM = operator.attrgetter("dtype"), operator.attrgetter("ndim")


def _rank1_arrays(values, what: str) -> tuple[list, set]:
    """``values`` as a list of 1-D numeric arrays, and the set of their dtypes.

    A list of NumPy arrays is checked with a few C-level ``map`` passes; anything else
    goes through ``_as_arrays`` (conversion, and its error messages).
    """
    arrays = list(values)
    if set(map(type, arrays)) - {np.ndarray}:
        arrays = _as_arrays(arrays, what)
    dtypes = set(map(_DTYPE, arrays))
    if any(d.kind not in "biuf" for d in dtypes):
        arrays = _as_arrays(arrays, what)  # raises with the item's index
        dtypes = set(map(_DTYPE, arrays))
    if set(map(_NDIM, arrays)) - {1}:
        bad = next(i for i, a in enumerate(arrays) if a.ndim != 1)
        raise ShapeError(f"conv_blocked takes rank-1 items: {what} {bad} has rank "
                         f"{arrays[bad].ndim} (use conv_ragged for higher ranks)")
    return arrays, dtypes
