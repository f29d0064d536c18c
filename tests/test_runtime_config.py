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


# -- values JSON cannot hold (a probe crashed on a YAML date, and NaN/inf reached the
#    lock file as null, which `icd export` then rejected) -------------------------------
def test_a_yaml_date_is_a_config_error_naming_its_key(tmp_path):
    y = tmp_path / "date.yaml"
    y.write_text("pipeline:\n  seed: 2020-01-01\n")
    with pytest.raises(ConfigError, match=r"pipeline\.seed: 2020-01-01 is a date"):
        config.load(y)
    y.write_text("model:\n  kwargs:\n    2020-01-01: 1\n")
    with pytest.raises(ConfigError, match="model.kwargs: the key"):
        config.load(y)
    with pytest.raises(ConfigError, match=r"pipeline\.seed: .* is a set"):
        config.load({"pipeline": {"seed": {1}}})


def float_fields(model=config.Config, prefix=""):
    """Dotted paths of every float-typed key of the schema (walked independently of the
    validation code)."""
    import typing

    from pydantic import BaseModel

    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        args = typing.get_args(ann) or (ann,)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += float_fields(ann, f"{prefix}{name}.")
        elif float in args:
            out.append(f"{prefix}{name}")
    return out


def test_float_fields_cover_every_section_with_floats():
    keys = float_fields()
    for key in ("solver.time_budget_s", "gates.quality_drop_pp", "gates.latency_pct",
                "rollback.alpha", "transform.quant.smooth_alpha", "cache.lock_timeout_s",
                "pipeline.retry_backoff_s", "measure.nvml_interval_s"):
        assert key in keys
    assert any(k.startswith("cost.") for k in keys)


@pytest.mark.parametrize("key", float_fields())
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_every_float_key_rejects_nan_and_inf(key, value):
    with pytest.raises(ConfigError, match=f"{key}: .*not a finite number"):
        config.load(None, [f"{key}={value}"])
    section, _, leaf = key.rpartition(".")
    data: dict = {}
    node = data
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[leaf] = float(value.replace("Infinity", "inf"))
    with pytest.raises(ConfigError, match=f"{key}: .*not a finite number"):
        config.load(data)


def test_nan_and_inf_from_yaml_and_in_model_kwargs_are_rejected(tmp_path):
    y = tmp_path / "inf.yaml"
    y.write_text("solver:\n  time_budget_s: .inf\n")
    with pytest.raises(ConfigError, match="solver.time_budget_s: inf is not a finite"):
        config.load(y)
    with pytest.raises(ConfigError, match=r"model.kwargs.scale\[1\]: nan is not a finite"):
        config.load({"model": {"target": "pkg.mod:make", "kwargs": {"scale": [1, "nan"]}}},
                    ["model.kwargs.scale=[1, NaN]"])


def test_a_typed_section_rejects_nan_too():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="finite number"):
        config.Gates(quality_drop_pp=float("nan"))


def test_cache_dir_must_name_a_folder():
    for bad in ("", "   "):
        with pytest.raises(ConfigError, match="cache.dir: must name a folder"):
            config.load({"cache": {"dir": bad}})


def test_trace_source_needs_linear_mode(tmp_path):
    # iterative mode silently fitted pi1 on a random planted mock W' (a probe found it)
    trace = {"graph": {"source": "trace", "trace_path": "t.jsonl"}}
    assert config.load(trace, ["pipeline.mode=linear"]).graph.source == "trace"
    for overrides in ([], ["pipeline.mode=iterative"]):  # iterative is the default
        with pytest.raises(ConfigError, match="graph.source: 'trace' .* set pipeline.mode "
                                              "to linear"):
            config.load(trace, overrides)


def test_no_silent_mock_w_after_for_a_trace(tmp_path):
    from icd_jax.runtime.stages import Run

    cfg = config.load({"graph": {"source": "trace", "trace_path": "t.jsonl",
                                 "fallback_mock": True},
                       "pipeline": {"mode": "linear"}, "cache": {"dir": str(tmp_path)}})
    with pytest.raises(ConfigError, match="graph.source: 'trace'"):
        Run(cfg, str(tmp_path / "out")).build_graphs(arm=object())


def test_dry_run_plan_says_what_w_after_is():
    from icd_jax.runtime.summary import plan_text

    mock = plan_text(config.load({"graph": {"source": "mock"}}))
    assert "REPERMUTED   W' = the same planted mock W" in mock
    assert "REPERMUTED   W' on the transformed model" in plan_text(config.load(None))
