"""Tests of icd_jax.corpus: the help-topic text corpus shipped with Python."""

import numpy as np
import pytest

from icd_jax import corpus
from icd_jax.errors import ConfigError


def test_sentences_deterministic_and_large():
    first = corpus.sentences()
    assert first == corpus.sentences()
    assert len(first) > 2_000
    assert corpus.sentences(2_000) == first[:2_000]
    assert corpus.sentences(0) == []


def test_sentences_clean_by_default():
    texts = corpus.sentences()
    assert all(isinstance(t, str) and t for t in texts)
    assert all(t == t.strip() and "  " not in t and "\n" not in t for t in texts)
    assert all(any(ch.isalnum() for ch in t) for t in texts)
    assert not any(set(t) <= set("*=-~^#+ ") for t in texts)


def test_min_chars_filters():
    long_only = corpus.sentences(min_chars=20)
    assert all(len(t) >= 20 for t in long_only)
    assert 0 < len(long_only) < len(corpus.sentences())
    assert long_only == [t for t in corpus.sentences() if len(t) >= 20]


def test_too_many_raises_naming_count():
    total = len(corpus.sentences())
    with pytest.raises(ConfigError, match=str(total)):
        corpus.sentences(total + 1)
    assert len(corpus.sentences(total)) == total
    with pytest.raises(ConfigError):
        corpus.sentences(-1)


def test_topic_names_sorted():
    names = corpus.topic_names()
    assert names == sorted(names) and len(names) == len(set(names)) > 10


def test_labelled_sentences_aligned():
    texts, labels = corpus.labelled_sentences()
    assert labels.dtype == np.int32 and labels.shape == (len(texts),)
    assert np.all(np.diff(labels) >= 0)
    assert labels.min() >= 0 and labels.max() < len(corpus.topic_names())
    _, counts = np.unique(labels, return_counts=True)
    assert counts.min() >= 2 and len(counts) > 10
    assert len(set(texts)) == len(texts)
    assert set(texts) <= set(corpus.sentences())
    again_texts, again_labels = corpus.labelled_sentences()
    assert again_texts == texts and np.array_equal(again_labels, labels)


def test_labelled_sentences_label_is_source_topic():
    texts, labels = corpus.labelled_sentences()
    names = corpus.topic_names()
    from pydoc_data.topics import topics

    flat = {name: " ".join(topics[name].split()) for name in names}
    for text, label in zip(texts, labels):
        assert text in flat[names[int(label)]]


def test_labelled_sentences_caps():
    texts, labels = corpus.labelled_sentences(5, max_per_topic=10, min_chars=20)
    _, counts = np.unique(labels, return_counts=True)
    assert counts.min() >= 5 and counts.max() <= 10
    assert all(len(t) >= 20 for t in texts)
    with pytest.raises(ConfigError):
        corpus.labelled_sentences(0)
    with pytest.raises(ConfigError):
        corpus.labelled_sentences(5, max_per_topic=3)


def _golden():
    import json
    import os

    base = os.path.join(os.path.dirname(__file__), "data", "minilm_golden")
    with open(base + ".json", encoding="utf-8") as f:
        meta = json.load(f)
    with np.load(base + ".npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return meta, arrays


def test_minilm_golden_file_consistent():
    meta, z = _golden()
    sentences, info = meta["sentences"], meta["meta"]
    n, max_len = len(sentences), info["max_seq_length"]
    assert n >= 256 and max_len == 256
    assert z["embeddings"].dtype == np.float32 and z["embeddings"].shape == (n, 384)
    np.testing.assert_allclose(np.linalg.norm(z["embeddings"], axis=1), 1.0, atol=1e-5)
    for key in ("token_counts", "full_token_counts"):
        assert z[key].dtype == np.int32 and z[key].shape == (n,)
    assert z["input_ids"].dtype == np.int32 and z["input_ids"].shape == (n, max_len)
    assert np.array_equal(z["token_counts"], np.minimum(z["full_token_counts"], max_len))
    assert int(np.sum(z["full_token_counts"] > max_len)) == info["n_truncated"] >= 3
    assert "" in sentences and " " in sentences


def test_minilm_golden_corpus_part_matches_corpus():
    import platform

    meta, _ = _golden()
    info = meta["meta"]
    if info["versions"]["python"].rsplit(".", 1)[0] != platform.python_version().rsplit(".", 1)[0]:
        pytest.skip("pydoc_data text differs between Python minor versions")
    tail = meta["sentences"][info["n_curated"]:]
    assert tail == corpus.sentences()[:: info["corpus_step"]][: len(tail)]
