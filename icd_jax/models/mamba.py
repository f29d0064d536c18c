"""Mamba-1 (state-spaces/mamba): a selective state-space language model in Flax linen.

Each layer is ``h = h + out_proj(scan(silu(conv(x))) * silu(z))`` with ``x, z =
in_proj(rmsnorm(h))``; the final ``norm_f`` feeds a head tied to the embedding
(``logits = h @ embedding.T``). Token batches are ``VarTensor``s (``int32[B, C]`` with
``lengths [B, 1]``): the recurrence runs over the whole capacity ``C`` with
``jax.lax.associative_scan`` and positions at or past an item's length are neutral
(``dt = 0`` there, inputs zeroed), so they change neither the state nor the real logits.
A length-0 item gives all-zero logits and the initial (zero) state. The scan runs in
chunks of ``chunk`` steps (``DEFAULT_CHUNK``): an associative scan inside each chunk, a
``lax.scan`` carrying the state across chunks (``chunk=0``: one associative scan over the
whole capacity; ``chunk=1``: the sequential recurrence).

Public functions (``config`` is static, everything else is an array or a pytree):

- ``init(config, seed) -> params``; ``load_hf(path)`` / ``save_hf(path, params, config)``
  read and write Hugging Face ``state-spaces/mamba-*-hf`` safetensors names;
- ``forward(config, params, tokens) -> VarTensor float32[B, C, vocab]`` (zero slack);
  ``forward(..., capture=True) -> (logits, intermediates)`` also returns what each layer
  sows (``intermediates["layer_{i}"]["residual"][0]``: the layer's input residual
  ``[B, C, d_model]``; ``intermediates["layer_{i}"]["mixer"]["inner"][0]``: the gated
  activation entering ``out_proj``, ``[B, C, d_inner]``), both zero in the slack;
- ``prefill(config, params, tokens) -> (logits, State)``, ``step(config, params, state,
  token_ids) -> (logits float32[B, vocab], State)`` (O(1) per token) and
  ``generate(config, params, prompts, n)``;
- ``permute_spec(config)``: the function-preserving permutable axes.

The network itself (config, state, selective scan, linen modules) lives in
``icd_jax.models.mamba_model``; its public names are re-exported here.

Parameters are a plain nested dict (``permute.flat`` paths such as
``layer_0/mixer/in_proj/kernel``); kernels are ``[in, out]``, the depthwise conv kernel
is ``[d_conv, d_inner]`` (tap ``d_conv - 1`` multiplies the current position).
Computation is float32 whatever the parameter dtype.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import vsla_jax as vs
from icd_jax.errors import ConfigError, ICDWarning, ModelError
from icd_jax.models import weights
from icd_jax.models.mamba_model import (
    DEFAULT_CHUNK,
    MAMBA_130M,
    Block,
    CausalConv,
    MambaConfig,
    MambaLM,
    Mixer,
    RMSNorm,
    State,
    a_log_init,
    causal_conv,
    conv_tail,
    dt_bias_init,
    linear_combine,
    module,
    rms_norm,
    scan_chunk,
    selective_scan,
    torch_linear,
    uniform,
    zero_state,
)
from icd_jax.permute import AxisUse, ModelSpec, PermAxis, flat

#: The public names, including those re-exported from ``mamba_model`` (the network), so
#: ``mamba.X`` keeps working for all of them.
__all__ = [
    "Block", "CausalConv", "DEFAULT_CHUNK", "DTYPES", "EMBEDDING_NAMES", "MAMBA_130M",
    "Mamba", "MambaConfig", "MambaLM", "Mixer", "RMSNorm", "State", "a_log_init",
    "as_tokens", "causal_conv", "config_from_hf", "conv_tail", "decode", "dt_bias_init",
    "embedding_name", "forward", "generate", "hf_from_params", "hf_shapes", "init",
    "init_params", "last_logits", "linear_combine", "load", "load_hf", "logits_padded",
    "module", "np_dtype",
    "params_from_hf", "permute_spec", "pick", "prefill", "rms_norm", "run_padded",
    "save_hf", "scan_chunk", "selective_scan", "step", "torch_linear", "uniform",
    "zero_state",
]

DTYPES = ("float32", "bfloat16", "float16")

# -- parameters -------------------------------------------------------------------------
def init(config: MambaConfig, seed: int = 0):
    """Random parameters (HF's initialisation), a nested dict of float32 arrays.

    ``seed``: an int, or a PRNG key. Traceable: ``jax.eval_shape(lambda: init(c, 0))``
    gives the shapes without allocating."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, (bool, np.bool_)):
        key = jax.random.PRNGKey(seed)
    elif isinstance(seed, jax.Array):  # a PRNG key (raw uint32[2] or typed), maybe traced
        key = seed
    else:
        raise ModelError(f"init: seed must be an int or a PRNG key, got "
                         f"{type(seed).__name__}")
    return init_params(config, key)


@functools.partial(jax.jit, static_argnames=("config",))
def init_params(config: MambaConfig, key: jax.Array):
    """``init`` from a PRNG key (jitted: one program per config)."""
    ids = jnp.zeros((1,), jnp.int32)  # one step touches every parameter, without a scan
    return module(config).init(key, ids, zero_state(config, 1),
                               method=MambaLM.step)["params"]


def np_dtype(dtype) -> np.dtype:
    """``"float32"``/``"bfloat16"``/``"float16"`` (or a dtype) as a NumPy dtype."""
    return weights.as_dtype(dtype, DTYPES)


def hf_shapes(config: MambaConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape, for every tensor of a Mamba checkpoint
    (the embedding under ``backbone.embeddings.weight``; ``lm_head`` is tied, absent)."""
    c = config
    out = {"backbone.embeddings.weight": (c.vocab_size, c.d_model)}
    for i in range(c.n_layers):
        p = f"backbone.layers.{i}."
        out |= {p + "norm.weight": (c.d_model,),
                p + "mixer.in_proj.weight": (2 * c.d_inner, c.d_model),
                p + "mixer.conv1d.weight": (c.d_inner, 1, c.d_conv),
                p + "mixer.conv1d.bias": (c.d_inner,),
                p + "mixer.x_proj.weight": (c.dt_rank + 2 * c.d_state, c.d_inner),
                p + "mixer.dt_proj.weight": (c.d_inner, c.dt_rank),
                p + "mixer.dt_proj.bias": (c.d_inner,),
                p + "mixer.A_log": (c.d_inner, c.d_state),
                p + "mixer.D": (c.d_inner,),
                p + "mixer.out_proj.weight": (c.d_model, c.d_inner)}
    out["backbone.norm_f.weight"] = (c.d_model,)
    return out


EMBEDDING_NAMES = ("backbone.embeddings.weight", "backbone.embedding.weight")


def embedding_name(tensors, source: str = "weights") -> str:
    """Which of ``EMBEDDING_NAMES`` the checkpoint uses."""
    for name in EMBEDDING_NAMES:
        if name in tensors:
            return name
    raise ModelError(f"{source} has no tensor {EMBEDDING_NAMES[0]!r} (nor "
                     f"{EMBEDDING_NAMES[1]!r})")


def config_from_hf(tensors, eps: float = 1e-5, source: str = "weights") -> MambaConfig:
    """The ``MambaConfig`` that HF Mamba tensors ``name -> array`` imply."""
    vocab, d_model = np.shape(tensors[embedding_name(tensors, source)])
    n = 0
    while f"backbone.layers.{n}.mixer.A_log" in tensors:
        n += 1
    if n == 0:
        raise ModelError(f"{source} has no tensor 'backbone.layers.0.mixer.A_log'")
    p = "backbone.layers.0.mixer."
    d_inner2 = np.shape(weights.take(tensors, p + "in_proj.weight", source=source))[0]
    if d_inner2 % (2 * d_model):
        raise ModelError(f"{source}: {p}in_proj.weight has {d_inner2} rows, not a multiple "
                         f"of 2 * d_model = {2 * d_model}")
    d_conv = np.shape(weights.take(tensors, p + "conv1d.weight", source=source))[-1]
    return MambaConfig(vocab_size=int(vocab), d_model=int(d_model), n_layers=n,
                       d_state=int(np.shape(tensors[p + "A_log"])[-1]), d_conv=int(d_conv),
                       expand=int(d_inner2 // (2 * d_model)),
                       dt_rank=int(np.shape(weights.take(tensors, p + "dt_proj.weight",
                                                         source=source))[-1]), eps=eps)


def params_from_hf(tensors, config: MambaConfig, dtype="float32", source: str = "weights"):
    """Our nested params from HF tensors (checked by name and shape)."""
    dt = np_dtype(dtype)
    shapes = hf_shapes(config)
    emb = embedding_name(tensors, source)
    get = {name: weights.take(tensors, emb if name == EMBEDDING_NAMES[0] else name, shape,
                              source) for name, shape in shapes.items()}
    head = tensors.get("lm_head.weight")
    if head is not None and not (np.shape(head) == np.shape(get[EMBEDDING_NAMES[0]])
                                 and np.array_equal(head, get[EMBEDDING_NAMES[0]])):
        warnings.warn(f"{source}: lm_head.weight differs from the embedding; Mamba ties them, "
                      "so it is ignored", ICDWarning, stacklevel=3)
    extra = sorted(set(tensors) - set(shapes) - {emb, "lm_head.weight"})
    if extra:
        warnings.warn(f"{source}: {len(extra)} tensors not used by Mamba-1, e.g. {extra[:3]}",
                      ICDWarning, stacklevel=3)
    p = {"embedding": {"embedding": get[EMBEDDING_NAMES[0]]},
         "norm_f": {"weight": get["backbone.norm_f.weight"]}}
    for i in range(config.n_layers):
        h = f"backbone.layers.{i}.mixer."
        p[f"layer_{i}"] = {
            "norm": {"weight": get[f"backbone.layers.{i}.norm.weight"]},
            "mixer": {"in_proj": {"kernel": get[h + "in_proj.weight"].T},
                      "conv1d": {"kernel": get[h + "conv1d.weight"][:, 0, :].T,
                                 "bias": get[h + "conv1d.bias"]},
                      "x_proj": {"kernel": get[h + "x_proj.weight"].T},
                      "dt_proj": {"kernel": get[h + "dt_proj.weight"].T,
                                  "bias": get[h + "dt_proj.bias"]},
                      "A_log": get[h + "A_log"], "D": get[h + "D"],
                      "out_proj": {"kernel": get[h + "out_proj.weight"].T}}}
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float32), dt), p)


def hf_from_params(params, config: MambaConfig) -> dict[str, np.ndarray]:
    """HF tensors ``name -> float32 array`` from our params (inverse of ``params_from_hf``)."""
    f = flat(params)

    def get(path):
        if path not in f:
            raise ModelError(f"params have no {path!r}")
        return np.asarray(jax.device_get(f[path]), np.float32)

    t = {"backbone.embeddings.weight": get("embedding/embedding"),
         "backbone.norm_f.weight": get("norm_f/weight")}
    for i in range(config.n_layers):
        h, m = f"backbone.layers.{i}.", f"layer_{i}/mixer/"
        t |= {h + "norm.weight": get(f"layer_{i}/norm/weight"),
              h + "mixer.in_proj.weight": get(m + "in_proj/kernel").T,
              h + "mixer.conv1d.weight": get(m + "conv1d/kernel").T[:, None, :],
              h + "mixer.conv1d.bias": get(m + "conv1d/bias"),
              h + "mixer.x_proj.weight": get(m + "x_proj/kernel").T,
              h + "mixer.dt_proj.weight": get(m + "dt_proj/kernel").T,
              h + "mixer.dt_proj.bias": get(m + "dt_proj/bias"),
              h + "mixer.A_log": get(m + "A_log"), h + "mixer.D": get(m + "D"),
              h + "mixer.out_proj.weight": get(m + "out_proj/kernel").T}
    for name, shape in hf_shapes(config).items():
        if t[name].shape != shape:
            raise ModelError(f"params give {name!r} the shape {t[name].shape}, the config "
                             f"expects {shape}")
    return t


def load_hf(path: str | os.PathLike, config: MambaConfig | None = None,
            dtype="float32"):
    """Params from a ``state-spaces/mamba-*-hf`` safetensors file (config inferred from
    the shapes when ``None``); a missing or mis-shaped tensor raises ``ModelError``."""
    t = weights.read(path)
    src = os.fspath(path)
    return params_from_hf(t, config or config_from_hf(t, source=src), dtype, src)


def save_hf(path: str | os.PathLike, params, config: MambaConfig) -> None:
    """Write ``params`` under the HF names (float32, tied head omitted)."""
    weights.write(path, hf_from_params(params, config), {"format": "pt"})


# -- permutations -----------------------------------------------------------------------
def permute_spec(config: MambaConfig) -> ModelSpec:
    """The function-preserving axes: ``residual`` (d_model, shared by every layer, the
    embedding and ``norm_f``) and ``inner_{i}`` (d_inner of layer ``i``; ``in_proj``'s
    x and z halves alike). Logits are over the vocabulary, so nothing visible changes."""
    c = config
    res = [AxisUse("embedding/embedding", 1), AxisUse("norm_f/weight", 0)]
    axes = []
    for i in range(c.n_layers):
        m = f"layer_{i}/mixer/"
        res += [AxisUse(f"layer_{i}/norm/weight", 0), AxisUse(m + "in_proj/kernel", 0),
                AxisUse(m + "out_proj/kernel", 1)]
        axes.append(PermAxis(f"inner_{i}", c.d_inner, (
            AxisUse(m + "in_proj/kernel", 1, parts=2),
            AxisUse(m + "conv1d/kernel", 1), AxisUse(m + "conv1d/bias", 0),
            AxisUse(m + "x_proj/kernel", 0),
            AxisUse(m + "dt_proj/kernel", 1), AxisUse(m + "dt_proj/bias", 0),
            AxisUse(m + "A_log", 0), AxisUse(m + "D", 0),
            AxisUse(m + "out_proj/kernel", 0))))
    return ModelSpec("mamba", (PermAxis("residual", c.d_model, tuple(res)), *axes), {})


# -- running it -------------------------------------------------------------------------
def as_tokens(tokens, config: MambaConfig | None = None,
              policy: vs.CapacityPolicy | None = None) -> vs.VarTensor:
    """A token batch ``VarTensor`` (``int32[B, C]``, lengths ``[B, 1]``) from a
    ``VarTensor`` or a list of int sequences; concrete ids are checked against the vocab."""
    if isinstance(tokens, vs.VarTensor):
        if tokens.batch_ndim != 1 or tokens.rank != 1 or tokens.features:
            raise ModelError(f"tokens must be a batch of 1-D items [B, C], got data "
                             f"{tokens.data.shape} with lengths {tokens.lengths.shape}")
        x = tokens
        if not jnp.issubdtype(x.data.dtype, jnp.integer):
            if not isinstance(x.data, jax.core.Tracer) and not np.array_equal(
                    np.asarray(x.data), np.round(np.asarray(x.data))):
                raise ModelError("token ids must be integers")
        x = vs.VarTensor.trusted(x.data.astype(jnp.int32), x.lengths, x.model)
    else:
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, (Sequence, np.ndarray)):
            raise ModelError(f"tokens must be a VarTensor or a list of int sequences, got "
                             f"{type(tokens).__name__}")
        items = []
        for i, s in enumerate(tokens):
            a = np.asarray(s)
            if a.ndim == 0 and np.issubdtype(a.dtype, np.integer):
                raise ModelError(f"tokens must be a list of int sequences (a batch), got a "
                                 f"flat list of ints at item {i}: wrap one sequence as "
                                 f"[[...]]")
            if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
                raise ModelError(f"token sequence {i} must be a 1-D list of ints, got shape "
                                 f"{a.shape} dtype {a.dtype}")
            items.append(a.astype(np.int32))
        if not items:
            raise ModelError("tokens: empty batch")
        x = vs.stack(items, policy=policy, dtype=np.int32)
    if config is not None and not isinstance(x.data, jax.core.Tracer) and not isinstance(
            x.lengths, jax.core.Tracer):
        d = np.asarray(x.data)
        real = np.arange(d.shape[1])[None, :] < np.asarray(x.lengths)
        if real.any() and (d[real].min() < 0 or d[real].max() >= config.vocab_size):
            raise ModelError(f"token ids must be in [0, {config.vocab_size}), got range "
                             f"[{d[real].min()}, {d[real].max()}]")
    return x


@functools.partial(jax.jit, static_argnames=("config", "chunk", "capture"))
def run_padded(config: MambaConfig, params, ids, lengths,
               chunk: int = DEFAULT_CHUNK, capture: bool = False):
    """Jitted model on padded arrays: ``ids int32[B, C]``, ``lengths int32[B]`` ->
    ``(logits float32[B, C, vocab], State)``, plus the intermediates when ``capture``."""
    m = module(config, chunk)
    if capture:
        out, mut = m.apply({"params": params}, ids, lengths, mutable=["intermediates"])
        return out, mut["intermediates"]
    return m.apply({"params": params}, ids, lengths)


def logits_padded(config: MambaConfig, params, ids, lengths) -> jax.Array:
    """The model on padded arrays, logits only: ``ids int32[B, C]``, ``lengths int32[B]``
    -> ``float32[B, C, vocab]`` (the function a StableHLO export of Mamba holds)."""
    return run_padded(config, params, ids, lengths)[0]


def forward(config: MambaConfig, params, tokens, *, capture: bool = False,
            chunk: int = DEFAULT_CHUNK):
    """Logits ``VarTensor float32[B, C, vocab]`` (zero slack) of a token batch.

    ``tokens``: a ``VarTensor`` (``int32[B, C]``, lengths ``[B, 1]``) or a list of int
    sequences. ``chunk``: scan chunk length (``DEFAULT_CHUNK``; 0: the whole capacity in
    one associative scan; 1: sequential). With ``capture=True`` returns ``(logits,
    intermediates)``: ``intermediates["layer_{i}"]["residual"][0]``
    ``float32[B, C, d_model]`` and ``...["mixer"]["inner"][0]`` ``float32[B, C, d_inner]``
    (zero slack).
    """
    x = as_tokens(tokens, config)
    out = run_padded(config, params, x.data, x.lengths[:, 0], chunk, capture)
    logits = vs.VarTensor.trusted(out[0][0] if capture else out[0], x.lengths)
    return (logits, out[1]) if capture else logits


def prefill(config: MambaConfig, params, tokens, *, chunk: int = DEFAULT_CHUNK
            ) -> tuple[vs.VarTensor, State]:
    """``(logits VarTensor float32[B, C, vocab], State)``: the parallel-scan forward and the
    recurrent state after each item's last real token (the initial state for length 0)."""
    x = as_tokens(tokens, config)
    logits, state = run_padded(config, params, x.data, x.lengths[:, 0], chunk)
    return vs.VarTensor.trusted(logits, x.lengths), state


@functools.partial(jax.jit, static_argnames=("config",))
def step(config: MambaConfig, params, state: State, token_ids) -> tuple[jax.Array, State]:
    """One token per item: ``token_ids int32[B]`` -> ``(logits float32[B, vocab], State)``."""
    return module(config).apply({"params": params}, jnp.asarray(token_ids, jnp.int32), state,
                                method=MambaLM.step)


def check_step_ids(token_ids, config: MambaConfig, state: State):
    """``token_ids`` for ``step``: ``int[B]`` matching the state's batch, each id in
    ``[0, vocab)`` (out of range, the embedding would read NaN or wrap); ``ModelError``
    otherwise. Traced ids are trusted."""
    if isinstance(token_ids, jax.core.Tracer):
        return token_ids
    ids = np.asarray(token_ids)
    b = state.ssm.shape[1]
    if ids.shape != (b,) or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ModelError(f"token_ids must be int[{b}] (one per item of the state), got "
                         f"shape {ids.shape} dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
        raise ModelError(f"token ids must be in [0, {config.vocab_size}), got min {ids.min()}, "
                         f"max {ids.max()}")
    return token_ids


def last_logits(logits: vs.VarTensor) -> jax.Array:
    """Each item's logits at its last real position, ``float32[B, vocab]`` (zeros for an
    empty item)."""
    i = jnp.maximum(logits.lengths[:, 0] - 1, 0)
    return logits.data[jnp.arange(logits.data.shape[0]), i]


def pick(logits, key, greedy: bool, temperature):
    """Next tokens ``int32[B]`` from ``logits [B, vocab]``: argmax, or a sample at
    ``temperature``."""
    if greedy:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "n", "greedy"))
def decode(config: MambaConfig, params, state: State, logits, key, n: int,
           greedy: bool = True, temperature=1.0) -> jax.Array:
    """``n`` tokens ``int32[B, n]`` continuing ``logits [B, vocab]`` and ``state``
    (``n - 1`` steps, one ``lax.scan`` over the step program)."""
    keys = jax.random.split(key, n)
    first = pick(logits, keys[0], greedy, temperature)
    m = module(config)

    def body(carry, k):
        tok, st = carry
        lg, st = m.apply({"params": params}, tok, st, method=MambaLM.step)
        return (pick(lg, k, greedy, temperature), st), tok

    (last, _), toks = jax.lax.scan(body, (first, state), keys[1:])
    return jnp.concatenate([toks.T, last[:, None]], axis=1)


def generate(config: MambaConfig, params, prompts, n: int, *, greedy: bool = True,
             temperature: float = 1.0, seed: int = 0,
             chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """``n`` new tokens per prompt, ``int32[B, n]`` (``[n]`` for one flat list of ints).

    The prompts (a ``VarTensor`` batch or int sequences, each non-empty) go through the
    parallel scan (``prefill``), then ``decode`` steps one token at a time. ``greedy=False``
    samples at ``temperature`` with ``seed``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(f"n must be a non-negative integer, got {n!r}")
    single = (not isinstance(prompts, vs.VarTensor) and len(prompts) > 0
              and np.ndim(prompts[0]) == 0)
    x = as_tokens([prompts] if single else prompts, config)
    if not greedy and not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature!r}")
    lengths = np.asarray(x.lengths)[:, 0]
    if (lengths == 0).any():
        raise ModelError(f"generate needs non-empty prompts; item {int(np.argmin(lengths))} "
                         "is empty")
    b = x.data.shape[0]
    if n == 0:
        out = np.zeros((b, 0), np.int32)
    else:
        logits, state = prefill(config, params, x, chunk=chunk)
        out = np.asarray(decode(config, params, state, last_logits(logits),
                                jax.random.PRNGKey(seed), int(n), bool(greedy),
                                float(temperature)))
    return out[0] if single else out


class Mamba:
    """A Mamba LM handle: ``config``, ``params`` and the scan ``chunk``."""

    def __init__(self, config: MambaConfig, params, *, chunk: int = DEFAULT_CHUNK):
        if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 0:
            raise ConfigError(f"chunk must be an integer >= 0 (0: one chunk), got {chunk!r}")
        self.config = config
        self.params = params
        self.chunk = int(chunk)

    def with_params(self, params) -> Mamba:
        """The same model with other parameters (a permuted or transformed copy)."""
        return Mamba(self.config, params, chunk=self.chunk)

    def logits(self, batch) -> vs.VarTensor:
        """``forward`` on a token batch: ``VarTensor float32[B, C, vocab]``."""
        return forward(self.config, self.params, batch, chunk=self.chunk)

    def capture(self, batch) -> tuple[vs.VarTensor, dict]:
        """``(logits, intermediates)``, as ``forward(..., capture=True)``."""
        return forward(self.config, self.params, batch, capture=True, chunk=self.chunk)

    def capture_batch(self, batch, params=None) -> dict[str, tuple[jax.Array, np.ndarray]]:
        """What each layer sows on one token batch, for ``icd_jax.capture.capture``:
        ``"layer_i/residual"`` ``float32[B * C, d_model]`` and ``"layer_i/inner"``
        ``float32[B * C, d_inner]``, each with a host mask ``bool[B * C]`` of real tokens."""
        x = as_tokens(batch, self.config)
        p = self.params if params is None else params
        _, inter = forward(self.config, p, x, capture=True, chunk=self.chunk)
        b, c = x.data.shape
        valid = (np.arange(c)[None, :] < np.asarray(x.lengths)).reshape(-1)
        out = {}
        for path, value in flat(inter).items():
            layer, name = path.split("/")[0], path.split("/")[-1]
            out[f"{layer}/{name}"] = (value[0].reshape(b * c, -1), valid)
        return out

    def prefill(self, batch) -> tuple[vs.VarTensor, State]:
        return prefill(self.config, self.params, batch, chunk=self.chunk)

    def step(self, state: State, token_ids) -> tuple[jax.Array, State]:
        """``step`` with this model's config and params; concrete ``token_ids`` are checked
        (``int[B]`` for the state's ``B`` items, each in the vocabulary)."""
        return step(self.config, self.params, state,
                    check_step_ids(token_ids, self.config, state))

    def generate(self, prompt, n: int, **kwargs) -> np.ndarray:
        """``generate`` with this model's config and params."""
        return generate(self.config, self.params, prompt, n, chunk=self.chunk, **kwargs)


def load(path: str | os.PathLike, config: MambaConfig | None = None, dtype="float32",
         *, chunk: int = DEFAULT_CHUNK) -> Mamba:
    """A ``Mamba`` handle from an HF safetensors file (``load_hf``)."""
    t = weights.read(path)
    src = os.fspath(path)
    config = config or config_from_hf(t, source=src)
    return Mamba(config, params_from_hf(t, config, dtype, src), chunk=chunk)
