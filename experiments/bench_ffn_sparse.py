"""Activation-sparse FFN on real MiniLM-L6: where masking and the union tile skip pay.

A neuron of a layer's FFN is active when ``|f| > threshold``; the per-layer thresholds
are calibrated on ``--n_fit`` corpus sentences so that a ``--keep`` share of the entries
is active (``ffn.calibrate_thresholds``). A *call* of ``T`` tokens is ``T`` consecutive
tokens of the tokenised sentence stream (``[CLS]``/``[SEP]`` included). A sentence that
crosses a call boundary is cut into two items, so every call has exactly ``T`` rows and
no slack. ``T`` sweeps ``--tokens``. Paths, each for the FFN down projection of layer
``--layer`` (on that layer's real activations, in the masked model) and for the whole
encoder forward:

- ``dense``: f32, no sparsity;
- ``mask``: ``FFNSparsity(mode="mask")``: inactive activations zeroed, one dense matmul;
- ``skip t<tile> id|pi``: ``mode="skip"``, the union tile skip (calls of at most 32
  rows). At the FFN level, ``k_cap`` is the ladder rung of the call's own union count, so
  nothing overflows. In the encoder, ``k_cap`` is static per layer: the rung of the
  largest union over ``--calib_tokens`` tokens of calibration calls of the same ``T``.
  ``pi``: the same with a co-activation permutation of each layer's neurons, fitted
  with ``build_w("activations")`` and ``fit_permutation`` on the calibration sentences'
  threshold activity and applied with ``permute.apply`` (tile 1 has no layout, so id
  only);
- ``per-token t<tile>``: FFN level only, ``T <= 32``. Each row gathers its own active
  tiles, the path this library removed. It is measured here to show that it never
  wins.

Reported per ``T``: tiles kept per call (mean over held-out calls and the 6 layers), the
time per call (each path runs over the first ``--timed_calls`` held-out calls; median of
``--repeats`` interleaved rounds after warm-up, results blocked on, rounds during which
other processes took over ``--max_foreign`` of the CPUs rerun) and the speedup against
dense. Quality on ``--n_held`` held-out sentences (outside the
labelled quality set): the relative output error of the FFN (``||out - dense|| /
||dense||``, per call and layer, with the encoder's static ``k_cap``, so overflow
counts), and the cosine of the final embeddings of each call's items against dense. A
compact table gives the union size at every ``T``, id vs pi: what a skip could keep
even where none runs. Prints the CPU flags that matter for CPU kernels.

    flock /tmp/bench.lock .venv/bin/python experiments/bench_ffn_sparse.py --keep 0.5
"""

from __future__ import annotations

import json
import os
import platform
import time

from absl import app, flags

flags.DEFINE_list("tokens", ["1", "2", "4", "8", "16", "32", "64", "128", "256", "512"],
                  "Tokens per call.")
flags.DEFINE_float("keep", 0.5, "Share of calibration FFN activations above the per-layer "
                   "threshold.")
flags.DEFINE_list("tiles", ["1", "16"], "Tile sizes (neurons) of the skip paths.")
flags.DEFINE_integer("layer", 3, "Layer of the FFN-level micro-benchmark.")
flags.DEFINE_integer("n_fit", 300, "Sentences for thresholds, pi and k_cap calibration.")
flags.DEFINE_integer("n_held", 200, "Held-out sentences for quality and timed calls.")
flags.DEFINE_integer("calib_tokens", 1024, "Calibration tokens per T (k_cap rungs).")
flags.DEFINE_integer("held_tokens", 1024, "Held-out tokens per T (quality, tiles).")
flags.DEFINE_integer("max_calls", 64, "Most calls per T for calibration and quality.")
flags.DEFINE_float("fit_budget_s", 5.0, "fit_permutation budget per layer.")
flags.DEFINE_integer("repeats", 15, "Timed rounds (median).")
flags.DEFINE_float("max_foreign", 0.1, "Timed rounds during which other processes took more "
                   "than this share of the CPUs are discarded and rerun.")
flags.DEFINE_integer("timed_calls", 8, "Held-out calls each timed path runs over (per-call "
                     "time = total / calls), so no single call's content decides.")
flags.DEFINE_string("json_out", "", "Also write the results to this JSON file.")
FLAGS = flags.FLAGS

MAX_ROWS = 32  # FFNSparsity.max_rows: calls of more rows run the mask


def stream_calls(token_ids, t: int, n_calls: int) -> list[list[list[int]]]:
    """Up to ``n_calls`` calls of exactly ``t`` consecutive tokens of the sentence stream
    ``token_ids`` (a sentence crossing a boundary is cut into two items)."""
    calls, cur, room = [], [], t
    for ids in token_ids:
        pos = 0
        while pos < len(ids):
            take = min(room, len(ids) - pos)
            cur.append(list(ids[pos:pos + take]))
            pos, room = pos + take, room - take
            if room == 0:
                calls.append(cur)
                if len(calls) == n_calls:
                    return calls
                cur, room = [], t
    return calls


def run_all(fns) -> list:
    """Every function's result (one timed unit: a path over several calls)."""
    return [fn() for fn in fns]


def per_token_down(f, w2, b2, threshold, *, tile: int, k: int):
    """The removed per-token path: each row gathers its own active tiles (``k`` slots,
    sort-free) of ``w2`` (``[T, k, tile, H]``) and contracts them."""
    import jax
    import jax.numpy as jnp

    t, n = f.shape
    h, n_t = w2.shape[1], n // tile
    act = jnp.abs(f) > threshold
    on = act.reshape(t, n_t, tile).any(axis=2)
    idx = jax.vmap(lambda o: jnp.nonzero(o, size=k, fill_value=n_t - 1)[0])(on)
    valid = jnp.arange(k)[None, :] < on.sum(axis=1, keepdims=True)
    fm = jnp.where(act, f, 0.0).reshape(t, n_t, tile)
    cols = jnp.where(valid[:, :, None], jnp.take_along_axis(fm, idx[:, :, None], axis=1), 0.0)
    rows = w2.reshape(n_t, tile, h)[idx]
    return jnp.einsum("tkj,tkjh->th", cols, rows) + b2


def main(argv):
    del argv
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from common import cpu_flags, timed_clean, unseen_sentences, write_json_atomic

    import icd_jax
    import vsla_jax as vs
    from icd_jax import permute
    from icd_jax.adapters import ffn, meta
    from icd_jax.models import minilm

    t_start = time.perf_counter()
    tokens = [int(x) for x in FLAGS.tokens]
    tiles = [int(x) for x in FLAGS.tiles]
    keep, lay = FLAGS.keep, FLAGS.layer
    flags_ = cpu_flags(("avx2", "avx512_vnni", "amx_int8"))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, CPU flags: "
          + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags_.items())
          + f"; jax {jax.__version__} on {jax.default_backend()}", flush=True)

    policy = minilm.PackPolicy(tokens=vs.CapacityPolicy.pow2(minimum=1),
                               length=vs.CapacityPolicy.pow2(minimum=8),
                               items=vs.CapacityPolicy.pow2(minimum=1))
    enc = minilm.load(policy=policy)
    n_layers, inter = enc.config.layers, enc.config.intermediate
    spec = minilm.permute_spec(enc.config)
    texts = unseen_sentences(FLAGS.n_fit + FLAGS.n_held)
    fit, held = texts[:FLAGS.n_fit], texts[FLAGS.n_fit:]
    fit_ids, held_ids = enc.tokenize(fit), enc.tokenize(held)

    # -- thresholds and pi from the dense model's activations on the fit sentences -------
    acts = [[] for _ in range(n_layers)]
    for b in enc.packed_batches(fit, 32):
        got = enc.capture_batch(b)
        for i in range(n_layers):
            f, rows = got[f"layer_{i}/ffn"]
            acts[i].append(np.asarray(f)[rows])
    acts = [np.concatenate(a) for a in acts]
    thr = ffn.calibrate_thresholds(acts, keep)
    t0 = time.perf_counter()
    perms = {}
    for i in range(n_layers):
        g = icd_jax.build_w("activations", acts=acts[i], tau=thr[i], top_frac=None)
        perms[f"ffn_{i}"], _ = icd_jax.fit_permutation(g.csr, time_budget_s=FLAGS.fit_budget_s)
    print(f"{len(fit)} fit sentences ({acts[0].shape[0]} tokens): thresholds "
          + ", ".join(f"{x:.3f}" for x in thr) + f" (keep {keep:.0%}); pi fitted in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    del acts
    params_pi = permute.apply(spec, enc.params, perms)
    pis = [np.asarray(perms[f"ffn_{i}"]) for i in range(n_layers)]

    mask_cfg = minilm.FFNSparsity(threshold=thr, tile=16)
    enc_mask = enc.with_transforms(minilm.Transforms(ffn=mask_cfg))
    capture = minilm.capture_fn(enc_mask)
    layouts = {"id": enc.params, "pi": params_pi}
    skips = [(t, "id") for t in tiles] + [(t, "pi") for t in tiles if t > 1]

    def label(tile, layout):
        return f"skip t{tile} {layout}" if tile > 1 else f"skip t{tile}"

    def layer_acts(call) -> list[np.ndarray]:
        """Each layer's FFN activations [T, F] of one call in the masked model."""
        batch = minilm.pack(call, policy)
        if batch.shape[0] != batch.n_tokens:
            raise ValueError(f"a call of {batch.n_tokens} tokens packs into "
                             f"{batch.shape[0]} rows: give --tokens as powers of two")
        _, got = capture(enc.params, *batch.arrays())
        return [np.asarray(got[f"layer_{i}"]["ffn"][0]) for i in range(n_layers)]

    def union(f, i, tile, layout) -> int:
        return ffn.union_count(f[:, pis[i]] if layout == "pi" else f, thr[i], tile)

    @functools.cache
    def record_fn(e):
        """A jitted forward of encoder ``e`` that also returns what its FFNs executed."""
        @jax.jit
        def run(params, *arrays):
            out, state = e.module.apply({"params": params}, *arrays, mutable=[ffn.RECORD])
            return out, state[ffn.RECORD]
        return run

    def lp(i):
        return f"layer_{i}"

    w_of = {lo: [(jnp.asarray(p[lp(i)]["output"]["kernel"]), jnp.asarray(p[lp(i)]["output"]
                                                                          ["bias"]))
                 for i in range(n_layers)] for lo, p in layouts.items()}
    dense_down = jax.jit(lambda f, w, b: jnp.dot(f, w, preferred_element_type=jnp.float32) + b)

    def loop(fn):
        """``fn`` repeated enough times for ~2 ms, returning every result."""
        jax.block_until_ready(fn())
        t = time.perf_counter()
        jax.block_until_ready(fn())
        inner = int(np.clip(2e-3 / max(time.perf_counter() - t, 1e-7), 1, 200))
        return inner, lambda: [fn() for _ in range(inner)]

    rows, unions, loads = [], [], []
    for t in tokens:
        n_calls = int(np.clip(FLAGS.held_tokens // t, 2, FLAGS.max_calls))
        calls = stream_calls(held_ids, t, n_calls)
        held_acts = [layer_acts(c) for c in calls]
        n_t = {tile: inter // tile for tile in tiles}
        # union sizes: analysis at every T (what a skip would keep)
        u = {(tile, lo): float(np.mean([[union(a[i], i, tile, lo) for i in range(n_layers)]
                                         for a in held_acts]))
             for tile, lo in skips}
        unions.append(dict(T=t, **{label(*k): v for k, v in u.items()}))
        skip_here = t <= MAX_ROWS
        # static k_cap per layer: rung of the largest calibration union of this T
        k_caps = {}
        if skip_here:
            cal = [layer_acts(c) for c in stream_calls(
                fit_ids, t, int(np.clip(FLAGS.calib_tokens // t, 2, FLAGS.max_calls)))]
            for tile, lo in skips:
                k_caps[tile, lo] = tuple(
                    ffn.k_cap_rung(max(union(a[i], i, tile, lo) for a in cal), n_t[tile])
                    for i in range(n_layers))
        encs = {"dense": (enc, enc.params), "mask": (enc_mask, enc.params)}
        for tile, lo in skips:
            if skip_here and any(k < n_t[tile] for k in k_caps[tile, lo]):
                cfg = minilm.FFNSparsity(threshold=thr, tile=tile, mode="skip",
                                         k_cap=k_caps[tile, lo], max_rows=MAX_ROWS)
                encs[label(tile, lo)] = (enc.with_transforms(minilm.Transforms(ffn=cfg)),
                                         layouts[lo])

        # -- quality: FFN relative error (per call and layer) and embedding cosines ------
        quality = {}
        for name in encs:
            errs = []
            for a in held_acts:
                for i in range(n_layers):
                    lo = "pi" if name.endswith(" pi") else "id"
                    f = a[i][:, pis[i]] if lo == "pi" else a[i]
                    w2, b2 = w_of[lo][i]
                    ref = dense_down(f, w2, b2)
                    if name == "dense":
                        out = ref
                    elif name == "mask":
                        out = ffn.masked_down(f, w2, b2, thr[i])
                    else:
                        tile = int(name.split()[1][1:])
                        k = k_caps[tile, lo][i]
                        out = (ffn.union_skip_down(f, w2, b2, thr[i], tile=tile, k_cap=k)
                               if k < n_t[tile] else ffn.masked_down(f, w2, b2, thr[i]))
                    errs.append(meta.rel_error(ref, out))
            quality[name] = dict(ffn_rel_err=float(np.mean(errs)))
        ref_emb, cos, dropped = {}, {n: [] for n in encs}, {n: [0, 0] for n in encs}
        for ci, call in enumerate(calls):
            batch = minilm.pack(call, policy)
            for name, (e, p) in encs.items():
                out, rec = record_fn(e)(p, *batch.arrays()) if name.startswith("skip") else (
                    e.forward(p, *batch.arrays()), None)
                emb = np.asarray(out)[: batch.n_items]
                if name == "dense":
                    ref_emb[ci] = emb
                cos[name] += (emb * ref_emb[ci]).sum(axis=1).tolist()
                if rec is not None:
                    for i in range(n_layers):
                        r = rec[lp(i)]["output"]
                        if bool(r["skipped"][0]):
                            dropped[name][0] += int(r["tiles_active"][0]) - int(
                                r["tiles_kept"][0])
                            dropped[name][1] += int(r["tiles_active"][0])
        for name in encs:
            quality[name].update(cos=float(np.mean(cos[name])),
                                 overflow=(dropped[name][0] / dropped[name][1]
                                           if dropped[name][1] else None))

        # -- timing: the first --timed_calls held-out calls, each path over all of them ----
        n_tc = min(FLAGS.timed_calls, len(calls))
        fa = [held_acts[c][lay] for c in range(n_tc)]
        f_of = {"id": [jnp.asarray(a) for a in fa],
                "pi": [jnp.asarray(a[:, pis[lay]]) for a in fa]}
        w_id = w_of["id"][lay]
        fns = {"dense": [functools.partial(dense_down, f, *w_id) for f in f_of["id"]],
               "mask": [functools.partial(ffn.masked_down, f, *w_id, thr[lay])
                        for f in f_of["id"]]}
        ffn_skips = {}
        for tile, lo in skips if skip_here else ():
            calls_fns, n_skip = [], 0
            for a, f in zip(fa, f_of[lo]):  # k_cap: the rung of this call's own union
                k = ffn.k_cap_rung(union(a, lay, tile, lo), n_t[tile])
                if k < n_t[tile]:
                    n_skip += 1
                    calls_fns.append(functools.partial(
                        ffn.union_skip_down, f, *w_of[lo][lay], thr[lay], tile=tile, k_cap=k))
                else:  # what mode="skip" runs on a call it cannot skip
                    calls_fns.append(functools.partial(ffn.masked_down, f, *w_of[lo][lay],
                                                       thr[lay]))
            if n_skip:
                fns[label(tile, lo)], ffn_skips[label(tile, lo)] = calls_fns, n_skip
        per_row = {}
        for tile in tiles if skip_here else ():
            calls_fns, on_rows = [], []
            for a, f in zip(fa, f_of["id"]):
                on = (np.abs(a) > thr[lay]).reshape(t, -1, tile).any(2).sum(1)
                fn = jax.jit(functools.partial(per_token_down, tile=tile, k=ffn.k_cap_rung(
                    int(on.max()), n_t[tile])))
                calls_fns.append(functools.partial(fn, f, *w_id, thr[lay]))
                on_rows.append(on)
            fns[f"per-token t{tile}"] = calls_fns
            per_row[f"per-token t{tile}"] = (float(np.concatenate(on_rows).mean()), n_t[tile])
        inner = {}
        for name in list(fns):
            inner[name], fns[name] = loop(functools.partial(run_all, fns[name]))
        ffn_t, load_f, _ = timed_clean(fns, FLAGS.repeats, FLAGS.max_foreign)
        batches = [minilm.pack(calls[c], policy) for c in range(n_tc)]
        enc_fns = {name: functools.partial(run_all, [functools.partial(
            e.forward, p, *b.arrays()) for b in batches]) for name, (e, p) in encs.items()}
        enc_t, load_e, _ = timed_clean(enc_fns, FLAGS.repeats, FLAGS.max_foreign)
        loads.append(max(load_f or 0.0, load_e or 0.0))
        d_ffn = ffn_t["dense"][1] / inner["dense"] / n_tc
        d_enc = enc_t["dense"][1] / n_tc
        idle = [label(*k) for k in skips
                if skip_here and label(*k) not in encs and label(*k) not in fns]
        for name in dict.fromkeys([*fns, *encs, *idle]):
            row = dict(T=t, path=name)
            if name in idle:
                row["note"] = "not run: every rung covers all tiles"
            if name in per_row:
                row.update(tiles_per_row=per_row[name][0], of=per_row[name][1])
            if name in fns:
                sec = ffn_t[name][1] / inner[name] / n_tc
                row.update(ffn_us=1e6 * sec, ffn_x=d_ffn / sec)
            if name in encs:
                sec = enc_t[name][1] / n_tc
                row.update(enc_ms=1e3 * sec, enc_x=d_enc / sec, **quality[name])
            if name.startswith("skip"):
                tile = int(name.split()[1][1:])
                lo = "pi" if name.endswith(" pi") else "id"
                caps = k_caps[tile, lo]
                row.update(tiles=u[tile, lo], of=n_t[tile], k_cap=float(np.mean(caps)),
                           ffn_calls_skipped=f"{ffn_skips.get(name, 0)}/{n_tc}",
                           enc_layers_skipped=f"{sum(k < n_t[tile] for k in caps)}"
                                              f"/{n_layers}")
            rows.append(row)
        print(f"T={t}: " + ", ".join(
            f"{r['path']} " + (f"{r['ffn_us']:.0f}us/{r['ffn_x']:.2f}x" if "ffn_us" in r
                               else "-") + (f" enc {r['enc_x']:.2f}x cos {r['cos']:.4f}"
                                            if "enc_ms" in r else "")
            for r in rows if r["T"] == t) + f" [{time.perf_counter() - t_start:.0f} s]",
            flush=True)

    # -- whole sentences: the mask's quality on the held-out set --------------------------
    dense_emb = enc.encode(held)
    mask_emb = enc_mask.encode(held)
    sent_cos = (dense_emb * mask_emb).sum(axis=1)
    print_tables(rows, unions, tiles, lay, keep, sent_cos)
    print(f"other processes' CPU share in the kept timing rounds: at most "
          f"{100 * max(loads):.0f}% (mean {100 * np.mean(loads):.0f}%)")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if FLAGS.json_out:
        write_json_atomic(FLAGS.json_out, dict(
            keep=keep, thresholds=list(thr), layer=lay, cpu_flags=flags_, rows=rows,
            foreign_load=loads,
            unions=unions, sentence_cos_mask=dict(mean=float(sent_cos.mean()),
                                                  min=float(sent_cos.min()))))
    else:
        print(json.dumps(dict(keep=keep, n_rows=len(rows))))


def print_tables(rows, unions, tiles, layer, keep, sent_cos) -> None:
    """The Markdown tables of the sweep."""
    def num(v, fmt):
        return "—" if v is None else format(v, fmt)

    print(f"\nkeep {keep:.0%}: held-out sentences, mask vs dense embedding cosine mean "
          f"{sent_cos.mean():.4f}, min {sent_cos.min():.4f}\n")
    print(f"| T | path | tiles kept / call | FFN L{layer} µs | × dense | encoder ms | × dense "
          "| FFN rel err | emb cos | overflow | skipped: FFN calls, encoder layers |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        tiles_ = (f"{r['tiles']:.1f} / {r['of']}" if "tiles" in r else
                  f"{r['tiles_per_row']:.1f} / {r['of']} per row" if "tiles_per_row" in r
                  else "all")
        if "note" in r:
            tiles_ += f" ({r['note']})"
        ov = r.get("overflow")
        print(f"| {r['T']} | {r['path']} | {tiles_} | {num(r.get('ffn_us'), '.0f')} | "
              f"{num(r.get('ffn_x'), '.2f')} | {num(r.get('enc_ms'), '.2f')} | "
              f"{num(r.get('enc_x'), '.2f')} | {num(r.get('ffn_rel_err'), '.4f')} | "
              f"{num(r.get('cos'), '.4f')} | {'—' if ov is None else f'{100 * ov:.1f}%'} | "
              + (f"{r['ffn_calls_skipped']}, {r['enc_layers_skipped']}" if "k_cap" in r
                 else "—") + " |")
    keys = [k for k in unions[0] if k != "T"]
    print("\nUnion of active tiles per call (mean over held-out calls and layers):\n")
    print("| T | " + " | ".join(keys) + " |")
    print("|---:|" + "---:|" * len(keys))
    for u in unions:
        print(f"| {u['T']} | " + " | ".join(f"{u[k]:.1f}" for k in keys) + " |")


if __name__ == "__main__":
    app.run(main)
