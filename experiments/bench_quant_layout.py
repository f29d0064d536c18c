"""What the channel order buys at a fixed int8 transform: identity vs pi0 vs pi0 o pi1.

For each quantisation variant (``--variants``: activation groups of 128 or 64 FFN neurons
on the permuted FFN down projections, or per token everywhere), runs the whole pipeline
(``icd_jax.run``) on MiniLM-L6 with one shared target (one set of compiled programs, the
pi0 fits cached), and prints per variant and arm: latency (mean ms, change vs dense fp32),
topic-accuracy drop (pp vs dense fp32) on ``--quality_sentences`` labelled sentences, and
the exact McNemar p-value of each order against the identity order on the same sentences.
All arms of a variant are timed interleaved in one process on the same inputs.

    .venv/bin/python experiments/bench_quant_layout.py --out runs/quant_layout \\
        [--variants g128,g64,token] [--quality_sentences 3079] [--repeats 10]
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags

flags.DEFINE_string("out", "runs/quant_layout", "Folder for one run directory per variant.")
flags.DEFINE_list("variants", ["g128", "g64", "token"], "g<N> (groups of N) or token.")
flags.DEFINE_integer("quality_sentences", 3079, "Labelled sentences for quality.")
flags.DEFINE_integer("repeats", 10, "Interleaved latency rounds per run.")
flags.DEFINE_string("json_out", "", "Also write the table to this JSON file.")
FLAGS = flags.FLAGS


def variant_overrides(name: str) -> list[str]:
    """Config overrides of one variant name."""
    if name == "token":
        return ["transform.quant.group_size=null"]
    if name.startswith("g") and name[1:].isdigit():
        return [f"transform.quant.group_size={int(name[1:])}"]
    raise ValueError(f"unknown variant {name!r}: use g<N> or token")


def main(argv):
    del argv
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    from common import cpu_flags, write_json_atomic

    from icd_jax.runtime import config, orchestrator, targets

    base = [f"quality.sentences={FLAGS.quality_sentences}",
            f"pipeline.repeats={FLAGS.repeats}", "report.stablehlo=false",
            "cache.reuse=true"]
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    target, rows = None, []
    print("CPU flags:", cpu_flags())
    for name in FLAGS.variants:
        cfg = config.load(None, base + variant_overrides(name))
        if target is None:
            target = targets.make(cfg)
        out = os.path.join(FLAGS.out, name)
        res = orchestrator.run(cfg, out, log_fn=say, target=target)
        m = res.metrics
        eff = m["effects"]
        for arm in ("dense", "identity", "before", "after"):
            lat = m["latency"][arm]
            row = dict(variant=name, arm=arm, mean_ms=lat["mean_ms"],
                       vs_dense_pct=100 * (lat["mean_ms"] / m["latency"]["dense"]["mean_ms"]
                                           - 1),
                       drop_pp=m["quality"][arm]["drop_pp"],
                       cos=m["quality"][arm].get("cos_mean"),
                       p_vs_identity=(eff["layout"].get(arm) or {}).get("p_vs_identity"))
            rows.append(row)
        rows[-1]["verdict"] = eff["layout_verdict"]
        say(f"{name}: {eff['layout_verdict']}")
    print(f"{'variant':8s} {'arm':9s} {'ms':>8s} {'vs dense':>9s} {'drop pp':>8s} "
          f"{'cos':>8s} {'p vs id':>8s}")
    for r in rows:
        vs = f"{r['vs_dense_pct']:+.1f}%"
        p = "" if r["p_vs_identity"] is None else f"{r['p_vs_identity']:.3g}"
        cos = "" if r["cos"] is None else f"{r['cos']:.5f}"
        print(f"{r['variant']:8s} {r['arm']:9s} {r['mean_ms']:8.1f} {vs:>9s} "
              f"{r['drop_pp']:+8.2f} {cos:>8s} {p:>8s}")
    for r in rows:
        if "verdict" in r:
            print(f"{r['variant']}: {r['verdict']}")
    if FLAGS.json_out:
        write_json_atomic(FLAGS.json_out, dict(rows=rows, flags=cpu_flags()))


if __name__ == "__main__":
    app.run(main)
