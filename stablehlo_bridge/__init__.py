"""stablehlo_bridge: export permuted, transformed models as StableHLO that keeps the
layout decision visible (``icd.*`` tags) and runs the same in JAX and IREE.

    exp = stablehlo_bridge.build(case, perms)                       # export+permute+verify
    exp = stablehlo_bridge.export(fn, params, *example_args)       # weights embedded
    exp = passes.apply_permutation(exp, perms, spec=model_spec)     # permute + tag
    exp = passes.apply_permutation(exp, {"w1": (1, order)})         # parameter axes
    passes.verify(exp)
    exp2 = stablehlo_bridge.roundtrip(exp)                          # tags preserved
    stablehlo_bridge.export_artifacts(exp, "out/model.stablehlo")   # + .mlir .jax .json

``stablehlo_bridge.iree`` (compile and run with IREE) is imported on demand. Layering:
the bridge imports only ``icd_jax.permute`` and ``icd_jax.errors`` from ``icd_jax``; model
cases come from factories named by ``"package.module:function"`` strings
(``models.case``), and ``icd_jax.runtime.export`` is the runtime's one caller.
"""

from stablehlo_bridge import artifact, layout, mlir_io, models, passes, tags
from stablehlo_bridge.artifact import (
    export_artifacts,
    load_exported,
    load_module,
    read_sidecar,
    roundtrip,
)
from stablehlo_bridge.errors import (
    ArtifactError,
    BackendError,
    BridgeError,
    ModuleError,
    OrderError,
    SpecError,
    TagError,
)
from stablehlo_bridge.export import build, export, export_buckets, param_paths
from stablehlo_bridge.layout import Layout, resolve
from stablehlo_bridge.mlir_io import with_module
from stablehlo_bridge.models import Case
from stablehlo_bridge.passes import apply_permutation, attach_layout_tags, strip_tags, verify

__all__ = [
    "ArtifactError", "BackendError", "BridgeError", "Case", "Layout", "ModuleError",
    "OrderError", "SpecError", "TagError", "apply_permutation", "attach_layout_tags",
    "build", "export", "export_artifacts",
    "export_buckets", "load_exported", "load_module", "param_paths", "read_sidecar",
    "resolve", "roundtrip", "strip_tags", "verify", "with_module",
    # submodules
    "artifact", "layout", "mlir_io", "models", "passes", "tags",
]
