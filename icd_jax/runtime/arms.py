"""What every target shares: an *arm* (the model under one layout with the configured
transforms), the weight transforms of an arm, and the model's identity for cache keys."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np
import scipy.sparse as sp

from icd_jax import permute
from icd_jax.adapters import meta as meta_lib
from icd_jax.adapters import tree


def guarded(name: str, fn, fallback: Any, strict: bool = False) -> tuple[Any, dict]:
    """``fn() -> (out, meta)`` through ``adapters.meta.guarded`` (a raising transform is a
    no-op with ``ok=False`` and an ``AdapterWarning``; ``strict`` re-raises), with
    ``meta["ok"]`` always set."""
    out, meta = meta_lib.guarded(name, {}, fallback, fn, strict)
    return out, {**meta, "ok": bool(meta.get("ok", True))}


@dataclasses.dataclass
class Arm:
    """One layout of the model: ``perms`` (named axes), the params to run and the
    runner that runs them (an encoder or a config), plus per-transform meta."""

    name: str
    perms: dict[str, np.ndarray]
    params: Any
    runner: Any
    meta: dict


def params_hash(params) -> str:
    """SHA-256 over every leaf's bytes, in path order (a model's identity for the cache)."""
    h = hashlib.sha256()
    for path, leaf in sorted(permute.flat(params).items()):
        h.update(path.encode())
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


def weight_sparsity(params, paths: list[str], s, strict: bool, ffn_meta: dict
                    ) -> tuple[Any, dict]:
    """Apply ``s`` (a ``Sparsity`` section): N:M or unstructured pruning of ``paths``
    (guarded), or, for ``kind="ffn"``, nothing to the weights and ``ffn_meta`` (the
    activation-sparse FFN is an execution-time transform)."""
    if not s.enabled:
        return params, {}
    if s.kind in ("2:4", "unstructured"):
        return guarded("sparsity", lambda: tree.sparsify(params, paths, s.kind, s.rate),
                       params, strict)
    return params, dict(transform="sparsity", ok=True, settings=dict(
        kind="ffn", tile=s.tile, top_frac=s.top_frac, mode=s.mode, max_rows=s.max_rows),
        **ffn_meta)


def quant_fallbacks(q, meta: dict, n_kernels: int) -> list[str]:
    """What of a ``Quant`` section did not run as configured, from ``tree.quantize``'s
    meta: kernels left in float, weight-only compute where int8 activations were asked
    for, group scales that fell back to per-channel/per-tensor."""
    out = []
    if not meta.get("ok", True):
        return [f"quant: {meta.get('warning', 'failed; kernels left in float32')}"]
    kinds = meta.get("compute") or {}
    done = sum(kinds.values())
    if done < n_kernels:
        out.append(f"quant: {n_kernels - done} of {n_kernels} kernels not quantised")
    wants_int8 = q.act != "none" and q.dtype in ("int8", "int4")
    slow = kinds.get("float32-weight-only", 0)
    if wants_int8 and slow:
        out.append(f"quant: {slow} kernels ran weight-only float32 instead of int8")
    if meta.get("per_channel_fallback"):
        out.append(f"quant: group_size {q.group_size} does not divide the inputs of "
                   f"{len(meta['per_channel_fallback'])} kernels; they use one scale")
    return out


def subsample(n_have: int, n: int, seed: int) -> np.ndarray:
    """``min(n, n_have)`` sorted distinct indices, seeded."""
    if n >= n_have:
        return np.arange(n_have)
    return np.sort(np.random.default_rng(seed).choice(n_have, n, replace=False))


def active_positions(acts: sp.csr_matrix, d: int) -> np.ndarray:
    """Boolean ``[tokens, d]`` of the captured top-k channels (stored positions)."""
    out = np.zeros((acts.shape[0], d), bool)
    rows = np.repeat(np.arange(acts.shape[0]), np.diff(acts.indptr))
    out[rows, acts.indices] = True
    return out




def grouped_paths(spec: permute.ModelSpec, paths: list[str], axes, groups_on: str
                  ) -> list[str] | None:
    """The kernels ``transform.quant.group_size`` applies to: all (None) with
    ``groups_on="all"``; with ``"permuted"`` those whose input axis is one of ``axes``
    (the axes the run orders, so the fitted order decides their groups)."""
    if groups_on == "all":
        return None
    by_axis = tree.input_axes(spec, paths)
    return [p for ax in axes for p in by_axis.get(ax, [])]


def weight_only_quant(params, paths: list[str], q, strict: bool, note: str,
                      group_paths: list[str] | None = None) -> tuple[Any, dict]:
    """Quantise ``paths`` per the ``Quant`` section ``q`` and dequantise once (weight-only:
    the model's layers take float arrays); ``group_paths``: the kernels ``q.group_size``
    applies to (None: all, see ``grouped_paths``). Meta lists as fallbacks what weight-only
    cannot run: int8 activations (``q.act``) and SmoothQuant (``q.smooth_alpha``)."""
    def quantize():
        qp, m = tree.quantize(params, paths, q.dtype, q.group_size, group_paths=group_paths)
        return tree.dequantized(qp), {**m, "note": "weight-only (dequantised float32 "
                                      "compute)"}

    out, meta = guarded("quant", quantize, params, strict)
    ran = meta.get("ok", True)
    meta["fallbacks"] = quant_fallbacks(q, meta, len(paths)) + (
        [f"quant: {note} run the {q.dtype} weights dequantised to float32 once "
         "(weight-only), not int8 arithmetic"] if q.act != "none" and ran else []) + (
        [f"quant: smooth_alpha {q.smooth_alpha:g} not applied: {note} run weight-only "
         "quantisation, which has no activation scales to smooth"]
        if q.smooth_alpha is not None and ran else [])
    return out, meta
