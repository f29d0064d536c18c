"""What a probe of the real models found: silent NaN or a wrong token from unchecked
arguments, a requested quantisation silently skipped, raw errors for plain mistakes."""

import jax.numpy as jnp
import numpy as np
import pytest

from icd_jax.errors import ConfigError, ModelError
from icd_jax.models import mamba, minilm


@pytest.fixture(scope="module")
def tiny():
    cfg = mamba.MambaConfig.tiny()
    return mamba.Mamba(cfg, mamba.init(cfg, seed=0))


def test_mamba_step_checks_its_token_ids(tiny):
    _, state = tiny.prefill([[1, 2, 3]])
    good, _ = tiny.step(state, jnp.array([5], jnp.int32))
    assert np.isfinite(np.asarray(good)).all()
    for bad in ([100], [-1]):  # NaN logits and a silent wrap to id 63 before
        with pytest.raises(ModelError, match=r"token ids must be in \[0, 64\)"):
            tiny.step(state, jnp.array(bad, jnp.int32))
    for bad in (5, [1, 2]):
        with pytest.raises(ModelError, match=r"token_ids must be int\[1\]"):
            tiny.step(state, bad)


@pytest.mark.parametrize("chunk", [2.5, None, -1, True])
def test_mamba_chunk_must_be_a_non_negative_integer(tiny, chunk):
    with pytest.raises(ConfigError, match="chunk must be an integer >= 0"):
        mamba.Mamba(tiny.config, tiny.params, chunk=chunk)


@pytest.fixture(scope="module")
def enc():
    return minilm.load()


@pytest.mark.parametrize("max_tokens", [1, 0, 1.5, "128", 513])
def test_minilm_max_tokens_needs_room_for_cls_and_sep(max_tokens):
    # 1 had silently skipped truncation: 602 tokens, positions past 512, NaN embeddings
    with pytest.raises(ConfigError, match=r"max_tokens must be an integer in \[2, 512\]"):
        minilm.load(max_tokens=max_tokens)


def test_minilm_two_tokens_truncates_to_cls_and_sep():
    enc2 = minilm.load(max_tokens=2)
    assert [len(t) for t in enc2.tokenize(["word " * 600, "short"])] == [2, 2]
    assert np.isfinite(enc2.encode(["word " * 600])).all()


def test_quantizing_twice_and_bad_calibration_are_refused(enc):
    q = minilm.quantized(enc, "int8-plain")
    with pytest.raises(ConfigError, match="already quantised"):
        minilm.quantized(q, "int8-groups")
    with pytest.raises(ConfigError, match="calibration needs at least one sentence"):
        minilm.quantized(enc, "int8", calibration=[])


def test_one_calibration_sentence_is_one_sentence_not_its_characters(enc):
    s = "A cat sat on the mat while the dog slept."
    as_str = minilm.quantized(enc, "int8", calibration=s).encode([s])
    as_list = minilm.quantized(enc, "int8", calibration=[s]).encode([s])
    np.testing.assert_array_equal(as_str, as_list)


@pytest.mark.parametrize("batch_size", [None, "2", 1.5, 0, True])
def test_encode_batch_size_must_be_a_positive_integer(enc, batch_size):
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        enc.encode(["a"], batch_size=batch_size)


def test_minilm_names_an_unknown_attention_backend_at_load():
    with pytest.raises(ConfigError, match="backend must be one of"):
        minilm.load(backend="nope")
    with pytest.raises(ConfigError, match="backend must be one of"):
        minilm.load().with_backend("nope")


@pytest.mark.parametrize("seed", [None, "0", 1.5, True])
def test_mamba_init_names_a_bad_seed(seed):
    with pytest.raises(ModelError, match="seed must be an int or a PRNG key"):
        mamba.init(mamba.MambaConfig.tiny(), seed=seed)


def test_mamba_init_takes_an_int_or_a_key_alike():
    import jax

    cfg = mamba.MambaConfig.tiny()
    a, b = mamba.init(cfg, seed=3), mamba.init(cfg, seed=jax.random.PRNGKey(3))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_a_flat_list_of_ids_is_named_as_such(tiny):
    with pytest.raises(ModelError, match=r"flat list of ints.*\[\[\.\.\.\]\]"):
        tiny.logits([1, 2, 3])
    assert tiny.logits([[1, 2, 3]]).data.shape[0] == 1  # the batch of one it meant
