"""The Flax BERT encoder of ``minilm`` on packed tokens: sizes, execution-time
transforms and the linen modules.

The encoder takes one packed batch (``packing.Packed.arrays()``): every dense layer runs
on the packed rows ``[T, hidden]``; attention gathers Q/K/V into a ``VarTensor``
``[B, C, H, Dh]`` and runs ``vs.attention``. Its output is the mean-pooled, L2-normalised
embedding ``float32[B, hidden]``.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import vsla_jax as vs
from icd_jax.adapters import ffn, ffn_pallas, kv, quant
from icd_jax.errors import ConfigError
from vsla_jax.attention.reference import masked_softmax, safe_den


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT encoder sizes (inferred from the weights by ``config_from_weights``)."""

    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab: int = 2
    eps: float = 1e-12

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ConfigError(f"BertConfig: hidden={self.hidden} is not a multiple of "
                              f"heads={self.heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# -- the Flax model ---------------------------------------------------------------------
#: Activation-sparse FFN execution: ``mode="mask"`` (threshold, one dense matmul) or
#: ``"skip"`` (union tile skip on small calls); ``ffn.skips_tiles`` says which runs.
FFNSparsity = ffn.FFNSparsity


@dataclasses.dataclass(frozen=True)
class KeyBlockDrop:
    """Key-block dropping (``icd_jax.adapters.kv``): per sequence the ``drop`` fraction of
    key/value blocks of ``block`` tokens with least estimated mass is left out;
    ``permute_tokens`` first gathers high-mass tokens into few blocks."""

    block: int = 4
    drop: float = 0.25
    permute_tokens: bool = True


@dataclasses.dataclass(frozen=True)
class Transforms:
    """Execution-time transforms of the encoder. Weight transforms (pruned or
    ``adapters.quant.Quantized`` kernels) need none: they live in the parameters."""

    ffn: FFNSparsity | None = None
    kv: KeyBlockDrop | None = None


def stored(module: nn.Module, name: str, shape: tuple[int, ...], dtype, init):
    """The parameter ``name``: whatever the parameter tree holds (an array or a
    ``Quantized`` kernel, whose leaves need not have ``shape``), else initialised."""
    if module.has_variable("params", name):
        return module.get_variable("params", name)
    return module.param(name, init, shape, dtype)


class Part(nn.Module):
    """The settings every part of the encoder shares: sizes, the ``vs.attention``
    backend, the compute dtype, execution-time transforms, and what to sow
    (``capture``: intermediates for ``icd_jax.capture``; ``record_inputs``: every
    kernel's input rows, for calibrating and measuring quantisation)."""

    config: BertConfig
    backend: str = "auto"
    dtype: jnp.dtype = jnp.float32
    capture: bool = False
    record_inputs: bool = False
    transforms: Transforms = Transforms()

    def shared(self) -> dict:
        return dict(config=self.config, backend=self.backend, dtype=self.dtype,
                    capture=self.capture, record_inputs=self.record_inputs,
                    transforms=self.transforms)

    def kernel(self, name_in: int, features: int):
        """``(kernel [in, out], bias [out])`` of this module (arrays or ``Quantized``)."""
        k = stored(self, "kernel", (name_in, features), self.dtype,
                   nn.initializers.lecun_normal())
        return k, stored(self, "bias", (features,), self.dtype, nn.initializers.zeros)


class Projection(Part):
    """The ``kernel [in, out]`` and ``bias [out]`` of one dense layer, without applying
    them (Q, K and V are applied as one fused matmul)."""

    features: int = 0

    @nn.compact
    def __call__(self, in_features: int):
        return self.kernel(in_features, self.features)


class Linear(Part):
    """``x [T, in] @ kernel + bias`` for a plain or ``Quantized`` kernel; with
    ``sparse`` set, the activation-sparse tile-skipping down projection."""

    features: int = 0
    sparse: FFNSparsity | None = None

    @nn.compact
    def __call__(self, x):
        kernel, bias = self.kernel(x.shape[-1], self.features)
        if self.record_inputs:
            self.sow("intermediates", "input", x)
        if self.sparse is None:
            return quant.matmul(x, kernel) + bias
        # What ran is sown into ffn.RECORD (apply with mutable=[ffn.RECORD] to read it).
        s, layer = self.sparse, ffn.layer_of(self.path)
        threshold, k_cap = s.at(layer)
        if not ffn.skips_tiles(s, x.shape[0], x.shape[-1], layer):  # the mask: no skip
            self.sow(ffn.RECORD, "skipped", jnp.zeros((), bool))
            return quant.matmul(ffn.masked(x, threshold), kernel) + bias
        w = kernel.dequantize().astype(x.dtype) if isinstance(kernel, quant.Quantized) else kernel
        down = None if s.backend == "xla" else functools.partial(
            ffn_pallas.pallas_union_down, interpret=s.backend == "pallas-interpret")
        out, record = ffn.skip_down(x, w, bias, threshold, tile=s.tile, k_cap=k_cap,
                                    down=down)
        for name, value in record.items():
            self.sow(ffn.RECORD, name, value)
        return out


class Attention(Part):
    """Self-attention over packed rows ``[T, hidden]`` through ``vs.attention``."""

    @nn.compact
    def __call__(self, h, gather, scatter, lengths):
        c = self.config
        b, cap = gather.shape
        proj = [Projection(**self.shared(), features=c.hidden, name=n)(c.hidden)
                for n in ("query", "key", "value")]
        if self.record_inputs:
            self.sow("intermediates", "qkv_input", h)
        # One [hidden, 3 * hidden] matmul instead of three (measurably faster on CPU).
        qkv = quant.matmul(h, quant.concat_out([k for k, _ in proj])) + jnp.concatenate(
            [bias for _, bias in proj])

        def padded(x):  # [T, hidden] -> VarTensor [B, C, H, Dh]
            x = jnp.take(x, gather, axis=0, mode="fill", fill_value=0)
            return vs.VarTensor.trusted(x.reshape(b, cap, c.heads, c.head_dim),
                                        lengths[:, None])

        q, k, v = (padded(qkv[:, i * c.hidden:(i + 1) * c.hidden]) for i in range(3))
        if self.capture:
            self.sow("intermediates", "key_mass", key_mass(q.data, k.data, lengths))
        kvd = self.transforms.kv
        if kvd is None:
            o = vs.attention(q, k, v, backend=self.backend).data
        else:
            if self.capture:  # exact attention mass on the kept keys, per item
                kept = kv.select(q.data, k.data, lengths, block=kvd.block, drop=kvd.drop,
                                 permute_tokens=kvd.permute_tokens)
                self.sow("intermediates", "kv_mass_kept",
                         kv.mass_kept_per_item(q.data, k.data, lengths, *kept))
            o = kv.kv_drop_attention(q.data, k.data, v.data, lengths, block=kvd.block,
                                     drop=kvd.drop, permute_tokens=kvd.permute_tokens,
                                     backend=self.backend)
        o = jnp.take(o.reshape(b * cap, c.hidden), scatter, axis=0)
        return Linear(**self.shared(), features=c.hidden, name="output")(o)


def key_mass(q, k, lengths):
    """Attention probability mass each key receives, summed over queries and averaged
    over heads: ``float32[B, C]`` (zero on slack). ``q``, ``k``: ``[B, C, H, Dh]``."""
    valid = jnp.arange(q.shape[1])[None, :] < lengths[:, None]
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    p, _, den = masked_softmax(s / np.sqrt(q.shape[-1]), valid[:, None, None, :])
    p = jnp.where(valid[:, None, :, None], p / safe_den(den), 0.0)
    return p.sum(axis=2).mean(axis=1)


class Layer(Part):
    """One post-LayerNorm BERT layer on packed rows ``[T, hidden]``."""

    @nn.compact
    def __call__(self, h, gather, scatter, lengths):
        c = self.config
        norm = functools.partial(nn.LayerNorm, epsilon=c.eps, dtype=self.dtype,
                                 param_dtype=self.dtype)
        if self.capture:
            self.sow("intermediates", "residual", h)
        a = Attention(**self.shared(), name="attention")(h, gather, scatter, lengths)
        h = norm(name="attention_norm")(h + a)
        f = Linear(**self.shared(), features=c.intermediate, name="intermediate")(h)
        f = nn.gelu(f, approximate=False)
        if self.capture:
            self.sow("intermediates", "ffn", f)
        f = Linear(**self.shared(), features=c.hidden, sparse=self.transforms.ffn,
                   name="output")(f)
        return norm(name="output_norm")(h + f)


class Encoder(Part):
    """BERT on one ``Packed`` batch: mean-pooled, L2-normalised ``float32[B, hidden]``."""

    @nn.compact
    def __call__(self, ids, positions, segment, gather, scatter, lengths):
        c = self.config
        embed = functools.partial(nn.Embed, features=c.hidden, dtype=self.dtype,
                                  param_dtype=self.dtype)
        h = (embed(c.vocab_size, name="word_embeddings")(ids)
             + embed(c.max_positions, name="position_embeddings")(positions)
             + embed(c.type_vocab, name="token_type_embeddings")(jnp.zeros_like(ids)))
        h = nn.LayerNorm(epsilon=c.eps, dtype=self.dtype, param_dtype=self.dtype,
                         name="embeddings_norm")(h)
        for i in range(c.layers):
            h = Layer(**self.shared(), name=f"layer_{i}")(h, gather, scatter, lengths)
        return mean_pool(h, segment, lengths)


def mean_pool(h, segment, lengths):
    """Mean over each item's rows, then L2-normalised (sentence-transformers' Pooling +
    Normalize): ``h [T, D]``, ``segment [T]`` (``B`` for slack) -> ``float32[B, D]``."""
    b = lengths.shape[0]
    s = jax.ops.segment_sum(h.astype(jnp.float32), segment, num_segments=b)
    mean = s / jnp.maximum(lengths, 1).astype(jnp.float32)[:, None]
    norm = jnp.linalg.norm(mean, axis=-1, keepdims=True)
    return mean / jnp.maximum(norm, 1e-12)


#: No execution-time transforms (the default).
NO_TRANSFORMS = Transforms()
