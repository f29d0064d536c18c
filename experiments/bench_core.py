"""Core benchmark for vsla_jax: compilations, storage, conversions and peak memory.

Runs OUR code (vsla_jax: capacity buckets, ``bucketize``, ``conv``) and the PEER
(plain ``jax.jit`` on pad-to-exact-max batches) in the same process on the same data,
and prints one table: metric | ours | peer | ratio | target | met?.

  a. compilations of ``vsla_jax.conv`` over N random-length batches, each bucketized
     with ``vsla_jax.bucketize`` (``conv._cache_size()`` and backend-compile events),
     vs a jitted padded-batch convolution on exact shapes;
  b. storage overhead (allocated / logical elements) vs pad-to-max;
  c. NumPy/DLPack conversion cost as a percentage of one steady-state conv;
  d. peak memory of forward + backward of ``sum(conv(x, k))`` from XLA's
     ``memory_analysis()`` of the compiled programs.

    .venv/bin/python experiments/bench_core.py [--batches 1000] [--json_out out.json]
"""

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from common import write_json_atomic
from jax import monitoring

import vsla_jax as vs

FLAGS = flags.FLAGS
flags.DEFINE_integer("batches", 1000, "Number of random-length batches for (a) and (b).")
flags.DEFINE_integer("batch_size", 64, "Items per batch.")
flags.DEFINE_integer("min_len", 8, "Smallest item length (log-uniform lengths).")
flags.DEFINE_integer("max_len", 2048, "Largest item length (log-uniform lengths).")
flags.DEFINE_integer("kernel_len", 32, "Length of the convolution kernel.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("json_out", None, "Optional path for a JSON copy of the results.")
flags.DEFINE_integer("execute_every", 1,
                     "In (a), execute ours and the peer on every k-th batch (1 = all); the "
                     "other batches are compile-counted only (compiled, not run).")
flags.DEFINE_integer("repeats", 30, "Timed repeats per conversion in (c) (median is used).")
flags.DEFINE_integer("mem_batches", 3, "Batches averaged for the peak-memory metric (d).")

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
HIGHEST = jax.lax.Precision.HIGHEST


# -- compile counting ---------------------------------------------------------------------
class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring events) and their seconds."""

    def __init__(self):
        self.count = 0
        self.seconds = 0.0
        monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, name, duration, **kwargs):
        if name == COMPILE_EVENT:
            self.count += 1
            self.seconds += duration

    def snapshot(self) -> tuple[int, float]:
        return self.count, self.seconds


# -- data ---------------------------------------------------------------------------------
def random_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` integer lengths, log-uniform in [min_len, max_len]."""
    lo, hi = np.log(FLAGS.min_len), np.log(FLAGS.max_len)
    lengths = np.rint(np.exp(rng.uniform(lo, hi, size=n))).astype(np.int64)
    return np.clip(lengths, FLAGS.min_len, FLAGS.max_len)


def random_items(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.standard_normal(int(n)).astype(np.float32)
            for n in random_lengths(rng, FLAGS.batch_size)]


def pad_to_max(items: list[np.ndarray], width: int | None = None) -> np.ndarray:
    width = max(len(a) for a in items) if width is None else width
    out = np.zeros((len(items), width), np.float32)
    for i, a in enumerate(items):
        out[i, : len(a)] = a
    return out


def peer_conv(x: jax.Array, k: jax.Array) -> jax.Array:
    """The peer: full convolution of every row of a zero-padded batch with one kernel."""
    return jax.vmap(lambda r: jnp.convolve(r, k, mode="full", precision=HIGHEST))(x)


# -- (a) + (b): compilations and storage ------------------------------------------------
def run_compile_and_storage(kernel_np: np.ndarray, counter: CompileCounter) -> dict:
    rng = np.random.default_rng(FLAGS.seed)
    k_ours = vs.tensor(kernel_np)
    k_peer = jnp.asarray(kernel_np)
    peer = jax.jit(peer_conv)
    ours_conv = jax.jit(vs.conv)  # lengths traced: the padded plan, one program per bucket
    conv_cache0 = ours_conv._cache_size()
    peer_cache0 = peer._cache_size()
    shapes_ours: set[tuple[int, int]] = set()
    shapes_peer: set[tuple[int, int]] = set()
    # with --execute_every > 1, shapes compiled ahead of time (lower().compile() bypasses
    # the jit cache) are counted next to the jit cache growth
    aot_ours: set[tuple[int, int]] = set()
    aot_peer: set[tuple[int, int]] = set()
    cached_ours: set[tuple[int, int]] = set()
    cached_peer: set[tuple[int, int]] = set()
    ours_events = ours_secs = peer_events = peer_secs = 0
    ours_exec = peer_exec = 0
    storage_ours, storage_peer = [], []
    item_ratio_worst = item_ratio_worst_ge_min = peer_item_worst = 0.0
    t_ours = t_peer = 0.0
    t0 = time.perf_counter()
    for i in range(FLAGS.batches):
        items = random_items(rng)
        execute = i % FLAGS.execute_every == 0

        # ours: bucketize, then one conv per bucket
        c0, s0 = counter.snapshot()
        t = time.perf_counter()
        rb = vs.bucketize(items)
        for b in rb.buckets:
            shapes_ours.add((b.batch_shape[0], b.capacity[0]))
        if execute:
            jax.block_until_ready(rb.map(lambda x: ours_conv(x, k_ours)))
            ours_exec += 1
        else:  # compile only: AOT-compile bucket shapes no earlier batch has compiled
            for b in rb.buckets:
                if (b.batch_shape[0], b.capacity[0]) not in aot_ours | cached_ours:
                    ours_conv.lower(b, k_ours).compile()
                    aot_ours.add((b.batch_shape[0], b.capacity[0]))
        if execute:
            cached_ours.update((b.batch_shape[0], b.capacity[0]) for b in rb.buckets)
        t_ours += time.perf_counter() - t
        c1, s1 = counter.snapshot()
        ours_events += c1 - c0
        ours_secs += s1 - s0

        # peer: pad to this batch's exact maximum length
        t = time.perf_counter()
        padded = pad_to_max(items)
        shapes_peer.add(padded.shape)
        if execute:
            jax.block_until_ready(peer(padded, k_peer))
            peer_exec += 1
            cached_peer.add(padded.shape)
        elif padded.shape not in aot_peer | cached_peer:
            peer.lower(padded, k_peer).compile()
            aot_peer.add(padded.shape)
        t_peer += time.perf_counter() - t
        c2, s2 = counter.snapshot()
        peer_events += c2 - c1
        peer_secs += s2 - s1

        # storage
        logical = rb.logical_elements()
        storage_ours.append(rb.storage_elements() / logical)
        storage_peer.append(padded.size / logical)
        lengths = np.array([len(a) for a in items])
        peer_item_worst = max(peer_item_worst, float(lengths.max() / lengths.min()))
        for b, idx in zip(rb.buckets, rb.index):
            real = np.asarray(idx) >= 0
            n = np.asarray(b.lengths)[real, 0].astype(np.float64)
            ratio = b.capacity[0] / n
            item_ratio_worst = max(item_ratio_worst, float(ratio.max()))
            big = n >= vs.DEFAULT_POLICY.minimum
            if big.any():
                item_ratio_worst_ge_min = max(item_ratio_worst_ge_min, float(ratio[big].max()))

        if (i + 1) % 100 == 0 or i + 1 == FLAGS.batches:
            logging.info(
                "batch %d/%d: ours %d conv programs (%d bucket shapes), peer %d programs; "
                "%.1fs elapsed", i + 1, FLAGS.batches, ours_conv._cache_size() - conv_cache0,
                len(shapes_ours), peer._cache_size() - peer_cache0, time.perf_counter() - t0)

    ours_cache = ours_conv._cache_size() - conv_cache0 + len(aot_ours)
    peer_cache = peer._cache_size() - peer_cache0 + len(aot_peer)
    return dict(
        ours_conv_programs=ours_cache,
        ours_bucket_shapes=len(shapes_ours),
        ours_backend_compiles=ours_events,
        ours_compile_seconds=ours_secs,
        ours_wall_seconds=t_ours,
        ours_batches_executed=ours_exec,
        peer_programs=peer_cache,
        peer_shapes=len(shapes_peer),
        peer_backend_compiles=peer_events,
        peer_compile_seconds=peer_secs,
        peer_wall_seconds=t_peer,
        peer_batches_executed=peer_exec,
        storage_ours_mean=float(np.mean(storage_ours)),
        storage_ours_worst=float(np.max(storage_ours)),
        storage_peer_mean=float(np.mean(storage_peer)),
        storage_peer_worst=float(np.max(storage_peer)),
        item_ratio_worst=item_ratio_worst,
        item_ratio_worst_ge_min=item_ratio_worst_ge_min,
        peer_item_ratio_worst=peer_item_worst,
    )


# -- (c): conversions ---------------------------------------------------------------------
def median_seconds(fn: Callable[[], object], setup: Callable[[], object] | None = None,
                   warmup: int = 3) -> float:
    """Median wall time of ``fn(arg)`` (or ``fn()``) over FLAGS.repeats runs after warm-up.

    ``setup`` (untimed) makes a fresh argument per run, so caches on the argument (such as
    a jax.Array's cached NumPy copy) never make a repeat free.
    """
    times = []
    for r in range(warmup + FLAGS.repeats):
        arg = setup() if setup else None
        t = time.perf_counter()
        out = fn(arg) if setup else fn()
        jax.block_until_ready(out)
        if r >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def aligned_copy(a: np.ndarray, alignment: int = 64) -> np.ndarray:
    """A copy of ``a`` whose buffer starts on an ``alignment``-byte boundary.

    XLA's CPU client aliases a DLPack buffer only when it is 64-byte aligned; NumPy's
    allocator guarantees less, so ``np.zeros`` results are usually copied.
    """
    buf = np.empty(a.nbytes + alignment, np.uint8)
    start = -buf.ctypes.data % alignment
    out = buf[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def run_conversions(kernel_np: np.ndarray) -> dict:
    rng = np.random.default_rng(FLAGS.seed + 1)
    items = random_items(rng)
    lengths = np.array([len(a) for a in items], np.int32)
    cap = vs.DEFAULT_POLICY.bucket(int(lengths.max()))
    padded = pad_to_max(items, cap)  # NumPy, padded to the policy capacity of the max
    k = vs.tensor(kernel_np)
    x = vs.from_padded(padded, lengths, rank=1)
    rb = vs.bucketize(items)
    aligned = aligned_copy(padded)

    def fresh_tensor():  # a new device buffer each run (no cached host copy)
        return vs.VarTensor(jnp.array(x.data, copy=True), jnp.array(x.lengths, copy=True))

    # sanity check: ours and the peer compute the same convolutions
    ours_items = rb.map(lambda b: vs.conv(b, k)).to_list()
    peer_rows = np.asarray(peer_conv(jnp.asarray(pad_to_max(items)), jnp.asarray(kernel_np)))
    max_abs_diff = max(
        float(np.max(np.abs(o - peer_rows[i, : len(o)]))) for i, o in enumerate(ours_items))
    conv_s = median_seconds(lambda: vs.conv(x, k))
    bucket_conv_s = median_seconds(lambda: rb.map(lambda b: vs.conv(b, k)))
    out = dict(
        batch_items=len(items), capacity=cap, max_len=int(lengths.max()),
        conv_seconds=conv_s, bucketed_conv_seconds=bucket_conv_s,
        from_padded_seconds=median_seconds(lambda: vs.from_padded(padded, lengths, rank=1)),
        bucketize_seconds=median_seconds(lambda: vs.bucketize(items)),
        asarray_seconds=median_seconds(lambda t: np.asarray(t.data), fresh_tensor),
        to_list_seconds=median_seconds(lambda t: t.to_list(), fresh_tensor),
        np_from_dlpack_seconds=median_seconds(lambda t: np.from_dlpack(t.data), fresh_tensor),
        vs_from_dlpack_seconds=median_seconds(
            lambda: vs.from_dlpack(padded, lengths, rank=1, trust_zero_slack=True)),
        vs_from_dlpack_aligned_seconds=median_seconds(
            lambda: vs.from_dlpack(aligned, lengths, rank=1, trust_zero_slack=True)),
        numpy_alignment_bytes=int(padded.ctypes.data % 64),
        buckets=len(rb.buckets),
        ours_vs_peer_max_abs_diff=max_abs_diff,
    )
    return out


# -- (d): peak memory ---------------------------------------------------------------------
def memory_stats(fn, *args):
    """(argument, output, temp) bytes of the compiled program, or None if unavailable."""
    compiled = jax.jit(fn, keep_unused=True).lower(*args).compile()
    m = compiled.memory_analysis()
    if m is None:
        return None
    return (int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
            int(m.temp_size_in_bytes))


def run_memory(kernel_np: np.ndarray) -> dict:
    k = vs.tensor(kernel_np)

    def loss_ours(data, lengths, kdata):
        y = vs.conv(vs.VarTensor(data, lengths), vs.VarTensor(kdata, k.lengths))
        return vs.sum(y).sum()

    def loss_peer(x, kd):
        return peer_conv(x, kd).sum()

    # forward (value) + backward (grads w.r.t. data and kernel)
    vg_ours = jax.value_and_grad(loss_ours, argnums=(0, 2))
    vg_peer = jax.value_and_grad(loss_peer, argnums=(0, 1))
    cache: dict = {}
    rng = np.random.default_rng(FLAGS.seed + 2)
    ours_totals, peer_totals, details = [], [], []
    for _ in range(FLAGS.mem_batches):
        items = random_items(rng)
        rb = vs.bucketize(items)
        per_bucket = []
        for b in rb.buckets:
            key = (b.data.shape, str(b.dtype))
            if key not in cache:
                cache[key] = memory_stats(vg_ours, b.data, b.lengths, k.data)
            per_bucket.append(cache[key])
        padded = pad_to_max(items)
        peer_stats = memory_stats(vg_peer, padded, jnp.asarray(kernel_np))
        if peer_stats is None or any(s is None for s in per_bucket):
            return dict(available=False,
                        reason="Compiled.memory_analysis() returned None on backend "
                               f"{jax.default_backend()!r}")
        ours = (sum(a + o for a, o, _ in per_bucket) + max(t for _, _, t in per_bucket))
        peer = sum(peer_stats)
        ours_totals.append(ours)
        peer_totals.append(peer)
        details.append(dict(buckets=len(per_bucket), ours_bytes=ours, peer_bytes=peer,
                            peer_shape=list(padded.shape)))
    return dict(available=True, ours_bytes_mean=float(np.mean(ours_totals)),
                peer_bytes_mean=float(np.mean(peer_totals)), batches=details)


# -- report -------------------------------------------------------------------------------
def code_version() -> str:
    """The git commit of the code measured, and whether vsla_jax/ has local edits."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "vsla_jax"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    dirty = [line[3:] for line in dirty if line.strip()]
    return head + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def build_rows(a: dict, c: dict, d: dict) -> list[list[str]]:
    rows = []
    one_per_bucket = a["ours_conv_programs"] == a["ours_bucket_shapes"]
    rows.append([
        f"(a) conv compilations, {FLAGS.batches} batches", str(a["ours_conv_programs"]),
        str(a["peer_programs"]), f"{a['peer_programs'] / max(a['ours_conv_programs'], 1):.1f}x",
        "1 per bucket shape", "yes" if one_per_bucket else "NO"])
    rows.append([
        "(a) distinct bucket shapes (count_cap, cap) / peer shapes",
        str(a["ours_bucket_shapes"]), str(a["peer_shapes"]), "", "", ""])
    rows.append([
        "(a) all XLA backend compiles in loop", str(a["ours_backend_compiles"]),
        str(a["peer_backend_compiles"]),
        f"{a['peer_backend_compiles'] / max(a['ours_backend_compiles'], 1):.1f}x", "", ""])
    rows.append([
        "(a) compile seconds in loop", f"{a['ours_compile_seconds']:.1f}",
        f"{a['peer_compile_seconds']:.1f}",
        f"{a['peer_compile_seconds'] / max(a['ours_compile_seconds'], 1e-9):.1f}x", "", ""])
    rows.append([
        "(a) wall seconds in loop (bucketize/pad + conv)", f"{a['ours_wall_seconds']:.1f}",
        f"{a['peer_wall_seconds']:.1f}",
        f"{a['peer_wall_seconds'] / max(a['ours_wall_seconds'], 1e-9):.2f}x", "", ""])
    ratio_mean = a["storage_peer_mean"] / a["storage_ours_mean"]
    rows.append([
        "(b) storage/logical, mean over batches", f"{a['storage_ours_mean']:.3f}",
        f"{a['storage_peer_mean']:.3f}", f"{ratio_mean:.2f}x", ">= 2x lower",
        "yes" if ratio_mean >= 2 else "NO"])
    ratio_worst = a["storage_peer_worst"] / a["storage_ours_worst"]
    rows.append([
        "(b) storage/logical, worst batch", f"{a['storage_ours_worst']:.3f}",
        f"{a['storage_peer_worst']:.3f}", f"{ratio_worst:.2f}x", ">= 2x lower",
        "yes" if ratio_worst >= 2 else "NO"])
    rows.append([
        "(b) worst per-item capacity/length, all items", f"{a['item_ratio_worst']:.3f}",
        f"{a['peer_item_ratio_worst']:.3f}", "", "<= 1.5",
        "yes" if a["item_ratio_worst"] <= 1.5 else "NO"])
    rows.append([
        f"(b) worst per-item capacity/length, length >= {vs.DEFAULT_POLICY.minimum}",
        f"{a['item_ratio_worst_ge_min']:.3f}", "", "", "<= 1.5",
        "yes" if a["item_ratio_worst_ge_min"] <= 1.5 else "NO"])
    conv_us, bconv_us = c["conv_seconds"] * 1e6, c["bucketed_conv_seconds"] * 1e6
    rows.append(["(c) steady-state vs.conv, pad-to-capacity batch (reference)",
                 f"{conv_us:.0f} us", "", "", "", ""])
    rows.append(["(c) steady-state bucketed conv, rb.map(conv) (reference)",
                 f"{bconv_us:.0f} us", "", "", "", ""])
    conversions = [
        ("from_padded(numpy, lengths)", "from_padded_seconds", conv_us),
        ("bucketize(list of numpy)", "bucketize_seconds", bconv_us),
        ("np.asarray(x.data)", "asarray_seconds", conv_us),
        ("x.to_list()", "to_list_seconds", conv_us),
        ("np.from_dlpack(x.data)", "np_from_dlpack_seconds", conv_us),
        ("vs.from_dlpack(numpy, trust_zero_slack)", "vs_from_dlpack_seconds", conv_us),
        ("vs.from_dlpack(64B-aligned numpy, trust)", "vs_from_dlpack_aligned_seconds",
         conv_us),
    ]
    for name, key, ref_us in conversions:
        us = c[key] * 1e6
        pct = 100 * us / ref_us
        rows.append([f"(c) {name}, % of conv", f"{us:.0f} us", f"{ref_us:.0f} us",
                     f"{pct:.1f}%", "<= 5%", "yes" if pct <= 5 else "NO"])
    if d["available"]:
        rows.append([
            "(d) peak bytes fwd+bwd sum(conv(x,k)), mean", fmt_bytes(d["ours_bytes_mean"]),
            fmt_bytes(d["peer_bytes_mean"]),
            f"{d['peer_bytes_mean'] / d['ours_bytes_mean']:.2f}x", "", ""])
    else:
        rows.append(["(d) peak bytes fwd+bwd", "unavailable", "unavailable", "", "",
                     d["reason"]])
    return rows


def print_table(rows: list[list[str]]) -> None:
    header = ["metric", "ours", "peer", "ratio", "target", "met?"]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(s.ljust(w) for s, w in zip(r, widths)) + " |"
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def main(argv):
    del argv
    if not 1 <= FLAGS.min_len <= FLAGS.max_len:
        raise app.UsageError("need 1 <= --min_len <= --max_len")
    t_start = time.perf_counter()
    counter = CompileCounter()
    kernel_np = np.random.default_rng(FLAGS.seed + 3).standard_normal(
        FLAGS.kernel_len).astype(np.float32)
    machine = (f"{platform.machine()} {os.cpu_count()} CPU cores, backend "
               f"{jax.default_backend()}, devices {jax.devices()}, jax {jax.__version__}")
    version = code_version()
    print(f"bench_core: {machine}")
    print(f"code: vsla_jax {vs.__version__}, git {version}")
    print(f"config: batches={FLAGS.batches} batch_size={FLAGS.batch_size} "
          f"lengths log-uniform in [{FLAGS.min_len}, {FLAGS.max_len}] float32 1-D, "
          f"kernel_len={FLAGS.kernel_len}, seed={FLAGS.seed}, policy={vs.DEFAULT_POLICY}, "
          f"count policy={vs.COUNT_POLICY}")

    logging.info("(a)+(b) compilations and storage over %d batches", FLAGS.batches)
    a = run_compile_and_storage(kernel_np, counter)
    logging.info("(c) conversions")
    c = run_conversions(kernel_np)
    logging.info("(d) peak memory")
    d = run_memory(kernel_np)
    elapsed = time.perf_counter() - t_start

    print()
    print_table(build_rows(a, c, d))
    print()
    print(f"(a) ours: vs.conv called on every bucket of vs.bucketize(batch); programs = growth "
          f"of jax.jit(vs.conv)._cache_size(); executed "
          f"{a['ours_batches_executed']}/{FLAGS.batches} "
          f"batches. peer: jax.jit(vmap(jnp.convolve)) on each batch padded to its exact max "
          f"length; executed {a['peer_batches_executed']}/{FLAGS.batches}.")
    print("(b) ours = RaggedBatch.storage_elements()/logical_elements() (capacity slack and "
          "count-padding slots included); peer = batch_size * max_len / sum(lengths). "
          "Per-item: capacity/length over real items.")
    print(f"(c) one batch of {c['batch_items']} items (max length {c['max_len']}, capacity "
          f"{c['capacity']}, {c['buckets']} buckets; ours and peer conv outputs agree to "
          f"max abs diff {c['ours_vs_peer_max_abs_diff']:.2e}); median of {FLAGS.repeats} "
          "repeats after 3 warm-ups. Reference "
          "conv: vs.conv on the pad-to-capacity VarTensor; bucketize is compared with "
          "rb.map(conv) on its own output. NumPy buffer address mod 64 = "
          f"{c['numpy_alignment_bytes']} (DLPack aliases only 64-byte-aligned buffers).")
    if d["available"]:
        print("(d) from Compiled.memory_analysis() of jit(value_and_grad(sum(conv(x, k))), "
              "keep_unused=True) w.r.t. data and kernel. ours = sum over buckets of "
              "(argument + output bytes) + max over buckets of temp bytes (all buckets' "
              "inputs and gradients resident, programs run one after another); peer = "
              "argument + output + temp of one program on the pad-to-max batch. Averaged "
              f"over {FLAGS.mem_batches} batches: "
              + ", ".join(f"{x['buckets']} buckets {fmt_bytes(x['ours_bytes'])} vs "
                          f"{fmt_bytes(x['peer_bytes'])} {tuple(x['peer_shape'])}"
                          for x in d["batches"]))
    else:
        print(f"(d) unavailable: {d['reason']}")
    print(f"total run time {elapsed:.1f}s")

    if FLAGS.json_out:
        write_json_atomic(FLAGS.json_out, dict(
            machine=machine, jax_version=jax.__version__, code=version, flags=dict(
                batches=FLAGS.batches, batch_size=FLAGS.batch_size, min_len=FLAGS.min_len,
                max_len=FLAGS.max_len, kernel_len=FLAGS.kernel_len, seed=FLAGS.seed,
                execute_every=FLAGS.execute_every, repeats=FLAGS.repeats,
                mem_batches=FLAGS.mem_batches),
            compile_and_storage=a, conversions=c, memory=d, run_seconds=elapsed,
            table=build_rows(a, c, d)))
        print(f"wrote {FLAGS.json_out}")


if __name__ == "__main__":
    app.run(main)
