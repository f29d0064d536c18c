"""The convolution engine: ``vs.conv``'s front door, policy and length profile.

``conv(a, b)`` on batches with concrete lengths profiles the lengths and prices three
plans with the one ``CostModel``:

- ``padded``: the operands at their own capacities (no host work; what a uniform
  batch wants);
- ``bucketed``: items grouped by ``(capacity_a, capacity_b)`` bucket, gathered from the
  padded batch and scattered back, one compiled program (any rank and features);
- ``blocked``: rank-1 items cut into overlap-save blocks in octave classes of the
  shorter operand (no features), gathered into the padded output.

and runs the cheapest, choosing ``direct`` or ``fft`` per group or class. Every plan
returns a ``VarTensor`` of capacity ``cap_a + cap_b - 1``. Under ``jit`` with traced
lengths only ``padded`` is possible, and it is what runs. Plans depend on the lengths
only, and the most recent ones are cached.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os

import jax
import jax.numpy as jnp
import numpy as np

from vsla_jax.capacity import COUNT_POLICY, DEFAULT_POLICY, CapacityPolicy
from vsla_jax.conv import blocked, bucketed, cpu
from vsla_jax.conv.cost import STATIC_COST_MODEL, CostModel, calibrate, calibrated_or_none
from vsla_jax.conv.kernels import conv_output_lengths
from vsla_jax.conv.padded import all_finite, check_dtypes, conv_arrays, conv_padded
from vsla_jax.errors import LengthError, PolicyError, ShapeError, VSLATypeError
from vsla_jax.tensor import VarTensor, check_pair, zero_slack
from vsla_jax.util import is_traced

METHODS = ("auto", "direct", "fft")
PLANS = ("auto", "padded", "bucketed", "blocked")


class LayoutBudget:
    """How many bucketed/blocked program layouts ``auto`` may compile per family.

    A family is one pair of operand capacities, batch sizes and features (what the
    padded plan compiles one program for). The bucketed and blocked programs are
    specialised on a plan's static layout (laddered group counts, class taps and block
    counts), so a stream of ever new length profiles could compile a new program per
    batch. Once a family has compiled ``max_layouts`` layouts, ``auto`` only picks plans
    whose layout is already compiled, or the padded plan. Forced plans
    (``ConvPolicy(plan=...)``) ignore the budget. This is a record of what was compiled
    (like ``jit``'s own cache), shared by every policy that holds the same instance.
    """

    def __init__(self, max_layouts: int = 8):
        if isinstance(max_layouts, bool) or not isinstance(max_layouts, numbers.Integral):
            raise VSLATypeError(f"LayoutBudget max_layouts must be an integer >= 0, got "
                                f"{type(max_layouts).__name__} {max_layouts!r:.40}")
        if max_layouts < 0:
            raise PolicyError(f"LayoutBudget max_layouts must be >= 0, got {max_layouts}")
        self.max_layouts = max_layouts
        self.compiled: dict[tuple, set] = {}

    def allows(self, family: tuple, layout: tuple) -> bool:
        seen = self.compiled.get(family, set())
        return layout in seen or len(seen) < self.max_layouts

    def record(self, family: tuple, layout: tuple) -> None:
        self.compiled.setdefault(family, set()).add(layout)


DEFAULT_LAYOUT_BUDGET = LayoutBudget()


#: The type each ConvPolicy field must have (plan and pallas are checked by value).
POLICY_FIELD_TYPES = {
    "calibrate": (bool,), "cache_dir": (str, os.PathLike, type(None)),
    "cost": (CostModel, type(None)), "capacity": (CapacityPolicy,),
    "count": (CapacityPolicy, type(None)), "merge_groups": (bool,),
    "accumulate_f64": (bool,), "cpu_kernels": (bool,), "layouts": (LayoutBudget,),
    "direct_max_min_ratio": (numbers.Real,), "fft_min_efficiency": (numbers.Real,),
    "bucketing_min_buckets": (numbers.Integral,),
}


@dataclasses.dataclass(frozen=True)
class ConvPolicy:
    """Settings of the convolution engine (every field is reachable from ``vs.conv``).

    Attributes:
      plan: ``"auto"`` (cheapest by the cost model), ``"padded"``, ``"bucketed"`` or
        ``"blocked"`` (rank-1 batches without features only).
      calibrate: fit the cost model to this machine lazily, on the first eager call
        (about 1-2 s once per process; never while ``jit`` traces). ``False``: the
        static model.
      cache_dir: folder where the fit is stored as JSON and read by later processes
        (default ``$VSLA_CACHE_DIR``; with neither, nothing is written).
      cost: an explicit ``CostModel`` (overrides ``calibrate``).
      capacity: capacity ladder of the bucketed plan's groups.
      count: ladder for the number of items per bucketed group (None: exact counts).
      merge_groups: merge neighbouring bucketed groups while the cost model predicts
        a saving.
      accumulate_f64: compute f32 inputs in f64 (needs ``jax_enable_x64``), return f32.
      cpu_kernels: with ``plan="auto"`` and ``method="auto"``, run rank-1 batches
        through the C++ direct kernels on CPU (``conv.cpu.ragged_conv``: one custom call
        per batch, forward and backward; exact on non-finite values); the XLA engine
        where they cannot run. The kernels differentiate in every mode (JAX
        primitives with JVP and transpose rules; docs/kernels.md, "Gradients").
      pallas: ``"auto"`` (the Pallas kernel for rank-1 direct convolution on GPU),
        ``"off"`` or ``"interpret"`` (the Pallas interpreter, for CPU tests).
      layouts: the ``LayoutBudget`` that bounds how many bucketed/blocked programs
        ``auto`` compiles per capacity family (shared by default).
      direct_max_min_ratio, fft_min_efficiency, bucketing_min_buckets: thresholds of
        ``heterogeneity_profile`` (informational flags).
    """

    plan: str = "auto"
    calibrate: bool = True
    cache_dir: str | None = None
    cost: CostModel | None = None
    capacity: CapacityPolicy = DEFAULT_POLICY
    count: CapacityPolicy | None = COUNT_POLICY
    merge_groups: bool = True
    accumulate_f64: bool = False
    pallas: str = "auto"
    cpu_kernels: bool = True
    layouts: LayoutBudget = dataclasses.field(default=DEFAULT_LAYOUT_BUDGET, compare=False,
                                              hash=False)
    direct_max_min_ratio: float = 100.0
    fft_min_efficiency: float = 1.2
    bucketing_min_buckets: int = 10

    def __post_init__(self):
        if not isinstance(self.plan, str) or self.plan not in PLANS:
            raise PolicyError(f"ConvPolicy plan must be one of {PLANS}, got {self.plan!r}")
        if not isinstance(self.pallas, str) or self.pallas not in ("auto", "off", "interpret"):
            raise PolicyError(f"ConvPolicy pallas must be 'auto', 'off' or 'interpret', got "
                              f"{self.pallas!r}")
        for name, types in POLICY_FIELD_TYPES.items():
            v = getattr(self, name)
            if not isinstance(v, types) or (bool not in types and isinstance(v, bool)):
                want = " or ".join("None" if t is type(None) else t.__name__ for t in types)
                raise VSLATypeError(f"ConvPolicy {name} must be {want}, got "
                                    f"{type(v).__name__} {v!r:.40}")
        for name in ("direct_max_min_ratio", "fft_min_efficiency", "bucketing_min_buckets"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise PolicyError(f"ConvPolicy {name} must be a finite number > 0, got {v!r}")

    def cost_model(self, may_measure: bool = True) -> CostModel:
        """The model to plan with: ``cost``, else the fit (measured only if
        ``may_measure`` and ``calibrate``), else the static model."""
        if self.cost is not None:
            return self.cost
        if not self.calibrate:
            return STATIC_COST_MODEL
        if may_measure:
            return calibrate(self.cache_dir)
        return calibrated_or_none(self.cache_dir) or STATIC_COST_MODEL

    def pallas_mode(self, rank: int) -> str | None:
        """One of ``PALLAS_MODES`` for a direct convolution of this rank."""
        if rank != 1 or self.pallas == "off":
            return None
        if self.pallas == "interpret":
            return "interpret"
        return "gpu" if jax.default_backend() == "gpu" else None


DEFAULT_CONV_POLICY = ConvPolicy()


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
    cost = cost or policy.cost or STATIC_COST_MODEL
    ln = np.asarray(lengths, np.int64).reshape(-1)
    if ln.size == 0:
        raise ShapeError("heterogeneity_profile needs at least one length")
    if (ln < 0).any():
        raise LengthError(f"heterogeneity_profile: negative lengths, min {ln.min()}")
    kl = np.ones_like(ln)
    if kernel_lengths is not None:
        kl = np.asarray(kernel_lengths, np.int64).reshape(-1)
        if kl.size not in (1, ln.size):
            raise ShapeError(f"heterogeneity_profile: {kl.size} kernel lengths for "
                             f"{ln.size} lengths (give one, or one per item)")
        if (kl < 0).any():
            raise LengthError(f"heterogeneity_profile: negative kernel lengths, min "
                              f"{kl.min()}")
        kl = np.broadcast_to(kl, ln.shape)
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



# -- the front door -----------------------------------------------------------------------
def conv(a: VarTensor, b: VarTensor, method: str = "auto",
         policy: ConvPolicy | None = None) -> VarTensor:
    """Model A product: full linear convolution over the variable axes, per item.

    ``[1, 2] * [3, 4] = [3, 10, 8]``. Batch shapes broadcast (one kernel may serve a
    whole batch); feature axes are convolved channel by channel (depthwise). Output
    capacity is ``cap_a + cap_b - 1`` per axis, whatever the plan.

    Args:
      a, b: VarTensors of one model ``"A"``, equal rank and features.
      method: ``"auto"`` (the cost model picks per group or class), ``"direct"``
        (shift-and-add; exact on ``inf``/``nan`` like NumPy) or ``"fft"`` (a
        non-finite value spreads through its item; ``auto`` avoids FFT then).
      policy: a ``ConvPolicy`` (plan, calibration, ladders, Pallas, precision).

    With concrete lengths the engine plans on the host (see the module docstring);
    under ``jit`` with traced lengths it runs the padded plan. Differentiable with
    respect to the data on every plan.
    """
    if method == "auto" and policy is None:  # the common call: one cached check
        out = cpu.concrete_conv(a, b)
        if out is not None:
            return out
    a, b = check_pair(a, b, "conv")
    if method not in METHODS:
        raise ValueError(f"conv method must be one of {METHODS}, got {method!r}")
    if policy is None:
        policy = DEFAULT_CONV_POLICY
    elif not isinstance(policy, ConvPolicy):
        raise VSLATypeError(f"conv: policy must be a vs.ConvPolicy or None, got "
                            f"{type(policy).__name__} {policy!r:.40}")
    check_dtypes(a, b, method)
    out_dtype = a.dtype if a.dtype == b.dtype else jnp.result_type(a.dtype, b.dtype)
    if policy.accumulate_f64:
        if not jax.config.jax_enable_x64:
            raise VSLATypeError("accumulate_f64 needs jax_enable_x64 (jax.enable_x64(True))")
        a, b = _as_dtype(a, jnp.float64), _as_dtype(b, jnp.float64)
    elif out_dtype in HALF_FLOATS:
        a, b = _as_dtype(a, jnp.float32), _as_dtype(b, jnp.float32)  # sums of halves in f32
    out = None
    if policy.cpu_kernels and policy.plan == "auto" and method == "auto":
        out = cpu.ragged_conv_checked(a, b)
    if out is None:
        out = _dispatch(a, b, method, policy)
    if out.dtype != out_dtype:
        out = VarTensor.trusted(out.data.astype(out_dtype), out.lengths, out.model)
    return out


#: Storage dtypes whose convolutions sum in float32.
HALF_FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _as_dtype(x: VarTensor, dtype) -> VarTensor:
    """``x`` with its data in ``dtype`` (lengths, and their host copy, kept)."""
    return VarTensor.trusted(x.data.astype(dtype), x.lengths, x.model, x.lengths_checked,
                             x.host_lengths)


def choose_plan(a: VarTensor, b: VarTensor, method: str = "auto",
                policy: ConvPolicy | None = None) -> tuple[str, dict[str, float]]:
    """The plan ``conv(a, b)`` runs, and the predicted seconds of each candidate.

    ``padded`` whenever the lengths are traced or the operands are not one batch axis
    of items (then the dict is empty).
    """
    a, b = _one_item_first(a, b)
    choice, costs, _ = _choose(a, b, method, policy or DEFAULT_CONV_POLICY)
    return choice, costs


def _choose(a: VarTensor, b: VarTensor, method: str, policy: ConvPolicy):
    """``(plan, predicted seconds per candidate, plan key or None)``."""
    concrete = a.host_lengths is not None and b.host_lengths is not None
    # one batch axis that b does not widen (b unbatched or alike; else the padded plan
    # broadcasts)
    one_axis = a.batch_ndim == 1 and b.batch_shape in ((), a.batch_shape)
    if not (concrete and one_axis) or policy.plan == "padded":
        if policy.plan not in ("auto", "padded"):
            raise ShapeError(
                f"ConvPolicy(plan={policy.plan!r}) needs concrete lengths and a batch "
                f"with one batch axis (b unbatched or alike); got batch shapes "
                f"{a.batch_shape} and {b.batch_shape}" + ("" if concrete else
                                                          ", traced lengths"))
        return "padded", {}, None
    if policy.plan == "blocked" and not (a.rank == 1 and not a.features):
        raise ShapeError(f"ConvPolicy(plan='blocked') takes rank-1 items without feature "
                         f"axes; got rank {a.rank}, features {a.features}")
    if a.batch_shape[0] == 0 or not (np.prod(a.capacity) and np.prod(b.capacity)):
        return "padded", {}, None  # nothing to plan: no items, or a zero capacity
    key, cost = _plan_key(a, b, method, policy)
    n, feat = a.batch_shape[0], key[6]
    m = cost.choose(a.capacity, b.capacity, n * feat)
    costs = {"padded": cost.predict(m, a.capacity, b.capacity, n * feat),
             "bucketed": _bucketed_plan(*key)[1]}
    if a.rank == 1 and not a.features:
        costs["blocked"] = _blocked_plan(*key[:9])[1]
    if policy.plan != "auto":
        return policy.plan, costs, key
    family = _family(a, b)
    allowed = {p: t for p, t in costs.items()
               if p == "padded" or policy.layouts.allows(family, _layout(p, key))}
    return min(allowed, key=allowed.get), costs, key


def _family(a: VarTensor, b: VarTensor) -> tuple:
    return (a.capacity, b.capacity, a.batch_shape, b.batch_shape, a.features, str(a.dtype),
            str(b.dtype))


def _layout(plan: str, key: tuple) -> tuple:
    """The static part of a plan's program (what its compilation depends on)."""
    if plan == "bucketed":
        (layout, idx), _ = _bucketed_plan(*key)
        return plan, layout, tuple(i.shape for i in idx)
    dev, _ = _blocked_plan(*key[:9])
    return plan, dev[-1], dev[0].shape


def _plan_key(a: VarTensor, b: VarTensor, method: str, policy: ConvPolicy):
    cost = policy.cost_model(may_measure=not (is_traced(a.data) or is_traced(b.data)))
    la, lb = np.asarray(a.host_lengths, np.int32), np.asarray(b.host_lengths, np.int32)
    feat = max(int(np.prod(a.features)), 1)
    return (la.tobytes(), lb.tobytes(), la.shape, lb.shape, a.capacity, b.capacity, feat,
            method, cost, policy.capacity, policy.count, policy.merge_groups), cost


def _one_item_first(a: VarTensor, b: VarTensor) -> tuple[VarTensor, VarTensor]:
    """A one-item batch ``(1,)`` against ``(n,)`` as an unbatched operand, second (the
    planned paths take ``b`` unbatched or alike; conv commutes)."""
    if a.batch_shape == (1,) and b.batch_ndim == 1 and b.batch_shape != (1,):
        a, b = b, a
    if b.batch_shape == (1,) and a.batch_ndim == 1 and a.batch_shape != (1,):
        host = b.host_lengths
        b = VarTensor.trusted(b.data[0], b.lengths[0], b.model,
                              host_lengths=None if host is None else host[0].copy())
    return a, b


def _dispatch(a: VarTensor, b: VarTensor, method: str, policy: ConvPolicy) -> VarTensor:
    a, b = _one_item_first(a, b)
    pmode = policy.pallas_mode(a.rank)
    choice, _, key = _choose(a, b, method, policy)
    if choice == "padded":
        m = method
        if method == "auto":
            items = math.prod(jnp.broadcast_shapes(a.batch_shape, b.batch_shape) + a.features)
            items = items if isinstance(items, int) else 1  # a symbolic batch (jax.export)
            m = policy.cost_model(may_measure=False).choose(a.capacity, b.capacity,
                                                             max(items, 1))
        return conv_padded(a, b, m, method == "auto", pmode)
    policy.layouts.record(_family(a, b), _layout(choice, key))
    if choice == "bucketed":
        (layout, idx), _ = _bucketed_plan(*key)
        return bucketed.run_groups(a, b, idx, layout, method == "auto", pmode)
    dev, _ = _blocked_plan(*key[:9])
    return _run_blocked(a, b, *dev)


@functools.lru_cache(maxsize=32)
def _bucketed_plan(ka, kb, sa, sb, cap_a, cap_b, feat, method, cost, capacity, count, merge):
    la = np.frombuffer(ka, np.int32).reshape(sa)
    lb = np.frombuffer(kb, np.int32).reshape(sb)
    groups = bucketed.plan_groups(la, lb.reshape(-1, la.shape[1]), cap_a, cap_b, method, cost,
                                  capacity, count, feat, merge)
    layout = tuple((g.cap_a, g.cap_b, g.method) for g in groups)
    with jax.ensure_compile_time_eval():  # cached: device arrays, never a trace's tracers
        idx = tuple(jax.device_put(i) for i in bucketed.group_indices(groups, la.shape[0]))
    return (layout, idx), bucketed.plan_seconds(groups, feat, cost)


@functools.lru_cache(maxsize=32)
def _blocked_plan(ka, kb, sa, sb, cap_a, cap_b, feat, method, cost):
    """Blocked plan reading straight from the padded batches (flattened back to back)."""
    del feat
    la = np.frombuffer(ka, np.int32).reshape(sa)[:, 0].astype(np.int64)
    lb = np.frombuffer(kb, np.int32).reshape(sb)[..., 0].astype(np.int64)
    n, shared = la.size, len(sb) == 1
    ca, cb = cap_a[0], cap_b[0]
    start_a = np.arange(n, dtype=np.int64) * ca
    start_b = n * ca + (np.zeros(n, np.int64) if shared else np.arange(n, dtype=np.int64) * cb)
    zero = n * ca + (1 if shared else n) * cb
    plan = blocked.plan_blocks(la, np.broadcast_to(lb.reshape(-1), (n,)), method, cost,
                               start_a, start_b, zero)
    with jax.ensure_compile_time_eval():  # cached: device arrays, never a trace's tracers
        dev = (jax.device_put(plan.source.astype(np.int32)), jax.device_put(plan.first),
               jax.device_put(blocked.row_index(plan, ca + cb - 1)),
               jax.device_put(plan.lengths.astype(np.int32)), plan.layout)
    seconds = plan.seconds + cost.copy(plan.total_in) + cost.copy(n * (ca + cb - 1))
    return dev, seconds


def _run_blocked(a: VarTensor, b: VarTensor, source, first, rows, out_len, layout):
    """The blocked plan on padded batches, as two programs.

    The first packs the blocks, convolves every class and joins the class outputs; the
    second gathers them into the padded output (or, on non-finite input, runs the exact
    padded direct kernel). One program doing both measured several times slower on
    XLA:CPU than the two apart (see BENCHMARKS.md).
    """
    joined, finite = _blocked_classes(a, b, source, first, layout)
    return _blocked_output(joined, finite, rows, out_len, a, b)


@functools.partial(jax.jit, static_argnames=("layout",))
def _blocked_classes(a: VarTensor, b: VarTensor, source, first, layout):
    da, db = a.data, b.data
    dt = jnp.result_type(da.dtype, db.dtype)
    na = da.size  # source indexes [a, b, 0] back to back; read each without joining
    from_a = jnp.take(da.astype(dt).reshape(-1), source, mode="fill", fill_value=0)
    # negative indices wrap in jnp.take: send a's part past the end of b instead
    src_b = jnp.where(source >= na, source - na, db.size)
    from_b = jnp.take(db.astype(dt).reshape(-1), src_b, mode="fill", fill_value=0)
    packed = from_a + from_b
    outs = blocked.class_outputs(packed, first, layout)
    # every logical value is in `packed` (the slack is not, and is zero): checking it
    # is the same test as checking the operands, on fewer values
    return blocked.join_outputs(outs, dt), all_finite(packed)


@jax.jit
def _blocked_output(joined, finite, rows, out_len, a: VarTensor, b: VarTensor) -> VarTensor:
    n = a.batch_shape[0]
    out_cap = a.capacity[0] + b.capacity[0] - 1
    lb = b.lengths if b.batch_ndim else jnp.broadcast_to(b.lengths, (n, 1))

    def fast(da, db):
        return blocked.gather_rows(joined, rows, out_len, out_cap)

    def exact(da, db):
        db = db if b.batch_ndim else jnp.broadcast_to(db, (n,) + db.shape)
        x = zero_slack(VarTensor.trusted(da, a.lengths, a.model))
        k = zero_slack(VarTensor.trusted(db, lb, b.model))
        return conv_arrays(x.data, k.data, a.lengths, lb, 1, 1, "direct").astype(joined.dtype)

    data = jax.lax.cond(finite, fast, exact, a.data, b.data)
    return VarTensor.trusted(data, conv_output_lengths(a.lengths, lb), a.model)
