"""The run folder: every file name a run writes, and the one reader of a run.

``FILES`` (from ``runfiles``) names every artefact of a run folder (docs/pipeline.md);
nothing else in the runtime spells a file name. ``RunDir(path)`` opens a finished (or
failed) run: a path that is no folder, or a folder that is neither marked as a run
(``icd_run.json``) nor holds ``metrics.json``, is an ``ArtifactError``. Its readers return
typed records (``metrics() -> Metrics``) or plain JSON, and raise ``ArtifactError``
naming the file on anything missing or malformed. ``prepare_run_dir`` /
``run_dir_state`` / ``foreign_files`` (re-exported from ``artifacts``) decide whether a
folder may become a run folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

from icd_jax.errors import ArtifactError, ConfigError
from icd_jax.runtime import artifacts
from icd_jax.runtime import config as config_lib
from icd_jax.runtime.artifacts import foreign_files, prepare_run_dir, run_dir_state
from icd_jax.runtime.records import Metrics
from icd_jax.runtime.runfiles import FILES, GRAPHS, PERMS, STATS, file_key, file_path

__all__ = ["FILES", "GRAPHS", "PERMS", "STATS", "RunDir", "file_key", "file_path",
           "foreign_files", "prepare_run_dir", "run_dir_state"]


class RunDir:
    """The artefacts of one run folder, read on demand.

    ``RunDir(path)`` raises ``ArtifactError`` if ``path`` is not a folder, or is a folder
    no run wrote (no ``icd_run.json`` and no ``metrics.json``).
    """

    def __init__(self, path: str | os.PathLike):
        self.dir = os.fspath(path)
        if not os.path.isdir(self.dir):
            raise ArtifactError(f"{self.dir}: no such run folder")
        if not (self.exists("marker") or self.exists("metrics")):
            raise ArtifactError(f"{self.dir}: not an icd run folder (no {FILES['marker']} "
                                f"and no {FILES['metrics']})")

    def __repr__(self) -> str:
        return f"RunDir({self.dir!r})"

    def path(self, key: str) -> str:
        """The path of file ``key`` (a key of ``FILES``)."""
        return file_path(self.dir, key)

    def exists(self, key: str) -> bool:
        """Whether file ``key`` is there."""
        return os.path.exists(self.path(key))

    # -- typed readers ----------------------------------------------------------------
    def metrics(self) -> Metrics:
        """``metrics.json`` as ``Metrics``."""
        return Metrics.load(self.path("metrics"))

    def json(self, key: str) -> dict:
        """A JSON object file of the run."""
        return artifacts.read_json(self.path(key))

    def lock(self) -> dict:
        """``config.lock.json``: ``{"config", "config_hash", "env", "env_hash"}``."""
        return self.json("lock")

    def config(self):
        """The ``config.Config`` the run ran with, from ``config.lock.json``;
        ``ArtifactError`` naming the file when it holds no ``config`` object or one that
        does not validate (never the default config in its place)."""
        data = self.lock().get("config")
        if not isinstance(data, dict):
            raise ArtifactError(f"{self.path('lock')}: no 'config' object (the run's "
                                "resolved config), so the run's model cannot be rebuilt")
        try:
            return config_lib.load(data)
        except ConfigError as e:
            raise ArtifactError(f"{self.path('lock')}: its config does not validate "
                                f"({e})") from None

    def state(self) -> dict:
        """``state.json``: the last stage reached."""
        return self.json("state")

    def compare(self) -> dict:
        """``compare.json`` (``icd pair``)."""
        return self.json("compare")

    def stats(self, stage: str) -> dict[str, dict]:
        """The solver stats per axis of cost stage ``stage`` (``permuted`` or
        ``repermuted``)."""
        if stage not in STATS:
            raise ArtifactError(f"unknown cost stage {stage!r}; known: {', '.join(STATS)}")
        path = self.path(STATS[stage])
        blob = artifacts.read_json(path)
        bad = [k for k, v in blob.items() if not isinstance(v, dict)]
        if bad:
            raise ArtifactError(f"{path}: stats of axis {bad[0]!r} are not an object")
        return blob

    def events(self) -> list[dict]:
        """The stage events of ``events.jsonl`` (a torn last line skipped)."""
        path = self.path("events")
        out = artifacts.read_events(path)
        bad = [i for i, e in enumerate(out) if not isinstance(e, dict)]
        if bad:
            raise ArtifactError(f"{path}: event {bad[0] + 1} is not an object")
        return out

    def perms(self, key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(perms, meta)`` of permutation file ``key`` (one of ``PERMS``)."""
        if key not in PERMS:
            raise ArtifactError(f"{key!r} is not a permutation file; known: {', '.join(PERMS)}")
        perms, meta = artifacts.load_perms(self.path(key))
        if not isinstance(meta, dict):
            raise ArtifactError(f"{self.path(key)}: 'meta' is not an object")
        return perms, meta

    def graphs(self, key: str) -> dict[str, sp.csr_matrix]:
        """The co-access graphs of graph file ``key`` (one of ``GRAPHS``)."""
        if key not in GRAPHS:
            raise ArtifactError(f"{key!r} is not a graph file; known: {', '.join(GRAPHS)}")
        return artifacts.load_graphs(self.path(key))

    def optional(self, key: str, read: Callable[[], Any], problems: list[str]):
        """``read()`` if file ``key`` exists, else None; an ``ArtifactError`` is appended
        to ``problems`` (then None)."""
        if not self.exists(key):
            return None
        try:
            return read()
        except ArtifactError as e:
            problems.append(str(e))
            return None
