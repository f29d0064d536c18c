"""The run configuration: defaults, validation with key paths, files, overrides."""

import json

import hypothesis.strategies as st
import pytest
from hypothesis import given

from icd_jax.errors import ConfigError
from icd_jax.runtime import config


def test_every_key_has_a_default_and_shipped_minilm_config_is_the_default():
    d = config.resolved(config.load(None))
    assert set(d) == {"pipeline", "model", "graph", "solver", "cost", "transform", "measure",
                      "rollback", "cache", "quality", "gates", "report"}
    assert d["pipeline"]["mode"] == "iterative" and d["model"]["name"] == "minilm"
    assert d["gates"] == dict(latency_pct=-20.0, l2_hit_pp=10.0, ept_pct=-15.0,
                              quality_drop_pp=0.1)
    assert config.resolved(config.load("configs/minilm.yaml")) == d


def test_shipped_mamba_config_validates():
    cfg = config.load("configs/mamba.yaml")
    assert cfg.model.name == "mamba" and not cfg.transform.kv.enabled


@pytest.mark.parametrize("bad, path", [
    ({"pipeline": {"modee": "linear"}}, "pipeline.modee: unknown key"),
    ({"extra": {}}, "extra: unknown key"),
    ({"transform": {"quant": {"group_sz": 32}}}, "transform.quant.group_sz: unknown key"),
    ({"pipeline": {"repeats": "10"}}, "pipeline.repeats"),
    ({"solver": {"time_budget_s": "fast"}}, "solver.time_budget_s"),
    ({"transform": {"quant": {"group_size": 1.5}}}, "transform.quant.group_size"),
    ({"pipeline": {"mode": "both"}}, "pipeline.mode"),
    ({"transform": {"quant": {"dtype": "int3"}}}, "transform.quant.dtype"),
    ({"graph": {"top_frac": 0}}, "graph.top_frac"),
    ({"model": {"name": "mamba", "size": "L6"}}, "model"),
    ({"transform": []}, "transform"),
])
def test_invalid_config_names_the_key_path(bad, path):
    with pytest.raises(ConfigError) as e:
        config.load(bad)
    assert path in str(e.value)


def test_errors_list_every_problem():
    with pytest.raises(ConfigError) as e:
        config.load({"pipeline": {"repeats": 0, "mode": "x"}})
    assert "pipeline.repeats" in str(e.value) and "pipeline.mode" in str(e.value)


def test_json_and_yaml_files(tmp_path):
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"pipeline": {"mode": "linear"}}))
    y = tmp_path / "c.yaml"
    y.write_text("pipeline:\n  mode: linear\nsolver:\n  refine_steps: 5\n")
    assert config.load(j).pipeline.mode == "linear"
    assert config.load(y).solver.refine_steps == 5
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        config.load(bad)
    top = tmp_path / "top.json"
    top.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="mapping"):
        config.load(top)
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.json")


def test_overrides_are_typed_and_validated():
    cfg = config.load(None, ["pipeline.mode=linear", "transform.quant.group_size=null",
                             "solver.time_budget_s=0.5", "transform.kv.enabled=false"])
    assert cfg.pipeline.mode == "linear" and cfg.transform.quant.group_size is None
    assert cfg.solver.time_budget_s == 0.5 and cfg.transform.kv.enabled is False
    with pytest.raises(ConfigError, match="key=value"):
        config.load(None, ["pipeline.mode"])
    with pytest.raises(ConfigError, match="pipeline.nope: unknown key"):
        config.load(None, ["pipeline.nope=1"])
    with pytest.raises(ConfigError, match="not a section"):
        config.load({"pipeline": {"mode": "linear"}}, ["pipeline.mode.x=1"])


@given(st.integers(1, 1000), st.sampled_from(["linear", "iterative"]))
def test_resolved_round_trips_and_hash_is_stable(repeats, mode):
    cfg = config.load({"pipeline": {"repeats": repeats, "mode": mode}})
    again = config.load(config.resolved(cfg))
    assert again == cfg
    assert config.digest(config.resolved(cfg)) == config.digest(config.resolved(again))


def test_schema_lists_sections_and_forbids_extra():
    s = config.schema()
    assert "pipeline" in s["properties"] and s.get("additionalProperties") is False


MAMBA_OK = {"model": {"name": "mamba"}, "transform": {
    "kv": {"enabled": False}, "sparsity": {"enabled": True, "kind": "2:4"}}}


@pytest.mark.parametrize("key, value", [("transform.kv.enabled", True),
                                        ("transform.sparsity.kind", "ffn")])
def test_mamba_rejects_a_transform_its_kernels_do_not_run(key, value):
    assert config.load(MAMBA_OK).model.name == "mamba"
    with pytest.raises(ConfigError) as e:
        config.load(MAMBA_OK, [f"{key}={json.dumps(value)}"])
    assert f"invalid config: {key}: " in str(e.value) and "mamba" in str(e.value)
    # the same keys are fine for MiniLM (the defaults), and ffn off is fine for mamba
    assert config.load({"transform": MAMBA_OK["transform"]}, [f"{key}={json.dumps(value)}"])
    assert config.load(MAMBA_OK, ["transform.sparsity.enabled=false",
                                  "transform.sparsity.kind=ffn"])


def test_mamba_with_both_unsupported_transforms_names_both_keys():
    assert config.load({"model": {"name": "mamba"}}).transform.kv.enabled is False
    with pytest.raises(ConfigError) as e:
        config.load({"model": {"name": "mamba"}, "transform": {
            "kv": {"enabled": True}, "sparsity": {"enabled": True, "kind": "ffn"}}})
    assert "transform.kv.enabled" in str(e.value) and "transform.sparsity.kind" in str(e.value)


def test_non_utf8_config_file_is_a_config_error(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("model:\n  name: minilm # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(bad)
