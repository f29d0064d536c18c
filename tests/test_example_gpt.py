"""The bring-your-own-model example (``examples/tiny_gpt.py``) at a tiny size: it passes
``target.check``, trains, caches, preserves its function under its spec, a broken spec
is rejected, and ``icd run`` takes it from READY to REPORTED."""

import copy
import dataclasses
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from icd_jax import permute
from icd_jax.errors import TargetError
from icd_jax.runtime import config, orchestrator, target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "tiny_gpt.py")
CONFIG = os.path.join(ROOT, "examples", "tiny_gpt.yaml")
TINY = dict(d_model=16, layers=2, heads=2, mlp=32, context=16, train_steps=20,
            train_batch=8, lr=1e-2, batch_size=4, graph_seqs=8, calib_seqs=4,
            quality_seqs=8, time_seqs=4, progress=False)


@pytest.fixture(scope="module")
def mod():
    return target.import_file(EXAMPLE)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny_gpt_cache"))


@pytest.fixture(scope="module")
def gpt(mod, cache):
    return mod.make_target(seed=0, cache_dir=cache, **TINY)


def test_the_example_passes_check(gpt):
    target.check(gpt, "tiny_gpt")
    assert isinstance(gpt, target.Target)
    assert gpt.axes == ["ffn_0", "ffn_1"]
    assert set(gpt.spec.names) == {"residual", "ffn_0", "heads_0", "ffn_1", "heads_1"}
    for split in target.SPLITS:
        for ids, lengths in gpt.batches(split):
            assert ids.dtype == np.int32 and ids.shape == (4, 16)
            assert lengths.dtype == np.int32 and np.all((lengths >= 8) & (lengths <= 16))


def test_training_lowers_the_loss_and_is_cached(mod, gpt, cache):
    assert not gpt.from_cache and gpt.losses.shape == (20,)
    assert gpt.losses[0] == pytest.approx(np.log(256), abs=0.3)  # uniform at init
    assert gpt.losses[-3:].mean() < gpt.losses[:3].mean() - 0.5
    stored = load_file(gpt.cache_path)  # safetensors, never a pickle
    assert set(stored) == set(permute.flat(gpt.params))
    again = mod.make_target(seed=0, cache_dir=cache, **TINY)
    assert again.from_cache and again.cache_path == gpt.cache_path
    assert permute.tree_equal(again.params, gpt.params)
    np.testing.assert_array_equal(again.losses, gpt.losses)
    other = mod.make_target(seed=1, cache_dir=cache, **{**TINY, "train_steps": 2})
    assert not other.from_cache and other.cache_path != gpt.cache_path


def test_a_corrupt_cache_file_is_retrained(mod, tmp_path):
    kw = {**TINY, "train_steps": 2}
    first = mod.make_target(seed=0, cache_dir=str(tmp_path), **kw)
    with open(first.cache_path, "wb") as f:
        f.write(b"not a safetensors file")
    again = mod.make_target(seed=0, cache_dir=str(tmp_path), **kw)
    assert not again.from_cache
    assert permute.tree_equal(again.params, first.params)


def test_any_spec_permutation_preserves_the_logits(gpt):
    batch = gpt.batches("quality")[0]
    dense = np.asarray(gpt.forward(gpt.params, batch))
    for seed in range(3):
        perms = permute.random_perms(gpt.spec, seed=seed)
        moved = permute.apply(gpt.spec, gpt.params, perms)
        assert not permute.tree_equal(moved, gpt.params)
        np.testing.assert_allclose(np.asarray(gpt.forward(moved, batch)), dense,
                                   rtol=1e-5, atol=1e-5)
        # the co-designed axes' activations move with their order, column for column
        acts, got = gpt.activations(gpt.params, batch), gpt.activations(moved, batch)
        for a in gpt.axes:
            assert got[a].shape == (gpt.tokens(batch), 32)
            np.testing.assert_allclose(got[a], acts[a][:, perms[a]], rtol=1e-5, atol=1e-5)


def test_quality_is_per_sequence_next_byte_accuracy(mod, gpt):
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 0]], np.int32)
    lengths = np.array([4, 3], np.int32)
    logits = np.zeros((2, 4, 256), np.float32)
    logits[0, [0, 1, 2], [2, 0, 4]] = 1.0  # 2 of 3 next bytes right
    logits[1, [0, 1], [6, 7]] = 1.0  # 2 of 2 (position 2 predicts padding: ignored)
    np.testing.assert_allclose(mod.accuracy(logits, ids, lengths), [200 / 3, 100.0])
    q = gpt.batches("quality")
    outs = [np.asarray(gpt.forward(gpt.params, b)) for b in q]
    got = gpt.quality(outs, outs, q)
    assert got.shape == (8,) and np.all((got >= 0) & (got <= 100)) and got.mean() > 5


def broken(gpt, spec):
    t = copy.copy(gpt)
    t.spec = spec
    return t


def test_a_broken_spec_is_rejected_naming_the_problem(gpt):
    spec = gpt.spec
    ffn0 = spec.axis("ffn_0")
    dropped = dataclasses.replace(ffn0, uses=tuple(
        u for u in ffn0.uses if u.path != "block_0/mlp/proj/kernel"))
    missing_use = dataclasses.replace(spec, axes=tuple(
        dropped if a.name == "ffn_0" else a for a in spec.axes))
    with pytest.raises(TargetError, match="not function-preserving under the spec"):
        target.check(broken(gpt, missing_use))
    wrong_axis = dataclasses.replace(spec, axes=tuple(
        dataclasses.replace(a, uses=(*a.uses, permute.AxisUse("wpe/embedding", 0)))
        if a.name == "ffn_1" else a for a in spec.axes))
    with pytest.raises(TargetError, match="spec does not fit params.*wpe/embedding"):
        target.check(broken(gpt, wrong_axis))
    t = broken(gpt, spec)
    t.axes = ["ffn_0", "heads_0"]
    with pytest.raises(TargetError, match="differ in size"):
        target.check(t)


def test_icd_run_takes_the_example_to_reported(gpt, cache, tmp_path):
    # the config's relative .py target is found next to the config, from any folder
    assert config.load(CONFIG).model.target == f"{EXAMPLE}:make_target"
    cfg = config.read(CONFIG)
    cfg["model"] = {"target": f"{EXAMPLE}:make_target", "kwargs": {**TINY, "cache_dir": cache}}
    cfg["graph"].update(top_frac=0.25)  # 8 of 32 channels per byte
    cfg["solver"] = {"time_budget_s": 0.5, "refine_steps": 2000}
    cfg["pipeline"].update(repeats=2, warmup=1)
    cfg["cache"] = {"dir": str(tmp_path / "perms")}
    cfg["report"] = {"html": False, "stablehlo": False}
    res = orchestrator.run(cfg, str(tmp_path / "run"))
    assert res.ok and res.state == "REPORTED", res.metrics.get("run")
    assert not [w for w in res.metrics["warnings"] if "degenerate" in str(w)]
    q = res.metrics["quality"]
    assert q["metric"] == "next_byte_accuracy"
    for arm in ("dense", "identity", "before", "after"):
        assert 0 <= q[arm]["value"] <= 100
        assert len(res.metrics["quality_samples"][arm]) == 8
    assert q["dense"]["value"] == pytest.approx(float(np.mean(
        gpt.quality([np.asarray(gpt.forward(gpt.params, b)) for b in gpt.batches("quality")],
                    None, gpt.batches("quality")))))
