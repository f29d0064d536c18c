"""A small, realistic fake run directory (docs/pipeline.md layout) for report tests.

``make_run_dir(path)`` writes every artefact a finished ``icd run`` leaves before the
REPORTED stage: the config lock, the stage events, the co-access graphs (two 64-channel
FFN axes), the permutations, the solver stats and ``metrics.json`` with the metrics this
host cannot measure set to ``null`` with a reason.
"""

from __future__ import annotations

import os

import numpy as np
import scipy.sparse as sp

from icd_jax.runtime import artifacts, runfiles

AXES = ("ffn_0", "ffn_1")
D = 64
TILE = 16
T0 = 1_700_000_000.0


def _graph(rng: np.random.Generator, hidden: np.ndarray) -> sp.csr_matrix:
    """A symmetric, sparse co-access graph: channels in the same hidden cluster co-fire."""
    w = np.zeros((D, D), np.float32)
    for _ in range(400):
        c = rng.integers(0, 4)
        members = np.flatnonzero(hidden == c)
        i, j = rng.choice(members, 2, replace=False)
        w[i, j] += rng.uniform(0.5, 3.0)
    for _ in range(60):  # cross-cluster noise
        i, j = rng.integers(0, D, 2)
        if i != j:
            w[i, j] += rng.uniform(0.05, 0.5)
    w = w + w.T
    np.fill_diagonal(w, 0.0)
    return sp.csr_matrix(w)


def _latency(rng, mean_ms: float, n: int = 12) -> dict:
    samples = rng.normal(mean_ms, mean_ms * 0.04, n)
    m = float(samples.mean())
    half = 1.96 * float(samples.std(ddof=1)) / np.sqrt(n)
    tokens = 2048
    return {"mean_ms": m, "p50_ms": float(np.median(samples)),
            "p95_ms": float(np.percentile(samples, 95)), "ci95_ms": [m - half, m + half],
            "samples_ms": samples.tolist(), "tokens_per_s": tokens / (m / 1e3),
            "tokens": tokens}


def _stats(rng, improved: float) -> dict:
    out = {}
    for ax in AXES:
        c_id = float(rng.uniform(0.55, 0.65))
        q_id = float(rng.uniform(0.0, 0.05))
        c = c_id * (1 - improved)
        q = q_id + 0.4 * improved
        out[ax] = {"C": c, "Q": q, "J": c - 0.5 * q, "C_identity": c_id, "Q_identity": q_id,
                   "method": "spectral+refine", "elapsed_s": float(rng.uniform(0.2, 0.9)),
                   "iters": int(rng.integers(500, 5000)), "timed_out": False}
    return out


def _cost_summary(stats: dict) -> dict:
    keys = ("C", "Q", "C_identity", "Q_identity")
    return {k: float(np.mean([s[k] for s in stats.values()])) for k in keys}


def make_run_dir(path, mode: str = "iterative", rollback: bool = False,
                 missing_latency: bool = False) -> str:
    """Write a fake run directory at ``path`` and return its path.

    ``mode="linear"`` leaves out W_after, perm_after and stats_repermuted, marks the
    latency as degraded (wall clock) and the quality as missing. ``rollback`` records a
    rollback from the last arm to the previous one. ``missing_latency`` leaves the latency
    unmeasured (only a degraded reason).
    """
    if mode not in ("linear", "iterative"):
        raise ValueError(mode)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(7)
    iterative = mode == "iterative"
    arms = ["dense", "identity", "before"] + (["after"] if iterative else [])
    last, prev = arms[-1], arms[-2]
    active = prev if rollback else last

    # config.lock.json
    config = {"pipeline": {"mode": mode, "repeats": 12, "warmup": 2, "seed": 0},
              "model": {"name": "minilm", "size": "tiny", "batch_size": 32, "max_tokens": 128},
              "report": {"html": True, "csv": True, "stablehlo": True, "heatmap_max": 256},
              "gates": {"latency_pct": -20.0, "l2_hit_pp": 10.0, "ept_pct": -15.0,
                        "quality_drop_pp": 0.1}}
    env = {"python": "3.11.9", "jax": "0.10.2", "jaxlib": "0.10.2", "numpy": "2.1.0",
           "cpu": "x86_64 (2 cores)", "commit": "0123abc", "gpu": None}
    artifacts.write_json(os.path.join(path, runfiles.FILES["lock"]),
                         {"config": config, "config_hash": "c0ffee" * 10 + "abcd",
                          "env": env, "env_hash": "beef" * 16})

    # events.jsonl
    stages = ["READY", "W_BUILT", "PERMUTED", "TRANSFORMED"]
    stages += ["REPERMUTED"] if iterative else []
    stages += ["MEASURED"]
    ev_path = os.path.join(path, runfiles.FILES["events"])
    if os.path.exists(ev_path):
        os.unlink(ev_path)
    t = T0
    for st in stages:
        dur = float(rng.uniform(0.1, 4.0))
        artifacts.append_event(ev_path, {"stage": st, "t_start": t, "t_end": t + dur, "ok": True,
                                         "meta": {"attempt": 1}})
        t += dur + 0.01
    if rollback:
        artifacts.append_event(ev_path, {"stage": "ROLLBACK", "t_start": t, "t_end": t + 0.2,
                                         "ok": True, "meta": {"from": last, "to": prev}})

    # graphs, perms, stats
    hidden = {ax: rng.integers(0, 4, D) for ax in AXES}
    w = {ax: _graph(rng, hidden[ax]) for ax in AXES}
    artifacts.save_graphs(os.path.join(path, runfiles.FILES["w"]), w)
    p0 = {ax: np.argsort(hidden[ax], kind="stable") for ax in AXES}
    artifacts.save_perms(os.path.join(path, runfiles.FILES["perm_before"]), p0,
                         {"arm": "before", "source": "W.npz"})
    w_meta = {ax: {"sentences": 400, "tokens": 9000, "top_frac": 0.1, "topk": 32,
                   "nnz": int(w[ax].nnz), "source": "capture"} for ax in AXES}
    artifacts.write_json(os.path.join(path, runfiles.FILES["w_meta"]), w_meta)
    s_perm = _stats(rng, 0.35)
    artifacts.write_json(os.path.join(path, "stats_permuted.json"), s_perm)
    perm_active = p0
    s_reperm = None
    if iterative:
        w_after = {ax: _graph(rng, hidden[ax][p0[ax]]) for ax in AXES}
        artifacts.save_graphs(os.path.join(path, runfiles.FILES["w_after"]), w_after)
        p1 = {ax: np.argsort(hidden[ax][p0[ax]], kind="stable") for ax in AXES}
        artifacts.save_perms(os.path.join(path, runfiles.FILES["perm_after"]), p1,
                             {"arm": "after", "source": "W_after.npz"})
        s_reperm = _stats(rng, 0.42)
        artifacts.write_json(os.path.join(path, "stats_repermuted.json"), s_reperm)
        if not rollback:
            perm_active = {ax: p0[ax][p1[ax]] for ax in AXES}
    if rollback and not iterative:
        perm_active = {ax: np.arange(D) for ax in AXES}
    artifacts.save_perms(os.path.join(path, runfiles.FILES["perm_active"]), perm_active,
                         {"arm": active})

    # metrics.json
    base = {"dense": 11.0, "identity": 9.4, "before": 8.1, "after": 7.6}
    if missing_latency:
        latency = {"method": "wall_clock", "degraded": "the timer failed on this host"}
    else:
        latency = {arm: _latency(rng, base[arm]) for arm in arms}
        latency["method"] = "wall_clock" if not iterative else "perf_counter+block_until_ready"
        latency["degraded"] = ("wall-clock only: no device timer on this host"
                               if not iterative else None)
    if iterative:
        qv = {"dense": 0.912, "identity": 0.911, "before": 0.910, "after": 0.909}
        if rollback:
            qv["after"] = 0.880
        quality = {"metric": "topic_accuracy", "higher_is_better": True}
        for arm in arms:
            quality[arm] = {"value": qv[arm], "drop_pp": (qv["dense"] - qv[arm]) * 100,
                            "cos_mean": 0.99, "agreement": 0.97, "rel_logit_error": 0.02,
                            "ppl_ratio": 1.01}
    else:
        quality = None
    tiles = {"dense": 4.0, "identity": 3.6, "before": 2.1, "after": 1.8}
    lines = {arm: tiles[arm] * 64.0 for arm in arms}
    sim = {"dense": 52.0, "identity": 55.5, "before": 68.2, "after": 71.9}
    cost = {"permuted": _cost_summary(s_perm),
            "repermuted": _cost_summary(s_reperm) if s_reperm else None}

    lat_act = None if missing_latency else latency[active]["mean_ms"]
    lat_dense = None if missing_latency else latency["dense"]["mean_ms"]
    lat_val = None if lat_act is None else (lat_act / lat_dense - 1) * 100
    gates = {
        "latency": {"target": -20.0, "value": lat_val, "unit": "% vs dense fp32",
                    "status": ("not measured" if lat_val is None
                               else "met" if lat_val <= -20 else "not met"),
                    "reason": "latency not measured" if lat_val is None else None},
        "l2_hit": {"target": 10.0, "value": None, "unit": "pp vs identity",
                   "status": "not measured",
                   "reason": "no hardware L2 counters (ncu not on PATH); "
                             "see l2_hit_pct_sim for a simulated figure"},
        "ept": {"target": -15.0, "value": None, "unit": "% vs dense fp32",
                "status": "not measured",
                "reason": "NVML unavailable: no GPU on this host"},
    }
    if quality is None:
        gates["quality"] = {"target": 0.1, "value": None, "unit": "pp drop vs dense fp32",
                            "status": "not measured", "reason": "quality labels not available"}
    else:
        drop = quality[active]["drop_pp"]
        gates["quality"] = {"target": 0.1, "value": drop, "unit": "pp drop vs dense fp32",
                            "status": "met" if drop <= 0.1 else "not met", "reason": None}
    verdict = {s: [g for g, v in gates.items() if v["status"] == name]
               for s, name in (("met", "met"), ("not_met", "not met"),
                               ("not_measured", "not measured"))}
    verdict["summary"] = (f"{len(verdict['met'])} of {len(gates)} gates met, "
                          f"{len(verdict['not_met'])} not met, "
                          f"{len(verdict['not_measured'])} not measured")
    metrics = {
        "run": {"model": "minilm", "size": "tiny", "mode": mode, "seed": 0,
                "config_hash": "c0ffee" * 10 + "abcd", "env_hash": "beef" * 16,
                "elapsed_s": t - T0, "tokens": 2048},
        "arms": arms,
        "active": active,
        "latency": latency,
        "quality": quality,
        "tiles_per_token": {"tile": TILE, "of": D // TILE, **{a: tiles[a] for a in arms}},
        "lines_per_token": {"line_bytes": 64, **lines},
        "l2_hit_pct": None,
        "l2_hit_pct_reason": "no hardware L2 counters: ncu not on PATH",
        "l2_hit_pct_sim": {**{a: sim[a] for a in arms},
                           "cache": {"level": 2, "size_bytes": 1 << 20, "ways": 16,
                                     "line_bytes": 64, "sets": 1024, "source": "sysfs"},
                           "what": "exact LRU replay of FFN down-projection tile reads"},
        "ept_j_per_tok": None,
        "ept_reason": "NVML unavailable: no GPU on this host",
        "cost": cost,
        "gates": gates,
        "verdict": verdict,
        "rollback": {"happened": bool(rollback),
                     "reason": (f"arm {last!r} lost more quality than allowed"
                                if rollback else None),
                     "from": last if rollback else None, "to": prev if rollback else None},
        "transforms": {"sparsity": {"kind": "ffn", "top_frac": 0.1, "tile": TILE, "ok": True},
                       "quant": {"bits": 8, "group_size": 32, "ok": True},
                       "kv": {"block": 4, "drop": 0.1, "ok": True}},
        "events": {"count": len(stages) + int(rollback), "overhead_pct": 0.4},
        "warnings": (["latency degraded to wall clock"] if not iterative else []),
    }
    artifacts.write_json(os.path.join(path, runfiles.FILES["metrics"]), metrics)
    return path
