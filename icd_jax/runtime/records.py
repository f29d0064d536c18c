"""Typed records of a run: ``metrics.json`` as pydantic models.

``Metrics`` describes the file exactly as the orchestrator writes it (``Run.measured``,
``measure_layout``, ``measure_hardware``, ``finish``; gates from ``gates.gate``).
Sections that mix fixed keys with one entry per arm (``latency``, ``quality``,
``tiles_per_token``, ``lines_per_token``, ``l2_hit_pct_sim``) keep the arms as typed
pydantic extras; their ``arms()`` returns those entries. Unknown top-level keys and
wrong-typed values are refused: ``Metrics.load(path)`` raises ``ArtifactError`` naming
the file and the key. Diagnostic blobs (transforms, host probe, effects, events) stay
loosely typed. ``Metrics.dump()`` returns the JSON-ready dict with the keys that were
read (or set), so a load / dump round trip is the identity.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from icd_jax.errors import ArtifactError
from icd_jax.runtime import artifacts

#: A JSON number (int or float; never a bool).
Num = int | float
def ci_bounds(ci) -> tuple[float, float] | None:
    """``(lo, hi)`` of a ``ci95_ms`` pair, or None where there is no interval (one repeat
    gives NaN in memory and None in ``metrics.json``)."""
    if not (isinstance(ci, (list, tuple)) and len(ci) == 2):
        return None
    lo, hi = ci
    ok = all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)
             for c in ci)
    return (float(lo), float(hi)) if ok else None


#: A gate's status (``gates.gate``).
Status = Literal["met", "not met", "not measured"]



class Record(BaseModel):
    """A fixed-key record: unknown keys refused, no type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    def dump(self) -> dict:
        """The JSON-ready dict: the keys that were read or set, by their JSON names."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


class ArmRecord(Record):
    """A record with fixed keys plus one typed entry per arm (pydantic extras)."""

    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)

    def arms(self) -> dict[str, Any]:
        """The per-arm entries, in file order."""
        return dict(self.__pydantic_extra__ or {})


class Loose(BaseModel):
    """A diagnostic record: typed known keys, anything else kept as is."""

    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)


# -- per-arm sections ---------------------------------------------------------------------
class ArmLatency(Loose):
    """``measure.summarize``: one arm's timed calls (ms)."""

    mean_ms: Num
    p50_ms: Num | None = None
    p95_ms: Num | None = None
    ci95_ms: list[Num | None] | None = None
    samples_ms: list[Num] | None = None
    n: int | None = None
    tokens: int | None = None
    tokens_per_s: Num | None = None


class Latency(ArmRecord):
    """``latency``: how it was timed, why it is degraded, and one entry per arm."""

    __pydantic_extra__: dict[str, ArmLatency] = Field(init=False)
    method: str | None = None
    degraded: str | None = None

    def arms(self) -> dict[str, ArmLatency]:
        return dict(self.__pydantic_extra__ or {})


class ArmQuality(Loose):
    """One arm's quality (``Target.quality``): the score and its drop vs dense (pp);
    further diagnostics are target-specific."""

    value: Num | None = None
    drop_pp: Num | None = None


class Quality(ArmRecord):
    """``quality``: the metric, its sense and unit, and one entry per arm."""

    __pydantic_extra__: dict[str, ArmQuality] = Field(init=False)
    metric: str | None = None
    higher_is_better: bool | None = None
    unit: str | None = None
    reason: str | None = None

    def arms(self) -> dict[str, ArmQuality]:
        return dict(self.__pydantic_extra__ or {})


class Tiles(ArmRecord):
    """``tiles_per_token``: tile rows, tiles in all, calls counted, and tiles per arm."""

    __pydantic_extra__: dict[str, Num | None] = Field(init=False)
    tile: int | None = None
    of: Num | None = None
    calls: int | None = None
    unit: str | None = None

    def arms(self) -> dict[str, Num | None]:
        return dict(self.__pydantic_extra__ or {})


class Lines(ArmRecord):
    """``lines_per_token``: the cache line size and cache lines per arm."""

    __pydantic_extra__: dict[str, Num | None] = Field(init=False)
    line_bytes: int | None = None

    def arms(self) -> dict[str, Num | None]:
        return dict(self.__pydantic_extra__ or {})


class SimL2(ArmRecord):
    """``l2_hit_pct_sim``: the simulated cache, what was replayed, and hit % per arm."""

    __pydantic_extra__: dict[str, Num | None] = Field(init=False)
    cache: dict[str, Any] | None = None
    what: str | None = None

    def arms(self) -> dict[str, Num | None]:
        return dict(self.__pydantic_extra__ or {})


# -- run-level records --------------------------------------------------------------------
class Gate(Record):
    """One gate (``gates.gate`` plus what ``Run.gates`` and ``fallback_gates`` add)."""

    target: Num | str | None = None
    value: Num | None = None
    unit: str | None = None
    status: Status
    reason: str | None = None
    measured_status: Status | None = None
    simulated_value: Num | None = None
    p_vs_dense: Num | None = None
    significant_loss: bool | None = None
    ci95_disjoint: bool | None = None


class Verdict(Record):
    """``gates.verdict``: gate names by status and a one-line summary."""

    met: list[str] = []
    not_met: list[str] = []
    not_measured: list[str] = []
    summary: str | None = None


class Rollback(Record):
    """Whether the run rolled back, from which arm to which, and why."""

    happened: bool = False
    reason: str | None = None
    to: str | None = None
    from_: str | None = Field(None, alias="from")


class CostSummary(Record):
    """``orchestrator.mean_cost``: mean C and Q over axes (empty without stats)."""

    C: Num | None = None
    Q: Num | None = None
    C_identity: Num | None = None
    Q_identity: Num | None = None


class RunInfo(Loose):
    """``run``: what ran, where it came from and how long it took."""

    model: str | None = None
    size: str | None = None
    mode: str | None = None
    seed: int | None = None
    config_hash: str | None = None
    env_hash: str | None = None
    elapsed_s: Num | None = None
    tokens: int | None = None
    failed_stage: str | None = None
    error: str | None = None


class Metrics(Record):
    """``metrics.json``."""

    arms: list[str]
    active: str
    latency: Latency | None = None
    quality: Quality | None = None
    quality_reason: str | None = None
    quality_samples: dict[str, list[Num | bool] | None] | None = None
    tiles_per_token: Tiles | None = None
    tiles_per_token_reason: str | None = None
    tiles_per_token_samples: dict[str, list[Num]] | None = None
    lines_per_token: Lines | None = None
    lines_per_token_reason: str | None = None
    l2_hit_pct_sim: SimL2 | None = None
    l2_hit_pct_sim_reason: str | None = None
    l2_hit_pct: dict[str, Num | None] | None = None
    l2_hit_pct_reason: str | None = None
    ept_j_per_tok: dict[str, Num | None] | None = None
    ept_reason: str | None = None
    host_probe: dict[str, Any] | None = None
    degraded: list[str] | None = None
    transforms: dict[str, dict[str, Any]] = {}
    fallbacks: list[str] = []
    effects: dict[str, Any] = {}
    gates: dict[str, Gate] = {}
    verdict: Verdict | None = None
    rollback: Rollback | None = None
    cost: dict[str, CostSummary | None] = {}
    run: RunInfo | None = None
    events: dict[str, Any] = {}
    warnings: list[str] = []

    @classmethod
    def parse(cls, blob: Mapping, name: str = "metrics") -> Metrics:
        """``blob`` validated; ``ArtifactError`` naming ``name`` and the bad keys."""
        if not isinstance(blob, Mapping):
            raise ArtifactError(f"{name}: expected a JSON object, got {type(blob).__name__}")
        return validate(cls, blob, name)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Metrics:
        """``metrics.json`` at ``path``; ``ArtifactError`` naming the file if it is
        missing, not JSON or not a run's metrics."""
        return cls.parse(artifacts.read_json(path), os.fspath(path))


def validate(model: type[BaseModel], blob: Any, name: str):
    """``model.model_validate(blob)``; ``ArtifactError`` naming ``name`` and each bad
    key path with its value."""
    try:
        return model.model_validate(blob)
    except ValidationError as e:
        raise ArtifactError(f"{name}: " + describe(e.errors())) from None


#: Location parts pydantic adds for the members of a union (not keys of the file).
UNION_TAGS = ("int", "float", "str", "bool", "none", "list", "dict")


def describe(errors: Sequence[Mapping], limit: int = 5) -> str:
    """Pydantic errors as ``key.path: message (got value)``, one per key path (a
    union's per-member errors merged), at most ``limit``."""
    by_path: dict[str, list[str]] = {}
    got: dict[str, str] = {}
    for err in errors:
        where = key_path(strip_union_tags(err.get("loc") or ()))
        msg = "unknown key" if err.get("type") == "extra_forbidden" else err.get("msg", "")
        by_path.setdefault(where, [])
        if msg not in by_path[where]:
            by_path[where].append(msg)
        value = repr(err.get("input"))
        got.setdefault(where, value if len(value) <= 80 else value[:77] + "...")
    return "; ".join(f"{w}: {' or '.join(m)} (got {got[w]})"
                     for w, m in list(by_path.items())[:limit])


def strip_union_tags(loc: Sequence) -> tuple:
    """``loc`` without union-member tags (``list[...]`` anywhere, ``int`` at the end)."""
    out = [p for p in loc if not (isinstance(p, str) and "[" in p)]
    while out and out[-1] in UNION_TAGS:
        out.pop()
    return tuple(out)


def key_path(loc: Sequence) -> str:
    """A pydantic error location as a dotted key path (``<root>`` when empty)."""
    return ".".join(str(p) for p in loc) or "<root>"
