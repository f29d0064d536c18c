"""Attention's backward alone on one batch stacked two ways: rank 3 (``vs.stack(items)``,
the head axes padded to the capacity ladder) and rank 1 (``vs.stack(items, rank=1)``,
dense ``(H, D)`` features), against PyTorch's per-sequence backward on the same data.

Both JAX rows are ``common.jax_backward`` (the jitted vjp of the forward applied to the
cotangent of ``sum(o ** 2)``), PyTorch's is ``common.torch_sdpa_backward``; medians of
interleaved rounds, PyTorch's in rounds of its own after ours.

Usage: cd experiments && python time_stack_rank_backward.py [--items 64 --lo 163 --hi 190
--heads 4 --dim 80] [--min_sample_ms 100]
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app, flags
from common import (
    attention_on,
    cpu_flags,
    jax_backward,
    timed_interleaved,
    torch_sdpa_backward,
)

import vsla_jax as vs

FLAGS = flags.FLAGS
flags.DEFINE_integer("items", 64, "Sequences in the batch.")
flags.DEFINE_integer("lo", 163, "Shortest sequence.")
flags.DEFINE_integer("hi", 190, "Longest sequence.")
flags.DEFINE_integer("heads", 4, "H.")
flags.DEFINE_integer("dim", 80, "D.")
flags.DEFINE_integer("repeats", 7, "Timed interleaved rounds (median).")
flags.DEFINE_integer("seed", 0, "Seed of the lengths and data.")
flags.DEFINE_float("min_sample_ms", 0.0, "Each timed sample is the mean of back-to-back "
                   "calls lasting at least this long (0: one call), for every row alike.")


def main(argv):
    del argv
    rng = np.random.default_rng(FLAGS.seed)
    lens = rng.integers(FLAGS.lo, FLAGS.hi + 1, FLAGS.items)
    items = [[rng.standard_normal((int(m), FLAGS.heads, FLAGS.dim)).astype(np.float32)
              for m in lens] for _ in range(3)]
    print(f"time_stack_rank_backward: {jax.default_backend()}, CPU flags {cpu_flags()}, "
          f"B={FLAGS.items}, lengths {lens.min()}-{lens.max()}, H={FLAGS.heads}, "
          f"D={FLAGS.dim}")
    fns, shapes = {}, {}
    for rank in (3, 1):
        q, k, v = (vs.stack(x, rank=rank) for x in items)
        shapes[rank] = q.data.shape
        fns[f"ours, rank {rank}"] = jax_backward(attention_on(q, k, v), q.data, k.data,
                                                 v.data)
    padded = [np.stack([np.pad(x, ((0, int(lens.max()) - len(x)), (0, 0), (0, 0)))
                        for x in xs]) for xs in items]
    span = FLAGS.min_sample_ms / 1e3
    t = {lab: s for lab, (_, s) in timed_interleaved(fns, FLAGS.repeats, span).items()}
    try:
        peer = torch_sdpa_backward(*padded, lens)
        t |= {lab: s for lab, (_, s) in timed_interleaved({"torch": peer}, FLAGS.repeats,
                                                            span).items()}
    except ImportError:
        print("torch not installed: no peer row")
    print("| stacking | data shape | backward ms | torch / ours |")
    print("|---|---|---|---|")
    for rank in (3, 1):
        s = t[f"ours, rank {rank}"]
        ratio = f"{t['torch'] / s:.2f}x" if "torch" in t else "–"
        print(f"| rank {rank} | {shapes[rank]} | {s * 1e3:.1f} | {ratio} |")
    if "torch" in t:
        print(f"| torch per sequence | – | {t['torch'] * 1e3:.1f} | 1.00x |")


if __name__ == "__main__":
    app.run(main)
