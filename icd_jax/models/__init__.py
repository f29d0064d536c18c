"""Real models on VarTensor batches.

``minilm``: Flax BERT with all-MiniLM-L6-v2's real weights, dense layers on packed tokens
(its linen modules in ``bert``, packed batches in ``packing``). ``mamba``: a Mamba-1
selective SSM language model in Flax (HF ``state-spaces/mamba-*`` weights; the network in
``mamba_model``). ``weights``: safetensors reading and atomic writing.
"""

from icd_jax.models import bert, mamba, mamba_model, minilm, packing, weights

__all__ = ["bert", "mamba", "mamba_model", "minilm", "packing", "weights"]
