"""Topic retrieval accuracy against a naive loop."""

import numpy as np
import pytest

from icd_jax import quality
from icd_jax.errors import ConfigError


def naive_nn(e):
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    out = []
    for i in range(len(e)):
        best, arg = -np.inf, -1
        for j in range(len(e)):
            if j != i and e[i] @ e[j] > best:
                best, arg = e[i] @ e[j], j
        out.append(arg)
    return np.array(out)


@pytest.mark.parametrize("n, block", [(2, 1024), (37, 5), (64, 64)])
def test_nearest_neighbours_match_a_loop(rng, n, block):
    e = rng.standard_normal((n, 8))
    np.testing.assert_array_equal(quality.nearest_neighbours(e, block=block), naive_nn(e))


def test_topic_accuracy_and_compare(rng):
    centers = rng.standard_normal((4, 16)) * 3
    labels = np.repeat(np.arange(4), 10)
    e = centers[labels] + rng.standard_normal((40, 16))
    assert quality.topic_accuracy(e, labels) == pytest.approx(
        (labels[naive_nn(e)] == labels).mean())
    assert quality.topic_accuracy(e, labels) > 0.9
    noisy = e + rng.standard_normal(e.shape) * 5
    m = quality.compare(e, noisy, labels)
    assert m["dense_accuracy"] == quality.topic_accuracy(e, labels)
    assert m["drop_pp"] == pytest.approx(100 * (m["dense_accuracy"] - m["accuracy"]))
    assert 0 <= m["nn_agreement"] <= 1 and m["cos_min"] <= m["cos_mean"] <= 1
    same = quality.compare(e, e, labels)
    assert same["drop_pp"] == 0 and same["nn_agreement"] == 1
    assert same["cos_min"] == pytest.approx(1, abs=1e-6)


def test_bad_input(rng):
    with pytest.raises(ConfigError, match="at least 2"):
        quality.nearest_neighbours(np.ones((1, 3)))
    with pytest.raises(ConfigError, match=r"\[n, d\]"):
        quality.nearest_neighbours(np.ones(3))
    with pytest.raises(ConfigError, match="NaN"):
        quality.nearest_neighbours(np.array([[1.0, np.nan], [0, 1]]))
    with pytest.raises(ConfigError, match="labels"):
        quality.topic_accuracy(np.ones((3, 2)), [0, 1])
    with pytest.raises(ConfigError, match="same shape"):
        quality.compare(np.ones((3, 2)), np.ones((3, 3)), [0, 1, 2])


def test_lm_compare_against_a_naive_loop(rng):
    from icd_jax.quality import lm_compare

    b, c, v = 3, 6, 5
    d = rng.standard_normal((b, c, v))
    o = d + 0.3 * rng.standard_normal((b, c, v))
    toks = rng.integers(0, v, (b, c))
    lens = np.array([6, 1, 4])
    num = den = 0.0
    agree, nll, n_pred, n_real = 0, {0: 0.0, 1: 0.0}, 0, 0
    for i in range(b):
        for t in range(lens[i]):
            num += ((o[i, t] - d[i, t]) ** 2).sum()
            den += (d[i, t] ** 2).sum()
            agree += int(d[i, t].argmax() == o[i, t].argmax())
            n_real += 1
            if t + 1 < lens[i]:
                for k, lg in enumerate((d, o)):
                    p = np.exp(lg[i, t] - lg[i, t].max())
                    nll[k] -= np.log(p[toks[i, t + 1]] / p.sum())
                n_pred += 1
    m = lm_compare(d, o, toks, lens)
    assert m["rel_logit_error"] == pytest.approx(np.sqrt(num / den))
    assert m["next_token_agreement"] == pytest.approx(agree / n_real)
    assert m["ppl_dense"] == pytest.approx(np.exp(nll[0] / n_pred))
    assert m["ppl_ratio"] == pytest.approx(np.exp(nll[1] / n_pred) / np.exp(nll[0] / n_pred))
    same = lm_compare(d, d, toks, lens)
    assert same["rel_logit_error"] == 0 and same["next_token_agreement"] == 1
    with pytest.raises(ConfigError):
        lm_compare(d, o[:2], toks, lens)
