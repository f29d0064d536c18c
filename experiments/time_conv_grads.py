"""``vs.conv`` on the C++ kernels under each autodiff mode: the forward, ``jit(grad)`` of
both operands and of the signal alone, and ``jvp`` of a jitted loss (forward mode after
``jit``, which the kernels' former ``custom_vjp`` refused), on a few stacked batches.

Every row is the median of interleaved rounds (``common.timed_interleaved``), in
microseconds. Run it from a tree and from an older one (``PYTHONPATH=<tree>``) to compare
commits; a mode the tree cannot run prints its error's type.

Usage: cd experiments && python time_conv_grads.py [--repeats 200 --seed 3]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from common import cpu_flags, timed_interleaved

import vsla_jax as vs

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 200, "Timed interleaved rounds (median).")
flags.DEFINE_integer("seed", 3, "Seed of the lengths and data.")


def batches(rng) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, signal lengths, kernel lengths) of the batches timed."""
    heavy = np.minimum((rng.pareto(1.2, 256) * 50 + 2).astype(int), 4000)
    return [("16 x 1-40, taps 1-8", rng.integers(1, 40, 16), rng.integers(1, 8, 16)),
            ("256 heavy-tailed 2-4000, taps 1-64", heavy, rng.integers(1, 64, 256)),
            ("64 x 2k-4k, taps 300-600", rng.integers(2000, 4000, 64),
             rng.integers(300, 600, 64)),
            ("1024 x 8-64, taps 3-9", rng.integers(8, 64, 1024), rng.integers(3, 9, 1024))]


def modes(a: vs.VarTensor, k: vs.VarTensor) -> dict:
    """The timed calls on one batch (jitted ones compiled on their first call)."""
    def loss(ad, kd):
        out = vs.conv(vs.VarTensor(ad, a.lengths), vs.VarTensor(kd, k.lengths))
        return jnp.sum(out.data ** 2)

    both = jax.jit(jax.grad(loss, argnums=(0, 1)))
    signal = jax.jit(jax.grad(loss))
    jloss = jax.jit(loss)
    jvp = jax.jit(lambda ad, kd: jax.jvp(jloss, (ad, kd), (ad, kd))[1])
    return {"forward": lambda: vs.conv(a, k),
            "jit(grad) both": lambda: both(a.data, k.data),
            "jit(grad) signal": lambda: signal(a.data, k.data),
            "jvp of jit": lambda: jvp(a.data, k.data)}


def main(argv):
    del argv
    rng = np.random.default_rng(FLAGS.seed)
    print(f"time_conv_grads: {jax.default_backend()}, CPU flags {cpu_flags()}")
    print("| batch | " + " | ".join(modes(vs.stack([[1.0]]), vs.stack([[1.0]]))) + " |")
    print("|---|---|---|---|---|")
    for name, la, lb in batches(rng):
        a = vs.stack([rng.standard_normal(n).astype(np.float32) for n in la])
        k = vs.stack([rng.standard_normal(n).astype(np.float32) for n in lb])
        fns, cells = {}, {}
        for label, fn in modes(a, k).items():
            try:
                jax.block_until_ready(fn())
                fns[label] = fn
            except Exception as e:  # noqa: BLE001 (an older tree's refusal is a result)
                cells[label] = type(e).__name__
        for label, (_, s) in timed_interleaved(fns, FLAGS.repeats).items():
            cells[label] = f"{s * 1e6:.1f}"
        print(f"| {name} | " + " | ".join(cells[lab] for lab in modes(a, k)) + " |")


if __name__ == "__main__":
    app.run(main)
