"""Weight constants: NumPy arrays as dense MLIR attributes and back.

The MLIR bindings read and write through the buffer protocol, which covers bool,
signed and unsigned integers and float16/32/64. ``bfloat16`` (and other ``ml_dtypes``)
arrays are written bit for bit through an unsigned view; reading them back is not
supported by the bindings, so a pass cannot permute such a constant (``ModuleError``).
"""

from __future__ import annotations

import numpy as np
from jaxlib.mlir import ir

from stablehlo_bridge.errors import ModuleError

#: NumPy dtypes the bindings read back from a dense attribute.
READABLE = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
            np.uint32, np.uint64, np.float16, np.float32, np.float64)


def dense_attr(value: np.ndarray, tensor_type: ir.Type) -> ir.DenseElementsAttr:
    """``value`` as a dense attribute of ``tensor_type`` (its shape and element type).

    Call inside an MLIR context."""
    t = ir.RankedTensorType(tensor_type)
    a = np.asarray(value, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    if tuple(a.shape) != tuple(t.shape):
        raise ModuleError(f"value of shape {a.shape} does not fit {t}")
    if a.dtype.type not in READABLE:
        a = a.view(f"u{a.dtype.itemsize}")  # bfloat16 & co: same bits, explicit type
    return ir.DenseElementsAttr.get(a, type=t.element_type, shape=list(t.shape))


def dense_value(attr: ir.Attribute, what: str) -> np.ndarray:
    """The array held by a dense attribute (a splat expands to its full shape)."""
    try:
        dense = ir.DenseElementsAttr(attr)
    except ValueError as e:
        raise ModuleError(f"{what}: {attr} is not a dense elements attribute") from e
    t = ir.RankedTensorType(dense.type)
    try:
        a = np.array(dense)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ModuleError(f"{what}: cannot read a {t} constant through the MLIR bindings "
                          f"(supported: bool, integers, float16/32/64)") from e
    if a.dtype == object:
        raise ModuleError(f"{what}: cannot read a {t} constant through the MLIR bindings "
                          f"(supported: bool, integers, float16/32/64)")
    return a.reshape(tuple(t.shape))
