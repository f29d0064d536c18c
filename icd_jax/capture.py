"""Activation capture: what ``build_w(source="activations")`` and the transforms need.

``capture(model, params, batches, what=...)`` runs a model batch by batch and keeps,
per layer, only bounded summaries of what the layer sows (Flax ``intermediates``):

- ``"ffn"`` / ``"inner"``: each real token's top ``k`` channels by ``|a|`` (indices and
  signed values), taken on the device; the result is a sparse ``[tokens, D]`` CSR
  matrix with ``k`` entries per row, never a dense ``[tokens, D]`` matrix;
- ``"residual"``: per-channel ranges (min, max, max ``|a|``, mean, std) of the residual
  stream, accumulated in float64;
- ``"key_mass"``: the attention probability mass each key receives, one value per token.

A model takes part by providing ``capture_batch(batch, params) -> {"layer_i/name":
(array [N, ...], valid bool [N])}``: device arrays whose first axis holds rows (tokens),
and which rows are real tokens (``icd_jax.models.minilm.MiniLM`` and
``icd_jax.models.mamba.Mamba`` do).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from icd_jax.errors import ConfigError

#: What each captured name is reduced to.
KINDS = {"ffn": "topk", "inner": "topk", "residual": "ranges", "key_mass": "tokens"}


@runtime_checkable
class Capturable(Protocol):
    def capture_batch(self, batch, params) -> Mapping[str, tuple[jax.Array, np.ndarray]]:
        ...


@dataclasses.dataclass(frozen=True)
class Ranges:
    """Per-channel statistics over real tokens (``float64[D]`` each, ``count`` tokens)."""

    min: np.ndarray
    max: np.ndarray
    absmax: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    count: int


@dataclasses.dataclass(frozen=True)
class Capture:
    """Captured summaries, keyed ``"layer_i/name"``.

    Attributes:
      topk: sparse activations ``csr_matrix[tokens, D]`` (float32; ``k`` stored entries
        per token, its top-``k`` by ``|a|``).
      ranges: ``Ranges`` per key.
      tokens: per-token values (``float32[tokens]``), e.g. attention key mass.
      meta: ``top_k``, batch and token counts.
    """

    topk: dict[str, sp.csr_matrix]
    ranges: dict[str, Ranges]
    tokens: dict[str, np.ndarray]
    meta: dict

    def acts(self, layer: int | str, name: str = "ffn") -> sp.csr_matrix:
        """The sparse activations of ``layer`` (an index or ``"layer_i"``) for
        ``build_w("activations", acts=...)``."""
        key = f"{layer if isinstance(layer, str) else f'layer_{layer}'}/{name}"
        if key not in self.topk:
            raise ConfigError(f"nothing captured under {key!r}; have {sorted(self.topk)}")
        return self.topk[key]


@functools.partial(jax.jit, static_argnums=1)
def top_k_rows(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Each row's ``k`` entries of largest ``|x|``: ``(values float32[N, k], int32[N, k])``."""
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)
    _, idx = jax.lax.top_k(jnp.abs(x), k)
    return jnp.take_along_axis(x, idx, axis=1), idx.astype(jnp.int32)


@jax.jit
def row_moments(x: jax.Array, valid: jax.Array) -> tuple[jax.Array, ...]:
    """Per-channel min, max, sum and sum of squares over the valid rows of ``x [N, D]``."""
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)
    v = valid[:, None]
    big = jnp.finfo(jnp.float32).max
    xz = jnp.where(v, x, 0.0)
    return (jnp.where(v, x, big).min(0), jnp.where(v, x, -big).max(0), xz.sum(0),
            (xz * xz).sum(0))


class _RangeSum:
    def __init__(self):
        self.n, self.lo, self.hi, self.s, self.s2 = 0, None, None, None, None

    def add(self, lo, hi, s, s2, n):
        lo, hi, s, s2 = (np.asarray(a, np.float64) for a in (lo, hi, s, s2))
        if self.lo is None:
            self.lo, self.hi, self.s, self.s2 = lo, hi, s, s2
        else:
            self.lo, self.hi = np.minimum(self.lo, lo), np.maximum(self.hi, hi)
            self.s, self.s2 = self.s + s, self.s2 + s2
        self.n += n

    def result(self) -> Ranges:
        n = max(self.n, 1)
        mean = self.s / n
        var = np.maximum(self.s2 / n - mean * mean, 0.0)
        return Ranges(self.lo, self.hi, np.maximum(np.abs(self.lo), np.abs(self.hi)), mean,
                      np.sqrt(var), self.n)


def capture(model: Capturable, params, batches: Iterable, *,
            what: Sequence[str] = ("ffn", "residual", "key_mass"),
            top_frac: float = 0.1, top_k: int | None = None,
            show_progress: bool = False) -> Capture:
    """Run ``model`` with ``params`` over ``batches`` and keep bounded summaries.

    Args:
      model: provides ``capture_batch(batch, params)`` (see the module docstring).
      params: the parameters to run (e.g. ``model.params`` or a permuted copy).
      batches: the model's batches (``MiniLM.packed_batches(sentences)``; Mamba
        ``VarTensor`` token batches).
      what: names to keep (see ``KINDS``); names a model does not sow are skipped.
      top_frac: channels kept per token for top-k names, as a share of ``D``.
      top_k: the same as a count (overrides ``top_frac``).
      show_progress: a tqdm bar over batches.
    Returns:
      a ``Capture``. Memory is ``O(tokens * k)`` for top-k names and ``O(D)`` for
      ranges, whatever the number of batches.
    """
    unknown = sorted(set(what) - set(KINDS))
    if unknown:
        raise ConfigError(f"capture: unknown what={unknown}; known: {sorted(KINDS)}")
    if top_k is None and not 0 < top_frac <= 1:
        raise ConfigError(f"capture: top_frac must be in (0, 1], got {top_frac}")
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
        raise ConfigError(f"capture: top_k must be a positive integer, got {top_k!r}")
    if not isinstance(model, Capturable):
        raise ConfigError(f"capture: {type(model).__name__} has no capture_batch(batch, params)")
    if show_progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="capture", unit="batch")
    parts: dict[str, list] = {}
    ranges: dict[str, _RangeSum] = {}
    tokens: dict[str, list] = {}
    dims: dict[str, int] = {}
    n_batches = 0
    for batch in batches:
        n_batches += 1
        for key, (arr, valid) in model.capture_batch(batch, params).items():
            name = key.rsplit("/", 1)[-1]
            if name not in what:
                continue
            valid = np.asarray(valid, bool)
            kind = KINDS[name]
            if kind == "topk":
                d = int(np.prod(arr.shape[1:]))
                k = min(d, int(top_k) if top_k is not None else max(1, math.ceil(top_frac * d)))
                vals, idx = (np.asarray(a)[valid] for a in top_k_rows(arr, k))
                parts.setdefault(key, []).append((vals, idx))
                dims[key] = d
            elif kind == "ranges":
                lo, hi, s, s2 = row_moments(arr, jnp.asarray(valid))
                ranges.setdefault(key, _RangeSum()).add(lo, hi, s, s2, int(valid.sum()))
            else:
                tokens.setdefault(key, []).append(np.asarray(arr, np.float32)[valid])
    topk = {key: _csr(p, dims[key]) for key, p in parts.items()}
    n_tok = {key: m.shape[0] for key, m in topk.items()}
    return Capture(topk, {k: r.result() for k, r in ranges.items()},
                   {k: np.concatenate(v) for k, v in tokens.items()},
                   dict(batches=n_batches, tokens=n_tok, top_frac=top_frac, top_k=top_k,
                        what=list(what)))


def _csr(chunks: list[tuple[np.ndarray, np.ndarray]], d: int) -> sp.csr_matrix:
    vals = np.concatenate([v for v, _ in chunks])
    idx = np.concatenate([i for _, i in chunks])
    n, k = idx.shape
    indptr = np.arange(0, n * k + 1, k, dtype=np.int64)
    m = sp.csr_matrix((vals.reshape(-1), idx.reshape(-1), indptr), shape=(n, d))
    m.sort_indices()
    return m
