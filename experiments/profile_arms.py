"""Where the transformed MiniLM arms of ``icd run`` spend their time.

Builds the arms with the pipeline's own objects (``targets.make(cfg)``, ``target.arm(name,
target.identity(), cfg.transform)``, ``target.call(arm)``, ``target.dense_arm()``) on the
timed set of the config (``--config``, default the default run's ``configs/minilm.yaml``;
``--set key=value`` overrides everything, as ``icd run --set`` does), and prints:

1. the CPU flags that decide which int8 kernels XLA can use (avx2, avx512_vnni,
   amx_int8, ...);
2. per arm, wall-clock per call of the timed set, arms interleaved over ``--rounds``
   rounds after ``--warmup`` calls (``measure.interleaved``, the pipeline's timer):
   median, IQR and the change against dense fp32. Arms (``--arms``): ``dense``, ``S``
   (activation-sparse FFN only), ``Q`` (quantisation only, as configured), ``K``
   (key-block drop only), ``SQK`` (all three as configured), ``Q-pc-static`` and
   ``Q-pc-dynamic`` (int8 with per-channel weight scales and static per-tensor or
   dynamic per-token activation scales: real int8 x int8 -> int32 dots);
3. an op census of each arm's compiled forward on the largest timed batch
   (``jax.jit(...).lower(...).compile().as_text()``): the opcodes whose count differs
   between arms (custom calls by target);
4. the suspect pieces timed alone at the model's shapes, on the model's own inputs
   (captured kernel inputs of the timed batches), every layer and every timed batch per
   call, so each row is in ms per timed set like the arm table: the FFN down projection
   dense and activation-sparse, with its ``lax.top_k`` over ``[T, intermediate]`` and the
   tile sort (``top_k`` over ``[T, intermediate / tile]`` tile counts) of
   ``adapters/ffn.py``; the four matmuls per layer in float32 and through
   ``quant.matmul`` (group-wise static, per-channel static and dynamic), with the
   per-call weight dequantisation and the fake-quantised activations of the group-wise
   path alone; attention with and without key-block drop, and ``kv.select`` alone.

A piece the code under test no longer has is reported as ``n/a`` with the reason.
"""

from __future__ import annotations

import os
import platform
from collections import Counter

from absl import app, flags

flags.DEFINE_string("config", "configs/minilm.yaml", "Run config (the default run's).")
flags.DEFINE_multi_string("set", [], "key=value overrides applied to every arm.")
flags.DEFINE_list("arms", ["dense", "S", "Q", "K", "SQK", "Q-pc-static", "Q-pc-dynamic"],
                  "Arms to time.")
flags.DEFINE_integer("rounds", 15, "Interleaved timed rounds.")
flags.DEFINE_integer("warmup", 2, "Untimed calls per arm or piece first.")
flags.DEFINE_integer("op_rounds", 15, "Interleaved timed rounds of the isolated pieces.")
flags.DEFINE_bool("census", True, "Count the ops of each arm's compiled forward.")
flags.DEFINE_bool("pieces", True, "Time the suspect pieces in isolation.")
flags.DEFINE_string("hlo_dir", "", "Also write each arm's compiled HLO text here.")
flags.DEFINE_string("json_out", "", "Also write the results to this JSON file.")
FLAGS = flags.FLAGS

OFF = {"sparsity": "transform.sparsity.enabled=false", "quant": "transform.quant.enabled=false",
       "kv": "transform.kv.enabled=false"}
ON = {"sparsity": "transform.sparsity.enabled=true", "quant": "transform.quant.enabled=true",
      "kv": "transform.kv.enabled=true"}
#: arm -> config overrides on top of the base config (None: ``target.dense_arm()``)
ARMS = {
    "dense": None,
    "S": [ON["sparsity"], OFF["quant"], OFF["kv"]],
    "Q": [OFF["sparsity"], ON["quant"], OFF["kv"]],
    "K": [OFF["sparsity"], OFF["quant"], ON["kv"]],
    "SQK": [ON["sparsity"], ON["quant"], ON["kv"]],
    "Q-pc-static": [OFF["sparsity"], ON["quant"], OFF["kv"], "transform.quant.dtype=int8",
                    "transform.quant.group_size=null", "transform.quant.act=static"],
    "Q-pc-dynamic": [OFF["sparsity"], ON["quant"], OFF["kv"], "transform.quant.dtype=int8",
                     "transform.quant.group_size=null", "transform.quant.act=dynamic"],
}
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16")


def cpu_info() -> dict:
    """Model name and the int8-relevant flags of the first CPU in ``/proc/cpuinfo``."""
    model, have = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine()):
                    model = val.strip()
                if key.strip() == "flags":
                    have = set(val.split())
                    break
    except OSError:
        pass
    return dict(model=model, cpus=os.cpu_count(), flags={f: f in have for f in CPU_FLAGS})


def stats_ms(samples_s) -> dict:
    import numpy as np

    s = np.asarray(samples_s, np.float64) * 1e3
    p25, p50, p75 = np.percentile(s, [25, 50, 75])
    return dict(median_ms=float(p50), p25_ms=float(p25), p75_ms=float(p75),
                iqr_ms=float(p75 - p25), samples_ms=s.tolist())


def op_census(hlo: str) -> Counter:
    """Opcode counts of compiled HLO text (custom calls by target; fused computations'
    bodies included, so a fused op counts too)."""
    import re

    out = Counter()
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%\S+\s*=\s*.*?\s([a-z][a-z0-9-]*)\(", line)
        if not m or " = " not in line:
            continue
        op = m.group(1)
        if op == "custom-call":
            t = re.search(r'custom_call_target="([^"]+)"', line)
            op = f"custom-call:{t.group(1) if t else '?'}"
        out[op] += 1
    return out


def print_table(header: list[str], rows: list[list[str]]) -> None:
    w = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w[i]}}}" for i in range(len(header)))
    print(fmt.format(*header))
    for r in rows:
        print(fmt.format(*r))


# -- isolated pieces ------------------------------------------------------------------------
def layer_inputs(target) -> list[dict]:
    """Per timed batch: per layer the kernel inputs ``[T, in]`` (slack rows included, as
    the model runs them) and the padded ``q, k, v [B, C, H, Dh]`` of its attention."""
    import jax.numpy as jnp
    import numpy as np

    from icd_jax.models import minilm
    from icd_jax.permute import flat

    enc, c = target.enc, target.config
    run = minilm.capture_fn(enc, capture=False, record_inputs=True)
    fp = flat(enc.params)
    out = []
    for b in target.time_batches:
        arrays = b.arrays()
        _, inter = run(enc.params, *arrays)
        fi = flat(inter)
        gather, lengths = jnp.asarray(b.gather), jnp.asarray(b.lengths)
        layers = []
        for i in range(c.layers):
            pre = f"layer_{i}"
            h = fi[f"{pre}/attention/qkv_input"][0]
            qkv = jnp.concatenate([h @ fp[f"{pre}/attention/{n}/kernel"]
                                   + fp[f"{pre}/attention/{n}/bias"]
                                   for n in ("query", "key", "value")], axis=1)
            bsz, cap = gather.shape

            def padded(x, gather=gather, bsz=bsz, cap=cap):
                x = jnp.take(x, gather, axis=0, mode="fill", fill_value=0)
                return x.reshape(bsz, cap, c.heads, c.head_dim)

            q, k, v = (padded(qkv[:, j * c.hidden:(j + 1) * c.hidden]) for j in range(3))
            layers.append(dict(
                qkv_in=h, attn_out_in=fi[f"{pre}/attention/output/input"][0],
                inter_in=fi[f"{pre}/intermediate/input"][0],
                ffn_in=fi[f"{pre}/output/input"][0], q=q, k=k, v=v, lengths=lengths))
        out.append(dict(tokens=int(np.asarray(arrays[0]).shape[0]), items=int(bsz),
                        capacity=int(cap), layers=layers))
    return out


def layer_kernels(params, layers: int) -> list[dict]:
    """Per layer the (possibly quantised) kernels and biases the model reads."""
    from icd_jax.permute import flat

    fp = flat(params)
    out = []
    for i in range(layers):
        pre = f"layer_{i}"
        out.append(dict(
            qkv=[fp[f"{pre}/attention/{n}/kernel"] for n in ("query", "key", "value")],
            qkv_b=[fp[f"{pre}/attention/{n}/bias"] for n in ("query", "key", "value")],
            attn_out=fp[f"{pre}/attention/output/kernel"],
            attn_out_b=fp[f"{pre}/attention/output/bias"],
            inter=fp[f"{pre}/intermediate/kernel"], inter_b=fp[f"{pre}/intermediate/bias"],
            out=fp[f"{pre}/output/kernel"], out_b=fp[f"{pre}/output/bias"]))
    return out


def pieces(target, cfg, arms: dict) -> dict:
    """``{label: (description, callable running it on every layer of every timed batch)}``;
    a piece whose code is missing maps to ``(description, reason string)``."""
    import jax
    import jax.numpy as jnp

    from icd_jax.adapters import ffn, kv, quant

    c = target.config
    s, kvc = cfg.transform.sparsity, cfg.transform.kv
    top_k = max(1, round(s.top_frac * c.intermediate))
    n_tiles = c.intermediate // s.tile
    ins = layer_inputs(target)
    dense_k = layer_kernels(target.enc.params, c.layers)
    out: dict = {}

    def add(label, desc, per_layer, kernels, fields):
        """``per_layer(inputs_of_layer, kernels_of_layer)`` jitted over all layers."""
        if isinstance(kernels, str):
            out[label] = (desc, kernels)
            return

        @jax.jit
        def run(xs, ks):
            return [per_layer(x, k) for x, k in zip(xs, ks)]

        batches = [[{f: lay[f] for f in fields} for lay in b["layers"]] for b in ins]
        try:  # compile now, so a piece the code cannot run is reported, not fatal
            for xs in batches:
                jax.block_until_ready(run(xs, kernels))
        except Exception as e:  # noqa: BLE001 - report the missing piece, keep going
            out[label] = (desc, f"{type(e).__name__}: {str(e)[:120]}")
            return
        out[label] = (desc, lambda: [run(xs, kernels) for xs in batches])

    def missing(name):
        return f"this code has no {name}"

    # S: the activation-sparse FFN down projection (adapters/ffn.py, models/minilm.Linear)
    add("ffn down fp32", "f @ W2 + b2, [T, F] @ [F, H]",
        lambda x, k: x["ffn_in"] @ k["out"] + k["out_b"], dense_k, ["ffn_in"])
    add("top_k |f|", f"lax.top_k(|f| [T, {c.intermediate}], k={top_k})",
        lambda x, k: jax.lax.top_k(jnp.abs(x["ffn_in"]), top_k), dense_k, ["ffn_in"])
    add("active_mask", "top_k + scatter into bool [T, F] (ffn.active_mask)",
        lambda x, k: ffn.active_mask(x["ffn_in"], top_k=top_k), dense_k, ["ffn_in"])

    def counts(x):
        return ffn.tile_counts(ffn.active_mask(x["ffn_in"], top_k=top_k), s.tile, 1)

    add("tile counts", f"active_mask + tile_counts -> int32 [T, {n_tiles}]",
        lambda x, k: counts(x), dense_k, ["ffn_in"])
    add("tile sort", f"active_mask + tile_counts + lax.top_k(int32 [T, {n_tiles}], "
        f"k={n_tiles}) (plan_tiles' top_k)",
        lambda x, k: jax.lax.top_k(counts(x), n_tiles), dense_k, ["ffn_in"])
    add("plan_tiles", "active_mask + ffn.plan_tiles (k_cap = F / tile)",
        lambda x, k: ffn.plan_tiles(ffn.active_mask(x["ffn_in"], top_k=top_k),
                                    tile=s.tile, group=1, k_cap=n_tiles), dense_k, ["ffn_in"])
    add("S ffn down", "active_mask + ffn.sparse_down (what the S arm's Linear runs)",
        lambda x, k: ffn.sparse_down(x["ffn_in"], k["out"], k["out_b"],
                                     ffn.active_mask(x["ffn_in"], top_k=top_k),
                                     tile=s.tile, group=1, k_cap=n_tiles),
        dense_k, ["ffn_in"])

    # Q: the four matmuls per layer (Attention's fused QKV, attention output, FFN up/down)
    def matmuls(x, k):
        qkv = quant.matmul(x["qkv_in"], quant.concat_out(k["qkv"])) + jnp.concatenate(
            k["qkv_b"])
        return (qkv, quant.matmul(x["attn_out_in"], k["attn_out"]) + k["attn_out_b"],
                quant.matmul(x["inter_in"], k["inter"]) + k["inter_b"],
                quant.matmul(x["ffn_in"], k["out"]) + k["out_b"])

    mm_fields = ["qkv_in", "attn_out_in", "inter_in", "ffn_in"]
    add("4 matmuls fp32", "QKV (concat), attn out, FFN up, FFN down in float32",
        matmuls, dense_k, mm_fields)
    for arm_name in ("Q", "Q-pc-static", "Q-pc-dynamic"):
        if arm_name not in arms:
            continue
        qk = layer_kernels(arms[arm_name].params, c.layers)
        first = qk[0]["inter"]
        if not isinstance(first, quant.Quantized):
            continue
        what = (f"{first.dtype} g={first.group_size} act={first.act}")
        add(f"4 matmuls {arm_name}", f"quant.matmul, {what}", matmuls, qk, mm_fields)
        if arm_name != "Q" or first.group_size is None:
            continue

        def dequant(x, k):
            return tuple(kk.dequantize() for kk in (quant.concat_out(k["qkv"]), k["attn_out"],
                                                     k["inter"], k["out"]))

        add("Q weight dequant", f"Quantized.dequantize() of the 4 kernels ({what}), "
            "per call", dequant, qk, [])
        fq = getattr(quant, "fake_quant_groups", None)

        def fake(x, k, fq=fq):
            return tuple(fq(x[f], kk.act_scale) for f, kk in zip(
                mm_fields, (quant.concat_out(k["qkv"]), k["attn_out"], k["inter"],
                            k["out"])))

        add("Q act fake-quant", "fake_quant_groups of the 4 inputs (static group scales)",
            fake, qk if fq is not None and first.act_scale is not None
            else missing("group-wise static activation scales"), mm_fields)

        deq = [dict(zip(mm_fields, [jnp.asarray(kk.dequantize()) for kk in (
            quant.concat_out(k["qkv"]), k["attn_out"], k["inter"], k["out"])]))
            for k in qk]
        add("Q dots on dequantised W", "x @ W for the 4 pre-dequantised kernels (the dots "
            "alone)", lambda x, k: tuple(x[f] @ k[f] for f in mm_fields), deq, mm_fields)

    # K: attention with key-block drop (adapters/kv.py)
    import vsla_jax as vs

    def vt(x, n):
        return vs.VarTensor.trusted(x, n[:, None])

    k_fields = ["q", "k", "v", "lengths"]
    add("attention", "vs.attention over all keys",
        lambda x, k: vs.attention(vt(x["q"], x["lengths"]), vt(x["k"], x["lengths"]),
                                  vt(x["v"], x["lengths"]), backend=target.enc.backend).data,
        dense_k, k_fields)
    add("kv.select", f"key-block selection (block {kvc.block}, drop {kvc.drop}): "
        "scores + argsorts",
        lambda x, k: kv.select(x["q"], x["k"], x["lengths"], block=kvc.block, drop=kvc.drop,
                               permute_tokens=kvc.permute_tokens), dense_k, k_fields)
    add("kv_drop_attention", "select + gather + attention over the kept keys",
        lambda x, k: kv.kv_drop_attention(x["q"], x["k"], x["v"], x["lengths"],
                                          block=kvc.block, drop=kvc.drop,
                                          permute_tokens=kvc.permute_tokens,
                                          backend=target.enc.backend), dense_k, k_fields)
    shapes = [dict(tokens=b["tokens"], items=b["items"], capacity=b["capacity"]) for b in ins]
    return dict(pieces=out, shapes=shapes)


def main(argv):
    del argv
    import jax
    import numpy as np
    from common import write_json_atomic

    import icd_jax
    from icd_jax.runtime import config as config_lib
    from icd_jax.runtime import measure, targets

    cpu = cpu_info()
    print(f"icd_jax from {os.path.dirname(icd_jax.__file__)}; jax {jax.__version__} on "
          f"{jax.devices()[0].platform}; {cpu['model']}, {cpu['cpus']} CPUs")
    print("CPU flags: " + ", ".join(f"{k} {'yes' if v else 'no'}"
                                    for k, v in cpu["flags"].items()))
    base = config_lib.load(FLAGS.config, FLAGS.set)
    target = targets.make(base)
    t = base.transform
    print(f"config {FLAGS.config} {' '.join(FLAGS.set)}: sparsity {t.sparsity.kind} "
          f"top_frac {t.sparsity.top_frac} tile {t.sparsity.tile}; quant {t.quant.dtype} "
          f"g={t.quant.group_size} act={t.quant.act}; kv block {t.kv.block} drop "
          f"{t.kv.drop}")
    shapes = [tuple(np.asarray(b.arrays()[3]).shape) + (np.asarray(b.arrays()[0]).shape[0],)
              for b in target.time_batches]
    print(f"timed set: {base.measure.sentences} sentences, {target.tokens} tokens, "
          f"{len(target.time_batches)} batches (items, capacity, packed rows T): {shapes}")

    arms, cfgs, skipped = {}, {}, {}
    for name in FLAGS.arms:
        if name not in ARMS:
            raise app.UsageError(f"unknown arm {name!r}; choose from {list(ARMS)}")
        if ARMS[name] is None:
            arms[name] = target.dense_arm()
            continue
        cfgs[name] = config_lib.load(base, ARMS[name])
        try:
            arms[name] = target.arm(name, target.identity(), cfgs[name].transform)
        except Exception as e:  # noqa: BLE001 - an arm this code cannot build is reported
            print(f"  arm {name}: n/a ({type(e).__name__}: {str(e)[:160]})")
            skipped[name] = f"{type(e).__name__}: {e}"
            continue
        bad = [k for k, m in arms[name].meta.items() if not m.get("ok", True)]
        if bad:
            print(f"  warning: arm {name}: transforms {bad} failed (ran as no-ops)")

    result: dict = dict(cpu=cpu, config=FLAGS.config, set=list(FLAGS.set),
                        tokens=target.tokens, batches=shapes, arms={}, census={}, pieces={},
                        arms_not_built=skipped)
    print(f"\n== arms: {FLAGS.rounds} interleaved rounds after {FLAGS.warmup} warm-up calls, "
          "ms per call of the timed set")
    samples = measure.interleaved({n: target.call(a) for n, a in arms.items()},
                                  FLAGS.rounds, FLAGS.warmup)
    st = {n: stats_ms(s) for n, s in samples.items()}
    ref = st.get("dense", {}).get("median_ms")
    rows = []
    for n, v in st.items():
        pct = 100.0 * (v["median_ms"] - ref) / ref if ref else float("nan")
        rows.append([n, f"{v['median_ms']:.1f}", f"{v['p25_ms']:.1f}-{v['p75_ms']:.1f}",
                     f"{v['iqr_ms']:.1f}", f"{pct:+.0f}%", " ".join(ARMS[n] or [])])
        result["arms"][n] = dict(v, vs_dense_pct=pct, overrides=ARMS[n])
    print_table(["arm", "median ms", "p25-p75", "IQR", "vs dense", "overrides"], rows)

    if FLAGS.census:
        big = max(target.time_batches, key=lambda b: np.asarray(b.arrays()[0]).shape[0])
        counts = {}
        for n, a in arms.items():
            hlo = a.runner.forward.lower(a.params, *big.arrays()).compile().as_text()
            counts[n] = op_census(hlo)
            if FLAGS.hlo_dir:
                os.makedirs(FLAGS.hlo_dir, exist_ok=True)
                with open(os.path.join(FLAGS.hlo_dir, f"{n}.hlo.txt"), "w") as f:
                    f.write(hlo)
        ops = [o for o in sorted({o for cnt in counts.values() for o in cnt})
               if len({cnt.get(o, 0) for cnt in counts.values()}) > 1]
        print(f"\n== op census of the compiled forward (batch of T="
              f"{np.asarray(big.arrays()[0]).shape[0]} rows): opcodes whose count differs "
              "between arms")
        print_table(["op", *counts], [[o, *[str(counts[n].get(o, 0)) for n in counts]]
                                      for o in ops])
        result["census"] = {n: dict(cnt) for n, cnt in counts.items()}

    if FLAGS.pieces:
        built = pieces(target, base, arms)
        ps = built["pieces"]
        runnable = {k: fn for k, (_, fn) in ps.items() if callable(fn)}
        print(f"\n== isolated pieces: every layer ({target.config.layers}) of every timed batch "
              f"{[(s['items'], s['capacity'], s['tokens']) for s in built['shapes']]} per call; "
              f"{FLAGS.op_rounds} interleaved rounds, ms per timed set")
        psamp = measure.interleaved(runnable, FLAGS.op_rounds, FLAGS.warmup)
        rows = []
        for k, (desc, fn) in ps.items():
            if not callable(fn):
                rows.append([k, "n/a", "", fn])
                result["pieces"][k] = dict(description=desc, missing=fn)
                continue
            v = stats_ms(psamp[k])
            rows.append([k, f"{v['median_ms']:.2f}", f"{v['iqr_ms']:.2f}", desc])
            result["pieces"][k] = dict(v, description=desc)
        print_table(["piece", "median ms", "IQR", "what"], rows)
        result["piece_shapes"] = built["shapes"]
    if FLAGS.json_out:
        write_json_atomic(FLAGS.json_out, result)


if __name__ == "__main__":
    app.run(main)
