"""The Mamba-1 network of ``icd_jax.models.mamba``: sizes (``MambaConfig``), the recurrent
``State``, the selective-scan math as small pure functions, HF's initialisers and the Flax
linen modules (``module(config)``).

Each layer is ``h = h + out_proj(scan(silu(conv(x))) * silu(z))`` with ``x, z =
in_proj(rmsnorm(h))``; the final ``norm_f`` feeds a head tied to the embedding. The scan
runs in chunks of ``chunk`` steps (``DEFAULT_CHUNK``): an associative scan inside each
chunk, a ``lax.scan`` carrying the state across chunks. Computation is float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from icd_jax.errors import ConfigError

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
