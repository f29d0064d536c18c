"""Time the XLA engine's FFT convolution (``vs.conv(..., method="fft")`` with the C++
kernels off: what GPUs, feature axes and forward-mode AD run), forward and a jitted
gradient, on a few batch shapes, and print one JSON line of median milliseconds.

For A/B runs of two trees on the same machine (the script imports whatever
``vsla_jax`` is first on the path):

  cd experiments && python time_fft_conv.py
  PYTHONPATH=/path/to/other/tree python time_fft_conv.py
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import vsla_jax as vs

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 15, "Timed calls per row (median).")
flags.DEFINE_integer("seed", 0, "Seed of the lengths and data.")

#: (items, signal length range, kernel length range, feature axes)
SHAPES = {"64 x 2k-4k, taps 300-600": (64, (2000, 4000), (300, 600), ()),
          "16 x 8k-16k, taps 1k-2k": (16, (8000, 16000), (1000, 2000), ()),
          "32 x 1k-2k x 4 features, taps 100-200": (32, (1000, 2000), (100, 200), (4,))}


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return round(float(np.median(times)) * 1e3, 3)


def main(argv):
    del argv
    rng = np.random.default_rng(FLAGS.seed)
    policy = vs.ConvPolicy(cpu_kernels=False, calibrate=False)
    out = {}
    for name, (n, sig, ker, feats) in SHAPES.items():
        xs = [rng.standard_normal((int(m), *feats)).astype(np.float32)
              for m in rng.integers(*sig, n)]
        ks = [rng.standard_normal((int(m), *feats)).astype(np.float32)
              for m in rng.integers(*ker, n)]
        a, k = vs.stack(xs, rank=1), vs.stack(ks, rank=1)

        def loss(d, a=a, k=k):
            y = vs.conv(vs.VarTensor(d, a.lengths), k, method="fft", policy=policy)
            return jnp.sum(y.data ** 2)

        grad = jax.jit(jax.grad(loss))
        out[name] = median_ms(
            lambda a=a, k=k: vs.conv(a, k, method="fft", policy=policy).data, FLAGS.repeats)
        out[name + " grad"] = median_ms(lambda g=grad, a=a: g(a.data), FLAGS.repeats)
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
