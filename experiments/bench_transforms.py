"""S/Q/K transforms on the real MiniLM-L6 under three layouts, in one process.

Rows: 2:4, unstructured 50%, activation-sparse FFN, int8 per-channel (real int8 matmuls,
per-token activations; ``int8-sq`` adds SmoothQuant factors, alpha 0.5, from the
calibration ranges), int8 group-wise (g=32, 64), int4 group-wise (g=32), fp8 (e4m3)
weights, key-block drop (10/25/50%). Group-wise rows quantise weights per (group of
input channels, output channel) and activations with static calibrated scales per
channel group (fake-quantised, float32 compute).

Layouts per row:
  identity   the model as shipped;
  linear     pi fitted on the dense model for the transform's objective (N:M: kept
             magnitude, ``nm_permutation``; group quantisation: RPTQ-style range order
             of the kernels' calibrated inputs; sparse FFN: ``fit_permutation`` of the
             co-activation W per layer; key-block drop: the in-sequence token order by
             the proxy score), then the transform;
  iterative  transform under pi0, then statistics of the *transformed* model (ranges
             or W') give pi1, and the transform is redone on the dense weights under
             pi0 o pi1. Order-independent transforms (unstructured, per-channel int8,
             fp8) have one layout; for N:M and key-block drop iterative is the same as
             linear by construction (said in the table).

Columns: quality drop (pp of topic retrieval precision@1 against dense fp32 on the
labelled ``pydoc_data.topics`` sentences) and mean cosine; tokens/s (interleaved timing
with sentence-transformers on torch CPU, and torch's own dynamic int8, on the first
``--speed_n`` corpus sentences); kernel memory; the layout-sensitive figure: kept
magnitude, measured output error of the quantised kernels on held-out calibration
inputs, FFN tiles touched per token (tile ``--tile``), attention mass kept. Plus
micro-benchmarks: the FFN down projection at decode-like batches (dense vs tile-skipping
at the k_cap each layout needs; on a GPU also the Pallas kernel, with no change to the
script) and attention time with key blocks dropped.

``--ort`` (default on) adds ONNX Runtime peers (``experiments/ort_peer.py``): the same
weights exported to ONNX, run in fp32 and dynamic int8 (``ort-fp32``, ``ort-int8``
rows: quality on the labelled set, figure = nearest-neighbour agreement with dense fp32,
tokens/s in the speed rounds), then the ORT section on unseen sentences against our fp32
and ``minilm.load(quant=...)`` encoders.

The Mamba section applies the weight transforms to a random-init byte-level Mamba and
reports relative logit error, next-token agreement and the perplexity ratio against its
dense self (random weights: only the ratio means anything).
"""

from __future__ import annotations

import os
import platform
import time

from absl import app, flags

flags.DEFINE_integer("quality_n", 0, "Labelled sentences for quality (0: all).")
flags.DEFINE_integer("speed_n", 2000, "Corpus sentences timed per row.")
flags.DEFINE_integer("calib_n", 256, "Held-out sentences calibrating activation ranges.")
flags.DEFINE_integer("w_n", 1200, "Held-out sentences the co-activation W is built from.")
flags.DEFINE_integer("repeats", 1, "Timed rounds kept.")
flags.DEFINE_integer("threads", 2, "torch threads of the peers; ORT intra-op threads.")
flags.DEFINE_integer("tile", 16, "FFN tile (neurons).")
flags.DEFINE_float("ffn_top_frac", 0.1, "FFN neurons active per token.")
flags.DEFINE_integer("block", 4, "Key-block size (tokens).")
flags.DEFINE_float("nm_budget_s", 30.0, "nm_permutation budget over all axes.")
flags.DEFINE_float("fit_budget_s", 5.0, "fit_permutation budget per layer.")
flags.DEFINE_list("rows", ["2:4", "unstructured", "ffn", "int8", "int8-sq", "int8-g32",
                           "int8-g64", "int4-g32", "fp8", "kv10", "kv25", "kv50"],
                  "Rows to run.")
flags.DEFINE_bool("speed", True, "Time the rows (tokens/s).")
flags.DEFINE_bool("mamba", True, "Run the Mamba section.")
flags.DEFINE_bool("mamba_only", False, "Run only the Mamba section.")
flags.DEFINE_bool("ort", True, "Add ONNX Runtime fp32 / dynamic int8 peers (skipped, with "
                  "the reason, when torch/onnxruntime are not importable).")
flags.DEFINE_integer("ort_n", 0, "Unseen distinct corpus sentences for the ORT section (0: "
                     "all).")
flags.DEFINE_bool("ort_per_channel", True, "ORT int8 weights per output channel (as ours).")
flags.DEFINE_string("json_out", "", "Also write the results to this JSON file.")
FLAGS = flags.FLAGS

QUANT_ROWS = {"int8": ("int8", None), "int8-sq": ("int8", None), "int8-g32": ("int8", 32),
              "int8-g64": ("int8", 64), "int4-g32": ("int4", 32), "fp8": ("fp8", None)}
KV_ROWS = {"kv10": 0.10, "kv25": 0.25, "kv50": 0.50}


def main(argv):
    del argv
    import numpy as np
    from common import sentence_transformers_model, timed_clean, write_json_atomic

    import icd_jax
    from icd_jax import capture, corpus, permute, quality
    from icd_jax.adapters import ffn, kv, tree
    from icd_jax.models import minilm

    if FLAGS.mamba_only:
        out = mamba_section()
        if FLAGS.json_out:
            write_json_atomic(FLAGS.json_out, out)
        return
    t_start = time.perf_counter()
    enc = minilm.load()
    spec = minilm.permute_spec(enc.config)
    paths = tree.kernel_paths(enc.params)
    texts, labels = corpus.labelled_sentences()
    if FLAGS.quality_n:
        texts, labels = texts[:FLAGS.quality_n], labels[:FLAGS.quality_n]
    seen = set(texts)
    held = [s for s in corpus.sentences() if s not in seen]
    calib, w_set = held[:FLAGS.calib_n], held[:FLAGS.w_n]
    n_layers, inter = enc.config.layers, enc.config.intermediate
    top_k = int(round(FLAGS.ffn_top_frac * inter))
    print(f"{len(texts)} labelled sentences ({len(np.unique(labels))} topics) for quality, "
          f"{len(held)} held out ({len(calib)} calibrate ranges, {len(w_set)} build W); "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", flush=True)

    # -- quality pass: embeddings plus what each layer sows ---------------------------
    ids = enc.tokenize(texts)
    batches = list(enc.batches(ids, 32))

    def run(e, want=()):
        """Embeddings in input order, FFN tiles/token and KV mass kept (means)."""
        fn = minilm.capture_fn(e) if want else e.forward
        emb = np.zeros((len(ids), enc.config.hidden), np.float32)
        tiles, mass = [], []
        for idx, b in batches:
            out = fn(e.params, *b.arrays())
            if want:
                out, inter_ = out
                rows = b.segment < b.gather.shape[0]
                for i in range(n_layers):
                    lay = inter_[f"layer_{i}"]
                    if "tiles" in want:
                        f = lay["ffn"][0]
                        act = ffn.active_mask(f, top_k=top_k)
                        t = np.asarray(ffn.tiles_per_group(act, FLAGS.tile, 1))[rows]
                        tiles.append(t)
                    if "mass" in want:
                        m = np.asarray(lay["attention"]["kv_mass_kept"][0])
                        mass.append((m * b.lengths).sum())  # token-weighted
            emb[idx] = np.asarray(out)[: len(idx)]
        figs = {}
        if tiles:
            figs["tiles_per_token"] = float(np.concatenate(tiles).mean())
        if mass:  # token-weighted mean over items and layers
            den = n_layers * sum(int(b.lengths.sum()) for _, b in batches)
            figs["mass_kept"] = float(sum(mass) / den)
        return emb, figs

    t0 = time.perf_counter()
    dense_emb, _ = run(enc)
    dense_acc = quality.topic_accuracy(dense_emb, labels)
    print(f"dense fp32: topic accuracy {dense_acc:.4f} ({time.perf_counter() - t0:.0f} s)",
          flush=True)

    # -- calibration: kernel inputs (ranges, held-out samples for errors) -------------
    def kernel_stats(e, sents, order=None):
        absmax, sample = {}, {}
        for b in e.packed_batches(sents, 32):
            for p, x in e.kernel_inputs(b).items():
                absmax[p] = np.maximum(absmax.get(p, 0), np.abs(x).max(0))
                if sum(len(s) for s in sample.get(p, [])) < 1024:
                    sample.setdefault(p, []).append(x)
        return absmax, {p: np.concatenate(v)[:1024] for p, v in sample.items()}

    absmax_dense, _ = kernel_stats(enc, calib)
    _, err_inputs = kernel_stats(enc, held[FLAGS.calib_n:FLAGS.calib_n + 64])

    results, speed_models = [], {}

    def record(row, layout, e, figure, fig_name, memory, note="", want=(), perms=None):
        t = time.perf_counter()
        emb, figs = run(e, want)
        if perms is not None:  # the embedding lies on the permuted residual axis
            emb = np.asarray(permute.permute_output(spec, "embedding", emb,
                                                    permute.invert(perms)))
        if fig_name in figs:
            figure = figs[fig_name]
        q = quality.compare(dense_emb, emb, labels)
        res = dict(row=row, layout=layout, drop_pp=q["drop_pp"], cos_mean=q["cos_mean"],
                   accuracy=q["accuracy"], figure=figure, figure_name=fig_name,
                   memory_mb=memory, note=note)
        results.append(res)
        print(f"  {row:13s} {layout:9s} drop {q['drop_pp']:6.2f} pp  cos {q['cos_mean']:.4f}  "
              f"{fig_name} {figure:.4f}  ({time.perf_counter() - t:.0f} s) {note}", flush=True)
        return res

    f32_mb = sum(np.asarray(permute.flat(enc.params)[p]).nbytes for p in paths) / 2**20

    def ident():
        return tree.identity_perms(spec)

    # -- S: N:M and unstructured ------------------------------------------------------
    for row in [r for r in FLAGS.rows if r in ("2:4", "unstructured")]:
        kind = "2:4" if row == "2:4" else "unstructured"
        layouts = [("identity", ident())]
        if kind == "2:4":
            t = time.perf_counter()
            perms, _ = tree.nm_perms(spec, enc.params, paths, 2, 4,
                                     time_budget_s=FLAGS.nm_budget_s)
            print(f"nm_perms: {time.perf_counter() - t:.0f} s", flush=True)
            layouts.append(("linear", perms))
        for layout, perms in layouts:
            moved = permute.apply(spec, enc.params, perms)
            pruned, m = tree.sparsify(moved, paths, kind, 0.5)
            note = "iterative = linear (weight-only objective)" if layout == "linear" else (
                "one layout (order-independent)" if kind == "unstructured" else "")
            record(row, layout, enc.with_params(pruned), m["error"]["kept_magnitude"],
                   "kept_magnitude", f32_mb, note + "; stored as masked dense", perms=perms)
            speed_models.setdefault(row, enc.with_params(pruned))

    # -- S: activation-sparse FFN -----------------------------------------------------
    if "ffn" in FLAGS.rows:
        def fit_ffn(e, base):
            cap = capture.capture(e, e.params, e.packed_batches(w_set), what=("ffn",),
                                  top_frac=FLAGS.ffn_top_frac)
            perms = dict(base)
            for i in range(n_layers):
                g = icd_jax.build_w("activations", acts=cap.acts(i))
                pi, _ = icd_jax.fit_permutation(g.csr, time_budget_s=FLAGS.fit_budget_s)
                perms[f"ffn_{i}"] = np.asarray(base[f"ffn_{i}"])[pi]  # base o pi
            return perms

        # masking at per-layer thresholds keeping ffn_top_frac of the activations (the
        # mask skips no tile; where a skip pays is experiments/bench_ffn_sparse.py)
        from icd_jax.adapters import ffn as ffn_lib

        f_in = [enc.kernel_inputs(b) for b in enc.packed_batches(w_set[:128])]
        thr = ffn_lib.calibrate_thresholds(
            [np.concatenate([x[f"layer_{i}/output/kernel"] for x in f_in])
             for i in range(n_layers)], FLAGS.ffn_top_frac)
        cfg = minilm.FFNSparsity(tile=FLAGS.tile, threshold=thr)
        trans = minilm.Transforms(ffn=cfg)
        t = time.perf_counter()
        p_lin = fit_ffn(enc, ident())
        sparse_lin = enc.with_params(permute.apply(spec, enc.params, p_lin)).with_transforms(
            trans)
        p_it = fit_ffn(sparse_lin, p_lin)
        print(f"FFN co-activation fits: {time.perf_counter() - t:.0f} s", flush=True)
        ffn_perms = {"identity": ident(), "linear": p_lin, "iterative": p_it}
        for layout, perms in ffn_perms.items():
            e = enc.with_params(permute.apply(spec, enc.params, perms)).with_transforms(trans)
            record("ffn", layout, e, 0.0, "tiles_per_token", f32_mb,
                   f"mask at top {top_k}/token (tiles: analysis only, none skipped), "
                   f"tile {FLAGS.tile}", want=("tiles",), perms=perms)
            speed_models.setdefault("ffn", e)

    # -- Q: quantisation --------------------------------------------------------------
    def quantized(perms, dtype, g, absmax, smooth_alpha=None):
        moved = permute.apply(spec, enc.params, perms)
        act = "dynamic" if g is None and dtype == "int8" else ("static" if g else None)
        calibrated = act == "static" or smooth_alpha is not None
        qp, m = tree.quantize(moved, paths, dtype, g, act=act,
                              act_absmax=tree.permuted_inputs(spec, absmax, perms)
                              if calibrated else None, smooth_alpha=smooth_alpha)
        errs = tree.output_errors(moved, qp, tree.permuted_inputs(spec, err_inputs, perms))
        return qp, m, float(np.mean(list(errs.values())))

    for row in [r for r in FLAGS.rows if r in QUANT_ROWS]:
        dtype, g = QUANT_ROWS[row]
        layouts = ["identity"] + (["linear", "iterative"] if g else [])
        perms, qp = ident(), None
        for layout in layouts:
            absmax = absmax_dense
            if layout == "linear":
                perms = tree.range_perms(spec, absmax_dense, paths)
            elif layout == "iterative":  # ranges re-measured on the quantised model
                a_q, _ = kernel_stats(enc.with_params(qp), calib)
                inv = permute.invert(perms)
                absmax = tree.permuted_inputs(spec, a_q, inv)  # back to original channels
                perms = tree.range_perms(spec, absmax, paths)
            qp, m, err = quantized(perms, dtype, g, absmax,
                                   0.5 if row == "int8-sq" else None)
            note = "" if g else "one layout (order-independent)"
            if row == "int8-sq":
                note += "; SmoothQuant alpha 0.5 from the calibration ranges"
            record(row, layout, enc.with_params(qp), err, "output_error",
                   m["bytes"] / 2**20, note, perms=perms)
            speed_models.setdefault(row, enc.with_params(qp))

    # -- K: key-block drop ------------------------------------------------------------
    for row in [r for r in FLAGS.rows if r in KV_ROWS]:
        drop = KV_ROWS[row]
        for layout, permute_tokens in (("identity", False), ("linear", True)):
            e = enc.with_transforms(minilm.Transforms(kv=minilm.KeyBlockDrop(
                FLAGS.block, drop, permute_tokens)))
            nb = [-(-int(n) // FLAGS.block) for _, b in batches for n in b.lengths if n]
            kept = sum(n - kv.n_drop(n, drop) for n in nb) / sum(nb)
            record(row, layout, e, 0.0, "mass_kept", f32_mb,
                   f"block {FLAGS.block}, {kept:.0%} of KV blocks kept"
                   + ("; iterative = linear (order recomputed per sequence)"
                      if permute_tokens else ""), want=("mass",))
            if permute_tokens:
                speed_models[row] = e

    # -- ONNX Runtime peers ------------------------------------------------------------
    ort_models, ort_info = ort_rows(enc, texts, labels, dense_emb, results, speed_models, f32_mb)

    print(f"quality phase: {time.perf_counter() - t_start:.0f} s", flush=True)
    out = dict(dense_accuracy=dense_acc, n_quality=len(texts), rows=results)
    print_table(results, {}, dense_acc)
    if FLAGS.json_out:  # written after every phase: a later failure loses nothing
        write_json_atomic(FLAGS.json_out, out)

    # -- micro: FFN down projection at decode-like batches ----------------------------
    if "ffn" in FLAGS.rows:
        print("FFN down projection timings per call size: experiments/bench_ffn_sparse.py")
    if any(r in KV_ROWS for r in FLAGS.rows):
        out["attention_micro"] = attention_micro(enc, batches, timed_clean)

    # -- speed: interleaved tokens/s ----------------------------------------------------
    if FLAGS.speed:
        out["speed"] = speed(enc, speed_models, corpus.sentences(FLAGS.speed_n),
                             sentence_transformers_model, timed_clean)
        if FLAGS.json_out:
            write_json_atomic(FLAGS.json_out, out)
    if ort_models:
        import ort_peer
        from common import unseen_sentences

        out["ort"] = ort_peer.section(unseen_sentences(FLAGS.ort_n), enc, ort_models,
                                      timed_clean, max(FLAGS.repeats, 2), 0.1,
                                      3 * max(FLAGS.repeats, 2))
        out["ort"]["build"] = ort_info
        if FLAGS.json_out:
            write_json_atomic(FLAGS.json_out, out)
    if FLAGS.mamba:
        out["mamba"] = mamba_section()
    print_table(results, out.get("speed", {}), dense_acc)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if FLAGS.json_out:
        write_json_atomic(FLAGS.json_out, out)


def ort_rows(enc, texts, labels, dense_emb, results, speed_models, f32_mb):
    """ORT fp32 / dynamic int8 quality rows and speed models: ``(models, build info)``,
    ``({}, None)`` when skipped."""
    import ort_peer

    from icd_jax import quality

    if not FLAGS.ort:
        return {}, None
    reason = ort_peer.unavailable()
    if reason:
        print(f"ONNX Runtime peers: skipped ({reason})", flush=True)
        return {}, None
    models, info = ort_peer.build(enc, FLAGS.threads, FLAGS.ort_per_channel)
    for label, e in models.items():
        row = label.lower().replace(" ", "-")
        t = time.perf_counter()
        q = quality.compare(dense_emb, e.encode(texts), labels)
        note = f"onnxruntime {info['onnxruntime']}" + (
            f"; quantize_dynamic QInt8, per_channel={info['per_channel']}, MatMul only"
            if "int8" in row else "")
        results.append(dict(row=row, layout="identity", drop_pp=q["drop_pp"],
                            cos_mean=q["cos_mean"], accuracy=q["accuracy"],
                            figure=q["nn_agreement"], figure_name="nn_agreement",
                            memory_mb=info["kernel_mb"].get(label, f32_mb), note=note))
        print(f"  {row:13s} {'identity':9s} drop {q['drop_pp']:6.2f} pp  cos "
              f"{q['cos_mean']:.4f}  nn_agreement {q['nn_agreement']:.4f}  "
              f"({time.perf_counter() - t:.0f} s) {note}", flush=True)
        speed_models[row] = e
    return models, info


def attention_micro(enc, batches, timed_clean):
    """Attention of one real batch shape: full vs key blocks dropped (proxy, selection and
    gather included), with and without the token permutation."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import vsla_jax as vs
    from icd_jax.adapters import kv

    _, b = batches[len(batches) // 2]
    bsz, cap = b.gather.shape
    lengths = jnp.asarray(b.lengths)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((bsz, cap, 12, 32)), jnp.float32)
               for _ in range(3))

    @jax.jit
    def full(q, k, v, lengths):
        vt = [vs.VarTensor.trusted(x, lengths[:, None]) for x in (q, k, v)]
        return vs.attention(*vt, backend="xla").data

    fns = {"full": lambda: full(q, k, v, lengths).block_until_ready()}
    for drop in KV_ROWS.values():
        for perm in (False, True):
            fns[f"drop {drop:.0%}{' +perm' if perm else ''}"] = (
                lambda d=drop, p=perm: kv.kv_drop_attention(
                    q, k, v, lengths, block=FLAGS.block, drop=d,
                    permute_tokens=p).block_until_ready())

    def many(fn):
        return lambda: [fn() for _ in range(50)]

    timed, _, _ = timed_clean({k_: many(f) for k_, f in fns.items()}, 3)
    base = timed["full"][1]
    print(f"\nattention, B={bsz} C={cap} H=12 D=32 (lengths of a real batch), block "
          f"{FLAGS.block}: " + ", ".join(f"{k_} {1e3 * t[1] / 50:.2f} ms ({base / t[1]:.2f}x)"
                                        for k_, t in timed.items()))
    return {k_: 1e3 * t[1] / 50 for k_, t in timed.items()}


def speed(enc, models, sentences, st_model, timed_clean):
    """Interleaved tokens/s of every row's model, dense fp32, sentence-transformers and
    torch's dynamic int8 sentence-transformers."""
    fns = {"dense fp32": lambda: enc.encode(sentences)}
    for row, e in models.items():
        fns[row] = lambda e=e: e.encode(sentences)
    st = st_model(FLAGS.threads)
    if st is not None:
        import torch

        fns["sentence-transformers"] = lambda: st.encode(sentences, batch_size=32,
                                                          show_progress_bar=False)
        st8 = st_model(FLAGS.threads)
        st8 = torch.ao.quantization.quantize_dynamic(st8, {torch.nn.Linear},
                                                     dtype=torch.qint8)
        fns["sentence-transformers int8 (torch dynamic)"] = lambda: st8.encode(
            sentences, batch_size=32, show_progress_bar=False)
    tokens = sum(map(len, enc.tokenize(sentences)))
    for fn in fns.values():  # compile / warm every row first
        fn()
    res, load, dropped = timed_clean(fns, FLAGS.repeats, 0.1, 3 * FLAGS.repeats)
    out = {k: tokens / v[1] for k, v in res.items()}
    ref = out.get("sentence-transformers")
    print(f"\ntokens/s on {len(sentences)} sentences ({tokens} tokens), foreign load "
          f"{load or 0:.1%}, {dropped} rounds discarded:")
    for k, v in out.items():
        print(f"  {k:44s} {v:8.0f}" + (f"  {v / ref:.2f}x ST" if ref else ""))
    return out


def mamba_section():
    """Weight transforms of a random-init byte-level Mamba against its dense self."""
    import jax
    import numpy as np

    from icd_jax import corpus, permute, quality
    from icd_jax.adapters import tree
    from icd_jax.models import mamba

    cfg = mamba.MambaConfig(vocab_size=256, d_model=256, n_layers=4, d_state=16)
    params = jax.tree.map(np.asarray, mamba.init(cfg, 0))
    spec = mamba.permute_spec(cfg)
    paths = tree.kernel_paths(params, lambda p: "conv1d" not in p)
    sents = corpus.sentences(96)
    toks = [list(s.encode("utf-8"))[:128] for s in sents]
    lengths = np.array([len(t) for t in toks])
    cap = int(lengths.max())
    grid = np.zeros((len(toks), cap), np.int32)
    for i, t in enumerate(toks):
        grid[i, :len(t)] = t

    def logits(p):
        return np.asarray(mamba.forward(cfg, p, toks).data)

    dense = logits(params)
    grid = np.pad(grid, ((0, 0), (0, dense.shape[1] - cap)))  # to the forward's capacity
    rows = {}
    print(f"\nMamba (random init, byte-level, d_model {cfg.d_model}, {cfg.n_layers} layers) "
          f"on {len(toks)} sentences ({int(lengths.sum())} bytes):")
    print(f"  {'row':12s} {'layout':9s} {'rel logit err':>13s} {'next-token agree':>16s} "
          f"{'ppl ratio':>9s}")
    for row in ("int8", "int8-g32", "int4-g32", "fp8", "2:4", "unstructured"):
        for layout in ("identity", "linear") if row in ("2:4", "int4-g32", "int8-g32") else (
                "identity",):
            perms = tree.identity_perms(spec)
            if layout == "linear" and row == "2:4":
                perms, _ = tree.nm_perms(spec, params, paths, time_budget_s=10.0)
            elif layout == "linear":  # weight-range order (no activation calibration here)
                absmax = {p: np.abs(permute.flat(params)[p]).max(1) for p in paths}
                perms = tree.range_perms(spec, absmax, paths)
            moved = permute.apply(spec, params, perms)
            if row in ("2:4", "unstructured"):
                new, _ = tree.sparsify(moved, paths, "2:4" if row == "2:4" else "unstructured")
            else:
                dtype, g = QUANT_ROWS[row]
                new, _ = tree.quantize(moved, paths, dtype, g)
                new = tree.dequantized(new)
            m = quality.lm_compare(dense, logits(new), grid, lengths)
            rows[f"{row}/{layout}"] = m
            print(f"  {row:12s} {layout:9s} {m['rel_logit_error']:13.4f} "
                  f"{m['next_token_agreement']:16.4f} {m['ppl_ratio']:9.4f}")
    return rows


def print_table(results, speed, dense_acc):
    print(f"\n## Transforms on MiniLM-L6 (dense fp32 topic accuracy {dense_acc:.4f})")
    print("| row | layout | drop pp | cos mean | tokens/s | kernel MB | figure | value | note |")
    print("|---|---|---:|---:|---:|---:|---|---:|---|")
    for r in results:
        tps = speed.get(r["row"])
        print(f"| {r['row']} | {r['layout']} | {r['drop_pp']:.2f} | {r['cos_mean']:.4f} | "
              f"{'' if tps is None else f'{tps:.0f}'} | {r['memory_mb']:.1f} | "
              f"{r['figure_name']} | {r['figure']:.4f} | {r['note']} |")


if __name__ == "__main__":
    app.run(main)
