"""Mamba-1 scoring and decoding throughput: capacity-bucketed VarTensors vs padding to the max.

Model: mamba-130m widths (d_model 768, d_inner 1536, d_state 16, vocab 50280) with
random seeded weights and ``--n_layers`` layers (24 is the real depth; the default is
fewer so that the run fits a few minutes on 2 shared cores: time scales ~linearly in the
layer count, the tied vocabulary head being a fixed extra share).

Scoring (the prefill: logits at every position plus the recurrent state) of ``--batch``
sequences with lognormal lengths (median ``--median_len``, sigma ``--sigma``) clipped to
``[--min_len, --max_len]``:
  ``vsla bucketed``  ``vs.bucketize`` groups the items by a power-of-two capacity bucket
                     (16, 32, ...); one call per bucket, each over its own capacity;
  ``padded to max``  the peer: every sequence padded to the batch's longest length, one
                     call over all ``B * max_len`` positions;
  ``vsla one capacity`` (``--all_rows``) ``vs.stack``: one VarTensor at the bucket of
                     the longest length (what ``mamba.forward`` on a list does).
All rows run the same jitted ``mamba.run_padded`` (scan chunk ``--chunk``) and count real
tokens only (``positions``: the positions each row computes on, slack included).
Decoding: ``mamba.decode`` (one ``lax.scan`` over the step program) of
``--decode_tokens`` tokens after a ``--prompt_len`` prefill, at B=1 and B=8; tokens/s
counts the steps taken.

Every row is compiled and run once first (excluded), then timed in ``--rounds``
interleaved rounds; the table shows medians and ratios.

Usage: python experiments/bench_mamba.py [--n_layers 24] [--rounds 3] [--json_out F]
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from common import write_json_atomic

import vsla_jax as vs
from icd_jax.models import mamba

FLAGS = flags.FLAGS
flags.DEFINE_integer("n_layers", 2, "Layers (mamba-130m has 24).")
flags.DEFINE_integer("batch", 8, "Sequences scored in one batch.")
flags.DEFINE_float("median_len", 64.0, "Median of the lognormal lengths.")
flags.DEFINE_float("sigma", 1.0, "Sigma of the lognormal lengths.")
flags.DEFINE_integer("min_len", 16, "Shortest length (clip).")
flags.DEFINE_integer("max_len", 512, "Longest length (clip).")
flags.DEFINE_integer("chunk", mamba.DEFAULT_CHUNK, "Scan chunk (0: one associative scan).")
flags.DEFINE_integer("rounds", 3, "Timed interleaved rounds (median).")
flags.DEFINE_integer("prompt_len", 16, "Prompt length before decoding.")
flags.DEFINE_integer("decode_tokens", 32, "Tokens decoded per timed decode call.")
flags.DEFINE_integer("seed", 0, "Seed of the weights, lengths and tokens.")
flags.DEFINE_bool("all_rows", False, "Also time one VarTensor at a single capacity.")
flags.DEFINE_string("json_out", None, "Optional JSON results path (written atomically).")


def once(fn: Callable[[], object]) -> float:
    """Seconds for one call of ``fn``, its result blocked on."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple]:
    """``{label: (first-call s, median s)}``: one warm-up call each, then ``rounds``
    rounds calling every function once in turn."""
    first = {k: once(f) for k, f in fns.items()}
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            samples[k].append(once(f))
    return {k: (first[k], float(np.median(v))) for k, v in samples.items()}


def draw_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    """``int[n]`` lognormal lengths clipped to ``[min_len, max_len]``."""
    x = rng.lognormal(np.log(FLAGS.median_len), FLAGS.sigma, n)
    return np.clip(np.round(x), FLAGS.min_len, FLAGS.max_len).astype(np.int32)


def scoring_rows(config, params, items: list[np.ndarray]) -> dict[str, Callable]:
    """The scoring calls on one batch of token arrays, each returning its logits."""
    chunk = FLAGS.chunk
    ragged = vs.bucketize(items, policy=vs.CapacityPolicy.pow2(16), count_policy=None,
                          dtype=np.int32)
    buckets = [(b.data, b.lengths[:, 0]) for b in ragged.buckets]
    lengths = np.array([len(s) for s in items], np.int32)
    padded = np.zeros((len(items), lengths.max()), np.int32)
    for i, s in enumerate(items):
        padded[i, :len(s)] = s
    padded, plen = jnp.asarray(padded), jnp.asarray(lengths)
    rows = {
        "vsla bucketed": lambda: [mamba.run_padded(config, params, d, n, chunk)[0]
                                  for d, n in buckets],
        "padded to max": lambda: mamba.run_padded(config, params, padded, plen, chunk)[0],
    }
    if FLAGS.all_rows:
        one = vs.stack(items, dtype=np.int32)
        rows["vsla one capacity"] = lambda: mamba.run_padded(
            config, params, one.data, one.lengths[:, 0], chunk)[0]
    return rows, ragged


def check_agreement(rows, ragged, items) -> float:
    """Max |logit difference| between the bucketed and padded rows on real positions."""
    pad = np.asarray(rows["padded to max"]())
    worst = 0.0
    for out, idx in zip(rows["vsla bucketed"](), ragged.index):
        out = np.asarray(out)
        for slot, i in enumerate(np.asarray(idx)):
            n = len(items[i])
            worst = max(worst, float(np.abs(out[slot, :n] - pad[i, :n]).max()))
    return worst


def decode_rows(config, params, rng) -> dict[str, Callable]:
    """Decoding calls at B=1 and B=8 after a prefill of ``prompt_len`` tokens."""
    rows = {}
    for b in (1, 8):
        prompt = rng.integers(0, config.vocab_size, (b, FLAGS.prompt_len)).tolist()
        logits, state = mamba.prefill(config, params, prompt, chunk=FLAGS.chunk)
        last, key = mamba.last_logits(logits), jax.random.PRNGKey(FLAGS.seed)
        rows[f"decode B={b}"] = (lambda s=state, lg=last, k=key: mamba.decode(
            config, params, s, lg, k, FLAGS.decode_tokens))
    return rows


def main(argv):
    del argv
    c = mamba.MAMBA_130M
    config = mamba.MambaConfig(c.vocab_size, c.d_model, FLAGS.n_layers, c.d_state,
                               c.d_conv, c.expand, c.dt_rank, c.eps)
    rng = np.random.default_rng(FLAGS.seed)
    t0 = time.perf_counter()
    params = jax.block_until_ready(mamba.init(config, FLAGS.seed))
    print(f"mamba-130m widths, {config.n_layers} layers, random weights (init "
          f"{time.perf_counter() - t0:.1f} s); {platform.machine()}, "
          f"{jax.devices()[0].platform}, chunk={FLAGS.chunk}")
    lengths = draw_lengths(rng, FLAGS.batch)
    items = [rng.integers(0, config.vocab_size, n).astype(np.int32) for n in lengths]
    score, ragged = scoring_rows(config, params, items)
    print(f"B={FLAGS.batch} lengths {sorted(lengths.tolist())} (real tokens "
          f"{lengths.sum()}); buckets "
          f"{[(b.data.shape[0], b.capacity[0]) for b in ragged.buckets]}; padded to "
          f"{lengths.max()} ({FLAGS.batch * lengths.max()} positions)")
    print(f"max |logit diff| bucketed vs padded on real positions: "
          f"{check_agreement(score, ragged, items):.2e}")
    dec = decode_rows(config, params, rng)
    res = interleaved(score | dec, FLAGS.rounds)
    steps = FLAGS.decode_tokens - 1
    tokens = {k: int(lengths.sum()) for k in score} | {
        k: int(k.split("=")[1]) * steps for k in dec}
    positions = {"vsla bucketed": sum(b.data.size for b in ragged.buckets),
                 "padded to max": FLAGS.batch * int(lengths.max()),
                 "vsla one capacity": FLAGS.batch * vs.CapacityPolicy().bucket(lengths.max())}
    base = res["padded to max"][1]
    print(f"\n{'row':<20} {'positions':>9} {'first s':>9} {'median s':>9} {'tokens/s':>10} "
          f"{'vs padded':>10}")
    out = {}
    for k, (first, med) in res.items():
        ratio = f"{base / med:9.2f}x" if k in score else ""
        pos = positions.get(k, tokens[k]) if k in score else ""
        print(f"{k:<20} {pos:>9} {first:9.2f} {med:9.3f} {tokens[k] / med:10.1f} {ratio:>10}")
        out[k] = dict(first_s=first, median_s=med, tokens=tokens[k], tokens_per_s=tokens[k] / med)
    b1, b8 = res["decode B=1"][1], res["decode B=8"][1]
    print(f"decode: B=8 gives {8 * b1 / b8:.2f}x the tokens/s of B=1 "
          f"({steps} steps per call, ms/step {1e3 * b1 / steps:.1f} and {1e3 * b8 / steps:.1f})")
    if FLAGS.json_out:
        write_json_atomic(FLAGS.json_out, dict(flags={k: FLAGS[k].value for k in (
            "n_layers", "batch", "median_len", "sigma", "min_len", "max_len", "chunk",
            "rounds", "prompt_len", "decode_tokens", "seed")},
            lengths=lengths.tolist(), rows=out))


if __name__ == "__main__":
    app.run(main)
