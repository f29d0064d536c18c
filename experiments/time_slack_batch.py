"""Time a conv batch whose padded output is mostly slack: the natural call, its custom call
jitted alone (twice, in separate loops) and the NumPy per-item loop, in loops of calls,
and print one JSON line of median microseconds.

The batch is seed 7's draw 8 of ``sweep_kernels.py`` in kind: 64 log-uniform signals
of 2-8,192 samples with log-normal kernels of median 2 taps, so ~90% of the padded output
is zero slack that the kernel must write.

  cd experiments && python time_slack_batch.py
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import app, flags

import vsla_jax as vs
from vsla_jax import kernels
from vsla_jax.conv import cpu as conv_cpu

FLAGS = flags.FLAGS
flags.DEFINE_integer("items", 64, "Items in the batch.")
flags.DEFINE_integer("inner", 200, "Calls per timed loop.")
flags.DEFINE_integer("rounds", 7, "Timed loops per row (median).")
flags.DEFINE_integer("seed", 0, "Seed of the lengths and data.")


def per_call_us(fn, inner: int, rounds: int) -> float:
    for _ in range(20):
        jax.block_until_ready(fn())
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) / inner)
    return round(float(np.median(times)) * 1e6, 1)


def main(argv):
    del argv
    rng = np.random.default_rng(FLAGS.seed)
    n = np.exp(rng.uniform(np.log(2), np.log(8192), FLAGS.items)).astype(int)
    m = np.clip(np.round(rng.lognormal(np.log(2), 0.8, FLAGS.items)), 1, None).astype(int)
    xs = [rng.standard_normal(int(i)).astype(np.float32) for i in n]
    ks = [rng.standard_normal(int(j)).astype(np.float32) for j in m]
    a, k = vs.stack(xs), vs.stack(ks)
    kernels.registered(conv_cpu.FWD)
    kernels.registered(conv_cpu.CORR)
    bare = jax.jit(conv_cpu.conv_with_lengths)
    la, lb = a.lengths[:, 0], k.lengths[:, 0]
    out = {"padded output": [int(a.data.shape[0]), a.capacity[0] + k.capacity[0] - 1],
           "valid outputs": int((n + m - 1).sum())}
    rows = {"natural": lambda: vs.conv(a, k).data,
            "kernel call": lambda: bare(a.data, k.data, la, lb)[0],
            "kernel call again": lambda: bare(a.data, k.data, la, lb)[0],
            "numpy loop": lambda: [np.convolve(x, y) for x, y in zip(xs, ks)]}
    for name, fn in rows.items():
        out[name + " us"] = per_call_us(fn, FLAGS.inner, FLAGS.rounds)
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
