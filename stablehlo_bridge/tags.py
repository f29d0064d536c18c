"""The ``icd.*`` tags: their names, where they sit, and reading them back.

Schema ``icd.layout.v1``:

- on the public entry function (``func.func public @main``):
  ``icd.layout_tag`` (the schema string), ``icd.layout_perm`` (``{key: dense<...> :
  tensor<nxi32>}``, one order per permuted axis, keyed by axis name or
  ``"path:axis"``), ``icd.transform_meta`` (``{S = {...}, Q = {...}, K = {...}}``) and
  ``icd.metrics`` (``{C = f64, Q = f64, pi_hash = "sha256:..."}``);
- on each weight, an embedded ``stablehlo.constant`` or an argument of ``@main``:
  ``icd.param_path`` (``"layer_0/ffn/kernel"``, set by ``export``) and, once a layout
  is attached, ``icd.layout_tag``, ``icd.layout_perm`` (``{"<axis>": gather index over
  that whole axis}``: the held value is ``take(original, index, axis)``) and
  ``icd.layout_axes`` (``{"<axis>": key of the function-level order}``);
- on each op consuming a permuted weight: ``icd.layout_tag`` and
  ``icd.layout_operands`` (``{"<operand number>": param path}``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from jaxlib.mlir import ir
from jaxlib.mlir.dialects import func

from stablehlo_bridge import attrs
from stablehlo_bridge.errors import TagError

SCHEMA = "icd.layout.v1"
PREFIX = "icd."
LAYOUT_TAG = "icd.layout_tag"
LAYOUT_PERM = "icd.layout_perm"
LAYOUT_AXES = "icd.layout_axes"
LAYOUT_OPERANDS = "icd.layout_operands"
TRANSFORM_META = "icd.transform_meta"
METRICS = "icd.metrics"
PARAM_PATH = "icd.param_path"


@dataclasses.dataclass(frozen=True, eq=False)
class Weight:
    """One weight of a module: an embedded constant (``op``) or an argument of
    ``fn`` (``arg``), with its SSA value and tensor type."""

    path: str
    value: ir.Value
    type: ir.RankedTensorType
    op: ir.Operation | None = None
    fn: func.FuncOp | None = None
    arg: int = -1
    # the module that owns value/op/fn: the bindings free the IR with the Module object,
    # so a Weight must keep it alive (``weights(load(x))`` held dangling ops otherwise)
    owner: ir.Module | None = dataclasses.field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return "constant" if self.op is not None else "argument"

    def describe(self) -> str:
        where = "stablehlo.constant" if self.op is not None else f"argument {self.arg}"
        return f"{where} {self.path!r}"

    def get(self) -> dict[str, ir.Attribute]:
        """Its attributes (discardable ones for a constant; the argument's dict)."""
        if self.op is not None:
            return {k: self.op.attributes[k] for k in self.op.attributes}
        return arg_attrs(self.fn, self.arg)

    def set(self, name: str, value: ir.Attribute | None) -> None:
        """Set (or with ``None`` remove) one attribute."""
        if self.op is not None:
            if value is None:
                if name in self.op.attributes:
                    del self.op.attributes[name]
            else:
                self.op.attributes[name] = value
        else:
            set_arg_attr(self.fn, self.arg, name, value)


def children(op: ir.Operation) -> Iterator[ir.Operation]:
    """Every op nested in ``op``, pre-order (``op`` itself excluded)."""
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                yield child.operation
                yield from children(child.operation)


def functions(module: ir.Module) -> list[func.FuncOp]:
    """The ``func.func`` ops at the top of ``module``."""
    return [op for op in module.body.operations if isinstance(op, func.FuncOp)]


def arg_attrs(fn: func.FuncOp, i: int) -> dict[str, ir.Attribute]:
    """The attribute dict of argument ``i`` of ``fn``."""
    if "arg_attrs" not in fn.attributes:
        return {}
    d = ir.DictAttr(ir.ArrayAttr(fn.attributes["arg_attrs"])[i])
    return {na.name: na.attr for na in d}


def set_arg_attr(fn: func.FuncOp, i: int, name: str, value: ir.Attribute | None) -> None:
    """Set (or with ``None`` remove) attribute ``name`` of argument ``i`` of ``fn``."""
    n = len(fn.type.inputs)
    all_attrs = [arg_attrs(fn, j) for j in range(n)]
    if value is None:
        all_attrs[i].pop(name, None)
    else:
        all_attrs[i][name] = value
    fn.attributes["arg_attrs"] = ir.ArrayAttr.get([ir.DictAttr.get(d) for d in all_attrs])


def string(attr: ir.Attribute, what: str) -> str:
    """A ``StringAttr``'s value, or a ``TagError`` naming ``what``."""
    s = attrs.cast(ir.StringAttr, attr)
    if s is None:
        raise TagError(f"{what} must be a string, got {attr}")
    return s.value


def weights(module: ir.Module, entry: str = "main") -> dict[str, Weight]:
    """Every weight carrying ``icd.param_path``: constants anywhere in the module and
    arguments of ``@entry``. ``TagError`` when two carry the same path."""
    out: dict[str, Weight] = {}

    def add(w: Weight) -> None:
        if w.path in out:
            raise TagError(f"{PARAM_PATH} {w.path!r} is on both {out[w.path].describe()} "
                           f"and {w.describe()}")
        out[w.path] = w

    for fn in functions(module):
        if fn.sym_name.value == entry:
            for i, arg in enumerate(fn.entry_block.arguments):
                a = arg_attrs(fn, i)
                if PARAM_PATH in a:
                    path = string(a[PARAM_PATH], f"{PARAM_PATH} of argument {i}")
                    add(Weight(path, arg, ir.RankedTensorType(arg.type), fn=fn, arg=i,
                               owner=module))
        for op in children(fn.operation):
            if PARAM_PATH in op.attributes:
                path = string(op.attributes[PARAM_PATH], f"{PARAM_PATH} of {op.name}")
                if op.name != "stablehlo.constant":
                    raise TagError(f"{PARAM_PATH} {path!r} sits on {op.name}, not on a "
                                   f"stablehlo.constant")
                add(Weight(path, op.result, ir.RankedTensorType(op.result.type), op=op,
                           owner=module))
    return out


def icd_attrs(named: dict[str, ir.Attribute]) -> dict[str, Any]:
    """The ``icd.*`` entries of an attribute dict, as JSON-able Python."""
    return {k: attrs.from_attr(v) for k, v in sorted(named.items()) if k.startswith(PREFIX)}


def read(module: ir.Module) -> dict[str, dict[str, Any]]:
    """Every ``icd.*`` attribute of the module, as ``{site: {name: value}}`` with
    JSON-able values. Sites: ``"@main"`` (function attributes), ``"@main/arg3"``,
    ``"@main/op17:stablehlo.dot_general"`` (the 17th op of ``@main``, pre-order)."""
    out: dict[str, dict[str, Any]] = {}
    for fn in functions(module):
        name = fn.sym_name.value
        op = fn.operation
        found = icd_attrs({k: op.attributes[k] for k in op.attributes})
        if found:
            out[f"@{name}"] = found
        for i in range(len(fn.type.inputs)):
            found = icd_attrs(arg_attrs(fn, i))
            if found:
                out[f"@{name}/arg{i}"] = found
        for k, child in enumerate(children(op)):
            found = icd_attrs({a: child.attributes[a] for a in child.attributes})
            if found:
                out[f"@{name}/op{k}:{child.name}"] = found
    return out


def strip(module: ir.Module) -> int:
    """Remove every ``icd.*`` attribute in place; returns how many were removed."""
    removed = 0
    for fn in functions(module):
        for op in [fn.operation, *children(fn.operation)]:
            for k in [k for k in op.attributes if k.startswith(PREFIX)]:
                del op.attributes[k]
                removed += 1
        for i in range(len(fn.type.inputs)):
            for k in [k for k in arg_attrs(fn, i) if k.startswith(PREFIX)]:
                set_arg_attr(fn, i, k, None)
                removed += 1
    return removed
