"""The two natural calls of the CPU kernels on many random length distributions.

Each draw picks a length family and its parameters at random (seeded), builds the batch
the way a user would (``vs.stack`` of a list of items, outside the timed call) and times,
in interleaved rounds in one process:

conv       ``vs.conv(vs.stack(xs), vs.stack(ks))`` against the faster of the NumPy
           per-item loop and the pad-to-max FFT in JAX (target >= 3x), and ``jit(grad)``
           of a weighted sum through ``vs.conv`` against JAX autodiff of the padded plan
           (target >= 2x).
attention  ``vs.attention(q, k, v)`` (self-attention, items ``[n, H, D]``) against
           PyTorch SDPA on each sequence with every core (forward target >= 1.2x), and
           ``jit(grad)`` of ``sum(o ** 2)`` against torch's ``loss.backward()`` of the
           same loss (fwd+bwd, and the backward alone: >= 1.0x). The backward alone is
           timed directly on both sides: ours is the jitted ``vjp`` of the forward
           applied to the loss's cotangent, torch's is ``loss.backward()`` after an
           untimed forward with grad (``common.torch_sdpa_backward``).
           PyTorch's rows run in their own interleaved rounds after ours (its spinning
           OpenMP workers slow whatever runs right after them).

Families: uniform, log-uniform, lognormal (random sigma), bimodal (a random share of
long items), Pareto (power law), constant, tiny (1-8) and few-long; the batch size, and
for attention H, D and ``causal``, are drawn too. Every line prints the draw, the times
and the ratios; the summary gives the worst and median ratio and how many draws met
each target.

Each timed sample is one call by default. ``--min_sample_ms 2`` makes it the mean of
back-to-back calls lasting at least 2 ms, for both sides alike: one call of a few
microseconds also times the caches and the allocator state that the previous row left.

Usage: python experiments/sweep_kernels.py [--kinds conv,attention] [--draws 16]
       [--seed N] [--min_sample_ms 2] [--retain_host_memory]
"""

from __future__ import annotations

import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from common import (
    attention_on,
    cpu_flags,
    jax_backward,
    pad,
    pad_to_max_fft,
    timed_interleaved,
    torch_sdpa_backward,
    torch_sdpa_per_sequence,
    write_json_atomic,
)

import vsla_jax as vs

FLAGS = flags.FLAGS
flags.DEFINE_list("kinds", ["conv", "attention"], "Which natural calls to sweep (conv "
                  "first: PyTorch's threads keep spinning after its calls and slow what "
                  "runs next).")
flags.DEFINE_integer("draws", 16, "Random distributions per kind.")
flags.DEFINE_integer("repeats", 5, "Timed interleaved rounds (median).")
flags.DEFINE_integer("seed", 2026, "Seed of the draws (a new seed: unseen distributions).")
flags.DEFINE_bool("backward", True, "Also time the backward.")
flags.DEFINE_float("min_sample_ms", 0.0, "Each timed sample is the mean of back-to-back "
                   "calls lasting at least this long (0: one call, as in every sweep "
                   "before 2026-12-07's eighth session). One call of a few microseconds "
                   "also times the caches that the previous row left.")
flags.DEFINE_string("json_out", None, "Optional JSON results path (written atomically).")
flags.DEFINE_bool("retain_host_memory", False, "Call vs.retain_host_memory() first "
                  "(process-wide: glibc keeps large freed buffers; every library's rows).")

FAMILIES = ("uniform", "loguniform", "lognormal", "bimodal", "pareto", "constant", "tiny",
            "fewlong")


def draw_lengths(family: str, n: int, lo: int, hi: int, rng: np.random.Generator):
    """``n`` int64 lengths in ``[lo, hi]`` from ``family`` with random parameters, and a
    short description of the draw."""
    if family == "uniform":
        a, b = sorted(rng.integers(lo, hi + 1, 2))
        return rng.integers(a, b + 1, n), f"uniform[{a},{b}]"
    if family == "loguniform":
        out = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
        return np.round(out).astype(np.int64), f"loguniform[{lo},{hi}]"
    if family == "lognormal":
        med = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        sigma = float(rng.uniform(0.3, 1.5))
        out = np.round(rng.lognormal(np.log(med), sigma, n))
        return out.astype(np.int64), f"lognormal(median {med:.0f}, sigma {sigma:.1f})"
    if family == "bimodal":
        share = float(rng.uniform(0.05, 0.5))
        short = rng.integers(lo, max(lo + 1, hi // 16), n)
        long = rng.integers(max(lo, hi // 2), hi + 1, n)
        pick = rng.random(n) < share
        return np.where(pick, long, short), f"bimodal({share:.2f} long)"
    if family == "pareto":
        alpha = float(rng.uniform(0.8, 2.5))
        scale = float(np.exp(rng.uniform(np.log(lo), np.log(max(lo, hi // 8)))))
        out = (scale * (1 + rng.pareto(alpha, n))).astype(np.int64)
        return out, f"pareto(scale {scale:.0f}, alpha {alpha:.1f})"
    if family == "constant":
        c = int(rng.integers(lo, hi + 1))
        return np.full(n, c, np.int64), f"constant {c}"
    if family == "tiny":
        return rng.integers(1, 9, n), "tiny[1,8]"
    if family == "fewlong":
        few = max(1, n // 16)
        out = rng.integers(lo, max(lo + 1, hi // 8), n)
        out[rng.choice(n, few, replace=False)] = rng.integers(hi // 2, hi + 1, few)
        return out, f"fewlong({few} long)"
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


def clipped(family, n, lo, hi, rng):
    lens, desc = draw_lengths(family, n, lo, hi, rng)
    return np.clip(lens, max(lo, 1), hi), desc


def medians(fns: dict) -> dict[str, float]:
    """Median seconds of each function over interleaved rounds (``timed_interleaved``)."""
    return {lab: s for lab, (_, s) in timed_interleaved(
        fns, FLAGS.repeats, FLAGS.min_sample_ms / 1e3).items()}


def summarise(lens: np.ndarray) -> str:
    return f"{lens.min()}/{int(np.median(lens))}/{lens.max()}"


# -- conv -------------------------------------------------------------------------------
def conv_draw(rng: np.random.Generator) -> dict:
    family = str(rng.choice(FAMILIES))
    n = int(rng.choice([16, 64, 256, 1024]))
    la, desc = clipped(family, n, 2, int(rng.choice([256, 2048, 8192])), rng)
    lb, kdesc = clipped(str(rng.choice(FAMILIES)), n, 1, int(rng.choice([16, 128, 512])),
                        rng)
    xs = [rng.standard_normal(int(m)).astype(np.float32) for m in la]
    ks = [rng.standard_normal(int(m)).astype(np.float32) for m in lb]
    a, k = vs.stack(xs), vs.stack(ks)
    xp = jax.device_put(pad(xs, int(la.max())))
    kp = jax.device_put(pad(ks, int(lb.max())))
    fns = {"ours": lambda: vs.conv(a, k).data,
           "numpy loop": lambda: [np.convolve(x, y) for x, y in zip(xs, ks)],
           "pad-to-max FFT": lambda: pad_to_max_fft(xp, kp)}
    # The backward rows are timed in their own rounds, after the forward ones: the padded
    # autodiff backward can take 100s of ms, and a call right after it ran 3-15x slower
    # for several ms (NumPy's loop too), which fell on whichever forward row came next.
    late = {}
    if FLAGS.backward:
        w = jnp.asarray(rng.standard_normal((n, a.capacity[0] + k.capacity[0] - 1)),
                        jnp.float32)

        def grad_of(policy):
            def loss(da, db, la_, lb_):
                out = vs.conv(vs.VarTensor(da, la_), vs.VarTensor(db, lb_), policy=policy)
                return jnp.sum(out.data * w)
            g = jax.jit(jax.grad(loss, (0, 1)))
            return lambda: g(a.data, k.data, a.lengths, k.lengths)

        late["ours bwd"] = grad_of(None)
        late["padded autodiff bwd"] = grad_of(vs.ConvPolicy(plan="padded"))
    err = max(float(np.abs(np.asarray(o)[: len(x) + len(y) - 1] - np.convolve(
        x.astype(np.float64), y.astype(np.float64))).max()) / (1 + np.abs(x).sum())
        for o, x, y in zip(vs.conv(a, k).to_list(), xs, ks))
    t = medians(fns)
    if late:
        t |= medians(late)
    peer = min(t["numpy loop"], t["pad-to-max FFT"])
    row = dict(family=f"{desc} x {kdesc}", items=n, signals=summarise(la),
               kernels=summarise(lb), ms={lab: s * 1e3 for lab, s in t.items()},
               fwd_ratio=peer / t["ours"], max_rel_err=err,
               peer="numpy loop" if t["numpy loop"] <= t["pad-to-max FFT"] else "pad-to-max FFT")
    if FLAGS.backward:
        row["bwd_ratio"] = t["padded autodiff bwd"] / t["ours bwd"]
    return row


# -- attention --------------------------------------------------------------------------
def attention_draw(rng: np.random.Generator) -> dict:
    family = str(rng.choice(FAMILIES))
    n = int(rng.choice([1, 4, 16, 64]))
    heads, dim = int(rng.choice([4, 8, 12])), int(rng.choice([32, 64, 80]))
    causal = bool(rng.random() < 0.3)
    lens, desc = clipped(family, n, 1, int(rng.choice([128, 512, 1024])), rng)
    # keep the draw's work bounded: at most ~6 GFLOP of useful forward work
    while 4.0 * heads * dim * float((lens.astype(np.float64) ** 2).sum()) > 6e9:
        lens = np.maximum(lens // 2, 1)
    items = [[rng.standard_normal((int(m), heads, dim)).astype(np.float32) for m in lens]
             for _ in range(3)]
    q, k, v = (vs.stack(x) for x in items)
    padded = [np.stack([np.pad(x, ((0, int(lens.max()) - len(x)), (0, 0), (0, 0)))
                        for x in xs]) for xs in items]
    fns = {"ours": lambda: vs.attention(q, k, v, causal=causal).data}
    if FLAGS.backward:
        forward = attention_on(q, k, v, causal=causal)
        g = jax.jit(jax.grad(lambda *d: jnp.sum(forward(*d) ** 2), (0, 1, 2)))
        fns["ours fwd+bwd"] = lambda: g(q.data, k.data, v.data)
        fns["ours bwd"] = jax_backward(forward, q.data, k.data, v.data)
    # PyTorch's rows are timed in their own rounds, after ours: its OpenMP workers keep
    # spinning after each call and slowed a row timed right after them by up to 60%
    late = {}
    try:
        tf, tb = torch_sdpa_per_sequence(*padded, lens, causal=causal)
        late["torch"] = tf
        if FLAGS.backward:
            late["torch fwd+bwd"] = tb
            late["torch bwd"] = torch_sdpa_backward(*padded, lens, causal=causal)
        ref = [np.asarray(o.transpose(0, 1)) for o in tf()]
    except ImportError:
        ref = None
    t = medians(fns)
    t |= medians(late)
    row = dict(family=desc, items=n, heads=heads, dim=dim, causal=causal,
               lengths=summarise(lens), useful_gflop=4.0 * heads * dim * float(
                   (lens.astype(np.float64) ** 2).sum()) / (2e9 if causal else 1e9),
               ms={lab: s * 1e3 for lab, s in t.items()})
    if ref is not None:
        ours = vs.attention(q, k, v, causal=causal)
        row["max_abs_err"] = max(float(np.abs(np.asarray(ours.data[i, :m, :heads, :dim]) -
                                              r).max()) for i, (m, r) in enumerate(zip(lens, ref)))
        row["fwd_ratio"] = t["torch"] / t["ours"]
        if FLAGS.backward:
            row["fwdbwd_ratio"] = t["torch fwd+bwd"] / t["ours fwd+bwd"]
            row["bwd_ratio"] = t["torch bwd"] / t["ours bwd"]
    return row


# -- report -----------------------------------------------------------------------------
TARGETS = {"conv": {"fwd_ratio": 3.0, "bwd_ratio": 2.0},
           "attention": {"fwd_ratio": 1.2, "fwdbwd_ratio": 1.0, "bwd_ratio": 1.0}}


def print_rows(kind: str, rows: list[dict]) -> None:
    keys = [k for k in TARGETS[kind] if any(r.get(k) is not None for r in rows)]
    if kind == "conv":
        head = ("| # | family (signals x kernels) | B | signals min/med/max | kernels | ours ms "
                "| peer ms |")
    else:
        head = "| # | family | B | H | D | causal | lengths min/med/max | ours ms | torch ms |"
    print(f"\n## {kind}\n{head} " + " | ".join(keys) + " | max err |")
    print("|" + "---|" * (head.count("|") - 1 + len(keys) + 1))
    for i, r in enumerate(rows):
        ms = r["ms"]
        if kind == "conv":
            cells = [r["family"], r["items"], r["signals"], r["kernels"], f"{ms['ours']:.3f}",
                     f"{min(ms['numpy loop'], ms['pad-to-max FFT']):.3f} ({r['peer']})"]
            err = r["max_rel_err"]
        else:
            cells = [r["family"], r["items"], r["heads"], r["dim"], r["causal"], r["lengths"],
                     f"{ms['ours']:.2f}", f"{ms.get('torch', float('nan')):.2f}"]
            err = r.get("max_abs_err", float("nan"))
        ratios = [f"{r[k]:.2f}x" + ("" if r[k] >= TARGETS[kind][k] else " **miss**")
                  if r.get(k) is not None else "–" for k in keys]
        print(f"| {i} | " + " | ".join(map(str, cells + ratios)) + f" | {err:.1e} |")
    for k in keys:
        vals = np.array([r[k] for r in rows if r.get(k) is not None])
        met = int((vals >= TARGETS[kind][k]).sum())
        print(f"- {kind} {k}: worst {vals.min():.2f}x, median {np.median(vals):.2f}x; "
              f"target >= {TARGETS[kind][k]}x met on {met} of {len(vals)} draws")


def main(argv):
    del argv
    retained = vs.retain_host_memory() if FLAGS.retain_host_memory else False
    print(f"sweep_kernels: {platform.machine()} {os.cpu_count()} cores, backend "
          f"{jax.default_backend()}, jax {jax.__version__}, CPU flags {cpu_flags()}, "
          f"seed {FLAGS.seed}, {FLAGS.draws} draws, {FLAGS.repeats} rounds, large host "
          f"buffers {'retained (vs.retain_host_memory)' if retained else 'as glibc default'}")
    out = {}
    for kind in FLAGS.kinds:
        if kind not in TARGETS:
            raise app.UsageError(f"unknown kind {kind!r}; known: {', '.join(TARGETS)}")
        rng = np.random.default_rng([FLAGS.seed, list(TARGETS).index(kind)])
        rows = []
        for i in range(FLAGS.draws):
            rows.append(conv_draw(rng) if kind == "conv" else attention_draw(rng))
            print(f"{kind} draw {i}: {rows[-1]['family']}, "
                  + ", ".join(f"{k} {rows[-1][k]:.2f}x" for k in TARGETS[kind]
                              if rows[-1].get(k) is not None), flush=True)
        print_rows(kind, rows)
        out[kind] = rows
    if FLAGS.json_out:
        write_json_atomic(FLAGS.json_out, out)


if __name__ == "__main__":
    app.run(main)
