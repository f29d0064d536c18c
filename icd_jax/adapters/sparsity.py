"""S: weight sparsity of ``[in, out]`` kernels: N:M along input channels, unstructured.

``nm_mask`` keeps the ``n`` largest ``|w|`` of every group of ``m`` contiguous input
channels, per output channel, so which channels share a group decides what survives:
``icd_jax.nm_permutation`` finds the input-channel order that keeps the most magnitude,
and ``icd_jax.adapters.tree.nm_perms`` applies it function-preservingly (to the
producing layer too). ``unstructured_mask`` keeps the largest ``1 - rate`` of all
entries, whatever the order.
"""

from __future__ import annotations

import re

import numpy as np

from icd_jax.adapters import meta as meta_lib
from icd_jax.adapters.quant import check_kernel
from icd_jax.cost import check_permutation
from icd_jax.errors import ConfigError
from icd_jax.solver import check_nm


def parse_type(kind: str) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; ``"unstructured"`` -> None; else ``ConfigError``."""
    if kind == "unstructured":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(kind))
    if not match:
        raise ConfigError(f"sparsity type must be 'N:M' (e.g. '2:4') or 'unstructured', "
                          f"got {kind!r}")
    return int(match.group(1)), int(match.group(2))


def nm_mask(w, n: int = 2, m: int = 4) -> np.ndarray:
    """``bool [in, out]``: the ``n`` largest ``|w|`` of each group of ``m`` input channels
    (rows) per output channel (ties broken towards the lower row)."""
    a = np.abs(np.asarray(w, np.float32))
    rows, cols = a.shape
    n, m = check_nm(n, m, rows)
    g = a.reshape(rows // m, m, cols)
    rank = np.argsort(np.argsort(-g, axis=1, kind="stable"), axis=1, kind="stable")
    return (rank < n).reshape(rows, cols)


def check_rate(rate) -> float:
    """``rate`` (the fraction of entries removed) as a float in ``[0, 1)``."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating)):
        raise ConfigError(f"sparsity rate must be a number in [0, 1), got {rate!r}")
    if not 0.0 <= float(rate) < 1.0:
        raise ConfigError(f"sparsity rate must be in [0, 1), got {rate}")
    return float(rate)


def unstructured_mask(w, rate: float = 0.5) -> np.ndarray:
    """``bool [in, out]``: all but the ``rate`` fraction of entries with least ``|w|``."""
    a = np.abs(np.asarray(w, np.float32)).ravel()
    drop = int(round(check_rate(rate) * a.size))
    keep = np.ones(a.size, bool)
    keep[np.argsort(a, kind="stable")[:drop]] = False
    return keep.reshape(np.shape(w))


def mask_of(w, kind: str = "2:4", rate: float = 0.5) -> np.ndarray:
    """The mask of ``kind`` (``"N:M"`` or ``"unstructured"`` at ``rate``)."""
    nm = parse_type(kind)
    return unstructured_mask(w, rate) if nm is None else nm_mask(w, *nm)


def apply_sparsity(x, type: str = "2:4", rate: float = 0.5, *, perm=None,  # noqa: A002
                   strict: bool = False) -> tuple[np.ndarray, dict]:
    """Prune one ``[in, out]`` kernel: ``(pruned kernel, meta)``.

    Args:
      x: float ``[in, out]`` kernel.
      type: ``"N:M"`` (groups of M input channels keep N) or ``"unstructured"``.
      rate: fraction removed by ``"unstructured"`` (N:M removes ``1 - N/M``).
      perm: optional input-channel order applied first (``x[perm]``); the producer of
        those channels must be permuted the same way (``adapters.tree.nm_perms``).

    ``meta["error"]``: ``rel_fro``, ``kept_magnitude`` (fraction of ``sum |w|`` kept) and
    ``density``. On failure the kernel comes back unchanged with ``meta["ok"] = False``.
    """
    w = check_kernel(x)
    nm = parse_type(type)
    if nm is not None:
        check_nm(*nm, w.shape[0])
    else:
        check_rate(rate)
    if perm is not None:
        perm = check_permutation(perm, w.shape[0])
    settings = dict(type=type, rate=(1 - nm[0] / nm[1]) if nm else float(rate),
                    permuted=perm is not None)

    def body():
        src = w if perm is None else w[perm]
        keep = mask_of(src, type, rate)
        out = np.where(keep, src, 0).astype(w.dtype)
        mag = np.abs(np.asarray(src, np.float64))
        err = dict(rel_fro=meta_lib.rel_error(src, out),
                   kept_magnitude=float(mag[keep].sum() / max(mag.sum(), 1e-300)),
                   density=float(keep.mean()))
        return out, meta_lib.make(
            "sparsity", settings, repermute=nm is not None,
            reason=("which input channels share a group of M decides what survives: "
                    "nm_permutation's order keeps more magnitude" if nm else
                    "unstructured pruning keeps the same entries in any order"),
            error=err,
            expected_quality=("magnitude pruning without fine-tuning: expect a large "
                              "quality drop at 50%; the permutation only raises the kept "
                              "magnitude"))

    return meta_lib.guarded("sparsity", settings, w, body, strict)
