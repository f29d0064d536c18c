"""stablehlo_bridge: export permuted models to StableHLO with jax.export."""
