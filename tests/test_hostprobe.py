"""The host probe: CPU flags from a cpuinfo file, GEMM rates, and the one-line reason."""

import numpy as np

from icd_jax.runtime import hostprobe


def test_cpu_flags_read_the_flags_line(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512_vnni sse\n"
                 "flags\t\t: amx_int8\n")
    got = hostprobe.cpu_flags(("avx2", "avx512_vnni", "amx_int8"), str(f))
    assert got == {"avx2": True, "avx512_vnni": True, "amx_int8": False}  # first line only
    assert hostprobe.cpu_flags(("avx2",), str(tmp_path / "missing")) == {"avx2": False}


def test_gemm_rates_are_consistent_with_their_timings():
    p = hostprobe.gemm_rates([(16, 32, 8), (8, 64, 16)], repeats=2)
    assert len(p["shapes"]) == 2
    for r in p["shapes"]:
        assert r["f32_gops"] > 0 and r["int8_gops"] > 0 and r["w8a8_gops"] > 0
    # op-weighted totals: total ops / total time, so they lie between the shapes' rates
    for key in ("f32_gops", "int8_gops", "w8a8_gops"):
        rates = [r[key] for r in p["shapes"]]
        assert min(rates) * 0.999 <= p[key] <= max(rates) * 1.001
    assert np.isclose(p["w8a8_speedup"], p["w8a8_gops"] / p["f32_gops"])
    assert p["fast_int8"] == (p["w8a8_speedup"] >= hostprobe.FAST_INT8)
    line = hostprobe.describe(p)
    assert "float32" in line and "int8" in line and "CPU flags" in line
    assert hostprobe.describe(None) == "host probe not run"
