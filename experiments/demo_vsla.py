from absl import app, flags

# isort: split
# A guided tour of vsla_jax (Variable-Shape Linear Algebra on JAX), runs in seconds on CPU.
#
#   .venv/bin/python experiments/demo_vsla.py [--batches 60] [--seed 0]
#
# Shows ambient arithmetic, Model A convolution, Model B Kronecker products, shrink,
# stack/window/pyramid, ragged batches (vs.stack, vs.bucketize), one compilation per
# capacity bucket for a jitted conv over many random-length batches, and gradients.

import logging

import jax
import numpy as np

import vsla_jax as vs

# JAX probes for a TPU when it first picks a backend and logs the failure at INFO, which
# absl prints; it says nothing about this demo.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

FLAGS = flags.FLAGS
flags.DEFINE_integer("batches", 60, "Random-length batches for the compile-count section.")
flags.DEFINE_integer("seed", 0, "Random seed.")


def show(x) -> str:
    """A VarTensor (or array) at its logical shape, as a compact nested list."""
    if isinstance(x, vs.VarTensor):
        x = x.to_list()
    if isinstance(x, list):
        return "[" + ", ".join(show(v) for v in x) + "]"
    arr = np.asarray(x)
    return str(np.round(arr, 4).tolist()).replace(".0,", ",").replace(".0]", "]")


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def demo_semantics() -> None:
    section("1. Ambient arithmetic: shapes promote by zero-extension")
    a, b = vs.tensor([1.0, 2.0, 3.0]), vs.tensor([4.0, 5.0])
    print(f"[1,2,3] + [4,5]          = {show(a + b)}")
    print(f"[1,2,3] - [4,5]          = {show(a - b)}")
    print(f"hadamard([2,3], [4,5,6]) = "
          f"{show(vs.hadamard(vs.tensor([2.0, 3.0]), vs.tensor([4.0, 5.0, 6.0])))}"
          "   (entries in only one operand become 0)")
    print(f"storage: {a}; capacity {a.capacity} holds length {int(a.lengths[0])}")

    section("2. Model A (convolution) and Model B (Kronecker) products")
    print(f"Model A: [1,2] * [3,4]   = {show(vs.tensor([1.0, 2.0]) * vs.tensor([3.0, 4.0]))}"
          "   (full convolution, length m+n-1)")
    print(f"Model A identity [1]:      [1,2,3] * [1] = {show(a * vs.tensor([1.0]))}")
    ka, kb = vs.tensor([1.0, 2.0], model="B"), vs.tensor([3.0, 4.0], model="B")
    print(f"Model B: [1,2] (x) [3,4] = {show(ka * kb)}   (np.kron semantics)")
    print(f"Model B: [3,4] (x) [1,2] = {show(kb * ka)}   (not commutative)")
    m2 = vs.tensor([[1.0, 2.0], [3.0, 4.0]])
    print(f"2-D conv: [[1,2],[3,4]] * [[1,1]] = {show(vs.conv(m2, vs.tensor([[1.0, 1.0]])))}")
    try:
        vs.add(vs.tensor([1.0]), vs.tensor([1.0], model="B"))
    except vs.ModelMismatchError as e:
        print(f"mixing models raises ModelMismatchError: {e}")

    section("3. Minimal representative: shrink drops trailing zeros (lengths only)")
    d = vs.tensor([5.0, 3.0, 2.0]) - vs.tensor([2.0, 1.0, 2.0])
    s = vs.shrink(d)
    print(f"[5,3,2] - [2,1,2] = {show(d)};  shrink -> {show(s)}  "
          f"(lengths {int(d.lengths[0])} -> {int(s.lengths[0])}, capacity stays {s.capacity})")


def demo_stacking() -> None:
    section("4. Stacking: stack, window, pyramid")
    items = [[1.0, 2.0], [3.0, 4.0, 5.0], [6.0], [7.0, 8.0], [9.0]]
    x = vs.stack(items)
    print(f"stack of {len(items)} ragged vectors: {x}")
    print(f"  lengths {np.asarray(x.lengths)[:, 0].tolist()}, items {show(x)}")
    merged = vs.merge_batch(x)
    print(f"  as one rank-2 VSLA tensor (merge_batch): lengths "
          f"{np.asarray(merged.lengths).tolist()} ->\n    {show(merged)}")
    for partial in ("flush", "discard"):
        w = vs.window(items, 2, partial=partial)
        print(f"window(w=2, partial={partial!r}): {w.batch_shape[0]} windows, lengths "
              f"{np.asarray(w.lengths).tolist()}")
        print(f"    {show(w)}")
    levels = vs.pyramid(items, levels=2, w=2)
    for i, lvl in enumerate(levels, 1):
        print(f"pyramid level {i}: rank {lvl.rank}, batch {lvl.batch_shape}, lengths "
              f"{np.asarray(lvl.lengths).tolist()}")


def demo_ragged(rng: np.random.Generator) -> None:
    section("5. A ragged batch: one shared capacity (stack) vs per-bucket (bucketize)")
    lengths = [3, 7, 20, 45, 90, 300, 310, 1000]
    items = [rng.standard_normal(n).astype(np.float32) for n in lengths]
    logical = sum(lengths)
    x = vs.stack(items)
    print(f"lengths {lengths} (sum {logical})")
    print(f"vs.stack:     one VarTensor {x.data.shape}: {x.data.size} elements, "
          f"{x.data.size / logical:.2f}x the logical size")
    rb = vs.bucketize(items)
    print(f"vs.bucketize: {len(rb.buckets)} buckets, {rb.storage_elements()} elements, "
          f"{rb.storage_elements() / rb.logical_elements():.2f}x the logical size")
    print("    (item counts are padded up a count ladder 1, 3, 6, 10, 16, ...; -1 marks a "
          "padding slot)")
    for b, idx in zip(rb.buckets, rb.index):
        print(f"    bucket data {tuple(b.data.shape)} holds items "
              f"{[int(i) for i in idx]}, lengths {np.asarray(b.lengths)[:, 0].tolist()}")
    k = vs.tensor([1.0, -1.0])
    out = rb.map(lambda b: vs.conv(b, k)).to_list()
    ok = all(np.allclose(o, np.convolve(i, [1.0, -1.0]), atol=1e-5) for o, i in zip(out, items))
    print(f"conv of every item with [1,-1] via rb.map: output lengths "
          f"{[len(o) for o in out]}, matches np.convolve: {ok}")


def demo_compiles(rng: np.random.Generator) -> None:
    section("6. jit compiles once per capacity bucket, not once per length")
    # a kernel of length 20 (capacity 24) that no other section uses, so every conv
    # program below is new to conv's jit cache
    k = vs.tensor(rng.standard_normal(20).astype(np.float32))
    conv = jax.jit(vs.conv)  # lengths traced: one program per capacity bucket
    # 6a: whole batches in one VarTensor (vs.stack): the capacity is the bucket of the max
    before = conv._cache_size()
    shapes_a, distinct_lengths = set(), set()
    for _ in range(FLAGS.batches):
        n = rng.integers(10, 101, size=4)
        x = vs.stack([rng.standard_normal(int(m)).astype(np.float32) for m in n])
        jax.block_until_ready(conv(x, k))
        shapes_a.add(tuple(x.data.shape))
        distinct_lengths.add(tuple(n.tolist()))
    print(f"vs.stack: {FLAGS.batches} batches of 4 items, lengths in [10, 100] "
          f"({len(distinct_lengths)} distinct length vectors)")
    print(f"    capacities used {sorted(s[1] for s in shapes_a)}; new conv programs "
          f"compiled: {conv._cache_size() - before} (one per capacity)")
    # 6b: bucketize: a program per (item-count bucket, capacity bucket) shape
    before = conv._cache_size()
    shapes_b = set()
    for _ in range(FLAGS.batches):
        n = np.rint(np.exp(rng.uniform(np.log(8), np.log(400), size=16))).astype(int)
        rb = vs.bucketize([rng.standard_normal(int(m)).astype(np.float32) for m in n])
        jax.block_until_ready(rb.map(lambda b: conv(b, k)))
        shapes_b.update(tuple(b.data.shape) for b in rb.buckets)
    print(f"vs.bucketize: {FLAGS.batches} batches of 16 items, lengths log-uniform in [8, 400]")
    print(f"    {len(shapes_b - shapes_a)} bucket shapes (count, capacity) not seen in 6a; "
          f"new conv programs compiled: {conv._cache_size() - before}")


def demo_grad() -> None:
    section("7. Gradients: exact VJPs with zero slack")
    x = vs.stack([[1.0, 2.0, 3.0], [4.0, 5.0]])
    k = vs.tensor([1.0, 10.0])

    def loss(data):
        return vs.sum(vs.conv(vs.VarTensor(data, x.lengths), k)).sum()

    g = jax.grad(loss)(x.data)
    print(f"x = {show(x)} stored as {x.data.shape}; k = {show(k)}")
    print(f"sum(conv(x, k)) = {float(loss(x.data)):g}")
    print(f"d/dx.data[:, :6] = {np.asarray(g)[:, :6].tolist()}  (all {g.shape[1]} columns: "
          f"nonzeros per row {np.count_nonzero(np.asarray(g), axis=1).tolist()})")
    print("    every logical entry gets sum(k) = 11; slack entries get exactly 0")
    # grad w.r.t. the VarTensor itself: lengths are int32, so JAX needs allow_int=True
    gv = jax.grad(lambda v: vs.sum(vs.conv(v, k)).sum(), allow_int=True)(x)
    print(f"jax.grad(..., allow_int=True)(x) returns a VarTensor; its data equals the above: "
          f"{bool(np.array_equal(np.asarray(gv.data), np.asarray(g)))}")
    gk = jax.grad(lambda kd: vs.sum(vs.conv(x, vs.VarTensor(kd, k.lengths))).sum())(k.data)
    print(f"d/dk = {np.asarray(gk)[:2].tolist()} (= sum of all entries of x per tap: 15)")


def demo_engine(rng: np.random.Generator) -> None:
    section("8. vs.conv picks a plan from the lengths (one cost model)")
    from vsla_jax.conv import engine

    for name, la, lb in [
            ("uniform", np.full(64, 512), np.full(64, 32)),
            ("heavy-tailed", np.clip(rng.lognormal(np.log(300), 1.0, 320), 1, 4000),
             np.clip(rng.lognormal(np.log(30), 1.0, 320), 1, 300))]:
        xs = [rng.standard_normal(int(n)).astype(np.float32) for n in la]
        ks = [rng.standard_normal(int(n)).astype(np.float32) for n in lb]
        a, k = vs.stack(xs), vs.stack(ks)
        plan, predicted = engine.choose_plan(a, k)
        out = vs.conv(a, k).to_list()
        ok = all(np.allclose(o, np.convolve(x, kk), atol=1e-3) for o, x, kk in zip(out, xs, ks))
        print(f"{name:12s} batch of {len(xs)}: capacities {a.capacity}/{k.capacity}; plan "
              f"{plan!r}; predicted ms " + ", ".join(f"{p} {t * 1e3:.2f}" for p, t in
                                                      predicted.items()) +
              f"; matches np.convolve: {ok}")
    print(f"cost model: {vs.ConvPolicy().cost_model().source} (vs.calibrate() fits it to this "
          "machine on the first eager call; timings: BENCHMARKS.md)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    print(f"vsla_jax {vs.__version__} on jax {jax.__version__} ({jax.default_backend()})")
    rng = np.random.default_rng(FLAGS.seed)
    demo_semantics()
    demo_stacking()
    demo_ragged(rng)
    demo_compiles(rng)
    demo_grad()
    demo_engine(rng)


if __name__ == "__main__":
    app.run(main)
