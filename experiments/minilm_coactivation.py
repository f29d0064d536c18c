"""Co-access graphs W from real MiniLM-L6 FFN activations, and what an order buys.

Captures each layer's post-GELU FFN activations (top ``--top_frac`` channels per token,
streamed per batch: ``icd_jax.capture``) over the first ``--n`` corpus sentences
(``pydoc_data.topics``), builds ``W = build_w("activations")`` per layer from the first
``--n_fit`` sentences' tokens, fits an order with ``fit_permutation`` and prints, per
layer: modularity Q and cache cost C under the identity and under pi, and on held-out
tokens (the remaining sentences) the FFN tiles an activation-sparse kernel would load
per token, identity vs pi, at tiles of 16 and 64 channels (lower is better), with
the ratio. Nothing is hard-coded; every number is measured here.
"""

from __future__ import annotations

import json
import time

from absl import app, flags

flags.DEFINE_integer("n", 1600, "Corpus sentences captured.")
flags.DEFINE_integer("n_fit", 1200, "Of those, sentences W is built from (rest: held out).")
flags.DEFINE_float("top_frac", 0.1, "FFN channels per token counted as active.")
flags.DEFINE_float("time_budget_s", 10.0, "fit_permutation budget per layer.")
flags.DEFINE_list("layers", ["0", "1", "2", "3", "4", "5"], "Layers to fit.")
flags.DEFINE_list("tiles", ["16", "64"], "Tile sizes for tiles-touched.")
flags.DEFINE_string("json_out", "", "Also write the results to this JSON file.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import numpy as np
    from common import write_json_atomic

    import icd_jax
    from icd_jax import capture, corpus
    from icd_jax.cost import tiles_touched
    from icd_jax.models import minilm

    enc = minilm.load()
    sentences = corpus.sentences(FLAGS.n)
    fit, held = sentences[: FLAGS.n_fit], sentences[FLAGS.n_fit:]
    t0 = time.perf_counter()
    cap_fit = capture.capture(enc, enc.params, enc.packed_batches(fit), what=("ffn",),
                              top_frac=FLAGS.top_frac, show_progress=True)
    cap_held = capture.capture(enc, enc.params, enc.packed_batches(held), what=("ffn",),
                               top_frac=FLAGS.top_frac)
    n_fit_tok = cap_fit.acts(0).shape[0]
    n_held_tok = cap_held.acts(0).shape[0]
    print(f"captured {n_fit_tok} tokens ({len(fit)} sentences) to fit and {n_held_tok} "
          f"held out ({len(held)} sentences) in {time.perf_counter() - t0:.0f} s; "
          f"top {FLAGS.top_frac:.0%} of 1536 FFN channels per token")
    tiles = [int(t) for t in FLAGS.tiles]
    head = (f"{'layer':>5s} {'nnz':>7s} {'Q id':>6s} {'Q pi':>6s} {'C id':>6s} {'C pi':>6s}"
            + "".join(f" {'tiles/' + str(t) + ' id':>12s} {'pi':>7s} {'ratio':>6s}"
                      for t in tiles) + f" {'fit s':>6s}")
    print(head)
    rows = []
    for layer in (int(x) for x in FLAGS.layers):
        g = icd_jax.build_w("activations", acts=cap_fit.acts(layer))
        ident = np.arange(g.n, dtype=np.int32)
        before = icd_jax.objective(g.csr, ident)
        pi, stats = icd_jax.fit_permutation(g.csr, time_budget_s=FLAGS.time_budget_s)
        held_acts = cap_held.acts(layer)
        row = dict(layer=layer, nnz=g.meta["nnz"], Q_identity=before["Q"], Q_pi=stats["Q"],
                   C_identity=before["C"], C_pi=stats["C"], method=stats["method"],
                   fit_s=stats["elapsed_s"], tiles={})
        line = (f"{layer:5d} {g.meta['nnz']:7d} {before['Q']:6.3f} {stats['Q']:6.3f} "
                f"{before['C']:6.3f} {stats['C']:6.3f}")
        for t in tiles:
            a, b = tiles_touched(held_acts, ident, t), tiles_touched(held_acts, pi, t)
            row["tiles"][t] = dict(identity=a, pi=b, ratio=b / a)
            line += f" {a:12.2f} {b:7.2f} {b / a:6.3f}"
        print(line + f" {stats['elapsed_s']:6.1f}")
        rows.append(row)
    if FLAGS.json_out:
        write_json_atomic(FLAGS.json_out, dict(n=FLAGS.n, n_fit=FLAGS.n_fit,
                                               top_frac=FLAGS.top_frac, layers=rows))
    else:
        print(json.dumps(dict(tokens_fit=n_fit_tok, tokens_held=n_held_tok)))


if __name__ == "__main__":
    app.run(main)
