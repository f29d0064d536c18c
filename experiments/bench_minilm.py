"""MiniLM-L6 sentence embedding throughput against sentence-transformers.

Workload: embed the first ``--n`` sentences of the ``pydoc_data.topics`` corpus
(``icd_jax.corpus.sentences``), tokenisation included, ``--batch_size`` sentences per
batch. Rows, timed in interleaved rounds in one process on the same sentences:

  ``sentence-transformers``  ST on torch CPU (``--threads`` threads, its own batching);
                             skipped when sentence-transformers is not installed;
  ``vsla packed``            ``icd_jax.models.minilm``: dense layers on packed tokens,
                             attention through ``vs.attention`` on VarTensors;
  ``vsla padded``            the same model with dense layers on the padded batches;
  ``... input order``        (``--unsorted``) both again with batches taken in input
                             order instead of longest first: what padding costs when
                             batches mix lengths.

Prints tokens/s (real tokens, ``[CLS]``/``[SEP]`` included) and the ratios, and how far
our embeddings are from ST's (min cosine). Our rows are labelled with the attention
backend that ran, read from the encoder (``auto`` resolved: ``bucketed`` on CPU).
Install the peer with ``pip install sentence-transformers==6.2.0 transformers`` (it keeps
torch 2.13.0).

``--ort`` (default on) adds ONNX Runtime as a peer (``experiments/ort_peer.py``): our
fp32 and ``minilm.load(quant=...)`` encoders against the same weights exported to ONNX,
run by ORT in fp32 and dynamic int8, timed interleaved on ``--ort_n`` unseen corpus
sentences (outside the labelled quality set): tokens/s, cosine and nearest-neighbour
agreement with our fp32, and our/ORT ratios. Ours there are ``minilm.load()`` and
``minilm.load(quant=...)`` with the library's defaults (``--backend`` is not applied).
``--rows=`` runs that section alone.
"""

from __future__ import annotations

import os
import platform
import time

from absl import app, flags

flags.DEFINE_integer("n", 2000, "Corpus sentences to embed.")
flags.DEFINE_integer("batch_size", 32, "Sentences per batch (every row).")
flags.DEFINE_integer("threads", 2, "torch threads for sentence-transformers; ORT intra-op "
                     "threads.")
flags.DEFINE_integer("repeats", 3, "Timed rounds kept.")
flags.DEFINE_float("max_foreign", 0.1, "Rounds during which other processes took more than "
                   "this share of the CPUs are discarded and rerun.")
flags.DEFINE_integer("max_rounds", 0, "Most rounds to run (0: 4 * repeats).")
flags.DEFINE_string("backend", "auto", "vs.attention backend of our model.")
flags.DEFINE_list("rows", ["st", "packed", "padded"], "Rows to time.")
flags.DEFINE_bool("unsorted", True, "Also time packed and padded on input-order batches.")
flags.DEFINE_bool("ort", True, "Compare with ONNX Runtime fp32 and dynamic int8 (skipped, "
                  "with the reason, when torch/onnxruntime are not importable).")
flags.DEFINE_integer("ort_n", 0, "Unseen distinct corpus sentences for the ORT section (0: "
                     "all).")
flags.DEFINE_integer("ort_repeats", 3, "Timed rounds kept in the ORT section.")
flags.DEFINE_bool("ort_per_channel", True, "ORT int8 weights per output channel (as ours).")
flags.DEFINE_string("json_out", "", "Also write the results to this JSON file.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from common import sentence_transformers_model, write_json_atomic

    from icd_jax import corpus
    from icd_jax.models import minilm

    sentences = corpus.sentences(FLAGS.n)
    bs = FLAGS.batch_size
    fns, models = {}, {}
    if "packed" in FLAGS.rows:
        models["vsla packed"] = minilm.load(backend=FLAGS.backend)
    if "padded" in FLAGS.rows:
        models["vsla padded"] = minilm.load(backend=FLAGS.backend, layout="padded")
    st = sentence_transformers_model(FLAGS.threads) if "st" in FLAGS.rows else None
    if st is not None:
        fns["sentence-transformers"] = lambda: st.encode(sentences, batch_size=bs,
                                                          show_progress_bar=False)
    elif "st" in FLAGS.rows:
        print("sentence-transformers: unavailable (not installed)")
    for label, enc in models.items():
        fns[label] = lambda enc=enc: enc.encode(sentences, batch_size=bs)
    if FLAGS.unsorted:
        for label, enc in list(models.items()):
            fns[f"{label}, input order"] = lambda enc=enc: enc.encode(
                sentences, batch_size=bs, sort=False)
    out = {"n": len(sentences), "batch_size": bs, "rows": {}}
    if fns:
        main_section(sentences, fns, models, st, out)
    if FLAGS.ort:
        out["ort"] = ort_section(minilm.load())  # the library's defaults, not --backend
    if FLAGS.json_out:
        write_json_atomic(FLAGS.json_out, out)


def ort_section(enc):
    """Our fp32 and int8 encoders against ONNX Runtime on unseen sentences."""
    import ort_peer
    from common import timed_clean, unseen_sentences

    reason = ort_peer.unavailable()
    if reason:
        print(f"ONNX Runtime peer: skipped ({reason})")
        return {"skipped": reason}
    models, info = ort_peer.build(enc, FLAGS.threads, FLAGS.ort_per_channel)
    res = ort_peer.section(unseen_sentences(FLAGS.ort_n), enc, models, timed_clean,
                           FLAGS.ort_repeats, FLAGS.max_foreign, FLAGS.max_rounds,
                           FLAGS.batch_size)
    return dict(res, build=info)


def attention_label(enc) -> str:
    """The ``vs.attention`` backend ``enc`` runs: its ``backend``, with ``auto`` resolved
    to what ``vsla_jax.attention.choose_backend`` picks on this machine."""
    from vsla_jax.attention import choose_backend

    return f"auto: {choose_backend(None, None)}" if enc.backend == "auto" else enc.backend


def main_section(sentences, fns, models, st, out):
    """The sentence-transformers / packed / padded rows."""
    import numpy as np
    from common import timed_clean

    from icd_jax.models import minilm

    bs = FLAGS.batch_size
    enc = next(iter(models.values()), None) or minilm.load()
    tokens = int(sum(map(len, enc.tokenize(sentences))))
    out["tokens"] = tokens
    att = attention_label(enc)
    out["attention_backend"] = att
    print(f"{len(sentences)} sentences, {tokens} tokens, batch_size {bs}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    t0 = time.perf_counter()
    res, load, dropped = timed_clean(fns, FLAGS.repeats, FLAGS.max_foreign, FLAGS.max_rounds)
    print(f"timed in {time.perf_counter() - t0:.0f} s; foreign load {load or 0:.1%} of the "
          f"CPUs in kept rounds, {dropped} rounds discarded")
    ref = "sentence-transformers" if st is not None else None
    print(f"{'row':40s} {'first s':>8s} {'median s':>9s} {'tokens/s':>9s} {'ratio':>7s}")
    for label, (first, med) in res.items():
        tps = tokens / med
        ratio = res[ref][1] / med if ref else float("nan")
        shown = f"{label} [attention {att}]" if label.startswith("vsla") else label
        print(f"{shown:40s} {first:8.2f} {med:9.2f} {tps:9.0f} {ratio:6.2f}x")
        out["rows"][label] = dict(first_s=first, median_s=med, tokens_per_s=tps,
                                  ratio_vs_st=ratio if ref else None)
    if st is not None and models:
        ref_emb = st.encode(sentences, batch_size=bs, show_progress_bar=False)
        for label, enc in models.items():
            e = enc.encode(sentences, batch_size=bs)
            cos = float(np.min((e * ref_emb).sum(1)))
            print(f"{label}: min cosine to sentence-transformers {cos:.7f}")
            out["rows"][label]["min_cosine_vs_st"] = cos


if __name__ == "__main__":
    app.run(main)
