"""S adapters (N:M, unstructured) and whole-model application through a ModelSpec."""

import warnings

import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from icd_jax import permute
from icd_jax.adapters import meta as meta_lib
from icd_jax.adapters import quant, sparsity, tree
from icd_jax.errors import AdapterWarning, ConfigError, PermutationError, ShapeError
from icd_jax.permute import AxisUse, ModelSpec, PermAxis
from icd_jax.solver import nm_kept


def np_nm_mask(w, n, m):
    rows, cols = w.shape
    keep = np.zeros(w.shape, bool)
    for c in range(cols):
        for g in range(rows // m):
            idx = np.arange(g * m, (g + 1) * m)
            top = idx[np.argsort(-np.abs(w[idx, c]), kind="stable")[:n]]
            keep[top, c] = True
    return keep


@given(nm=st.sampled_from([(2, 4), (1, 4), (4, 8), (1, 2), (3, 4)]), cols=st.integers(1, 6),
       groups=st.integers(1, 4), seed=st.integers(0, 50))
def test_nm_mask_matches_reference_and_keeps_n_per_group(nm, cols, groups, seed):
    n, m = nm
    w = np.random.default_rng(seed).standard_normal((groups * m, cols)).astype(np.float32)
    keep = sparsity.nm_mask(w, n, m)
    np.testing.assert_array_equal(keep, np_nm_mask(w, n, m))
    assert (keep.reshape(groups, m, cols).sum(axis=1) == n).all()


def test_two_four_exactly_two_of_four(rng):
    w = rng.standard_normal((64, 9)).astype(np.float32)
    out, m = sparsity.apply_sparsity(w, "2:4")
    nz = (out != 0).reshape(16, 4, 9).sum(axis=1)
    assert (nz == 2).all()
    assert m["error"]["density"] == 0.5
    kept = np.abs(out).sum() / np.abs(w).sum()
    assert m["error"]["kept_magnitude"] == pytest.approx(kept, rel=1e-6)


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_keeps_the_largest(rng, rate):
    w = rng.standard_normal((20, 10)).astype(np.float32)
    out, m = sparsity.apply_sparsity(w, "unstructured", rate)
    drop = int(round(rate * w.size))
    assert (out == 0).sum() == drop
    if 0 < drop < w.size:
        assert np.abs(w[out == 0]).max() <= np.abs(w[out != 0]).min()
    assert m["delta_layout"]["repermute"] is False


def test_perm_argument_matches_nm_kept(rng):
    w = rng.standard_normal((16, 8)).astype(np.float32)  # [in, out]
    perm = rng.permutation(16)
    out, m = sparsity.apply_sparsity(w, "2:4", perm=perm)
    assert np.abs(out).sum() == pytest.approx(nm_kept(w.T, perm), rel=1e-6)
    with pytest.raises(PermutationError):
        sparsity.apply_sparsity(w, "2:4", perm=np.zeros(16, int))


def test_bad_inputs_raise_typed_errors(rng):
    w = rng.standard_normal((8, 4)).astype(np.float32)
    with pytest.raises(ShapeError, match="2-D"):
        sparsity.apply_sparsity(np.ones((2, 2, 2)))
    with pytest.raises(ConfigError, match="N:M"):
        sparsity.apply_sparsity(w, "two:four")
    with pytest.raises(ConfigError, match="groups of m=3"):
        sparsity.apply_sparsity(w, "1:3")
    with pytest.raises(ConfigError, match="rate"):
        sparsity.apply_sparsity(w, "unstructured", 1.5)


def test_no_op_fallback_and_meta_types(rng, monkeypatch):
    w = rng.standard_normal((8, 4)).astype(np.float32)
    _, m = sparsity.apply_sparsity(w)
    assert set(meta_lib.KEYS) <= set(m) and m["ok"] is True
    assert isinstance(m["settings"], dict) and isinstance(m["error"]["rel_fro"], float)
    monkeypatch.setattr(sparsity, "mask_of", lambda *a, **k: 1 / 0)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out, m = sparsity.apply_sparsity(w)
    assert m["ok"] is False and "ZeroDivisionError" in m["warning"]
    assert any(issubclass(r.category, AdapterWarning) for r in rec)
    np.testing.assert_array_equal(out, w)


# -- whole model: a two-layer MLP with a permutable hidden axis ---------------------------
def mlp_spec(d_in=8, hidden=16):
    return ModelSpec("mlp", (PermAxis("hidden", hidden, (
        AxisUse("l1/kernel", 1), AxisUse("l1/bias", 0), AxisUse("l2/kernel", 0))),))


def mlp(params, x):
    h = jnp.maximum(x @ params["l1"]["kernel"] + params["l1"]["bias"], 0)
    return quant.matmul(h, params["l2"]["kernel"]) + params["l2"]["bias"]


def mlp_params(rng, d_in=8, hidden=16, out=6):
    return {"l1": {"kernel": rng.standard_normal((d_in, hidden)).astype(np.float32),
                   "bias": rng.standard_normal(hidden).astype(np.float32)},
            "l2": {"kernel": rng.standard_normal((hidden, out)).astype(np.float32),
                   "bias": rng.standard_normal(out).astype(np.float32)}}


def test_nm_permutation_is_function_preserving_and_keeps_more(rng):
    params, spec = mlp_params(rng), mlp_spec()
    x = rng.standard_normal((5, 8)).astype(np.float32)
    perms, stats = tree.nm_perms(spec, params, ["l2/kernel"], time_budget_s=1.0)
    assert tree.input_axes(spec, ["l1/kernel", "l2/kernel"]) == {"hidden": ["l2/kernel"]}
    moved = permute.apply(spec, params, perms)
    np.testing.assert_allclose(mlp(moved, x), mlp(params, x), rtol=1e-5, atol=1e-5)
    _, m_id = tree.sparsify(params, ["l2/kernel"], "2:4")
    pruned, m_pi = tree.sparsify(moved, ["l2/kernel"], "2:4")
    assert m_pi["error"]["kept_magnitude"] >= m_id["error"]["kept_magnitude"]
    assert stats["hidden"]["kept"] == pytest.approx(
        m_pi["error"]["kept_magnitude"] * np.abs(params["l2"]["kernel"]).sum(), rel=1e-5)
    assert (np.asarray(pruned["l2"]["kernel"]) != 0).sum() == 16 * 6 // 2


def test_range_perms_and_quantized_tree_run(rng):
    params, spec = mlp_params(rng), mlp_spec()
    x = rng.standard_normal((64, 8)).astype(np.float32)
    h = np.maximum(x @ params["l1"]["kernel"] + params["l1"]["bias"], 0)
    h[:, [1, 7, 12]] *= 25
    absmax = {"l2/kernel": np.abs(h).max(0)}
    perms = tree.range_perms(spec, absmax, ["l2/kernel"])
    np.testing.assert_array_equal(perms["hidden"][:3], np.sort([1, 7, 12])[np.argsort(
        -absmax["l2/kernel"][[1, 7, 12]])])
    errs = []
    for p_ in (tree.identity_perms(spec), perms):
        moved = permute.apply(spec, params, p_)
        am = tree.permuted_inputs(spec, absmax, p_)
        qp, m = tree.quantize(moved, ["l2/kernel"], "int8", 4, act="static", act_absmax=am)
        assert isinstance(qp["l2"]["kernel"], quant.Quantized)
        assert m["bytes"] < m["bytes_f32"]
        assert meta_lib.rel_error(mlp(params, x), mlp(qp, x)) < 0.3  # runs in the model
        errs.append(tree.output_errors(moved, qp, {"l2/kernel": h[:, p_["hidden"]]}))
    # outlier channels grouped together waste fewer levels of the shared group scales
    assert 0 < errs[1]["l2/kernel"] < errs[0]["l2/kernel"]


def test_dequantized_tree_and_row_subsampled_nm_search(rng):
    params, spec = mlp_params(rng), mlp_spec()
    qp, _ = tree.quantize(params, ["l2/kernel"], "int4", 8)
    deq = tree.dequantized(qp)
    assert isinstance(deq["l2"]["kernel"], type(jnp.zeros(1)))
    np.testing.assert_allclose(deq["l2"]["kernel"], qp["l2"]["kernel"].dequantize())
    np.testing.assert_array_equal(deq["l1"]["kernel"], params["l1"]["kernel"])
    perms, _ = tree.nm_perms(spec, params, ["l2/kernel"], time_budget_s=0.3, max_rows=3)
    assert sorted(perms["hidden"].tolist()) == list(range(16))


def test_mamba_nm_perms_preserve_logits_and_quantised_weights_run():
    import jax

    from icd_jax import quality
    from icd_jax.models import mamba

    cfg = mamba.MambaConfig.tiny(vocab_size=32, d_model=16, n_layers=2)
    params = jax.tree.map(np.asarray, mamba.init(cfg, 0))
    spec = mamba.permute_spec(cfg)
    paths = tree.kernel_paths(params, lambda p: "conv1d" not in p)
    axes = tree.input_axes(spec, paths)
    assert "residual" in axes and any(a.startswith("inner") for a in axes)
    toks = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11]]
    dense = np.asarray(mamba.forward(cfg, params, toks).data)
    perms, _ = tree.nm_perms(spec, params, paths, time_budget_s=0.5)
    moved = np.asarray(mamba.forward(cfg, permute.apply(spec, params, perms), toks).data)
    np.testing.assert_allclose(moved, dense, rtol=1e-4, atol=1e-5)
    qp, _ = tree.quantize(params, paths, "int8")
    m = quality.lm_compare(dense, np.asarray(mamba.forward(cfg, tree.dequantized(qp),
                                                           toks).data),
                           np.array([t + [0] * (8 - len(t)) for t in toks]), np.array([8, 3]))
    assert 0 < m["rel_logit_error"] < 0.05 and m["next_token_agreement"] > 0.8


def test_tree_smoothquant_shares_factors_between_kernels_reading_one_input(rng):
    params = mlp_params(rng)
    params["l3"] = {"kernel": rng.standard_normal((16, 4)).astype(np.float32)}
    h = np.abs(rng.standard_normal(16)) + 0.1
    absmax = {"l2/kernel": h, "l3/kernel": h.copy()}
    qp, m = tree.quantize(params, ["l2/kernel", "l3/kernel"], "int8", act="dynamic",
                          act_absmax=absmax, smooth_alpha=0.5)
    np.testing.assert_array_equal(qp["l2"]["kernel"].smooth, qp["l3"]["kernel"].smooth)
    assert m["settings"]["smooth_alpha"] == 0.5


def test_group_quantisation_falls_back_to_per_channel_on_small_inputs(rng):
    params = mlp_params(rng)  # l1 has 8 inputs, l2 has 16
    qp, m = tree.quantize(params, ["l1/kernel", "l2/kernel"], "int8", 16)
    assert m["per_channel_fallback"] == ["l1/kernel"]
    assert qp["l1"]["kernel"].group_size is None and qp["l2"]["kernel"].group_size == 16
