"""StableHLO bridge costs on MiniLM-L6: export, passes, artefact, IREE next to JAX.

Workload: one packed batch of the first ``--batch_size`` corpus sentences
(``icd_jax.corpus.sentences``; one ``(T, B, C)`` bucket), real all-MiniLM-L6-v2 weights,
random named-axis orders (``permute.random_perms``, ``--seed``). Measured in one
process (``--model mamba-tiny`` runs the same on a tiny Mamba, for a quick check):

  export             ``stablehlo_bridge.export`` (weights embedded as constants);
  apply_permutation  the pass on the ``Exported`` (deserialise, permute every weight
                     constant, tag, serialise);
  attach_layout_tags the tagging alone, on the permuted export;
  verify             MLIR verification + every tag;
  roundtrip          ``Exported.serialize``/``deserialize`` + a portable artefact;
  artefact           ``export_artifacts`` (files written atomically) and their sizes;
  IREE compile       ``iree.compile_module`` for llvm-cpu (``--target_cpu``);
  run                the same inputs through JAX (``jax.jit`` of the model on the
                     unpermuted weights), the exported module (``jax.jit(exp.call)``)
                     and IREE (``--driver``), timed in ``--repeats`` interleaved rounds;
                     prints median seconds and the ratios to JAX.

Steps other than the runs are timed ``--repeats`` times (median; IREE compile once).

Usage: python experiments/bench_bridge.py [--batch_size 32] [--repeats 5]
       [--driver local-task] [--json_out F]
"""

from __future__ import annotations

import os
import platform
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from common import timed_interleaved, write_json_atomic

from icd_jax import permute
from icd_jax.runtime import export as run_export
from stablehlo_bridge import passes
from stablehlo_bridge.artifact import export_artifacts, roundtrip
from stablehlo_bridge.export import export

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "minilm", ["minilm", "mamba-tiny"], "Model to export.")
flags.DEFINE_integer("batch_size", 32, "MiniLM: corpus sentences in the batch.")
flags.DEFINE_integer("repeats", 5, "Timed repeats (median) of every step and run.")
flags.DEFINE_integer("seed", 0, "Seed of the random orders.")
flags.DEFINE_bool("iree", True, "Also compile and run with IREE.")
flags.DEFINE_string("driver", "local-task", "IREE runtime driver (local-task: a thread "
                    "pool; local-sync: one thread).")
flags.DEFINE_string("target_cpu", "host", "--iree-llvmcpu-target-cpu.")
flags.DEFINE_string("json_out", None, "Optional JSON results path (written atomically).")


def median_time(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of ``fn()`` over ``repeats`` calls, and its last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def main(argv):
    del argv
    if FLAGS.model == "minilm":
        case = run_export.minilm_case(batch_size=FLAGS.batch_size)
    else:
        case = run_export.mamba_case(seed=FLAGS.seed)
    perms = permute.random_perms(case.spec, seed=FLAGS.seed)
    meta, metrics = {"S": {}, "Q": {}, "K": {}}, {"C": 0.0, "Q": 0.0}
    shape = tuple(tuple(np.shape(a)) for a in case.args)
    print(f"{case.name}: inputs {shape}; {jax.devices()[0].platform}, "
          f"{platform.processor() or platform.machine()}")
    r = FLAGS.repeats
    steps = {}
    steps["export"], exp = median_time(lambda: export(case.fn, case.params, *case.args), r)
    steps["apply_permutation"], applied = median_time(
        lambda: passes.apply_permutation(exp, perms, meta, metrics, spec=case.spec), r)
    steps["attach_layout_tags"], _ = median_time(
        lambda: passes.attach_layout_tags(applied, perms, meta, metrics, spec=case.spec), r)
    steps["verify"], _ = median_time(lambda: passes.verify(applied), r)
    steps["roundtrip"], _ = median_time(lambda: roundtrip(applied), r)
    sizes = {}
    with tempfile.TemporaryDirectory() as d:
        steps["export_artifacts"], paths = median_time(
            lambda: export_artifacts(applied, os.path.join(d, "model.stablehlo")), r)
        sizes = {k: os.path.getsize(p) for k, p in paths.items()}

    ref_fn = jax.jit(case.fn)
    exp_fn = jax.jit(applied.call)
    want = np.asarray(ref_fn(case.params, *case.args))
    want = permute.permute_output(case.spec, case.output, want, perms) if case.output else want
    runs = {"jax (model)": lambda: ref_fn(case.params, *case.args),
            "jax (exported)": lambda: exp_fn(*case.args)}
    errors = {"jax (exported)": rel_err(exp_fn(*case.args), want)}
    if FLAGS.iree:
        from stablehlo_bridge import iree

        t0 = time.perf_counter()
        vmfb = iree.compile_module(applied, target_cpu=FLAGS.target_cpu)
        steps["iree compile"] = time.perf_counter() - t0
        sizes["vmfb"] = len(vmfb)
        program = iree.load(vmfb, applied, driver=FLAGS.driver)
        runs[f"iree ({FLAGS.driver})"] = lambda: program(*case.args)
        errors[f"iree ({FLAGS.driver})"] = rel_err(program(*case.args), want)
    timed = timed_interleaved(runs, r)

    print(f"{'step':22s} {'seconds':>9s}")
    for name, s in steps.items():
        print(f"{name:22s} {s:9.3f}")
    print(f"{'file':22s} {'bytes':>12s}")
    for name, n in sizes.items():
        print(f"{name:22s} {n:12d}")
    base = timed["jax (model)"][1]
    print(f"{'run':22s} {'first s':>8s} {'median s':>9s} {'vs jax':>7s} {'rel err':>9s}")
    for label, (first, med) in timed.items():
        err = errors.get(label, 0.0)
        print(f"{label:22s} {first:8.3f} {med:9.4f} {med / base:6.2f}x {err:9.2e}")
    if FLAGS.json_out:
        write_json_atomic(FLAGS.json_out, {
            "model": case.name, "inputs": shape, "repeats": r, "driver": FLAGS.driver,
            "steps_s": steps, "sizes_bytes": sizes, "errors": errors,
            "runs_s": {k: {"first": f, "median": m} for k, (f, m) in timed.items()}})


if __name__ == "__main__":
    app.run(main)
