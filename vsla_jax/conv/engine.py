"""Adaptive convolution engine for ragged batches.

1. ``heterogeneity_profile`` summarises a batch's lengths.
2. Items are grouped by their ``(capacity_a, capacity_b)`` bucket; each group is one
   VarTensor batch (item count padded on ``COUNT_POLICY``) and runs one compiled program.
3. Each group picks ``direct`` or ``fft`` from a ``CostModel``: a linear time model
   ``t = overhead + per_flop * flops`` per method, calibrated once on the running
   machine and cached on disk, or a static fallback.

FFT lengths are chosen per group (smallest 2·3·5·7-smooth size ``>= cap_a + cap_b - 1``),
never from the batch-wide maximum.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vsla_jax.bucketing import RaggedBatch, aligned_empty, pack_group
from vsla_jax.capacity import COUNT_POLICY, DEFAULT_POLICY, CapacityPolicy
from vsla_jax.convolution import direct_flops, fast_fft_length, fft_flops
from vsla_jax.errors import ModelMismatchError, ShapeError, VSLATypeError
from vsla_jax.tensor import VarTensor, _as_array

METHODS = ("auto", "direct", "fft")


# -- cost model -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CostModel:
    """Predicted seconds for one group: ``overhead + per_flop * flops`` per method.

    ``direct`` FLOPs are ``2·items·prod(cap_a)·prod(cap_b)``; ``fft`` FLOPs are the
    nominal ``items·(7.5 N log2 N + 3N)`` of ``convolution.fft_flops``.
    """

    direct_overhead_s: float = 2e-5
    direct_s_per_flop: float = 1.0 / 6e9
    fft_overhead_s: float = 4e-5
    fft_s_per_flop: float = 1.0 / 3e9
    source: str = "static"

    def predict(self, method: str, cap_a, cap_b, items: int) -> float:
        if method == "direct":
            return self.direct_overhead_s + self.direct_s_per_flop * direct_flops(
                cap_a, cap_b, items)
        if method == "fft":
            return self.fft_overhead_s + self.fft_s_per_flop * fft_flops(cap_a, cap_b, items)
        raise ValueError(f"unknown method {method!r}")

    def choose(self, cap_a, cap_b, items: int) -> str:
        """``"direct"`` or ``"fft"``, whichever is predicted faster."""
        d = self.predict("direct", cap_a, cap_b, items)
        f = self.predict("fft", cap_a, cap_b, items)
        return "fft" if f < d else "direct"


STATIC_COST_MODEL = CostModel()


@functools.cache
def _machine_digest() -> str:
    """Hash of jax version, platform and device kind (fixed for the process)."""
    dev = jax.devices()[0]
    key = f"{jax.__version__}|{jax.lib.__version__ if hasattr(jax.lib, '__version__') else ''}"
    key += f"|{dev.platform}|{getattr(dev, 'device_kind', '')}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _cache_path(cache_dir: str | None) -> str:
    digest = _machine_digest()
    base = cache_dir or os.environ.get("VSLA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vsla_jax")
    return os.path.join(base, f"conv_cost_{digest}.json")


def load_calibration(cache_dir: str | None = None) -> CostModel | None:
    """The cached calibration for this machine, or None (missing or corrupt)."""
    return read_cached_model(_cache_path(cache_dir), CostModel, _COEFFS)


def read_cached_model(path: str, cls, coeffs: Sequence[str]):
    """``cls(**coefficients, source="cache:path")`` from a calibration JSON file, or None
    when the file is missing or corrupt (the caller then measures again)."""
    try:
        with open(path) as f:
            d = json.load(f)
        return cls(**{k: float(d[k]) for k in coeffs}, source=f"cache:{path}")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def default_cost_model() -> CostModel:
    """Cached calibration if present, else ``STATIC_COST_MODEL`` (never measures)."""
    return load_calibration() or STATIC_COST_MODEL


_COEFFS = ("direct_overhead_s", "direct_s_per_flop", "fft_overhead_s", "fft_s_per_flop")


def _time_call(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def fit_methods(points: dict[str, list[tuple[float, float]]]) -> tuple[float, ...]:
    """``(direct_overhead, direct_rate, fft_overhead, fft_rate)`` fitted to timed points.

    An FFT convolution runs more operations than a direct one, so a fitted FFT fixed
    cost below the direct one is measurement noise; it would send tiny convolutions to
    the FFT, so it is raised to the direct one.
    """
    d0, d1 = _fit(points["direct"])
    f0, f1 = _fit(points["fft"])
    return d0, d1, max(f0, d0), f1


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares ``t = c0 + c1 * flops`` with both coefficients kept positive."""
    x = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    w = 1.0 / y  # relative error weighting
    a = np.stack([np.ones_like(x), x], 1) * w[:, None]
    c0, c1 = np.linalg.lstsq(a, y * w, rcond=None)[0]
    return max(float(c0), 1e-7), max(float(c1), 1e-14)


CALIBRATION_GRID = ((8, 16, 4), (8, 256, 32), (32, 1024, 64), (64, 256, 256), (16, 2048, 16),
                    (8, 2048, 256))


def calibrate(cache_dir: str | None = None, refresh: bool = False,
              verbose: bool = False) -> CostModel:
    """Measure direct and FFT convolution on this machine once and cache the fit.

    The cache key holds the jax version, platform and device kind. Takes a few seconds
    the first time; afterwards it reads a small JSON file.
    """
    from vsla_jax.ops import conv

    path = _cache_path(cache_dir)
    if not refresh:
        cached = load_calibration(cache_dir)
        if cached is not None:
            return cached  # a missing or corrupt cache is re-measured
    rng = np.random.default_rng(0)
    pts: dict[str, list[tuple[float, float]]] = {"direct": [], "fft": []}
    for items, n, m in CALIBRATION_GRID:
        x = VarTensor(jnp.asarray(rng.standard_normal((items, n)), jnp.float32),
                      jnp.full((items, 1), n, jnp.int32))
        k = VarTensor(jnp.asarray(rng.standard_normal((items, m)), jnp.float32),
                      jnp.full((items, 1), m, jnp.int32))
        for method in ("direct", "fft"):
            t = _time_call(lambda a, b, meth=method: conv(a, b, method=meth), x, k)
            flops = (direct_flops if method == "direct" else fft_flops)((n,), (m,), items)
            pts[method].append((flops, t))
            if verbose:
                print(f"calibrate {method:6s} items={items} n={n} m={m}: {t * 1e3:.3f} ms")
    model = CostModel(*fit_methods(pts), source=f"calibrated:{path}")
    payload = dataclasses.asdict(model) | {"points": pts, "jax": jax.__version__,
                                            "device": str(jax.devices()[0])}
    _atomic_write_json(path, payload)
    return model


def _atomic_write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# -- policy and profile -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ConvPolicy:
    """Thresholds and knobs of the convolution engine (defaults from the VSLA spec).

    Attributes:
      direct_max_min_ratio: max/min length ratio above which ``auto`` prefers direct
        for a batch-wide (unbucketed) decision.
      fft_min_efficiency: predicted FFT speed-up below which FFT is considered doubtful.
      bucketing_min_buckets: a batch spanning more buckets than this is reported as
        needing bucketing (the engine always buckets; the flag is informational).
      calibrate: calibrate the cost model on this machine (cached); else static.
      cache_dir: where the calibration is cached (default: user cache dir).
      capacity: capacity ladder for the items.
      count: ladder for the number of items per group.
      accumulate_f64: compute f32 inputs in f64 (needs ``jax_enable_x64``), return f32.
      uniform_exact_min_items: a group of at least this many items that all share one
        exact shape pair runs at that exact shape and count (no padding at all): a
        uniform batch then costs what a plain single-shape ``jit`` costs.
      merge_groups: merge groups that share a signal capacity into one with the larger
        kernel capacity while the cost model predicts that saves time (fewer, fuller
        programs for very heterogeneous batches).
    """

    direct_max_min_ratio: float = 100.0
    fft_min_efficiency: float = 1.2
    bucketing_min_buckets: int = 10
    calibrate: bool = True
    cache_dir: str | None = None
    capacity: CapacityPolicy = DEFAULT_POLICY
    count: CapacityPolicy = COUNT_POLICY
    accumulate_f64: bool = False
    uniform_exact_min_items: int = 8
    merge_groups: bool = True

    def cost_model(self) -> CostModel:
        return calibrate(self.cache_dir) if self.calibrate else STATIC_COST_MODEL


@dataclasses.dataclass(frozen=True)
class HeterogeneityProfile:
    """Summary of a batch of lengths (``n`` items)."""

    n: int
    max_min_ratio: float
    max_median_ratio: float
    mean_var_ratio: float
    n_buckets: int
    fft_efficiency: float  # predicted time(direct) / time(pad-to-max FFT)
    needs_bucketing: bool
    prefer_direct: bool
    fft_doubtful: bool


def heterogeneity_profile(
    lengths, kernel_lengths=None, policy: ConvPolicy | None = None,
    cost: CostModel | None = None,
) -> HeterogeneityProfile:
    """Profile 1-D item lengths (and optionally kernel lengths) of a ragged batch.

    ``fft_efficiency`` compares the predicted time of exact-size direct convolution of
    every item with one pad-to-max FFT over the whole batch (the archived design);
    values below ``policy.fft_min_efficiency`` mean FFT is doubtful.
    """
    policy = policy or ConvPolicy(calibrate=False)
    cost = cost or STATIC_COST_MODEL
    ln = np.asarray(lengths, np.int64).reshape(-1)
    if ln.size == 0:
        raise ShapeError("heterogeneity_profile needs at least one length")
    if (ln < 0).any():
        raise ShapeError(f"negative lengths in profile: min {ln.min()}")
    kl = np.ones_like(ln) if kernel_lengths is None else np.broadcast_to(
        np.asarray(kernel_lengths, np.int64).reshape(-1), ln.shape)
    pos = ln[ln > 0]
    mx = float(ln.max())
    mn = float(pos.min()) if pos.size else 0.0
    med = float(np.median(ln))
    var = float(ln.var())
    buckets = {policy.capacity.bucket(int(v)) for v in ln}
    t_direct = sum(cost.predict("direct", (int(a),), (int(b),), 1) for a, b in zip(ln, kl))
    t_fft = cost.predict("fft", (int(ln.max()),), (int(kl.max()),), ln.size)
    eff = t_direct / t_fft
    ratio = mx / mn if mn > 0 else float("inf")
    return HeterogeneityProfile(
        n=int(ln.size),
        max_min_ratio=ratio,
        max_median_ratio=mx / med if med > 0 else float("inf"),
        mean_var_ratio=float(ln.mean()) / var if var > 0 else float("inf"),
        n_buckets=len(buckets),
        fft_efficiency=float(eff),
        needs_bucketing=len(buckets) > policy.bucketing_min_buckets,
        prefer_direct=ratio > policy.direct_max_min_ratio,
        fft_doubtful=eff < policy.fft_min_efficiency,
    )


# -- ragged batched convolution ---------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GroupPlan:
    cap_a: tuple[int, ...]
    cap_b: tuple[int, ...]
    members: tuple[int, ...]
    slots: int
    method: str


def plan(shapes_a, shapes_b, method: str, policy: ConvPolicy, cost: CostModel,
         kernel_cap: tuple[int, ...] | None = None) -> list[GroupPlan]:
    """Group items by ``(capacity_a, capacity_b)`` and pick a method per group.

    ``shapes_b`` is None when one kernel of capacity ``kernel_cap`` serves every item.
    """
    sa_arr = np.asarray(shapes_a, np.int64).reshape(len(shapes_a), -1)
    caps_a = policy.capacity.bucket_array(sa_arr)
    if shapes_b is None:
        caps_b = np.broadcast_to(np.asarray(kernel_cap, np.int64), caps_a.shape)
    else:
        caps_b = policy.capacity.bucket_array(np.asarray(shapes_b, np.int64).reshape(
            len(shapes_b), -1))
    keys = np.concatenate([caps_a, caps_b], axis=1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    order = np.argsort(inverse.reshape(-1), kind="stable")
    splits = np.cumsum(np.bincount(inverse.reshape(-1), minlength=len(uniq)))[:-1]
    rank = sa_arr.shape[1]
    groups = {(tuple(int(v) for v in u[:rank]), tuple(int(v) for v in u[rank:])): m.tolist()
              for u, m in zip(uniq, np.split(order, splits))}
    if policy.merge_groups:
        groups = _merge_groups(groups, policy, cost)
    out = []
    for (ca, cb), members in sorted(groups.items()):
        slots = policy.count.bucket(len(members)) if policy.count else len(members)
        if len(members) >= policy.uniform_exact_min_items:
            sa = {tuple(shapes_a[i]) for i in members}
            sb = {tuple(shapes_b[i]) for i in members} if shapes_b is not None else {cb}
            if len(sa) == 1 and len(sb) == 1 and 0 not in next(iter(sa)):
                ca, slots = next(iter(sa)), len(members)
                cb = next(iter(sb)) if shapes_b is not None else cb
        m = cost.choose(ca, cb, slots) if method == "auto" else method
        out.append(GroupPlan(ca, cb, tuple(members), slots, m))
    return out


@functools.lru_cache(maxsize=65536)
def _group_cost(ca, cb, n: int, policy: ConvPolicy, cost: CostModel) -> float:
    slots = policy.count.bucket(n) if policy.count else n
    return min(cost.predict(m, ca, cb, slots) for m in ("direct", "fft"))


def _merge_groups(groups: dict, policy: ConvPolicy, cost: CostModel) -> dict:
    """Greedy merge, per signal capacity, of groups with adjacent kernel capacities."""
    by_a: dict[tuple, list] = {}
    for (ca, cb), members in sorted(groups.items()):
        by_a.setdefault(ca, []).append([cb, list(members)])
    out = {}
    for ca, runs in by_a.items():
        merged = [runs[0]]
        for cb, members in runs[1:]:
            pcb, pmem = merged[-1]
            big = tuple(max(p, q) for p, q in zip(pcb, cb))
            apart = (_group_cost(ca, pcb, len(pmem), policy, cost)
                     + _group_cost(ca, cb, len(members), policy, cost))
            if _group_cost(ca, big, len(pmem) + len(members), policy, cost) < apart:
                merged[-1] = [big, pmem + members]
            else:
                merged.append([cb, members])
        for cb, members in merged:
            out[(ca, cb)] = sorted(members)
    return out


def conv_ragged(
    xs: Sequence[Any] | RaggedBatch,
    ks: Sequence[Any] | Any,
    method: str = "auto",
    policy: ConvPolicy | None = None,
    cost: CostModel | None = None,
    fuse: bool = False,
) -> RaggedBatch:
    """Model A convolution of ragged items, bucket by bucket.

    Args:
      xs: k items (arrays of equal rank; trailing axes beyond ``rank`` are not
        supported here — use ``vsla_jax.conv`` for feature axes).
      ks: k kernels (one per item), or a single kernel (array or unbatched VarTensor)
        broadcast to every item.
      method: ``"auto"`` (cost model per group), ``"direct"`` or ``"fft"``.
      policy: a ``ConvPolicy``; ``cost``: override the cost model.
      fuse: run all groups in one compiled program (one dispatch). Compiles once per
        *set* of group shapes: best when the same batch profile repeats (epochs over a
        fixed dataset); for a stream of new batches keep the default, which compiles
        once per group shape and reuses it across batches.

    Returns:
      A ``RaggedBatch`` of outputs in the original order (``.to_list()``).
    """
    from vsla_jax.ops import conv

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    policy = policy or ConvPolicy()
    items = xs.to_list() if isinstance(xs, RaggedBatch) else _as_arrays(xs, "item")
    if not items:
        return RaggedBatch((), (), 0)
    rank = items[0].ndim
    if any(x.ndim != rank for x in items):
        i = next(i for i, x in enumerate(items) if x.ndim != rank)
        raise ShapeError(f"ragged ranks: item {i} has rank {items[i].ndim}, item 0 has {rank}")
    broadcast = isinstance(ks, VarTensor) or (
        not isinstance(ks, (list, tuple)) and np.ndim(ks) == rank)
    if broadcast:
        kernel = ks.to_numpy() if isinstance(ks, VarTensor) else _as_array(ks, "kernel")
        if isinstance(ks, VarTensor) and ks.model != "A":
            raise ModelMismatchError("conv_ragged: kernel uses model 'B'; convolution is model A")
        kernels = None
    else:
        kernels = _as_arrays(ks, "kernel")
        if len(kernels) != len(items):
            raise ShapeError(
                f"kernel batch of {len(kernels)} does not broadcast to {len(items)} items")
        if any(k.ndim != rank for k in kernels):
            i = next(i for i, k in enumerate(kernels) if k.ndim != rank)
            raise ShapeError(f"kernel {i} has rank {kernels[i].ndim}, items have rank {rank}")
    dts = {x.dtype for x in items} | ({kernel.dtype} if broadcast else {k.dtype for k in kernels})
    dtype, out_dtype = compute_dtype(dts, method, policy, "conv_ragged")
    if broadcast:
        kcap = policy.capacity.capacity(kernel.shape)
        kvt = VarTensor(*pack_group([kernel], [0], 1, kcap, dtype))
        kvt = VarTensor(kvt.data[0], kvt.lengths[0])
    cost = cost or (policy.cost_model() if method == "auto" else STATIC_COST_MODEL)
    shapes_b = None if broadcast else [k.shape for k in kernels]
    if fuse:  # the fused program is specialised on this batch anyway: no count padding
        policy = dataclasses.replace(policy, count=None)
    if fuse and rank == 1 and not broadcast:
        plans, outs = _fused_flat(items, kernels, method, policy, cost, dtype)
    else:
        plans = plan([x.shape for x in items], shapes_b, method, policy, cost,
                     kernel_cap=kvt.capacity if broadcast else None)
        methods = tuple(g.method for g in plans)
        xs_g, ks_g = [], []
        for g in plans:
            xs_g.append(VarTensor(*pack_group(items, g.members, g.slots, g.cap_a, dtype)))
            ks_g.append(kvt if broadcast else VarTensor(
                *pack_group(kernels, g.members, g.slots, g.cap_b, dtype)))
        if fuse:
            outs = _run_fused(tuple(xs_g), tuple(ks_g), methods)
        else:
            outs = [conv(x, k, method=m) for x, k, m in zip(xs_g, ks_g, methods)]
    buckets = tuple(
        y if y.dtype == out_dtype else VarTensor(y.data.astype(out_dtype), y.lengths, y.model)
        for y in outs)
    index = tuple(np.asarray(list(g.members) + [-1] * (g.slots - len(g.members)), np.int32)
                  for g in plans)
    return RaggedBatch(buckets, index, len(items))


def compute_dtype(dtypes, method: str, policy: ConvPolicy, who: str) -> tuple[np.dtype, np.dtype]:
    """``(compute dtype, output dtype)`` for operands of ``dtypes``.

    Integers are promoted to the default float (except for ``method="fft"``, which
    raises); ``policy.accumulate_f64`` computes in f64 and returns the input dtype.
    """
    dtype = np.result_type(*dtypes)
    if not np.issubdtype(dtype, np.floating):
        if method == "fft" or not np.issubdtype(dtype, np.integer):
            raise VSLATypeError(f"{who}(method={method!r}) needs floating data, got {dtype}")
        dtype = np.dtype(jnp.result_type(float))
    dtype = np.dtype(jax.dtypes.canonicalize_dtype(dtype))  # f64 -> f32 unless x64 is on
    out_dtype = dtype
    if policy.accumulate_f64:
        if not jax.config.jax_enable_x64:
            raise VSLATypeError("accumulate_f64 needs jax_enable_x64 (jax.enable_x64(True))")
        dtype = np.dtype(np.float64)
    return dtype, out_dtype


def _as_arrays(values, what: str) -> list:
    """``_as_array`` over a sequence, skipping the per-item call for numeric NumPy arrays."""
    return [v if type(v) is np.ndarray and v.dtype.kind in "biuf" else _as_array(v, f"{what} {i}")
            for i, v in enumerate(values)]


def _plan_flat(la: np.ndarray, lb: np.ndarray, method: str, policy: ConvPolicy,
               cost: CostModel) -> list[GroupPlan]:
    """``plan`` for the rank-1 fused path, vectorised over items.

    Groups by ladder capacities and merges like ``plan`` (no count padding: the fused
    program is specialised on this batch), then shrinks each group's capacities to its
    longest member (``max(len, 1)``): the compiled program is exact for the batch, so
    ladder slack would only be padded work.
    """
    ca_all = policy.capacity.bucket_array(la)
    cb_all = policy.capacity.bucket_array(lb)
    key = ca_all * (int(cb_all.max()) + 1) + cb_all
    uniq, first, inverse, counts = np.unique(key, return_index=True, return_inverse=True,
                                             return_counts=True)
    gid = (_merge_keys(ca_all[first].tolist(), cb_all[first].tolist(), counts.tolist(), cost)
           if policy.merge_groups else np.arange(len(uniq)))
    item_gid = gid[inverse.reshape(-1)]
    order = np.argsort(item_gid, kind="stable")
    n_groups = int(gid.max()) + 1
    bounds = np.concatenate([[0], np.cumsum(np.bincount(item_gid, minlength=n_groups))])
    max_a = np.maximum(np.maximum.reduceat(la[order], bounds[:-1]), 1)
    max_b = np.maximum(np.maximum.reduceat(lb[order], bounds[:-1]), 1)
    sizes = np.diff(bounds)
    if method == "auto":
        d, f = _vector_costs(cost, max_a, max_b, sizes)
        methods = np.where(f < d, "fft", "direct").tolist()
    else:
        methods = [method] * n_groups
    members_all, bl = order.tolist(), bounds.tolist()
    out = [GroupPlan((a,), (b,), tuple(members_all[bl[g] : bl[g + 1]]), sz, m)
           for g, (a, b, sz, m) in enumerate(zip(max_a.tolist(), max_b.tolist(),
                                                 sizes.tolist(), methods))]
    out.sort(key=lambda g: (g.cap_a, g.cap_b))
    return out


def _fft_length_table(upto: int, as_list: bool = False):
    """``fast_fft_length(n)`` for ``n = 0..upto`` (cached, grown by doubling)."""
    global _FFT_TABLE, _FFT_LIST
    if len(_FFT_LIST) <= upto:
        _FFT_LIST = [fast_fft_length(n) for n in range(max(2 * upto, 4096) + 1)]
        _FFT_TABLE = np.array(_FFT_LIST, np.int64)
    return _FFT_LIST if as_list else _FFT_TABLE


_FFT_TABLE, _FFT_LIST = np.zeros(0, np.int64), []


def _vector_costs(cost: CostModel, a, b, n) -> tuple[np.ndarray, np.ndarray]:
    """``CostModel.predict`` of ``direct`` and ``fft`` for rank-1 groups, vectorised."""
    a, b, n = (np.asarray(v, np.float64) for v in (a, b, n))
    fl = _fft_length_table(int(np.max(a + b)))[(a + b - 1).astype(np.int64)].astype(np.float64)
    d = cost.direct_overhead_s + cost.direct_s_per_flop * 2.0 * n * a * b
    f = cost.fft_overhead_s + cost.fft_s_per_flop * n * (
        7.5 * fl * np.maximum(np.log2(fl), 1.0) + 3.0 * fl)
    return d, f


def _merge_keys(ca, cb, counts, cost: CostModel) -> np.ndarray:
    """``_merge_groups`` on sorted unique rank-1 keys with exact counts: group id per key.

    Same greedy rule (merge into the previous group of the same signal capacity while the
    merged group is predicted cheaper than the two apart); the merged candidate's cost
    is computed for each key in one vectorised pass per round of merges.
    """
    ca, cb, counts = (np.asarray(v, np.int64) for v in (ca, cb, counts))
    k = len(ca)
    alone = np.minimum(*_vector_costs(cost, ca, cb, counts))
    gid = np.zeros(k, np.int64)
    ca_l, cb_l, n_l, alone_l = ca.tolist(), cb.tolist(), counts.tolist(), alone.tolist()
    fl_tab = _fft_length_table(int(ca.max() + cb.max()), as_list=True)
    d0, d1 = cost.direct_overhead_s, cost.direct_s_per_flop * 2.0
    f0, f1 = cost.fft_overhead_s, cost.fft_s_per_flop
    g, pa, pb, pn, pc = 0, ca_l[0], cb_l[0], n_l[0], alone_l[0]
    for u in range(1, k):
        a, b, n = ca_l[u], cb_l[u], n_l[u]
        if a == pa:
            big, m = max(pb, b), pn + n
            fl = fl_tab[a + big - 1]
            merged = min(d0 + d1 * m * a * big,
                         f0 + f1 * m * (7.5 * fl * max(math.log2(fl), 1.0) + 3.0 * fl))
            if merged < pc + alone_l[u]:
                pb, pn, pc = big, m, merged
                gid[u] = g
                continue
        g, pa, pb, pn, pc = g + 1, a, b, n, alone_l[u]
        gid[u] = g
    return gid


def _fused_flat(items, kernels, method: str, policy: ConvPolicy, cost: CostModel,
                dtype) -> tuple[list[GroupPlan], tuple[VarTensor, ...]]:
    """Rank-1 fused path with O(1) NumPy calls on the host.

    The host concatenates all signals and then all kernels into one flat buffer (in the
    items' order) and builds one ``int32[4, n]`` table of (start, length) per slot; the
    compiled program gathers each group's padded ``[slots, cap]`` operands from the
    flat buffer and convolves them. Two host-to-device copies in total.
    """
    n = len(items)
    la = np.array(list(map(len, items)), np.int64)
    lb = np.array(list(map(len, kernels)), np.int64)
    plans = _plan_flat(la, lb, method, policy, cost)
    perm = np.fromiter((i for g in plans for i in g.members), np.int64, n)
    ends = np.cumsum(np.concatenate([la, lb]))
    starts = ends - np.concatenate([la, lb])
    table = np.stack([starts[:n][perm], la[perm], starts[n:][perm], lb[perm]]).astype(np.int32)
    flat = _concat(items + kernels, dtype, int(ends[-1]))
    layout, sl = [], 0
    for g in plans:
        layout.append((g.cap_a[0], g.cap_b[0], g.slots, g.method, sl))
        sl += g.slots
    return plans, _run_flat(flat, table, tuple(layout))


def _concat(arrays, dtype, total: int) -> np.ndarray:
    """One flat host buffer of ``arrays`` (at least one element, so gathers stay valid)."""
    if not total:
        return np.zeros(1, dtype)
    # aligned, so XLA:CPU reads the buffer in place instead of copying it
    return np.concatenate(arrays, axis=0, out=aligned_empty(total, dtype), casting="unsafe")


def _gather_padded(flat, starts, cap: int):
    """``[slots, cap]`` rows ``flat[start : start + cap]`` (one XLA gather).

    Elements past an item's length belong to other items; ``conv`` zeroes every
    operand's slack (``zero_slack``) before convolving, so they never contribute.
    """
    idx = jnp.minimum(starts[:, None] + jnp.arange(cap, dtype=jnp.int32), flat.shape[0] - 1)
    return flat[idx]


@functools.partial(jax.jit, static_argnames=("layout",))
def _run_flat(flat, table, layout):
    from vsla_jax.ops import conv

    outs = []
    for ca, cb, slots, method, sl in layout:
        sa, na, sb, nbk = (table[r, sl : sl + slots] for r in range(4))
        x = VarTensor(_gather_padded(flat, sa, ca), na[:, None])
        k = VarTensor(_gather_padded(flat, sb, cb), nbk[:, None])
        outs.append(conv(x, k, method=method))
    return tuple(outs)


@functools.partial(jax.jit, static_argnames=("methods",))
def _run_fused(xs, ks, methods):
    from vsla_jax.ops import conv

    return tuple(conv(x, k, method=m) for x, k, m in zip(xs, ks, methods))
