"""Where a ``jit(grad)`` step of ``vs.attention`` spends its time, part by part.

For each workload of ``bench_attention.py`` (same lengths, same seeds) it times, on the
same data, with ``getrusage`` minor page faults per call:
  ``step``      ``jit(grad)`` of ``sum(o ** 2)`` through ``vs.attention`` (the natural
                training call; what ``bench_attention --backward`` times as fwd+bwd);
  ``forward``   the forward kernel alone;
  ``cotangent`` XLA's ``2 * o`` over the padded output alone (the loss's cotangent);
  ``backward``  the backward kernel alone, on that cotangent.
Each part alone reuses its buffers from call to call; the step's ``preallocated temp``
(printed, from ``memory_analysis``) holds the saved output and the cotangent, and a
buffer above glibc's mmap threshold (32 MiB unless raised) is mapped afresh on every
call, so the difference between the step and the sum of its parts is mostly page
faults. ``--retain_host_memory`` calls ``vs.retain_host_memory()`` first (process-wide).

  cd experiments && python profile_attention_step.py --workloads corpus,lognormal
"""

from __future__ import annotations

import resource
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from bench_attention import make_batch, workload_lengths

import vsla_jax as vs
from icd_jax.runtime.measure import once
from vsla_jax import kernels
from vsla_jax.attention import cpu

# --workloads, --seed and --retain_host_memory are bench_attention's flags (imported)
flags.DEFINE_integer("calls", 15, "Timed calls per part (median).")
FLAGS = flags.FLAGS


def timed_with_faults(fn, calls: int) -> tuple[float, float]:
    """(median ms, minor page faults per call) of ``fn`` after one warm-up call."""
    once(fn)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = [once(fn) for _ in range(calls)]
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls
    return float(np.median(times) * 1e3), faults


def profile(name: str) -> None:
    rng = np.random.default_rng([FLAGS.seed, zlib.crc32(name.encode())])
    lengths = workload_lengths(name, rng)
    if lengths is None:
        print(f"## {name}: unavailable (no tokenizer data)")
        return
    q, k, v = make_batch(lengths, rng)
    lq, lk = q.lengths, k.lengths
    scale = 1.0 / np.sqrt(q.features[1])

    def loss(qd, kd, vd):
        o = vs.attention(vs.VarTensor(qd, lq), vs.VarTensor(kd, lk), vs.VarTensor(vd, lk))
        return jnp.sum(o.data * o.data)

    step = jax.jit(jax.grad(loss, (0, 1, 2)))
    temp = step.lower(q.data, k.data, v.data).compile().memory_analysis().temp_size_in_bytes
    sizes = cpu.own_sizes(q.data, k.data, v.data)
    forward = jax.jit(lambda a, b, c: cpu.forward_call(a, b, c, lq, lk, causal=False,
                                                       scale=scale, sizes=sizes))
    o, lse, _ = forward(q.data, k.data, v.data)
    cotangent = jax.jit(lambda o: 2 * o)
    do = cotangent(o)
    backward = jax.jit(lambda a, b, c, o, lse, do: cpu.backward_call(
        a, b, c, lq, lk, o, lse, do, causal=False, scale=scale, sizes=sizes))
    calls = {
        "step": lambda: step(q.data, k.data, v.data),
        "forward": lambda: forward(q.data, k.data, v.data)[0],
        "cotangent": lambda: cotangent(o),
        "backward": lambda: backward(q.data, k.data, v.data, o, lse, do),
    }
    parts = {part: timed_with_faults(fn, FLAGS.calls) for part, fn in calls.items()}
    print(f"## {name}: B={len(lengths)}, lengths {lengths.min()}-{lengths.max()} (median "
          f"{int(np.median(lengths))}), padded output {o.size * o.dtype.itemsize / 2**20:.1f}"
          f" MiB, step's preallocated temp {temp / 2**20:.1f} MiB")
    print("| part | ms | page faults per call |")
    print("|---|---|---|")
    for part, (ms, faults) in parts.items():
        print(f"| {part} | {ms:.2f} | {faults:.0f} |")
    alone = sum(parts[p][0] for p in ("forward", "cotangent", "backward"))
    print(f"- step - (forward + cotangent + backward alone): {parts['step'][0] - alone:.2f} ms")


def main(argv):
    del argv
    if kernels.target(cpu.FWD) is None:
        print("profile_attention_step: the C++ kernels are not built; nothing to profile")
        return
    retained = vs.retain_host_memory() if FLAGS.retain_host_memory else False
    print(f"profile_attention_step: jax {jax.__version__}, backend {jax.default_backend()}; "
          f"large host buffers {'retained by malloc' if retained else 'as glibc default'}")
    for name in FLAGS.workloads:
        profile(name)


if __name__ == "__main__":
    app.run(main)
