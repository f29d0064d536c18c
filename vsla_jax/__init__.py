"""vsla_jax: Variable-Shape Linear Algebra on JAX.

A ``VarTensor`` is a capacity-padded array plus per-item logical lengths. Shapes
combine by ambient promotion; Model A multiplies by convolution, Model B by Kronecker
product. ``jit`` specialises on capacity buckets, never on exact lengths.

Subpackages: ``vsla_jax.conv`` (the ragged convolution engine) and
``vsla_jax.attention`` (variable-length attention). Import their modules with
``from vsla_jax.conv import engine``: the names ``vs.conv`` and ``vs.attention`` are the
front-door functions.
"""

# The subpackages are imported before the functions of the same name are bound below.
from vsla_jax.attention import (
    ApproxConfig,
    AttentionBackend,
    AttentionConfig,
    BucketPlan,
    TilingStrategy,
    approximate_attention,
    attention,
)
from vsla_jax.bucketing import RaggedBatch, bucketize
from vsla_jax.capacity import COUNT_POLICY, DEFAULT_POLICY, CapacityPolicy
from vsla_jax.conv import (
    ConvPolicy,
    CostModel,
    FlatRagged,
    HeterogeneityProfile,
    LayoutBudget,
    calibrate,
    conv_packed,
    heterogeneity_profile,
)
from vsla_jax.errors import (
    LengthError,
    ModelMismatchError,
    PolicyError,
    ShapeError,
    VSLAError,
    VSLATypeError,
)
from vsla_jax.host_memory import retain_host_memory
from vsla_jax.ops import (
    add,
    conv,
    hadamard,
    kron,
    mean,
    multiply,
    neg,
    norm,
    scale,
    shrink,
    sub,
    sum,
)
from vsla_jax.sharding import batch_mesh, pad_batch, shard_batch
from vsla_jax.stacking import merge_batch, pyramid, stack, tensor, window
from vsla_jax.tensor import VarTensor, from_dlpack, from_padded

__version__ = "0.1.0"

__all__ = [
    # the type, its capacity ladders and its errors
    "VarTensor", "CapacityPolicy", "DEFAULT_POLICY", "COUNT_POLICY",
    "VSLAError", "ShapeError", "LengthError", "ModelMismatchError", "VSLATypeError",
    "PolicyError",
    # constructors and conversions
    "tensor", "stack", "from_padded", "from_dlpack",
    # ops
    "add", "sub", "neg", "hadamard", "scale", "conv", "kron", "multiply",
    "sum", "norm", "mean", "shrink",
    # stacking
    "window", "pyramid", "merge_batch",
    # ragged storage and sharding
    "RaggedBatch", "bucketize", "batch_mesh", "pad_batch", "shard_batch",
    # the convolution engine
    "ConvPolicy", "CostModel", "LayoutBudget", "calibrate", "heterogeneity_profile",
    "HeterogeneityProfile", "conv_packed", "FlatRagged",
    # attention
    "attention", "approximate_attention", "AttentionConfig", "ApproxConfig",
    "AttentionBackend", "BucketPlan", "TilingStrategy",
    # the host allocator under XLA:CPU (opt-in, process-wide)
    "retain_host_memory",
]
