"""Our attention GEMM vs OpenBLAS sgemm on the attention kernel's tile products.

Cuts the GEMM out of csrc/attention.cc (so the code timed is the code the kernel runs),
compiles it with the timing harness gemm_tile_bench.cc against scipy-openblas32, runs it
single-threaded and prints a markdown table.

    pip install scipy-openblas32
    flock /tmp/bench.lock python experiments/gemm_tile_bench.py
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE / "gemm_tile_bench.cc"
ATTENTION = HERE.parent / "csrc" / "attention.cc"
COPY_START = "// One 64-byte SIMD vector"
COPY_END_SRC = "// ---------------------------------------------------------------- vector helpers"
FLAGS = ("avx2", "avx512f", "avx512_vnni", "amx_tile")


def extract_gemm() -> str:
    """The GEMM section of csrc/attention.cc (ValueError if its markers moved)."""
    src = ATTENTION.read_text()
    a = src.index(COPY_START)
    return src[a : src.index(COPY_END_SRC, a)]


def cpu_info() -> tuple[str, dict[str, bool]]:
    model, flags = "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name" and model == "?":
                model = val.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(val.split())
    except OSError:
        pass
    return model, {f: f in flags for f in FLAGS}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-trial-s", type=float, default=0.1, help="seconds per timing trial")
    ap.add_argument("--trials", type=int, default=5, help="trials per case and implementation")
    ap.add_argument("--cxx", default="g++")
    ap.add_argument("--out", default="/tmp/gemm_tile_bench/bench", help="the binary to build")
    args = ap.parse_args()

    try:
        import scipy_openblas32 as sob
    except ImportError:
        print("SKIP: scipy_openblas32 not installed (pip install scipy-openblas32)")
        return 0
    if shutil.which(args.cxx) is None:
        print(f"SKIP: C++ compiler {args.cxx!r} not found")
        return 0
    try:
        gemm = extract_gemm()
    except ValueError:
        print(f"ERROR: GEMM markers not found in {ATTENTION}", file=sys.stderr)
        return 1
    build = Path(args.out).parent
    build.mkdir(parents=True, exist_ok=True)
    (build / "attention_gemm.inc").write_text(gemm)

    inc, lib, name = sob.get_include_dir(), sob.get_lib_dir(), sob.get_library()
    cmd = [
        args.cxx,
        "-O3",
        "-std=c++17",
        "-Wno-psabi",
        str(SRC),
        f"-I{build}",
        f"-I{inc}",
        f"-L{lib}",
        f"-l{name}",
        f"-Wl,-rpath,{lib}",
        "-o",
        args.out,
    ]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)

    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    out = subprocess.run(
        [args.out, str(args.min_trial_s), str(args.trials)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    comments = [line for line in out.splitlines() if line.startswith("#")]
    rows = list(
        csv.DictReader(
            io.StringIO("\n".join(line for line in out.splitlines() if not line.startswith("#")))
        )
    )

    model, flags = cpu_info()
    print(f"CPU: {model}; " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in flags.items()))
    for c in comments:
        print(c.lstrip("# "))
    print(
        f"single-threaded, float32, warm data; best (median) of {args.trials} trials of "
        f">= {args.min_trial_s} s; ratio > 1: ours is faster\n"
    )
    print(
        "| case | m,n,k | A strides (rsa,csa) | ldb | ours ns | BLAS ns "
        "| BLAS/ours | ours GF/s | BLAS GF/s | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m, n, k = int(r["m"]), int(r["n"]), int(r["k"])
        ours, blas = float(r["ours_best_ns"]), float(r["blas_best_ns"])
        flop = 2.0 * m * n * k
        print(
            f"| {r['case']} | {m},{n},{k} | {r['rsa']},{r['csa']} | {r['ldb']} "
            f"| {ours:.0f} ({float(r['ours_med_ns']):.0f}) "
            f"| {blas:.0f} ({float(r['blas_med_ns']):.0f}) | {blas / ours:.2f} "
            f"| {flop / ours:.0f} | {flop / blas:.0f} | {float(r['maxdiff']):.2g} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
