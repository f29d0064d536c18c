"""Time the XLA-path attention backends (eager forward and a jitted gradient) on one
lognormal batch, and print one JSON line of median milliseconds.

For A/B runs of two trees on the same machine (the script imports whatever
``vsla_jax`` is first on the path):

  cd experiments && python time_attention_backends.py
  PYTHONPATH=/path/to/other/tree python time_attention_backends.py
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
flags.DEFINE_list("backends", ["bucketed", "tiled", "xla"], "Backends to time.")
flags.DEFINE_integer("repeats", 9, "Timed calls per row (median).")
flags.DEFINE_integer("items", 48, "Items in the batch (lognormal lengths, 1..400).")
flags.DEFINE_integer("seed", 0, "Seed of the lengths and data.")


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(float(np.median(times)) * 1e3, 2)


def main(argv):
    del argv
    rng = np.random.default_rng(FLAGS.seed)
    lengths = np.clip(rng.lognormal(3.4, 0.9, FLAGS.items).astype(int), 1, 400)
    heads, dim = 8, 64
    q, k, v = (vs.stack([rng.standard_normal((n, heads, dim)).astype(np.float32)
                         for n in lengths], rank=1) for _ in range(3))
    out = {}
    for backend in FLAGS.backends:
        def loss(d, b=backend):
            x = vs.VarTensor(d, q.lengths)
            return jnp.sum(vs.attention(x, k, v, backend=b).data ** 2)

        grad = jax.jit(jax.grad(loss))
        out[backend] = median_ms(
            lambda b=backend: jax.block_until_ready(vs.attention(q, k, v, backend=b).data),
            FLAGS.repeats)
        out[backend + " grad"] = median_ms(lambda g=grad: jax.block_until_ready(g(q.data)),
                                           FLAGS.repeats)
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
