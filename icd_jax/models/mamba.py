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

Parameters are a plain nested dict (``permute.flat`` paths such as
``layer_0/mixer/in_proj/kernel``); kernels are ``[in, out]``, the depthwise conv kernel
is ``[d_conv, d_inner]`` (tap ``d_conv - 1`` multiplies the current position).
Computation is float32 whatever the parameter dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import vsla_jax as vs
from icd_jax.errors import ConfigError, ICDWarning, ModelError
from icd_jax.models import weights
from icd_jax.permute import AxisUse, ModelSpec, PermAxis, flat

DTYPES = ("float32", "bfloat16", "float16")
#: Time steps per associative scan; chunks are chained by a ``lax.scan`` carrying the
#: state. 0 runs one parallel scan over the whole capacity (memory ``O(B C d_inner
#: d_state)``); 1 is the plain sequential recurrence.
DEFAULT_CHUNK = 16


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """Mamba-1 sizes. ``dt_rank="auto"`` resolves to ``ceil(d_model / 16)``.

    Attributes:
      vocab_size, d_model, n_layers: vocabulary, residual width, layer count.
      d_state: SSM state size per channel; d_conv: depthwise conv kernel width;
      expand: ``d_inner = expand * d_model``; dt_rank: rank of the ``dt`` projection;
      eps: RMSNorm epsilon.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    eps: float = 1e-5

    def __post_init__(self):
        if self.dt_rank == "auto":
            object.__setattr__(self, "dt_rank", math.ceil(self.d_model / 16))
        for name in ("vocab_size", "d_model", "n_layers", "d_state", "d_conv", "expand",
                     "dt_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"MambaConfig.{name} must be a positive integer"
                                  + (' (or "auto")' if name == "dt_rank" else "")
                                  + f", got {v!r}")
            object.__setattr__(self, name, int(v))
        if not (isinstance(self.eps, (int, float)) and 0 < self.eps < 1):
            raise ConfigError(f"MambaConfig.eps must be in (0, 1), got {self.eps!r}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @classmethod
    def mamba_130m(cls) -> MambaConfig:
        """``state-spaces/mamba-130m-hf`` (vocabulary padded to 50280, as HF ships it)."""
        return cls(vocab_size=50280, d_model=768, n_layers=24)

    @classmethod
    def tiny(cls, vocab_size: int = 64, d_model: int = 16, n_layers: int = 2,
             d_state: int = 4) -> MambaConfig:
        """A test-sized model."""
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, d_state=d_state)


MAMBA_130M = MambaConfig.mamba_130m()


class State(NamedTuple):
    """The recurrent state of a batch, stacked over layers.

    Attributes:
      conv: ``float32[n_layers, B, d_conv - 1, d_inner]``, the last ``d_conv - 1``
        conv inputs of each item (oldest first; zeros before its first token).
      ssm: ``float32[n_layers, B, d_inner, d_state]``, the SSM state after its last token.
    """

    conv: jax.Array
    ssm: jax.Array


def zero_state(config: MambaConfig, batch: int) -> State:
    """The state before any token, for ``batch`` items."""
    c = config
    return State(jnp.zeros((c.n_layers, batch, c.d_conv - 1, c.d_inner), jnp.float32),
                 jnp.zeros((c.n_layers, batch, c.d_inner, c.d_state), jnp.float32))


# -- the math, as small pure functions --------------------------------------------------
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last axis, float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * weight


def causal_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """Depthwise causal conv: ``x [B, T, D]``, ``kernel [K, D]``, ``bias [D]`` ->
    ``[B, T, D]``; ``out[t] = bias + sum_k kernel[k] * x[t - K + 1 + k]`` (zeros before 0)."""
    k, t = kernel.shape[0], x.shape[1]
    xp = jnp.pad(x, ((0, 0), (k - 1, 0), (0, 0)))
    return bias + sum(kernel[j] * xp[:, j:j + t] for j in range(k))


def linear_combine(left, right):
    """The associative combine of ``h_t = a_t * h_{t-1} + b_t`` (``left`` earlier)."""
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def scan_chunk(h0, dt, x, bm, cm, a):
    """One chunk of the selective scan by ``associative_scan`` over time.

    Args: ``h0 [B, D, N]``, ``dt, x [B, T, D]``, ``bm, cm [B, T, N]``, ``a [D, N]``.
    Returns: ``(h_T [B, D, N], y [B, T, D])`` with ``y_t = sum_n h_t[:, n] * cm_t[n]``.
    """
    da = jnp.exp(dt[..., None] * a)                                  # [B, T, D, N]
    dbx = (dt * x)[..., None] * bm[:, :, None, :]                     # [B, T, D, N]
    acum, bcum = jax.lax.associative_scan(linear_combine, (da, dbx), axis=1)
    h = acum * h0[:, None] + bcum
    y = jnp.einsum("btdn,btn->btd", h, cm)
    return h[:, -1], y


def selective_scan(h0, dt, x, bm, cm, a, chunk: int = 0):
    """The selective scan over ``T`` steps in chunks of ``chunk`` (0: one chunk).

    Shapes as ``scan_chunk``; chunks run in a ``lax.scan`` carrying ``h``, so memory is
    ``O(B * chunk * D * N)``. Where ``dt = 0`` the state is unchanged.
    """
    t = dt.shape[1]
    if chunk <= 0 or chunk >= t:
        return scan_chunk(h0, dt, x, bm, cm, a)
    n = -(-t // chunk)
    pad = n * chunk - t

    def split(v):  # [B, T, F] -> [n, B, chunk, F], padded with neutral (zero) steps
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0)))
        return v.reshape(v.shape[0], n, chunk, v.shape[2]).swapaxes(0, 1)

    def body(h, xs):
        return scan_chunk(h, *xs, a)

    h, ys = jax.lax.scan(body, h0, tuple(map(split, (dt, x, bm, cm))))
    y = ys.swapaxes(0, 1).reshape(dt.shape[0], n * chunk, dt.shape[2])
    return h, y[:, :t]


def conv_tail(x: jax.Array, lengths: jax.Array, k: int) -> jax.Array:
    """The last ``k - 1`` rows before each item's length: ``x [B, T, D]``, ``lengths [B]``
    -> ``[B, k - 1, D]`` (oldest first, zeros before position 0)."""
    idx = lengths[:, None] - (k - 1) + jnp.arange(k - 1)             # [B, k-1]
    rows = jnp.take_along_axis(x, jnp.clip(idx, 0, x.shape[1] - 1)[..., None], axis=1)
    return jnp.where((idx >= 0)[..., None], rows, 0.0)


# -- initialisers (HF MambaPreTrainedModel) ---------------------------------------------
def a_log_init(key, shape, dtype=jnp.float32):
    """``log(1..d_state)`` in every row of ``[d_inner, d_state]``."""
    del key
    return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32)),
                            shape).astype(dtype)


def dt_bias_init(key, shape, dtype=jnp.float32, dt_min: float = 1e-3, dt_max: float = 0.1,
                 floor: float = 1e-4):
    """The inverse softplus of ``dt`` drawn log-uniformly in ``[dt_min, dt_max]``."""
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)),
                     floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def uniform(bound: float):
    """Uniform in ``[-bound, bound]`` (PyTorch's default for Linear and Conv1d)."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def torch_linear(scale: float = 1.0):
    """PyTorch's ``nn.Linear`` default (uniform, bound ``1/sqrt(fan_in)``) times ``scale``."""
    return nn.initializers.variance_scaling(scale * scale / 3.0, "fan_in", "uniform")


# -- Flax modules -----------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm with a ``weight [d]`` parameter; float32 out."""

    eps: float

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        return rms_norm(x, w, self.eps)


class CausalConv(nn.Module):
    """Depthwise causal conv with ``kernel [d_conv, d_inner]`` and ``bias [d_inner]``."""

    d_conv: int
    channels: int

    def setup(self):
        b = self.d_conv ** -0.5
        self.kernel = self.param("kernel", uniform(b), (self.d_conv, self.channels),
                                 jnp.float32)
        self.bias = self.param("bias", uniform(b), (self.channels,), jnp.float32)

    def __call__(self, x):
        return causal_conv(x, self.kernel, self.bias)

    def tap(self, window):
        """The conv output at the last row of ``window [B, d_conv, d_inner]``."""
        return jnp.einsum("bkd,kd->bd", window, self.kernel) + self.bias


class Mixer(nn.Module):
    """The Mamba mixer on ``[B, T, d_model]`` (``__call__``) or one token (``step``)."""

    config: MambaConfig
    chunk: int = DEFAULT_CHUNK

    def setup(self):
        c = self.config
        self.in_proj = nn.Dense(2 * c.d_inner, use_bias=False, kernel_init=torch_linear())
        self.conv1d = CausalConv(c.d_conv, c.d_inner)
        self.x_proj = nn.Dense(c.dt_rank + 2 * c.d_state, use_bias=False,
                               kernel_init=torch_linear())
        self.dt_proj = nn.Dense(c.d_inner, kernel_init=uniform(c.dt_rank ** -0.5),
                                bias_init=dt_bias_init)
        self.A_log = self.param("A_log", a_log_init, (c.d_inner, c.d_state), jnp.float32)
        self.D = self.param("D", nn.initializers.ones, (c.d_inner,), jnp.float32)
        self.out_proj = nn.Dense(c.d_model, use_bias=False,
                                 kernel_init=torch_linear(c.n_layers ** -0.5))

    def ssm_inputs(self, x):
        """``x [..., d_inner]`` (post-conv) -> ``dt [..., d_inner]``, ``B, C [..., d_state]``."""
        c = self.config
        dbc = self.x_proj(x)
        dt, bm, cm = jnp.split(dbc, [c.dt_rank, c.dt_rank + c.d_state], axis=-1)
        return jax.nn.softplus(self.dt_proj(dt)), bm, cm

    def gate(self, y, z):
        y = y * jax.nn.silu(z)
        self.sow("intermediates", "inner", y)
        return self.out_proj(y)

    def __call__(self, h, mask, lengths):
        """``h [B, T, d_model]``, ``mask bool[B, T]``, ``lengths int32[B]`` ->
        ``(out [B, T, d_model], conv_state [B, K-1, d_inner], ssm_state [B, d_inner, N])``."""
        c = self.config
        m = mask[..., None]
        x, z = jnp.split(self.in_proj(h), 2, axis=-1)
        x = jnp.where(m, x, 0.0)
        tail = conv_tail(x, lengths, c.d_conv)
        u = jnp.where(m, jax.nn.silu(self.conv1d(x)), 0.0)
        dt, bm, cm = self.ssm_inputs(u)
        dt = jnp.where(m, dt, 0.0)
        h0 = jnp.zeros((h.shape[0], c.d_inner, c.d_state), jnp.float32)
        a = -jnp.exp(self.A_log.astype(jnp.float32))
        ssm, y = selective_scan(h0, dt, u, bm, cm, a, self.chunk)
        y = jnp.where(m, y + self.D * u, 0.0)
        return jnp.where(m, self.gate(y, z), 0.0), tail, ssm

    def step(self, h, conv_state, ssm_state):
        """One token: ``h [B, d_model]``, ``conv_state [B, K-1, d_inner]``, ``ssm_state
        [B, d_inner, N]`` -> ``(out [B, d_model], conv_state, ssm_state)``."""
        x, z = jnp.split(self.in_proj(h), 2, axis=-1)
        window = jnp.concatenate([conv_state, x[:, None]], axis=1)   # [B, K, d_inner]
        u = jax.nn.silu(self.conv1d.tap(window))
        dt, bm, cm = self.ssm_inputs(u)
        a = -jnp.exp(self.A_log.astype(jnp.float32))
        ssm = jnp.exp(dt[..., None] * a) * ssm_state + (dt * u)[..., None] * bm[:, None, :]
        y = jnp.einsum("bdn,bn->bd", ssm, cm) + self.D * u
        return self.gate(y, z), window[:, 1:], ssm


class Block(nn.Module):
    """Pre-norm residual block: ``h + mixer(norm(h))``."""

    config: MambaConfig
    chunk: int = DEFAULT_CHUNK

    def setup(self):
        self.norm = RMSNorm(self.config.eps)
        self.mixer = Mixer(self.config, self.chunk)

    def __call__(self, h, mask, lengths):
        self.sow("intermediates", "residual", h)
        out, tail, ssm = self.mixer(self.norm(h), mask, lengths)
        return h + out, tail, ssm

    def step(self, h, conv_state, ssm_state):
        out, conv_state, ssm_state = self.mixer.step(self.norm(h), conv_state, ssm_state)
        return h + out, conv_state, ssm_state


class MambaLM(nn.Module):
    """The language model: ``__call__(ids int32[B, T], lengths int32[B]) -> (logits
    float32[B, T, vocab] (zero past each length), State)``; ``step(ids int32[B], State)
    -> (logits float32[B, vocab], State)``."""

    config: MambaConfig
    chunk: int = DEFAULT_CHUNK

    def setup(self):
        c = self.config
        self.embedding = nn.Embed(c.vocab_size, c.d_model,
                                  embedding_init=nn.initializers.normal(0.02))
        self.layers = [Block(c, self.chunk, name=f"layer_{i}") for i in range(c.n_layers)]
        self.norm_f = RMSNorm(c.eps)

    def head(self, h):
        e = self.embedding.embedding
        return jnp.einsum("...d,vd->...v", self.norm_f(h), e.astype(jnp.float32))

    def __call__(self, ids, lengths):
        mask = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
        h = jnp.where(mask[..., None], self.embedding(ids).astype(jnp.float32), 0.0)
        convs, ssms = [], []
        for layer in self.layers:
            h, tail, ssm = layer(h, mask, lengths)
            convs.append(tail)
            ssms.append(ssm)
        logits = jnp.where(mask[..., None], self.head(h), 0.0)
        return logits, State(jnp.stack(convs), jnp.stack(ssms))

    def step(self, ids, state: State):
        h = self.embedding(ids).astype(jnp.float32)
        convs, ssms = [], []
        for i, layer in enumerate(self.layers):
            h, cs, ss = layer.step(h, state.conv[i], state.ssm[i])
            convs.append(cs)
            ssms.append(ss)
        return self.head(h), State(jnp.stack(convs), jnp.stack(ssms))


def module(config: MambaConfig, chunk: int = DEFAULT_CHUNK) -> MambaLM:
    """The linen module. ``module(c).apply({"params": params}, ids, lengths,
    mutable=["intermediates"])`` returns ``((logits, State), {"intermediates": ...})``."""
    return MambaLM(config, chunk)


# -- parameters -------------------------------------------------------------------------
def init(config: MambaConfig, seed: int = 0):
    """Random parameters (HF's initialisation), a nested dict of float32 arrays.

    ``seed``: an int, or a PRNG key. Traceable: ``jax.eval_shape(lambda: init(c, 0))``
    gives the shapes without allocating."""
    key = jax.random.PRNGKey(seed) if isinstance(seed, (int, np.integer)) else seed
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
        self.config = config
        self.params = params
        self.chunk = chunk

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
        return step(self.config, self.params, state, token_ids)

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
