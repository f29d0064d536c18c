"""Activation-sparse FFN down projection: mask activations, or skip the tiles a small call
leaves unused.

The FFN computes ``f = gelu(h @ W1 + b1)`` (``[T, F]``), then ``f @ W2 + b2``. A neuron is
*active* when ``|f| > threshold``; a *tile* is ``tile`` consecutive neurons (rows of
``W2``), active when one of its neurons is. Both modes of ``FFNSparsity.mode`` compute
the same thing, ``masked(f, threshold) @ W2 + b2``, and differ in what they read:

- ``"mask"``: inactive activations are zeroed and the down projection runs as one dense
  matmul. Every row of ``W2`` is still read: this measures the quality of activation
  sparsity, never its speed.
- ``"skip"``: on a small call (static row count ``T <= max_rows``) the tiles that no row
  of the call needs are skipped. The union of active tiles over the call's rows is taken,
  at most ``k_cap`` of them are kept (the most active, ties to the lower index), their
  ``W2`` rows and activation columns are gathered, and one dense
  ``[T, k_cap * tile] @ [k_cap * tile, H]`` matmul runs. It is exact for the kept tiles:
  equal to ``"mask"`` whenever every active tile fits in ``k_cap`` (so a row's output
  does not depend on the other rows of its call), and otherwise short of the active
  tiles beyond ``k_cap`` (``overflow``). A call that cannot skip (more rows than
  ``max_rows``, or a ``k_cap`` covering every tile) runs ``"mask"``.

Neither mode sorts or runs a top-k. The kept tiles are picked by a count level and listed
by ``nonzero`` with a static size. ``k_cap`` is static (one compiled program per value).
Take it from ``k_cap_rung``, a rung of a capacity ladder above a count made on the host
(``union_count`` of one call, or the most over calibration calls), so the ladder bounds
the compilations. ``skips_tiles`` says whether given settings really skip tiles for a
call size. Tiles per call, and any cache figure, describe what ran only when it is true.

Which neurons share a tile decides how many tiles a call keeps. A co-activation
permutation of the ``F`` neurons (``perm`` here, ``permute.apply`` on a model) lowers it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import vsla_jax as vs
from icd_jax.adapters import meta
from icd_jax.cost import check_permutation
from icd_jax.errors import ConfigError, ShapeError

TRANSFORM = "ffn_sparsity"
MODES = ("mask", "skip")
BACKENDS = ("xla", "pallas", "pallas-interpret")
#: Flax collection a model sows what its sparse down projections executed into
#: (``skipped`` bool; with a skip also ``tiles_active`` and ``tiles_kept``, int32).
RECORD = "ffn_exec"
#: Default ladder of ``k_cap``: 4 rungs per doubling, so at most 25% of a rung is slack.
LADDER = vs.CapacityPolicy.octave(steps=4, minimum=4)


# -- validation ---------------------------------------------------------------------------
def _positive_int(name: str, value) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise ConfigError(f"{name} must be a positive int, got {value!r}") from None
    if isinstance(value, bool) or v < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return v


def _threshold(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(v) or v < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def _per_layer(name: str, value, check) -> float | int | tuple:
    """``value`` checked by ``check``, or a non-empty tuple of such (one per layer)."""
    if isinstance(value, (tuple, list)):
        if not value:
            raise ConfigError(f"{name} must not be an empty tuple")
        return tuple(check(f"{name}[{i}]", v) for i, v in enumerate(value))
    return check(name, value)


def _n_tiles(active, tile: int, group: int) -> int:
    """Validate ``active [T, F]``, ``tile`` (dividing F) and ``group``; return F // tile."""
    if active.ndim != 2:
        raise ShapeError(f"active must be [T, F], got shape {active.shape}")
    tile, group = _positive_int("tile", tile), _positive_int("group", group)
    if active.shape[1] % tile:
        raise ConfigError(f"tile={tile} does not divide the {active.shape[1]} neurons (F)")
    return active.shape[1] // tile


def _check_ffn(f, w2, b2) -> None:
    if f.ndim != 2 or w2.ndim != 2 or b2.ndim != 1:
        raise ShapeError(f"need f [T, F], w2 [F, H], b2 [H]; got shapes {f.shape}, "
                         f"{w2.shape}, {b2.shape}")
    if w2.shape[0] != f.shape[1] or b2.shape[0] != w2.shape[1]:
        raise ShapeError(f"f {f.shape}, w2 {w2.shape} and b2 {b2.shape} do not chain: "
                         "need f [T, F], w2 [F, H], b2 [H]")


# -- settings -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class FFNSparsity:
    """How a model runs its activation-sparse FFN down projections (every layer).

    Attributes:
      threshold: a neuron is active when ``|f| > threshold``. One float for every layer,
        or a tuple with one per layer (``calibrate_thresholds``).
      tile: neurons per tile, the unit a skip reads or leaves.
      mode: ``"mask"`` (zero inactive activations, one dense matmul, nothing skipped) or
        ``"skip"`` (union tile skip on calls of at most ``max_rows`` rows).
      k_cap: ``"skip"`` only, where it is required: tiles kept per call, one int or one
        per layer (a rung from ``k_cap_rung``). A layer whose ``k_cap`` covers all
        ``F // tile`` tiles skips nothing and runs ``"mask"``.
      max_rows: ``"skip"`` only: calls of more rows (the static ``T``) run ``"mask"``.
      backend: ``"skip"`` only: ``"xla"`` (gather, then one matmul) or ``"pallas"``
        (``ffn_pallas``, a GPU loop over the kept tiles; ``"pallas-interpret"`` off GPU).
    """

    threshold: float | tuple[float, ...] | None = None  # required (None: ConfigError)
    tile: int = 16
    mode: str = "mask"
    k_cap: int | tuple[int, ...] | None = None
    max_rows: int = 32
    backend: str = "xla"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"FFNSparsity mode must be one of {MODES}, got {self.mode!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"FFNSparsity backend must be one of {BACKENDS}, got "
                              f"{self.backend!r}")
        set_ = functools.partial(object.__setattr__, self)
        set_("threshold", _per_layer("threshold", self.threshold, _threshold))
        set_("tile", _positive_int("tile", self.tile))
        set_("max_rows", _positive_int("max_rows", self.max_rows))
        if self.mode == "mask" and self.k_cap is not None:
            raise ConfigError("FFNSparsity k_cap applies to mode='skip' only; mode='mask' "
                              f"reads every tile (got k_cap={self.k_cap!r})")
        if self.mode == "skip" and self.k_cap is None:
            raise ConfigError("FFNSparsity mode='skip' needs k_cap: a rung from "
                              "ffn.k_cap_rung over the union counts of calibration calls")
        if self.k_cap is not None:
            set_("k_cap", _per_layer("k_cap", self.k_cap, _positive_int))

    def at(self, layer: int | None) -> tuple[float, int | None]:
        """``(threshold, k_cap)`` of ``layer`` (an index; None only for scalar settings)."""
        return _pick("threshold", self.threshold, layer), _pick("k_cap", self.k_cap, layer)


def _pick(name: str, value, layer: int | None):
    if not isinstance(value, tuple):
        return value
    if layer is None:
        raise ConfigError(f"FFNSparsity {name} is per layer, but this projection's layer is "
                          "unknown (its module path holds no 'layer_<i>')")
    if not 0 <= layer < len(value):
        raise ConfigError(f"FFNSparsity {name} has {len(value)} values; no layer {layer}")
    return value[layer]


def layer_of(path: Sequence[str]) -> int | None:
    """The ``i`` of the first ``"layer_<i>"`` in a module path, else None."""
    for name in path:
        m = re.fullmatch(r"layer_(\d+)", str(name))
        if m:
            return int(m.group(1))
    return None


def skips_tiles(cfg: FFNSparsity, rows: int, n_neurons: int, layer: int | None = None
                ) -> bool:
    """Whether ``cfg`` really skips tiles on a call of ``rows`` rows (the static ``T``)
    with ``n_neurons`` FFN neurons: mode ``"skip"``, ``rows <= max_rows`` and ``k_cap``
    below ``n_neurons // tile``. For one ``layer``, or with None for any layer."""
    if cfg.mode != "skip" or rows > cfg.max_rows:
        return False
    if n_neurons % cfg.tile:
        raise ConfigError(f"FFNSparsity tile={cfg.tile} does not divide the {n_neurons} "
                          "neurons (F)")
    n_t = n_neurons // cfg.tile
    caps = cfg.k_cap if isinstance(cfg.k_cap, tuple) else (cfg.k_cap,)
    if layer is not None:
        caps = (_pick("k_cap", cfg.k_cap, layer),)
    return any(k < n_t for k in caps)


# -- selection and accounting (host analysis helpers as well) -----------------------------
def _check_selection(n_neurons: int, threshold, top_k) -> None:
    if (threshold is None) == (top_k is None):
        raise ConfigError("give exactly one of threshold and top_k, got "
                          f"threshold={threshold!r}, top_k={top_k!r}")
    if top_k is not None and _positive_int("top_k", top_k) > n_neurons:
        raise ConfigError(f"top_k={top_k} exceeds the {n_neurons} neurons (F)")


def active_mask(f: jax.Array, *, threshold: float | None = None,
                top_k: int | None = None) -> jax.Array:
    """``bool[T, F]``: ``|f| > threshold``, or the ``top_k`` neurons of each row by ``|f|``
    (exactly one of the two). ``top_k`` sorts every row: an analysis helper, never run by
    a forward pass."""
    if f.ndim != 2:
        raise ShapeError(f"f must be [T, F], got shape {f.shape}")
    _check_selection(f.shape[1], threshold, top_k)
    mag = jnp.abs(f)
    if threshold is not None:
        return mag > threshold
    _, idx = jax.lax.top_k(mag, int(top_k))
    rows = jnp.arange(f.shape[0])[:, None]
    return jnp.zeros(f.shape, bool).at[rows, idx].set(True)


def masked(f: jax.Array, threshold) -> jax.Array:
    """``f`` (any shape and dtype) with every entry of ``|f| <= threshold`` set to 0."""
    return jnp.where(jnp.abs(f) > threshold, f, jnp.zeros((), f.dtype))


def tile_counts(active: jax.Array, tile: int, group: int) -> jax.Array:
    """``int32[G, F // tile]``: active neurons per token group (``G = ceil(T / group)``,
    the last group padded with inactive rows) and tile."""
    n_t = _n_tiles(active, tile, group)
    t = active.shape[0]
    n_g = -(-t // group)
    a = jnp.pad(jnp.asarray(active, bool), ((0, n_g * group - t), (0, 0)))
    return a.reshape(n_g, group, n_t, tile).sum(axis=(1, 3), dtype=jnp.int32)


def tiles_per_group(active: jax.Array, tile: int, group: int) -> jax.Array:
    """``int32[G]``: the number of active tiles of each token group."""
    return (tile_counts(active, tile, group) > 0).sum(axis=1, dtype=jnp.int32)


def union_count(f, threshold: float, tile: int) -> int:
    """Host: tiles holding a neuron with ``|f| > threshold`` in any row of ``f [T, F]``."""
    a = np.abs(np.asarray(f, np.float32)) > threshold
    n_t = _n_tiles(a, tile, 1)
    return int(a.reshape(a.shape[0], n_t, tile).any(axis=(0, 2)).sum())


def k_cap_rung(n_active: int, n_tiles: int, policy: vs.CapacityPolicy | None = None) -> int:
    """Host: the ``policy`` rung (default ``LADDER``) holding ``n_active`` tiles, capped
    at ``n_tiles`` (where nothing is skipped)."""
    policy = LADDER if policy is None else policy
    return int(min(policy.bucket(max(int(n_active), 1)), _positive_int("n_tiles", n_tiles)))


def calibrate_thresholds(acts: Sequence, keep: float) -> tuple[float, ...]:
    """Host: per layer, the ``|f|`` level above which a ``keep`` share of the entries of
    ``acts[i]`` (``[tokens, F]``, real tokens) lies: thresholds for ``FFNSparsity``."""
    if not 0.0 < float(keep) <= 1.0:
        raise ConfigError(f"keep must be in (0, 1], got {keep!r}")
    out = []
    for i, a in enumerate(acts):
        a = np.abs(np.asarray(a, np.float32))
        if a.ndim != 2 or not a.size:
            raise ShapeError(f"acts[{i}] must be a non-empty [tokens, F], got {a.shape}")
        out.append(float(np.quantile(a, 1.0 - float(keep))))
    return tuple(out)


# -- the union tile skip ------------------------------------------------------------------
def top_tiles(counts: jax.Array, k_cap: int, max_count: int) -> tuple[jax.Array, jax.Array]:
    """The ``k_cap`` most active tiles, without a sort.

    ``counts int32[n]`` (each in ``[0, max_count]``, static bound). Returns ``(tiles
    int32[k_cap], valid bool[k_cap])``: the kept tiles in ascending order, valid slots
    first, padding slots pointing at tile ``n - 1``. A tile with count 0 is never kept;
    on overflow the lowest count level that fits is kept whole and the level below it
    fills the remaining slots from the lower index up.
    """
    k_cap = _positive_int("k_cap", k_cap)

    def overflow(_):
        levels = jnp.arange(1, max_count + 1, dtype=counts.dtype)
        at_least = (counts[None, :] >= levels[:, None]).sum(axis=1)  # nonincreasing
        level = 1 + (at_least > k_cap).sum()  # the lowest level whose tiles all fit
        above = counts >= level
        tie = (counts == level - 1) & (level > 1)
        return above | (tie & (jnp.cumsum(tie) <= k_cap - above.sum()))

    on = counts > 0  # the common case (k_cap from a calibrated rung): every tile fits
    keep = jax.lax.cond(on.sum() <= k_cap, lambda _: on, overflow, None)
    n = counts.shape[0]
    tiles = jnp.nonzero(keep, size=k_cap, fill_value=n - 1)[0].astype(jnp.int32)
    return tiles, jnp.arange(k_cap) < keep.sum()


def union_tiles(active: jax.Array, *, tile: int,
                k_cap: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(tiles int32[k_cap], valid bool[k_cap], n_active int32[])``: ``top_tiles`` of the
    active tiles of ``active bool[T, F]`` counted over all rows, and how many tiles were
    active (``n_active - valid.sum()`` were dropped)."""
    n_t = _n_tiles(active, tile, 1)
    t = active.shape[0]
    counts = active.reshape(t, n_t, tile).sum(axis=(0, 2), dtype=jnp.int32)
    tiles, valid = top_tiles(counts, k_cap, t * tile)
    return tiles, valid, (counts > 0).sum(dtype=jnp.int32)


def gather_down(f: jax.Array, w2: jax.Array, b2: jax.Array, active: jax.Array,
                tiles: jax.Array, valid: jax.Array, *, tile: int) -> jax.Array:
    """``[T, H]`` (dtype of ``f``): ``masked_by(f, active) @ w2 + b2`` over the kept
    tiles only. Gathers ``w2``'s rows of ``tiles`` (``[k * tile, H]``) and the matching
    columns of ``f`` (inactive entries and invalid slots zeroed), then runs one dense
    matmul accumulating in float32. ``f [T, F]``, ``active bool[T, F]``, ``tiles
    int32[k]`` ascending, ``valid bool[k]``."""
    (t, n), h = f.shape, w2.shape[1]
    n_t, k = n // tile, tiles.shape[0]
    cols = jnp.take(masked_by(f, active).reshape(t, n_t, tile), tiles, axis=1)
    cols = jnp.where(valid[None, :, None], cols, jnp.zeros((), f.dtype)).reshape(t, k * tile)
    rows = jnp.asarray(w2).reshape(n_t, tile * h).at[tiles].get(mode="promise_in_bounds",
                                                                indices_are_sorted=True)
    out = jnp.dot(cols, rows.reshape(k * tile, h), preferred_element_type=jnp.float32)
    return (out + b2.astype(jnp.float32)).astype(f.dtype)


def masked_by(f: jax.Array, active: jax.Array) -> jax.Array:
    """``f`` with the entries where ``active`` is False set to 0."""
    return jnp.where(active, f, jnp.zeros((), f.dtype))


def skip_down(f: jax.Array, w2: jax.Array, b2: jax.Array, threshold, *, tile: int,
              k_cap: int, down: Callable | None = None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The union tile skip: ``(out [T, H], record)``, ``record`` holding ``skipped``
    (True), ``tiles_active`` and ``tiles_kept`` (int32 scalars). ``f [T, F]``,
    ``w2 [F, H]``, ``b2 [H]``; ``threshold`` may be traced, ``tile`` and ``k_cap`` are
    static. ``down(f, w2, b2, active, tiles, valid, *, tile)`` runs the kept tiles:
    ``gather_down`` by default, or ``ffn_pallas.pallas_union_down`` (a loop over the
    kept tiles, no copy of them)."""
    _check_ffn(f, w2, b2)
    active = jnp.abs(f) > threshold
    tiles, valid, n_active = union_tiles(active, tile=tile, k_cap=k_cap)
    out = (gather_down if down is None else down)(f, w2, b2, active, tiles, valid, tile=tile)
    record = dict(skipped=jnp.ones((), bool), tiles_active=n_active,
                  tiles_kept=valid.sum(dtype=jnp.int32))
    return out, record


@functools.partial(jax.jit, static_argnames=("tile", "k_cap"))
def union_skip_down(f: jax.Array, w2: jax.Array, b2: jax.Array, threshold, *, tile: int,
                    k_cap: int) -> jax.Array:
    """``skip_down`` (XLA backend), jitted: ``[T, H]`` only."""
    return skip_down(f, w2, b2, threshold, tile=tile, k_cap=k_cap)[0]


@jax.jit
def masked_down(f: jax.Array, w2: jax.Array, b2: jax.Array, threshold) -> jax.Array:
    """``masked(f, threshold) @ w2 + b2`` (``[T, H]``, dtype of ``f``): every tile read."""
    out = jnp.dot(masked(f, threshold), w2, preferred_element_type=jnp.float32)
    return (out + b2.astype(jnp.float32)).astype(f.dtype)


# -- the adapter ----------------------------------------------------------------------------
def apply_ffn_sparsity(f, w2, b2, *, threshold: float, tile: int = 16, mode: str = "mask",
                       k_cap: int | None = None, max_rows: int = 32, perm=None,
                       policy: vs.CapacityPolicy | None = None,
                       strict: bool = False) -> tuple[jax.Array, dict]:
    """Activation-sparse ``f @ w2 + b2`` as one call of ``f``'s rows, and its ``meta``.

    ``f [T, F]``, ``w2 [F, H]``, ``b2 [H]``; active neurons ``|f| > threshold``. ``perm``
    (position -> original neuron) reorders the columns of ``f`` and rows of ``w2`` first
    (the result is unchanged; the tiles are not). ``mode="skip"`` runs the union tile
    skip when ``skips_tiles`` allows it, with ``k_cap`` defaulting to ``k_cap_rung`` of
    this call's union count under ``policy``; otherwise the mask runs, recorded as a
    fallback. Besides ``meta.KEYS``, meta holds ``executed`` (``"mask"`` or ``"skip"``),
    ``tiles_skipped``, ``fallback`` (why a requested skip did not run, else None) and,
    only when tiles were skipped, ``k_cap``, ``tiles_active``, ``tiles_kept``,
    ``overflow`` and ``tile_frac`` (kept / ``F // tile``). On failure returns the dense
    product with ``ok=False``.
    """
    f, w2, b2 = jnp.asarray(f), jnp.asarray(w2), jnp.asarray(b2)
    _check_ffn(f, w2, b2)
    threshold = _threshold("threshold", threshold)
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    n_t = _n_tiles(f, tile, 1)
    if k_cap is not None:
        k_cap = _positive_int("k_cap", k_cap)
        if mode == "mask":
            raise ConfigError(f"k_cap applies to mode='skip' only, got k_cap={k_cap}")
    max_rows = _positive_int("max_rows", max_rows)
    order = None if perm is None else check_permutation(perm, f.shape[1])
    settings = dict(threshold=threshold, tile=tile, mode=mode, k_cap=k_cap,
                    max_rows=max_rows, perm=order is not None)
    dense = (f @ w2 + b2).astype(f.dtype)

    def body():
        fp, wp = (f, w2) if order is None else (f[:, order], w2[order])
        kc = k_cap
        if mode == "skip" and kc is None:
            kc = k_cap_rung(union_count(fp, threshold, tile), n_t, policy)
        cfg = FFNSparsity(threshold=threshold, tile=tile, mode=mode, k_cap=kc,
                          max_rows=max_rows)
        stats: dict = dict(executed="mask", tiles_skipped=False, fallback=None)
        if skips_tiles(cfg, fp.shape[0], fp.shape[1]):
            out, rec = skip_down(fp, wp, b2, threshold, tile=tile, k_cap=kc)
            active, kept = int(rec["tiles_active"]), int(rec["tiles_kept"])
            stats.update(executed="skip", tiles_skipped=True, k_cap=kc, tiles_active=active,
                         tiles_kept=kept, overflow=active - kept, tile_frac=kept / n_t)
        else:
            out = masked_down(fp, wp, b2, threshold)
            if mode == "skip":
                stats["fallback"] = (f"{fp.shape[0]} rows > max_rows={max_rows}"
                                     if fp.shape[0] > max_rows else
                                     f"k_cap={kc} keeps all {n_t} tiles")
        return out, meta.make(
            TRANSFORM, settings, repermute=True,
            reason="which neurons share a tile decides the tiles a call keeps: a "
                   "co-activation permutation of the FFN neurons lowers it",
            error=dict(rel_fro=meta.rel_error(dense, out)),
            expected_quality="the dropped contribution of inactive neurons (|f| <= "
                             "threshold), plus that of active tiles beyond k_cap (overflow)",
            **stats)

    return meta.guarded(TRANSFORM, settings, dense, body, strict)
