"""The simulated cache: exact LRU against a naive reference, sysfs parsing, tile traces."""

import collections
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from icd_jax.errors import ConfigError, PermutationError
from icd_jax.runtime.cachesim import (
    BATCH_LINES,
    CacheLevel,
    cache_for,
    host_caches,
    parse_size,
    replay,
    simulate_blocks,
    tile_lines,
    tile_trace,
    weight_lines,
)


def small_cache(sets: int, ways: int, line_bytes: int = 64) -> CacheLevel:
    return CacheLevel(level=2, type="Unified", size_bytes=sets * ways * line_bytes, ways=ways,
                      line_bytes=line_bytes, sets=sets, source="test")


def naive_hits(starts, counts, sets: int, ways: int) -> int:
    """Line-by-line LRU: one OrderedDict per set, least recently used first."""
    lru = [collections.OrderedDict() for _ in range(sets)]
    hits = 0
    for start, count in zip(starts, counts):
        for line in range(int(start), int(start) + int(count)):
            entries, tag = lru[line % sets], line // sets
            if tag in entries:
                entries.move_to_end(tag)
                hits += 1
            else:
                if len(entries) == ways:
                    entries.popitem(last=False)
                entries[tag] = None
    return hits


def naive_tiles(active, perm, tile, row_bytes, line_bytes, base_line=0):
    """Tile trace by loops: token by token, tile by tile, position by position."""
    tokens, d = active.shape
    n_tiles = -(-d // tile)
    starts, counts, line = [], [], base_line
    first, size = [], []
    for k in range(n_tiles):
        rows = min(tile, d - k * tile)
        first.append(line)
        size.append(math.ceil(rows * row_bytes / line_bytes))
        line += size[-1]
    for t in range(tokens):
        for k in range(n_tiles):
            if any(active[t, perm[p]] for p in range(k * tile, min((k + 1) * tile, d))):
                starts.append(first[k])
                counts.append(size[k])
    return starts, counts


blocks = st.lists(st.tuples(st.integers(0, 80), st.integers(1, 30)), max_size=25)


@given(sets=st.sampled_from([1, 2, 4, 8]), ways=st.sampled_from([1, 2, 4]), trace=blocks,
       repeats=st.integers(1, 3), batch=st.sampled_from([1, 3, 16, BATCH_LINES]))
def test_simulate_blocks_matches_naive_lru(sets, ways, trace, repeats, batch):
    trace = trace * repeats  # repeated blocks: later passes hit what still fits
    starts = np.array([s for s, _ in trace], np.int64)
    counts = np.array([c for _, c in trace], np.int64)
    out = simulate_blocks(starts, counts, small_cache(sets, ways), batch_lines=batch)
    assert out["hits"] == naive_hits(starts, counts, sets, ways)
    assert out["accesses"] == int(counts.sum()) == out["hits"] + out["misses"]
    if out["accesses"]:
        assert out["hit_pct"] == pytest.approx(100 * out["hits"] / out["accesses"])


@pytest.mark.parametrize("sets,ways", [(64, 4), (24, 3)])
@pytest.mark.parametrize("batch", [512, 2048, BATCH_LINES])
def test_simulate_blocks_matches_naive_on_a_larger_cache(sets, ways, batch):
    """Tile-like blocks longer than the sets (a power of two or not): full dense rounds,
    lines carried between batches and the sparse last batch all run."""
    rng = np.random.default_rng(3)
    starts = rng.integers(0, 2000, 120)
    counts = rng.integers(1, 200, 120)
    starts = np.concatenate([starts, starts[:40]])
    counts = np.concatenate([counts, counts[:40]])
    out = simulate_blocks(starts, counts, small_cache(sets, ways), batch_lines=batch)
    assert out["hits"] == naive_hits(starts, counts, sets, ways)


def test_fully_associative_by_hand():
    cache = small_cache(1, 2)
    # lines A B A C B: miss miss hit miss (C evicts B) miss (B evicts A)
    out = simulate_blocks([0, 1, 0, 2, 1], [1, 1, 1, 1, 1], cache)
    assert (out["hits"], out["misses"]) == (1, 4)
    # 4 ways, blocks [0,1,2] [1,2,3] [4] [0]: lines 0 1 2 1 2 3 4 0 -> hits at 1 and 2 only;
    # 4 evicts 0 (least recently used), then 0 misses
    out = simulate_blocks([0, 1, 4, 0], [3, 3, 1, 1], small_cache(1, 4))
    assert out == {"accesses": 8, "hits": 2, "misses": 6, "hit_pct": 25.0}


def test_two_way_set_by_hand():
    # 2 sets, 1 way: lines 0 and 2 share set 0 and evict each other, line 1 stays in set 1
    out = simulate_blocks([0, 2, 0, 1, 1], [1, 1, 1, 1, 1], small_cache(2, 1))
    assert (out["hits"], out["misses"]) == (1, 4)


@pytest.mark.parametrize("sets,ways,block", [(4, 2, 3), (1024, 16, 384)])
def test_a_trace_that_fits_hits_after_the_first_pass(sets, ways, block):
    capacity = sets * ways
    starts = np.arange(0, capacity, block)
    counts = np.minimum(block, capacity - starts)
    trace_s, trace_c = np.tile(starts, 3), np.tile(counts, 3)
    for batch in (capacity // 2 or 1, BATCH_LINES):
        out = simulate_blocks(trace_s, trace_c, small_cache(sets, ways), batch_lines=batch)
        assert out["misses"] == capacity
        assert out["hits"] == 2 * capacity


def test_a_trace_one_line_too_big_for_lru_always_misses():
    # cyclic sweep over ways + 1 lines of one set: LRU evicts exactly the next line needed
    out = simulate_blocks(np.tile(np.arange(5) * 8, 4), np.ones(20, np.int64), small_cache(8, 4))
    assert out["hits"] == 0


def test_no_accesses_gives_no_hit_rate():
    out = simulate_blocks(np.zeros(0, np.int64), np.zeros(0, np.int64), small_cache(4, 2))
    assert out == {"accesses": 0, "hits": 0, "misses": 0, "hit_pct": None}


@pytest.mark.parametrize("starts,counts,word", [
    ([[0, 1]], [[1, 1]], "starts"),
    ([0, 1], [1], "length"),
    ([-1], [1], "starts"),
    ([0], [0], "counts"),
    ([0.5], [1], "starts"),
    ([0], [1.0], "counts"),
])
def test_bad_blocks_raise_config_error(starts, counts, word):
    with pytest.raises(ConfigError, match=word):
        simulate_blocks(starts, counts, small_cache(2, 2))


def test_bad_cache_and_batch_raise_config_error():
    with pytest.raises(ConfigError, match="sets"):
        simulate_blocks([0], [1], small_cache(0, 2))
    with pytest.raises(ConfigError, match="cache"):
        simulate_blocks([0], [1], {"sets": 2, "ways": 2})
    for batch in (0, BATCH_LINES + 1):
        with pytest.raises(ConfigError, match="batch_lines"):
            simulate_blocks([0], [1], small_cache(2, 2), batch_lines=batch)


def write_index(folder, **files):
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(f"{text}\n")


def full_index(level, kind, size, ways, sets):
    return dict(level=level, type=kind, size=size, ways_of_associativity=ways,
                coherency_line_size=64, number_of_sets=sets)


def test_host_caches_parses_a_fake_sysfs_tree(tmp_path):
    write_index(tmp_path / "index0", **full_index(1, "Data", "48K", 12, 64))
    write_index(tmp_path / "index1", **full_index(1, "Instruction", "32K", 8, 64))
    write_index(tmp_path / "index2", **full_index(2, "Unified", "2M", 16, 2048))
    broken = full_index(3, "Unified", "32768K", 16, 32768)
    del broken["size"]  # a missing file: the entry is skipped
    write_index(tmp_path / "index3", **broken)
    no_sets = full_index(3, "Unified", "8M", 16, 0)
    del no_sets["number_of_sets"]  # derived from size, ways and line size
    write_index(tmp_path / "index10", **no_sets)
    write_index(tmp_path / "index4", **dict(full_index(4, "Unified", "lots", 16, 1)))
    (tmp_path / "uevent").write_text("")
    caches = host_caches(str(tmp_path))
    assert [(c.level, c.type) for c in caches] == [(1, "Data"), (1, "Instruction"),
                                                    (2, "Unified"), (3, "Unified")]
    l1, _, l2, l3 = caches
    assert (l1.size_bytes, l1.ways, l1.line_bytes, l1.sets) == (48 * 1024, 12, 64, 64)
    assert (l2.size_bytes, l2.ways, l2.sets) == (2 << 20, 16, 2048)
    assert l2.source == str(tmp_path / "index2")
    assert (l3.size_bytes, l3.sets) == (8 << 20, 8192)
    assert l2.as_dict() == dict(level=2, type="Unified", size_bytes=2 << 20, ways=16,
                                line_bytes=64, sets=2048, source=str(tmp_path / "index2"))
    assert cache_for(2, str(tmp_path)) == l2
    assert cache_for(1, str(tmp_path)) == l1  # the data cache, not the instruction cache


def test_cache_for_falls_back_when_nothing_is_readable(tmp_path):
    for root in (tmp_path / "missing", tmp_path):
        cache = cache_for(2, str(root))
        assert cache.source.startswith("fallback: ")
        assert str(root) in cache.source
        assert (cache.size_bytes, cache.ways, cache.line_bytes) == (1 << 20, 16, 64)
        assert cache.sets * cache.ways * cache.line_bytes == cache.size_bytes


@pytest.mark.parametrize("level", [0, -1, 1.5, True])
def test_cache_for_rejects_bad_levels(level):
    with pytest.raises(ConfigError, match="level"):
        cache_for(level)


def test_parse_size():
    assert parse_size("48K") == 48 * 1024
    assert parse_size("2M\n") == 2 << 20
    assert parse_size("1024") == 1024
    with pytest.raises(ValueError):
        parse_size("K")


def test_this_host_reports_caches_or_falls_back():
    cache = cache_for(2)
    assert cache.sets >= 1 and cache.ways >= 1 and cache.line_bytes >= 1
    assert cache.source.startswith("fallback: ") or cache.source.startswith("/")


@given(data=st.data(), tokens=st.integers(0, 5), d=st.integers(1, 20),
       tile=st.integers(1, 6), row_bytes=st.sampled_from([8, 24, 64, 100]),
       base=st.integers(0, 50))
def test_tile_trace_matches_naive_loop(data, tokens, d, tile, row_bytes, base):
    active = np.array(data.draw(st.lists(st.lists(st.booleans(), min_size=d, max_size=d),
                                         min_size=tokens, max_size=tokens)), bool)
    active = active.reshape(tokens, d)
    perm = np.array(data.draw(st.permutations(range(d))), np.int64)
    starts, counts = tile_trace(active, perm, tile, row_bytes, 64, base)
    want_s, want_c = naive_tiles(active, perm, tile, row_bytes, 64, base)
    assert starts.tolist() == want_s and counts.tolist() == want_c
    assert starts.dtype == counts.dtype == np.int64
    assert weight_lines(d, tile, row_bytes, 64) == int(tile_lines(d, tile, row_bytes, 64).sum())


def test_grouping_co_active_neurons_reduces_tiles():
    # neurons i and i + 4 fire together; tiles of 4 rows of 32 bytes (2 lines each)
    active = np.zeros((4, 8), bool)
    for t in range(4):
        active[t, [t, t + 4]] = True
    ident = np.arange(8)
    grouped = np.array([0, 4, 1, 5, 2, 6, 3, 7])
    s0, c0 = tile_trace(active, ident, 4, 32, 64)
    s1, c1 = tile_trace(active, grouped, 4, 32, 64)
    assert s0.tolist() == [0, 2] * 4 and c0.tolist() == [2] * 8
    assert s1.tolist() == [0, 0, 2, 2] and c1.tolist() == [2] * 4
    assert len(s1) < len(s0)


def test_tile_lines_of_a_partial_last_tile():
    assert tile_lines(10, 4, 40, 64).tolist() == [3, 3, 2]  # 160, 160 and 80 bytes
    assert weight_lines(10, 4, 40, 64) == 8


def test_tile_trace_rejects_bad_inputs():
    active = np.ones((2, 4), bool)
    with pytest.raises(ConfigError, match="active"):
        tile_trace(active.astype(int), np.arange(4), 2, 8, 64)
    with pytest.raises(ConfigError, match="active"):
        tile_trace(np.ones(4, bool), np.arange(4), 2, 8, 64)
    with pytest.raises(ConfigError, match="tile"):
        tile_trace(active, np.arange(4), 0, 8, 64)
    with pytest.raises(ConfigError, match="row_bytes"):
        tile_trace(active, np.arange(4), 2, 0, 64)
    with pytest.raises(ConfigError, match="line_bytes"):
        tile_trace(active, np.arange(4), 2, 8, -64)
    with pytest.raises(ConfigError, match="base_line"):
        tile_trace(active, np.arange(4), 2, 8, 64, base_line=-1)
    with pytest.raises(PermutationError):
        tile_trace(active, np.array([0, 1, 1, 3]), 2, 8, 64)
    with pytest.raises(PermutationError):
        tile_trace(active, np.arange(5), 2, 8, 64)


def test_replay_interleaves_layers_token_by_token():
    rng = np.random.default_rng(5)
    cache = small_cache(8, 2)
    actives = [rng.random((6, 12)) < 0.3, rng.random((6, 9)) < 0.5]
    perms = [rng.permutation(12), rng.permutation(9)]
    out = replay(actives, perms, 3, 40, cache)
    base1 = weight_lines(12, 3, 40, 64)
    starts, counts = [], []
    for t in range(6):
        for a, p, base in zip(actives, perms, (0, base1)):
            s, c = tile_trace(a[t:t + 1], p, 3, 40, 64, base)
            starts += s.tolist()
            counts += c.tolist()
    want = simulate_blocks(starts, counts, cache)
    assert {k: out[k] for k in want} == want
    assert out["tokens"] == 6
    assert out["tiles_per_token"] == pytest.approx(len(starts) / 6)
    assert out["lines_per_token"] == pytest.approx(sum(counts) / 6)


def test_replay_layers_evict_each_other_token_by_token():
    """Two layers of one 8-line tile each through an 8-line cache: read token by token
    (layer 0, layer 1, layer 0, ...) each tile evicts the other, so nothing hits."""
    active = np.ones((5, 4), bool)
    out = replay([active, active], [np.arange(4)] * 2, 4, 128, small_cache(4, 2))
    assert out["accesses"] == 5 * 2 * 8 and out["hits"] == 0
    alone = replay([active], [np.arange(4)], 4, 128, small_cache(4, 2))
    assert alone["hits"] == 4 * 8


def test_replay_grouped_layout_hits_more():
    """Co-active neurons in one tile: fewer lines per token and a higher hit rate when the
    grouped working set fits the cache and the identity one does not."""
    d, tile = 64, 8
    active = np.zeros((40, d), bool)
    for t in range(40):
        active[t, t // 10 + 4 * np.arange(16)] = True  # neurons g, g+4, ... fire together
    ident = np.arange(d)
    grouped = np.concatenate([g + 4 * np.arange(16) for g in range(4)])
    cache = small_cache(16, 2)  # 32 lines; each tile is 8 rows x 64 B = 8 lines
    a = replay([active], [ident], tile, 64, cache)
    b = replay([active], [grouped], tile, 64, cache)
    assert (a["tiles_per_token"], b["tiles_per_token"]) == (8, 2)
    assert a["hits"] == 0  # 64 lines swept through 32 every token
    assert b["hits"] == 40 * 16 - 4 * 16  # each group's 2 tiles miss once, then stay


def test_replay_rejects_bad_inputs():
    cache = small_cache(4, 2)
    a = np.ones((3, 4), bool)
    with pytest.raises(ConfigError, match="actives and perms"):
        replay([a], [], 2, 8, cache)
    with pytest.raises(ConfigError, match="actives and perms"):
        replay([], [], 2, 8, cache)
    with pytest.raises(ConfigError, match="token count"):
        replay([a, np.ones((2, 4), bool)], [np.arange(4)] * 2, 2, 8, cache)
    with pytest.raises(ConfigError, match="row_bytes"):
        replay([a], [np.arange(4)], 2, 0, cache)


def test_replay_without_tokens():
    out = replay([np.zeros((0, 4), bool)], [np.arange(4)], 2, 8, small_cache(4, 2))
    assert out["tokens"] == 0 and out["tiles_per_token"] is None and out["hit_pct"] is None
