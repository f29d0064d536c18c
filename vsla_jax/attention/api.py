"""The front door: ``attention``, its validation, ``AttentionConfig`` and the backends.

``attention(q, k, v, *, causal=False, scale=None, backend="auto", tile=None,
config=None)`` takes VarTensors with ``rank=1`` and ``features=(H, D)`` (K/V may have
fewer heads: grouped-query attention when ``H % H_kv == 0``; V's head size ``Dv`` may
differ from ``D``) and returns a VarTensor shaped like ``q`` (features ``(H, Dv)``) with
zero slack. Query ``i`` of item ``b`` attends to keys
``j < lk[b]`` (and ``j <= i`` when causal, positions aligned at the start); items with
no keys return zeros. Batches stacked with every axis variable (``vs.stack(items)`` of
``[n, H, D]`` arrays) are accepted when the trailing axes have the same concrete lengths
in every item.

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
from vsla_jax.util import call_or_none, host_or_none, is_traced

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


class ShapeOnly(NamedTuple):
    """The shape and dtype of an array not built (yet): the data of the shape-only
    VarTensors ``check_inputs(..., crop=False)`` returns (cheaper than a
    ``jax.ShapeDtypeStruct``, on a path timed in microseconds)."""

    shape: tuple
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _as_heads(x: VarTensor, name: str, crop: bool = True) -> VarTensor:
    """A batch stacked with more than one variable axis (``vs.stack(items)`` of
    ``[n, H, D]`` arrays gives rank 3) as rank 1 with features ``(H, D)``, when the
    trailing variable axes have the same concrete lengths in every item; those axes are
    cropped to their lengths (the capacity ladder may have padded them). ``crop=False``:
    the data is a ``ShapeOnly`` of the cropped shape (no copy; for checks)."""
    extra = x.rank - 1
    if is_traced(x.lengths):
        raise ShapeError(
            f"attention: {name} has {x.rank} variable axes and traced lengths, so its "
            f"trailing axes cannot be checked for uniform (H, D); {_STACK_HINT}")
    lengths = np.asarray(x.lengths)
    trailing = lengths[:, 1:]
    if len(trailing) and not (trailing == trailing[:1]).all():
        raise ShapeError(
            f"attention: {name} has ragged trailing axes (lengths of variable axes 1..{extra}"
            f" differ between items: {np.unique(trailing, axis=0).tolist()[:4]}); attention "
            f"needs uniform (H, D) per item; {_STACK_HINT}")
    sizes = tuple(int(n) for n in trailing[0]) if len(trailing) else x.capacity[1:]
    if not crop:
        shape = x.data.shape[:2] + sizes
        return VarTensor.trusted(ShapeOnly(shape, x.dtype), lengths[:, :1],
                                 x.model)
    data = x.data[(slice(None), slice(None)) + tuple(slice(0, n) for n in sizes)]
    return VarTensor.trusted(data, jnp.asarray(lengths[:, :1]), x.model)


def _crop_now(full: VarTensor, checked: VarTensor) -> VarTensor:
    """``checked`` from ``check_inputs(..., crop=False)`` with its data cropped from
    ``full`` where it is a shape-only stand-in."""
    if not isinstance(checked.data, ShapeOnly):
        return checked
    index = tuple(slice(0, n) for n in checked.data.shape)
    return VarTensor.trusted(full.data[index], jnp.asarray(checked.lengths), checked.model)


def check_inputs(q: VarTensor, k: VarTensor, v: VarTensor,
                 crop: bool = True) -> tuple[VarTensor, ...]:
    """Validate ``q, k, v`` for attention and return them as rank-1 batches with features
    ``(H, D)`` (see ``_as_heads`` for batches stacked with every axis variable; with
    ``crop=False`` their data is a ``ShapeOnly`` stand-in)."""
    out = []
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, VarTensor):
            raise VSLATypeError(f"attention: {name} must be a VarTensor, got "
                                f"{type(x).__name__}")
        if x.batch_ndim == 1 and x.rank > 1 and x.rank + len(x.features) == 3:
            x = _as_heads(x, name, crop)
        if x.batch_shape == (0,) and not x.features:
            raise ShapeError(
                f"attention: {name} is an empty batch without (H, D) features (vs.stack of "
                "no items cannot know them); attention needs at least one item, or an empty "
                "batch built with its features: vs.from_padded(np.zeros((0, C, H, D)), "
                "np.zeros((0, 1), int), rank=1)")
        if x.rank != 1 or len(x.features) != 2 or x.batch_ndim != 1:
            raise ShapeError(
                f"attention: {name} must be a batch (B,) of rank-1 items with features (H, D); "
                f"got batch {x.batch_shape}, rank {x.rank}, features {x.features}; "
                f"{_STACK_HINT}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise VSLATypeError(f"attention: {name} must be floating, got {x.dtype}")
        out.append(x)
    q, k, v = out
    if not (q.batch_shape == k.batch_shape == v.batch_shape):
        raise ShapeError(f"attention: batch shapes differ {q.batch_shape}, {k.batch_shape}, "
                         f"{v.batch_shape}")
    (h, d), (hk, dk), (hv, _) = q.features, k.features, v.features
    if dk != d or hk != hv or k.capacity != v.capacity:
        raise ShapeError(f"attention: k/v features {k.features}/{v.features} or capacities "
                         f"{k.capacity}/{v.capacity} do not match q head size {d} (k needs "
                         "q's head size, v k's heads; v's head size may differ)")
    if h % hk:
        raise ShapeError(f"attention: {h} query heads are not a multiple of {hk} K/V heads")
    if k.lengths is not v.lengths:
        lk, lv = host_or_none(k.lengths), host_or_none(v.lengths)
        if lk is not None and lv is not None and not np.array_equal(lk, lv):
            raise LengthError("attention: k and v lengths differ")
    return q, k, v


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
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
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


def _backend(backend, config: AttentionConfig, q, k) -> AttentionBackend:
    if not isinstance(backend, str):
        if isinstance(backend, AttentionBackend):
            return backend
        raise VSLATypeError(f"attention: backend must be a name or an AttentionBackend, got "
                            f"{type(backend).__name__}")
    name = choose_backend(q, k) if backend == "auto" else backend
    impls = backends_for(config)
    if name not in impls:
        raise UnknownBackendError(f"attention: backend must be one of "
                                  f"{('auto',) + BACKENDS}, got {backend!r}")
    return impls[name]


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

    Differentiable in every mode: reverse mode runs the chosen backend's backward;
    under forward-mode AD (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``), which the
    ``custom_vjp`` backends refuse, the ``xla`` backend runs instead.
    """
    full = (q, k, v)
    q, k, v = check_inputs(q, k, v, crop=False)
    tiles = check_tile(tile)
    if config is None:
        config = DEFAULT_CONFIG
    elif not isinstance(config, AttentionConfig):
        raise VSLATypeError(f"attention: config must be an AttentionConfig, got "
                            f"{type(config).__name__}")
    causal = check_causal(causal)
    scale = check_scale(scale, q.features[1])
    impl = _backend(backend, config, *full[:2])
    if any(isinstance(x.data, ShapeOnly) for x in (q, k, v)):
        # rank-3 batches (vs.stack of [n, H, D] items): the C++ kernels read the head
        # axes through strides; other backends take cropped copies
        if isinstance(impl, CPUBackend):
            sizes = (*q.features, k.features[0], v.features[1])
            out = call_or_none(impl.compute_strided, *full, sizes, causal, scale)
            if out is not None:
                return out
        q, k, v = (_crop_now(f, x) for f, x in zip(full, (q, k, v)))
    if tiles is not None and isinstance(impl, TiledBackend):
        plan = dict(tq=tiles[0], tk=tiles[1])
    else:
        plan = impl.prepare(q, k, v)
    out = call_or_none(impl.compute, q, k, v, causal, scale, plan)
    if out is None:  # forward-mode AD: the custom_vjp backends are reverse-mode only
        xla = XLABackend()
        out = xla.compute(q, k, v, causal, scale, xla.prepare(q, k, v))
    return out
