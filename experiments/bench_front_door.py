"""What a small natural call costs around its kernel: the front door, measured.

For small batches, where the kernels' work is a few microseconds, the natural call
(``vs.conv(a, k)``, ``vs.attention(q, k, v)``) is bounded below by its one jitted
custom call. This script times, in the same process on the same data, in loops of
``--inner`` calls (median over ``--rounds`` interleaved rounds):

  natural      ``vs.conv(a, k)`` / ``vs.attention(q, k, v)`` on batches from ``vs.stack``
  kernel call  the same custom call jitted alone, its arguments prepared outside the loop
               (the floor of the natural call: JAX's dispatch plus the kernel)
  peer         the NumPy per-item loop (conv) / PyTorch SDPA per sequence (attention)

and prints the front door (natural - kernel call) and the ratio peer / natural. Then
the floors below the kernel call, on the first conv case's arrays: a jitted identity of
the two data arrays (JAX's dispatch of any jitted call), and handing a NumPy array of
the output's size to JAX (``jnp.asarray``: what a route around XLA, calling the kernel
on host buffers, would pay to return its result).

  cd experiments && python bench_front_door.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from common import cpu_flags, torch_sdpa_per_sequence

import vsla_jax as vs
from vsla_jax import kernels
from vsla_jax.attention import cpu as attention_cpu
from vsla_jax.conv import cpu as conv_cpu

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 15, "Interleaved rounds (median).")
flags.DEFINE_integer("inner", 200, "Calls per round and implementation.")
flags.DEFINE_integer("seed", 0, "Seed of the data.")


def per_call_us(fns: dict, rounds: int, inner: int) -> dict[str, float]:
    """Median microseconds per call of each function (results blocked on), over
    interleaved rounds of ``inner`` calls each."""
    for fn in fns.values():
        for _ in range(20):
            jax.block_until_ready(fn())
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                jax.block_until_ready(fn())
            samples[name].append((time.perf_counter() - t0) / inner * 1e6)
    return {name: float(np.median(s)) for name, s in samples.items()}


def conv_batches(rng, n: int, sig: tuple[int, int], ker: tuple[int, int]):
    """Two stacked batches of n float32 signals / kernels with lengths in [lo, hi)."""
    xs = [rng.standard_normal(int(m)).astype(np.float32) for m in rng.integers(*sig, n)]
    ks = [rng.standard_normal(int(m)).astype(np.float32) for m in rng.integers(*ker, n)]
    return xs, ks, vs.stack(xs), vs.stack(ks)


def floors(rng) -> dict[str, float]:
    """Microseconds of a jitted identity of two arrays and of ``jnp.asarray`` of a
    NumPy array of a conv output's size, on the first conv case's shapes."""
    _, _, a, k = conv_batches(rng, 16, (2, 9), (3, 17))
    identity = jax.jit(lambda x, y: (x, y))
    host = np.zeros((a.data.shape[0], a.data.shape[1] + k.data.shape[1] - 1), np.float32)
    return per_call_us({"jitted identity of (a, k)": lambda: identity(a.data, k.data),
                        f"jnp.asarray of a NumPy {host.shape} array": lambda: jnp.asarray(
                            host)}, FLAGS.rounds, FLAGS.inner)


def conv_case(rng, n: int, sig: tuple[int, int], ker: tuple[int, int]) -> dict:
    xs, ks, a, k = conv_batches(rng, n, sig, ker)
    bare = jax.jit(conv_cpu.conv_with_lengths)
    la, lb = a.lengths[:, 0], k.lengths[:, 0]
    t = per_call_us({
        "natural": lambda: vs.conv(a, k).data,
        "kernel call": lambda: bare(a.data, k.data, la, lb)[0],
        "peer": lambda: [np.convolve(x, y) for x, y in zip(xs, ks)],
    }, FLAGS.rounds, FLAGS.inner)
    return dict(case=f"conv B={n}, signals {sig[0]}-{sig[1] - 1}, kernels "
                     f"{ker[0]}-{ker[1] - 1}", peer_name="NumPy loop", **t)


def attention_case(rng, length: int, heads: int, dim: int) -> dict:
    items = [[rng.standard_normal((length, heads, dim)).astype(np.float32)]
             for _ in range(3)]
    q, k, v = (vs.stack(x) for x in items)  # every axis variable, as vs.stack gives
    scale = 1.0 / np.sqrt(dim)
    sizes = (heads, dim, heads, dim)
    bare = jax.jit(attention_cpu.attention_with_lengths, static_argnums=(5, 6, 7))
    fwd, _ = torch_sdpa_per_sequence(*(np.stack(x) for x in items), np.array([length]))
    t = per_call_us({
        "natural": lambda: vs.attention(q, k, v).data,
        "kernel call": lambda: bare(q.data, k.data, v.data, q.lengths, k.lengths, False,
                                    scale, sizes)[0],
        "peer": fwd,
    }, FLAGS.rounds, FLAGS.inner)
    return dict(case=f"attention B=1, {length} tokens, H={heads}, D={dim}",
                peer_name="torch SDPA", **t)


def main(argv):
    del argv
    if not (kernels.registered(conv_cpu.FWD) and kernels.registered(attention_cpu.FWD)):
        print("bench_front_door: the C++ kernels are not built (pip install -e .); "
              "nothing to measure")
        return
    print(f"bench_front_door: {jax.default_backend()}, jax {jax.__version__}, CPU flags "
          f"{cpu_flags()}, {FLAGS.rounds} rounds of {FLAGS.inner} calls")
    rng = np.random.default_rng(FLAGS.seed)
    rows = [conv_case(rng, 16, (2, 9), (3, 17)), conv_case(rng, 16, (8, 300), (1, 6)),
            conv_case(rng, 256, (2, 9), (1, 9))]
    try:
        rows += [attention_case(rng, n, h, d) for n, h, d in ((1, 4, 80), (3, 8, 64),
                                                               (27, 4, 80))]
    except ImportError:
        print("(attention rows skipped: torch is not installed)")
    print("| call | natural us | kernel call us | front door us | peer | peer us | "
          "peer / natural |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['natural']:.1f} | {r['kernel call']:.1f} | "
              f"{r['natural'] - r['kernel call']:.1f} | {r['peer_name']} | "
              f"{r['peer']:.1f} | {r['peer'] / r['natural']:.2f}x |")
    print("\n| floor | us |\n|---|---|")
    for name, us in floors(rng).items():
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    app.run(main)
