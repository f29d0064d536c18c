"""Safetensors weight files: read them, check names and shapes, write them atomically."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from icd_jax.errors import ConfigError, ModelError
from vsla_jax.util import atomic_write_bytes


def as_dtype(dtype, allowed: tuple[str, ...]) -> np.dtype:
    """A dtype name (or dtype) among ``allowed`` as a NumPy dtype (``bfloat16`` via
    ml_dtypes), or a ``ConfigError`` listing them."""
    import jax.numpy as jnp

    try:
        name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in allowed:
        raise ConfigError(f"dtype must be one of {allowed}, got {dtype!r}")
    return jnp.dtype(name)


def read(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file as NumPy arrays (never a pickle)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"weights file not found: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"cannot read safetensors file {path}: {e}") from e


def take(tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...] | None = None,
         source: str = "weights") -> np.ndarray:
    """``tensors[name]``, checked against ``shape``, or a ``ModelError`` naming it."""
    if name not in tensors:
        near = sorted(k for k in tensors if k.split(".")[-1] == name.split(".")[-1])[:3]
        raise ModelError(f"{source} has no tensor {name!r}"
                         + (f" (similar: {near})" if near else ""))
    a = tensors[name]
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ModelError(f"{source}: tensor {name!r} has shape {tuple(a.shape)}, expected "
                         f"{tuple(shape)}")
    return a


def write(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
          metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` atomically (``vsla_jax.util.atomic_write_bytes``)."""
    atomic_write_bytes(path, save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                  metadata=dict(metadata) if metadata else None))
