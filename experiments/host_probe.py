"""The host probe on its own: float32 vs int8 GEMM rates at MiniLM-L6's shapes.

Prints the CPU flags that decide int8 speed (avx512_vnni, amx_int8) and, per GEMM shape
of the encoder (fused Q/K/V, attention output, FFN up, FFN down at ``--tokens`` packed
rows), the float32, int8 x int8 -> int32 and whole W8A8 layer rates, with their ratios.
``icd run`` records the same probe in ``metrics.json`` (``host_probe``).

    .venv/bin/python experiments/host_probe.py [--tokens 512] [--repeats 20]
"""

from absl import app, flags

from icd_jax.runtime import hostprobe

FLAGS = flags.FLAGS
flags.DEFINE_integer("tokens", 512, "Packed rows (m) of each GEMM.")
flags.DEFINE_integer("hidden", 384, "Model width.")
flags.DEFINE_integer("intermediate", 1536, "FFN width.")
flags.DEFINE_integer("repeats", 20, "Timed calls per shape (median).")


def main(argv):
    del argv
    m, h, f = FLAGS.tokens, FLAGS.hidden, FLAGS.intermediate
    p = hostprobe.gemm_rates([(m, h, 3 * h), (m, h, h), (m, h, f), (m, f, h)],
                             repeats=FLAGS.repeats)
    print("CPU flags:", ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in p["flags"].items()))
    print(f"{'(m, k, n)':>18s} {'f32 GOP/s':>10s} {'int8 GOP/s':>11s} {'W8A8 GOP/s':>11s} "
          f"{'int8/f32':>9s} {'W8A8/f32':>9s}")
    for r in p["shapes"]:
        print(f"{str((r['m'], r['k'], r['n'])):>18s} {r['f32_gops']:10.0f} {r['int8_gops']:11.0f} "
              f"{r['w8a8_gops']:11.0f} {r['int8_gops'] / r['f32_gops']:9.2f} "
              f"{r['w8a8_gops'] / r['f32_gops']:9.2f}")
    print(f"all shapes: f32 {p['f32_gops']:.0f}, int8 {p['int8_gops']:.0f}, W8A8 "
          f"{p['w8a8_gops']:.0f} GOP/s; int8 dot {p['int8_speedup']:.2f}x, W8A8 layer "
          f"{p['w8a8_speedup']:.2f}x float32 -> fast int8: {p['fast_int8']}")


if __name__ == "__main__":
    app.run(main)
