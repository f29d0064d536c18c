"""Permutation solver: spectral order, Louvain clusters, local search; baselines; N:M search.

``fit_permutation(W, ...)`` returns ``(pi, stats)``; ``pi[p]`` is the original channel at
position ``p`` (int32), ``stats`` has ``C, Q, J, method, improved, elapsed_s, iters,
start_J, spectral_method, budget_cut``. Every step counts against ``time_budget_s``: the
eigensolver is stopped at its share of the budget (reverse Cuthill-McKee orders what is
left), Louvain is skipped once the budget is spent, the local search gets the rest.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import time

import numpy as np
import scipy.sparse as sp
import scipy.sparse.csgraph as csgraph
import scipy.sparse.linalg as spla

from icd_jax import checks
from icd_jax.cost import CostConfig, objective, phi
from icd_jax.errors import ConfigError, WeightError
from icd_jax.graph import CoAccessGraph, validate
from icd_jax.permute import check_order, invert_order, validate_order


def _as_csr(W) -> sp.csr_matrix:
    w = W.csr if isinstance(W, CoAccessGraph) else W
    if not sp.issparse(w):
        w = sp.csr_matrix(np.asarray(w, np.float64))
    w = sp.csr_matrix(w, dtype=np.float64)
    validate(w)
    w.setdiag(0)
    w.eliminate_zeros()
    return w


# -- spectral ordering ------------------------------------------------------------------
#: Components of fewer nodes get a dense eigendecomposition (cheap, exact).
DENSE_EIGH_MAX = 200
#: Share of ``fit_permutation``'s time budget the spectral step may use before the
#: remaining components fall back to reverse Cuthill-McKee.
SPECTRAL_SHARE = 0.5


class _OutOfTime(Exception):
    """Raised inside the eigensolver's matvec when the deadline has passed."""


def _deadline(time_budget_s: float | None) -> float | None:
    """Absolute ``time.perf_counter()`` deadline of a budget (``None``: no limit)."""
    return None if time_budget_s is None else time.perf_counter() + max(time_budget_s, 0.0)


def _left(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (``None``: no limit; never negative)."""
    return None if deadline is None else max(deadline - time.perf_counter(), 0.0)


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.perf_counter() >= deadline


def check_budget(time_budget_s) -> float | None:
    """``time_budget_s`` as a float (seconds, ``>= 0``) or ``None``; else ``ConfigError``."""
    if time_budget_s is None:
        return None
    try:
        b = float(time_budget_s)
    except (TypeError, ValueError):
        raise ConfigError(f"time_budget_s must be a number of seconds or None, got "
                          f"{time_budget_s!r}") from None
    if isinstance(time_budget_s, bool) or not b >= 0:
        raise ConfigError(f"time_budget_s must be >= 0 seconds or None, got {time_budget_s!r}")
    return None if math.isinf(b) else b


def fiedler_vector(w: sp.csr_matrix, seed: int = 0,
                   time_budget_s: float | None = None) -> np.ndarray | None:
    """Fiedler vector (``float64[n]``) of the normalised Laplacian of a connected graph
    (``D^-1/2 v``), or ``None`` when ``time_budget_s`` ran out before the sparse
    eigensolver converged (graphs of fewer than ``DENSE_EIGH_MAX`` nodes use a dense
    solver and always finish) or the solver did not converge."""
    n = w.shape[0]
    if n <= 2:
        return np.arange(n, dtype=np.float64)
    deadline = _deadline(time_budget_s)
    deg = np.asarray(w.sum(axis=1)).ravel()
    dinv = 1.0 / np.sqrt(np.maximum(deg, 1e-300))
    a = sp.diags(dinv) @ w @ sp.diags(dinv)
    m = sp.csr_matrix(sp.identity(n) + a)  # = 2I - L_norm, eigenvalues in [0, 2]
    trivial = np.sqrt(deg) / np.linalg.norm(np.sqrt(deg))
    rng = np.random.default_rng(seed)
    if n < DENSE_EIGH_MAX:
        vals, vecs = np.linalg.eigh(m.toarray())
        v = vecs[:, -2]
    else:
        def matvec(x):
            if _expired(deadline):
                raise _OutOfTime
            # deflate the trivial eigenvector (eigenvalue 2) and take the top of the rest
            return m @ x - 2.0 * trivial * (trivial @ x)

        op = spla.LinearOperator((n, n), dtype=np.float64, matvec=matvec)
        try:
            vals, vecs = spla.eigsh(op, k=1, which="LA", tol=1e-6, maxiter=5000,
                                    v0=rng.standard_normal(n))
        except (_OutOfTime, spla.ArpackNoConvergence):
            return None
        v = vecs[:, 0]
    f = v * dinv
    if f[np.argmax(np.abs(f))] < 0:  # fix the sign for determinism
        f = -f
    return f


def spectral_order_report(W, seed: int = 0, time_budget_s: float | None = None
                          ) -> tuple[np.ndarray, dict]:
    """``spectral_order`` within a time budget: ``(order int32[D], report)``.

    Components are ordered largest first; each by its Fiedler vector while the budget
    lasts, by reverse Cuthill-McKee (``O(nnz)``) once it is spent or when the
    eigensolver does not converge. ``report``: ``method`` (``"spectral"``,
    ``"spectral+rcm"`` or ``"rcm"``: what ordered the components of more than two
    nodes), ``components``, ``components_rcm`` and ``cut`` (the budget cut the step).
    """
    w = _as_csr(W)
    deadline = _deadline(time_budget_s)
    n_comp, labels = csgraph.connected_components(w, directed=False)
    sizes = np.bincount(labels, minlength=n_comp)
    out, n_spectral, n_rcm, cut = [], 0, 0, False
    for c in sorted(range(n_comp), key=lambda c: (-sizes[c], c)):
        idx = np.flatnonzero(labels == c)
        if idx.size > 2:
            sub = w[idx][:, idx]
            f = None if _expired(deadline) else fiedler_vector(sub, seed, _left(deadline))
            if f is None:
                cut = cut or _expired(deadline)
                n_rcm += 1
                idx = idx[csgraph.reverse_cuthill_mckee(sub, symmetric_mode=True)]
            else:
                n_spectral += 1
                idx = idx[np.argsort(f, kind="stable")]
        out.append(idx)
    method = "rcm" if n_rcm and not n_spectral else "spectral+rcm" if n_rcm else "spectral"
    order = np.concatenate(out).astype(np.int32) if out else np.zeros(0, np.int32)
    return order, dict(method=method, components=int(n_comp), components_rcm=n_rcm, cut=cut)


def spectral_order(W, seed: int = 0, time_budget_s: float | None = None) -> np.ndarray:
    """Order by the Fiedler vector, component by component (largest component first);
    ``int32[D]``. With ``time_budget_s``, components left when it runs out are ordered by
    reverse Cuthill-McKee (see ``spectral_order_report``)."""
    return spectral_order_report(W, seed, time_budget_s)[0]


def louvain_clusters(W, seed: int = 0, resolution: float = 1.0) -> np.ndarray:
    """Louvain communities (scikit-network's, seeded): ``int32[D]`` labels."""
    from sknetwork.clustering import Louvain

    w = _as_csr(W)
    if w.nnz == 0:
        return np.arange(w.shape[0], dtype=np.int32)
    algo = Louvain(resolution=resolution, random_state=int(seed), sort_clusters=True)
    return np.asarray(algo.fit_predict(w.astype(np.float64)), np.int32)


def check_clusters(clusters, n: int) -> np.ndarray:
    """Cluster labels as ``int64[n]`` (non-negative integers); else ``ConfigError`` naming
    the expected and the given length, dtype or bad value."""
    a = np.asarray(clusters)
    if a.ndim != 1 or a.shape[0] != n:
        raise ConfigError(f"clusters must be one label per channel: expected shape ({n},), "
                          f"got shape {a.shape}")
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or (
            np.issubdtype(a.dtype, np.floating) and np.all(np.isfinite(a))
            and np.all(a == np.round(a)))):
        raise ConfigError(f"clusters must be integer labels, got dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise ConfigError(f"clusters must be labels >= 0, got {a.min()}")
    return a.astype(np.int64)


def _group_order(w: sp.csr_matrix, labels: np.ndarray, k: int, seed: int,
                 time_budget_s: float | None = None) -> tuple[np.ndarray, dict]:
    """Spectral order of ``k`` groups on the quotient graph ``Z^T W Z`` (no self loops)."""
    z = sp.csr_matrix((np.ones(labels.size), (np.arange(labels.size), labels)),
                      shape=(labels.size, k))
    q = sp.csr_matrix(z.T @ w @ z)
    q.setdiag(0)
    q.eliminate_zeros()
    if k <= 2:
        return np.arange(k), dict(method="spectral", components=k, components_rcm=0, cut=False)
    return spectral_order_report(q, seed, time_budget_s)


def cluster_order_report(W, clusters, seed: int = 0, global_order: np.ndarray | None = None,
                         time_budget_s: float | None = None) -> tuple[np.ndarray, dict]:
    """``cluster_order`` within a time budget: ``(order int32[D], report)``; the report is
    that of the spectral order of the cluster graph (see ``spectral_order_report``)."""
    w = _as_csr(W)
    clusters = check_clusters(clusters, w.shape[0])
    deadline = _deadline(time_budget_s)
    k = int(clusters.max()) + 1 if clusters.size else 0
    corder, report = _group_order(w, clusters, k, seed, time_budget_s)
    if global_order is None:
        global_order, rep = spectral_order_report(w, seed, _left(deadline))
        report = dict(report, cut=report["cut"] or rep["cut"])
    rank_in_global = invert_order(check_order("global_order", global_order, w.shape[0]))
    out = [np.zeros(0, np.int64)]
    for c in corder:
        idx = np.flatnonzero(clusters == c)
        out.append(idx[np.argsort(rank_in_global[idx], kind="stable")])
    return np.concatenate(out).astype(np.int32), report


def cluster_order(W, clusters: np.ndarray, seed: int = 0,
                  global_order: np.ndarray | None = None,
                  time_budget_s: float | None = None) -> np.ndarray:
    """Clusters kept contiguous, ordered spectrally on the cluster graph; nodes inside a
    cluster ordered by the global spectral order. ``clusters``: ``int[D]`` labels (a wrong
    length raises ``ConfigError``); returns ``int32[D]``."""
    return cluster_order_report(W, clusters, seed, global_order, time_budget_s)[0]


# -- baselines --------------------------------------------------------------------------
def baseline(W, name: str, seed: int = 0) -> np.ndarray:
    """``identity``, ``rcm`` (reverse Cuthill-McKee), ``fiedler`` or ``louvain``."""
    w = _as_csr(W)
    n = w.shape[0]
    if name == "identity":
        return np.arange(n, dtype=np.int32)
    if name == "rcm":
        return csgraph.reverse_cuthill_mckee(w, symmetric_mode=True).astype(np.int32)
    if name == "fiedler":
        return spectral_order(w, seed)
    if name == "louvain":
        labels = louvain_clusters(w, seed)
        return np.argsort(labels, kind="stable").astype(np.int32)
    raise ConfigError(f"unknown baseline {name!r}; use identity, rcm, fiedler or louvain")


BASELINES = ("identity", "rcm", "fiedler", "louvain")


# -- local search -----------------------------------------------------------------------
class LocalSearch:
    """State of the local search: an order and its exact J, updated incrementally.

    ``propose(rng)`` draws a move ``(nodes, new_positions)`` (swap, 2-opt reversal or
    block move), ``delta`` scores it over the moved channels' incident edges only
    (``(dJ, update)``), ``apply`` commits it; ``J()`` is the current objective.
    """

    def __init__(self, w: sp.csr_matrix, pi: np.ndarray, cfg: CostConfig):
        self.cfg = cfg
        self.n = n = w.shape[0]
        self.indptr, self.indices, self.data = w.indptr, w.indices.astype(np.int64), w.data
        self.perm = pi.astype(np.int64).copy()
        self.pos = invert_order(self.perm)
        self.deg = np.asarray(w.sum(axis=1)).ravel()
        self.two_m = float(self.data.sum())
        n_blocks = -(-n // cfg.g)
        self.phi_max = float(phi(max(n_blocks - 1, 0), cfg.lam, cfg.tau))
        self.c_norm = self.two_m * self.phi_max if self.two_m * self.phi_max > 0 else 1.0
        self.flag = np.zeros(n, bool)
        r = np.repeat(np.arange(n), np.diff(self.indptr))
        pr, pc = self.pos[r], self.pos[self.indices]
        self.c_raw = float((self.data * phi(np.abs(pr // cfg.g - pc // cfg.g), cfg.lam,
                                            cfg.tau)).sum())
        qr, qc = self._qb(pr), self._qb(pc)
        k = cfg.k_blocks
        self.inn = np.bincount(qr, weights=self.data * (qr == qc), minlength=k)
        self.tot = np.bincount(self._qb(self.pos), weights=self.deg, minlength=k)

    def _qb(self, p):
        return (p * self.cfg.k_blocks) // self.n

    def J(self, c_raw=None, inn=None, tot=None) -> float:
        c_raw = self.c_raw if c_raw is None else c_raw
        inn = self.inn if inn is None else inn
        tot = self.tot if tot is None else tot
        C = c_raw / self.c_norm
        Q = (inn.sum() / self.two_m - ((tot / self.two_m) ** 2).sum()) if self.two_m else 0.0
        return self.cfg.alpha * C - self.cfg.mu * Q

    def delta(self, nodes: np.ndarray, newpos: np.ndarray):
        cfg = self.cfg
        ip, ind = self.indptr, self.indices
        counts = ip[nodes + 1] - ip[nodes]
        if counts.sum() == 0 and self.two_m == 0:
            return 0.0, None
        total = int(counts.sum())
        src = np.repeat(np.arange(nodes.size), counts)
        sel = np.arange(total) + (ip[nodes] - (np.cumsum(counts) - counts))[src]
        nbr = ind[sel]
        w = self.data[sel]
        old = self.pos[nodes]
        self.flag[nodes] = True
        factor = np.where(self.flag[nbr], 1.0, 2.0)  # full-matrix count of each edge
        self.pos[nodes] = newpos
        new_nbr = self.pos[nbr]
        self.pos[nodes] = old
        old_nbr = self.pos[nbr]
        self.flag[nodes] = False
        os_, ns_ = old[src], newpos[src]
        g = cfg.g
        d_old = phi(np.abs(os_ // g - old_nbr // g), cfg.lam, cfg.tau)
        d_new = phi(np.abs(ns_ // g - new_nbr // g), cfg.lam, cfg.tau)
        c_raw = self.c_raw + float((factor * w * (d_new - d_old)).sum())
        k = cfg.k_blocks
        qo_s, qo_n, qn_s, qn_n = self._qb(os_), self._qb(old_nbr), self._qb(ns_), self._qb(new_nbr)
        fw = factor * w
        inn = (self.inn - np.bincount(qo_s, weights=fw * (qo_s == qo_n), minlength=k)
               + np.bincount(qn_s, weights=fw * (qn_s == qn_n), minlength=k))
        tot = (self.tot - np.bincount(self._qb(old), weights=self.deg[nodes], minlength=k)
               + np.bincount(self._qb(newpos), weights=self.deg[nodes], minlength=k))
        return self.J(c_raw, inn, tot) - self.J(), (c_raw, inn, tot)

    def apply(self, nodes, newpos, update):
        self.c_raw, self.inn, self.tot = update
        self.pos[nodes] = newpos
        self.perm[newpos] = nodes

    def propose(self, rng: np.random.Generator):
        n, g = self.n, self.cfg.g
        kind = rng.integers(3)
        window = max(int(2 * (self.cfg.lam + 1) * g), 4)
        if kind == 0:  # swap two channels: adjacent, or up to a few blocks apart
            p = int(rng.integers(n))
            step = 1 if rng.random() < 0.25 else int(rng.integers(-window, window + 1))
            q = int(np.clip(p + step, 0, n - 1))
            if p == q:
                return None
            return np.array([self.perm[p], self.perm[q]]), np.array([q, p])
        if kind == 1:  # 2-opt: reverse a segment
            p = int(rng.integers(n))
            length = int(rng.integers(2, max(3, min(g, n - p) + 1)))
            if p + length > n:
                return None
            nodes = self.perm[p : p + length].copy()
            return nodes, np.arange(p + length - 1, p - 1, -1)
        # block move: move segment [p, p + L) to start at q, shifting what lies between;
        # L < n so that the segment and its target both fit (n may be far below g)
        length = int(rng.integers(1, max(2, min(g // 2, n))))
        p = int(rng.integers(0, max(n - length, 1)))
        q = int(np.clip(p + rng.integers(-2 * g, 2 * g + 1), 0, n - length))
        if q == p:
            return None
        lo, hi = min(p, q), max(p, q) + length
        seg = self.perm[p : p + length]
        rest = np.concatenate([self.perm[lo:p], self.perm[p + length : hi]])
        new_order = (np.concatenate([seg, rest]) if q < p else np.concatenate([rest, seg]))
        return new_order.copy(), np.arange(lo, hi)


def local_search(W, pi, cfg: CostConfig | None = None, steps: int = 20000,
                 seed: int = 0, time_budget_s: float | None = None) -> tuple[np.ndarray, int]:
    """Greedy local search from ``pi``; returns ``(pi, iterations done)``.

    Deterministic for a given seed and step count; the time budget only truncates.
    """
    w = _as_csr(W)
    ls = LocalSearch(w, validate_order(pi, w.shape[0], "pi"), cfg or CostConfig())
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    it = 0
    if w.shape[0] < 2:
        return ls.perm.astype(np.int32), 0
    for it in range(1, steps + 1):
        mv = ls.propose(rng)
        if mv is not None:
            nodes, newpos = mv
            dj, upd = ls.delta(nodes, newpos)
            if upd is not None and dj < -1e-12:
                ls.apply(nodes, newpos, upd)
        if time_budget_s is not None and it % 256 == 0 and (
                time.perf_counter() - t0) > time_budget_s:
            break
    return ls.perm.astype(np.int32), it


# -- the solver -------------------------------------------------------------------------
def _candidates(w: sp.csr_matrix, seed: int, clusters, deadline: float | None,
                spectral_share: float, t0: float) -> tuple[dict, dict]:
    """Spectral and cluster candidate orders within the budget: ``(candidates, report)``.

    The spectral step may use ``spectral_share`` of the budget (from ``t0``); Louvain runs
    only if time is left (given ``clusters`` are always used)."""
    cands: dict[str, np.ndarray] = {}
    cut: list[str] = []
    share = None if deadline is None else t0 + spectral_share * (deadline - t0)
    spec, rep = spectral_order_report(w, seed, _left(share))
    cands[rep["method"]] = spec
    if rep["cut"]:
        cut.append("spectral")
    if clusters is None and _expired(deadline):
        cut.append("louvain")
        return cands, dict(spectral_method=rep["method"], budget_cut=cut)
    labels = louvain_clusters(w, seed) if clusters is None else clusters
    name = "louvain" if clusters is None else "clusters"
    order, crep = cluster_order_report(w, labels, seed, spec, _left(deadline))
    cands[f"{name}+{crep['method']}"] = order
    if crep["cut"]:
        cut.append("cluster_order")
    return cands, dict(spectral_method=rep["method"], budget_cut=cut)


def fit_permutation(
    W, time_budget_s: float | None = 5.0, refine_steps: int = 20000,
    k_blocks: int | None = None, seed: int = 0, init=None, clusters=None,
    cfg: CostConfig | None = None, pi_prev=None, spectral_share: float = SPECTRAL_SHARE,
) -> tuple[np.ndarray, dict]:
    """Find an order of channels minimising ``J = alpha C - mu Q``.

    Candidates: identity, the spectral (Fiedler) order, Louvain clusters (or
    ``clusters=``, ``int[D]`` labels) ordered spectrally, and ``init`` if given; the best
    by J seeds a local search of ``refine_steps`` moves. The result is never worse than
    its start or the identity.

    ``time_budget_s`` (``None``: unlimited) is counted from the call: the spectral step
    may use ``spectral_share`` of it (components left when it runs out are ordered by
    reverse Cuthill-McKee), Louvain is skipped once it is spent, and the local search
    gets what is left. ``stats``: ``C, Q, J, method`` (start candidate + ``"local"``),
    ``improved, elapsed_s, iters, start_J`` (J of every candidate), ``spectral_method``
    (``"spectral"``, ``"spectral+rcm"``, ``"rcm"`` or ``None`` for D <= 2) and
    ``budget_cut`` (the steps the budget cut short: ``"spectral"``, ``"louvain"``,
    ``"cluster_order"``, ``"local"``).
    """
    t0 = time.perf_counter()
    budget = check_budget(time_budget_s)
    if not 0 <= spectral_share <= 1:
        raise ConfigError(f"spectral_share must be in [0, 1], got {spectral_share!r}")
    checks.integer(seed, "seed", 0, 2**32 - 1)
    checks.integer(refine_steps, "refine_steps", 0)
    deadline = None if budget is None else t0 + budget
    w = _as_csr(W)
    n = w.shape[0]
    labels = None if clusters is None else check_clusters(clusters, n)
    cfg = cfg or CostConfig()
    if k_blocks is not None:
        cfg = dataclasses.replace(cfg, k_blocks=int(k_blocks))
    cands = {"identity": np.arange(n, dtype=np.int32)}
    if init is not None:
        cands["init"] = validate_order(init, n, "init").astype(np.int32)
    report = dict(spectral_method=None, budget_cut=[])
    if n > 2:
        found, report = _candidates(w, seed, labels, deadline, spectral_share, t0)
        cands.update(found)
    scores = {k: objective(w, p, cfg, pi_prev)["J"] for k, p in cands.items()}
    start = min(scores, key=scores.get)
    pi, iters = local_search(w, cands[start], cfg, refine_steps, seed, _left(deadline))
    if n >= 2 and iters < refine_steps:
        report["budget_cut"].append("local")
    final = objective(w, pi, cfg, pi_prev)
    if final["J"] > scores[start]:  # cannot happen with greedy moves; guard anyway
        pi, final = cands[start], objective(w, cands[start], cfg, pi_prev)
    stats = dict(final, method=f"{start}+local", improved=bool(final["J"] < scores["identity"]),
                 elapsed_s=time.perf_counter() - t0, iters=int(iters),
                 start_J={k: float(v) for k, v in scores.items()}, **report)
    return pi.astype(np.int32), stats


# -- N:M channel permutation --------------------------------------------------------------
def check_nm(n, m, cols: int) -> tuple[int, int]:
    """``(n, m)`` as ints if ``0 < n <= m`` and ``m`` divides ``cols``; else ``ConfigError``."""
    vals = []
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool | np.bool_):
            raise ConfigError(f"N:M {name} must be an integer, got {name}={v!r}")
        try:
            vals.append(operator.index(v))
        except TypeError:
            raise ConfigError(f"N:M {name} must be an integer, got {name}={v!r}") from None
    n, m = vals
    if m < 1:
        raise ConfigError(f"N:M group size must be >= 1, got m={m}")
    if not 0 < n <= m:
        raise ConfigError(f"N:M needs 0 < n <= m, got n={n} with m={m}")
    if cols % m:
        raise ConfigError(f"{cols} input channels do not split into groups of m={m}")
    return n, m


def abs_weight(weight) -> np.ndarray:
    """``|weight|`` as float64 ``[out, in]``; ``WeightError`` on NaN/inf entries."""
    a = np.abs(np.asarray(weight, np.float64))
    if a.ndim != 2:
        raise ConfigError(f"weight must be [out, in], got shape {a.shape}")
    bad = ~np.isfinite(a)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise WeightError(f"weight has {int(bad.sum())} non-finite (NaN/inf) entries, "
                          f"first at {first}")
    return a


def nm_kept(weight, perm=None, n: int = 2, m: int = 4) -> float:
    """Magnitude kept by N:M pruning of ``weight[:, perm]`` (groups of ``m`` input columns)."""
    a = abs_weight(weight)
    n, m = check_nm(n, m, a.shape[1])
    if perm is not None:
        a = a[:, validate_order(perm, a.shape[1], "perm")]
    rows, cols = a.shape
    g = np.sort(a.reshape(rows, cols // m, m), axis=-1)
    return float(g[..., m - n :].sum())


def _splits(m: int):
    """All ways to split ``2m`` slots into two groups of ``m`` (slot 0 in the first)."""
    from itertools import combinations

    out_a, out_b = [], []
    for rest in combinations(range(1, 2 * m), m - 1):
        a = (0, *rest)
        out_a.append(a)
        out_b.append(tuple(i for i in range(2 * m) if i not in a))
    return np.asarray(out_a), np.asarray(out_b)


def nm_permutation(
    weight, n: int = 2, m: int = 4, time_budget_s: float = 10.0, max_escapes: int = 200,
    seed: int = 0, coaccess=None, max_elements: int = 20_000_000,
) -> tuple[np.ndarray, dict]:
    """Input-channel permutation that maximises the magnitude kept by N:M pruning.

    Stripe-group search in the spirit of NVIDIA ASP's channel permutation: for every
    pair of stripes (``m`` columns each) all ``C(2m-1, m-1)`` re-splits of their ``2m``
    columns are scored at once with NumPy; the best improving pair is applied and only
    pairs touching it are rescored; when no pair improves, an *escape* swaps a random
    column between two random stripes and the search goes on, keeping the best order
    seen. ``time_budget_s`` and ``max_escapes`` bound the search. When scoring all pairs
    at once would take more than ``max_elements`` floats (large kernels: rows x pairs x
    splits x m), each round scores a random sample of pairs that fits and applies every
    improving, stripe-disjoint re-split it finds, until the budget runs out. Because the N:M
    objective does not depend on the order of the groups, the stripes are finally
    ordered by co-access (spectral order of the stripe graph) when ``coaccess`` (a
    ``[cols, cols]`` matrix or ``CoAccessGraph``) is given.

    Returns ``(perm, stats)``: ``weight[:, perm]`` is the permuted matrix; stats hold
    ``kept``, ``kept_default``, ``kept_unstructured`` (top n/m of every row, no
    structure), ``efficacy`` = (kept - default) / (unstructured - default), ``escapes``.
    NaN/inf weights raise ``WeightError``; bad ``n``/``m`` raise ``ConfigError``.
    """
    t0 = time.perf_counter()
    a = abs_weight(weight)
    rows, cols = a.shape
    n, m = check_nm(n, m, cols)
    stripes = cols // m
    rng = np.random.default_rng(seed)
    perm = np.arange(cols)
    sa, sb = _splits(m)
    pi_, pj_ = np.triu_indices(stripes, 1)

    def kept_of(cols_idx):  # [..., m] column indices -> kept magnitude per leading index
        x = np.sort(a[:, cols_idx], axis=-1)  # [rows, ..., m]
        return x[..., m - n :].sum(axis=(0, -1))

    def stripe_cols(p):
        return p.reshape(stripes, m)

    def best_split(p, ii, jj):
        sc = stripe_cols(p)
        both = np.concatenate([sc[ii], sc[jj]], axis=1)  # [P, 2m]
        ka = kept_of(both[:, sa])  # [P, splits]
        kb = kept_of(both[:, sb])
        tot = ka + kb
        best = tot.argmax(axis=1)
        return tot[np.arange(len(ii)), best], best, both

    def evaluate_all(p):
        cur = kept_of(stripe_cols(p))  # [stripes]
        val, best, both = best_split(p, pi_, pj_)
        return cur, val - cur[pi_] - cur[pj_], best, both

    best_perm = perm.copy()
    escapes = 0
    if stripes >= 2 and rows * len(pi_) * len(sa) * m > max_elements:
        best_perm = _nm_sampled(kept_of, perm, stripes, m, sa, sb, rng,
                                t0 + time_budget_s, max(1, max_elements // (rows * len(sa) * m)))
        stripes = 0  # skip the exhaustive loop below
    if stripes >= 2:  # one stripe (or none): no column can move between stripes
        cur, gain, best, both = evaluate_all(perm)
        best_kept = cur.sum()
    while stripes >= 2 and time.perf_counter() - t0 < time_budget_s:
        k = int(gain.argmax())
        if gain[k] > 1e-12:
            s, t = pi_[k], pj_[k]
            cols8 = both[k]
            sc = stripe_cols(perm)
            sc[s] = cols8[sa[best[k]]]
            sc[t] = cols8[sb[best[k]]]
            perm = sc.reshape(-1)
            touched = np.flatnonzero((pi_ == s) | (pj_ == s) | (pi_ == t) | (pj_ == t))
            cur[s], cur[t] = kept_of(sc[s]), kept_of(sc[t])
            val, bst, bth = best_split(perm, pi_[touched], pj_[touched])
            gain[touched] = val - cur[pi_[touched]] - cur[pj_[touched]]
            best[touched] = bst
            both[touched] = bth
            if cur.sum() > best_kept + 1e-12:
                best_perm, best_kept = perm.copy(), cur.sum()
            continue
        if escapes >= max_escapes:
            break
        escapes += 1  # escape: swap one random column between two random stripes
        s, t = rng.choice(stripes, 2, replace=False)
        sc = stripe_cols(perm)
        u, v = rng.integers(m, size=2)
        sc[s, u], sc[t, v] = sc[t, v], sc[s, u]
        perm = sc.reshape(-1)
        cur, gain, best, both = evaluate_all(perm)
    perm = best_perm
    if coaccess is not None:
        perm = _order_stripes(perm, coaccess, m, seed)
    kept = nm_kept(a, perm, n, m)
    default = nm_kept(a, None, n, m)
    keep_per_row = cols * n // m
    unstructured = float(np.sort(a, axis=1)[:, cols - keep_per_row :].sum())
    denom = unstructured - default
    stats = dict(kept=kept, kept_default=default, kept_unstructured=unstructured,
                 efficacy=(kept - default) / denom if denom > 0 else 0.0, escapes=escapes,
                 elapsed_s=time.perf_counter() - t0)
    return perm.astype(np.int32), stats


def _nm_sampled(kept_of, perm, stripes: int, m: int, sa, sb, rng, deadline: float,
                sample: int) -> np.ndarray:
    """Sampled-pair rounds of the stripe re-split search (for kernels too large to score
    every pair at once); returns the improved order."""
    perm = perm.copy()
    stale = 0
    while time.perf_counter() < deadline and stale < 20:
        sc = perm.reshape(stripes, m)
        s = rng.integers(stripes, size=sample)
        t = (s + rng.integers(1, stripes, size=sample)) % stripes
        both = np.concatenate([sc[s], sc[t]], axis=1)  # [P, 2m]
        tot = kept_of(both[:, sa]) + kept_of(both[:, sb])  # [P, splits]
        best = tot.argmax(axis=1)
        gain = tot[np.arange(sample), best] - kept_of(sc[s]) - kept_of(sc[t])
        used = np.zeros(stripes, bool)
        moved = 0
        for k in np.argsort(-gain):
            if gain[k] <= 1e-12:
                break
            if used[s[k]] or used[t[k]]:
                continue
            used[s[k]] = used[t[k]] = True
            sc[s[k]], sc[t[k]] = both[k, sa[best[k]]], both[k, sb[best[k]]]
            moved += 1
        perm = sc.reshape(-1)
        stale = 0 if moved else stale + 1
    return perm


def _order_stripes(perm: np.ndarray, coaccess, m: int, seed: int) -> np.ndarray:
    w = _as_csr(coaccess)
    stripes = perm.size // m
    member = np.empty(perm.size, np.int64)
    member[perm] = np.arange(perm.size) // m  # stripe of each original column
    order, _ = _group_order(w, member, stripes, seed)
    return perm.reshape(stripes, m)[order].reshape(-1)
