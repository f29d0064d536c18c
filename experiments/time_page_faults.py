"""What a page fault costs on this host, the number behind the kernels' memory handling.

Maps ``--mib`` MiB of fresh anonymous memory and writes one byte per 4 KiB page, three
ways, each in ``--rounds`` rounds (the best is printed):

fresh 4 KiB     a new mapping, every page faulted in one by one
fresh + THP     a new mapping advised ``MADV_HUGEPAGE`` first (what ``advise_huge`` in
                ``csrc/common.h`` does): one fault per 2 MiB where the kernel grants it
resident        the same bytes written again once mapped in (no fault)

and the minor page faults each took (``getrusage``). Prints the transparent-huge-page
mode, which decides whether the advice can take effect (``never``: it cannot).

Usage: cd experiments && python time_page_faults.py [--mib 34 --rounds 10]
"""

from __future__ import annotations

import mmap
import os
import resource
import time

import numpy as np
from absl import app, flags
from common import thp_mode

FLAGS = flags.FLAGS
flags.DEFINE_integer("mib", 34, "Size of the mapping in MiB.")
flags.DEFINE_integer("rounds", 10, "Rounds per way (the best is printed).")

PAGE = 4096


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def touch_fresh(size: int, huge: bool) -> tuple[float, int]:
    """Seconds and minor faults to map ``size`` bytes and write a byte per page."""
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        if huge:
            m.madvise(mmap.MADV_HUGEPAGE)
        buf = np.frombuffer(m, np.uint8)
        f0, t0 = faults(), time.perf_counter()
        buf[::PAGE] = 1
        dt, df = time.perf_counter() - t0, faults() - f0
        del buf
    finally:
        m.close()
    return dt, df


def touch_resident(size: int) -> tuple[float, int]:
    buf = np.ones(size, np.uint8)  # every page written: mapped in
    f0, t0 = faults(), time.perf_counter()
    buf[::PAGE] = 2
    return time.perf_counter() - t0, faults() - f0


def main(argv):
    del argv
    size = FLAGS.mib << 20
    print(f"time_page_faults: {os.cpu_count()} cores, transparent huge pages "
          f"'{thp_mode()}', {FLAGS.mib} MiB = {size // PAGE} pages of 4 KiB")
    ways = {"fresh 4 KiB": lambda: touch_fresh(size, False),
            "fresh + THP": lambda: touch_fresh(size, True),
            "resident": lambda: touch_resident(size)}
    best = {name: min((fn() for _ in range(FLAGS.rounds)), key=lambda r: r[0])
            for name, fn in ways.items()}
    print("| way | ms | minor faults | us per 4 KiB page |")
    print("|---|---|---|---|")
    for name, (dt, df) in best.items():
        print(f"| {name} | {dt * 1e3:.2f} | {df} | {dt * 1e6 / (size // PAGE):.3f} |")


if __name__ == "__main__":
    app.run(main)
