"""Mamba-1 (icd_jax.models.mamba) against a sequential NumPy reference of HF's slow path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import vsla_jax as vs
from icd_jax import permute
from icd_jax.errors import ConfigError, ICDWarning, ModelError
from icd_jax.models import mamba

CFG = mamba.MambaConfig(vocab_size=50, d_model=16, n_layers=2, d_state=4)


@pytest.fixture(scope="module")
def params():
    return mamba.init(CFG, seed=1)


# -- an independent reference: HF tensor names and layouts, a plain loop over time --------
def softplus(x):
    return np.logaddexp(0.0, x)


def silu(x):
    return x / (1.0 + np.exp(-x))


def rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def reference(t, config, tokens):
    """HF Mamba on one sequence, float64: ``(logits [L, V], conv tails, ssm states)``."""
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    c = config
    emb = t.get("backbone.embeddings.weight", t.get("backbone.embedding.weight"))
    h = emb[np.asarray(tokens, np.int64)].reshape(len(tokens), c.d_model)
    n, k = len(tokens), c.d_conv
    tails, states = [], []
    for i in range(c.n_layers):
        p = f"backbone.layers.{i}."
        x = rms(h, t[p + "norm.weight"], c.eps)
        xz = x @ t[p + "mixer.in_proj.weight"].T
        x, z = xz[:, :c.d_inner], xz[:, c.d_inner:]
        xpad = np.concatenate([np.zeros((k - 1, c.d_inner)), x])
        w = t[p + "mixer.conv1d.weight"][:, 0, :]                    # [d_inner, K]
        conv = np.stack([t[p + "mixer.conv1d.bias"] + (w * xpad[s:s + k].T).sum(1)
                         for s in range(n)]) if n else np.zeros((0, c.d_inner))
        tails.append(xpad[n:n + k - 1] if n else np.zeros((k - 1, c.d_inner)))
        u = silu(conv)
        dbc = u @ t[p + "mixer.x_proj.weight"].T
        dt = dbc[:, :c.dt_rank]
        bm = dbc[:, c.dt_rank:c.dt_rank + c.d_state]
        cm = dbc[:, c.dt_rank + c.d_state:]
        dt = softplus(dt @ t[p + "mixer.dt_proj.weight"].T + t[p + "mixer.dt_proj.bias"])
        a = -np.exp(t[p + "mixer.A_log"])
        s = np.zeros((c.d_inner, c.d_state))
        y = np.zeros((n, c.d_inner))
        for j in range(n):
            s = np.exp(dt[j][:, None] * a) * s + (dt[j] * u[j])[:, None] * bm[j][None, :]
            y[j] = s @ cm[j] + t[p + "mixer.D"] * u[j]
        states.append(s)
        h = h + (y * silu(z)) @ t[p + "mixer.out_proj.weight"].T
    logits = rms(h, t["backbone.norm_f.weight"], c.eps) @ emb.T
    return logits, np.stack(tails), np.stack(states)


def random_hf(config, seed=0, embedding_name="backbone.embeddings.weight"):
    """A torch-free random checkpoint with HF names and shapes (float32)."""
    rng = np.random.default_rng(seed)
    t = {}
    for name, shape in mamba.hf_shapes(config).items():
        t[name] = rng.normal(0, 0.3, shape).astype(np.float32)
        if name.endswith("A_log"):
            t[name] = np.log(rng.uniform(0.5, 8, shape)).astype(np.float32)
        if name.endswith("dt_proj.bias"):
            t[name] = rng.uniform(-5, -2, shape).astype(np.float32)
    t[embedding_name] = t.pop("backbone.embeddings.weight")
    return t


def seqs(rng, lengths, vocab=CFG.vocab_size):
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


# -- config ------------------------------------------------------------------------------
def test_config_auto_dt_rank_and_130m_shapes():
    c = mamba.MAMBA_130M
    assert (c.vocab_size, c.d_model, c.n_layers, c.d_state, c.d_conv, c.expand) == (
        50280, 768, 24, 16, 4, 2)
    assert c.dt_rank == 48 and c.d_inner == 1536
    assert mamba.MambaConfig(10, 17, 1).dt_rank == 2
    assert hash(CFG) == hash(mamba.MambaConfig(50, 16, 2, d_state=4))


@pytest.mark.parametrize("kw", [dict(d_model=0), dict(n_layers=-1), dict(dt_rank="big"),
                                dict(d_state=2.5), dict(eps=0.0), dict(expand=True)])
def test_config_rejects_bad_values(kw):
    args = dict(vocab_size=10, d_model=8, n_layers=1) | kw
    with pytest.raises(ConfigError, match=next(iter(kw))):
        mamba.MambaConfig(**args)


def test_init_follows_hf(params):
    m = params["layer_0"]["mixer"]
    np.testing.assert_allclose(np.exp(m["A_log"]), np.tile(np.arange(1, 5), (CFG.d_inner, 1)),
                               rtol=1e-6)
    np.testing.assert_array_equal(m["D"], 1.0)
    dt = np.asarray(jax.nn.softplus(m["dt_proj"]["bias"]))
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)


# -- forward ------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [0, 1, 3])
def test_forward_matches_sequential_reference(params, chunk):
    rng = np.random.default_rng(0)
    lengths = [1, 5, 8, 0, 3]
    toks = seqs(rng, lengths)
    x = vs.stack([np.asarray(s, np.int32) for s in toks], dtype=np.int32)
    assert x.capacity == (8,)
    logits, state = mamba.prefill(CFG, params, x, chunk=chunk)
    out = np.asarray(logits.data)
    assert out.dtype == np.float32 and out.shape == (5, 8, CFG.vocab_size)
    hf = mamba.hf_from_params(params, CFG)
    for b, (s, n) in enumerate(zip(toks, lengths)):
        ref, tails, states = reference(hf, CFG, s)
        np.testing.assert_allclose(out[b, :n], ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out[b, n:], 0.0)
        np.testing.assert_allclose(np.asarray(state.conv[:, b]), tails, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(state.ssm[:, b]), states, rtol=1e-5,
                                   atol=1e-6)
    assert np.all(np.asarray(state.ssm[:, 3]) == 0) and np.all(np.asarray(state.conv[:, 3]) == 0)


def test_padding_invariance(params):
    rng = np.random.default_rng(1)
    toks = seqs(rng, [6, 2, 7])
    small = mamba.as_tokens(toks)
    assert small.capacity == (8,)
    data = np.zeros((3, 32), np.int32)
    for i, s in enumerate(toks):
        data[i, :len(s)] = s
    big = vs.from_padded(data, np.array([[6], [2], [7]]))
    a = np.asarray(mamba.forward(CFG, params, small).data)
    b = np.asarray(mamba.forward(CFG, params, big).data)
    np.testing.assert_allclose(b[:, :8], a, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(b[:, 8:], 0.0)
    junk = data.copy()
    mask = np.arange(32)[None, :] >= np.array([[6], [2], [7]])
    junk[mask] = rng.integers(0, CFG.vocab_size, mask.sum())
    noisy = vs.VarTensor.trusted(jnp.asarray(junk), big.lengths)
    (c, sc), (d, sd) = (mamba.prefill(CFG, params, t) for t in (big, noisy))
    np.testing.assert_array_equal(np.asarray(c.data), np.asarray(d.data))
    assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(sc), jax.tree.leaves(sd)))


def test_float_vartensor_and_errors(params):
    x = vs.stack([[1, 2, 3], [4]])                           # vs.stack's default: float ids
    a = mamba.forward(CFG, params, x)
    b = mamba.forward(CFG, params, [[1, 2, 3], [4]])
    np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
    with pytest.raises(ModelError, match="token ids must be in"):
        mamba.forward(CFG, params, [[1, CFG.vocab_size]])
    with pytest.raises(ModelError, match="1-D"):
        mamba.forward(CFG, params, [[[1, 2]]])
    with pytest.raises(ModelError, match="integers"):
        mamba.forward(CFG, params, vs.stack([[1.5, 2.0]]))


def test_forward_under_jit(params):
    x = mamba.as_tokens([[1, 2, 3], [4, 5]])
    f = jax.jit(lambda p, t: mamba.forward(CFG, p, t).data)
    np.testing.assert_allclose(np.asarray(f(params, x)),
                               np.asarray(mamba.forward(CFG, params, x).data), rtol=1e-6)


def test_capture_intermediates(params):
    x = mamba.as_tokens([[1, 2, 3, 4], [5, 6]])
    logits, inter = mamba.forward(CFG, params, x, capture=True)
    np.testing.assert_allclose(np.asarray(logits.data),
                               np.asarray(mamba.forward(CFG, params, x).data), rtol=1e-6)
    res0 = np.asarray(inter["layer_0"]["residual"][0])
    inner0 = np.asarray(inter["layer_0"]["mixer"]["inner"][0])
    res1 = np.asarray(inter["layer_1"]["residual"][0])
    assert res0.shape == (2, 8, CFG.d_model) and inner0.shape == (2, 8, CFG.d_inner)
    np.testing.assert_array_equal(inner0[1, 2:], 0.0)
    np.testing.assert_array_equal(res1[1, 2:], 0.0)
    w = np.asarray(params["layer_0"]["mixer"]["out_proj"]["kernel"])
    np.testing.assert_allclose(res1, res0 + inner0 @ w, rtol=1e-5, atol=1e-6)
    emb = np.asarray(params["embedding"]["embedding"])
    np.testing.assert_array_equal(res0[0, :4], emb[[1, 2, 3, 4]])


# -- decoding -----------------------------------------------------------------------------
def test_step_after_prefill_matches_forward(params):
    rng = np.random.default_rng(2)
    lengths = [3, 6, 1]
    full = seqs(rng, [n + 3 for n in lengths])
    prompts = [s[:n] for s, n in zip(full, lengths)]
    ref = np.asarray(mamba.forward(CFG, params, full).data)
    logits, state = mamba.prefill(CFG, params, prompts)
    last = np.asarray(mamba.last_logits(logits))
    np.testing.assert_allclose(last, ref[np.arange(3), np.array(lengths) - 1], rtol=1e-5,
                               atol=1e-5)
    for j in range(3):
        ids = np.array([s[n + j] for s, n in zip(full, lengths)], np.int32)
        out, state = mamba.step(CFG, params, state, ids)
        np.testing.assert_allclose(np.asarray(out), ref[np.arange(3), np.array(lengths) + j],
                                   rtol=1e-5, atol=1e-5)


def test_step_from_empty_prefill_is_first_token(params):
    logits, state = mamba.prefill(CFG, params, [[]])
    np.testing.assert_array_equal(np.asarray(logits.data), 0.0)
    out, _ = mamba.step(CFG, params, state, np.array([7], np.int32))
    ref = np.asarray(mamba.forward(CFG, params, [[7]]).data)[0, 0]
    np.testing.assert_allclose(np.asarray(out)[0], ref, rtol=1e-5, atol=1e-5)


def test_greedy_generate_equals_repeated_argmax(params):
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    got = mamba.generate(CFG, params, prompts, 4)
    assert got.shape == (2, 4) and got.dtype == np.int32
    for b, p in enumerate(prompts):
        seq = list(p)
        for _ in range(4):
            lg = np.asarray(mamba.forward(CFG, params, [seq]).data)[0, len(seq) - 1]
            seq.append(int(np.argmax(lg)))
        assert got[b].tolist() == seq[len(p):]
    one = mamba.generate(CFG, params, prompts[1], 4)
    assert one.tolist() == got[1].tolist()
    assert mamba.generate(CFG, params, prompts, 0).shape == (2, 0)


def test_sampled_generate_is_seeded(params):
    model = mamba.Mamba(CFG, params)
    a = model.generate([[1, 2, 3]], 6, greedy=False, temperature=2.0, seed=3)
    b = model.generate([[1, 2, 3]], 6, greedy=False, temperature=2.0, seed=3)
    assert a.tolist() == b.tolist() and a.min() >= 0 and a.max() < CFG.vocab_size
    with pytest.raises(ModelError, match="non-empty"):
        model.generate([[1], []], 2)
    with pytest.raises(ConfigError, match="temperature"):
        model.generate([[1]], 2, greedy=False, temperature=0.0)


# -- weights ------------------------------------------------------------------------------
def test_save_load_round_trip(params, tmp_path):
    path = tmp_path / "m.safetensors"
    mamba.save_hf(path, params, CFG)
    back = mamba.load_hf(path)
    assert permute.tree_equal(back, jax.tree.map(np.asarray, params))
    assert mamba.config_from_hf(mamba.hf_from_params(params, CFG)) == CFG
    bf = mamba.load_hf(path, CFG, dtype="bfloat16")
    assert bf["layer_0"]["mixer"]["D"].dtype == jnp.bfloat16
    lg = mamba.forward(CFG, bf, [[1, 2, 3]])
    assert lg.data.dtype == jnp.float32


@pytest.mark.parametrize("emb_name", ["backbone.embeddings.weight", "backbone.embedding.weight"])
def test_hf_file_gives_reference_logits(tmp_path, emb_name):
    cfg = mamba.MambaConfig(vocab_size=40, d_model=24, n_layers=2, d_state=3, d_conv=3)
    t = random_hf(cfg, 5, emb_name)
    t["lm_head.weight"] = t[emb_name].copy()
    path = tmp_path / "hf.safetensors"
    save_file(t, str(path))
    model = mamba.load(path)
    assert model.config == cfg
    toks = [[1, 2, 3, 4, 5, 6], [7, 8]]
    out = np.asarray(model.logits(toks).data)
    for b, s in enumerate(toks):
        np.testing.assert_allclose(out[b, :len(s)], reference(t, cfg, s)[0], rtol=1e-5,
                                   atol=1e-5)


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    t = random_hf(CFG, 0)
    name = "backbone.layers.1.mixer.dt_proj.bias"
    path = tmp_path / "bad.safetensors"
    save_file({k: v for k, v in t.items() if k != name}, str(path))
    with pytest.raises(ModelError, match=name):
        mamba.load_hf(path)
    t2 = dict(t)
    t2["backbone.layers.0.mixer.x_proj.weight"] = np.zeros((3, CFG.d_inner), np.float32)
    save_file(t2, str(path))
    with pytest.raises(ModelError, match="x_proj.weight"):
        mamba.load_hf(path, CFG)
    with pytest.raises(ModelError, match="not found"):
        mamba.load_hf(tmp_path / "absent.safetensors")
    t3 = dict(t, **{"lm_head.weight": np.zeros_like(t["backbone.embeddings.weight"])})
    save_file(t3, str(path))
    with pytest.warns(ICDWarning, match="lm_head"):
        mamba.load_hf(path)


# -- permutations -------------------------------------------------------------------------
def test_permutation_preserves_logits_and_inverts(params):
    spec = mamba.permute_spec(CFG)
    assert spec.model == "mamba" and spec.outputs == {}
    assert spec.names == ("residual", "inner_0", "inner_1")
    permute.check_spec(spec, params)
    perms = permute.random_perms(spec, seed=4)
    p2 = permute.apply(spec, params, perms)
    assert not permute.tree_equal(p2, params)
    toks = [[1, 2, 3, 4, 5, 6, 7], [8, 9]]
    a = np.asarray(mamba.forward(CFG, params, toks).data)
    b = np.asarray(mamba.forward(CFG, p2, toks).data)
    assert np.linalg.norm(b - a) <= 1e-5 * np.linalg.norm(a)
    assert permute.tree_equal(permute.apply(spec, p2, permute.invert(perms)), params)


def test_spec_covers_every_inner_axis(params):
    """Every parameter axis of size d_inner is on an inner axis; in_proj's is x|z."""
    spec = mamba.permute_spec(CFG)
    used = {(u.path, u.axis) for a in spec.axes for u in a.uses}
    for path, v in permute.flat(params).items():
        for ax, n in enumerate(np.shape(v)):
            if n in (CFG.d_inner, 2 * CFG.d_inner) and path.startswith("layer_"):
                assert (path, ax) in used, (path, ax)
    inp = spec.axis("inner_0").uses[0]
    assert inp.path.endswith("in_proj/kernel") and inp.parts == 2
    idx = inp.index(np.array([1, 0] + list(range(2, CFG.d_inner))))
    assert idx[0] == 1 and idx[CFG.d_inner] == CFG.d_inner + 1
    assert sorted(idx.tolist()) == list(range(2 * CFG.d_inner))


def test_130m_shapes_without_allocation():
    c = mamba.MAMBA_130M
    shapes = jax.eval_shape(lambda: mamba.init(c, 0))
    permute.check_spec(mamba.permute_spec(c), shapes)
    assert shapes["layer_23"]["mixer"]["in_proj"]["kernel"].shape == (768, 3072)
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert 125e6 < n < 135e6
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    logits, state = jax.eval_shape(lambda p, i, n: mamba.run_padded(c, p, i, n, 8),
                                   shapes, ids, lengths)
    assert logits.shape == (2, 16, 50280) and logits.dtype == jnp.float32
    assert state.ssm.shape == (24, 2, 1536, 16) and state.conv.shape == (24, 2, 3, 1536)
    hf = mamba.hf_shapes(c)
    assert hf["backbone.layers.0.mixer.x_proj.weight"] == (80, 1536)


def test_capture_batch_rows(params):
    model = mamba.Mamba(CFG, params)
    x = mamba.as_tokens([[1, 2, 3, 4], [5, 6]])
    rows = model.capture_batch(x)
    assert sorted(rows) == ["layer_0/inner", "layer_0/residual", "layer_1/inner",
                            "layer_1/residual"]
    arr, valid = rows["layer_1/inner"]
    assert arr.shape == (16, CFG.d_inner) and valid.sum() == 6 and valid[:4].all()
    _, inter = mamba.forward(CFG, params, x, capture=True)
    np.testing.assert_array_equal(np.asarray(arr).reshape(2, 8, -1),
                                  np.asarray(inter["layer_1"]["mixer"]["inner"][0]))
    p2 = jax.tree.map(lambda a: a * 0, params)
    assert not np.asarray(model.capture_batch(x, p2)["layer_0/residual"][0]).any()
