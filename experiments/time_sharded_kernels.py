"""The C++ kernels on a batch sharded over several host devices, next to the same batch
on one device: what the kernels' partitioning rule (``primitive.batch_partitioned``)
changes. Run it with the devices forced, e.g.

  cd experiments && XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
      python time_sharded_kernels.py

For ``vs.conv`` (forward, and ``jit(grad)`` of a weighted sum) and ``vs.attention``
(forward, and ``jit(grad)`` of ``sum(o ** 2)``), each on one batch, the table gives the
milliseconds per call on one device and sharded (``vs.shard_batch``; medians of
interleaved rounds of back-to-back calls, ``common.timed_interleaved``), and the
collectives in the sharded program's HLO. For an A/B of two builds, run it in each
tree's process (``PYTHONPATH=<tree>``).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from common import cpu_flags, timed_interleaved

import vsla_jax as vs

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 7, "Timed interleaved rounds (median).")
flags.DEFINE_float("min_sample_ms", 20.0, "Each sample: back-to-back calls lasting this long.")
flags.DEFINE_integer("seed", 0, "Seed of the lengths and data.")


def collectives(fn, *args) -> str:
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    found = sorted(set(re.findall(r"all-gather|all-reduce|all-to-all|collective-permute",
                                  hlo)))
    return ", ".join(found) or "none"


def conv_case(rng):
    n = 1024
    la = np.round(np.exp(rng.uniform(np.log(2), np.log(2048), n))).astype(int)
    lb = rng.integers(1, 9, n)
    a = vs.stack([rng.standard_normal(int(m)).astype(np.float32) for m in la])
    k = vs.stack([rng.standard_normal(int(m)).astype(np.float32) for m in lb])
    w = jnp.asarray(rng.standard_normal((n, a.capacity[0] + k.capacity[0] - 1)),
                    jnp.float32)

    def loss(da, db, la_, lb_):
        return jnp.sum(vs.conv(vs.VarTensor(da, la_), vs.VarTensor(db, lb_)).data * w)

    fwd = jax.jit(lambda x, y: vs.conv(x, y).data)
    grad = jax.jit(jax.grad(loss, (0, 1)))
    sa, sk = vs.shard_batch(a), vs.shard_batch(k)
    rows = {}
    for label, (x, y) in (("one device", (a, k)), ("sharded", (sa, sk))):
        args = (x.data, y.data, x.lengths, y.lengths)
        rows[label] = {"forward": (lambda f=fwd, x=x, y=y: f(x, y)),
                       "jit(grad)": (lambda g=grad, args=args: g(*args))}
    notes = {"forward": collectives(fwd, sa, sk),
             "jit(grad)": collectives(grad, sa.data, sk.data, sa.lengths, sk.lengths)}
    return f"vs.conv, {n} signals log-uniform 2-2048 x taps 1-8", rows, notes


def attention_case(rng):
    n, heads, dim = 64, 8, 64
    lens = np.clip(np.round(rng.lognormal(np.log(60), 0.8, n)), 4, 512).astype(int)
    qkv = [vs.stack([rng.standard_normal((int(m), heads, dim)).astype(np.float32)
                     for m in lens], rank=1) for _ in range(3)]

    def loss(qd, kd, vd, ls):
        return jnp.sum(vs.attention(*(vs.VarTensor(d, ls) for d in (qd, kd, vd))).data ** 2)

    fwd = jax.jit(lambda q, k, v: vs.attention(q, k, v).data)
    grad = jax.jit(jax.grad(loss, (0, 1, 2)))
    sharded = [vs.shard_batch(t) for t in qkv]
    rows = {}
    for label, ts in (("one device", qkv), ("sharded", sharded)):
        args = (*(t.data for t in ts), ts[0].lengths)
        rows[label] = {"forward": (lambda f=fwd, ts=ts: f(*ts)),
                       "jit(grad)": (lambda g=grad, args=args: g(*args))}
    notes = {"forward": collectives(fwd, *sharded),
             "jit(grad)": collectives(grad, *(t.data for t in sharded), sharded[0].lengths)}
    return (f"vs.attention, {n} sequences lognormal 4-512 (median {int(np.median(lens))}), "
            f"H={heads}, D={dim}, rank 1", rows, notes)


def main(argv):
    del argv
    devices = jax.device_count()
    print(f"time_sharded_kernels: {jax.default_backend()}, {devices} devices, jax "
          f"{jax.__version__}, CPU flags {cpu_flags()}")
    if devices < 2:
        print("one device only: set XLA_FLAGS=--xla_force_host_platform_device_count=2")
        return
    rng = np.random.default_rng(FLAGS.seed)
    print("| call | one device ms | sharded ms | one device / sharded | collectives in the "
          "sharded program |")
    print("|---|---|---|---|---|")
    for case in (conv_case(rng), attention_case(rng)):
        name, rows, notes = case
        for what in ("forward", "jit(grad)"):
            fns = {label: rows[label][what] for label in rows}
            t = {label: s for label, (_, s) in timed_interleaved(
                fns, FLAGS.repeats, FLAGS.min_sample_ms / 1e3).items()}
            print(f"| {name}: {what} | {t['one device'] * 1e3:.2f} | "
                  f"{t['sharded'] * 1e3:.2f} | {t['one device'] / t['sharded']:.2f}x | "
                  f"{notes[what]} |")


if __name__ == "__main__":
    app.run(main)
