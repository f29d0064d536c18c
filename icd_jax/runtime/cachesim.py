"""Simulated cache hit rates for hosts whose hardware counters cannot be read.

The pipeline reports ``l2_hit_pct_sim``: the hit rate of an exact LRU set-associative
cache, sized from the host's cache description (``/sys/devices/system/cpu/cpu0/cache``),
replaying the weight-tile access trace of an activation-sparse FFN. Per token only the
tiles (groups of ``tile`` consecutive stored rows of the down-projection weight) that hold
an active neuron are read, so the layout ``perm`` decides how many tiles, and which, a
token touches. The figure is a model of the cache, not a measurement: no prefetcher, no
other traffic, one core.

A trace is a list of *blocks*: block ``i`` is ``counts[i]`` consecutive cache lines from
line address ``starts[i]`` (line address = byte address // line size). A line maps to set
``line % sets`` with tag ``line // sets``.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from icd_jax.cost import check_permutation
from icd_jax.errors import ConfigError

#: The sysfs folder that describes the caches of the first CPU.
SYSFS_CACHE_ROOT = "/sys/devices/system/cpu/cpu0/cache"
#: Fallback cache when the host describes none: 1 MiB, 16 ways, 64-byte lines.
FALLBACK_SIZE_BYTES = 1 << 20
FALLBACK_WAYS = 16
FALLBACK_LINE_BYTES = 64
#: Lines replayed per batch; at most 2**16 so occurrence ranks fit a radix-sorted uint16.
BATCH_LINES = 1 << 16
#: Cache types that hold data (an instruction cache never sees the weight reads).
DATA_TYPES = ("Unified", "Data")
_SIZE_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


@dataclasses.dataclass(frozen=True)
class CacheLevel:
    """One cache: ``size_bytes = sets * ways * line_bytes``; ``source`` says where it came from
    (a sysfs ``index*`` folder, or ``"fallback: <reason>"``)."""

    level: int
    type: str
    size_bytes: int
    ways: int
    line_bytes: int
    sets: int
    source: str

    def as_dict(self) -> dict:
        """The fields as a plain JSON-ready dict."""
        return dataclasses.asdict(self)


def parse_size(text: str) -> int:
    """Bytes of a sysfs cache size such as ``"48K"``, ``"2M"`` or ``"1024"``."""
    t = text.strip().upper().removesuffix("B")
    digits, suffix = (t[:-1], t[-1]) if t[-1:].isalpha() else (t, "")
    if not digits.isdigit() or suffix not in _SIZE_SUFFIX:
        raise ValueError(f"unreadable cache size {text!r}")
    return int(digits) * _SIZE_SUFFIX[suffix]


def _read(folder: str, name: str) -> str:
    with open(os.path.join(folder, name)) as f:
        return f.read().strip()


def _index_number(name: str) -> int:
    tail = name[len("index"):]
    return int(tail) if tail.isdigit() else 1 << 30


def read_cache_index(folder: str) -> CacheLevel:
    """The cache one sysfs ``index*`` folder describes; ``OSError``/``ValueError`` if it is
    unreadable. A missing ``number_of_sets`` is derived from size, ways and line size; zero
    ways (fully associative) becomes one set of ``size / line`` ways."""
    level = int(_read(folder, "level"))
    ctype = _read(folder, "type")
    size = parse_size(_read(folder, "size"))
    ways = int(_read(folder, "ways_of_associativity"))
    line = int(_read(folder, "coherency_line_size"))
    if size <= 0 or line <= 0 or ways < 0 or level < 1:
        raise ValueError(f"inconsistent cache description in {folder}")
    if ways == 0:
        ways, sets = size // line, 1
    else:
        try:
            sets = int(_read(folder, "number_of_sets"))
        except OSError:
            sets = size // (ways * line)
    if sets < 1 or ways < 1:
        raise ValueError(f"inconsistent cache description in {folder}")
    return CacheLevel(level=level, type=ctype, size_bytes=size, ways=ways, line_bytes=line,
                      sets=sets, source=folder)


def host_caches(root: str = SYSFS_CACHE_ROOT) -> list[CacheLevel]:
    """Every readable cache under ``root`` (sysfs layout), in ``index`` order; unreadable or
    inconsistent entries, and a missing ``root``, are skipped (empty list)."""
    try:
        names = [n for n in os.listdir(root) if n.startswith("index")]
    except OSError:
        return []
    caches = []
    for name in sorted(names, key=_index_number):
        try:
            caches.append(read_cache_index(os.path.join(root, name)))
        except (OSError, ValueError):
            continue
    return caches


def fallback_cache(level: int, reason: str) -> CacheLevel:
    """The documented fallback (1 MiB, 16 ways, 64-byte lines) labelled with ``reason``."""
    sets = FALLBACK_SIZE_BYTES // (FALLBACK_WAYS * FALLBACK_LINE_BYTES)
    return CacheLevel(level=level, type="Unified", size_bytes=FALLBACK_SIZE_BYTES,
                      ways=FALLBACK_WAYS, line_bytes=FALLBACK_LINE_BYTES, sets=sets,
                      source=f"fallback: {reason}")


def cache_for(level: int = 2, root: str = SYSFS_CACHE_ROOT) -> CacheLevel:
    """The first unified or data cache of ``level`` under ``root``; the fallback (see
    ``fallback_cache``) when there is none. ``ConfigError`` for a level below 1."""
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or level < 1:
        raise ConfigError(f"level must be an integer >= 1, got {level!r}")
    for c in host_caches(root):
        if c.level == level and c.type in DATA_TYPES:
            return c
    return fallback_cache(int(level), f"no readable level-{level} data cache under {root}")


def _check_int_vector(name: str, x, minimum: int) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ConfigError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ConfigError(f"{name} must be integers, got dtype {a.dtype}")
    a = a.astype(np.int64)
    if a.size and a.min() < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got minimum {a.min()}")
    return a


def check_blocks(starts, counts) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, counts)`` as int64 vectors of one length, ``starts >= 0`` and
    ``counts >= 1``; else ``ConfigError`` naming the argument."""
    s = _check_int_vector("starts", starts, 0)
    c = _check_int_vector("counts", counts, 1)
    if s.size != c.size:
        raise ConfigError(f"starts and counts differ in length: {s.size} vs {c.size}")
    return s, c


def _check_cache(cache: CacheLevel) -> None:
    if not isinstance(cache, CacheLevel):
        raise ConfigError(f"cache must be a CacheLevel, got {type(cache).__name__}")
    if cache.sets < 1 or cache.ways < 1:
        raise ConfigError(f"cache must have sets >= 1 and ways >= 1, got {cache.sets} sets "
                          f"and {cache.ways} ways")


def _expand_lines(starts: np.ndarray, counts: np.ndarray, ends: np.ndarray, lo: int, hi: int
                  ) -> np.ndarray:
    """Line addresses ``lo:hi`` (int64) of the trace flattened line by line (``ends`` is
    ``cumsum(counts)``; ``lo < hi``)."""
    first, last = np.searchsorted(ends, [lo, hi - 1], side="right")
    begin = ends[first:last + 1] - counts[first:last + 1]
    lens = np.minimum(ends[first:last + 1], hi) - np.maximum(begin, lo)
    return np.repeat(starts[first:last + 1] - begin, lens) + np.arange(lo, hi, dtype=np.int64)


def _split_lines(lines: np.ndarray, n_sets: int) -> tuple[np.ndarray, np.ndarray]:
    """``(lines % n_sets, lines // n_sets)``: set and tag of each line (int64); shifts and
    masks when ``n_sets`` is a power of two."""
    if n_sets & (n_sets - 1) == 0:
        return lines & (n_sets - 1), lines >> (n_sets.bit_length() - 1)
    return lines % n_sets, lines // n_sets


def _occurrences(set_of: np.ndarray, n_sets: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort accesses (``set_of``: int64 set of each, trace order, at most ``BATCH_LINES``) by
    set, keeping trace order within a set. Returns ``(by_set, per_set, rank)``: the sorting
    order, accesses per set, and each sorted access's rank among its set's accesses."""
    key = set_of.astype(np.uint16) if n_sets <= 1 << 16 else set_of
    by_set = np.argsort(key, kind="stable")
    per_set = np.bincount(set_of, minlength=n_sets)
    rank = np.arange(set_of.size) - np.repeat(np.cumsum(per_set) - per_set, per_set)
    return by_set, per_set, rank


def _way_numbers(ways: int) -> np.ndarray:
    """``1 .. ways`` as a ``[ways, 1]`` column of the smallest unsigned dtype that holds it."""
    dtype = np.uint8 if ways < 1 << 8 else np.uint16 if ways < 1 << 16 else np.uint32
    return np.arange(1, ways + 1, dtype=dtype)[:, None]


def _access_round(tags: np.ndarray, age: np.ndarray, g: np.ndarray, s: np.ndarray | None,
                  clock: int) -> int:
    """One access to each set ``s`` (int64, distinct; None: every set, in order) with tags
    ``g``, at time ``clock``; updates the LRU state in place and returns the hits.

    ``tags`` ``[ways, sets]`` int64 (-1 empty); ``age`` ``[ways, sets]`` int64 holds
    ``last-use clock * ways + way`` (clock -1 when empty), so a column's minimum names its
    least recently used way."""
    ways, n_sets = tags.shape
    if s is None:
        s, col_tags, col_age = np.arange(n_sets), tags, age
    else:
        col_tags, col_age = tags[:, s], age[:, s]
    found = ((col_tags == g) * _way_numbers(ways)).max(axis=0)  # 1 + hit way; 0: a miss
    hit = found > 0
    way = np.where(hit, found, col_age.min(axis=0) % ways + 1) - 1
    slot = way * n_sets + s
    tags.reshape(-1)[slot] = g
    age.reshape(-1)[slot] = way + clock * ways
    return int(np.count_nonzero(hit))


def _replay_batch(lines: np.ndarray, tags: np.ndarray, age: np.ndarray, clock: int,
                  batch_lines: int, final: bool) -> tuple[int, int, np.ndarray]:
    """Replay ``lines`` (int64, trace order, at most ``batch_lines``) through the LRU state
    ``tags``/``age`` (see ``_access_round``) in rounds: round ``r`` holds every set's
    ``r``-th access, so each set keeps its access order. Unless ``final``, only the rounds
    that touch every set run (one dense step each) and the rest of the lines are carried
    into the next batch, unless they are over half a batch. Returns ``(hits, clock,
    carried)``; ``carried`` keeps each set's access order."""
    n_sets = tags.shape[1]
    set_of, tag_of = _split_lines(lines, n_sets)
    by_set, per_set, rank = _occurrences(set_of, n_sets)
    n_full, hits = int(per_set.min()), 0
    if final or n_full == 0 or lines.size - n_full * n_sets > batch_lines // 2:
        order = by_set[np.argsort(rank.astype(np.uint16), kind="stable")]
        bounds = np.concatenate([[0], np.cumsum(np.bincount(rank))])
        set_of, tag_of = set_of[order], tag_of[order]
        for r in range(bounds.size - 1):
            s = set_of[bounds[r]:bounds[r + 1]]
            hits += _access_round(tags, age, tag_of[bounds[r]:bounds[r + 1]],
                                  None if s.size == n_sets else s, clock + r)
        return hits, clock + bounds.size - 1, lines[:0]
    full = rank < n_full
    now = by_set[full]
    dense = np.empty(n_full * n_sets, np.int64)
    dense[rank[full] * n_sets + set_of[now]] = tag_of[now]
    for r in range(n_full):
        hits += _access_round(tags, age, dense[r * n_sets:(r + 1) * n_sets], None, clock + r)
    return hits, clock + n_full, lines[by_set[~full]]


def simulate_blocks(starts, counts, cache: CacheLevel, *, batch_lines: int = BATCH_LINES
                    ) -> dict:
    """Exact LRU replay of a block trace (``starts``, ``counts``: int 1-D, same length; block
    ``i`` is lines ``starts[i] .. starts[i] + counts[i] - 1``) through an empty ``cache``.

    Vectorised over sets: each batch of ``batch_lines`` (1 .. 2**16) lines is regrouped into
    rounds that touch every set at most once (each set keeps its own access order), and a
    round is one NumPy step over ``[ways, sets]`` tag and last-use arrays. Returns
    ``{"accesses", "hits", "misses", "hit_pct"}``; ``hit_pct`` (0-100) is None when there
    are no accesses."""
    s, c = check_blocks(starts, counts)
    _check_cache(cache)
    batch_lines = _check_positive("batch_lines", batch_lines)
    if batch_lines > BATCH_LINES:
        raise ConfigError(f"batch_lines must be <= {BATCH_LINES}, got {batch_lines}")
    tags = np.full((cache.ways, cache.sets), -1, np.int64)
    age = np.repeat(np.arange(-cache.ways, 0, dtype=np.int64)[:, None], cache.sets, axis=1)
    ends = np.cumsum(c)
    total, pos, hits, clock = int(ends[-1]) if c.size else 0, 0, 0, 0
    carried = np.zeros(0, np.int64)
    while pos < total or carried.size:
        take = min(batch_lines - carried.size, total - pos)
        lines = np.concatenate([carried, _expand_lines(s, c, ends, pos, pos + take)])
        pos += take
        h, clock, carried = _replay_batch(lines, tags, age, clock, batch_lines, pos >= total)
        hits += h
    return {"accesses": total, "hits": hits, "misses": total - hits,
            "hit_pct": 100.0 * hits / total if total else None}


def _check_positive(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def tile_lines(d: int, tile: int, row_bytes: int, line_bytes: int) -> np.ndarray:
    """Lines (int64 ``[ceil(d / tile)]``) of each tile of a ``d``-row weight: ``ceil(rows *
    row_bytes / line_bytes)``, where the last tile may hold fewer than ``tile`` rows."""
    n_tiles = -(-d // tile)
    rows = np.full(n_tiles, tile, np.int64)
    if n_tiles:
        rows[-1] = d - (n_tiles - 1) * tile
    return -(-(rows * row_bytes) // line_bytes)


def weight_lines(d: int, tile: int, row_bytes: int, line_bytes: int) -> int:
    """Lines a ``d``-row weight occupies with every tile starting on a line boundary."""
    return int(tile_lines(d, tile, row_bytes, line_bytes).sum())


def active_tiles(active, perm, tile: int) -> np.ndarray:
    """Which tiles each token touches: bool ``[tokens, ceil(D / tile)]`` for the bool activity
    ``active [tokens, D]`` (by original neuron) and the order ``perm`` (int ``[D]``,
    position -> original neuron); tile ``k`` holds positions ``k*tile .. (k+1)*tile - 1``."""
    a = np.asarray(active)
    if a.ndim != 2 or a.dtype != np.bool_:
        raise ConfigError(f"active must be a 2-D bool array, got shape {a.shape} dtype {a.dtype}")
    tile = _check_positive("tile", tile)
    d = a.shape[1]
    p = check_permutation(perm, d)
    n_tiles = -(-d // tile)
    pos = np.zeros((a.shape[0], n_tiles * tile), np.bool_)
    pos[:, :d] = a[:, p]
    return pos.reshape(a.shape[0], n_tiles, tile).any(axis=2)


def _layer_blocks(active, perm, tile: int, row_bytes: int, line_bytes: int, base_line: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(token, starts, counts, lines)``: the token (int64) and block of every tile read, in
    token then tile order, and the lines the whole weight occupies."""
    hit = active_tiles(active, perm, tile)
    lines = tile_lines(np.shape(active)[1], tile, row_bytes, line_bytes)
    first = base_line + np.cumsum(lines) - lines
    token, k = np.nonzero(hit)
    return token, first[k], lines[k], int(lines.sum())


def tile_trace(active, perm, tile: int, row_bytes: int, line_bytes: int, base_line: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
    """Block trace ``(starts, counts)`` (int64) of reading the tiles a token needs, token by
    token, tiles in increasing order. ``active``: bool ``[tokens, D]``; ``perm``: int ``[D]``
    (stored row at position ``p`` is original row ``perm[p]``). Tile ``k`` starts on line
    ``base_line + sum(lines of tiles < k)``; a full tile is ``ceil(tile * row_bytes /
    line_bytes)`` lines (see ``tile_lines``)."""
    row_bytes = _check_positive("row_bytes", row_bytes)
    line_bytes = _check_positive("line_bytes", line_bytes)
    base_line = _check_positive("base_line", base_line, 0)
    _, starts, counts, _ = _layer_blocks(active, perm, tile, row_bytes, line_bytes, base_line)
    return starts, counts


def replay(actives: list[np.ndarray], perms: list[np.ndarray], tile: int, row_bytes: int,
           cache: CacheLevel) -> dict:
    """Simulated hit rate of reading every layer's active tiles token by token (token ``t``:
    layer 0's tiles, then layer 1's, ...). ``actives[l]``: bool ``[tokens, D_l]`` (same
    ``tokens`` for all layers); ``perms[l]``: int ``[D_l]``. Layer ``l``'s weight lies right
    after layer ``l - 1``'s, line-aligned, from line 0. Returns ``simulate_blocks``' dict plus
    ``tiles_per_token`` and ``lines_per_token`` (mean over tokens, summed over layers; None
    without tokens) and ``tokens``."""
    _check_cache(cache)
    if len(actives) != len(perms) or not actives:
        raise ConfigError(f"actives and perms must be non-empty lists of one length, got "
                          f"{len(actives)} and {len(perms)}")
    row_bytes = _check_positive("row_bytes", row_bytes)
    shapes = [np.shape(a) for a in actives]
    if any(len(sh) != 2 or sh[0] != shapes[0][0] for sh in shapes):
        raise ConfigError(f"actives must be 2-D with one token count, got shapes {shapes}")
    tokens, base, parts = shapes[0][0], 0, []
    for i, (a, p) in enumerate(zip(actives, perms)):
        token, starts, counts, lines = _layer_blocks(a, p, tile, row_bytes, cache.line_bytes,
                                                     base)
        parts.append((token, np.full(token.size, i), starts, counts))
        base += lines
    token, layer, starts, counts = (np.concatenate(x) for x in zip(*parts))
    order = np.lexsort((starts, layer, token))  # token, then layer, then tile
    out = simulate_blocks(starts[order], counts[order], cache)
    out["tiles_per_token"] = starts.size / tokens if tokens else None
    out["lines_per_token"] = int(counts.sum()) / tokens if tokens else None
    out["tokens"] = int(tokens)
    return out
