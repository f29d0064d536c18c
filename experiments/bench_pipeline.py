"""The icd pipeline end to end, and every figure of its report.

Runs ``icd_jax.run`` (or, with ``--pair``, ``icd pair``: linear and iterative layouts on
the same inputs, timed in interleaved rounds) on a config, then prints:

- per arm (dense fp32, transforms in the shipped order, under pi0 = linear, under
  pi0 o pi1 = iterative): latency mean and CI95, tokens/s, quality and its drop, FFN
  tiles touched per token, the simulated L2 hit rate;
- the ratios that BENCHMARKS.md quotes: active vs dense latency, each layout vs
  identity on tiles/token, iterative vs linear (paired test with ``--pair``);
- the gates and verdict, the event log's overhead, the report's build time.

The report (``OUT/report.html``, figures embedded) is the figure set; ``icd report OUT``
rebuilds it from the artefacts. GPU-only figures (ncu L2, NVML energy) are measured by
the same code when the host has them; elsewhere they are null with the reason.

    python experiments/bench_pipeline.py --out runs/bench               # default config
    python experiments/bench_pipeline.py --pair --out runs/pair
    python experiments/bench_pipeline.py -c configs/mamba.yaml --out runs/mamba
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags

flags.DEFINE_string("config", None, "Config file (default: configs/minilm.yaml's defaults).",
                    short_name="c")
flags.DEFINE_string("out", "runs/bench", "Run directory.")
flags.DEFINE_multi_string("set", [], "Config overrides key.path=value.")
flags.DEFINE_bool("pair", False, "Linear vs iterative, paired, >= 30 rounds.")
flags.DEFINE_integer("pair_repeats", 30, "Interleaved rounds in --pair mode.")
flags.DEFINE_string("json_out", "", "Also write the headline figures to this JSON file.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    from common import write_json_atomic

    from icd_jax.runtime import config, measure, orchestrator
    from icd_jax.runtime.summary import summary_text

    cfg = config.load(FLAGS.config, FLAGS.set)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    comp = None
    if FLAGS.pair:
        res, comp = orchestrator.pair(cfg, FLAGS.out, repeats=FLAGS.pair_repeats, log_fn=say)
    else:
        res = orchestrator.Run(cfg, FLAGS.out, log_fn=say).execute()
    m = res.metrics
    print(summary_text(m, res.out_dir))
    lat, tiles = m.get("latency") or {}, m.get("tiles_per_token") or {}
    head = {}
    if "dense" in lat and res.active in lat:
        r = lat[res.active]["mean_ms"] / lat["dense"]["mean_ms"]
        head["active_over_dense_latency"] = r
        print(f"latency, active ({res.active}) / dense fp32: {r:.3f}x")
    for arm in ("before", "after"):
        if arm in tiles and "identity" in tiles:
            ch = measure.change_pct(tiles[arm], tiles["identity"])
            head[f"tiles_{arm}_vs_identity_pct"] = ch
            print(f"tiles/token, {arm} vs identity: {ch:+.1f}%")
    if comp is not None:
        print(f"linear vs iterative: {comp['verdict']}")
        head["compare"] = comp["paired"]
    ev = m.get("events") or {}
    print(f"event log: {ev.get('count')} events, {ev.get('overhead_s', 0) * 1e3:.1f} ms, "
          f"{ev.get('overhead_pct', 0):.4f}% of the run ({m['run']['elapsed_s']:.0f} s)")
    head.update(events=ev, run=m["run"], gates=m["gates"], verdict=m["verdict"])
    if FLAGS.json_out:
        write_json_atomic(FLAGS.json_out, head)


if __name__ == "__main__":
    app.run(main)
