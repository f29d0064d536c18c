"""The models a run works on: data splits, activations for W, transforms, quality.

A target holds a dense model and the corpus splits a run needs, and builds *arms*:
the model under one layout (named-axis orders) with the configured S/Q/K transforms.
``MiniLMTarget`` is the real all-MiniLM-L6-v2 (or a random-init tiny BERT with the real
tokenizer, for tests); ``MambaTarget`` a random-init byte-level Mamba (no pretrained
Mamba ships in a package, so only ratios against its dense self mean anything).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from icd_jax import capture, corpus, permute, quality
from icd_jax.adapters import tree
from icd_jax.errors import ConfigError
from icd_jax.runtime.arms import (
    Arm,
    active_positions,
    grouped_paths,
    guarded,
    params_hash,
    quant_fallbacks,
    subsample,
    weight_only_quant,
    weight_sparsity,
)
from icd_jax.runtime.config import Config, Transform


# -- MiniLM -------------------------------------------------------------------------------
class MiniLMTarget:
    """MiniLM-L6 (``size="L6"``) or a tiny random BERT (``size="tiny"``)."""

    kind = "minilm"

    def __init__(self, cfg: Config):
        from icd_jax.models import minilm

        self.cfg, self.lib = cfg, minilm
        m = cfg.model
        if m.size == "L6":
            self.enc = minilm.load(max_tokens=m.max_tokens)
        else:
            self.enc = tiny_bert(m.max_tokens, cfg.pipeline.seed)
        self.config = self.enc.config
        self.spec = minilm.permute_spec(self.config)
        self.axes = [f"ffn_{i}" for i in range(self.config.layers)]
        self.paths = tree.kernel_paths(self.enc.params)
        self.size = self.config.intermediate
        texts, labels = corpus.labelled_sentences()
        pick = subsample(len(texts), cfg.quality.sentences, cfg.pipeline.seed)
        self.q_texts, self.q_labels = [texts[i] for i in pick], labels[pick]
        seen = set(texts)
        held = [s for s in corpus.sentences() if s not in seen]
        need = cfg.graph.sentences + cfg.transform.quant.calib_sentences + cfg.measure.sentences
        if len(held) < need:
            raise ConfigError(f"graph.sentences + transform.quant.calib_sentences + "
                              f"measure.sentences = {need} exceeds the {len(held)} held-out "
                              f"corpus sentences")
        g, c = cfg.graph.sentences, cfg.transform.quant.calib_sentences
        self.w_texts = held[:g]
        self.calib_texts = held[g:g + c]
        self.time_texts = held[g + c:g + c + cfg.measure.sentences]
        self.bs = m.batch_size
        self._dense_emb = None
        self._absmax = None
        self.time_batches = [b for _, b in self.enc.batches(self.enc.tokenize(self.time_texts),
                                                             self.bs)]
        self.tokens = int(sum(int(b.lengths.sum()) for b in self.time_batches))
        self._runners = {}
        self._ffn = {}

    # identity of the model (cache keys)
    def model_id(self) -> dict:
        return dict(name="minilm", size=self.cfg.model.size,
                    params=params_hash(self.enc.params), max_tokens=self.cfg.model.max_tokens)

    def identity(self) -> dict[str, np.ndarray]:
        return tree.identity_perms(self.spec)

    def activations(self, arm: Arm | None, show_progress: bool = False
                    ) -> dict[str, sp.csr_matrix]:
        """Top-k FFN activations per axis (stored order of ``arm``; dense if None)."""
        runner = self.enc if arm is None else arm.runner
        params = self.enc.params if arm is None else arm.params
        cap = capture.capture(runner, params, runner.packed_batches(self.w_texts, self.bs),
                              what=("ffn",), top_frac=self.cfg.graph.top_frac,
                              show_progress=show_progress)
        return {f"ffn_{i}": cap.acts(i) for i in range(self.config.layers)}

    def runner(self, t: Transform):
        """The encoder (one jit cache) for the execution-time transforms of ``t``."""
        lib = self.lib
        ffn = kv = None
        s = t.sparsity
        if s.enabled and s.kind == "ffn":
            ffn = self.ffn_sparsity(s)
        if t.kv.enabled:
            kv = lib.KeyBlockDrop(block=t.kv.block, drop=t.kv.drop,
                                  permute_tokens=t.kv.permute_tokens)
        key = (ffn, kv)
        if key not in self._runners:
            self._runners[key] = self.enc.with_transforms(lib.Transforms(ffn=ffn, kv=kv))
        return self._runners[key]

    def ffn_sparsity(self, s):
        """``FFNSparsity`` of a ``Sparsity`` section: per-layer thresholds keeping a
        ``top_frac`` share of the FFN activations of the calibration sentences; for
        ``mode="skip"`` per-layer ``k_cap`` rungs above the most tiles a calibration call
        of at most ``max_rows`` rows kept (every tile when no such call exists)."""
        from icd_jax.adapters import ffn as ffn_lib

        key = (s.top_frac, s.tile, s.mode, s.max_rows)
        if key in self._ffn:
            return self._ffn[key]
        batches = list(self.enc.packed_batches(self.calib_texts, self.bs))
        calls = []
        for b in batches:
            cap = self.enc.capture_batch(b)
            calls.append([np.asarray(cap[f"layer_{i}/ffn"][0])[cap[f"layer_{i}/ffn"][1]]
                          for i in range(self.config.layers)])
        acts = [np.concatenate([c[i] for c in calls]) for i in range(self.config.layers)]
        thr = ffn_lib.calibrate_thresholds(acts, s.top_frac)
        n_tiles = self.config.intermediate // s.tile
        k_cap = None
        if s.mode == "skip":
            small = [c for c, b in zip(calls, batches) if b.shape[0] <= s.max_rows]
            k_cap = tuple(ffn_lib.k_cap_rung(max(ffn_lib.union_count(c[i], thr[i], s.tile)
                                                 for c in small), n_tiles)
                          if small else n_tiles for i in range(self.config.layers))
        out = ffn_lib.FFNSparsity(threshold=thr, tile=s.tile, mode=s.mode, k_cap=k_cap,
                                  max_rows=s.max_rows)
        self._ffn[key] = out
        return out

    def skipping_calls(self, s) -> list[bool]:
        """Per timed call, whether its down projections really skip tiles."""
        from icd_jax.adapters import ffn as ffn_lib

        cfg = self.ffn_sparsity(s)
        return [ffn_lib.skips_tiles(cfg, b.shape[0], self.config.intermediate)
                for b in self.time_batches]

    def call_tokens(self) -> list[int]:
        """Real tokens of each timed call, in the order ``activity`` returns them."""
        return [int(b.n_tokens) for b in self.time_batches]

    def grouped(self, q) -> list[str] | None:
        """Kernels ``q.group_size`` applies to (``arms.grouped_paths``)."""
        return grouped_paths(self.spec, self.paths, self.axes, q.groups_on)

    def absmax(self) -> dict[str, np.ndarray]:
        """Calibrated per-kernel input ``|x|`` maxima of the dense model (original order)."""
        if self._absmax is None:
            out = {}
            for b in self.enc.packed_batches(self.calib_texts, self.bs):
                for p, x in self.enc.kernel_inputs(b).items():
                    out[p] = np.maximum(out.get(p, 0), np.abs(x).max(0))
            self._absmax = out
        return self._absmax

    def arm(self, name: str, perms: dict[str, np.ndarray], t: Transform,
            strict: bool = False) -> Arm:
        """The model under ``perms`` with the transforms of ``t``."""
        params = permute.apply(self.spec, self.enc.params, perms)
        meta: dict[str, dict] = {}
        s = t.sparsity
        ffn_meta = dict(delta_layout=dict(repermute=True,
                                          reason="co-active neurons in few tiles"))
        if s.enabled and s.kind == "ffn":
            skips = self.skipping_calls(s)
            ffn_meta.update(mode=s.mode, skips_tiles=any(skips),
                            skipping_calls=f"{sum(skips)} of {len(skips)}", fallbacks=[])
            if s.mode == "skip" and not all(skips):
                ffn_meta["fallbacks"].append(
                    f"sparsity: mode skip, but {len(skips) - sum(skips)} of {len(skips)} "
                    f"timed calls have more than max_rows={s.max_rows} packed rows or a "
                    "k_cap covering every tile, so their down projections ran masked "
                    "(every tile read)")
        params, meta["sparsity"] = weight_sparsity(params, self.paths, s, strict, ffn_meta)
        if not s.enabled:
            del meta["sparsity"]
        q = t.quant
        if q.enabled:
            act = None if q.act == "none" else q.act
            calibrated = act == "static" or q.smooth_alpha is not None
            absmax = (tree.permuted_inputs(self.spec, self.absmax(), perms)
                      if calibrated else None)
            params, meta["quant"] = guarded(
                "quant", lambda: tree.quantize(params, self.paths, q.dtype, q.group_size,
                                               act=act, act_absmax=absmax,
                                               smooth_alpha=q.smooth_alpha,
                                               group_paths=self.grouped(q)), params, strict)
            meta["quant"]["fallbacks"] = quant_fallbacks(q, meta["quant"], len(self.paths))
        if t.kv.enabled:
            meta["kv"] = dict(transform="kv", ok=True, settings=t.kv.model_dump(),
                              delta_layout=dict(repermute=False, reason="the token order "
                                                "is recomputed per sequence"))
        return Arm(name, perms, params, self.runner(t), meta)

    def dense_arm(self) -> Arm:
        return Arm("dense", self.identity(), self.enc.params, self.enc, {})

    def call(self, arm: Arm) -> Callable[[], Any]:
        """A no-argument call running the timed batch set (results to block on)."""
        fwd, params, arrays = arm.runner.forward, arm.params, [
            b.arrays() for b in self.time_batches]
        return lambda: [fwd(params, *a) for a in arrays]

    def embeddings(self, arm: Arm) -> np.ndarray:
        from tqdm import tqdm

        ids = arm.runner.tokenize(self.q_texts)
        emb = np.zeros((len(ids), self.config.hidden), np.float32)
        batches = tqdm(arm.runner.batches(ids, self.bs), total=-(-len(ids) // self.bs),
                       desc=f"quality {arm.name}", unit="batch", leave=False,
                       disable=len(ids) < 256)
        for idx, b in batches:
            emb[idx] = np.asarray(arm.runner.forward(arm.params, *b.arrays()))[: len(idx)]
        if "residual" in arm.perms:  # back to the shipped residual order
            emb = np.asarray(permute.permute_output(self.spec, "embedding", emb,
                                                    permute.invert(arm.perms)))
        return emb

    def quality(self, arm: Arm) -> dict:
        """Topic retrieval precision@1 (%) and its drop against dense fp32, in pp;
        ``samples``: per sentence 100 if its nearest neighbour shares its topic, else 0
        (the paired test of ``icd pair`` runs on these)."""
        if self._dense_emb is None:
            self._dense_emb = self.embeddings(self.dense_arm())
        emb = self._dense_emb if arm.name == "dense" else self.embeddings(arm)
        q = quality.compare(self._dense_emb, emb, self.q_labels)
        hit = self.q_labels[quality.nearest_neighbours(emb)] == self.q_labels
        return dict(value=100.0 * q["accuracy"], drop_pp=q["drop_pp"], cos_mean=q["cos_mean"],
                    nn_agreement=q["nn_agreement"], samples=(100.0 * hit).tolist())

    quality_metric = "topic_accuracy"

    def activity(self, arm: Arm, tokens: int) -> list[np.ndarray]:
        """Per layer, the FFN neurons over the sparse kernel's threshold per token of the
        timed calls (``bool [tokens, intermediate]``, stored order, calls in order)."""
        thr = self.ffn_sparsity(self.cfg.transform.sparsity).threshold
        out = [[] for _ in range(self.config.layers)]
        for b in self.time_batches:
            cap = arm.runner.capture_batch(b, arm.params)
            for i in range(self.config.layers):
                f, rows = cap[f"layer_{i}/ffn"]
                out[i].append(np.abs(np.asarray(f)[rows]) > thr[i])
        return [np.concatenate(a)[:tokens] for a in out]

    def gemm_shapes(self) -> list[tuple[int, int, int]]:
        """The ``(m, k, n)`` of the encoder's matmuls on one timed batch (fused Q/K/V,
        attention output, FFN up and down), for ``hostprobe.gemm_rates``."""
        m, h, f = self.time_batches[0].shape[0], self.config.hidden, self.config.intermediate
        return [(m, h, 3 * h), (m, h, h), (m, h, f), (m, f, h)]

    def row_bytes(self, arm: Arm) -> int:
        """Bytes of one stored row of the FFN down projection (what a tile holds)."""
        k = permute.flat(arm.params)["layer_0/output/kernel"]
        if hasattr(k, "q"):
            return int(np.asarray(k.q).nbytes // self.size)
        return int(self.config.hidden * np.dtype(np.asarray(k).dtype).itemsize)

    def export_fn(self) -> tuple:
        """``(name, fn, params, args, output)`` of the dense encoder on one timed batch,
        for ``runtime.export`` (``output``: the ``spec.outputs`` name of the result)."""
        portable = self.enc.with_backend("xla")  # StableHLO cannot carry the C++ kernels
        return ("minilm", portable.apply, jax.tree.map(np.asarray, self.enc.params),
                self.time_batches[0].arrays(), "embedding")


def tiny_bert(max_tokens: int, seed: int = 0):
    """A random-init 2-layer BERT (hidden 32, FFN 128) with MiniLM's real tokenizer."""
    from icd_jax.models import minilm

    config = minilm.BertConfig(hidden=32, layers=2, heads=4, intermediate=128,
                               max_positions=max(max_tokens, 8))
    tok = minilm.load_tokenizer(f"{minilm.package_dir()}/tokenizer.json", max_tokens)
    enc = minilm.MiniLM(config, {}, tok, max_tokens=max_tokens)
    batch = next(iter(enc.packed_batches(["a tiny batch"], 1)))
    params = enc.module.init(jax.random.PRNGKey(seed), *batch.arrays())["params"]
    return enc.with_params(jax.tree.map(np.asarray, params))


# -- Mamba --------------------------------------------------------------------------------
MAMBA_SIZES = {"tiny": dict(d_model=32, n_layers=2, d_state=8),
               "small": dict(d_model=256, n_layers=4, d_state=16)}


class MambaTarget:
    """A random-init byte-level Mamba (``size`` tiny or small) on corpus sentences."""

    kind = "mamba"
    #: 100 (1 - relative logit error vs dense), in %: with random-init weights next-token
    #: agreement saturates near 100% (the tied embedding head dominates the logits), so
    #: it cannot tell transforms apart; the logit error can.
    quality_metric = "logit_fidelity"

    def __init__(self, cfg: Config):
        from icd_jax.models import mamba

        self.cfg, self.lib = cfg, mamba
        self.config = mamba.MambaConfig(vocab_size=256, **MAMBA_SIZES[cfg.model.size])
        self.params = jax.tree.map(np.asarray, mamba.init(self.config, cfg.pipeline.seed))
        self.spec = mamba.permute_spec(self.config)
        self.axes = [f"inner_{i}" for i in range(self.config.n_layers)]
        self.paths = tree.kernel_paths(self.params, lambda p: "conv1d" not in p)
        self.size = self.config.d_inner
        n = cfg.graph.sentences + cfg.quality.sentences + cfg.measure.sentences
        sents = corpus.sentences(n)
        g, q = cfg.graph.sentences, cfg.quality.sentences
        cut = cfg.model.max_tokens
        toks = [np.frombuffer(s.encode("utf-8"), np.uint8)[:cut].astype(np.int32)
                for s in sents]
        self.w_toks, self.q_toks, self.t_toks = toks[:g], toks[g:g + q], toks[g + q:]
        self.bs = cfg.model.batch_size
        self.tokens = int(sum(len(t) for t in self.t_toks))
        self._dense = None

    def model_id(self) -> dict:
        return dict(name="mamba", size=self.cfg.model.size, params=params_hash(self.params),
                    max_tokens=self.cfg.model.max_tokens)

    def identity(self) -> dict[str, np.ndarray]:
        return tree.identity_perms(self.spec)

    def batches(self, toks):
        import vsla_jax as vs

        for s in range(0, len(toks), self.bs):
            yield vs.stack(list(toks[s:s + self.bs]), dtype=np.int32)

    def model(self, params):
        return self.lib.Mamba(self.config, params)

    def activations(self, arm: Arm | None, show_progress: bool = False
                    ) -> dict[str, sp.csr_matrix]:
        params = self.params if arm is None else arm.params
        cap = capture.capture(self.model(params), params, self.batches(self.w_toks),
                              what=("inner",), top_frac=self.cfg.graph.top_frac,
                              show_progress=show_progress)
        return {f"inner_{i}": cap.acts(i, "inner") for i in range(self.config.n_layers)}

    def arm(self, name: str, perms: dict[str, np.ndarray], t: Transform,
            strict: bool = False) -> Arm:
        params = permute.apply(self.spec, self.params, perms)
        meta: dict[str, dict] = {}
        s = t.sparsity
        params, meta["sparsity"] = weight_sparsity(params, self.paths, s, strict, dict(
            executed=False, note="Mamba runs its out_proj dense; tiles/token are measured "
            "on the inner activations only"))
        if not s.enabled:
            del meta["sparsity"]
        q = t.quant
        if q.enabled:
            params, meta["quant"] = weight_only_quant(
                params, self.paths, q, strict, "mamba's dense layers",
                grouped_paths(self.spec, self.paths, self.axes, q.groups_on))
        if t.kv.enabled:
            meta["kv"] = dict(transform="kv", ok=True, applicable=False,
                              note="a state-space model has no KV cache")
        return Arm(name, perms, jax.tree.map(jnp.asarray, params), self.config, meta)

    def dense_arm(self) -> Arm:
        return Arm("dense", self.identity(), jax.tree.map(jnp.asarray, self.params),
                   self.config, {})

    def call(self, arm: Arm) -> Callable[[], Any]:
        batches = [(x.data, x.lengths[:, 0]) for x in self.batches(self.t_toks)]
        run, c, p = self.lib.run_padded, arm.runner, arm.params
        return lambda: [run(c, p, ids, lens)[0] for ids, lens in batches]

    def logits(self, arm: Arm) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        out = []
        for x in self.batches(self.q_toks):
            lg = np.asarray(self.lib.forward(arm.runner, arm.params, x).data)
            out.append((lg, np.asarray(x.data), np.asarray(x.lengths[:, 0])))
        return out

    def quality(self, arm: Arm) -> dict:
        """Logit fidelity ``100 (1 - rel_logit_error)`` (%) and its drop (pp) against the
        dense model; next-token agreement (%) and the perplexity ratio as diagnostics."""
        if self._dense is None:
            self._dense = self.logits(self.dense_arm())
        got = self._dense if arm.name == "dense" else self.logits(arm)
        w = np.array([lens.sum() for _, _, lens in got], np.float64)
        ms = [quality.lm_compare(d, o, t, lens)
              for (d, t, lens), (o, _, _) in zip(self._dense, got)]
        agree = float(np.average([m["next_token_agreement"] for m in ms], weights=w))
        err = float(np.average([m["rel_logit_error"] for m in ms], weights=w))
        per_item = [100.0 * (1.0 - quality.lm_compare(d[i:i + 1], o[i:i + 1], t[i:i + 1],
                                                      lens[i:i + 1])["rel_logit_error"])
                    for (d, t, lens), (o, _, _) in zip(self._dense, got)
                    for i in range(d.shape[0]) if lens[i] > 0]
        return dict(value=100.0 * (1.0 - err), drop_pp=100.0 * err, rel_logit_error=err,
                    samples=per_item,
                    next_token_agreement_pct=100.0 * agree,
                    ppl_ratio=float(np.average([m["ppl_ratio"] for m in ms], weights=w)))

    def activity(self, arm: Arm, tokens: int) -> list[np.ndarray]:
        top = self.cfg.transform.sparsity.top_frac
        cap = capture.capture(self.model(arm.params), arm.params, self.batches(self.t_toks),
                              what=("inner",), top_frac=top)
        return [active_positions(cap.acts(i, "inner"), self.size)[:tokens]
                for i in range(self.config.n_layers)]

    def row_bytes(self, arm: Arm) -> int:
        return int(self.config.d_model * 4)

    def gemm_shapes(self) -> list[tuple[int, int, int]]:
        c = self.config
        m = self.bs * self.cfg.model.max_tokens
        return [(m, c.d_model, 2 * c.d_inner), (m, c.d_inner, c.d_model)]

    def export_fn(self) -> tuple:
        """``(name, fn, params, args, output)`` of the dense model on one timed batch."""
        x = next(iter(self.batches(self.t_toks)))
        return ("mamba", functools.partial(self.lib.logits_padded, self.config), self.params,
                (np.asarray(x.data), np.asarray(x.lengths[:, 0])), None)


def make(cfg: Config):
    """The target of ``cfg.model``: a built-in, or ``model.target`` through the generic
    adapter (``usertarget.UserTarget``)."""
    if cfg.model.name == "custom":
        from icd_jax.runtime import target as target_lib
        from icd_jax.runtime.usertarget import UserTarget

        user = target_lib.load(cfg.model.target, cfg.model.kwargs, seed=cfg.pipeline.seed)
        return UserTarget(cfg, user)
    return {"minilm": MiniLMTarget, "mamba": MambaTarget}[cfg.model.name](cfg)

