"""The file names of a run folder (docs/pipeline.md): the one registry.

``rundir`` reads a run through these names and re-exports them; writers build paths with
``file_path(folder, key)``. A leaf module (no runtime imports), so the IO helpers in
``artifacts`` can name the run marker without an import cycle.
"""

from __future__ import annotations

import os

from icd_jax.errors import ArtifactError

#: The file names of a run directory (see docs/pipeline.md).
FILES = dict(lock="config.lock.json", events="events.jsonl", events_prev="events.jsonl.prev",
             w="W.npz", w_after="W_after.npz", w_meta="w.meta.json",
             perm_before="perm_before.json", perm_after="perm_after.json",
             perm_active="perm_active.json", stats_permuted="stats_permuted.json",
             stats_repermuted="stats_repermuted.json", metrics="metrics.json",
             html="report.html", csv="report.csv", stablehlo="model.stablehlo",
             stablehlo_mlir="model.mlir", stablehlo_jax="model.jax",
             stablehlo_sidecar="model.json",
             compare="compare.json", compare_html="compare.html", state="state.json",
             marker="icd_run.json", run_lock=".icd.lock")
#: What a run writes as it goes: a new run in the folder removes the previous run's copies
#: first, so that nothing of it is reported as the new run's (the events and the folder's
#: marker and lock are handled apart; ``compare`` is ``icd pair``'s).
RUN_OUTPUTS = tuple(k for k in FILES if k not in (
    "events", "events_prev", "marker", "run_lock", "compare", "compare_html"))
#: The solver-stats file of each cost stage (keys of ``FILES``).
STATS = {"permuted": "stats_permuted", "repermuted": "stats_repermuted"}
#: The graph files (``.npz``) and the permutation files (JSON) among ``FILES``.
GRAPHS = ("w", "w_after")
PERMS = ("perm_before", "perm_after", "perm_active")


def file_key(key: str) -> str:
    """``key`` if ``FILES`` knows it, else ``ArtifactError`` (a typo is loud)."""
    if key not in FILES:
        raise ArtifactError(f"unknown run file {key!r}; known: {', '.join(FILES)}")
    return key


def file_path(folder: str | os.PathLike, key: str) -> str:
    """The path of run file ``key`` in ``folder`` (for writers, and for folders that are
    not a run yet)."""
    return os.path.join(os.fspath(folder), FILES[file_key(key)])
