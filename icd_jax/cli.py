"""The ``icd`` command: ``run``, ``pair``, ``export`` and ``report``.

    icd run [-c CONFIG] --out DIR [--set key=value ...] [--dry-run] [--reuse-perm]
    icd pair [-c CONFIG] --out DIR     # linear vs iterative, interleaved, >= 30 repeats
    icd export --run DIR [--to FILE]   # StableHLO of the run's active permuted model
    icd report DIR                     # rebuild report.html / report.csv from artefacts
    icd run --print-schema             # the config's JSON schema

With no ``-c`` the default MiniLM-L6 config runs. Exit status: 0 done, 1 a stage failed
and the run rolled back (the report says which), 2 bad usage or config.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags

COMMANDS = ("run", "pair", "export", "report")

flags.DEFINE_string("config", None, "Config file (JSON or YAML).", short_name="c")
flags.DEFINE_string("out", "runs/latest", "Run directory.")
flags.DEFINE_multi_string("set", [], "Override a config key: --set pipeline.mode=linear.")
flags.DEFINE_bool("dry_run", False, "Print the resolved config and the stages; run nothing.")
flags.DEFINE_bool("print_schema", False, "Print the config's JSON schema and exit.")
flags.DEFINE_bool("reuse_perm", False, "Reuse cached permutations.")
flags.DEFINE_string("run", None, "icd export: the run directory.")
flags.DEFINE_string("to", None, "icd export: output file (default RUN/model.stablehlo).")
flags.DEFINE_integer("pair_repeats", 30, "icd pair: interleaved latency rounds (>= 30).")
FLAGS = flags.FLAGS


def plan_text(cfg) -> str:
    """The stages a run with ``cfg`` goes through, one line each."""
    from icd_jax.runtime import config as config_lib

    t, g = cfg.transform, cfg.graph
    on = [f"S={t.sparsity.kind}" if t.sparsity.enabled else None,
          f"Q={t.quant.dtype}" + (f"/g{t.quant.group_size}" if t.quant.group_size else "")
          if t.quant.enabled else None,
          f"K=drop {t.kv.drop:g}/block {t.kv.block}" if t.kv.enabled else None]
    lines = [
        f"READY        load {cfg.model.name} ({cfg.model.size}); lock the run directory",
        f"W_BUILT      {g.source} -> co-access W per axis ({g.sentences} items, "
        f"top {g.top_frac:g} active, top-{g.topk} neighbours)",
        f"PERMUTED     fit_permutation per axis ({cfg.solver.time_budget_s:g} s budget, "
        f"{cfg.solver.refine_steps} moves); cache {'reuse' if cfg.cache.reuse else 'write'}",
        f"TRANSFORMED  {' '.join(x for x in on if x) or 'no transforms'}",
    ]
    if cfg.pipeline.mode == "iterative":
        lines.append("REPERMUTED   W' on the transformed model -> pi1; transforms redone "
                     "under pi0 o pi1")
    lines += [f"MEASURED     latency ({cfg.pipeline.repeats} interleaved rounds, "
              f"{cfg.pipeline.warmup} warmup), quality ({cfg.quality.sentences} items), "
              f"tiles/token, simulated L{cfg.measure.sim_level}, NVML/ncu where present",
              "REPORTED     gates, rollback decision, model.stablehlo, report.html/csv",
              f"config hash  {config_lib.digest(config_lib.resolved(cfg))[:16]}"]
    return "\n".join(lines)


def summary_text(metrics: dict, out_dir: str) -> str:
    """A short table of the arms, the gates and where the report is."""
    lat, q = metrics.get("latency") or {}, metrics.get("quality") or {}
    tiles, sim = metrics.get("tiles_per_token") or {}, metrics.get("l2_hit_pct_sim") or {}
    active = metrics.get("active")
    rows = [f"{'arm':10s} {'latency ms (CI95)':>24s} {'tok/s':>8s} {'quality %':>10s} "
            f"{'drop pp':>8s} {'tiles/tok':>10s} {'L2 sim %':>9s}"]
    for a in metrics.get("arms", []):
        la = lat.get(a)
        lt = (f"{la['mean_ms']:.1f} ({la['ci95_ms'][0]:.1f}-{la['ci95_ms'][1]:.1f})"
              if la else "n/a")
        tps = f"{la['tokens_per_s']:.0f}" if la else "n/a"
        qa = q.get(a)
        qv = f"{qa['value']:.2f}" if qa else "n/a"
        dp = f"{qa['drop_pp']:+.2f}" if qa else "n/a"
        tt = f"{tiles[a]:.1f}" if a in tiles else "-"
        ss = f"{sim[a]:.1f}" if a in sim else "-"
        mark = " <- active" if a == active else ""
        rows.append(f"{a:10s} {lt:>24s} {tps:>8s} {qv:>10s} {dp:>8s} {tt:>10s} {ss:>9s}{mark}")
    rows.append("gates:")
    for name, g in (metrics.get("gates") or {}).items():
        val = "n/a" if g["value"] is None else f"{g['value']:+.2f}"
        why = f" ({g['reason']})" if g["status"] == "not measured" else ""
        rows.append(f"  {name:8s} target {g['target']:+g} {g['unit']}: {val} -> "
                    f"{g['status']}{why}")
    rows.append(f"verdict: {metrics.get('verdict', {}).get('summary', 'n/a')}")
    rb = metrics.get("rollback") or {}
    if rb.get("happened"):
        rows.append(f"ROLLBACK to {rb.get('to')}: {rb.get('reason')}")
    rows.append(f"report: {os.path.join(out_dir, 'report.html')}")
    return "\n".join(rows)


def main(argv):
    from icd_jax.errors import ICDError
    from icd_jax.runtime import config as config_lib

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    args = argv[1:]
    cmd = args[0] if args else "run"
    if cmd not in COMMANDS:
        print(f"icd: unknown command {cmd!r}; choose one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    try:
        if FLAGS.print_schema:
            print(json.dumps(config_lib.schema(), indent=1))
            return 0
        if cmd == "report":
            from icd_jax.runtime import report
            target = args[1] if len(args) > 1 else FLAGS.run or FLAGS.out
            res = report.build(target)
            print(f"report: {res['html']} ({res['elapsed_s']:.1f} s)")
            return 0
        if cmd == "export":
            from icd_jax.runtime import orchestrator
            run_dir = FLAGS.run or (args[1] if len(args) > 1 else None)
            if not run_dir:
                print("icd export: --run DIR is required", file=sys.stderr)
                return 2
            paths = orchestrator.export_saved(run_dir, FLAGS.to)
            print(f"StableHLO: {paths['stablehlo']} (sidecar {paths['sidecar']})")
            return 0
        cfg = config_lib.load(FLAGS.config, FLAGS.set)
        if cmd == "pair" and cfg.pipeline.mode != "iterative":
            cfg = config_lib.load(config_lib.resolved(cfg), ["pipeline.mode=iterative"])
        if FLAGS.dry_run:
            print(json.dumps(config_lib.resolved(cfg), indent=1))
            print(plan_text(cfg))
            return 0
        from icd_jax.runtime import orchestrator
        say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        if cmd == "pair":
            res, comp = orchestrator.pair(cfg, FLAGS.out, repeats=FLAGS.pair_repeats,
                                          reuse_perm=FLAGS.reuse_perm, log_fn=say)
            print(summary_text(res.metrics, res.out_dir))
            print(f"pair: {comp['verdict']}")
            print(f"compare: {os.path.join(res.out_dir, 'compare.html')}")
        else:
            res = orchestrator.Run(cfg, FLAGS.out, reuse_perm=FLAGS.reuse_perm,
                                   log_fn=say).execute()
            print(summary_text(res.metrics, res.out_dir))
        if not res.ok:
            print(f"stage {res.failed_stage} failed; rolled back to {res.active}",
                  file=sys.stderr)
            return 1
        return 0
    except ICDError as e:
        print(f"icd: {e}", file=sys.stderr)
        return 2


def dashed_flags(argv: list[str]) -> list[str]:
    """``--dry-run`` -> ``--dry_run`` (absl flag names use underscores); values and
    positional arguments are left alone."""
    out = []
    for a in argv:
        if a.startswith("--") and len(a) > 2:
            name, eq, value = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + eq + value
        out.append(a)
    return out


def entry() -> None:
    """Console script entry point (``icd``)."""
    app.run(lambda argv: sys.exit(main(argv)), argv=dashed_flags(sys.argv))


if __name__ == "__main__":
    entry()
