"""Run one arm of a run once, in its own process: what Nsight Compute profiles.

    python -m icd_jax.runtime.probe RUN_DIR ARM [CALLS]

rebuilds the run's model from ``config.lock.json``, the arm's layout from its
``perm_*.json`` (``identity`` and ``dense`` need none) and runs the timed item set
``CALLS`` times (default 2: the first compiles). ``measure.ncu_l2_hit`` wraps this
command with ``ncu --metrics lts__t_sector_hit_rate.pct``.
"""

from __future__ import annotations

import os
import sys

import jax

from icd_jax.errors import ConfigError
from icd_jax.runtime import artifacts, config, targets
from icd_jax.runtime.artifacts import FILES

PERM_FILES = {"before": "perm_before", "after": "perm_after"}


def arm_of(run_dir: str, arm: str):
    """``(target, Arm)`` of ``arm`` in the run at ``run_dir``."""
    lock = artifacts.read_json(os.path.join(run_dir, FILES["lock"]))
    cfg = config.load(lock.get("config", {}))
    t = targets.make(cfg)
    if arm == "dense":
        return t, t.dense_arm()
    if arm == "identity":
        return t, t.arm("identity", t.identity(), cfg.transform)
    if arm not in PERM_FILES:
        raise ConfigError(f"unknown arm {arm!r}; choose dense, identity, before, after")
    perms, _ = artifacts.load_perms(os.path.join(run_dir, FILES[PERM_FILES[arm]]))
    return t, t.arm(arm, dict(t.identity(), **perms), cfg.transform)


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    t, a = arm_of(argv[1], argv[2])
    fn = t.call(a)
    for _ in range(int(argv[3]) if len(argv) == 4 else 2):
        jax.block_until_ready(fn())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
