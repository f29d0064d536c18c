"""Co-access graphs W: which channels are used together.

``build_w(source, **cfg)`` returns a ``CoAccessGraph(csr, meta)``; ``csr`` is a
symmetric, non-negative, finite ``scipy.sparse.csr_matrix`` (float32, zero diagonal).

Sources:
  ``"mock"``         planted-block generator (returns the planted assignment too);
  ``"trace"``        JSONL events ``{"src", "dst", "w"}`` or CSV ``i,j,w`` lines;
  ``"activations"``  an activation matrix ``[tokens, D]`` (co-activation with a per-token
                     top-fraction activity rule by default, so dense GELU activations work).
A graph that carries no layout information (empty, near-uniform, or built from saturated
activity) is returned with a ``DegenerateGraphWarning`` naming what to change.
Normalisation (``normalisation=``): ``"sym"`` = ``D^-1/2 W D^-1/2``; ``"row"`` = rows
scaled to sum 1 then symmetrised ``(W + W.T) / 2``; ``"none"``. ``nnz_cap`` keeps the
heaviest entries (symmetrically) when W has more stored entries than the cap.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import inspect
import io
import json
import math
import os
import types
import warnings
from typing import Any

import numpy as np
import scipy.sparse as sp

from icd_jax import checks
from icd_jax.errors import (
    ConfigError,
    DegenerateGraphWarning,
    GraphError,
    TraceError,
    TraceWarning,
)

NORMALISATIONS = ("sym", "row", "none")
#: Default float32 elements of one row block in ``from_activations`` (64 MiB).
BLOCK_ELEMENTS = 1 << 24
#: Largest weight W (float32) can hold.
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: A graph of >= 3 channels is near-uniform (no layout information) when at least this
#: share of channel pairs is stored and the coefficient of variation of the weights is
#: below ``UNIFORM_CV``.
UNIFORM_DENSITY = 0.9
#: Largest channel count a trace may imply when ``D`` is not given (``read_trace``'s
#: ``max_D``): an index beyond it is a bad line, not a request for a huge matrix.
MAX_TRACE_D = 1 << 24
UNIFORM_CV = 0.05
#: A co-activation graph carries no information when channels are active on more than
#: this share of tokens on average.
SATURATED_ACTIVITY = 0.9
#: What to change when a graph from each source is degenerate.
DEGENERATE_HINTS = types.MappingProxyType({
    "activations": "for dense activations (GELU/SiLU: almost nothing is exactly 0) set "
                   "top_frac (e.g. 0.1: a channel counts as active on a token when it is "
                   "among the token's top 10% by |a|), raise tau, or use mode='correlation'",
    "trace": "the trace has no events between distinct channels, or gives every pair the "
             "same weight; check how it was recorded",
    "mock": "raise avg_degree, or lower D",
})


@dataclasses.dataclass(frozen=True)
class CoAccessGraph:
    """A symmetric co-access matrix and its provenance.

    Attributes:
      csr: ``scipy.sparse.csr_matrix[D, D]`` float32, symmetric, non-negative, zero diagonal.
      meta: ``D``, ``nnz``, ``source``, ``normalisation``, ``seed``, ``hash`` and source details.
      planted: for ``source="mock"``, the planted block of every channel (``int32[D]``).
    """

    csr: sp.csr_matrix
    meta: dict
    planted: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.csr.shape[0]


def content_hash(csr: sp.csr_matrix) -> str:
    """SHA-256 over shape, indptr, indices and data (canonical CSR)."""
    h = hashlib.sha256()
    h.update(np.asarray(csr.shape, np.int64).tobytes())
    for arr in (csr.indptr.astype(np.int64), csr.indices.astype(np.int64),
                csr.data.astype(np.float32)):
        h.update(arr.tobytes())
    return h.hexdigest()


def validate(w: sp.spmatrix, what: str = "W") -> None:
    """Raise ``GraphError`` unless ``w`` is square, finite, non-negative and symmetric."""
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise GraphError(f"{what} must be square, got shape {w.shape}")
    data = w.data
    if not np.all(np.isfinite(data)):
        raise GraphError(f"{what} has {int((~np.isfinite(data)).sum())} NaN/inf entries")
    if (data < 0).any():
        raise GraphError(f"{what} has {int((data < 0).sum())} negative entries")
    diff = abs(w - w.T)
    if diff.nnz and diff.max() > 1e-5 * max(float(abs(w).max()), 1e-30):
        raise GraphError(f"{what} is not symmetric (max |W - W.T| = {diff.max():.3g})")


def _canonical(w: sp.spmatrix) -> sp.csr_matrix:
    w = sp.csr_matrix(w, dtype=np.float32)
    w.setdiag(0)
    w.eliminate_zeros()
    w.sum_duplicates()
    w.sort_indices()
    return w


def normalise(w: sp.csr_matrix, how: str) -> sp.csr_matrix:
    """``w`` normalised by degree: ``"sym"``, ``"row"`` or ``"none"`` (see the module doc)."""
    if how not in NORMALISATIONS:
        raise ConfigError(f"normalisation must be one of {NORMALISATIONS}, got {how!r}")
    if how == "none":
        return w
    deg = np.asarray(w.sum(axis=1, dtype=np.float64)).ravel()  # float32 sums can overflow
    if how == "sym":
        inv = np.where(deg > 0, 1.0 / np.sqrt(np.where(deg > 0, deg, 1)), 0.0)
        d = sp.diags(inv.astype(np.float32))
        return sp.csr_matrix(d @ w @ d)
    inv = np.where(deg > 0, 1.0 / np.where(deg > 0, deg, 1), 0.0)
    r = sp.diags(inv.astype(np.float32)) @ w
    return sp.csr_matrix((r + r.T) * 0.5)


def cap_nnz(w: sp.csr_matrix, nnz_cap: int | None) -> sp.csr_matrix:
    """Keep the heaviest undirected edges so that ``nnz <= nnz_cap`` (symmetric)."""
    if nnz_cap is None or w.nnz <= nnz_cap:
        return w
    upper = sp.triu(w, k=1).tocoo()
    keep = max(int(nnz_cap) // 2, 0)
    order = np.argsort(-upper.data, kind="stable")[:keep]
    u = sp.coo_matrix((upper.data[order], (upper.row[order], upper.col[order])), shape=w.shape)
    return sp.csr_matrix(u + u.T)


def degeneracy(w: sp.spmatrix, active_rate: float | None = None) -> str | None:
    """Why ``w`` carries no layout information, or ``None`` when it may.

    Degenerate: no edges (``D >= 2``); near-uniform and near-complete (``D >= 3``,
    density ``>= UNIFORM_DENSITY``, coefficient of variation of the stored weights
    ``< UNIFORM_CV``); or, for co-activation graphs, a mean activity rate
    ``active_rate > SATURATED_ACTIVITY`` (every channel fires on almost every token).
    """
    n = w.shape[0]
    if n < 2:
        return None  # nothing to order
    if active_rate is not None and active_rate > SATURATED_ACTIVITY:
        return (f"channels are active on {100 * active_rate:.1f}% of tokens on average, so "
                f"co-activation cannot tell them apart")
    if w.nnz == 0:
        return f"the graph of {n} channels has no edges"
    if n >= 3:
        density = w.nnz / (n * (n - 1))
        v = np.asarray(w.data, np.float64)
        cv = float(v.std() / v.mean()) if v.mean() > 0 else 0.0
        if density >= UNIFORM_DENSITY and cv < UNIFORM_CV:
            return (f"the graph is near-uniform: {100 * density:.1f}% of channel pairs are "
                    f"edges and their weights vary by {100 * cv:.2f}% (coefficient of "
                    f"variation)")
    return None


def _finish(w, source: str, normalisation: str, nnz_cap, seed, extra: dict,
            planted=None, active_rate: float | None = None) -> CoAccessGraph:
    w = _canonical(w)
    validate(w)
    w = _canonical(cap_nnz(normalise(w, normalisation), nnz_cap))
    meta = dict(D=int(w.shape[0]), nnz=int(w.nnz), source=source, normalisation=normalisation,
                nnz_cap=nnz_cap, seed=seed, hash=content_hash(w), **extra)
    problem = degeneracy(w, active_rate)
    meta["degenerate"] = problem
    if problem:
        warnings.warn(DegenerateGraphWarning(
            f"degenerate co-access graph from {source!r}: {problem}; "
            f"{DEGENERATE_HINTS[source]}"), stacklevel=3)
    return CoAccessGraph(w, meta, planted)


# -- mock -------------------------------------------------------------------------------
def planted_blocks(
    D: int = 1024, blocks: int = 16, avg_degree: float = 16.0, p_intra: float = 0.8,
    intra: float = 1.0, inter: float = 0.1, noise: float = 0.1, seed: int = 0,
    shuffle: bool = True,
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Random graph with ``blocks`` planted communities (``W``, ``labels``).

    Each channel gets about ``avg_degree`` neighbours, a fraction ``p_intra`` inside its
    own block with weight ``intra``, the rest anywhere with weight ``inter``; weights are
    multiplied by ``1 + noise * |N(0, 1)|``. With ``shuffle`` the channel order is random,
    so the identity order carries no information.
    """
    checks.integer(D, "planted_blocks: D")
    checks.integer(blocks, "planted_blocks: blocks")
    checks.integer(seed, "planted_blocks: seed", 0, 2**32 - 1)
    if D < 2 or blocks < 1 or blocks > D:
        raise ConfigError(f"need D >= 2 and 1 <= blocks <= D, got D={D}, blocks={blocks}")
    checks.number(p_intra, "planted_blocks: p_intra", 0, 1)
    for name, value in (("avg_degree", avg_degree), ("intra", intra), ("inter", inter),
                        ("noise", noise)):
        checks.number(value, f"planted_blocks: {name}", 0)
    rng = np.random.default_rng(seed)
    labels = (np.arange(D) * blocks // D).astype(np.int32)
    starts = np.searchsorted(labels, np.arange(blocks))
    sizes = np.bincount(labels, minlength=blocks)
    half = max(avg_degree / 2.0, 0.5)
    n_in = rng.poisson(half * p_intra, D)
    n_out = rng.poisson(half * (1 - p_intra), D)
    src_in = np.repeat(np.arange(D), n_in)
    lab = labels[src_in]
    dst_in = starts[lab] + (rng.random(src_in.size) * sizes[lab]).astype(np.int64)
    src_out = np.repeat(np.arange(D), n_out)
    dst_out = rng.integers(0, D, src_out.size)
    src = np.concatenate([src_in, src_out])
    dst = np.concatenate([dst_in, dst_out])
    wts = np.concatenate([np.full(src_in.size, intra), np.full(src_out.size, inter)])
    wts = wts * (1 + noise * np.abs(rng.standard_normal(wts.size)))
    keep = src != dst
    w = sp.coo_matrix((wts[keep], (src[keep], dst[keep])), shape=(D, D)).tocsr()
    w = w + w.T
    if shuffle:
        perm = rng.permutation(D)  # new index of old channel i is inv[i]
        w = w[perm][:, perm]
        labels = labels[perm]
    return sp.csr_matrix(w, dtype=np.float32), labels.astype(np.int32)


# -- traces -----------------------------------------------------------------------------
def check_trace_size(D, max_D: int = MAX_TRACE_D) -> int | None:
    """``D`` as an int in ``[1, max_D]`` (or ``None``); else ``ConfigError``."""
    if isinstance(max_D, bool) or not isinstance(max_D, int | np.integer) or max_D < 1:
        raise ConfigError(f"max_D must be an integer >= 1, got max_D={max_D!r}")
    if D is None:
        return None
    if isinstance(D, bool) or not isinstance(D, int | np.integer) or not 1 <= D <= max_D:
        raise ConfigError(f"trace D must be an integer in [1, max_D={max_D}], got D={D!r}")
    return int(D)


def _open_trace(path: str):
    """The trace file opened for reading text; ``TraceError`` naming ``path`` when it is
    missing, a directory or unreadable."""
    if not os.path.exists(path):
        raise TraceError(f"trace file not found: {path}")
    if os.path.isdir(path):
        raise TraceError(f"trace path is a directory, not a file: {path}")
    try:
        return open(path, encoding="utf-8", errors="replace")
    except OSError as e:
        raise TraceError(f"cannot read trace file {path}: {e.strerror or e}") from None


def read_trace(path: str | os.PathLike, D: int | None = None, strict: bool = True,
               fmt: str | None = None, max_D: int = MAX_TRACE_D
               ) -> tuple[sp.csr_matrix, dict]:
    """Parse a JSONL (``{"src", "dst", "w"}``) or CSV (``i,j,w``) trace into a symmetric W.

    Bad lines (unparseable, missing fields, non-integer indices, indices outside
    ``[0, D)`` (or ``[0, max_D)`` when ``D`` is inferred), NaN/inf/negative weights,
    weights beyond float32, edges whose summed weight overflows float32) raise
    ``TraceError`` naming every bad line in strict mode; in lenient mode they are skipped
    with a ``TraceWarning`` and counted in the report. A missing, unreadable or directory
    ``path`` and a trace with no valid events raise ``TraceError``.
    """
    try:
        path = os.fsdecode(path)
    except TypeError:
        raise ConfigError(f"trace path must be a str or os.PathLike, got "
                          f"{type(path).__name__} {path!r}") from None
    D = check_trace_size(D, max_D)
    fmt = fmt or ("csv" if path.endswith(".csv") else "jsonl")
    if fmt not in ("csv", "jsonl"):
        raise ConfigError(f"trace format must be 'csv' or 'jsonl', got {fmt!r}")
    bound = D if D is not None else max_D
    src, dst, wts, lines, problems = [], [], [], [], []
    with _open_trace(path) as f:
        for ln, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                if fmt == "jsonl":
                    ev = json.loads(line)
                    if not isinstance(ev, dict):
                        raise ValueError("not a JSON object")
                    i, j, w = ev["src"], ev["dst"], ev.get("w", 1.0)
                else:
                    row = next(csv.reader(io.StringIO(line)))
                    if len(row) < 2:
                        raise ValueError(f"expected i,j[,w], got {len(row)} fields")
                    if not row[0].strip().lstrip("-").isdigit():
                        if ln == 1:
                            continue  # header
                        raise ValueError(f"non-integer index {row[0]!r}")
                    i, j = row[0], row[1]
                    w = row[2] if len(row) > 2 else 1.0
                i, j, w = _index(i), _index(j), _weight(w)
            except (ValueError, KeyError, TypeError) as e:
                problems.append((ln, f"unparseable: {e}"))
                continue
            if not math.isfinite(w) or w < 0:
                problems.append((ln, f"weight {w} is not finite and non-negative"))
                continue
            if w > FLOAT32_MAX:
                problems.append((ln, f"weight {w:.6g} overflows float32 (max {FLOAT32_MAX:.6g})"))
                continue
            if i < 0 or j < 0 or i >= bound or j >= bound:
                limit = f"D={D}" if D is not None else f"max_D={max_D} (pass D= or max_D=)"
                problems.append((ln, f"index out of range: ({i}, {j}) for {limit}"))
                continue
            src.append(i)
            dst.append(j)
            wts.append(w)
            lines.append(ln)
    src, dst, wts, lines = (np.asarray(src, np.int64), np.asarray(dst, np.int64),
                            np.asarray(wts, np.float64), np.asarray(lines, np.int64))
    bad = _overflowing_edges(src, dst, wts, lines)
    if bad:
        problems = sorted(problems + bad)
        drop = np.isin(lines, [n for n, _ in bad])
        src, dst, wts = src[~drop], dst[~drop], wts[~drop]
    if problems:
        shown = "; ".join(f"line {n}: {m}" for n, m in problems[:5])
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        if strict:
            raise TraceError(f"{path}: {len(problems)} bad lines: {shown}{more}", problems)
        warnings.warn(TraceWarning(f"{path}: skipped {len(problems)} bad lines: {shown}{more}"),
                      stacklevel=2)
    if not src.size:
        raise TraceError(f"{path}: trace holds no accesses (no valid event lines"
                         f"{f'; {len(problems)} bad lines skipped' if problems else ''})",
                         problems)
    n = D if D is not None else int(max(src.max(), dst.max())) + 1
    w = sp.coo_matrix((wts, (src, dst)), shape=(n, n)).tocsr()
    w = w + w.T
    return w, dict(path=os.path.abspath(path), events=int(src.size), skipped=len(problems),
                   problems=problems[:20])


def _overflowing_edges(src, dst, wts, lines) -> list[tuple[int, str]]:
    """``(line, message)`` for every line of an edge whose summed weight overflows float32."""
    off = src != dst  # self loops are dropped from W
    if not off.any():
        return []
    lo, hi = np.minimum(src, dst)[off], np.maximum(src, dst)[off]
    keys, inv = np.unique(np.stack([lo, hi], 1), axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    total = np.bincount(inv, weights=wts[off], minlength=len(keys))
    out = []
    for e in np.flatnonzero(total > FLOAT32_MAX):
        at = lines[off][inv == e]
        listed = ", ".join(str(x) for x in at[:10]) + (", ..." if at.size > 10 else "")
        msg = (f"edge ({keys[e, 0]}, {keys[e, 1]}): summed weight {total[e]:.6g} over lines "
               f"{listed} overflows float32")
        out.extend((int(x), msg) for x in at)
    return out


def _weight(v) -> float:
    if isinstance(v, bool):
        raise ValueError(f"boolean weight {v}")
    return float(v)


def _index(v) -> int:
    if isinstance(v, bool):
        raise ValueError("boolean index")
    if isinstance(v, float) and not v.is_integer():
        raise ValueError(f"non-integer index {v}")
    return int(v)


# -- activations ------------------------------------------------------------------------
def planted_activations(
    tokens: int = 2048, groups: int = 4, group_size: int = 64, noise: float = 1.0,
    spread: float = 0.0, bias: float = -0.5, seed: int = 0, shuffle: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Dense GELU activations ``[tokens, groups * group_size]`` with planted groups.

    Channel ``i`` of group ``c`` is ``s_i * GELU(l_i z_c + noise * e_i + b_i)``: every
    group shares one latent factor ``z_c ~ N(0, 1)`` per token, loadings
    ``l_i ~ U(0.5, 1.5)``, biases ``b_i ~ N(bias, 0.25)``, i.i.d. noise ``e_i``, and
    per-channel scales ``s_i = exp(spread * N(0, 1))`` (``spread > 0``: a few channels
    dominate by magnitude, like outlier channels). Nearly every entry is non-zero.
    Returns ``(acts float32, labels int32)``; ``shuffle`` randomises the channel order.
    """
    if tokens < 1 or groups < 1 or group_size < 1 or noise < 0 or spread < 0:
        raise ConfigError(f"need tokens, groups, group_size >= 1 and noise, spread >= 0, got "
                          f"tokens={tokens}, groups={groups}, group_size={group_size}, "
                          f"noise={noise}, spread={spread}")
    from scipy.special import erf

    rng = np.random.default_rng(seed)
    d = groups * group_size
    labels = np.repeat(np.arange(groups), group_size)
    z = rng.standard_normal((tokens, groups))
    load = rng.uniform(0.5, 1.5, d)
    b = bias + 0.25 * rng.standard_normal(d)
    pre = z[:, labels] * load + noise * rng.standard_normal((tokens, d)) + b
    acts = 0.5 * pre * (1 + erf(pre / np.sqrt(2))) * np.exp(spread * rng.standard_normal(d))
    if shuffle:
        perm = rng.permutation(d)
        acts, labels = acts[:, perm], labels[perm]
    return acts.astype(np.float32), labels.astype(np.int32)


def activity(acts: np.ndarray, tau: float = 0.0, top_frac: float | None = None,
             standardise: bool = False) -> np.ndarray:
    """Boolean ``[tokens, D]``: ``|a| > tau`` and, with ``top_frac``, among the token's top
    ``ceil(top_frac * D)`` channels by ``|a|`` (ties at the cut-off all count as active).

    ``standardise`` ranks ``|a - mean| / sd`` per channel instead of ``|a|``, so channels
    with a large scale do not take every token's top places.
    """
    a = np.asarray(acts, np.float32)
    active = np.abs(a) > tau
    if standardise and a.shape[0]:
        sd = a.std(axis=0)
        a = np.divide(a - a.mean(axis=0), sd, out=np.zeros_like(a), where=sd > 0)
    mag = np.abs(a)
    d = mag.shape[1]
    if top_frac is not None and d:
        k = min(d, max(1, math.ceil(top_frac * d)))
        cut = np.partition(mag, d - k, axis=1)[:, d - k : d - k + 1]
        active &= mag >= cut
    return active


def sparse_activity(acts: sp.spmatrix, tau: float = 0.0, top_frac: float | None = None
                    ) -> sp.csr_matrix:
    """``activity`` for sparse activations (e.g. ``capture``'s top-k CSR): stored
    entries with ``|a| > tau`` and, with ``top_frac``, among their row's top
    ``ceil(top_frac * D)`` stored entries by ``|a|``; a float32 0/1 CSR ``[tokens, D]``."""
    a = sp.csr_matrix(acts, dtype=np.float32)
    a.sum_duplicates()
    t, d = a.shape
    mag = np.abs(a.data)
    keep = mag > tau
    if top_frac is not None and d:
        k = min(d, max(1, math.ceil(top_frac * d)))
        row = np.repeat(np.arange(t), np.diff(a.indptr))
        order = np.lexsort((-mag, row))  # by row, largest first
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order)) - a.indptr[row[order]]
        keep &= rank < k
    out = sp.csr_matrix((keep.astype(np.float32), a.indices, a.indptr), shape=a.shape)
    out.eliminate_zeros()
    return out


def from_activations(
    acts, mode: str = "coactivation", tau: float = 0.0, hub: str = "pmi",
    topk: int | None = 32, top_frac: float | None = 0.4, standardise: bool = False,
    block_elements: int = BLOCK_ELEMENTS,
) -> sp.csr_matrix:
    """Co-access from activations ``[tokens, D]``.

    ``mode="coactivation"``: fraction of tokens where both channels are active, a
    channel being active when ``|a| > tau`` and (with ``top_frac``) among the token's
    top ``top_frac`` fraction of channels by ``|a|`` (see ``activity``; ``standardise``
    ranks per-channel z-scores instead). ``top_frac`` is what makes dense activations
    (GELU: almost nothing is exactly 0) informative; with ``tau=0`` alone every channel
    is active on every token. ``mode="correlation"``: ``|corr(a_i, a_j)|``
    (``tau``/``top_frac``/``hub`` unused). Hub correction ``hub="sym"`` divides by
    ``sqrt(p_i p_j)`` (cosine of the activity indicators), ``hub="pmi"`` uses positive
    PMI ``max(0, log p_ij / (p_i p_j))``, ``hub="none"`` keeps raw values; both
    corrections stop always-active channels from dominating. ``topk`` keeps each row's
    k heaviest entries, symmetrised with the maximum (``None``: keep all). Rows are
    processed in blocks of about ``block_elements / D`` rows, so memory is
    ``O(D * block + nnz)``, never ``O(D^2)`` at once.

    Defaults (``top_frac=0.4, hub="pmi", topk=32``) were chosen from the sweep of
    ``experiments/bench_solver.py --suites=activations`` over planted dense GELU
    activations (several group counts, sizes, noise levels, scale spreads and
    sparsities); ``top_frac`` 0.3-0.5 with PMI and top-16/32 all recovered the groups
    (mean block purity >= 0.975), 0.1 failed when a few channels dominate by scale.
    """
    sparse = sp.issparse(acts)
    a = sp.csr_matrix(acts, dtype=np.float32) if sparse else np.asarray(acts, np.float32)
    if a.ndim != 2:
        raise GraphError(f"activations must be [tokens, D], got shape {a.shape}")
    if not np.all(np.isfinite(a.data if sparse else a)):
        raise GraphError("activations contain NaN or inf")
    if sparse and (mode != "coactivation" or standardise):
        raise ConfigError("sparse activations (top-k captures) support mode='coactivation' "
                          "without standardise; pass a dense [tokens, D] array otherwise")
    if mode not in ("coactivation", "correlation"):
        raise ConfigError(f"mode must be 'coactivation' or 'correlation', got {mode!r}")
    if hub not in ("sym", "pmi", "none"):
        raise ConfigError(f"hub must be 'sym', 'pmi' or 'none', got {hub!r}")
    if not tau >= 0:
        raise ConfigError(f"tau must be >= 0, got tau={tau}")
    if top_frac is not None and not 0 < top_frac <= 1:
        raise ConfigError(f"top_frac must be in (0, 1] or None, got top_frac={top_frac}")
    if topk is not None and (isinstance(topk, bool) or int(topk) != topk or topk < 1):
        raise ConfigError(f"topk must be an integer >= 1 or None, got topk={topk!r}")
    t = a.shape[0]
    d = a.shape[1]
    if mode == "coactivation" and sparse:
        x = sparse_activity(a, tau, top_frac)
        p = np.asarray(x.sum(axis=0)).ravel() / max(t, 1)
        xt = x.T.tocsr()
    elif mode == "coactivation":
        x = activity(a, tau, top_frac, standardise).astype(np.float32)
        p = x.sum(axis=0) / max(t, 1)  # activity rate of each channel
    else:
        x = a - a.mean(axis=0) if t else a
        sd = np.sqrt((x * x).sum(axis=0))
    rows, cols, vals = [], [], []
    if block_elements < 1:
        raise ConfigError(f"block_elements must be >= 1, got {block_elements}")
    block = max(1, min(d, int(block_elements) // max(d, 1)))
    for r0 in range(0, d, block):
        r1 = min(d, r0 + block)
        raw = (xt[r0:r1] @ x).toarray() if sparse else x[:, r0:r1].T @ x  # [block, D]
        if mode == "coactivation":
            w = _hub_correct(raw / max(t, 1), p[r0:r1], p, hub)
        else:
            denom = np.outer(sd[r0:r1], sd)
            w = np.divide(np.abs(raw), denom, out=np.zeros_like(raw), where=denom > 0)
        w[np.arange(r1 - r0), np.arange(r0, r1)] = 0  # no self loops
        if topk is not None and topk < d:
            keep = np.argpartition(-w, int(topk) - 1, axis=1)[:, : int(topk)]
            r = np.repeat(np.arange(r0, r1), keep.shape[1])
            c = keep.reshape(-1)
            v = w[r - r0, c]
        else:
            r, c = np.nonzero(w)
            v = w[r, c]
            r = r + r0
        nz = v > 0
        rows.append(r[nz])
        cols.append(c[nz])
        vals.append(v[nz])
    if not vals:  # no channels
        return sp.csr_matrix((d, d), dtype=np.float32)
    w = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(d, d))
    return sp.csr_matrix(w.maximum(w.T)) if topk is not None else w


def _hub_correct(joint: np.ndarray, p_rows: np.ndarray, p: np.ndarray, hub: str):
    if hub == "none":
        return joint
    denom = np.outer(p_rows, p)
    if hub == "sym":
        s = np.sqrt(denom)
        return np.divide(joint, s, out=np.zeros_like(joint), where=s > 0)
    ratio = np.divide(joint, denom, out=np.zeros_like(joint), where=denom > 0)
    return np.maximum(np.log(np.where(ratio > 0, ratio, 1.0)), 0)


# -- entry point ------------------------------------------------------------------------
_MOCK_KEYS = frozenset(inspect.signature(planted_blocks).parameters)
_TRACE_KEYS = frozenset({"path", "D", "strict", "fmt", "max_D"})
_ACT_KEYS = frozenset(inspect.signature(from_activations).parameters)
_COMMON = frozenset({"normalisation", "nnz_cap"})


def activation_settings(**cfg: Any) -> dict:
    """The effective ``from_activations`` options: its defaults updated with ``cfg``."""
    defaults = {k: p.default for k, p in inspect.signature(from_activations).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **cfg}


def build_w(source: str, **cfg: Any) -> CoAccessGraph:
    """Build a co-access graph from ``"mock"``, ``"trace"`` or ``"activations"``.

    Common options: ``normalisation`` (``"sym"`` default for activations and traces,
    ``"none"`` for mock), ``nnz_cap``. Unknown keys raise ``ConfigError``; a degenerate
    result (see ``degeneracy``) warns with ``DegenerateGraphWarning``.
    """
    allowed = {"mock": _MOCK_KEYS, "trace": _TRACE_KEYS, "activations": _ACT_KEYS}
    if source not in allowed:
        raise ConfigError(f"source must be one of {sorted(allowed)}, got {source!r}")
    unknown = set(cfg) - allowed[source] - _COMMON
    if unknown:
        raise ConfigError(f"unknown build_w({source!r}) options: {sorted(unknown)}")
    norm = cfg.pop("normalisation", "none" if source == "mock" else "sym")
    nnz_cap = cfg.pop("nnz_cap", None)
    if source == "mock":
        w, labels = planted_blocks(**cfg)
        return _finish(w, "mock", norm, nnz_cap, cfg.get("seed", 0),
                       dict(mock={k: v for k, v in cfg.items()}), planted=labels)
    if source == "trace":
        if "path" not in cfg:
            raise ConfigError("build_w('trace') needs path=")
        w, report = read_trace(cfg["path"], cfg.get("D"), cfg.get("strict", True), cfg.get("fmt"),
                               cfg.get("max_D", MAX_TRACE_D))
        return _finish(w, "trace", norm, nnz_cap, None, dict(trace=report))
    if "acts" not in cfg:
        raise ConfigError("build_w('activations') needs acts=")
    acts = cfg.pop("acts")
    w = from_activations(acts, **cfg)
    opts = activation_settings(**cfg)
    rate = None
    shape = acts.shape if sp.issparse(acts) else np.shape(acts)
    if opts["mode"] == "coactivation" and shape[0] * shape[1]:
        if sp.issparse(acts):
            rate = sparse_activity(acts, opts["tau"], opts["top_frac"]).nnz / (shape[0] * shape[1])
        else:
            rate = float(activity(acts, opts["tau"], opts["top_frac"], opts["standardise"]).mean())
    return _finish(w, "activations", norm, nnz_cap, None,
                   dict(activations=dict(tokens=int(shape[0]), active_rate=rate,
                                         sparse=sp.issparse(acts), **opts)), active_rate=rate)
