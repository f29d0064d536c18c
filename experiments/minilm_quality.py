"""MiniLM-L6 topic retrieval quality on the labelled corpus: fp32 and bf16.

Embeds ``corpus.labelled_sentences()`` (``pydoc_data.topics`` sentences with their
topic) with the fp32 encoder and the bf16 one, and prints topic retrieval accuracy
(precision@1, nearest neighbour by cosine excluding itself), the quality drop of bf16
in percentage points, and its cosine and nearest-neighbour agreement with fp32
(``icd_jax.quality.compare``). The fp32 accuracy is the baseline every transform's
quality drop is measured against.
"""

from __future__ import annotations

import json

from absl import app, flags

flags.DEFINE_integer("min_per_topic", 2, "Topics with fewer sentences are left out.")
flags.DEFINE_string("json_out", "", "Also write the results to this JSON file.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from common import write_json_atomic

    from icd_jax import corpus, quality
    from icd_jax.models import minilm

    sentences, labels = corpus.labelled_sentences(FLAGS.min_per_topic)
    dense = minilm.load().encode(sentences)
    bf16 = minilm.load(dtype="bfloat16").encode(sentences)
    m = quality.compare(dense, bf16, labels)
    out = dict(sentences=len(sentences), topics=int(len(set(labels.tolist()))), **m)
    print(f"{out['sentences']} sentences over {out['topics']} topics")
    print(f"fp32 topic accuracy {m['dense_accuracy']:.4f}; bf16 {m['accuracy']:.4f} "
          f"(drop {m['drop_pp']:+.2f} pp); bf16 cosine to fp32 mean {m['cos_mean']:.6f} "
          f"min {m['cos_min']:.6f}; nearest-neighbour agreement {m['nn_agreement']:.4f}")
    if FLAGS.json_out:
        write_json_atomic(FLAGS.json_out, out)
    else:
        print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
