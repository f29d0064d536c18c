"""Python values to MLIR attributes and back, limited to what StableHLO portable
artefacts (VHLO) can carry.

VHLO serialises discardable attributes of the builtin kinds string, bool, integer,
float, array, dictionary and dense elements; it rejects ``DenseI32ArrayAttr``
(``array<i32: ...>``) and unit attributes, and turns ``DenseI64ArrayAttr`` into a
tensor. So orders are stored as ``DenseIntElementsAttr`` (``dense<...> : tensor<Nxi32>``)
and ``None`` entries of dictionaries are dropped.

Every function here must be called inside an MLIR context (``with module.context:``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
from jaxlib.mlir import ir

from stablehlo_bridge.errors import TagError

I32, I64 = np.iinfo(np.int32), np.iinfo(np.int64)


def order_attr(order: np.ndarray) -> ir.DenseIntElementsAttr:
    """``int32[n]`` as ``dense<...> : tensor<nxi32>``."""
    a = np.ascontiguousarray(np.asarray(order, np.int32).reshape(-1))
    return ir.DenseIntElementsAttr.get(a, shape=[a.shape[0]])


def cast(kind: type, obj):
    """An attribute or type as the class ``kind`` (``ir.DictAttr``, ``ir.IntegerType``,
    ...), or None when it is not one."""
    if isinstance(obj, kind):
        return obj
    try:
        return kind(obj)
    except ValueError:
        return None


def order_value(attr: ir.Attribute, what: str) -> np.ndarray:
    """A ``dense<...> : tensor<nxi32>`` attribute as ``int32[n]``, or a ``TagError``
    naming ``what``."""
    dense = cast(ir.DenseIntElementsAttr, attr)
    if dense is None:
        raise TagError(f"{what} must be a dense i32 tensor attribute, got {attr}")
    attr = dense
    t = ir.RankedTensorType(attr.type)
    elem = cast(ir.IntegerType, t.element_type)
    if t.rank != 1 or elem is None or elem.width != 32:
        raise TagError(f"{what} must be a 1-D i32 tensor, got {t}")
    return np.array(attr).astype(np.int32).reshape(-1)


def to_attr(value: Any) -> ir.Attribute:
    """A JSON-like Python value (str, bool, int, float, NumPy integer array, list,
    dict, dataclass) as an MLIR attribute; ``TagError`` for anything else."""
    if isinstance(value, ir.Attribute):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, (bool, np.bool_)):
        return ir.BoolAttr.get(bool(value))
    if isinstance(value, (int, np.integer)):
        if not I64.min <= int(value) <= I64.max:
            raise TagError(f"integer {int(value)} does not fit a 64-bit tag (store it as a "
                           "string)")
        return ir.IntegerAttr.get(ir.IntegerType.get_signless(64), int(value))
    if isinstance(value, (float, np.floating)):
        return ir.FloatAttr.get_f64(float(value))
    if isinstance(value, str):
        return ir.StringAttr.get(value)
    if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.integer):
        if value.size and not (I64.min <= int(value.min()) and int(value.max()) <= I64.max):
            raise TagError(f"integer array values up to {int(value.max())} do not fit a "
                           "64-bit tag")
        fits32 = not value.size or (I32.min <= int(value.min()) and int(value.max()) <= I32.max)
        if value.ndim == 1 and fits32:
            return order_attr(value)
        return ir.DenseIntElementsAttr.get(np.ascontiguousarray(value.astype(np.int64)))
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TagError(f"tag dictionary keys must be str, got {k!r}")
            if v is not None:
                out[k] = to_attr(v)
        return ir.DictAttr.get(out)
    if isinstance(value, (list, tuple)):
        return ir.ArrayAttr.get([to_attr(v) for v in value])
    raise TagError(f"cannot store {type(value).__name__} {value!r} in a tag (use str, "
                   f"bool, int, float, int arrays, lists and dicts)")


def from_attr(attr: ir.Attribute) -> Any:
    """The inverse of ``to_attr``: JSON-able Python (dense integer tensors become lists
    of ints). Attribute kinds ``to_attr`` never writes give their MLIR text."""
    if (a := cast(ir.BoolAttr, attr)) is not None:
        return bool(a.value)
    if (a := cast(ir.IntegerAttr, attr)) is not None:
        # a BoolAttr read back from a module may come as an i1 IntegerAttr
        t = cast(ir.IntegerType, a.type)
        return bool(a.value) if t is not None and t.width == 1 else int(a.value)
    if (a := cast(ir.FloatAttr, attr)) is not None:
        return float(a.value)
    if (a := cast(ir.StringAttr, attr)) is not None:
        return a.value
    if (a := cast(ir.DenseIntElementsAttr, attr)) is not None:
        return np.array(a).astype(np.int64).tolist()  # nested lists keep the shape
    if (a := cast(ir.DictAttr, attr)) is not None:
        return {na.name: from_attr(na.attr) for na in a}
    if (a := cast(ir.ArrayAttr, attr)) is not None:
        return [from_attr(x) for x in a]
    return str(attr)
