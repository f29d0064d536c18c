"""Variable-length attention on VarTensor batches.

Modules (dependencies point down the list): ``api`` (``attention``, ``AttentionConfig``,
validation, the backend registry and ``choose_backend``), ``approximate`` (the lossy
opt-in mode), then the backends ``bucketed``, ``pallas`` (on top of ``tiled``),
``tiled`` and ``reference`` (the dense ``xla`` backend and the one masked softmax).
Front doors: ``vsla_jax.attention(...)`` and ``vsla_jax.approximate_attention(...)``.
"""

from vsla_jax.attention.api import (
    BACKENDS,
    AttentionArgumentError,
    AttentionBackend,
    AttentionConfig,
    UnknownBackendError,
    attention,
    backends_for,
    check_inputs,
    choose_backend,
)
from vsla_jax.attention.approximate import ApproxConfig, approximate_attention
from vsla_jax.attention.bucketed import BucketedBackend, BucketPlan
from vsla_jax.attention.cpu import CPUBackend
from vsla_jax.attention.pallas import PallasBackend
from vsla_jax.attention.reference import XLABackend
from vsla_jax.attention.tiled import TiledBackend, TilingStrategy

__all__ = [
    "BACKENDS", "ApproxConfig", "AttentionArgumentError", "AttentionBackend",
    "AttentionConfig", "BucketPlan", "BucketedBackend", "CPUBackend", "PallasBackend",
    "TiledBackend", "TilingStrategy",
    "UnknownBackendError", "XLABackend", "approximate_attention", "attention",
    "backends_for", "check_inputs", "choose_backend",
]
