"""Activation capture on MiniLM, and co-access graphs from sparse top-k captures."""

import math

import numpy as np
import pytest
import scipy.sparse as sp

from icd_jax import build_w, capture, corpus, permute
from icd_jax.cost import tiles_touched
from icd_jax.errors import ConfigError
from icd_jax.models import minilm


def dense_top_k(a, k):
    idx = np.argsort(-np.abs(a), axis=1, kind="stable")[:, :k]
    rows = np.repeat(np.arange(a.shape[0]), k)
    return sp.csr_matrix((a[rows, idx.ravel()], (rows, idx.ravel())), shape=a.shape)


def test_build_w_from_sparse_top_k_equals_dense_top_frac(rng):
    a = rng.standard_normal((300, 40)).astype(np.float32) * rng.uniform(0.5, 2, 40)
    top_frac = 0.2
    k = math.ceil(top_frac * 40)
    dense = build_w("activations", acts=a, top_frac=top_frac, topk=None)
    sparse = build_w("activations", acts=dense_top_k(a, k), top_frac=top_frac, topk=None)
    np.testing.assert_allclose(sparse.csr.toarray(), dense.csr.toarray(), rtol=1e-5, atol=1e-6)
    assert sparse.meta["activations"]["active_rate"] == pytest.approx(
        dense.meta["activations"]["active_rate"])
    # A capture with more entries than top_frac keeps each row's top ones only.
    wider = build_w("activations", acts=dense_top_k(a, 3 * k), top_frac=top_frac, topk=None)
    np.testing.assert_allclose(wider.csr.toarray(), dense.csr.toarray(), rtol=1e-5, atol=1e-6)


def test_sparse_input_rejects_dense_only_modes(rng):
    a = dense_top_k(rng.standard_normal((20, 8)), 2)
    with pytest.raises(ConfigError, match="sparse"):
        build_w("activations", acts=a, mode="correlation")


def test_tiles_touched_accepts_sparse(rng):
    act = rng.random((50, 32)) < 0.2
    pi = rng.permutation(32)
    assert tiles_touched(sp.csr_matrix(act), pi, 8) == tiles_touched(act, pi, 8)


@pytest.fixture(scope="module")
def enc():
    return minilm.load()


@pytest.fixture(scope="module")
def captured(enc):
    sentences = corpus.sentences(24)
    batches = list(enc.packed_batches(sentences, batch_size=16))
    return batches, capture.capture(enc, enc.params, batches, top_frac=0.1)


def real_rows(full, batches, key):
    return np.concatenate([np.asarray(f[key][0])[b.segment < b.gather.shape[0]]
                           for f, b in zip(full, batches)])


def test_capture_keeps_each_tokens_top_k(enc, captured):
    batches, cap = captured
    n_tokens = sum(b.n_tokens for b in batches)
    k = math.ceil(0.1 * 1536)
    assert sorted(cap.topk) == [f"layer_{i}/ffn" for i in range(6)]
    full = [permute.flat(minilm.capture_fn(enc)(enc.params, *b.arrays())[1])
            for b in batches]
    for layer in (0, 5):
        m = cap.acts(layer)
        assert m.shape == (n_tokens, 1536) and m.nnz == n_tokens * k
        ref = real_rows(full, batches, f"layer_{layer}/ffn")
        np.testing.assert_allclose(m.toarray(), dense_top_k(ref, k).toarray(), atol=1e-6)
        res = real_rows(full, batches, f"layer_{layer}/residual").astype(np.float64)
        r = cap.ranges[f"layer_{layer}/residual"]
        assert r.count == n_tokens
        np.testing.assert_allclose(r.min, res.min(0), atol=1e-6)
        np.testing.assert_allclose(r.max, res.max(0), atol=1e-6)
        np.testing.assert_allclose(r.mean, res.mean(0), atol=1e-5)
        np.testing.assert_allclose(r.std, res.std(0), atol=1e-4)


def test_key_mass_against_numpy_attention(enc, captured):
    batches, cap = captured
    full = permute.flat(
        minilm.capture_fn(enc)(enc.params, *batches[0].arrays())[1])
    b = batches[0]
    h = np.asarray(full["layer_2/residual"][0], np.float64)
    att = {k: {n: np.asarray(v, np.float64) for n, v in d.items()}
           for k, d in enc.params["layer_2"]["attention"].items()}
    q = h @ att["query"]["kernel"] + att["query"]["bias"]
    k = h @ att["key"]["kernel"] + att["key"]["bias"]
    want = []
    for i in range(b.n_items):
        rows = b.gather[i, : b.lengths[i]]
        qi = q[rows].reshape(len(rows), 12, 32)
        ki = k[rows].reshape(len(rows), 12, 32)
        s = np.einsum("qhd,khd->hqk", qi, ki) / np.sqrt(32)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        want.append(p.sum(1).mean(0))
    got = cap.tokens["layer_2/key_mass"][: b.n_tokens]
    np.testing.assert_allclose(got, np.concatenate(want), rtol=1e-4, atol=1e-5)


def test_capture_errors(enc):
    with pytest.raises(ConfigError, match="unknown what"):
        capture.capture(enc, enc.params, [], what=("weights",))
    with pytest.raises(ConfigError, match="top_frac"):
        capture.capture(enc, enc.params, [], top_frac=0)
    with pytest.raises(ConfigError, match="capture_batch"):
        capture.capture(object(), None, [])
    cap = capture.capture(enc, enc.params, [], what=("ffn",))
    with pytest.raises(ConfigError, match="nothing captured"):
        cap.acts(0)


def test_capture_on_mamba_against_its_intermediates():
    from icd_jax.models import mamba

    cfg = mamba.MambaConfig.tiny()
    m = mamba.Mamba(cfg, mamba.init(cfg, seed=1))
    rng = np.random.default_rng(2)
    batches = [[list(rng.integers(0, cfg.vocab_size, n)) for n in lens]
               for lens in ((5, 1, 8), (3, 0, 7, 2))]
    cap = capture.capture(m, m.params, batches, what=("inner", "residual"), top_k=4)
    inner, res = [], []
    for b in batches:
        _, inter = m.capture(b)
        for i, n in enumerate(len(x) for x in b):
            inner.append(np.asarray(inter["layer_1"]["mixer"]["inner"][0])[i, :n])
            res.append(np.asarray(inter["layer_0"]["residual"][0])[i, :n])
    inner, res = np.concatenate(inner), np.concatenate(res).astype(np.float64)
    got = cap.acts(1, "inner")
    assert got.shape == (inner.shape[0], cfg.d_inner) and got.nnz == 4 * inner.shape[0]
    np.testing.assert_allclose(got.toarray(), dense_top_k(inner, 4).toarray(), atol=1e-6)
    r = cap.ranges["layer_0/residual"]
    np.testing.assert_allclose(r.max, res.max(0), atol=1e-6)
    np.testing.assert_allclose(r.mean, res.mean(0), atol=1e-6)
