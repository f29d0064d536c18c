"""Layout cost of a channel order: cache-distance cost C, modularity Q, objective J.

A permutation ``pi`` is an order: ``pi[p]`` is the original channel at position ``p``;
``pos = inverse(pi)``. Positions are grouped into cache blocks of ``g`` channels.

- ``C(pi)``: ``sum_ij W_ij phi(|blk(i) - blk(j)|) / (sum_ij W_ij * phi_max)`` in [0, 1],
  with ``phi(d) = d`` for ``d <= lam`` and ``lam + tau (d - lam)`` beyond.
- ``Q(pi)``: Newman modularity of the partition of positions into ``k_blocks`` contiguous
  blocks, with the full configuration null model over all pairs.
- ``J = alpha C - mu Q + beta * mean|pos - pos_prev| / D`` (stability term optional).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp

from icd_jax import checks
from icd_jax.errors import ConfigError, GraphError
from icd_jax.permute import invert_order, validate_order


@dataclasses.dataclass(frozen=True)
class CostConfig:
    """Defaults: g=64, lam=3, tau=0.25, k_blocks=4, alpha=1, mu=0.5, beta=0."""

    g: int = 64
    lam: float = 3.0
    tau: float = 0.25
    k_blocks: int = 4
    alpha: float = 1.0
    mu: float = 0.5
    beta: float = 0.0

    def __post_init__(self):
        for name in ("g", "k_blocks"):
            checks.integer(getattr(self, name), f"CostConfig.{name}")
        for name in ("lam", "tau", "alpha", "mu", "beta"):
            checks.number(getattr(self, name), f"CostConfig.{name}")
        if self.g < 1 or self.k_blocks < 1:
            raise ConfigError(f"g and k_blocks must be >= 1, got g={self.g}, "
                              f"k_blocks={self.k_blocks}")
        if self.lam < 0 or self.tau < 0:
            raise ConfigError(f"lam and tau must be >= 0, got {self.lam}, {self.tau}")


def check_permutation(pi, n: int | None = None) -> np.ndarray:
    """``pi`` as ``int64[n]`` if it is a permutation of ``range(n)`` (``n`` defaults to its
    length); else ``PermutationError`` (``permute.validate_order``)."""
    return validate_order(pi, n, "permutation")


def inverse(pi: np.ndarray) -> np.ndarray:
    """Positions of an order: ``inverse(pi)[c]`` is the position of channel ``c``
    (``permute.invert_order``: same integer dtype, validated)."""
    return invert_order(pi)


def phi(d, lam: float, tau: float):
    """Block-distance penalty: ``d`` up to ``lam``, then ``lam + tau (d - lam)``."""
    d = np.asarray(d, np.float64)
    return np.where(d <= lam, d, lam + tau * (d - lam))


def check_graph(w) -> sp.spmatrix:
    """``w`` as a sparse matrix if it is a square co-access graph ``[D, D]`` of finite
    weights, else ``ConfigError`` naming its shape or ``GraphError`` counting its NaN/inf
    entries (they made C and Q NaN)."""
    shape = getattr(w, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != shape[1]:
        raise ConfigError(f"W must be a square [D, D] co-access graph, got shape {shape}")
    w = w if sp.issparse(w) else sp.csr_matrix(np.asarray(w, np.float64))
    bad = int(np.size(w.data) - np.isfinite(w.data).sum())
    if bad:
        raise GraphError(f"W has {bad} NaN/inf entries; a co-access graph's weights must be "
                         "finite")
    return w


def _coo(w: sp.spmatrix):
    c = sp.coo_matrix(w)
    return c.row.astype(np.int64), c.col.astype(np.int64), c.data.astype(np.float64)


def cache_cost(w: sp.spmatrix, pi, cfg: CostConfig = CostConfig()) -> float:
    """C(pi) in [0, 1] (0 when every edge lies within one block)."""
    w = check_graph(w)
    pi = check_permutation(pi, w.shape[0])
    n_blocks = -(-w.shape[0] // cfg.g)
    phi_max = float(phi(max(n_blocks - 1, 0), cfg.lam, cfg.tau))
    r, c, v = _coo(w)
    if phi_max == 0 or v.sum() == 0:
        return 0.0
    pos = inverse(pi)
    d = np.abs(pos[r] // cfg.g - pos[c] // cfg.g)
    return float((v * phi(d, cfg.lam, cfg.tau)).sum() / (v.sum() * phi_max))


def q_blocks(n: int, k: int) -> np.ndarray:
    """Block id of each position when ``n`` positions form ``k`` contiguous blocks."""
    return (np.arange(n, dtype=np.int64) * k) // max(n, 1)


def modularity(w: sp.spmatrix, pi, k_blocks: int = 4) -> float:
    """Newman modularity of the ``k_blocks`` contiguous position blocks under ``pi``
    (``k_blocks`` an integer >= 1)."""
    w = check_graph(w)
    pi = check_permutation(pi, w.shape[0])
    k_blocks = checks.integer(k_blocks, "k_blocks", 1)
    r, c, v = _coo(w)
    two_m = v.sum()
    if two_m == 0:
        return 0.0
    blk = q_blocks(w.shape[0], k_blocks)[inverse(pi)]
    inside = np.bincount(blk[r], weights=v * (blk[r] == blk[c]), minlength=k_blocks)
    deg = np.asarray(w.sum(axis=1)).ravel()
    tot = np.bincount(blk, weights=deg, minlength=k_blocks)
    return float((inside / two_m).sum() - ((tot / two_m) ** 2).sum())


def objective(w: sp.spmatrix, pi, cfg: CostConfig = CostConfig(), pi_prev=None) -> dict:
    """``{"C", "Q", "J"}`` (plus ``"S"``, the stability term, when ``pi_prev`` is given)."""
    C = cache_cost(w, pi, cfg)
    Q = modularity(w, pi, cfg.k_blocks)
    J = cfg.alpha * C - cfg.mu * Q
    out = dict(C=C, Q=Q)
    if pi_prev is not None:
        n = w.shape[0]
        s = float(np.abs(inverse(check_permutation(pi, n)) - inverse(
            check_permutation(pi_prev, n))).mean() / max(n, 1))
        J += cfg.beta * s
        out["S"] = s
    out["J"] = float(J)
    return out


def block_purity(labels, pi, k: int) -> float:
    """Recovery of planted groups by an order: mean over the ``k`` contiguous position
    blocks (``q_blocks``) of the share of the block taken by its most common label.

    1 when every block holds one label (groups recovered, if ``k`` equal groups); about
    the largest group's share for a random order.
    """
    labels = np.asarray(labels)
    pi = check_permutation(pi, labels.size)
    if k < 1:
        raise ConfigError(f"block_purity needs k >= 1 blocks, got k={k}")
    if labels.size == 0:
        return 1.0
    _, lab = np.unique(labels[pi], return_inverse=True)
    blk = q_blocks(labels.size, k)
    counts = np.zeros((k, int(lab.max()) + 1))
    np.add.at(counts, (blk, lab.reshape(-1)), 1)
    sizes = counts.sum(axis=1)
    full = sizes > 0
    return float((counts.max(axis=1)[full] / sizes[full]).mean())


def tiles_touched(active, pi, tile: int) -> float:
    """Mean number of tiles of ``tile`` consecutive positions under ``pi`` that hold at
    least one active channel, per token (``active``: boolean ``[tokens, D]``).

    This is what an activation-sparse kernel that skips all-inactive tiles loads per
    token; a better order packs co-active channels into fewer tiles (lower is better).
    """
    act = sp.csr_matrix(active, dtype=bool) if sp.issparse(active) else np.asarray(active, bool)
    if act.ndim != 2:
        raise ConfigError(f"active must be [tokens, D], got shape {act.shape}")
    if tile < 1:
        raise ConfigError(f"tile must be >= 1 channel, got tile={tile}")
    pi = check_permutation(pi, act.shape[1])
    if act.shape[0] * act.shape[1] == 0:
        return 0.0
    tile_of = inverse(pi) // tile
    hit = np.zeros((act.shape[0], int(tile_of.max()) + 1), bool)
    rows, cols = act.nonzero()
    hit[rows, tile_of[cols]] = True
    return float(hit.sum(axis=1).mean())
