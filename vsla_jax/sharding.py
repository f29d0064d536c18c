"""Sharding a batch of VarTensors across devices along the batch axis."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vsla_jax.errors import ShapeError, VSLATypeError
from vsla_jax.tensor import VarTensor


def batch_mesh(devices=None, axis: str = "batch") -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices) named ``axis``."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (axis,))


def pad_batch(x: VarTensor, multiple: int) -> VarTensor:
    """Append empty items (length 0) so the leading batch axis is a multiple of ``multiple``."""
    if not isinstance(x, VarTensor):
        raise VSLATypeError(f"pad_batch takes a VarTensor batch, got {type(x).__name__}")
    if x.batch_ndim == 0:
        raise ShapeError("pad_batch needs a batched VarTensor")
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or (
            multiple < 1):
        raise ShapeError(f"pad_batch: multiple must be a positive integer, got {multiple!r}")
    n = x.batch_shape[0]
    extra = (-n) % multiple
    if not extra:
        return x
    data = jnp.pad(x.data, [(0, extra)] + [(0, 0)] * (x.data.ndim - 1))
    lengths = jnp.pad(x.lengths, [(0, extra)] + [(0, 0)] * (x.lengths.ndim - 1))
    return VarTensor(data, lengths, x.model)


def shard_batch(x: VarTensor, mesh: Mesh | None = None, axis: str | None = None,
                pad: bool = False) -> VarTensor:
    """Place ``x`` with its leading batch axis split over ``mesh`` axis ``axis``.

    ``axis`` defaults to ``"batch"``, or to the mesh's only axis. The batch size must
    divide evenly over the devices, or pass ``pad=True`` to append empty items.
    """
    if mesh is None:
        mesh = batch_mesh(axis=axis or "batch")
    names = tuple(mesh.axis_names)
    if axis is None:
        axis = names[0] if len(names) == 1 else "batch"
    if axis not in names:
        raise ShapeError(f"shard_batch: the mesh has no axis {axis!r} (its axes: {names}); "
                         "pass axis= one of them")
    n_dev = mesh.shape[axis]
    if x.batch_ndim == 0:
        raise ShapeError("shard_batch needs a batched VarTensor")
    if x.batch_shape[0] % n_dev:
        if not pad:
            raise ShapeError(
                f"batch of {x.batch_shape[0]} does not split over {n_dev} devices; "
                "pass pad=True to append empty items"
            )
        x = pad_batch(x, n_dev)
    spec = NamedSharding(mesh, PartitionSpec(axis))
    return VarTensor(jax.device_put(x.data, spec), jax.device_put(x.lengths, spec), x.model)
