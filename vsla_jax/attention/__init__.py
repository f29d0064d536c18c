"""Variable-length attention (``vsla_jax.attention``)."""

from vsla_jax.attention.api import (
    BACKENDS,
    ApproxConfig,
    AttentionBackend,
    BucketedBackend,
    TilingStrategy,
    approximate_attention,
    attention,
    choose_backend,
)

__all__ = ["BACKENDS", "ApproxConfig", "AttentionBackend", "BucketedBackend", "TilingStrategy",
           "approximate_attention", "attention", "choose_backend"]
