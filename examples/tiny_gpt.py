"""A tiny GPT-2-style byte-level language model as an ``icd run`` target.

This file is an example of *bringing your own model* to ``icd run``: it uses only the
public API (``icd_jax.permute`` and ``icd_jax.runtime.target``) and is named in a config
as ``model.target: "examples/tiny_gpt.py:make_target"`` (see ``tiny_gpt.yaml`` and
``docs/pipeline.md``, "Bring your own model").

The model: byte vocabulary (256), learned position embeddings, pre-LayerNorm blocks
(causal multi-head self-attention, GELU MLP), a final LayerNorm and a tied (or untied)
head. ``make_target`` trains it for ``train_steps`` steps of next-byte prediction on the
help texts shipped with Python (``pydoc_data.topics``) and caches the trained parameters
as safetensors under ``cache_dir``, keyed by a hash of the settings, the seed and the
corpus, so a second run loads instead of retraining.

The permutable axes (``spec``): ``residual`` (size ``d_model``), ``ffn_{i}`` (size
``mlp``, the MLP neurons of block ``i``) and ``heads_{i}`` (size ``heads``, blocks of
``head_dim`` channels). ``axes`` (what the run co-designs) are the ``ffn_{i}``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors import safe_open
from safetensors.numpy import save as st_save
from tqdm import tqdm

from icd_jax.permute import AxisUse, ModelSpec, PermAxis, flat, nested
from vsla_jax.util import atomic_write_bytes

log = logging.getLogger(__name__)

VOCAB = 256
#: Bumped when the model, the corpus handling or the training changes (new cache key).
FORMAT = 1
SPLITS = ("graph", "calib", "quality", "time")
#: Documents are assigned to the evaluation splits in this fixed order (then training).
SPLIT_SEED = 1234

Batch = tuple[np.ndarray, np.ndarray]  # (ids int32[B, T], lengths int32[B])


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """The architecture: ``d_model`` must be a multiple of ``heads``."""

    d_model: int = 64
    layers: int = 2
    heads: int = 4
    mlp: int = 256
    context: int = 64
    tie_head: bool = True

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


# -- the model --------------------------------------------------------------------------
class Attention(nn.Module):
    """Causal multi-head self-attention: ``float32[B, T, d] -> float32[B, T, d]``."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        b, t, d = x.shape
        q, k, v = (nn.Dense(d, name=n)(x).reshape(b, t, c.heads, c.head_dim)
                   for n in ("query", "key", "value"))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(c.head_dim).astype(np.float32)
        causal = jnp.tril(jnp.ones((t, t), bool))
        s = jnp.where(causal, s, jnp.finfo(s.dtype).min)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v).reshape(b, t, d)
        return nn.Dense(d, name="out")(o)


class MLP(nn.Module):
    """``Dense(mlp) -> GELU -> Dense(d)``; sows the GELU output as ``intermediates/act``."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(self.cfg.mlp, name="fc")(x))
        self.sow("intermediates", "act", h)
        return nn.Dense(self.cfg.d_model, name="proj")(h)


class Block(nn.Module):
    """One pre-LayerNorm transformer block."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x):
        x = x + Attention(self.cfg, name="attn")(nn.LayerNorm(name="ln_1")(x))
        return x + MLP(self.cfg, name="mlp")(nn.LayerNorm(name="ln_2")(x))


class GPT(nn.Module):
    """``ids int32[B, T] -> logits float32[B, T, 256]`` (``T <= context``).

    Causal, so padding after a sequence's last real byte never changes its logits.
    """

    cfg: GPTConfig

    @nn.compact
    def __call__(self, ids):
        c = self.cfg
        init = nn.initializers.normal(0.02)
        wte = nn.Embed(VOCAB, c.d_model, embedding_init=init, name="wte")
        pos = nn.Embed(c.context, c.d_model, embedding_init=init, name="wpe")
        x = wte(ids) + pos(jnp.arange(ids.shape[1]))[None]
        for i in range(c.layers):
            x = Block(c, name=f"block_{i}")(x)
        x = nn.LayerNorm(name="ln_f")(x)
        if c.tie_head:
            return wte.attend(x)
        return nn.Dense(VOCAB, use_bias=False, name="head")(x)


def permute_spec(c: GPTConfig) -> ModelSpec:
    """Every permutable axis of ``GPT(c)``'s parameters.

    ``residual`` (``d_model``): the embeddings' feature axis, every LayerNorm, the
    inputs of Q/K/V, the MLP's ``fc`` and the untied head, and the outputs of the
    attention's ``out`` and the MLP's ``proj``. ``ffn_{i}`` (``mlp``): block ``i``'s MLP
    neurons. ``heads_{i}`` (``heads``): block ``i``'s head order (Q/K/V outputs and
    ``out``'s input, in blocks of ``head_dim``). The logits lie on the vocabulary, which
    is not permuted, so ``spec.outputs`` is empty.
    """
    res = [AxisUse("wte/embedding", 1), AxisUse("wpe/embedding", 1),
           AxisUse("ln_f/scale", 0), AxisUse("ln_f/bias", 0)]
    if not c.tie_head:
        res.append(AxisUse("head/kernel", 0))
    axes = []
    for i in range(c.layers):
        blk = f"block_{i}"
        att, mlp = f"{blk}/attn", f"{blk}/mlp"
        res += [AxisUse(f"{blk}/{ln}/{k}", 0) for ln in ("ln_1", "ln_2")
                for k in ("scale", "bias")]
        res += [AxisUse(f"{att}/{n}/kernel", 0) for n in ("query", "key", "value")]
        res += [AxisUse(f"{att}/out/kernel", 1), AxisUse(f"{att}/out/bias", 0),
                AxisUse(f"{mlp}/fc/kernel", 0),
                AxisUse(f"{mlp}/proj/kernel", 1), AxisUse(f"{mlp}/proj/bias", 0)]
        axes.append(PermAxis(f"ffn_{i}", c.mlp, (
            AxisUse(f"{mlp}/fc/kernel", 1), AxisUse(f"{mlp}/fc/bias", 0),
            AxisUse(f"{mlp}/proj/kernel", 0))))
        hd = c.head_dim
        axes.append(PermAxis(f"heads_{i}", c.heads, tuple(
            [AxisUse(f"{att}/{n}/kernel", 1, group=hd) for n in ("query", "key", "value")]
            + [AxisUse(f"{att}/{n}/bias", 0, group=hd) for n in ("query", "key", "value")]
            + [AxisUse(f"{att}/out/kernel", 0, group=hd)])))
    return ModelSpec("tiny_gpt", (PermAxis("residual", c.d_model, tuple(res)), *axes))


# -- the corpus -------------------------------------------------------------------------
def corpus() -> list[bytes]:
    """The help texts shipped with Python, one UTF-8 document per topic (sorted by key)."""
    from pydoc_data.topics import topics

    return [topics[k].encode("utf-8") for k in sorted(topics)]


def chunk(doc: bytes, context: int, min_len: int = 8) -> list[np.ndarray]:
    """``doc`` cut into consecutive ``uint8[<= context]`` pieces (a last piece shorter
    than ``min_len`` bytes is dropped)."""
    arr = np.frombuffer(doc, np.uint8)
    return [arr[i:i + context] for i in range(0, arr.size, context)
            if arr[i:i + context].size >= min_len]


def pad(pieces: Sequence[np.ndarray], context: int) -> Batch:
    """Pieces as ``(ids int32[n, context], lengths int32[n])``, zero-padded."""
    ids = np.zeros((len(pieces), context), np.int32)
    for r, p in enumerate(pieces):
        ids[r, :p.size] = p
    return ids, np.array([p.size for p in pieces], np.int32)


def split_corpus(docs: Sequence[bytes], context: int, sizes: dict[str, int]
                 ) -> dict[str, Batch]:
    """Disjoint splits by document: the documents, in a fixed shuffled order, fill
    ``"time"``, ``"quality"``, ``"calib"``, ``"graph"`` (``sizes[split]`` pieces each,
    extra pieces of the last document dropped), the rest is ``"train"``."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(docs))
    out: dict[str, Batch] = {}
    k = 0
    for split in ("time", "quality", "calib", "graph"):
        pieces: list[np.ndarray] = []
        while len(pieces) < sizes[split]:
            if k >= len(order):
                raise ValueError(f"the corpus has too few documents for {sizes}")
            pieces += chunk(docs[order[k]], context)
            k += 1
        out[split] = pad(pieces[:sizes[split]], context)
    rest = [p for i in order[k:] for p in chunk(docs[i], context)]
    if not rest:
        raise ValueError(f"no documents left for training after {sizes}")
    out["train"] = pad(rest, context)
    return out


def to_batches(data: Batch, batch_size: int) -> list[Batch]:
    """``data`` cut into batches of exactly ``batch_size`` rows (the split's size is a
    multiple of it)."""
    ids, lengths = data
    return [(ids[i:i + batch_size], lengths[i:i + batch_size])
            for i in range(0, ids.shape[0], batch_size)]


# -- training ---------------------------------------------------------------------------
def next_byte_loss(logits, ids, lengths):
    """Mean cross-entropy (``float32[]``) of predicting ``ids[:, t+1]`` from position
    ``t`` over the real positions (``t + 1 < lengths``)."""
    t = ids.shape[1]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    mask = (jnp.arange(1, t)[None] < lengths[:, None]).astype(jnp.float32)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@functools.lru_cache(maxsize=8)
def train_step(cfg: GPTConfig, lr: float):
    """``(optimizer, step)``: AdamW with global-norm clipping and its jitted update
    ``step(params, state, ids, lengths) -> (params, state, loss)`` (one per settings,
    so repeated builds do not recompile)."""
    model = GPT(cfg)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.01))

    @jax.jit
    def step(params, state, ids, lengths):
        def loss_fn(p):
            return next_byte_loss(model.apply({"params": p}, ids), ids, lengths)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return opt, step


def train(cfg: GPTConfig, params, data: Batch, *, steps: int, batch: int, lr: float,
          seed: int, progress: bool = True):
    """``steps`` AdamW steps on random rows of ``data`` (``batch`` rows each):
    ``(params, losses float32[steps])``."""
    opt, step = train_step(cfg, lr)
    state = opt.init(params)
    rng = np.random.default_rng(seed)
    ids, lengths = data
    losses = []
    bar = tqdm(range(steps), desc="tiny_gpt train", disable=not progress, leave=False)
    for i in bar:
        rows = rng.integers(0, ids.shape[0], batch)
        params, state, loss = step(params, state, ids[rows], lengths[rows])
        losses.append(loss)
        if progress and (i % 10 == 0 or i == steps - 1):
            bar.set_postfix(loss=f"{float(loss):.3f}")
    return params, np.asarray(jax.device_get(losses), np.float32).reshape(-1)


# -- the parameter cache ----------------------------------------------------------------
def cache_key(settings: dict, seed: int, data: Batch) -> str:
    """SHA-256 (hex) of the settings, the seed and the training bytes."""
    h = hashlib.sha256(json.dumps(dict(settings, seed=seed, format=FORMAT),
                                  sort_keys=True).encode())
    h.update(np.ascontiguousarray(data[0]).tobytes())
    h.update(np.ascontiguousarray(data[1]).tobytes())
    return h.hexdigest()


def save_params(path: str, params, losses: np.ndarray) -> None:
    """Write ``params`` and the loss curve atomically as safetensors (no pickle)."""
    tensors = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flat(params).items()}
    meta = {"losses": json.dumps([float(x) for x in losses])}
    atomic_write_bytes(path, st_save(tensors, metadata=meta))


def load_params(path: str, template) -> tuple[dict, np.ndarray] | None:
    """``(params, losses)`` from ``path`` if it holds exactly ``template``'s leaves
    (paths, shapes, dtypes); None when absent, unreadable or different."""
    if not os.path.isfile(path):
        return None
    want = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flat(template).items()}
    try:
        with safe_open(path, framework="numpy") as f:
            got = {k: f.get_tensor(k) for k in f.keys()}
            losses = np.asarray(json.loads((f.metadata() or {})["losses"]), np.float32)
    except Exception as e:  # noqa: BLE001 - a bad cache file is retrained, not fatal
        log.warning("tiny_gpt: ignoring unreadable cache %s (%s)", path, e)
        return None
    if {k: (v.shape, v.dtype) for k, v in got.items()} != want:
        log.warning("tiny_gpt: ignoring cache %s: its tensors differ from the model's", path)
        return None
    return nested(got), losses


def trained_params(cfg: GPTConfig, data: Batch, *, seed: int, steps: int, batch: int,
                   lr: float, cache_dir: str, progress: bool = True):
    """``(params, losses, from_cache, path)``: ``GPT(cfg)`` trained on ``data``, loaded
    from the safetensors file ``path`` under ``cache_dir`` when an earlier build with the
    same settings, seed and data stored it there (else trained, then stored)."""
    settings = dict(dataclasses.asdict(cfg), train_steps=steps, train_batch=batch, lr=lr)
    path = os.path.join(os.path.expanduser(cache_dir),
                        f"tiny_gpt-{cache_key(settings, seed, data)[:16]}.safetensors")
    model = GPT(cfg)
    template = jax.eval_shape(lambda: model.init(jax.random.key(seed), data[0][:1])["params"])
    cached = load_params(path, template)
    if cached is not None:
        log.info("tiny_gpt: loaded %s", path)
        return *cached, True, path
    t0 = time.perf_counter()
    init = model.init(jax.random.key(seed), data[0][:1])["params"]
    params, losses = train(cfg, init, data, steps=steps, batch=batch, lr=lr, seed=seed,
                           progress=progress)
    params = jax.tree.map(np.asarray, jax.device_get(params))
    save_params(path, params, losses)
    if losses.size:
        msg = (f"tiny_gpt: trained {steps} steps in {time.perf_counter() - t0:.1f} s, loss "
               f"{losses[0]:.3f} -> {np.mean(losses[-10:]):.3f} (last 10); cached {path}")
        if progress:
            tqdm.write(msg, file=sys.stderr)
        else:
            log.info(msg)
    return params, losses, False, path


# -- the target -------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def programs(cfg: GPTConfig):
    """The jitted ``(logits, hidden)`` of ``GPT(cfg)``: ``logits(params, ids int32[B, T])
    -> float32[B, T, 256]`` and ``hidden(params, ids) -> [float32[B, T, mlp]] * layers``
    (each block's MLP output after GELU, from the sown ``intermediates``)."""
    model = GPT(cfg)

    def logits(params, ids):
        return model.apply({"params": params}, ids)

    def hidden(params, ids):
        _, state = model.apply({"params": params}, ids, mutable=["intermediates"])
        inter = state["intermediates"]
        return [inter[f"block_{i}"]["mlp"]["act"][0] for i in range(cfg.layers)]

    return jax.jit(logits), jax.jit(hidden)


class TinyGPT:
    """The ``icd_jax.runtime.target.Target`` of a trained ``GPT``.

    Attributes:
      name, params, spec, axes, quality_metric: the protocol's members.
      config: ``GPTConfig``; losses: ``float32[train_steps]`` training loss per step;
      from_cache: whether the parameters were loaded rather than trained;
      cache_path: the safetensors file of the parameters.
    """

    name = "tiny_gpt"
    quality_metric = "next_byte_accuracy"

    def __init__(self, config: GPTConfig, params, splits: dict[str, list[Batch]],
                 losses: np.ndarray, from_cache: bool, cache_path: str):
        self.config, self.params, self.splits = config, params, splits
        self.losses, self.from_cache, self.cache_path = losses, from_cache, cache_path
        self.spec = permute_spec(config)
        self.axes = [f"ffn_{i}" for i in range(config.layers)]
        self.logits, self.hidden = programs(config)

    def forward(self, params, batch: Batch):
        """Logits ``float32[B, T, 256]`` of ``batch = (ids, lengths)``."""
        return self.logits(params, batch[0])

    def batches(self, split: str) -> list[Batch]:
        """The batches of ``split`` (``"graph" | "calib" | "quality" | "time"``)."""
        return self.splits[split]

    def tokens(self, batch: Batch) -> int:
        """The real (unpadded) bytes of ``batch``."""
        return int(np.sum(batch[1]))

    def activations(self, params, batch: Batch) -> dict[str, np.ndarray]:
        """``{"ffn_{i}": float32[tokens, mlp]}``: block ``i``'s MLP activations after
        GELU at the real positions of ``batch`` (row-major over sequences)."""
        ids, lengths = batch
        real = np.arange(ids.shape[1])[None] < np.asarray(lengths)[:, None]
        acts = jax.device_get(self.hidden(params, ids))
        return {f"ffn_{i}": np.asarray(a, np.float32)[real] for i, a in enumerate(acts)}

    def quality(self, outputs: Sequence, dense_outputs: Sequence,
                batches: Sequence[Batch]) -> np.ndarray:
        """Per sequence the next-byte top-1 accuracy in % (``float64[n]``) of the logits
        ``outputs`` against the true next bytes (absolute: ``dense_outputs`` unused)."""
        return np.concatenate([accuracy(np.asarray(o), b[0], b[1])
                               for o, b in zip(outputs, batches, strict=True)])


def accuracy(logits: np.ndarray, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per row the share (%) of real positions ``t`` (``t + 1 < length``) whose argmax
    logit is ``ids[t + 1]``: ``float64[B]`` from ``logits float[B, T, V]``."""
    hit = np.argmax(logits[:, :-1], axis=-1) == ids[:, 1:]
    mask = np.arange(1, ids.shape[1])[None] < lengths[:, None]
    return 100.0 * (hit & mask).sum(1) / np.maximum(mask.sum(1), 1)


def make_target(seed: int = 0, *, d_model: int = 64, layers: int = 2, heads: int = 4,
                mlp: int = 256, context: int = 64, tie_head: bool = True,
                train_steps: int = 300, train_batch: int = 32, lr: float = 3e-3,
                batch_size: int = 16, graph_seqs: int = 128, calib_seqs: int = 64,
                quality_seqs: int = 128, time_seqs: int = 64,
                cache_dir: str = "~/.cache/icd_jax/examples",
                progress: bool = True) -> TinyGPT:
    """The factory ``model.target`` names: a ``TinyGPT`` trained (or loaded from
    ``cache_dir``) with these settings.

    ``*_seqs`` are the sequences of each evaluation split (rounded up to whole batches
    of ``batch_size``); every other sequence of the corpus is for training.
    """
    if d_model % heads:
        raise ValueError(f"d_model {d_model} is not a multiple of heads {heads}")
    cfg = GPTConfig(d_model, layers, heads, mlp, context, tie_head)
    rounded = {s: -(-n // batch_size) * batch_size for s, n in
               zip(SPLITS, (graph_seqs, calib_seqs, quality_seqs, time_seqs), strict=True)}
    data = split_corpus(corpus(), context, rounded)
    params, losses, from_cache, path = trained_params(
        cfg, data["train"], seed=seed, steps=train_steps, batch=train_batch, lr=lr,
        cache_dir=cache_dir, progress=progress)
    splits = {s: to_batches(data[s], batch_size) for s in SPLITS}
    return TinyGPT(cfg, params, splits, losses, from_cache, path)
