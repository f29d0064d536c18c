"""Real models on VarTensor batches.

``minilm``: Flax BERT with all-MiniLM-L6-v2's real weights, dense layers on packed tokens.
``mamba``: a Mamba-1 selective SSM language model in Flax (HF ``state-spaces/mamba-*``
weights). ``weights``: safetensors reading and atomic writing.
"""

from icd_jax.models import mamba, minilm, weights

__all__ = ["mamba", "minilm", "weights"]
