"""What a run ran on: versions, CPU, devices and the commit (``config.lock.json``)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np

import icd_jax


def environment() -> dict:
    """Versions, CPU model and the commit, for ``config.lock.json`` (hashed as env_hash)."""
    import jax
    import jaxlib
    import scipy

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    root = os.path.dirname(os.path.dirname(os.path.abspath(icd_jax.__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=False).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    return dict(python=sys.version.split()[0], platform=platform.platform(), cpu=cpu,
                cpu_count=os.cpu_count(), jax=jax.__version__, jaxlib=jaxlib.__version__,
                numpy=np.__version__, scipy=scipy.__version__, backend=jax.default_backend(),
                devices=[str(d) for d in jax.devices()], commit=commit)
