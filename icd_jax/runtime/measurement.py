"""The MEASURED stage: latency, quality, layout counts, hardware counters, host probe.

``Measurement(cfg, target, arms, ...).run()`` returns the measured part of
``metrics.json``. A measurement that fails degrades: its value becomes None with the
reason in ``degraded`` and a warning, and the rest is still measured.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping

import numpy as np

from icd_jax.runtime import cachesim, hostprobe, measure
from icd_jax.runtime.arms import Arm
from icd_jax.runtime.config import Config

log = logging.getLogger("icd")

#: What the layout counts say when no kernel of the run skips tiles.
NO_SKIP = ("not computed: no kernel of this run skips FFN tiles (the activation-sparse FFN "
           "is off, or masks activations without skipping), so tile counts and a cache "
           "replay would describe an access pattern that never executed")


def tiles_per_token(active: list[np.ndarray], tile: int) -> np.ndarray:
    """Distinct tiles of ``tile`` consecutive stored positions touched per token, summed
    over layers: ``int[tokens]``."""
    return np.asarray(sum(cachesim.active_tiles(a, np.arange(a.shape[1]), tile).sum(1)
                          for a in active))


class Measurement:
    """Measures ``arms`` (name -> ``Arm``) of ``target`` under ``cfg``; ``out_dir`` is the
    run folder (the ncu probe re-runs an arm from it); ``warnings`` collects what
    degraded."""

    def __init__(self, cfg: Config, target, arms: Mapping[str, Arm], repeats: int,
                 out_dir: str, say: Callable[[str], None]):
        self.cfg, self.t, self.arms, self.repeats = cfg, target, dict(arms), repeats
        self.out, self.say = out_dir, say
        self.warnings: list[str] = []
        self.names = [a for a in ("dense", "identity", "before", "after") if a in self.arms]

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

    def run(self) -> dict:
        """The measured metrics (``arms``, ``latency``, ``quality``, ``quality_samples``,
        layout counts, hardware counters and ``host_probe``)."""
        fns = {a: self.t.call(self.arms[a]) for a in self.names}
        m: dict = dict(arms=self.names, latency=self.latency(fns))
        got = self.guard("quality", self.quality, m)
        m["quality"], m["quality_samples"] = got if got else (None, {})
        self.layout(m)
        self.hardware(fns, m)
        m["host_probe"] = self.guard("host probe", lambda: hostprobe.gemm_rates(
            self.t.gemm_shapes()), m)
        return m

    def latency(self, fns: Mapping[str, Callable]) -> dict:
        cfg, t = self.cfg, self.t
        self.say(f"timing {len(fns)} arms x {self.repeats} interleaved rounds on "
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
        return lat

    def quality(self) -> tuple[dict, dict]:
        """Per arm the target's quality record, and per arm its per-item samples."""
        q = {"metric": self.t.quality_metric, "higher_is_better": True, "unit": "%"}
        samples = {}
        for a in self.names:
            self.say(f"quality of {a}")
            q[a] = dict(self.t.quality(self.arms[a]))
            samples[a] = q[a].pop("samples", None)
        return q, samples

    def layout(self, m: dict) -> None:
        """Tiles and lines per token (exact counts) and the simulated cache hit rate, for
        the arms whose kernels really skip tiles."""
        m["tiles_per_token"] = m["lines_per_token"] = m["l2_hit_pct_sim"] = None
        skipping = [a for a in self.names if a != "dense"
                    and (self.arms[a].meta.get("sparsity") or {}).get("skips_tiles")]
        if not skipping:
            for key in ("tiles_per_token", "lines_per_token", "l2_hit_pct_sim"):
                m[f"{key}_reason"] = NO_SKIP
            return
        self.guard("cache simulation", lambda: self.replay(skipping, m), m)

    def replay(self, layout_arms: list[str], m: dict) -> None:
        cfg, t = self.cfg, self.t
        tile = cfg.transform.sparsity.tile
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

    def hardware(self, fns: Mapping[str, Callable], m: dict) -> None:
        """The L2 hit rate (ncu, per arm, in a subprocess) and energy per token (NVML)."""
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
