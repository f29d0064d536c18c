"""Layout-sensitive transforms: S (sparsity), Q (quantisation), K (key-block dropping).

Each ``apply_*`` returns ``(out, meta)`` (``icd_jax.adapters.meta`` documents ``meta``);
``tree`` applies them to a whole model's parameters through its ``ModelSpec``.
"""

from icd_jax.adapters import ffn, kv, meta, quant, sparsity, tree
from icd_jax.adapters.ffn import apply_ffn_sparsity
from icd_jax.adapters.kv import apply_kvcache
from icd_jax.adapters.quant import Quantized, apply_quant
from icd_jax.adapters.sparsity import apply_sparsity

__all__ = ["Quantized", "apply_ffn_sparsity", "apply_kvcache", "apply_quant",
           "apply_sparsity", "ffn", "kv", "meta", "quant", "sparsity", "tree"]
