"""The ``icd`` command: ``run``, ``pair``, ``export`` and ``report``.

    icd run [-c CONFIG] --out DIR [--set key=value ...] [--dry-run] [--reuse-perm]
            [--fail-on-gates] [--force]
    icd pair [-c CONFIG] --out DIR     # linear vs iterative, interleaved, >= 30 repeats
    icd export --run DIR [--to FILE]   # StableHLO of the run's active permuted model
    icd report DIR                     # rebuild report.html / report.csv from artefacts
    icd run --print-schema             # the config's JSON schema

With no ``-c`` the default MiniLM-L6 config runs; ``-c examples/tiny_gpt.yaml`` runs your
own model (``model.target: "file.py:factory"``, see docs/pipeline.md). ``run`` and
``pair`` write a marker file (``icd_run.json``) into their folder and refuse a non-empty
``--out`` without one (it holds files no run wrote) unless ``--force``. Exit status: 0
done, 1 a stage failed and the run rolled back (the report says which), 2 bad usage,
config or ``--out``, 3 with ``--fail-on-gates`` a measured gate is ``not met`` (``not
measured`` gates never are).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping

from absl import app, flags

from vsla_jax.util import underscored_flags

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
flags.DEFINE_bool("fail_on_gates", False, "Exit 3 when a measured gate is not met (for CI).")
flags.DEFINE_bool("force", False, "Write into a non-empty --out that no icd run created.")
FLAGS = flags.FLAGS


def gates_not_met(metrics: Mapping) -> list[str]:
    """Names of the measured gates whose status is ``not met``."""
    gates = metrics.get("gates") or {}
    return [k for k, g in gates.items() if isinstance(g, Mapping) and
            g.get("status") == "not met"]


def exit_status(ok: bool, metrics: Mapping, fail_on_gates: bool) -> int:
    """0 done; 1 a stage failed and the run rolled back; 3 with ``fail_on_gates`` when a
    measured gate is not met (a rollback's 1 comes first)."""
    if not ok:
        return 1
    return 3 if fail_on_gates and gates_not_met(metrics) else 0


def main(argv):
    from icd_jax.errors import ICDError
    from icd_jax.runtime import config as config_lib
    from icd_jax.runtime.summary import plan_text, summary_text

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    args = argv[1:]
    cmd = args[0] if args else "run"
    if cmd not in COMMANDS:
        print(f"icd: unknown command {cmd!r}; choose one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    most = 1 if cmd in ("report", "export") else 0  # positional arguments after cmd
    if len(args) - 1 > most:
        print(f"icd {cmd}: unexpected arguments {args[1 + most:]} (options are --flags)",
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
            written = ", ".join(p for p in (res["html"], res["csv"]) if p)
            print(f"report: {written} ({res['elapsed_s']:.1f} s)")
            for problem in res["problems"]:  # written anyway, the problems listed in it
                print(f"icd report: unreadable artefact, shown as not measured: {problem}",
                      file=sys.stderr)
            return 2 if res["problems"] else 0
        if cmd == "export":
            from icd_jax.runtime import orchestrator
            run_dir = FLAGS.run or (args[1] if len(args) > 1 else None)
            if not run_dir:
                print("icd export: --run DIR is required", file=sys.stderr)
                return 2
            paths = orchestrator.export_saved(run_dir, FLAGS.to)
            print(f"StableHLO: {paths['stablehlo']} (sidecar {paths['sidecar']})")
            return 0
        if not FLAGS.out.strip():
            print(f"icd {cmd}: --out must name a folder, got an empty string",
                  file=sys.stderr)
            return 2
        cfg = config_lib.load(FLAGS.config, FLAGS.set)
        if cmd == "pair" and FLAGS.pair_repeats < 30:
            print(f"icd pair: --pair_repeats must be >= 30 (the paired test needs them), got "
                  f"{FLAGS.pair_repeats}", file=sys.stderr)
            return 2
        if cmd == "pair" and cfg.pipeline.mode != "iterative":
            cfg = config_lib.load(config_lib.resolved(cfg), ["pipeline.mode=iterative"])
        from icd_jax.runtime.permcache import check_dir
        check_dir(cfg.cache)  # before the run folder is touched
        if FLAGS.dry_run:
            print(json.dumps(config_lib.resolved(cfg), indent=1))
            print(plan_text(cfg, FLAGS.pair_repeats if cmd == "pair" else None))
            return 0
        from icd_jax.runtime import artifacts
        say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        if artifacts.prepare_run_dir(FLAGS.out, FLAGS.force) == "foreign":
            say(f"icd {cmd}: --force: writing into {FLAGS.out}, which holds files no icd "
                f"run wrote; files of the run's names are overwritten, no other is removed")
        from icd_jax.runtime import orchestrator
        from icd_jax.runtime.runfiles import file_path
        if cmd == "pair":
            res, comp = orchestrator.pair(cfg, FLAGS.out, repeats=FLAGS.pair_repeats,
                                          reuse_perm=FLAGS.reuse_perm, log_fn=say)
            print(summary_text(res.metrics, res.out_dir))
            print(f"pair: {comp['verdict']}")
            print(f"compare: {file_path(res.out_dir, 'compare_html')}")
        else:
            res = orchestrator.Run(cfg, FLAGS.out, reuse_perm=FLAGS.reuse_perm,
                                   log_fn=say).execute()
            print(summary_text(res.metrics, res.out_dir))
        status = exit_status(res.ok, res.metrics, FLAGS.fail_on_gates)
        if status == 1:
            print(f"stage {res.failed_stage} failed; rolled back to {res.active}",
                  file=sys.stderr)
        elif status == 3:
            print(f"icd: --fail-on-gates: not met: {', '.join(gates_not_met(res.metrics))}",
                  file=sys.stderr)
        return status
    except ICDError as e:
        print(f"icd: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder or file outside any stage: usage, not a rollback
        print(f"icd: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the run saved its state (INTERRUPTED) on the way out
        print(f"icd {cmd}: interrupted; what finished is in {FLAGS.out}", file=sys.stderr)
        return 130


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad or unknown flag as one line and exit status 2 (bad
    usage), not absl's FATAL message and 1 (a rollback's status)."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print(f"icd: {e}; see icd --help", file=sys.stderr)
        sys.exit(2)


def entry() -> None:
    """Console script entry point (``icd``); ``--help`` prints this module's usage and
    its flags and exits 0 (absl's own prints the ``__main__`` docstring, which a console
    script lacks, and exits 1)."""
    sys.modules["__main__"].__doc__ = __doc__
    if any(a in ("--help", "-h", "--helpshort") for a in sys.argv[1:]):
        print(__doc__)
        print(FLAGS.module_help(sys.modules[__name__]))
        sys.exit(0)
    app.run(lambda argv: sys.exit(main(argv)), argv=underscored_flags(sys.argv),
            flags_parser=parse_flags)


if __name__ == "__main__":
    entry()
