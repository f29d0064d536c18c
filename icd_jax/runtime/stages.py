"""The pipeline's state machine: stages, events, the permutation cache and rollback.

``READY -> W_BUILT -> PERMUTED -> TRANSFORMED -> REPERMUTED -> MEASURED -> REPORTED``;
linear mode skips ``REPERMUTED``. A failing stage (after its retries, for transient
errors) leads to ``ROLLBACK(pi_prev) -> REPORTED``: the last good order becomes
``perm_active.json`` and the report says what failed. Each stage appends one JSONL event
``{stage, t_start, t_end, ok, meta}``; every artefact is written atomically. What is
measured lives in ``measurement``, what the numbers mean in ``gates``. See
docs/pipeline.md for the arms and files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping

import numpy as np
from filelock import FileLock, Timeout

from icd_jax import graph as graph_lib
from icd_jax import permute
from icd_jax.adapters.meta import jsonable
from icd_jax.errors import ConfigError, ICDError, RunLockedError, StageError, TraceError
from icd_jax.runtime import artifacts, gates, graph_sources, targets
from icd_jax.runtime import config as config_lib
from icd_jax.runtime.arms import Arm
from icd_jax.runtime.environment import environment
from icd_jax.runtime.fitting import fit, mean_cost
from icd_jax.runtime.measurement import Measurement
from icd_jax.runtime.permcache import FIT_STATS, PermCache
from icd_jax.runtime.records import Metrics
from icd_jax.runtime.runfiles import FILES, STATS, file_path

log = logging.getLogger("icd")

STAGES = ("READY", "W_BUILT", "PERMUTED", "TRANSFORMED", "REPERMUTED", "MEASURED",
          "REPORTED")
#: Errors worth retrying: the world hiccuped (I/O, a busy device), not the input.
TRANSIENT = (TimeoutError, BlockingIOError, InterruptedError, ConnectionError)
ARMS = ("dense", "identity", "before", "after")


@dataclasses.dataclass(frozen=True)
class RunArtifacts:
    """What a run left: its folder, final state, active arm and file paths."""

    out_dir: str
    ok: bool
    state: str
    active: str
    rolled_back: bool
    failed_stage: str | None
    files: dict
    metrics: dict

    def path(self, key: str) -> str:
        return file_path(self.out_dir, key)


class EventLog:
    """Appends stage events to ``events.jsonl`` and times its own cost."""

    def __init__(self, path: str):
        self.path, self.overhead_s, self.count = path, 0.0, 0

    def emit(self, stage: str, t_start: float, t_end: float, ok: bool, meta: dict) -> None:
        t0 = time.perf_counter()
        artifacts.append_event(self.path, dict(stage=stage, t_start=t_start, t_end=t_end,
                                               ok=ok, meta=meta))
        self.overhead_s += time.perf_counter() - t0
        self.count += 1


class Run:
    """One pipeline run in ``out_dir`` (see ``orchestrator.run``)."""

    def __init__(self, cfg: config_lib.Config, out_dir: str, *, reuse_perm: bool = False,
                 inject: Mapping[str, BaseException] | None = None,
                 pair_repeats: int | None = None, log_fn: Callable[[str], None] | None = None,
                 target=None):
        self.cfg, self.out = cfg, os.path.abspath(out_dir)
        self.t = target
        self.inject = dict(inject or {})
        self.say = log_fn or (lambda m: log.info(m))
        self.cache = PermCache(cfg.cache, reuse_perm or cfg.cache.reuse)
        self.repeats = max(cfg.pipeline.repeats, pair_repeats or 0)
        self.events = EventLog(self.file("events"))
        self.perms: dict[str, dict[str, np.ndarray]] = {"identity": {}}
        self.good = "identity"
        self.arms: dict[str, Arm] = {}
        self.graphs: dict[str, dict[str, graph_lib.CoAccessGraph]] = {}
        self.stats: dict[str, dict] = {}
        self.metrics: dict = {}
        self.warnings: list[str] = []
        self.failed: tuple[str, str] | None = None
        self.rollback: dict = dict(happened=False, reason=None, to=None, **{"from": None})
        self.model_id: dict = {}

    # -- plumbing ---------------------------------------------------------------------
    def file(self, key: str) -> str:
        return file_path(self.out, key)

    def state(self, name: str, **extra) -> None:
        artifacts.write_json(self.file("state"), dict(state=name, t=time.time(), **extra))

    def stage(self, name: str, fn: Callable[[], dict | None]) -> None:
        """Run one stage with retries on transient errors; emit its event."""
        t_start = time.time()
        attempt, p = 0, self.cfg.pipeline
        while True:
            attempt += 1
            try:
                if name in self.inject:
                    raise self.inject.pop(name)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    meta = fn() or {}
                for w in caught:
                    self.warnings.append(f"{name}: {w.category.__name__}: {w.message}")
                    log.warning("%s: %s", name, w.message)
                break
            except TRANSIENT as e:
                if attempt <= p.retries:
                    delay = p.retry_backoff_s * 2 ** (attempt - 1)
                    self.say(f"{name}: transient {type(e).__name__} ({e}); retry {attempt} "
                             f"in {delay:.2f} s")
                    time.sleep(delay)
                    continue
                self.fail(name, t_start, e, attempt)
            except KeyboardInterrupt:
                self.events.emit(name, t_start, time.time(), False,
                                 dict(error="interrupted", attempts=attempt))
                self.state("INTERRUPTED", stage=name)
                raise
            except Exception as e:  # noqa: BLE001 - every failure goes to ROLLBACK
                self.fail(name, t_start, e, attempt)
        meta = dict(meta, attempts=attempt)
        self.events.emit(name, t_start, time.time(), True, meta)
        self.state(name)
        self.say(f"{name} ({time.time() - t_start:.1f} s)")

    def fail(self, name: str, t_start: float, e: BaseException, attempts: int):
        msg = f"{type(e).__name__}: {e}"
        self.events.emit(name, t_start, time.time(), False, dict(error=msg, attempts=attempts))
        self.failed = (name, msg)
        raise StageError(f"stage {name} failed: {msg}", name) from e

    # -- stages -----------------------------------------------------------------------
    def ready(self) -> dict:
        env = environment()
        resolved = config_lib.resolved(self.cfg)
        artifacts.write_json(self.file("lock"), dict(
            config=resolved, config_hash=config_lib.digest(resolved), env=env,
            env_hash=config_lib.digest(env)))
        self.t = self.t or targets.make(self.cfg)
        self.model_id = self.t.model_id()
        self.perms["identity"] = self.t.identity()
        return dict(model=self.model_id, tokens_timed=self.t.tokens, axes=self.t.axes)

    def build_graphs(self, arm: Arm | None) -> dict[str, graph_lib.CoAccessGraph]:
        """W per co-designed axis: of the dense model (``arm`` None) or of ``arm`` (W');
        a trace gives only the dense model's (the config rejects trace + iterative)."""
        g = self.cfg.graph
        if g.source == "activations":
            acts = self.t.activations(arm, show_progress=True)
            return {ax: graph_lib.build_w("activations", acts=a, topk=g.topk, hub=g.hub)
                    for ax, a in acts.items()}
        if g.source == "trace":
            if arm is not None:
                raise ConfigError(config_lib.TRACE_ITERATIVE)
            try:
                return graph_sources.from_trace(g.trace_path, self.t.size, self.t.axes)
            except (TraceError, ICDError) as e:
                if not g.fallback_mock:
                    raise
                self.warnings.append(f"W_BUILT: trace unusable ({e}); fell back to mock")
                self.say(f"trace unusable ({e}); graph.fallback_mock: using a planted mock W")
        return graph_sources.planted(self.t.size, self.t.axes, self.cfg.pipeline.seed)

    def fit_all(self, graphs: dict, stage: str, extra_key: dict) -> tuple[dict, dict]:
        perms, stats, hits = {}, {}, 0
        for ax, g in graphs.items():
            key = dict(model=self.model_id, graph=g.meta, w=graph_lib.content_hash(g.csr),
                       solver=self.cfg.solver.model_dump(), cost=self.cfg.cost.model_dump(),
                       seed=self.cfg.pipeline.seed, **extra_key)
            pi, st, hit = self.cache.get_or_fit(key, lambda g=g: fit(g.csr, self.cfg),
                                                size=g.csr.shape[0], stats=FIT_STATS)
            hits += hit
            perms[ax], stats[ax] = pi, st
            self.say(f"  {stage} {ax}: C {st['C_identity']:.4f} -> {st['C']:.4f}, "
                     f"Q {st['Q_identity']:.4f} -> {st['Q']:.4f}"
                     + (" (cached)" if hit else f" ({st['elapsed_s']:.1f} s"
                        + (", budget hit" if st.get("timed_out") else "") + ")"))
        return perms, dict(stats=stats, cache_hits=hits)

    def save_graphs(self, key: str, graphs: dict) -> None:
        artifacts.save_graphs(self.file(key), {k: g.csr for k, g in graphs.items()})

    def w_built(self) -> dict:
        graphs = self.build_graphs(None)
        self.graphs["before"] = graphs
        self.save_graphs("w", graphs)
        artifacts.write_json(self.file("w_meta"), {k: g.meta for k, g in graphs.items()})
        return dict(source=self.cfg.graph.source, axes=len(graphs),
                    nnz=int(sum(g.csr.nnz for g in graphs.values())))

    def fitted(self, stage: str, arm: str, perms: dict, info: dict) -> None:
        """Record the orders of ``arm`` fitted by ``stage`` (they become the last good)."""
        self.perms[arm] = perms
        self.stats[stage] = info["stats"]
        artifacts.save_perms(self.file(f"perm_{arm}"), perms, dict(stage=stage.upper()))
        artifacts.write_json(self.file(STATS[stage]), info["stats"])
        self.good = arm

    def permuted(self) -> dict:
        pis, info = self.fit_all(self.graphs["before"], "pi0", {})
        self.fitted("permuted", "before", dict(self.t.identity(), **pis), info)
        return dict(cache_hits=info["cache_hits"], timed_out=[
            a for a, s in info["stats"].items() if s.get("timed_out")], **mean_cost(
            info["stats"]))

    def transformed(self) -> dict:
        tc = self.cfg.transform
        self.arms["dense"] = self.t.dense_arm()
        self.arms["identity"] = self.t.arm("identity", self.t.identity(), tc)
        self.arms["before"] = self.t.arm("before", self.perms["before"], tc)
        meta = self.arms["before"].meta
        failed = [k for k, m in meta.items() if not m.get("ok", True)]
        return dict(transforms={k: dict(ok=m.get("ok", True), settings=m.get("settings"))
                                for k, m in meta.items()}, failed=failed)

    def repermuted(self) -> dict:
        graphs = self.build_graphs(self.arms["before"])
        self.graphs["after"] = graphs
        self.save_graphs("w_after", graphs)
        pis, info = self.fit_all(graphs, "pi1", dict(
            transform=self.cfg.transform.model_dump(), base=config_lib.digest(
                {k: v.tolist() for k, v in self.perms["before"].items()})))
        after = permute.compose(self.perms["before"], pis)
        self.fitted("repermuted", "after", after, info)
        self.arms["after"] = self.t.arm("after", after, self.cfg.transform)
        return dict(cache_hits=info["cache_hits"], **mean_cost(info["stats"]))

    def measured(self) -> dict:
        bench = Measurement(self.cfg, self.t, self.arms, self.repeats, self.out, self.say)
        self.metrics = m = bench.run()
        self.warnings += bench.warnings
        return dict(arms=m["arms"], **{f"mean_ms_{a}": m["latency"][a]["mean_ms"]
                                       for a in m["arms"]})

    # -- decisions --------------------------------------------------------------------
    def decide(self) -> str:
        """The active arm: the candidate unless it regressed against the previous layout
        beyond the rollback tolerances (then ``ROLLBACK`` restores pi_prev)."""
        cand = "after" if "after" in self.arms else "before"
        prev = "before" if cand == "after" else "identity"
        rb = self.cfg.rollback
        reasons, notes = gates.regressions(rb, self.metrics, cand, prev)
        self.warnings += notes
        if reasons and rb.enabled:
            self.rollback = dict(happened=True, reason="; ".join(reasons), to=prev,
                                 **{"from": cand})
            t0 = time.time()
            self.events.emit("ROLLBACK", t0, time.time(), True, dict(self.rollback))
            self.say(f"ROLLBACK {cand} -> {prev}: {self.rollback['reason']}")
            return prev
        if reasons:
            self.warnings.append(f"regression kept (rollback.enabled=false): {reasons}")
        return cand

    # -- the whole thing ---------------------------------------------------------------
    def execute(self, force: bool = False) -> RunArtifacts:
        """Run the pipeline in ``self.out``: a folder holding files no run wrote is
        refused (``ArtifactError``) unless ``force`` (``artifacts.prepare_run_dir``)."""
        artifacts.prepare_run_dir(self.out, force)
        lock = FileLock(self.file("run_lock"), timeout=0)
        try:
            lock.acquire()
        except Timeout as e:
            raise RunLockedError(f"run directory {self.out} is in use by another run") from e
        try:
            return self.run_stages()
        finally:
            lock.release()

    def run_stages(self) -> RunArtifacts:
        t_run = time.perf_counter()
        self.restart_cleanly()
        plan = [("READY", self.ready), ("W_BUILT", self.w_built), ("PERMUTED", self.permuted),
                ("TRANSFORMED", self.transformed)]
        if self.cfg.pipeline.mode == "iterative":
            plan.append(("REPERMUTED", self.repermuted))
        plan.append(("MEASURED", self.measured))
        try:
            for name, fn in plan:
                self.stage(name, fn)
            active = self.decide()
        except StageError as e:
            active = self.good
            t0 = time.time()
            self.rollback = dict(happened=True, reason=str(e), to=active, **{"from": None})
            self.events.emit("ROLLBACK", t0, time.time(), True, dict(
                to=active, failed_stage=e.stage, error=str(e)))
            self.say(f"ROLLBACK to {active}: {e}")
        artifacts.save_perms(self.file("perm_active"), self.perms[active], dict(arm=active))
        self.finish(active, t_run)
        try:
            self.stage("REPORTED", lambda: self.reported())
        except StageError as e:  # metrics.json is written; the report is what failed
            self.say(f"REPORTED failed: {e}")
        return RunArtifacts(self.out, self.failed is None, "REPORTED", active,
                            self.rollback["happened"],
                            self.failed[0] if self.failed else None,
                            {k: self.file(k) for k in FILES if os.path.exists(self.file(k))},
                            self.metrics)

    def restart_cleanly(self) -> None:
        """Archive an unfinished previous run here (``artifacts.archive_unfinished``)."""
        artifacts.archive_unfinished(self.out, self.say)

    def finish(self, active: str, t_run: float) -> None:
        """Complete and write ``metrics.json``: gates, verdict, fallbacks, run facts."""
        m = self.metrics
        m.setdefault("arms", [a for a in ARMS if a in self.arms])
        for key in ("latency", "quality", "tiles_per_token", "lines_per_token",
                    "l2_hit_pct_sim", "l2_hit_pct", "ept_j_per_tok"):
            m.setdefault(key, None)
        m.setdefault("l2_hit_pct_reason", "not measured: the run stopped before MEASURED")
        m.setdefault("ept_reason", "not measured: the run stopped before MEASURED")
        m["active"] = active
        arm = self.arms.get("after" if "after" in self.arms else "before")
        m["transforms"] = arm.meta if arm is not None else {}
        m["fallbacks"] = gates.fallbacks(m["transforms"])
        for f in m["fallbacks"]:
            self.say(f"FALLBACK: {f}")
            self.warnings.append(f"TRANSFORMED: fallback: {f}")
        m["effects"] = gates.effects(m, active)
        m["gates"] = gates.evaluate(self.cfg.gates, m, active)
        m["verdict"] = gates.verdict(m["gates"])
        m["rollback"] = self.rollback
        m["cost"] = {k: mean_cost(v) for k, v in self.stats.items()}
        m["cost"].setdefault("repermuted", None)
        elapsed = time.perf_counter() - t_run
        lock = artifacts.read_json(self.file("lock")) if os.path.exists(self.file("lock")) \
            else {}
        m["run"] = dict(model=self.cfg.model.name, size=None if self.cfg.model.target
                        else self.cfg.model.size, target=self.cfg.model.target,
                        mode=self.cfg.pipeline.mode, seed=self.cfg.pipeline.seed,
                        config_hash=lock.get("config_hash"), env_hash=lock.get("env_hash"),
                        elapsed_s=elapsed, tokens=self.t.tokens if self.t else None,
                        failed_stage=self.failed[0] if self.failed else None,
                        error=self.failed[1] if self.failed else None)
        m["events"] = dict(count=self.events.count + 1, overhead_s=self.events.overhead_s,
                           overhead_pct=100.0 * self.events.overhead_s / max(elapsed, 1e-9))
        m["warnings"] = self.warnings
        # the typed record checks what is written (a bug here fails loudly, not the report)
        self.metrics = Metrics.parse(jsonable(m)).dump()
        artifacts.write_json(self.file("metrics"), self.metrics)

    def late_warning(self, msg: str) -> None:
        """A warning after ``finish`` wrote ``metrics.json``: said on the console, added to
        the run's and the metrics' ``warnings`` and ``metrics.json`` rewritten, so that the
        report (built from it next) lists it too."""
        self.say(f"WARNING: {msg}")
        self.warnings.append(msg)
        listed = self.metrics.setdefault("warnings", [])
        if listed is not self.warnings:
            listed.append(msg)
        artifacts.write_json(self.file("metrics"), self.metrics)

    def reported(self) -> dict:
        out: dict = {}
        if self.cfg.report.stablehlo and self.t is not None:
            from icd_jax.runtime import export

            try:
                out["stablehlo"] = export.export_run(self.t, self.file("perm_active"),
                                                     self.file("stablehlo"), self.metrics)
            except Exception as e:  # noqa: BLE001 - the report still gets written
                first = (str(e).splitlines() or [""])[0][:300]
                self.late_warning(f"REPORTED: StableHLO export failed ({type(e).__name__}: "
                                  f"{first}); no {FILES['stablehlo']} was written")
                out["stablehlo_error"] = str(e)
        if self.cfg.report.html or self.cfg.report.csv:
            from icd_jax.runtime import report

            out["report"] = report.build(self.out, html_page=self.cfg.report.html,
                                         csv_table=self.cfg.report.csv)
        return out
