"""Embedding quality: topic retrieval accuracy and agreement with a dense reference.

The quality corpus is ``corpus.labelled_sentences()`` (``pydoc_data.topics`` sentences,
each labelled with its topic). Topic retrieval accuracy is precision@1: the share of
sentences whose nearest neighbour by cosine (itself excluded) has the same topic.
"Quality drop" is the dense fp32 accuracy minus a transformed model's, in percentage
points.
"""

from __future__ import annotations

import numpy as np

from icd_jax.errors import ConfigError

#: Rows of the similarity matrix computed at once (memory ``O(block * n)``).
BLOCK = 1024


def _unit(emb, name: str = "embeddings") -> np.ndarray:
    e = np.asarray(emb, np.float32)
    if e.ndim != 2:
        raise ConfigError(f"{name} must be [n, d], got shape {e.shape}")
    if not np.all(np.isfinite(e)):
        raise ConfigError(f"{name} contain NaN or inf")
    norm = np.linalg.norm(e, axis=1, keepdims=True)
    return np.divide(e, norm, out=np.zeros_like(e), where=norm > 0)


def nearest_neighbours(emb, block: int = BLOCK) -> np.ndarray:
    """Each row's nearest other row by cosine similarity: ``int64[n]`` (ties: the lowest
    index). ``emb``: ``[n, d]`` with ``n >= 2``."""
    e = _unit(emb)
    n = e.shape[0]
    if n < 2:
        raise ConfigError(f"nearest neighbours need at least 2 embeddings, got {n}")
    out = np.empty(n, np.int64)
    for r0 in range(0, n, block):
        sim = e[r0:r0 + block] @ e.T
        rows = np.arange(sim.shape[0])
        sim[rows, r0 + rows] = -np.inf
        out[r0:r0 + block] = sim.argmax(axis=1)
    return out


def topic_accuracy(emb, labels) -> float:
    """Precision@1 of topic retrieval: the share of rows whose nearest other row has the
    same label. ``emb``: ``[n, d]``; ``labels``: ``int[n]``."""
    labels = np.asarray(labels)
    if labels.shape != (np.shape(emb)[0],):
        raise ConfigError(f"labels must have shape ({np.shape(emb)[0]},), got {labels.shape}")
    return float((labels[nearest_neighbours(emb)] == labels).mean())


def compare(dense, other, labels) -> dict:
    """Quality of ``other`` embeddings against the ``dense`` fp32 ones on the same rows.

    Returns ``accuracy``, ``dense_accuracy``, ``drop_pp`` (dense minus other, in
    percentage points), ``cos_mean``/``cos_min`` (row-wise cosine to dense) and
    ``nn_agreement`` (share of rows whose nearest neighbour is the same).
    """
    d, o = _unit(dense, "dense"), _unit(other, "other")
    if d.shape != o.shape:
        raise ConfigError(f"dense and other must have the same shape, got {d.shape} and "
                          f"{o.shape}")
    labels = np.asarray(labels)
    nn_d, nn_o = nearest_neighbours(d), nearest_neighbours(o)
    acc_d = float((labels[nn_d] == labels).mean())
    acc_o = float((labels[nn_o] == labels).mean())
    cos = (d * o).sum(axis=1)
    return dict(accuracy=acc_o, dense_accuracy=acc_d, drop_pp=100.0 * (acc_d - acc_o),
                cos_mean=float(cos.mean()), cos_min=float(cos.min()),
                nn_agreement=float((nn_d == nn_o).mean()))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def lm_compare(dense, other, tokens, lengths) -> dict:
    """A language model's transformed logits against its dense fp32 self.

    Args:
      dense, other: logits ``[B, C, vocab]`` on the same batch.
      tokens: ``int[B, C]`` the batch's tokens; lengths: ``int[B]``.

    Returns ``rel_logit_error`` (``||other - dense||_F / ||dense||_F`` over real
    positions), ``next_token_agreement`` (share of positions with the same argmax),
    and the perplexities of predicting token ``t + 1`` from position ``t``
    (``ppl_dense``, ``ppl``, ``ppl_ratio`` = ppl / ppl_dense). For random-init weights
    perplexity means nothing absolutely; only the ratio is informative.
    """
    d, o = np.asarray(dense, np.float64), np.asarray(other, np.float64)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    if d.shape != o.shape or d.ndim != 3 or tokens.shape != d.shape[:2]:
        raise ConfigError(f"dense/other must be [B, C, vocab] and tokens [B, C]; got "
                          f"{d.shape}, {o.shape}, {tokens.shape}")
    if lengths.shape != (d.shape[0],) or (lengths < 0).any() or (lengths > d.shape[1]).any():
        raise ConfigError(f"lengths must be [B] in [0, {d.shape[1]}], got {lengths}")
    pos = np.arange(d.shape[1])[None, :]
    real = pos < lengths[:, None]
    pred = pos < (lengths[:, None] - 1)  # positions with a next token
    err = np.linalg.norm((o - d)[real]) / max(np.linalg.norm(d[real]), 1e-300)
    agree = float((d.argmax(-1) == o.argmax(-1))[real].mean()) if real.any() else 1.0
    nxt = np.roll(tokens, -1, axis=1)

    def ppl(logits):
        lp = np.take_along_axis(log_softmax(logits), nxt[..., None], -1)[..., 0]
        return float(np.exp(-lp[pred].mean())) if pred.any() else 1.0

    p_d, p_o = ppl(d), ppl(o)
    return dict(rel_logit_error=float(err), next_token_agreement=agree, ppl_dense=p_d,
                ppl=p_o, ppl_ratio=p_o / p_d)
