"""Ragged Model A convolution: the adaptive engine against its peers, same data, same process.

Workloads (float32):
  heterogeneous  256 pairs, signals log-uniform [8, 2048], kernels log-uniform [4, 256]
  heavy_tailed   320 pairs, lognormal lengths (signals median 300, clipped to [1, 4000];
                 kernels median 30, clipped to [1, 300])
  extreme        signals [2, 3, 1000, 5, 2000] x kernels of length 3..64, repeated to 256
  homogeneous    256 pairs of 512 x 64
  sensor_fusion  signals of the spec's sensor-fusion dims {8, 16, 32, 128, 256} x kernels
                 of {8, 16, 32} (no target; every peer, TF included, runs on it)

C++ kernels (``vsla_jax.conv.cpu.ragged_conv``, csrc/conv.cc; the path ``vs.conv`` takes
on CPU once routed): forward on the same VarTensors, also limited to one thread, and the
backward (``jit(grad)`` of a weighted sum through the kernels) against JAX autodiff of
the padded plan (``jit(grad)`` through ``vs.conv(..., ConvPolicy(plan="padded"))``).

Ours: the natural call ``vs.conv(vs.stack(xs), vs.stack(ks))`` (the batches are built
once, outside the timed call; a second row times ``vs.stack`` too), every plan of the
engine forced in turn (padded, bucketed, blocked), and the packed form
``vs.conv_packed(xs, ks)`` from Python lists (host plan cached per length profile, also
timed with the cache cleared before every call). Every row is timed in interleaved rounds.

Peers: numpy.convolve loop, scipy.signal.convolve(method="auto") loop, pad-to-max FFT in
JAX (the archived design: one FFT length next_pow2(2*d_max - 1) for every item),
torch.nn.functional.conv1d grouped over a padded batch (when torch is installed), and
tf.map_fn over tf.RaggedTensor rows with tf.nn.conv1d (when tensorflow is installed).
Time per batch is the median of --repeats interleaved rounds; the first call (compile
included) is reported separately. Useful GFLOP/s uses the direct-method count
2 * sum(m_i * n_i) for everyone.

Usage: python experiments/bench_conv.py [--workloads heterogeneous,extreme,homogeneous]
"""

from __future__ import annotations

import dataclasses
import os
import platform
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.signal
from absl import app, flags, logging
from common import pad, pad_to_max_fft, timed_interleaved, write_json_atomic

import vsla_jax as vs
from vsla_jax.conv import blocked as bcv
from vsla_jax.conv import cpu, engine

FLAGS = flags.FLAGS
flags.DEFINE_list("workloads", ["heterogeneous", "heavy_tailed", "extreme", "homogeneous",
                                "sensor_fusion"], "Workloads to run.")
flags.DEFINE_integer("items", 256, "Pairs per batch.")
flags.DEFINE_integer("repeats", 15, "Timed repeats (median is reported).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_bool("calibrate", True, "Calibrate the engine's cost model on this machine.")
flags.DEFINE_string("json_out", None, "Optional JSON results path (written atomically).")

SENSOR_DIMS = (8, 16, 32, 128, 256)  # the VSLA spec's sensor-fusion dims


def make_workload(name: str, n: int, rng: np.random.Generator):
    if name == "heterogeneous":
        la = np.exp(rng.uniform(np.log(8), np.log(2048), n)).astype(int)
        lb = np.exp(rng.uniform(np.log(4), np.log(256), n)).astype(int)
    elif name == "heavy_tailed":
        n = 320
        la = np.clip(rng.lognormal(np.log(300), 1.0, n), 1, 4000).astype(int)
        lb = np.clip(rng.lognormal(np.log(30), 1.0, n), 1, 300).astype(int)
    elif name == "extreme":
        la = np.resize(np.array([2, 3, 1000, 5, 2000]), n)
        lb = rng.integers(3, 65, n)
    elif name == "homogeneous":
        la, lb = np.full(n, 512), np.full(n, 64)
    elif name == "sensor_fusion":  # the spec's sensor-fusion dims, for every peer
        la = rng.choice(SENSOR_DIMS, n)
        lb = rng.choice(SENSOR_DIMS[:3], n)
    else:
        raise ValueError(f"unknown workload {name!r}")
    xs = [rng.standard_normal(int(m)).astype(np.float32) for m in la]
    ks = [rng.standard_normal(int(m)).astype(np.float32) for m in lb]
    return xs, ks


def tf_ragged_peer(xs, ks):
    """TF peer: ``tf.map_fn`` over the rows of two ``tf.RaggedTensor``s, each row convolved
    with ``tf.nn.conv1d`` (full convolution: the row is zero-padded by ``len(k) - 1``
    on both sides and the kernel reversed), inside one ``tf.function``.
    Returns ``(call, tensorflow version)``.

    Raises ImportError when tensorflow is not installed.
    """
    import tensorflow as tf

    rx = tf.RaggedTensor.from_row_lengths(np.concatenate(xs), [len(x) for x in xs])
    rk = tf.RaggedTensor.from_row_lengths(np.concatenate(ks), [len(k) for k in ks])

    @tf.function(reduce_retracing=True)
    def run(rx, rk):
        def one(pair):
            x, k = pair
            n = tf.shape(k)[0]
            xp = tf.reshape(tf.pad(x, [[n - 1, n - 1]]), [1, -1, 1])
            y = tf.nn.conv1d(xp, tf.reshape(tf.reverse(k, [0]), [-1, 1, 1]), stride=1,
                             padding="VALID")
            return tf.reshape(y, [-1])

        return tf.map_fn(one, (rx, rk), fn_output_signature=tf.RaggedTensorSpec(
            shape=[None], dtype=tf.float32, ragged_rank=0))

    return (lambda: run(rx, rk)), tf.__version__


@jax.jit
def single_shape_jnp(x, k):
    return jax.vmap(lambda a, b: jnp.convolve(a, b, mode="full"))(x, k)


def check(outs, xs, ks, atol=1e-3):
    err = 0.0
    for o, x, k in zip(outs, xs, ks):
        ref = np.convolve(x.astype(np.float64), k.astype(np.float64))
        o = np.asarray(o)[: len(ref)]
        err = max(err, float(np.abs(o - ref).max() / max(np.abs(ref).max(), 1e-30)))
    return err


def run_workload(name: str, rng, policy: vs.ConvPolicy, cost: vs.CostModel) -> dict:
    xs, ks = make_workload(name, FLAGS.items, rng)
    flops = 2.0 * sum(len(x) * len(k) for x, k in zip(xs, ks))
    prof = vs.heterogeneity_profile([len(x) for x in xs], [len(k) for k in ks], policy, cost)
    rows: dict[str, dict] = {}

    def record(label, first, steady, err=None, note=""):
        rows[label] = dict(first_s=first, steady_s=steady, gflops=flops / steady / 1e9,
                           rel_err=err, note=note)
        logging.info("%s %-34s first %8.2f ms  steady %8.3f ms  %6.2f GFLOP/s  %s", name,
                     label, first * 1e3, steady * 1e3, flops / steady / 1e9, note)

    # `late` rows are timed after the others: TensorFlow's and PyTorch's worker threads
    # keep spinning after each call and measurably slowed the rows timed next to them
    fns, late, notes = {}, {}, {}
    errs: dict[str, Callable[[], float]] = {}
    a, k = vs.stack(xs), vs.stack(ks)
    choice, predicted = engine.choose_plan(a, k, policy=policy)
    fns[NATURAL] = lambda: vs.conv(a, k, policy=policy).data
    errs[NATURAL] = lambda: check(vs.conv(a, k, policy=policy).to_list(), xs, ks)
    notes[NATURAL] = f"plan {choice}; predicted ms " + ", ".join(
        f"{p} {t * 1e3:.2f}" for p, t in predicted.items())
    fns["vsla vs.conv incl. vs.stack"] = lambda: vs.conv(vs.stack(xs), vs.stack(ks),
                                                         policy=policy).data
    for plan in ("padded", "bucketed", "blocked"):
        forced = dataclasses.replace(policy, plan=plan)
        label = f"vsla vs.conv plan={plan}"
        fns[label] = lambda forced=forced: vs.conv(a, k, policy=forced).data
        errs[label] = lambda forced=forced: check(vs.conv(a, k, policy=forced).to_list(),
                                                  xs, ks)
    add_cpu_kernel_rows(a, k, xs, ks, policy, fns, errs, notes)
    fns[PACKED] = lambda: vs.conv_packed(xs, ks, cost=cost).values
    errs[PACKED] = lambda: check(vs.conv_packed(xs, ks, cost=cost).to_list(), xs, ks)

    def packed_uncached():
        bcv.cached_plan.cache_clear()
        return vs.conv_packed(xs, ks, cost=cost).values

    fns["vsla conv_packed, plan not cached"] = packed_uncached
    la = np.fromiter(map(len, xs), np.int64, len(xs))
    lb = np.fromiter(map(len, ks), np.int64, len(ks))
    bplan = bcv.plan_blocks(la, lb, "auto", cost)
    packed = jax.device_put(bcv.pack_blocks(bplan, xs, ks, np.float32))
    first_blk = jax.device_put(bplan.first)
    fns["vsla resident blocks"] = lambda: bcv.conv_blocked_values(packed, first_blk,
                                                                   bplan.layout)
    notes["vsla resident blocks"] = f"{len(bplan.layout)} classes: " + ",".join(
        f"{c.method}:{c.taps}" for c in bplan.layout)

    # peers
    fns["numpy.convolve loop"] = lambda: [np.convolve(x, k) for x, k in zip(xs, ks)]
    errs["numpy.convolve loop"] = lambda: 0.0
    fns["scipy.signal.convolve loop"] = lambda: [scipy.signal.convolve(x, k, method="auto")
                                                 for x, k in zip(xs, ks)]
    errs["scipy.signal.convolve loop"] = lambda: 0.0
    dmax = max(max(len(x) for x in xs), max(len(k) for k in ks))
    xp = jax.device_put(pad(xs, max(len(x) for x in xs)))
    kp = jax.device_put(pad(ks, max(len(k) for k in ks)))
    fns["pad-to-max FFT (JAX, archived)"] = lambda: pad_to_max_fft(xp, kp)
    errs["pad-to-max FFT (JAX, archived)"] = lambda: check(np.asarray(pad_to_max_fft(xp, kp)),
                                                           xs, ks)
    notes["pad-to-max FFT (JAX, archived)"] = (
        f"FFT length {1 << (2 * dmax - 2).bit_length()} for every item")
    try:
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(os.cpu_count() or 1)
        tx = torch.from_numpy(pad(xs, max(len(x) for x in xs)))[None]  # [1, B, L]
        kw = torch.from_numpy(pad(ks, max(len(k) for k in ks)))
        tk = torch.flip(kw, dims=[1])[:, None, :]  # [B, 1, K] (conv1d is correlation)
        kpad = tk.shape[-1] - 1

        def torch_conv():
            with torch.no_grad():
                return F.conv1d(tx, tk, padding=kpad, groups=tx.shape[1])

        late["torch conv1d grouped, padded"] = torch_conv
        errs["torch conv1d grouped, padded"] = lambda: check(torch_conv()[0].numpy(), xs, ks)
        notes["torch conv1d grouped, padded"] = f"torch {torch.__version__}"
    except ImportError:
        rows["torch conv1d grouped, padded"] = dict(unavailable="torch not installed")
    try:
        tf_run, tf_version = tf_ragged_peer(xs, ks)
        label = "tf ragged map_fn conv1d"
        late[label] = tf_run
        errs[label] = lambda: check(list(tf_run()), xs, ks)
        notes[label] = f"tensorflow {tf_version}, tf.function"
    except ImportError:
        rows["tf ragged map_fn conv1d"] = dict(unavailable="tensorflow not installed")
    if name == "homogeneous":
        xd = jax.device_put(np.stack(xs))
        kd = jax.device_put(np.stack(ks))
        fns["single-shape jit jnp.convolve"] = lambda: single_shape_jnp(xd, kd)
        errs["single-shape jit jnp.convolve"] = lambda: check(
            np.asarray(single_shape_jnp(xd, kd)), xs, ks)
        xv = vs.VarTensor(xd, jnp.full((len(xs), 1), 512, jnp.int32))
        kv = vs.VarTensor(kd, jnp.full((len(ks), 1), 64, jnp.int32))
        fns["single-shape jit vsla direct kernel"] = lambda: vs.conv(
            xv, kv, method="direct", policy=dataclasses.replace(policy, plan="padded")).data
    logging.info("%s: timing %d rows in %d interleaved rounds", name, len(fns), FLAGS.repeats)
    # errors are checked after timing, so each row's first call still includes compiling
    timings = timed_interleaved(fns, FLAGS.repeats)
    if late:
        timings |= timed_interleaved(late, FLAGS.repeats)
    for label, (first, steady) in timings.items():
        record(label, first, steady, errs[label]() if label in errs else None,
               notes.get(label, ""))
    rows = {k: rows[k] for k in [*timings, *(k for k in rows if k not in timings)]}
    return dict(profile=prof.__dict__, useful_flops=flops, rows=rows, items=len(xs))


def add_cpu_kernel_rows(a, k, xs, ks, policy, fns, errs, notes) -> None:
    """Rows of the C++ kernels: forward (all threads, one thread) and backward, and the
    backward of JAX autodiff through the padded plan on the same cotangent."""
    if cpu.ragged_conv(a, k) is None:
        return
    fns[CPU_FWD] = lambda: cpu.ragged_conv(a, k).data
    errs[CPU_FWD] = lambda: check(cpu.ragged_conv(a, k).to_list(), xs, ks)
    fns[CPU_FWD_1T] = lambda: cpu.ragged_conv(a, k, max_threads=1).data
    errs[CPU_FWD_1T] = lambda: check(cpu.ragged_conv(a, k, max_threads=1).to_list(), xs, ks)
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((len(xs), a.capacity[0] + k.capacity[0] - 1)),
                    jnp.float32)
    padded = dataclasses.replace(policy, plan="padded")

    def loss(conv_fn):
        def f(da, db, la, lb):
            out = conv_fn(vs.VarTensor.trusted(da, la), vs.VarTensor.trusted(db, lb))
            return jnp.sum(out.data * w)
        return jax.jit(jax.grad(f, (0, 1)))

    ours = loss(cpu.ragged_conv)
    theirs = loss(lambda x, y: vs.conv(x, y, policy=padded))
    fns[CPU_BWD] = lambda: ours(a.data, k.data, a.lengths, k.lengths)
    fns[PADDED_BWD] = lambda: theirs(a.data, k.data, a.lengths, k.lengths)
    notes[PADDED_BWD] = "JAX autodiff, padded plan, lengths traced"

    def grad_err():
        g1 = ours(a.data, k.data, a.lengths, k.lengths)
        g2 = theirs(a.data, k.data, a.lengths, k.lengths)
        err = 0.0
        for x, y, m in zip(g1, g2, (a.mask(), k.mask())):
            x, y = np.asarray(x) * np.asarray(m), np.asarray(y) * np.asarray(m)
            err = max(err, float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)))
        return err

    errs[CPU_BWD] = grad_err


NATURAL = "vsla vs.conv(a, k) (VarTensor)"
CPU_FWD = "vsla C++ kernels ragged_conv (VarTensor)"
CPU_FWD_1T = "vsla C++ kernels ragged_conv, 1 thread"
CPU_BWD = "vsla C++ kernels backward (jit grad)"
PADDED_BWD = "backward: JAX autodiff of padded plan (jit grad)"
PACKED = "vsla conv_packed (packed form)"


def ratios(name: str, res: dict) -> list[str]:
    rows = res["rows"]
    peers = {k: v["steady_s"] for k, v in rows.items()
             if "steady_s" in v and not k.startswith("vsla") and not k.startswith("single")
             and not k.startswith("backward")}
    fastest = min(peers, key=peers.get)
    out = [f"fastest peer: {fastest} ({peers[fastest] * 1e3:.3f} ms)"]
    for label, r in rows.items():
        if label.startswith("vsla"):
            out.append(f"speed-up of {label} over fastest peer: "
                       f"{peers[fastest] / r['steady_s']:.2f}x")
    if name in ("heterogeneous", "heavy_tailed"):
        ref_label = min(("numpy.convolve loop", "pad-to-max FFT (JAX, archived)"),
                        key=lambda k: peers[k])
        ref = peers[ref_label]
        for label in (NATURAL, PACKED):
            got = ref / rows[label]["steady_s"]
            out.append(f"target >= 3x over the faster of NumPy loop and pad-to-max FFT "
                       f"({ref_label}), {label}: {'met' if got >= 3 else 'NOT met'} "
                       f"({got:.2f}x)")
    if CPU_FWD in rows:
        ref_label = min(("numpy.convolve loop", "pad-to-max FFT (JAX, archived)"),
                        key=lambda k: peers[k])
        got = peers[ref_label] / rows[CPU_FWD]["steady_s"]
        out.append(f"C++ kernels forward >= 3x over the faster of NumPy loop and pad-to-max "
                   f"FFT ({ref_label}): {'met' if got >= 3 else 'NOT met'} ({got:.2f}x); "
                   f"threads vs 1 thread: "
                   f"{rows[CPU_FWD_1T]['steady_s'] / rows[CPU_FWD]['steady_s']:.2f}x")
        got = rows[PADDED_BWD]["steady_s"] / rows[CPU_BWD]["steady_s"]
        out.append(f"C++ kernels backward >= 2x over JAX autodiff of the padded plan: "
                   f"{'met' if got >= 2 else 'NOT met'} ({got:.2f}x)")
    best = min(rows[NATURAL]["steady_s"], rows[PACKED]["steady_s"])
    if name == "extreme":
        pm = rows["pad-to-max FFT (JAX, archived)"]["steady_s"]
        out.append(f"vs pad-to-max FFT: {pm / best:.1f}x (target >= 10x: "
                   f"{'met' if pm / best >= 10 else 'NOT met'}); faster than every peer: "
                   f"{'yes' if best < peers[fastest] else 'no'}")
    if name == "homogeneous":
        ss = rows["single-shape jit jnp.convolve"]["steady_s"]
        sk = rows["single-shape jit vsla direct kernel"]["steady_s"]
        nat = rows[NATURAL]["steady_s"]
        out.append(f"vs.conv / single-shape jnp.convolve: {nat / ss:.2f} (target <= 1.2: "
                   f"{'met' if nat / ss <= 1.2 else 'NOT met'})")
        out.append(f"vs.conv / single-shape same kernel (variable-shape machinery cost): "
                   f"{nat / sk:.2f}")
    return out


def print_table(name: str, res: dict) -> None:
    p = res["profile"]
    print(f"\n## {name}: {res['items']} items, useful {res['useful_flops'] / 1e6:.1f} MFLOP; "
          f"profile max/min {p['max_min_ratio']:.0f}, max/median {p['max_median_ratio']:.1f}, "
          f"buckets {p['n_buckets']}, predicted pad-to-max FFT efficiency "
          f"{p['fft_efficiency']:.2f}")
    print("| implementation | compile/first call ms | steady ms | useful GFLOP/s | "
          "ratio vs ours | max rel err | note |")
    print("|---|---|---|---|---|---|---|")
    ours = res["rows"][NATURAL].get("steady_s")
    for label, r in res["rows"].items():
        if "unavailable" in r:
            print(f"| {label} | – | – | – | – | – | unavailable: {r['unavailable']} |")
            continue
        err = "" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        print(f"| {label} | {r['first_s'] * 1e3:.1f} | {r['steady_s'] * 1e3:.3f} | "
              f"{r['gflops']:.2f} | {r['steady_s'] / ours:.2f} | {err} | {r['note']} |")
    for line in ratios(name, res):
        print(f"- {line}")


def main(argv):
    del argv
    rng = np.random.default_rng(FLAGS.seed)
    policy = vs.ConvPolicy(calibrate=FLAGS.calibrate)
    cost = policy.cost_model()
    print(f"bench_conv: {platform.machine()} {os.cpu_count()} cores, backend "
          f"{jax.default_backend()}, jax {jax.__version__}; cost model: {cost.source}")
    results = {}
    for name in FLAGS.workloads:
        results[name] = run_workload(name, rng, policy, cost)
        print_table(name, results[name])
    if FLAGS.json_out:
        write_json_atomic(FLAGS.json_out, results)


if __name__ == "__main__":
    app.run(main)
