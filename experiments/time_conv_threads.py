"""`vs.conv` forward in a loop on batches where the kernels' thread scheduling and memory
handling matter: many small items (one atomic pull per piece used to bounce the
counter's cache line between the cores), uniform batches (chunks must not unbalance the
threads), a 40 MB output that is 90% slack (page faults: huge pages) and mid-length
signals with few taps (zeroing the valid outputs), next to NumPy's per-item loop on the
same items. ``--only`` picks batches by name prefix.

Each batch is timed in ``--rounds`` rounds of ``--calls`` back-to-back calls; the table
gives the smallest round median (the host is noisy), the CPU time per call of the whole
process (user and system, from ``os.times``) and the minor page faults per call, which
show when the output landed in freshly mapped memory. For an A/B of two builds, run the
script in each tree's process, alternating (``PYTHONPATH=<tree>``).

Usage: cd experiments && python time_conv_threads.py [--rounds 5 --calls 40]
"""

from __future__ import annotations

import os
import resource
import time

import jax
import numpy as np
from absl import app, flags
from common import cpu_flags, thp_mode

import vsla_jax as vs

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 5, "Rounds per batch (the smallest median is reported).")
flags.DEFINE_integer("calls", 40, "Back-to-back calls per round.")
flags.DEFINE_integer("seed", 1, "Seed of the lengths and data.")
flags.DEFINE_list("only", [], "Run only the batches whose names start with these.")


def batches(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (signal lengths, kernel lengths)}``."""
    log_uniform = np.round(np.exp(rng.uniform(np.log(2), np.log(2048), 1024))).astype(int)
    out = {
        "1024 log-uniform 2-2048 x taps 1-8": (log_uniform, rng.integers(1, 9, 1024)),
        "1024 x 64, taps 5": (np.full(1024, 64), np.full(1024, 5)),
        "256 x 7200, taps 4": (np.full(256, 7200), np.full(256, 4)),
        "256 x 1994, taps lognormal 3-512": (
            np.full(256, 1994), np.clip(np.round(rng.lognormal(np.log(68), 1.1, 256)), 3, 512)),
        "64 x 2000, taps 128": (np.full(64, 2000), np.full(64, 128)),
        "16 x 4000, taps 512": (np.full(16, 4000), np.full(16, 512)),
    }
    # a 34 MB output that is ~90% slack (drawn last: the batches above keep their data)
    long = np.round(np.exp(rng.uniform(np.log(2), np.log(8192), 1024))).astype(int)
    taps = np.clip(np.round(3 * (1 + rng.pareto(1.4, 1024))), 3, 128).astype(int)
    out["1024 log-uniform 2-8192 x taps pareto 3-128"] = (long, taps)
    # mid-length signals and few taps: zeroing the valid outputs is a visible share
    out["256 uniform 346-1537 x taps 1-8"] = (rng.integers(346, 1538, 256),
                                              rng.integers(1, 9, 256))
    # a 2.5 MB output, little work: whether glibc trims its heap between calls decides
    # (sweep_kernels --seed 71, draw 14)
    out["64 x 7185, taps pareto 1-10"] = (
        np.full(64, 7185), np.clip((1 + rng.pareto(2.3, 64)).astype(int), 1, 10))
    return out


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_batch(xs: list, ks: list) -> dict[str, float]:
    a, k = vs.stack(xs), vs.stack(ks)

    def ours():
        return jax.block_until_ready(vs.conv(a, k).data)

    for _ in range(5):
        ours()
    medians, t0, f0 = [], os.times(), faults()
    for _ in range(FLAGS.rounds):
        ts = []
        for _ in range(FLAGS.calls):
            t = time.perf_counter()
            ours()
            ts.append(time.perf_counter() - t)
        medians.append(float(np.median(ts)))
    t1, n = os.times(), FLAGS.rounds * FLAGS.calls
    start = time.perf_counter()
    for x, y in zip(xs, ks):
        np.convolve(x, y)
    return dict(ours_ms=min(medians) * 1e3, numpy_ms=(time.perf_counter() - start) * 1e3,
                cpu_ms=((t1.user - t0.user) + (t1.system - t0.system)) / n * 1e3,
                faults=(faults() - f0) / n)


def main(argv):
    del argv
    rng = np.random.default_rng(FLAGS.seed)
    print(f"time_conv_threads: {jax.default_backend()}, {os.cpu_count()} cores, CPU flags "
          f"{cpu_flags()}, transparent huge pages '{thp_mode()}', vsla_jax from "
          f"{os.path.dirname(vs.__file__)}")
    print("| batch | ours ms (best round median) | CPU ms per call | page faults per call "
          "| NumPy loop ms | NumPy / ours |")
    print("|---|---|---|---|---|---|")
    for name, (la, lb) in batches(rng).items():
        if FLAGS.only and not any(name.startswith(o) for o in FLAGS.only):
            continue
        xs = [rng.standard_normal(int(m)).astype(np.float32) for m in la]
        ks = [rng.standard_normal(int(m)).astype(np.float32) for m in lb]
        r = time_batch(xs, ks)
        print(f"| {name} | {r['ours_ms']:.3f} | {r['cpu_ms']:.2f} | {r['faults']:.0f} | "
              f"{r['numpy_ms']:.2f} | {r['numpy_ms'] / r['ours_ms']:.2f}x |", flush=True)


if __name__ == "__main__":
    app.run(main)
