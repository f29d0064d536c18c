"""Real models on VarTensor batches: ``minilm`` (Flax BERT, all-MiniLM-L6-v2 weights)."""

from icd_jax.models import minilm, weights

__all__ = ["minilm", "weights"]
