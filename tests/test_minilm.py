"""MiniLM-L6 on packed tokens against sentence-transformers' own embeddings."""

import json
import pathlib

import numpy as np
import pytest

from icd_jax import corpus, permute
from icd_jax.errors import ConfigError, ModelError, PermutationError
from icd_jax.models import minilm
from tests.events import count_compiles

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def enc():
    return minilm.load()


@pytest.fixture(scope="module")
def golden():
    with open(DATA / "minilm_golden.json") as f:
        sentences = json.load(f)["sentences"]
    with np.load(DATA / "minilm_golden.npz", allow_pickle=False) as z:
        return sentences, {k: z[k] for k in z.files}


def cosine(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_tokens_match_sentence_transformers(enc, golden):
    sentences, g = golden
    ids = enc.tokenize(sentences)
    assert [len(t) for t in ids] == g["token_counts"].tolist()
    for t, ref, n in zip(ids, g["input_ids"], g["token_counts"]):
        assert t == ref[:n].tolist()


def test_embeddings_match_sentence_transformers(enc, golden):
    sentences, g = golden
    emb = enc.encode(sentences, batch_size=32)
    assert emb.shape == (len(sentences), 384) and emb.dtype == np.float32
    cos = cosine(emb, g["embeddings"])
    worst = int(np.argmin(cos))
    assert cos.min() >= 0.99999, (worst, sentences[worst][:60], cos.min())
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_batch_size_and_order_do_not_change_embeddings(enc, golden):
    sentences = golden[0][:40]
    a = enc.encode(sentences, batch_size=32)
    b = enc.encode(sentences[::-1], batch_size=7)[::-1]
    np.testing.assert_allclose(a, b, atol=2e-6)
    np.testing.assert_allclose(enc.encode(sentences[3]), a[3], atol=2e-6)


@pytest.mark.parametrize("padded", [False, True])
def test_pack_layout_against_a_loop(rng, padded):
    items = [list(rng.integers(1, 100, n)) for n in (5, 1, 0, 17, 9)]
    b = minilm.pack(items, padded=padded)
    t, nb, c = b.shape
    assert t >= sum(map(len, items)) and nb >= len(items) and c >= 17
    assert t == nb * c if padded else t < nb * c
    rows = set()
    for i, it in enumerate(items):
        for j, tok in enumerate(it):
            row = b.gather[i, j]
            rows.add(int(row))
            assert b.ids[row] == tok and b.positions[row] == j and b.segment[row] == i
            assert b.scatter[row] == i * c + j
        assert (b.gather[i, len(it):] == t).all()
    others = np.setdiff1d(np.arange(t), list(rows))
    assert (b.segment[others] == nb).all() and (b.ids[others] == 0).all()
    assert b.lengths.tolist()[: len(items)] == [len(x) for x in items]


def test_padded_layout_gives_the_same_embeddings(enc, golden):
    sentences = golden[0][:40]
    padded = minilm.MiniLM(enc.config, enc.params, enc.tokenizer, layout="padded")
    np.testing.assert_allclose(padded.encode(sentences), enc.encode(sentences), atol=2e-6)


def test_compiles_once_per_bucket_triple(enc):
    texts = corpus.sentences(400)
    shapes = set()
    with count_compiles() as events:
        for _, batch in enc.batches(enc.tokenize(texts[:200]), 32):
            shapes.add(batch.shape)
            enc.embed_packed(batch).block_until_ready()
    first = len(events)
    assert 0 < first <= len(shapes) + 2
    # Other sentences whose batches land in buckets already compiled compile nothing.
    other = [b for _, b in enc.batches(enc.tokenize(texts[200:]), 32) if b.shape in shapes]
    assert other, "expected the second half to reuse some buckets"
    with count_compiles() as events:
        for batch in other:
            enc.embed_packed(batch).block_until_ready()
    assert len(events) == 0


def test_bad_input(enc):
    with pytest.raises(ConfigError, match="list of str"):
        enc.encode(42)
    with pytest.raises(ConfigError, match="item 1"):
        enc.encode(["ok", None])
    with pytest.raises(ConfigError, match="batch_size"):
        enc.encode(["ok"], batch_size=0)
    with pytest.raises(ConfigError, match="dtype"):
        minilm.load(dtype="float16")
    with pytest.raises(ModelError, match="not found"):
        minilm.load(path="/nonexistent")
    assert enc.encode([]).shape == (0, 384)
    with pytest.raises(ModelError, match=r"sentence 1 is not valid Unicode.*\\udc80"):
        enc.encode(["ok", "bad\udc80"])
    with pytest.raises(ModelError, match="sentence 0"):
        enc.tokenize(["\ud800 lone high surrogate"])


def test_public_forward_is_the_jitted_encoder(enc):
    batch = next(iter(enc.packed_batches(["a short sentence", "another one"])))
    out = np.asarray(enc.forward(enc.params, *batch.arrays()))
    assert out.shape == (batch.shape[1], 384)
    np.testing.assert_array_equal(out, np.asarray(enc.embed_packed(batch)))
    assert "_forward" not in vars(enc)


def test_permuted_encoder_is_the_same_function(enc, golden):
    sentences = golden[0][:48]
    spec = minilm.permute_spec(enc.config)
    permute.check_spec(spec, enc.params)
    perms = permute.random_perms(spec, seed=3)
    assert set(perms) == {"residual"} | {f"{k}_{i}" for k in ("ffn", "heads")
                                           for i in range(6)}
    p2 = permute.apply(spec, enc.params, perms)
    base = enc.encode(sentences)
    out = enc.with_params(p2).encode(sentences)
    want = permute.permute_output(spec, "embedding", base, perms)
    rel = np.linalg.norm(out - want, axis=1) / np.linalg.norm(want, axis=1)
    assert rel.max() <= 1e-5
    assert not np.allclose(out, base, atol=1e-3)  # the residual order really moved
    back = permute.apply(spec, p2, permute.invert(perms))
    assert permute.tree_equal(back, enc.params)


@pytest.mark.parametrize("bad, match", [
    ({"residual": np.zeros(384, np.int32)}, "not a permutation"),
    ({"residual": np.arange(383, dtype=np.int32)}, "shape"),
    ({"residual": np.arange(384, dtype=np.float32)}, "integer"),
    ({"ffn_9": np.arange(1536)}, "unknown permutable axis 'ffn_9'"),
])
def test_invalid_permutations_name_the_axis(enc, bad, match):
    spec = minilm.permute_spec(enc.config)
    with pytest.raises(PermutationError, match=match):
        permute.apply(spec, enc.params, bad)


def test_any_iterable_of_str(enc, golden):
    sentences = golden[0][60:66]
    want = enc.encode(sentences)
    for other in (tuple(sentences), np.array(sentences), (s for s in sentences)):
        np.testing.assert_allclose(enc.encode(other), want, atol=2e-6)
    with pytest.raises(ConfigError, match="list of str"):
        enc.encode(b"bytes")


def test_bfloat16_encoder_stays_close(golden):
    sentences = golden[0][60:76]
    fp32 = minilm.load().encode(sentences)
    bf16 = minilm.load(dtype="bfloat16")
    assert bf16.params["layer_0"]["intermediate"]["kernel"].dtype.name == "bfloat16"
    out = bf16.encode(sentences)
    assert out.dtype == np.float32
    assert cosine(out, fp32).min() > 0.99
