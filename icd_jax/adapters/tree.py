"""Adapters on a whole model: every ``[in, out]`` kernel of a parameter tree, with the
function-preserving permutations of its ``ModelSpec``.

A kernel's input axis (axis 0) is *permutable* when the spec lists it as a plain use
(``group = parts = 1``) of a ``PermAxis``: permuting that axis everywhere (the producer
too) leaves the model's function unchanged, so an order chosen for the transform (N:M
kept magnitude, RPTQ-style ranges) is free to apply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import jax
import numpy as np

from icd_jax.adapters import meta as meta_lib
from icd_jax.adapters import quant, sparsity
from icd_jax.errors import ConfigError
from icd_jax.permute import ModelSpec, flat, nested
from icd_jax.solver import nm_permutation


def kernel_paths(params, include: Callable[[str], bool] | None = None) -> list[str]:
    """Flat paths of the 2-D ``.../kernel`` leaves (optionally filtered by ``include``)."""
    return [p for p, v in flat(params).items()
            if p.endswith("kernel") and np.ndim(v) == 2 and (include is None or include(p))]


def quantized_paths(params) -> list[str]:
    """Flat paths of the leaves that are already ``quant.Quantized`` kernels."""
    leaves = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, quant.Quantized))[0]
    return ["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
            for path, leaf in leaves if isinstance(leaf, quant.Quantized)]


def input_axes(spec: ModelSpec, paths: Iterable[str]) -> dict[str, list[str]]:
    """``{axis name: kernel paths}`` whose input axis is a plain use of that axis."""
    wanted = set(paths)
    out: dict[str, list[str]] = {}
    for ax in spec.axes:
        for u in ax.uses:
            if u.path in wanted and u.axis == 0 and u.group == 1 and u.parts == 1:
                out.setdefault(ax.name, []).append(u.path)
    return out


def identity_perms(spec: ModelSpec) -> dict[str, np.ndarray]:
    return {ax.name: np.arange(ax.size, dtype=np.int32) for ax in spec.axes}


def nm_perms(spec: ModelSpec, params, paths: Iterable[str], n: int = 2, m: int = 4, *,
             time_budget_s: float = 10.0, seed: int = 0, max_rows: int = 4096
             ) -> tuple[dict[str, np.ndarray], dict]:
    """Per permutable axis, the order maximising the N:M kept magnitude of all kernels
    that read it (their ``|W|`` stacked; a random ``max_rows`` of the stacked output
    channels steer the search when there are more); ``time_budget_s`` is split over the
    axes. The stats' ``kept`` figures refer to the rows searched."""
    fp = flat(params)
    groups = input_axes(spec, paths)
    perms = identity_perms(spec)
    stats = {}
    rng = np.random.default_rng(seed)
    for name, kernels in groups.items():
        stacked = np.concatenate([np.asarray(fp[p], np.float32).T for p in kernels], axis=0)
        if stacked.shape[0] > max_rows:
            stacked = stacked[np.sort(rng.choice(stacked.shape[0], max_rows, replace=False))]
        perms[name], stats[name] = nm_permutation(
            stacked, n, m, time_budget_s=time_budget_s / max(len(groups), 1), seed=seed)
    return perms, stats


def sparsify(params, paths: Iterable[str], kind: str = "2:4", rate: float = 0.5):
    """Prune every kernel in ``paths``: ``(params, meta)`` with the total
    ``kept_magnitude`` and the mean ``rel_fro`` over kernels in ``meta["error"]``."""
    fp = dict(flat(params))
    kept = total = 0.0
    errs = []
    for p in paths:
        w = np.asarray(fp[p], np.float32)
        out, m = sparsity.apply_sparsity(w, kind, rate, strict=True)
        fp[p] = out
        mag = np.abs(w.astype(np.float64)).sum()
        kept += m["error"]["kept_magnitude"] * mag
        total += mag
        errs.append(m["error"]["rel_fro"])
    return nested(fp), meta_lib.make(
        "sparsity", dict(type=kind, rate=rate, kernels=len(errs)), repermute=kind != "unstructured",
        reason="N:M group membership decides what survives" if kind != "unstructured" else
        "order-independent", error=dict(kept_magnitude=kept / max(total, 1e-300),
                                        rel_fro=float(np.mean(errs)) if errs else 0.0))


def range_perms(spec: ModelSpec, absmax: Mapping[str, np.ndarray],
                paths: Iterable[str]) -> dict[str, np.ndarray]:
    """RPTQ-style orders: per permutable axis, channels sorted by the activation range of
    the kernels that read it (each kernel's ``absmax [in]`` relative to its median; the
    largest over kernels)."""
    perms = identity_perms(spec)
    for name, kernels in input_axes(spec, paths).items():
        rel = [np.asarray(absmax[p], np.float64) / max(np.median(absmax[p]), 1e-30)
               for p in kernels if p in absmax]
        if rel:
            perms[name] = quant.range_order(np.max(rel, axis=0))
    return perms


def permuted_inputs(spec: ModelSpec, values: Mapping[str, np.ndarray], perms,
                    axis: int = -1) -> dict[str, np.ndarray]:
    """Per-kernel input statistics or samples (``[..., in]``, recorded in the identity
    layout) re-ordered as the kernels' input axes are by ``perms``."""
    order_of = {p: np.asarray(perms[name]) for name, ks in input_axes(spec, values).items()
                for p in ks}
    return {p: (np.take(v, order_of[p], axis=axis) if p in order_of else v)
            for p, v in values.items()}


def shared_inputs(act_absmax: Mapping[str, np.ndarray], paths: Iterable[str]
                  ) -> list[list[str]]:
    """Kernels grouped by identical calibrated inputs (Q, K and V read one input)."""
    groups: dict[bytes, list[str]] = {}
    for p in paths:
        a = np.ascontiguousarray(act_absmax[p], np.float32)
        groups.setdefault(a.tobytes(), []).append(p)
    return list(groups.values())


def static_divisors(act_absmax, group_size: int | None, smooth=None) -> np.ndarray:
    """Per-input-channel divisors ``d [in]`` of static int8 activations: ``x / d`` is
    rounded to int8 with scale ``1 / 127``, so ``d`` is the absmax of the channel's group
    (``group_size`` None: of all channels) after dividing by the SmoothQuant factors
    ``smooth`` (``d = smooth * groupmax(absmax / smooth)``). Folded into the weights
    (``W' = diag(d) W``) they cost nothing at run time."""
    a = np.asarray(act_absmax, np.float64)
    s = np.ones_like(a) if smooth is None else np.asarray(smooth, np.float64)
    r = a / s
    g = a.size if group_size is None else int(group_size)
    peak = np.maximum(r.reshape(-1, g).max(axis=1), 1e-30)
    return (s * np.repeat(peak, g)).astype(np.float32)


def quantize(params, paths: Iterable[str], dtype: str = "int8", group_size: int | None = None,
             *, act: str | None = None, act_absmax: Mapping[str, np.ndarray] | None = None,
             smooth_alpha: float | None = None, group_paths: Iterable[str] | None = None):
    """Quantise every kernel in ``paths`` (``Quantized`` leaves): ``(params, meta)``.

    ``group_paths``: the kernels ``group_size`` applies to (None: all); the others get
    per-token (dynamic) or per-tensor (static) activation scales and per-channel weights.

    - ``act="static"`` (needs ``act_absmax``, ``{path: absmax [in]}``): int8 activations
      with calibrated scales. Per tensor (``group_size`` None) the scale and any
      SmoothQuant factors fold into the weights (per-output-channel int8 of ``diag(d) W``,
      see ``static_divisors``): one int8 matmul per kernel. Per group of ``group_size``
      input channels, weights and activations share the groups (grouped int8 arithmetic;
      folding per-group scales into per-output-channel weights measured far less
      accurate on MiniLM).
    - ``act="dynamic"``: per-token (``group_size`` None) or per-token-per-group int8
      activations; group-wise weights run grouped int8 arithmetic.
    - ``act=None``: weight-only (float32 compute).

    ``smooth_alpha`` (with ``act_absmax``): SmoothQuant factors with that migration
    strength, shared by kernels that read the same input. Kernels whose input size is
    not a multiple of ``group_size`` get per-channel/per-tensor scales (listed in
    ``meta["per_channel_fallback"]``). ``meta["compute"]`` counts kernels per arithmetic
    (``quant.compute``); ``meta["int8_kernels"]`` lists those that run int8.
    """
    paths = list(paths)
    fp = dict(flat(params))
    if (act == "static" or smooth_alpha is not None) and act_absmax is None:
        raise ConfigError("static activations and SmoothQuant need act_absmax "
                          "(calibrated input absmax per kernel)")
    smooth = {}
    if smooth_alpha is not None:
        for group in shared_inputs(act_absmax, paths):
            w_max = np.max([np.abs(np.asarray(fp[p], np.float32)).max(1) for p in group], 0)
            s = quant.smooth_factors(act_absmax[group[0]], w_max, smooth_alpha)
            smooth.update({p: s for p in group})
    errs, q_bytes, f_bytes, fallback, kinds, int8_kernels = [], 0, 0, [], {}, []
    grouped = set(paths if group_paths is None else group_paths)
    for p in paths:
        w = np.asarray(fp[p], np.float32)
        g = group_size if p in grouped else None
        if g is not None and w.shape[0] % g:  # e.g. Mamba's dt_proj (dt_rank inputs)
            g = None
            fallback.append(p)
        w_group, scale, sm = g, None, smooth.get(p)
        if act == "static":
            if g is None:  # one scale (after smoothing): fold it into W
                sm = static_divisors(act_absmax[p], g, sm)
                w_group, scale = None, np.float32(1.0 / 127.0)
            else:
                a = np.asarray(act_absmax[p], np.float64) / (1.0 if sm is None else sm)
                scale = np.maximum(a.reshape(-1, g).max(axis=1), 1e-30) / 127.0
        qk, m = quant.apply_quant(w, dtype, group_size=w_group, act=act, act_scale=scale,
                                  smooth=sm, strict=True)
        fp[p] = qk
        kind = quant.compute(qk)
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind.startswith("int8"):
            int8_kernels.append(p)
        errs.append(m["error"]["rel_fro"])
        q_bytes += m["bytes"]
        f_bytes += m["bytes_f32"]
    n_grouped = (sum(p in grouped and p not in fallback for p in paths)
                 if group_size is not None else 0)  # what ran grouped, fallbacks excluded
    return nested(fp), meta_lib.make(
        "quant", dict(dtype=dtype, group_size=group_size, act=act, kernels=len(errs),
                      smooth_alpha=smooth_alpha, grouped_kernels=n_grouped),
        repermute=n_grouped > 0, reason="group-shared scales" if n_grouped else
        "per-channel scales are order-independent" if group_size is None else
        "no kernel's input size is a multiple of group_size: every kernel fell back to "
        "per-channel scales, which are order-independent",
        error=dict(rel_fro=float(np.mean(errs)) if errs else 0.0),
        bytes=q_bytes, bytes_f32=f_bytes, per_channel_fallback=fallback, compute=kinds,
        int8_kernels=int8_kernels)


def output_errors(params, qparams, inputs: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Measured relative error of each quantised kernel's output ``x @ W`` on real inputs
    ``{path: x [N, in]}`` (in the kernels' own layout), through ``quant.matmul``."""
    import jax.numpy as jnp

    fp, fq = flat(params), flat(qparams)
    out = {}
    for p, x in inputs.items():
        ref = np.asarray(x, np.float64) @ np.asarray(fp[p], np.float64)
        got = np.asarray(quant.matmul(jnp.asarray(x, jnp.float32), fq[p]))
        out[p] = meta_lib.rel_error(ref, got)
    return out


def dequantized(params):
    """The tree with every ``Quantized`` kernel replaced by its float32 value (weight-only
    quantisation for models whose layers take plain arrays)."""
    import jax

    return jax.tree.map(lambda x: x.dequantize() if isinstance(x, quant.Quantized) else x,
                        params, is_leaf=lambda x: isinstance(x, quant.Quantized))
