"""The pipeline's state machine: stages, events, the permutation cache and rollback.

``READY -> W_BUILT -> PERMUTED -> TRANSFORMED -> REPERMUTED -> MEASURED -> REPORTED``;
linear mode skips ``REPERMUTED``. A failing stage (after its retries, for transient
errors) leads to ``ROLLBACK(pi_prev) -> REPORTED``: the last good order becomes
``perm_active.json`` and the report says what failed. Each stage appends one JSONL event
``{stage, t_start, t_end, ok, meta}``; every artefact is written atomically. See
docs/pipeline.md for the arms and files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import scipy.sparse as sp
from filelock import FileLock, Timeout

from icd_jax import cost as cost_lib
from icd_jax import graph as graph_lib
from icd_jax import permute, solver
from icd_jax.errors import ICDError, RunLockedError, StageError, TraceError
from icd_jax.runtime import artifacts, cachesim, hostprobe, measure, targets
from icd_jax.runtime import config as config_lib
from icd_jax.runtime.artifacts import FILES
from icd_jax.runtime.compare import arm_summary, compare_modes  # noqa: F401 (public here too)
from icd_jax.runtime.environment import environment
from icd_jax.runtime.gates import (  # noqa: F401 (public here too)
    effects,
    fallback_gates,
    fallbacks,
    fmt_p,
    gate,
    quality_p_value,
    verdict,
)
from icd_jax.runtime.permcache import PermCache

log = logging.getLogger("icd")

STAGES = ("READY", "W_BUILT", "PERMUTED", "TRANSFORMED", "REPERMUTED", "MEASURED",
          "REPORTED")
#: Errors worth retrying: the world hiccuped (I/O, a busy device), not the input.
TRANSIENT = (TimeoutError, BlockingIOError, InterruptedError, ConnectionError)


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
        return os.path.join(self.out_dir, FILES[key])


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


def fit(csr: sp.csr_matrix, cfg: config_lib.Config, pi_prev=None) -> tuple[np.ndarray, dict]:
    """``fit_permutation`` with the run's settings; ``timed_out`` flags a search the time
    budget cut short (the best order so far is returned)."""
    c = cfg.cost
    cost_cfg = cost_lib.CostConfig(g=c.g, lam=c.lam, tau=c.tau, k_blocks=c.k_blocks,
                                   alpha=c.alpha, mu=c.mu, beta=c.beta)
    s = cfg.solver
    pi, st = solver.fit_permutation(csr, time_budget_s=s.time_budget_s,
                                    refine_steps=s.refine_steps, k_blocks=s.k_blocks,
                                    seed=cfg.pipeline.seed, cfg=cost_cfg, pi_prev=pi_prev)
    ident = cost_lib.objective(csr, np.arange(csr.shape[0]), cost_cfg)
    st = dict(st, timed_out=bool(st["iters"] < s.refine_steps), C_identity=ident["C"],
              Q_identity=ident["Q"], J_identity=ident["J"])
    return pi, st


def tiles_per_token(active: list[np.ndarray], tile: int) -> np.ndarray:
    """Distinct tiles of ``tile`` consecutive stored positions touched per token, summed
    over layers: ``int[tokens]``."""
    return np.asarray(sum(cachesim.active_tiles(a, np.arange(a.shape[1]), tile).sum(1)
                          for a in active))


class Run:
    """One pipeline run in ``out_dir`` (see ``run``)."""

    def __init__(self, cfg: config_lib.Config, out_dir: str, *, reuse_perm: bool = False,
                 inject: Mapping[str, BaseException] | None = None,
                 pair_repeats: int | None = None, log_fn: Callable[[str], None] | None = None,
                 target=None):
        self.cfg, self.out = cfg, os.path.abspath(out_dir)
        self.given_target = target
        self.inject = dict(inject or {})
        self.say = log_fn or (lambda m: log.info(m))
        self.cache = PermCache(cfg.cache, reuse_perm or cfg.cache.reuse)
        self.repeats = max(cfg.pipeline.repeats, pair_repeats or 0)
        self.events = EventLog(os.path.join(self.out, FILES["events"]))
        self.good: tuple[str, dict] = ("identity", {})
        self.arms: dict[str, targets.Arm] = {}
        self.graphs: dict[str, dict] = {}
        self.stats: dict[str, dict] = {}
        self.metrics: dict = {}
        self.warnings: list[str] = []
        self.failed: tuple[str, str] | None = None
        self.rollback: dict = dict(happened=False, reason=None, to=None)
        self.iterative = cfg.pipeline.mode == "iterative"

    # -- plumbing ---------------------------------------------------------------------
    def file(self, key: str) -> str:
        return os.path.join(self.out, FILES[key])

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
        self.t = self.given_target or targets.make(self.cfg)
        self.model_id = self.t.model_id()
        return dict(model=self.model_id, tokens_timed=self.t.tokens, axes=self.t.axes)

    def build_graphs(self, arm: targets.Arm | None) -> dict[str, graph_lib.CoAccessGraph]:
        g = self.cfg.graph
        if g.source == "activations":
            acts = self.t.activations(arm, show_progress=True)
            return {ax: graph_lib.build_w("activations", acts=a, topk=g.topk, hub=g.hub)
                    for ax, a in acts.items()}
        if g.source == "trace" and arm is None:
            try:
                if not g.trace_path:
                    raise TraceError("graph.source is 'trace' but graph.trace_path is not set")
                w = graph_lib.build_w("trace", path=g.trace_path, D=self.t.size)
                if w.csr.nnz == 0:
                    raise TraceError(f"trace {g.trace_path} holds no edges")
                return {ax: w for ax in self.t.axes}
            except (TraceError, ICDError) as e:
                if not g.fallback_mock:
                    raise
                self.warnings.append(f"W_BUILT: trace unusable ({e}); fell back to mock")
                self.say(f"trace unusable ({e}); graph.fallback_mock: using a planted mock W")
        seed = self.cfg.pipeline.seed
        return {ax: graph_lib.build_w("mock", D=self.t.size, blocks=max(2, self.t.size // 64),
                                      seed=seed + i) for i, ax in enumerate(self.t.axes)}

    def w_built(self) -> dict:
        graphs = self.build_graphs(None)
        self.graphs["before"] = graphs
        artifacts.save_graphs(self.file("w"), {k: g.csr for k, g in graphs.items()})
        artifacts.write_json(self.file("w_meta"), {k: g.meta for k, g in graphs.items()})
        return dict(source=self.cfg.graph.source, axes=len(graphs),
                    nnz=int(sum(g.csr.nnz for g in graphs.values())))

    def fit_all(self, graphs: dict, stage: str, extra_key: dict) -> tuple[dict, dict]:
        perms, stats, hits = {}, {}, 0
        for ax, g in graphs.items():
            key = dict(model=self.model_id, graph=g.meta, w=graph_lib.content_hash(g.csr),
                       solver=self.cfg.solver.model_dump(), cost=self.cfg.cost.model_dump(),
                       seed=self.cfg.pipeline.seed, **extra_key)
            pi, st, hit = self.cache.get_or_fit(key, lambda g=g: fit(g.csr, self.cfg))
            hits += hit
            perms[ax], stats[ax] = pi, st
            self.say(f"  {stage} {ax}: C {st['C_identity']:.4f} -> {st['C']:.4f}, "
                     f"Q {st['Q_identity']:.4f} -> {st['Q']:.4f}"
                     + (" (cached)" if hit else f" ({st['elapsed_s']:.1f} s"
                        + (", budget hit" if st.get("timed_out") else "") + ")"))
        return perms, dict(stats=stats, cache_hits=hits)

    def permuted(self) -> dict:
        pis, info = self.fit_all(self.graphs["before"], "pi0", {})
        perms = dict(self.t.identity(), **pis)
        self.perms_before = perms
        self.stats["permuted"] = info["stats"]
        artifacts.save_perms(self.file("perm_before"), perms, dict(stage="PERMUTED"))
        artifacts.write_json(os.path.join(self.out, "stats_permuted.json"), info["stats"])
        self.good = ("before", perms)
        return dict(cache_hits=info["cache_hits"], timed_out=[
            a for a, s in info["stats"].items() if s.get("timed_out")], **mean_cost(
            info["stats"]))

    def transformed(self) -> dict:
        tc = self.cfg.transform
        self.arms["dense"] = self.t.dense_arm()
        self.arms["identity"] = self.t.arm("identity", self.t.identity(), tc)
        self.arms["before"] = self.t.arm("before", self.perms_before, tc)
        meta = self.arms["before"].meta
        failed = [k for k, m in meta.items() if not m.get("ok", True)]
        return dict(transforms={k: dict(ok=m.get("ok", True), settings=m.get("settings"))
                                for k, m in meta.items()}, failed=failed)

    def repermuted(self) -> dict:
        graphs = self.build_graphs(self.arms["before"])
        self.graphs["after"] = graphs
        artifacts.save_graphs(self.file("w_after"), {k: g.csr for k, g in graphs.items()})
        pis, info = self.fit_all(graphs, "pi1", dict(
            transform=self.cfg.transform.model_dump(), base=config_lib.digest(
                {k: v.tolist() for k, v in self.perms_before.items()})))
        after = permute.compose(self.perms_before, pis)
        self.perms_after = after
        self.stats["repermuted"] = info["stats"]
        artifacts.save_perms(self.file("perm_after"), after, dict(stage="REPERMUTED"))
        artifacts.write_json(os.path.join(self.out, "stats_repermuted.json"), info["stats"])
        self.arms["after"] = self.t.arm("after", after, self.cfg.transform)
        self.good = ("after", after)
        return dict(cache_hits=info["cache_hits"], **mean_cost(info["stats"]))

    def measured(self) -> dict:
        cfg, t = self.cfg, self.t
        names = [a for a in ("dense", "identity", "before", "after") if a in self.arms]
        fns = {a: t.call(self.arms[a]) for a in names}
        m: dict = dict(arms=names)
        self.say(f"timing {len(names)} arms x {self.repeats} interleaved rounds on "
                 f"{t.tokens} tokens")
        step = max(1, self.repeats // 5)
        samples = measure.interleaved(
            fns, self.repeats, cfg.pipeline.warmup,
            progress=lambda r, n: self.say(f"  round {r}/{n}") if r % step == 0 else None)
        lat = {a: measure.summarize(s, t.tokens) for a, s in samples.items()}
        lat["method"] = (f"wall-clock per call of the timed set ({t.tokens} tokens), "
                         f"block_until_ready, {cfg.pipeline.warmup} warmup calls excluded, "
                         f"arms interleaved over {self.repeats} rounds")
        lat["degraded"] = None
        m["latency"] = lat
        self.metrics_extra = {}
        m["quality"] = self.guard("quality", lambda: self.measure_quality(names), m)
        m.update(self.metrics_extra)
        self.measure_layout(names, m)
        self.measure_hardware(fns, m)
        m["host_probe"] = self.guard("host probe", lambda: hostprobe.gemm_rates(
            t.gemm_shapes()), m)
        self.metrics = m
        return dict(arms=names, **{f"mean_ms_{a}": lat[a]["mean_ms"] for a in names})

    def guard(self, what: str, fn: Callable[[], object], m: dict):
        """A measurement failure degrades: the value becomes None with the reason."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - the rollback rule for measurements
            reason = f"{what} measurement failed ({type(e).__name__}: {e})"
            self.warnings.append(f"MEASURED: {reason}; wall-clock only")
            m.setdefault("degraded", []).append(reason)
            log.warning("%s", reason)
            return None

    def measure_quality(self, names) -> dict:
        q = {"metric": self.t.quality_metric, "higher_is_better": True, "unit": "%"}
        samples = {}
        for a in names:
            self.say(f"quality of {a}")
            q[a] = dict(self.t.quality(self.arms[a]))
            samples[a] = q[a].pop("samples", None)
        self.metrics_extra["quality_samples"] = samples
        return q

    def measure_layout(self, names, m: dict) -> None:
        """Tiles and lines per token (exact counts) and the simulated cache hit rate."""
        cfg, t = self.cfg, self.t
        tile = cfg.transform.sparsity.tile
        layout_arms = [a for a in names if a != "dense"]
        m["tiles_per_token"] = m["lines_per_token"] = m["l2_hit_pct_sim"] = None
        skipping = [a for a in layout_arms
                    if (self.arms[a].meta.get("sparsity") or {}).get("skips_tiles")]
        if not skipping:
            why = ("not computed: no kernel of this run skips FFN tiles (the activation-"
                   "sparse FFN is off, or masks activations without skipping), so tile "
                   "counts and a cache replay would describe an access pattern that never "
                   "executed")
            for key in ("tiles_per_token", "lines_per_token", "l2_hit_pct_sim"):
                m[f"{key}_reason"] = why
            return
        layout_arms = skipping

        def run():
            cache = cachesim.cache_for(cfg.measure.sim_level)
            tiles, lines, sim, per_token = {}, {}, {}, {}
            calls = np.cumsum([0, *t.call_tokens()])
            skips = t.skipping_calls(cfg.transform.sparsity)
            for a in layout_arms:
                act = t.activity(self.arms[a], int(calls[-1]))
                # what ran: per call, the union of its rows' tiles where the call skips,
                # every tile where it ran masked
                act = [np.stack([x[s:e].any(axis=0) if k else np.ones(x.shape[1], bool)
                                 for s, e, k in zip(calls[:-1], calls[1:], skips)])
                       for x in act]
                per_token[a] = tiles_per_token(act, tile)
                tiles[a] = float(per_token[a].mean())
                if cfg.measure.sim:
                    r = cachesim.replay(act, [np.arange(x.shape[1]) for x in act], tile,
                                        t.row_bytes(self.arms[a]), cache)
                    sim[a] = 100.0 * r["hits"] / r["accesses"] if r["accesses"] else None
                    lines[a] = r["lines_per_token"]
            m["tiles_per_token"] = dict(tile=tile, of=len(t.axes) * -(-t.size // tile),
                                        calls=int(len(next(iter(per_token.values())))),
                                        unit="tiles the skip kernel read per call (union of "
                                        "the call's rows), summed over layers", **tiles)
            m["tiles_per_token_samples"] = {a: v.tolist() for a, v in per_token.items()}
            if cfg.measure.sim:
                m["lines_per_token"] = dict(line_bytes=cache.line_bytes, **lines)
                m["l2_hit_pct_sim"] = dict(sim, cache=cache.as_dict(), what=(
                    f"simulated: LRU {cache.ways}-way set-associative L{cache.level} "
                    f"({cache.size_bytes // 1024} KiB, {cache.line_bytes} B lines) replaying "
                    f"the union tile-skip kernel's down-projection reads in execution "
                    f"order (call by call; within a call layer by layer)"))

        self.guard("cache simulation", run, m)

    def measure_hardware(self, fns, m: dict) -> None:
        cfg = self.cfg
        m["l2_hit_pct"], m["l2_hit_pct_reason"] = None, measure.ncu_status()[1]
        if not cfg.measure.ncu:
            m["l2_hit_pct_reason"] = "disabled by measure.ncu=false"
        elif m["l2_hit_pct_reason"] is None:  # an NVIDIA GPU and ncu: profile each arm
            def profile():
                out, why = {}, []
                for a in (x for x in fns if x != "dense"):
                    val, reason = measure.ncu_l2_hit(
                        [sys.executable, "-m", "icd_jax.runtime.probe", self.out, a])
                    if val is None:
                        why.append(f"{a}: {reason}")
                    else:
                        out[a] = val
                return out, "; ".join(why) or None

            got = self.guard("ncu", profile, m)
            m["l2_hit_pct"], m["l2_hit_pct_reason"] = got if got else (None, "ncu failed")
        m["ept_j_per_tok"], m["ept_reason"] = None, "disabled by measure.nvml=false"
        if cfg.measure.nvml:
            out = self.guard("energy", lambda: measure.energy_per_token(
                fns, self.t.tokens, max(3, self.repeats // 3), cfg.measure.nvml_interval_s,
                cfg.measure.nvml_min_samples), m)
            if out is not None:
                m["ept_j_per_tok"], m["ept_reason"] = out

    # -- decisions --------------------------------------------------------------------
    def decide(self) -> str:
        """The active arm: the candidate unless it regressed against the previous layout
        beyond the rollback tolerances (then ``ROLLBACK`` restores pi_prev)."""
        cand = "after" if "after" in self.arms else "before"
        prev = "before" if cand == "after" else "identity"
        rb, m = self.cfg.rollback, self.metrics
        reasons = []
        q = m.get("quality") or {}
        if cand in q and prev in q:
            loss = q[prev]["value"] - q[cand]["value"]
            p = quality_p_value((m.get("quality_samples") or {}).get(prev),
                                (m.get("quality_samples") or {}).get(cand))
            significant = rb.alpha is None or p is None or p < rb.alpha
            if loss > rb.quality_pp and significant:
                reasons.append(f"quality {loss:.2f} pp below {prev} (tolerance "
                               f"{rb.quality_pp} pp" + ("" if p is None else
                                                        f", paired p={p:.3g}") + ")")
            elif loss > rb.quality_pp:
                self.warnings.append(f"quality {loss:.2f} pp below {prev}, but not "
                                     f"significant (paired p={p:.3g} >= {rb.alpha}); kept")
        lat = m.get("latency") or {}
        if cand in lat and prev in lat:
            a, b = lat[prev], lat[cand]
            slower = measure.change_pct(b["mean_ms"], a["mean_ms"])
            if slower > rb.latency_pct and b["ci95_ms"][0] > a["ci95_ms"][1]:
                reasons.append(f"latency {slower:+.1f}% vs {prev} (tolerance "
                               f"{rb.latency_pct}%, CI95s disjoint)")
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

    def gates(self, active: str) -> dict:
        g, m = self.cfg.gates, self.metrics
        out = {}
        lat = m.get("latency") or {}
        v = (measure.change_pct(lat[active]["mean_ms"], lat["dense"]["mean_ms"])
             if active in lat and "dense" in lat else None)
        out["latency"] = gate(v, g.latency_pct, "% vs dense fp32", lower=True,
                              reason=None if v is not None else "latency not measured")
        hw = m.get("l2_hit_pct")
        v = (hw[active] - hw["identity"] if isinstance(hw, dict) and active in hw
             and "identity" in hw else None)
        out["l2_hit"] = gate(v, g.l2_hit_pp, "pp vs identity", lower=False,
                             reason=m.get("l2_hit_pct_reason") or "not measured")
        sim = m.get("l2_hit_pct_sim") or {}
        if hw is None and active in sim and "identity" in sim:
            out["l2_hit"]["simulated_value"] = sim[active] - sim["identity"]
        ept = m.get("ept_j_per_tok")
        v = (measure.change_pct(ept[active], ept["dense"]) if isinstance(ept, dict)
             and active in ept else None)
        out["ept"] = gate(v, g.ept_pct, "% vs dense fp32", lower=True,
                          reason=m.get("ept_reason"))
        q = m.get("quality") or {}
        v = q[active]["drop_pp"] if active in q else None
        out["quality"] = gate(v, g.quality_drop_pp, "pp drop vs dense fp32", lower=True,
                              reason=None if v is not None else "quality not measured")
        qs = m.get("quality_samples") or {}
        p = quality_p_value(qs.get("dense"), qs.get(active))
        out["quality"]["p_vs_dense"] = p
        if p is not None and v is not None:
            out["quality"]["significant_loss"] = bool(v > 0 and p < 0.05)
        probe = m.get("host_probe")
        if out["latency"]["status"] == "not met" and probe and not probe.get("fast_int8"):
            out["latency"]["reason"] = ("this host has no fast int8 (W8A8 layer "
                                        f"{probe['w8a8_speedup']:.2f}x float32); "
                                        + hostprobe.describe(probe))
        return fallback_gates(out, m.get("fallbacks") or [])

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
            return self._execute()
        finally:
            lock.release()

    def _execute(self) -> RunArtifacts:
        t_run = time.perf_counter()
        self.restart_cleanly()
        plan = [("READY", self.ready), ("W_BUILT", self.w_built), ("PERMUTED", self.permuted),
                ("TRANSFORMED", self.transformed)]
        if self.iterative:
            plan.append(("REPERMUTED", self.repermuted))
        plan.append(("MEASURED", self.measured))
        active = None
        try:
            for name, fn in plan:
                self.stage(name, fn)
            active = self.decide()
        except StageError as e:
            prev = self.good[0]
            t0 = time.time()
            self.rollback = dict(happened=True, reason=str(e), to=prev, **{"from": None})
            self.events.emit("ROLLBACK", t0, time.time(), True, dict(
                to=prev, failed_stage=e.stage, error=str(e)))
            self.say(f"ROLLBACK to {prev}: {e}")
            active = prev
        perms = {"identity": lambda: self.t.identity() if hasattr(self, "t") else {},
                 "before": lambda: self.perms_before,
                 "after": lambda: self.perms_after}[active]()
        artifacts.save_perms(self.file("perm_active"), perms, dict(arm=active))
        self.finish(active, t_run)
        try:
            self.stage("REPORTED", lambda: self.reported(active))
        except StageError as e:  # metrics.json is written; the report is what failed
            self.say(f"REPORTED failed: {e}")
        return RunArtifacts(self.out, self.failed is None, "REPORTED", active,
                            self.rollback["happened"],
                            self.failed[0] if self.failed else None,
                            {k: self.file(k) for k in FILES if os.path.exists(self.file(k))},
                            self.metrics)

    def restart_cleanly(self) -> None:
        """A previous run in this folder that did not reach REPORTED is archived, and the
        files only an iterative run writes are removed; only known run files, only in a
        folder carrying the run marker, never one its marker lists as there before a run
        claimed the folder (``--force``)."""
        foreign = artifacts.foreign_files(self.out)
        if foreign is None:
            return
        ours = lambda path: os.path.basename(path) not in foreign  # noqa: E731
        st, ev = self.file("state"), self.file("events")
        if os.path.exists(st) and ours(st):
            try:
                prev = artifacts.read_json(st).get("state")
            except ICDError:
                prev = "corrupt"
            if prev != "REPORTED":
                self.say(f"previous run in {self.out} stopped at {prev}; restarting")
            if os.path.exists(ev) and ours(ev) and ours(ev + ".prev"):
                os.replace(ev, ev + ".prev")
        for stale in (self.file("perm_after"), self.file("w_after"),
                      os.path.join(self.out, "stats_repermuted.json")):
            if os.path.exists(stale) and ours(stale):
                os.unlink(stale)

    def finish(self, active: str, t_run: float) -> None:
        m = self.metrics
        m.setdefault("arms", [a for a in ("dense", "identity", "before", "after")
                              if a in self.arms])
        for key in ("latency", "quality", "tiles_per_token", "lines_per_token",
                    "l2_hit_pct_sim", "l2_hit_pct", "ept_j_per_tok"):
            m.setdefault(key, None)
        m.setdefault("l2_hit_pct_reason", "not measured: the run stopped before MEASURED")
        m.setdefault("ept_reason", "not measured: the run stopped before MEASURED")
        m["active"] = active
        arm = self.arms.get("after" if "after" in self.arms else "before")
        m["transforms"] = arm.meta if arm is not None else {}
        m["fallbacks"] = fallbacks(m["transforms"])
        for f in m["fallbacks"]:
            self.say(f"FALLBACK: {f}")
            self.warnings.append(f"TRANSFORMED: fallback: {f}")
        m["effects"] = effects(m, active)
        m["gates"] = self.gates(active)
        m["verdict"] = verdict(m["gates"])
        m["rollback"] = self.rollback
        m["cost"] = {k: mean_cost(v) for k, v in self.stats.items()}
        m["cost"].setdefault("repermuted", None)
        elapsed = time.perf_counter() - t_run
        lock = artifacts.read_json(self.file("lock")) if os.path.exists(self.file("lock")) \
            else {}
        m["run"] = dict(model=self.cfg.model.name, size=self.cfg.model.size,
                        mode=self.cfg.pipeline.mode, seed=self.cfg.pipeline.seed,
                        config_hash=lock.get("config_hash"), env_hash=lock.get("env_hash"),
                        elapsed_s=elapsed, tokens=getattr(getattr(self, "t", None), "tokens",
                                                          None),
                        failed_stage=self.failed[0] if self.failed else None,
                        error=self.failed[1] if self.failed else None)
        m["events"] = dict(count=self.events.count + 1, overhead_s=self.events.overhead_s,
                           overhead_pct=100.0 * self.events.overhead_s / max(elapsed, 1e-9))
        m["warnings"] = self.warnings
        artifacts.write_json(self.file("metrics"), m)

    def reported(self, active: str) -> dict:
        out: dict = {}
        if self.cfg.report.stablehlo and hasattr(self, "t"):
            try:
                out["stablehlo"] = export_run(self.t, self.file("perm_active"),
                                              self.file("stablehlo"), self.metrics)
            except Exception as e:  # noqa: BLE001 - the report still gets written
                self.warnings.append(f"REPORTED: StableHLO export failed ({e})")
                out["stablehlo_error"] = str(e)
        if self.cfg.report.html or self.cfg.report.csv:
            from icd_jax.runtime import report

            out["report"] = report.build(self.out)
        return out


def mean_cost(stats: dict) -> dict:
    """Mean C and Q over axes, for the pi and for the identity order."""
    if not stats:
        return {}
    keys = ("C", "Q", "C_identity", "Q_identity")
    return {k: float(np.mean([s[k] for s in stats.values()])) for k in keys}


def export_run(target, perm_path: str, out_path: str, metrics: dict | None = None) -> dict:
    """Export ``target``'s dense model under the orders in ``perm_path`` through the
    StableHLO bridge (tagged, permuted by the pass, verified) to ``out_path``."""
    from stablehlo_bridge import cli as bridge_cli
    from stablehlo_bridge.artifact import export_artifacts

    perms, meta = artifacts.load_perms(perm_path)
    case = target.export_case(perms)
    exp = bridge_cli.build(case, perms, transform_meta=dict(
        arm=meta.get("arm"), transforms=sorted((metrics or {}).get("transforms") or {})),
        metrics=headline(metrics or {}))
    return export_artifacts(exp, out_path, large_elements_limit=16)


def run(config=None, out_dir: str = "runs/latest", *, overrides=(), reuse_perm: bool = False,
        inject: Mapping[str, BaseException] | None = None,
        log_fn: Callable[[str], None] | None = None, target=None) -> RunArtifacts:
    """Run the pipeline: ``config`` is a path (JSON/YAML), a dict, a ``Config`` or None
    (the default MiniLM run); ``overrides`` are ``"key.path=value"`` strings.

    ``inject`` (tests): ``{stage: exception}`` raised at the start of that stage.
    ``target``: a prebuilt ``targets.make(cfg)`` to reuse (its compiled programs too).
    Returns ``RunArtifacts``; a failed stage does not raise but rolls back (see
    ``RunArtifacts.ok`` / ``failed_stage``).
    """
    cfg = config_lib.load(config, overrides)
    return Run(cfg, out_dir, reuse_perm=reuse_perm, inject=inject, log_fn=log_fn,
               target=target).execute()


def headline(m: dict) -> dict[str, float]:
    """The active arm's numeric figures, for the module's ``icd.metrics`` tag."""
    a = m.get("active")
    picks = {"latency_ms": ((m.get("latency") or {}).get(a) or {}).get("mean_ms"),
             "quality_drop_pp": ((m.get("quality") or {}).get(a) or {}).get("drop_pp"),
             "tiles_per_token": (m.get("tiles_per_token") or {}).get(a),
             "l2_hit_pct_sim": (m.get("l2_hit_pct_sim") or {}).get(a)}
    return {k: float(v) for k, v in picks.items() if isinstance(v, (int, float))}


def export_saved(run_dir: str, to: str | None = None) -> dict:
    """``icd export``: rebuild the run's model from ``config.lock.json`` and export it
    under ``perm_active.json`` (default output ``RUN/model.stablehlo``)."""
    lock = artifacts.read_json(os.path.join(run_dir, FILES["lock"]))
    cfg = config_lib.load(lock.get("config", {}))
    metrics_path = os.path.join(run_dir, FILES["metrics"])
    metrics = artifacts.read_json(metrics_path) if os.path.exists(metrics_path) else None
    return export_run(targets.make(cfg), os.path.join(run_dir, FILES["perm_active"]),
                      to or os.path.join(run_dir, FILES["stablehlo"]), metrics)


def pair(config, out_dir: str, *, repeats: int = 30, reuse_perm: bool = False,
         log_fn: Callable[[str], None] | None = None, target=None
         ) -> tuple[RunArtifacts, dict]:
    """``icd pair``: one iterative run whose linear (pi0) and iterative (pi0 o pi1) arms
    are timed A B A B for at least ``max(30, repeats)`` rounds; writes ``compare.json``
    and ``compare.html`` next to the run's own artefacts."""
    cfg = config_lib.load(config, ["pipeline.mode=iterative"])
    res = Run(cfg, out_dir, reuse_perm=reuse_perm, pair_repeats=max(30, repeats),
              log_fn=log_fn, target=target).execute()
    comp = compare_modes(res.metrics)
    artifacts.write_json(os.path.join(res.out_dir, FILES["compare"]), comp)
    from icd_jax.runtime import report

    report.compare(res.out_dir, comp)
    return res, comp
