"""icd_jax: iterative layout co-design.

Build a co-access graph W of channels, find an order pi that keeps co-accessed channels
together (cache-distance cost C, modularity Q), and apply layout-sensitive transforms.
"""

from icd_jax import adapters, capture, corpus, models, permute, quality
from icd_jax.cost import CostConfig, cache_cost, modularity, objective
from icd_jax.errors import (
    AdapterWarning,
    ConfigError,
    DegenerateGraphWarning,
    GraphError,
    ICDError,
    ICDWarning,
    PermutationError,
    ShapeError,
    TraceError,
    TraceWarning,
    WeightError,
)
from icd_jax.graph import CoAccessGraph, build_w
from icd_jax.solver import BASELINES, baseline, fit_permutation, nm_permutation

__all__ = [
    "AdapterWarning", "BASELINES", "CoAccessGraph", "ConfigError", "CostConfig",
    "DegenerateGraphWarning", "GraphError", "ICDError", "ICDWarning", "PermutationError",
    "ShapeError", "TraceError", "TraceWarning", "WeightError", "baseline", "build_w",
    "cache_cost", "fit_permutation", "modularity", "nm_permutation", "objective",
    # submodules
    "adapters", "capture", "corpus", "models", "permute", "quality",
    # the pipeline (imported on first use)
    "run", "runtime",
]


def __getattr__(name: str):
    """``icd_jax.run`` and ``icd_jax.runtime`` load the pipeline (pydantic, filelock,
    matplotlib) only when used."""
    if name == "run":
        from icd_jax.runtime.orchestrator import run

        return run
    if name == "runtime":
        import icd_jax.runtime as runtime

        return runtime
    raise AttributeError(f"module 'icd_jax' has no attribute {name!r}")
