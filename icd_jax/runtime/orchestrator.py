"""The pipeline's public entry points: ``run``, ``pair`` and ``export_saved``.

The stages live in ``stages``, what is measured in ``measurement``, what the numbers
mean (gates, rollback, effects) in ``gates``, the linear-vs-iterative comparison in
``compare`` and the StableHLO export in ``export``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from icd_jax.runtime import artifacts, targets
from icd_jax.runtime import config as config_lib
from icd_jax.runtime.compare import compare_modes
from icd_jax.runtime.runfiles import file_path
from icd_jax.runtime.stages import STAGES, Run, RunArtifacts

__all__ = ["STAGES", "Run", "RunArtifacts", "export_saved", "pair", "run"]


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
    artifacts.write_json(file_path(res.out_dir, "compare"), comp)
    from icd_jax.runtime import report

    report.compare(res.out_dir, comp)
    return res, comp


def export_saved(run_dir: str, to: str | None = None) -> dict:
    """``icd export``: rebuild the run's model from ``config.lock.json`` and export it
    under ``perm_active.json`` (default output ``RUN/model.stablehlo``)."""
    from icd_jax.runtime import export

    return export.export_saved(run_dir, to, targets.make)
