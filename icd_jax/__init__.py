"""icd_jax: iterative layout co-design (co-access graphs, permutations, transforms)."""
