"""The front door: ``attention``, its validation, ``AttentionConfig`` and the backends.

``attention(q, k, v, *, causal=False, scale=None, backend="auto", tile=None,
config=None)`` takes VarTensors with ``rank=1`` and ``features=(H, D)`` (K/V may have
fewer heads: grouped-query attention when ``H % H_kv == 0``; V's head size ``Dv`` may
differ from ``D``) and returns a VarTensor shaped like ``q`` (features ``(H, Dv)``) with
zero slack. Query ``i`` of item ``b`` attends to keys
``j < lk[b]`` (and ``j <= i`` when causal, positions aligned at the start); items with
no keys return zeros. Batches stacked with every axis variable (``vs.stack(items)`` of
``[n, H, D]`` arrays) are accepted when the trailing axes have the same concrete lengths
in every item. Unbatched inputs (one sequence each, or what ``jax.vmap`` over a batch
hands over) run as a batch of one and give an unbatched result.

Backends (all exact), one module each:
  ``xla``       ``reference``: dense masked attention over the padded batch;
  ``bucketed``  ``bucketed``: items grouped by capacity bucket, dense attention per group;
  ``tiled``     ``tiled``: flash-style online softmax that never computes padded tiles;
  ``pallas``    ``pallas``: a Pallas kernel with per-item trip counts (GPU; the Pallas
                interpreter elsewhere, slow, meant for tests).
  ``cpu``       ``cpu``: C++ flash kernels through XLA's FFI (``vsla_jax.kernels``), one
                custom call per batch, forward and backward; ``bucketed`` where the
                extension is missing or the backend is not a CPU. What ``auto``
                runs on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from vsla_jax.attention.bucketed import BucketedBackend, BucketPlan
from vsla_jax.attention.cpu import CPUBackend
from vsla_jax.attention.pallas import PallasBackend
from vsla_jax.attention.reference import XLABackend
from vsla_jax.attention.tiled import TiledBackend, TilingStrategy
from vsla_jax.errors import LengthError, ShapeError, VSLAError, VSLATypeError
from vsla_jax.tensor import VarTensor
from vsla_jax.util import call_or_none, forward_mode, is_traced

BACKENDS = ("xla", "bucketed", "tiled", "pallas", "cpu")


class UnknownBackendError(VSLAError, ValueError):
    """A ``backend`` name that is neither ``"auto"`` nor one of ``BACKENDS``."""


class AttentionArgumentError(VSLAError, ValueError):
    """An attention argument of the right type but an invalid value (a ``scale`` that is
    zero, negative, infinite or NaN)."""


# -- configuration ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Every setting of the exact backends, in one frozen (hashable) value.

    Attributes:
      bucket: the ``bucketed`` backend's ``BucketPlan``: capacity ladder (``policy``),
        score-block budget (``block_bytes``), merge cost (``group_overhead_flops``) and
        when eager calls fuse all groups into one program (``fuse_after``).
      tiling: the ``TilingStrategy`` that picks ``tiled``/``pallas`` tile sizes when
        ``tile`` is not given (candidates, per-tile overhead, memory budget).
      pallas_interpret: run the Pallas kernel in the interpreter (True), compiled
        (False), or interpreted exactly when the default backend is not a GPU (None).

    ``attention`` builds one set of backend objects per distinct config and keeps it
    (``backends_for``), so state a backend keeps between calls (the ``bucketed`` plan
    signatures it has run, which decide ``fuse_after``) carries over between calls
    with equal configs.
    """

    bucket: BucketPlan = BucketPlan()
    tiling: TilingStrategy = TilingStrategy()
    pallas_interpret: bool | None = None

    def __post_init__(self):
        for field, cls in (("bucket", BucketPlan), ("tiling", TilingStrategy)):
            if not isinstance(getattr(self, field), cls):
                raise VSLATypeError(f"AttentionConfig.{field} must be a {cls.__name__}, got "
                                    f"{type(getattr(self, field)).__name__}")
        if self.pallas_interpret not in (None, True, False):
            raise VSLATypeError(f"AttentionConfig.pallas_interpret must be None, True or "
                                f"False, got {self.pallas_interpret!r}")


DEFAULT_CONFIG = AttentionConfig()


# -- backends ---------------------------------------------------------------------------
@runtime_checkable
class AttentionBackend(Protocol):
    """What ``attention`` calls: ``prepare`` plans from shapes and (when concrete)
    lengths; ``compute`` runs the plan. ``optimize_tiling`` is the planning step alone."""

    name: str

    def prepare(self, q: VarTensor, k: VarTensor, v: VarTensor) -> dict: ...

    def compute(self, q, k, v, causal: bool, scale: float, plan: dict) -> VarTensor: ...

    def optimize_tiling(self, q: VarTensor, k: VarTensor) -> dict: ...


@functools.lru_cache(maxsize=64)
def backends_for(config: AttentionConfig = DEFAULT_CONFIG) -> dict[str, AttentionBackend]:
    """The backend objects for ``config``, built once per distinct config."""
    return {"xla": XLABackend(), "bucketed": BucketedBackend(config.bucket),
            "tiled": TiledBackend(config.tiling),
            "pallas": PallasBackend(config.pallas_interpret, config.tiling),
            "cpu": CPUBackend(BucketedBackend(config.bucket))}


def choose_backend(q: VarTensor, k: VarTensor) -> str:
    """What ``backend="auto"`` runs: ``pallas`` on GPU, ``cpu`` (the C++ kernels, which
    fall back to ``bucketed`` where the extension is missing) on CPU, ``bucketed``
    elsewhere.

    On CPU the kernels beat ``bucketed`` and PyTorch's per-sequence SDPA on every length
    distribution measured (BENCHMARKS.md), eagerly and under ``jit`` with traced
    lengths. ``q``/``k`` are accepted so that the choice may depend on the length
    profile."""
    del q, k
    platform = jax.default_backend()
    return {"gpu": "pallas", "cpu": "cpu"}.get(platform, "bucketed")


# -- validation -------------------------------------------------------------------------
_STACK_HINT = ("stack the items with one variable axis and dense (H, D) features: "
               "vs.stack(items, rank=1)")


class Layout(NamedTuple):
    """One validated attention input: the tensor as given and the ``(H, D)`` heads that
    attention reads of it.

    ``stacked``: a batch stacked with more than one variable axis (``vs.stack(items)``
    of ``[n, H, D]`` arrays gives rank 3, of ``[n, H]`` arrays with a feature axis rank
    2); its data is ``[B, C, Hc, Dc]`` with the head axes capacity-padded, and the
    heads are ``[..., :H, :D]``."""

    x: VarTensor
    batch: int
    capacity: int
    heads: int
    head_dim: int
    stacked: bool

    def cropped(self) -> VarTensor:
        """The input as a rank-1 batch with features ``(H, D)`` (a cropped copy of a
        stacked batch's data; the input itself otherwise)."""
        if not self.stacked:
            return self.x
        data = self.x.data[:, :, :self.heads, :self.head_dim]
        return VarTensor.trusted(data, self.x.lengths[:, :1], self.x.model)


def _shape_error(name: str, batch: tuple, rank: int, features: tuple) -> ShapeError:
    return ShapeError(
        f"attention: {name} must be a batch (B,) of rank-1 items with features (H, D); got "
        f"batch {batch}, rank {rank}, features {features}; {_STACK_HINT}")


@functools.lru_cache(maxsize=64)
def is_floating(dtype) -> bool:
    """Whether ``dtype`` is a float type, bfloat16 included (cached: a hot path)."""
    return bool(jnp.issubdtype(dtype, jnp.floating))


@functools.lru_cache(maxsize=1024)
def static_layout(data_shape: tuple, lengths_shape: tuple, dtype,
                  name: str) -> tuple[int, int, tuple, bool]:
    """What the shapes and dtype of one input fix (cached per signature, the hot path of
    small calls): ``(batch, capacity, features, stacked)``, or the typed error.

    ``features`` is ``(H, D)`` for a rank-1 batch and the trailing capacities' feature
    axes for a stacked one (its heads come from the lengths, see ``layout``)."""
    if len(lengths_shape) != 2:
        rank = lengths_shape[-1] if lengths_shape else 0
        nb = max(len(lengths_shape) - 1, 0)
        raise _shape_error(name, lengths_shape[:-1], rank, tuple(data_shape[nb + rank:]))
    batch, rank = lengths_shape
    features = tuple(data_shape[1 + rank:])
    stacked = rank > 1 and rank + len(features) == 3
    if batch == 0 and rank == 1 and not features:
        raise ShapeError(
            f"attention: {name} is an empty batch without (H, D) features (vs.stack of "
            "no items cannot know them); attention needs at least one item, or an empty "
            "batch built with its features: vs.from_padded(np.zeros((0, C, H, D)), "
            "np.zeros((0, 1), int), rank=1)")
    if not stacked and (rank != 1 or len(features) != 2):
        raise _shape_error(name, (batch,), rank, features)
    if not is_floating(dtype):
        raise VSLATypeError(f"attention: {name} must be floating, got {dtype}")
    return batch, data_shape[1], features, stacked


def layout(x, name: str) -> Layout:
    """Validate one attention input (``q``, ``k`` or ``v``, named ``name`` in errors):
    a VarTensor batch ``(B,)`` of rank-1 items with float features ``(H, D)``, or a batch
    stacked with every axis variable whose trailing axes have the same concrete lengths
    in every item (see ``Layout``)."""
    if not isinstance(x, VarTensor):
        raise VSLATypeError(f"attention: {name} must be a VarTensor, got {type(x).__name__}")
    data = x.data
    batch, capacity, features, stacked = static_layout(data.shape, x.lengths.shape,
                                                       data.dtype, name)
    if stacked:
        host = x.host_lengths
        if host is None:
            raise ShapeError(
                f"attention: {name} has {x.rank} variable axes and traced lengths, so its "
                f"trailing axes cannot be checked for uniform (H, D); {_STACK_HINT}")
        if batch > 1 and not (host[1:, 1:] == host[0, 1:]).all():
            raise ShapeError(
                f"attention: {name} has ragged trailing axes (lengths of variable axes "
                f"1..{x.rank - 1} differ between items: "
                f"{np.unique(host[:, 1:], axis=0).tolist()[:4]}); attention needs uniform "
                f"(H, D) per item; {_STACK_HINT}")
        features = (tuple(host[0, 1:].tolist()) if batch else
                    tuple(data.shape[2:1 + x.rank])) + features
    return Layout(x, batch, capacity, features[0], features[1], stacked)


def check_layouts(q, k, v) -> tuple[Layout, Layout, Layout]:
    """``layout`` of each input, and their agreement: one batch size, K/V heads dividing
    the query heads, k's head size equal to q's, k and v with equal capacities, K/V
    heads and lengths (v's head size may differ)."""
    lq, lk, lv = layout(q, "q"), layout(k, "k"), layout(v, "v")
    if not lq.batch == lk.batch == lv.batch:
        raise ShapeError(f"attention: batch shapes differ {q.batch_shape}, {k.batch_shape}, "
                         f"{v.batch_shape}")
    if lk.head_dim != lq.head_dim or lk.heads != lv.heads or lk.capacity != lv.capacity:
        raise ShapeError(
            f"attention: k/v features {(lk.heads, lk.head_dim)}/{(lv.heads, lv.head_dim)} "
            f"or capacities {lk.capacity}/{lv.capacity} do not match q head size "
            f"{lq.head_dim} (k needs q's head size, v k's heads; v's head size may differ)")
    if not lk.heads or lq.heads % lk.heads:
        raise ShapeError(f"attention: {lq.heads} query heads are not a multiple of "
                         f"{lk.heads} K/V heads")
    if k.lengths is not v.lengths:
        hk, hv = k.host_lengths, v.host_lengths
        if hk is not None and hv is not None and not (
                hk.shape == hv.shape and hk.dtype == hv.dtype and hk.tobytes() == hv.tobytes()
                or np.array_equal(hk[:, :1], hv[:, :1])):  # the bytes: a fast equal
            raise LengthError("attention: k and v lengths differ")
    return lq, lk, lv


def as_batch(x: VarTensor) -> VarTensor:
    """An unbatched VarTensor as a batch of one (a new leading axis of size 1)."""
    host = x.host_lengths
    return VarTensor.trusted(x.data[None], x.lengths[None], x.model,
                             checked=x.lengths_checked,
                             host_lengths=None if host is None else host[None])


def check_inputs(q: VarTensor, k: VarTensor, v: VarTensor) -> tuple[VarTensor, ...]:
    """Validate ``q, k, v`` for attention (``check_layouts``) and return them as rank-1
    batches with features ``(H, D)`` (batches stacked with every axis variable are
    cropped to their heads, a copy)."""
    return tuple(x.cropped() for x in check_layouts(q, k, v))


def check_causal(causal) -> bool:
    """``causal`` as a bool: only ``bool`` and NumPy bools are accepted (a string such as
    ``"no"`` is truthy and would silently mean causal)."""
    if not isinstance(causal, (bool, np.bool_)):
        raise VSLATypeError(f"attention: causal must be a bool (True or False), got "
                            f"{causal!r} of type {type(causal).__name__}")
    return bool(causal)


def check_scale(scale, head_dim: int) -> float:
    """``scale`` as a Python float: ``None`` gives ``1 / sqrt(head_dim)``; otherwise a
    positive finite real number (static: it keys the compiled programs)."""
    if scale is None:  # head_dim 0: every score is 0, whatever the scale
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, (bool, np.bool_, str, bytes)) or is_traced(scale):
        kind = "a traced array" if is_traced(scale) else f"{scale!r}"
        raise VSLATypeError(f"attention: scale must be a positive finite number or None, "
                            f"got {kind}")
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise VSLATypeError(f"attention: scale must be a positive finite number or None, "
                            f"got {scale!r} of type {type(scale).__name__}") from None
    if not (math.isfinite(value) and value > 0):
        raise AttentionArgumentError(f"attention: scale must be a positive finite number "
                                     f"or None, got {scale!r}")
    return value


def check_tile(tile) -> tuple[int, int] | None:
    """``tile`` as ``(tq, tk)``: None, a positive int, or a pair of positive ints."""
    if tile is None:
        return None
    pair = tuple(tile) if isinstance(tile, (tuple, list)) else (tile, tile)
    if len(pair) != 2:
        raise ShapeError(f"attention: tile must be one size or (tq, tk), got {tile!r}")
    for t in pair:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise VSLATypeError(f"attention: tile sizes must be positive integers, got "
                                f"tile={tile!r}")
        if t < 1:
            raise ShapeError(f"attention: tile sizes must be positive integers, got "
                             f"tile={tile!r}")
    return int(pair[0]), int(pair[1])


def _backend(backend, config: AttentionConfig | None, q, k) -> AttentionBackend:
    if not isinstance(backend, str):
        if isinstance(backend, AttentionBackend):
            return backend
        raise VSLATypeError(f"attention: backend must be a name or an AttentionBackend, got "
                            f"{type(backend).__name__}")
    name = choose_backend(q, k) if backend == "auto" else backend
    impls = backends_for() if config is None else backends_for(config)  # no hashing
    if name not in impls:
        raise UnknownBackendError(f"attention: backend must be one of "
                                  f"{('auto',) + BACKENDS}, got {backend!r}")
    return impls[name]


def kernel_facts(x: VarTensor) -> tuple | None:
    """What the cached kernel path needs of one input: ``(signature, sequence lengths)``
    with ``signature = (batch, capacity, heads, head_dim, stacked, dtype)`` and the
    sequence lengths as bytes, or None where the full path must decide (an invalid
    layout, which it raises named, or lengths not known on the host)."""
    try:
        lay = layout(x, "x")
    except VSLAError:
        return None
    host = x.host_lengths
    if host is None:
        return None
    return ((lay.batch, lay.capacity, lay.heads, lay.head_dim, lay.stacked, x.data.dtype),
            host[:, 0].tobytes())


@functools.lru_cache(maxsize=1024)
def kernel_plan(sig_q: tuple, sig_k: tuple, sig_v: tuple,
                scale) -> tuple[float, tuple | None] | None:
    """``(scale, sizes)`` of a kernel call for inputs of these ``kernel_facts``
    signatures, or None where the full path must decide (an error to raise, zero
    capacities). Cached: it is the per-call work of small calls, and
    depends on nothing but its arguments."""
    (bq, cq, hq, dq, sq, tq), (bk, ck, hk, dk, sk, tk), (bv, cv, hv, dv, sv, tv) = (
        sig_q, sig_k, sig_v)
    if not (bq == bk == bv and dk == dq and hk == hv and ck == cv and hk and not hq % hk
            and cq and ck and all(map(is_floating, (tq, tk, tv)))):
        return None
    try:
        scale = check_scale(scale, dq)
    except VSLAError:
        return None
    return scale, ((hq, dq, hk, dv) if sq or sk or sv else None)


def fast_kernel_call(q, k, v, causal, scale, backend, tile, config) -> VarTensor | None:
    """The common call on the C++ kernels, every setting at its default: the checks of
    the full path, kept per tensor (``kernel_facts``) and per signature
    (``kernel_plan``), then the kernel call. None where it does not apply: the full path
    runs (and raises what it must)."""
    if (tile is not None or config is not None or type(causal) is not bool
            or backend not in ("auto", "cpu") or type(q) is not VarTensor
            or type(k) is not VarTensor or type(v) is not VarTensor
            or not (scale is None or type(scale) is float)):
        return None
    fq, fk, fv = (x.derived("attention_kernel_facts", kernel_facts) for x in (q, k, v))
    if fq is None or fk is None or fv is None or fk[1] != fv[1]:
        return None
    plan = kernel_plan(fq[0], fk[0], fv[0], scale)
    if plan is None or (backend == "auto" and choose_backend(q, k) != "cpu"):
        return None
    impl = backends_for()["cpu"]
    return impl.compute_strided(q, k, v, plan[1], causal, plan[0])


def attention(q: VarTensor, k: VarTensor, v: VarTensor, *, causal: bool = False,
              scale: float | None = None, backend: str | AttentionBackend = "auto",
              tile: int | tuple[int, int] | None = None,
              config: AttentionConfig | None = None) -> VarTensor:
    """Exact variable-length attention. See the module docstring for semantics.

    Args:
      q: ``[B, Cq, H, D]`` VarTensor; k: ``[B, Ck, H_kv, D]``; v: ``[B, Ck, H_kv, Dv]``
        (the value head size may differ), lengths equal to k's. The output is ``[B, Cq,
        H, Dv]``.
      causal: a bool; query ``i`` sees keys ``j <= i``.
      scale: a positive finite score scale, default ``1 / sqrt(D)``.
      backend: ``"auto"`` (see ``choose_backend``), ``"xla"``, ``"bucketed"``,
        ``"tiled"``, ``"pallas"``, or an ``AttentionBackend`` object.
      tile: ``tiled``/``pallas``: one tile size or ``(tq, tk)`` (positive integers);
        default from ``config.tiling``. The other backends do not tile and ignore it.
      config: ``AttentionConfig`` (bucketed plan, tiling strategy, Pallas interpreter);
        default ``AttentionConfig()``.

    Differentiable: reverse mode runs the chosen backend's backward. ``auto`` on CPU
    (the ``cpu`` kernels) and ``xla`` take every mode, also applied to an already jitted
    function (docs/kernels.md, "Gradients"). The ``custom_vjp`` backends (``bucketed``,
    ``tiled``, ``pallas``) are reverse-mode only: when this call is traced under
    forward-mode AD (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``, also inside ``jit``)
    the ``xla`` backend runs instead. A function that holds one of them and is jitted
    *before* forward mode is applied (``jax.jvp(jax.jit(f))``) is traced without
    tangents, so JAX refuses it ("can't apply forward-mode autodiff (jvp) to a
    custom_vjp function"): choose ``auto`` or ``xla`` there.
    """
    out = fast_kernel_call(q, k, v, causal, scale, backend, tile, config)
    if out is not None:
        return out
    items = [isinstance(x, VarTensor) and x.batch_ndim == 0 for x in (q, k, v)]
    if all(items):  # one sequence each (also what jax.vmap over a batch hands over)
        out = attention(as_batch(q), as_batch(k), as_batch(v), causal=causal, scale=scale,
                        backend=backend, tile=tile, config=config)
        return VarTensor.trusted(out.data[0], out.lengths[0], out.model,
                                 checked=out.lengths_checked)
    if any(items):
        raise ShapeError("attention: q, k and v must all be batches or all be single "
                         f"items; got batch shapes {q.batch_shape}, {k.batch_shape}, "
                         f"{v.batch_shape}")
    layouts = check_layouts(q, k, v)
    tiles = check_tile(tile)
    if config is not None and not isinstance(config, AttentionConfig):
        raise VSLATypeError(f"attention: config must be an AttentionConfig, got "
                            f"{type(config).__name__}")
    causal = check_causal(causal)
    lq, lk, lv = layouts
    scale = check_scale(scale, lq.head_dim)
    impl = _backend(backend, config, q, k)
    if not (lq.capacity and lk.capacity):  # no query rows, or no keys: all zeros
        return VarTensor.trusted(
            jnp.zeros((lq.batch, lq.capacity, lq.heads, lv.head_dim), q.dtype),
            q.lengths[:, :1], q.model)
    if isinstance(impl, CPUBackend):
        # the C++ kernels read stacked batches' head axes through strides (no copies)
        sizes = ((lq.heads, lq.head_dim, lk.heads, lv.head_dim)
                 if lq.stacked or lk.stacked or lv.stacked else None)
        out = call_or_none(impl.compute_strided, q, k, v, sizes, causal, scale)
        if out is not None:
            return out
    q, k, v = (x.cropped() for x in layouts)
    if tiles is not None and isinstance(impl, TiledBackend):
        plan = dict(tq=tiles[0], tk=tiles[1])
    else:
        plan = impl.prepare(q, k, v)
    # The custom_vjp backends (bucketed, tiled, pallas) are reverse-mode only: under
    # forward mode the XLA backend runs, seen from the tangents (also inside jit) or from
    # JAX's refusal while tracing.
    reverse_only = not isinstance(impl, (XLABackend, CPUBackend))
    out = None
    if not (reverse_only and forward_mode(q.data, k.data, v.data)):
        out = call_or_none(impl.compute, q, k, v, causal, scale, plan)
    if out is None:
        xla = XLABackend()
        out = xla.compute(q, k, v, causal, scale, xla.prepare(q, k, v))
    return out
