"""The permutation cache: fitted orders on disk, keyed by a hash of what determines them."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
from filelock import FileLock, Timeout

from icd_jax.errors import ArtifactError, ConfigError, ICDError, RunLockedError
from icd_jax.runtime import artifacts
from icd_jax.runtime import config as config_lib

log = logging.getLogger("icd")


class PermCache:
    """Permutations on disk keyed by a hash of what determines them; a ``FileLock`` per
    key makes a concurrent run wait and then reuse instead of fitting twice."""

    def __init__(self, cfg: config_lib.Cache, reuse: bool):
        check_dir(cfg)
        self.enabled, self.reuse = cfg.enabled, reuse
        self.dir = os.path.expanduser(cfg.dir)
        self.timeout = cfg.lock_timeout_s

    def get_or_fit(self, key_payload: dict, fit: Callable[[], tuple[np.ndarray, dict]],
                   size: int | None = None, stats: tuple[str, ...] = ()
                   ) -> tuple[np.ndarray, dict, bool]:
        """``(perm, stats, hit)``; ``size``: the permutation's length, ``stats``: the
        numbers its stats must hold (a cached entry that does not fit, like a corrupt
        one, is refitted)."""
        if not self.enabled:
            pi, st = fit()
            return pi, st, False
        key = config_lib.digest(key_payload)
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, f"{key}.json")
        try:
            with FileLock(path + ".lock", timeout=self.timeout):
                if self.reuse and os.path.exists(path):
                    try:
                        pi, st = checked_entry(path, size, stats)
                        return pi, dict(st, cache="hit"), True
                    except ICDError as e:
                        log.warning("permutation cache entry %s is corrupt (%s); refitting",
                                    path, e)
                pi, st = fit()
                artifacts.save_perms(path, {"pi": pi}, {"stats": st, "key": key_payload})
                return pi, dict(st, cache="miss"), False
        except Timeout as e:
            raise RunLockedError(f"permutation cache entry {path} is locked by another run "
                                 f"for more than {self.timeout} s") from e


def dir_problem(path: str) -> str | None:
    """Why the folder ``path`` (``~`` expanded) cannot hold the cache, or None: it is a
    file, lies under a file, or cannot be written or created (nothing is created)."""
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.lexists(full):
        if not os.path.isdir(full):
            return f"{path} exists and is not a folder"
        return None if os.access(full, os.W_OK | os.X_OK) else f"{path} is not writable"
    parent = os.path.dirname(full)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is not a folder, so {path} cannot be created"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{path} cannot be created: {parent} is not writable"
    return None


def check_dir(cfg: config_lib.Cache) -> None:
    """``ConfigError`` naming ``cache.dir`` when the cache is enabled and its folder is
    unusable (``dir_problem``): raised before any stage runs, not as a rollback."""
    problem = dir_problem(cfg.dir) if cfg.enabled else None
    if problem:
        raise ConfigError(f"invalid config: cache.dir: {problem}; choose another folder or "
                          "set cache.enabled to false")


#: The statistics of a fit that a run prints (``get_or_fit(..., stats=FIT_STATS)``).
FIT_STATS = ("C", "C_identity", "Q", "Q_identity")


def checked_entry(path: str, size: int | None, names: tuple[str, ...] = ()
                  ) -> tuple[np.ndarray, dict]:
    """``(pi, stats)`` of a cache entry, or ``ArtifactError`` naming what is wrong: no
    ``pi``, a permutation of another length, stats that are not a dict or lack one of
    the numbers ``names``."""
    perms, meta = artifacts.load_perms(path)
    if "pi" not in perms:
        raise ArtifactError(f"{path}: no 'pi' permutation (has {sorted(perms)[:3]})")
    pi = perms["pi"]
    if size is not None and pi.size != size:
        raise ArtifactError(f"{path}: pi has {pi.size} entries, the axis {size}")
    stats = meta.get("stats") if isinstance(meta, dict) else None
    if not isinstance(stats, dict) or not all(
            isinstance(stats.get(k), (int, float)) and not isinstance(stats.get(k), bool)
            for k in names):
        raise ArtifactError(f"{path}: meta.stats must be a dict holding the numbers "
                            f"{', '.join(names) or '(none required)'}")
    return pi, stats
