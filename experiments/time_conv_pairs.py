"""The conv kernel alone on batches of one pair shape, against NumPy's per-item loop.

Each shape ``BxNxK`` is a batch of B pairs: signals of N/2..N samples and kernels of
K/2..K taps (uniform, seeded). The kernel is called through ``conv.cpu.ragged_conv``
with ``--threads`` threads (1: the inner loops alone, without the thread pool); NumPy's
``np.convolve`` loop runs the same pairs in the same process. A sample is the mean of
``--calls`` back-to-back calls; the table gives the minimum and median over
``--rounds`` samples, and the ratio of the medians. For A/B between builds, run it in
alternating processes with ``PYTHONPATH`` pointing at each build's tree.

Usage: cd experiments && python time_conv_pairs.py [--shapes 1024x60x16,256x2000x100]
       [--threads 1]
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags
from common import cpu_flags

import vsla_jax as vs
from vsla_jax.conv.cpu import ragged_conv

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["1024x60x16", "256x100x64", "256x200x32", "1024x250x12",
                             "1024x1428x11", "256x2000x100", "64x8000x16"],
                  "Batches as BxNxK: B pairs of N/2..N samples and K/2..K taps.")
flags.DEFINE_integer("threads", 1, "Kernel threads (0: XLA's pool, all cores).")
flags.DEFINE_integer("rounds", 7, "Timed samples per row.")
flags.DEFINE_integer("calls", 30, "Back-to-back calls per sample.")
flags.DEFINE_integer("seed", 0, "Seed of the lengths and data.")


def sample_seconds(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def time_shape(shape: str) -> str:
    """The table row of one ``BxNxK`` shape."""
    b, n, k = (int(v) for v in shape.split("x"))
    rng = np.random.default_rng(FLAGS.seed)
    xs = [rng.standard_normal(int(m)).astype(np.float32)
          for m in rng.integers(max(n // 2, 1), n + 1, b)]
    ks = [rng.standard_normal(int(m)).astype(np.float32)
          for m in rng.integers(max(k // 2, 1), k + 1, b)]
    a, w = vs.stack(xs), vs.stack(ks)

    def ours():
        return jax.block_until_ready(ragged_conv(a, w, FLAGS.threads).data)

    def peer():
        return [np.convolve(x, y) for x, y in zip(xs, ks)]

    for _ in range(3):
        ours()
        peer()
    t_ours, t_peer = [], []
    for _ in range(FLAGS.rounds):
        t_ours.append(sample_seconds(ours, FLAGS.calls))
        t_peer.append(sample_seconds(peer, max(1, FLAGS.calls // 10)))
    mo, mp = float(np.median(t_ours)), float(np.median(t_peer))
    return (f"| {shape} | {min(t_ours) * 1e3:.3f} | {mo * 1e3:.3f} | {mp * 1e3:.3f} | "
            f"{mp / mo:.2f}x |")


def main(argv):
    del argv
    print(f"time_conv_pairs: {jax.default_backend()}, CPU flags {cpu_flags()}, "
          f"threads {FLAGS.threads}, {FLAGS.rounds} samples of {FLAGS.calls} calls")
    print("| shape B x N x K | ours min ms | ours median ms | numpy loop median ms | "
          "numpy / ours |")
    print("|---|---|---|---|---|")
    for shape in FLAGS.shapes:
        print(time_shape(shape), flush=True)


if __name__ == "__main__":
    app.run(main)
