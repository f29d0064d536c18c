"""The run configuration: a validated schema with a default for every key.

``load(path_or_dict, overrides)`` reads JSON or YAML, applies ``--set key=value``
overrides and validates with pydantic. Unknown keys, wrong types and bad enum values
raise ``ConfigError`` naming the key path (``transform.quant.group_size: ...``).
``resolved(cfg)`` is the full dict written to ``config.lock.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import typing
from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from icd_jax import cost as cost_lib
from icd_jax.errors import ConfigError
from icd_jax.runtime import gates as gates_lib


class Section(BaseModel):
    """A config section: unknown keys rejected, values frozen, types strict-ish, numbers
    finite (NaN and inf are rejected: ``config.lock.json`` could not record them)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True,
                              allow_inf_nan=False)


class Pipeline(Section):
    mode: Literal["linear", "iterative"] = Field(
        "iterative", description="linear: W -> pi -> transform; iterative adds the re-permute")
    repeats: int = Field(10, ge=1, description="timed latency repeats per arm (pair: >= 30)")
    warmup: int = Field(2, ge=0, description="untimed calls per arm before timing")
    seed: int = Field(0, ge=0, le=2**31 - 1,
                      description="seed of every random choice (solver, mock, sampling)")
    retries: int = Field(2, ge=0, description="retries of a transiently failing stage")
    retry_backoff_s: float = Field(0.25, ge=0, description="first retry delay; doubles")


class Model(Section):
    name: Literal["minilm", "mamba", "custom"] = Field(
        "minilm", description="a built-in model, or custom (set by model.target)")
    size: Literal["L6", "tiny", "small"] = Field(
        "L6", description="default L6 for minilm, tiny for mamba. minilm: L6 (real "
        "all-MiniLM-L6-v2 weights) or tiny (random init, for tests); mamba: tiny or small "
        "(random init, byte-level); ignored by a custom target")
    target: str | None = Field(
        None, description="your own model: 'package.module:factory' or "
        "'path/to/file.py:factory' returning a icd_jax.runtime.Target (see docs/pipeline.md, "
        "'Bring your own model'); a relative .py path is looked up from the working "
        "directory, then from the config file's folder")
    kwargs: dict[str, typing.Any] = Field(
        default_factory=dict, description="keyword arguments of the target's factory")
    batch_size: int = Field(32, ge=1, description="sentences (sequences) per batch")
    max_tokens: int = Field(128, ge=8, description="truncation length of each item")

    @model_validator(mode="before")
    @classmethod
    def _default_size(cls, data):
        if isinstance(data, dict) and data.get("target") is not None and "name" not in data:
            data = {**data, "name": "custom"}
        if isinstance(data, dict) and data.get("name") == "mamba" and "size" not in data:
            data = {**data, "size": "tiny"}
        return data

    @model_validator(mode="after")
    def _size_fits(self):
        if (self.name == "custom") != (self.target is not None):
            raise ValueError("model.target names a custom model: set it (and leave model.name "
                             "unset or 'custom'), or choose a built-in model.name without it")
        if self.kwargs and self.target is None:
            raise ValueError("model.kwargs is only for a custom model.target")
        if self.target is not None:
            module, _, factory = self.target.rpartition(":")
            if not (module.strip() and factory.strip()):
                raise ValueError(f"model.target must be 'package.module:factory' or "
                                 f"'path/to/file.py:factory', got {self.target!r}")
        if self.name == "custom":
            return self
        ok = {"minilm": ("L6", "tiny"), "mamba": ("tiny", "small")}[self.name]
        if self.size not in ok:
            raise ValueError(f"size {self.size!r} is not available for model {self.name!r}; "
                             f"choose one of {list(ok)}")
        return self


class Graph(Section):
    source: Literal["activations", "trace", "mock"] = "activations"
    sentences: int = Field(400, ge=1, description="held-out corpus items W is built from")
    top_frac: float = Field(0.1, gt=0, le=1, description="active channels per token")
    topk: int = Field(32, ge=1, description="neighbours kept per channel")
    hub: Literal["pmi", "sym", "none"] = "pmi"
    trace_path: str | None = Field(None, description="co-access trace (JSONL/CSV) for "
                                   "source=trace; its W is used for every fitted axis")
    fallback_mock: bool = Field(False, description="a corrupt or empty trace falls back to a "
                                "planted mock W instead of aborting")


class Solver(Section):
    time_budget_s: float = Field(10.0, gt=0, description="fit_permutation budget per axis; "
                                 "a search it cuts short is flagged timed_out (and then "
                                 "depends on the machine's speed)")
    refine_steps: int = Field(8000, ge=0, description="local-search moves (deterministic "
                              "for a seed when the budget is not hit)")
    k_blocks: int | None = Field(None, ge=1, description="modularity blocks (None: cost)")


class CostSection(Section):
    """Base of ``Cost``: its fields are ``cost.CostConfig``'s, built from it below."""

    @model_validator(mode="after")
    def _valid(self):
        self.cost_config()  # CostConfig's own checks (ConfigError is a ValueError)
        return self

    def cost_config(self) -> cost_lib.CostConfig:
        """The solver's ``CostConfig`` with these values."""
        return cost_lib.CostConfig(**self.model_dump())


#: The cost settings: one field per ``cost.CostConfig`` field, same defaults.
Cost = create_model("Cost", __base__=CostSection, __module__=__name__, **{
    f.name: (typing.get_type_hints(cost_lib.CostConfig)[f.name], Field(f.default))
    for f in dataclasses.fields(cost_lib.CostConfig)})


class Sparsity(Section):
    enabled: bool = False
    kind: Literal["ffn", "2:4", "unstructured"] = Field(
        "ffn", description="ffn: activation-sparse FFN tile skipping (layout-sensitive, "
        "driven by W); 2:4 / unstructured: weight pruning of every kernel")
    top_frac: float = Field(0.1, gt=0, le=1, description="ffn: share of neurons active "
                            "(per-layer |f| thresholds calibrated on held-out sentences)")
    tile: int = Field(16, ge=1, description="ffn: neurons per tile")
    mode: Literal["mask", "skip"] = Field(
        "mask", description="ffn: mask = zero inactive activations, one dense matmul "
        "(quality only, nothing skipped); skip = on calls of at most max_rows packed rows, "
        "skip the tiles no row of the call needs (a call with more rows runs masked, "
        "reported as a fallback)")
    max_rows: int = Field(32, ge=1, description="ffn skip: largest call that skips tiles")
    rate: float = Field(0.5, gt=0, lt=1, description="unstructured: weights pruned")


class Quant(Section):
    enabled: bool = True
    dtype: Literal["int8", "int4", "fp8"] = "int8"
    group_size: int | None = Field(
        None, ge=1, description="channels sharing an activation scale (the layout-sensitive "
        "part: the channel order decides the groups). None: per token (dynamic) or per "
        "tensor (static). int8 static groups fold into the weights (one int8 matmul); "
        "dynamic groups and int4 run grouped int8 arithmetic")
    act: Literal["dynamic", "static", "none"] = Field(
        "dynamic", description="int8 activations: dynamic (per token, or per token and "
        "group), static (calibrated per group or tensor), none (weight-only, float32 "
        "compute: not int8 arithmetic)")
    groups_on: Literal["permuted", "all"] = Field(
        "permuted", description="kernels group_size applies to: permuted = those whose "
        "input axis the run permutes (the pi decides their groups; the others use per-token "
        "or per-tensor scales), all = every kernel")
    smooth_alpha: float | None = Field(
        0.5, ge=0, le=1, description="SmoothQuant migration strength (calibrated per input "
        "channel, folded into the weights); null: off")
    calib_sentences: int = Field(128, ge=1)


class KV(Section):
    enabled: bool = False
    block: int = Field(4, ge=1, description="tokens per key/value block")
    drop: float = Field(0.1, ge=0, lt=1, description="fraction of key blocks dropped")
    permute_tokens: bool = True


class Transform(Section):
    sparsity: Sparsity = Sparsity()
    quant: Quant = Quant()
    kv: KV = KV()


class Measure(Section):
    sentences: int = Field(64, ge=1, description="items of the timed batch set")
    sim: bool = Field(True, description="replay tile traces through a simulated cache")
    sim_level: int = Field(2, ge=1, description="cache level simulated (from /sys)")
    sim_tokens: int = Field(256, ge=1, description="tokens replayed")
    ncu: bool = Field(True, description="use Nsight Compute for the L2 hit rate if on PATH")
    nvml: bool = Field(True, description="sample NVML power for energy per token")
    nvml_interval_s: float = Field(0.01, gt=0)
    nvml_min_samples: int = Field(10, ge=2, description="fewer NVML power samples in an "
                                  "arm's window: its energy per token is null, with the "
                                  "reason")


class Rollback(Section):
    enabled: bool = True
    quality_pp: float = Field(0.1, ge=0, description="a layout losing more quality than the "
                              "previous one by this many points is rolled back")
    latency_pct: float = Field(5.0, ge=0, description="... or slower by this many percent "
                               "(and outside both CI95s)")
    alpha: float | None = Field(0.05, gt=0, lt=1, description="a quality loss must also be "
                                "significant: paired p-value (exact McNemar on per-item "
                                "hits) below alpha; null: the tolerance alone decides")


class Cache(Section):
    enabled: bool = Field(True, description="write fitted permutations to the cache")
    reuse: bool = Field(False, description="reuse cached permutations (--reuse-perm)")
    dir: str = Field("~/.cache/icd_jax/perms", description="permutation cache folder")
    lock_timeout_s: float = Field(600.0, ge=0)

    @field_validator("dir")
    @classmethod
    def _named(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a folder, got an empty string")
        return v


class Quality(Section):
    sentences: int = Field(600, ge=2, description="labelled items quality is measured on")


#: The gate targets, one field per ``gates.DEFINITIONS`` entry (the one definition).
Gates = create_model("Gates", __base__=Section, __module__=__name__, **{
    g.field: (float, Field(g.default, description=g.doc)) for g in gates_lib.DEFINITIONS})


class Report(Section):
    html: bool = Field(True, description="write report.html")
    csv: bool = Field(True, description="write report.csv")
    stablehlo: bool = Field(True, description="export the active model to model.stablehlo")
    heatmap_max: int = Field(256, ge=8, description="heatmaps are down-sampled to this size")


class Config(Section):
    """The whole run configuration (every key has a default)."""

    pipeline: Pipeline = Pipeline()
    model: Model = Model()
    graph: Graph = Graph()
    solver: Solver = Solver()
    cost: Cost = Cost()
    transform: Transform = Transform()
    measure: Measure = Measure()
    rollback: Rollback = Rollback()
    cache: Cache = Cache()
    quality: Quality = Quality()
    gates: Gates = Gates()
    report: Report = Report()

    @model_validator(mode="after")
    def _transforms_fit_model(self):
        problems = unsupported_transforms(self) + unsupported_graph(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def unsupported_transforms(cfg: Config) -> list[str]:
    """``"key.path: why"`` for each enabled transform the model's kernels do not run."""
    name, t, out = cfg.model.name, cfg.transform, []
    if name == "minilm":
        return out
    what = {"mamba": "mamba is a state-space model with no attention KV cache",
            "custom": "a custom target runs the generic adapter, which has no KV cache "
                      "transform"}[name]
    if t.kv.enabled:
        out.append(f"transform.kv.enabled: {what}; set it to false")
    if t.sparsity.enabled and t.sparsity.kind == "ffn":
        out.append(f"transform.sparsity.kind: 'ffn' (activation-sparse FFN tile skipping) "
                   f"is not executed by {name}'s kernels; choose '2:4' or 'unstructured', or "
                   "set transform.sparsity.enabled to false")
    if name == "custom" and t.quant.enabled and t.quant.act != "none":
        out.append("transform.quant.act: a custom target's forward takes float parameters, "
                   "so its quantisation is weight-only; set act to none (and smooth_alpha "
                   "to null)")
    if name == "custom" and t.quant.enabled and t.quant.smooth_alpha is not None:
        out.append("transform.quant.smooth_alpha: a custom target's quantisation is "
                   "weight-only, with no activation scales to smooth; set smooth_alpha to "
                   "null")
    return out


#: Why iterative mode cannot run on a trace (``unsupported_graph``, ``stages``).
TRACE_ITERATIVE = (
    "graph.source: 'trace' gives W of the dense model only, and pipeline.mode 'iterative' "
    "(also what icd pair runs) rebuilds W' on the transformed model, which a fixed trace "
    "cannot give; set pipeline.mode to linear, or graph.source to activations")


def unsupported_graph(cfg: Config) -> list[str]:
    """``"key.path: why"`` when the graph source cannot give what the mode needs."""
    if cfg.graph.source == "trace" and cfg.pipeline.mode == "iterative":
        return [TRACE_ITERATIVE]
    return []


def _path(loc: Sequence) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def _problem(err: Mapping) -> str:
    """One pydantic error as ``key.path: message`` (a root-level rule's message already
    names its key paths)."""
    if err["type"] == "extra_forbidden":
        what = "unknown key"
    elif err["type"] == "value_error" and "error" in err.get("ctx", {}):
        what = str(err["ctx"]["error"])
    else:
        what = err["msg"]
    return f"{_path(err['loc'])}: {what}" if err["loc"] else what


def validate(data: Mapping) -> Config:
    """A ``Config`` from a nested dict; ``ConfigError`` naming every offending key path."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(dict(data))
    except ValidationError as e:
        problems = [_problem(err) for err in e.errors()]
        raise ConfigError("invalid config: " + "; ".join(problems)) from None


def read(path: str | os.PathLike) -> dict:
    """A config dict from a ``.json``, ``.yaml`` or ``.yml`` file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "not found"
        raise ConfigError(f"config file {what}: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - every parser error becomes a ConfigError
        raise ConfigError(f"{path}: cannot parse ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], object]:
    """``"a.b.c=value"`` -> ``(["a", "b", "c"], value)``; the value is JSON if it parses
    (numbers, true/false/null, lists), else the raw string."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"--set: bad key path {key!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return keys, value


def key_text(key, path: str) -> str:
    """A mapping key as JSON writes it (``1`` -> ``"1"``, ``True`` -> ``"true"``);
    ``ConfigError`` naming ``path`` for a key JSON cannot hold (a YAML date)."""
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int, float)):
        return json.dumps(key)
    raise ConfigError(f"invalid config: {path or '<root>'}: the key {key!r} is a "
                      f"{type(key).__name__}; keys must be strings")


def plain(value, path: str = ""):
    """A copy of ``value`` as plain JSON data (mappings, lists, str, int, finite float,
    bool, None); ``ConfigError`` naming the key path of anything else: a YAML date or
    timestamp, a set, NaN or inf (``config.lock.json`` could not record them)."""
    where = path or "<root>"
    if isinstance(value, Mapping):
        return {k: plain(v, f"{path}.{k}" if path else k)
                for k, v in ((key_text(k, path), v) for k, v in value.items())}
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"invalid config: {where}: {value} is not a finite number")
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    hint = (" (YAML reads an unquoted date as a date: quote it, or give a number)"
            if type(value).__name__ in ("date", "datetime") else "")
    raise ConfigError(f"invalid config: {where}: {value!s:.60} is a {type(value).__name__}, "
                      f"not a config value (a number, string, bool, null, list or "
                      f"mapping){hint}")


def with_overrides(data: Mapping, overrides: Sequence[str] = ()) -> dict:
    """A plain copy of ``data`` (nested dict, see ``plain``) with each ``key.path=value``
    set."""
    out = plain(dict(data))
    for item in overrides:
        keys, value = parse_override(item)
        value = plain(value, ".".join(keys))
        node = out
        for i, k in enumerate(keys[:-1]):
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(keys[:i + 1])} is not a section")
            node = nxt
        node[keys[-1]] = value
    return out


def load(source: str | os.PathLike | Mapping | None = None,
         overrides: Sequence[str] = ()) -> Config:
    """The validated config from a file path, a dict or None (defaults), plus overrides."""
    if source is None:
        data = {}
    elif isinstance(source, Config):
        data = source.model_dump(mode="json")
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        data = anchored(read(source), os.path.dirname(os.path.abspath(source)))
    return validate(with_overrides(data, overrides))


def anchored(data: dict, folder: str) -> dict:
    """``data`` with a relative ``model.target`` file path that is not found from the
    working directory but is from ``folder`` (the config file's) made absolute."""
    model = data.get("model")
    ref = model.get("target") if isinstance(model, dict) else None
    if not isinstance(ref, str) or ":" not in ref:
        return data
    file, factory = ref.rsplit(":", 1)
    if not file.endswith(".py") or os.path.isabs(file) or os.path.exists(file):
        return data
    there = os.path.join(folder, file)
    if not os.path.exists(there):
        return data
    return {**data, "model": {**model, "target": f"{there}:{factory}"}}


def resolved(cfg: Config) -> dict:
    """Every key with its value (what ``config.lock.json`` records)."""
    return cfg.model_dump(mode="json")


def digest(payload) -> str:
    """SHA-256 of canonical JSON (sorted keys), hex."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def schema() -> dict:
    """The JSON schema of ``Config`` (``icd run --print-schema``)."""
    return Config.model_json_schema()
