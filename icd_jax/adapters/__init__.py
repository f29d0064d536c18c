"""Layout-sensitive transforms: S (sparsity), Q (quantisation), K (key-block dropping).

Each ``apply_*`` returns ``(out, meta)`` (see ``icd_jax.adapters.meta``).
"""
