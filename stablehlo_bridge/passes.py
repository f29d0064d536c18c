"""Passes over StableHLO modules that make a layout decision visible and apply it.

Each pass takes an ``ir.Module`` (rewritten in place and returned) or a
``jax.export.Exported`` (left as it is; a new ``Exported`` running the rewritten module
is returned). They work on the in-memory MLIR through the ``jaxlib.mlir`` bindings.

- ``attach_layout_tags``: declare a layout (the weights already hold it): ``icd.*``
  tags on ``@main``, on the weights and on the ops consuming them (see ``tags``);
- ``apply_permutation``: permute the embedded weight constants (for weights passed as
  arguments: record the layout the caller must now pass), then tag as above;
- ``verify``: MLIR verification plus the consistency of every tag;
- ``strip_tags``: remove every ``icd.*`` attribute (the JSON sidecar keeps them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from jax import export as jax_export
from jaxlib.mlir import ir

from icd_jax import permute
from icd_jax.errors import PermutationError
from icd_jax.permute import ModelSpec
from stablehlo_bridge import attrs, layout, mlir_io, tags
from stablehlo_bridge.constants import dense_attr, dense_value
from stablehlo_bridge.errors import ModuleError, SpecError, TagError
from stablehlo_bridge.layout import Layout


def rewrite(target: mlir_io.Target, change: Callable[[ir.Module], None],
            target_version: str = "week4") -> mlir_io.Target:
    """``change`` applied to ``target``'s module: in place for an ``ir.Module``, into a
    new ``Exported`` (serialised at ``target_version``) for an ``Exported``."""
    module = mlir_io.load(target)
    change(module)
    if isinstance(target, jax_export.Exported):
        return mlir_io.with_module(target, module, target_version)
    return module


def dict_attr(attr: ir.Attribute | None, what: str) -> dict[str, ir.Attribute]:
    """A ``DictAttr`` as a dict (``{}`` for None), or a ``TagError`` naming ``what``."""
    if attr is None:
        return {}
    d = attrs.cast(ir.DictAttr, attr)
    if d is None:
        raise TagError(f"{what} must be a dictionary attribute, got {attr}")
    return {na.name: na.attr for na in d}


def weight_axes(w: tags.Weight, axes: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """``axes`` (axis -> gather index) with non-negative axes, checked against the
    weight's type; ``SpecError`` naming the weight otherwise."""
    rank, out = w.type.rank, {}
    for axis, index in axes.items():
        if not -rank <= axis < rank:
            raise SpecError(f"{w.describe()} has type {w.type}; axis {axis} is out of range")
        a = axis % rank
        if a in out:
            raise SpecError(f"{w.describe()}: axis {a} is permuted twice")
        if len(index) != w.type.shape[a]:
            raise SpecError(f"{w.describe()} has type {w.type}; the order for axis {axis} "
                            f"has {len(index)} entries, not {w.type.shape[a]}")
        out[a] = np.asarray(index, np.int32)
    return out


def found_weights(module: ir.Module, plan: Layout, entry: str
                  ) -> list[tuple[tags.Weight, dict[int, np.ndarray]]]:
    """The module's weights that ``plan`` permutes, with their checked axes. Parameters
    the module does not hold are skipped for a named-axis spec (unused by the model)
    and an error for explicit ``"path:axis"`` keys."""
    ws = tags.weights(module, entry)
    out = []
    for path, axes in plan.params.items():
        w = ws.get(path)
        if w is None:
            if plan.named:
                continue
            known = ", ".join(sorted(ws)[:8]) or "none"
            raise SpecError(f"no weight of the module carries {tags.PARAM_PATH} {path!r} "
                            f"(export it with stablehlo_bridge.export; found: {known})")
        out.append((w, weight_axes(w, axes)))
    if plan.params and not out:
        raise SpecError(f"none of the {len(plan.params)} parameters the spec permutes is a "
                        f"weight of the module (no {tags.PARAM_PATH} matches; export it "
                        f"with stablehlo_bridge.export)")
    return out


def weight_perms(w: tags.Weight) -> dict[int, np.ndarray]:
    """The layout a weight's tags declare: axis -> gather index (empty if untagged)."""
    d = dict_attr(w.get().get(tags.LAYOUT_PERM), f"{tags.LAYOUT_PERM} of {w.describe()}")
    return {int(k): attrs.order_value(v, f"{tags.LAYOUT_PERM} of {w.describe()} axis {k}")
            for k, v in d.items()}


def function_orders(main) -> dict[str, np.ndarray]:
    """The function-level orders of ``@main`` (key -> order)."""
    d = dict_attr(main.attributes[tags.LAYOUT_PERM] if tags.LAYOUT_PERM in main.attributes
                  else None, f"{tags.LAYOUT_PERM} of @main")
    return {k: attrs.order_value(v, f"{tags.LAYOUT_PERM}[{k!r}] of @main")
            for k, v in d.items()}


def metrics_attr(metrics: Mapping[str, Any], orders: Mapping[str, np.ndarray]
                 ) -> ir.Attribute:
    """``icd.metrics``: the given numbers as f64 (C, Q, ...) and ``pi_hash``."""
    out = {}
    for k, v in metrics.items():
        if k == "pi_hash":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                or not math.isfinite(v):
            raise TagError(f"{tags.METRICS}[{k!r}] must be a finite number, got {v!r}")
        out[k] = ir.FloatAttr.get_f64(float(v))
    out["pi_hash"] = ir.StringAttr.get(layout.pi_hash(orders))
    return ir.DictAttr.get(out)


def tag_layout(module: ir.Module, found: list[tuple[tags.Weight, dict[int, np.ndarray]]],
               plan: Layout, orders: Mapping[str, np.ndarray],
               transform_meta: Mapping[str, Any] | None,
               metrics: Mapping[str, Any] | None, entry: str) -> None:
    """Write the tags: ``found`` weights hold ``take(original, index, axis)`` per axis,
    ``orders`` are the function-level orders of the keys ``plan`` names."""
    main = mlir_io.entry(module, entry)
    schema = ir.StringAttr.get(tags.SCHEMA)
    for w, axes in found:
        old = w.get()
        perm = dict_attr(old.get(tags.LAYOUT_PERM), f"{tags.LAYOUT_PERM} of {w.describe()}")
        names = dict_attr(old.get(tags.LAYOUT_AXES), f"{tags.LAYOUT_AXES} of {w.describe()}")
        for axis, index in axes.items():
            perm[str(axis)] = attrs.order_attr(index)
            src = plan.sources[w.path]
            key = next(src[a] for a in src if a % w.type.rank == axis)
            names[str(axis)] = ir.StringAttr.get(key)
        w.set(tags.LAYOUT_TAG, schema)
        w.set(tags.LAYOUT_PERM, ir.DictAttr.get(dict(sorted(perm.items()))))
        w.set(tags.LAYOUT_AXES, ir.DictAttr.get(dict(sorted(names.items()))))
        for use in w.value.uses:
            op = use.owner.operation
            where = f"{tags.LAYOUT_OPERANDS} of {op.name}"
            operands = dict_attr(op.attributes[tags.LAYOUT_OPERANDS]
                                 if tags.LAYOUT_OPERANDS in op.attributes else None, where)
            operands[str(use.operand_number)] = ir.StringAttr.get(w.path)
            op.attributes[tags.LAYOUT_TAG] = schema
            op.attributes[tags.LAYOUT_OPERANDS] = ir.DictAttr.get(dict(sorted(
                operands.items(), key=lambda kv: int(kv[0]))))
    merged = {**function_orders(main), **orders}
    fa = main.attributes
    fa[tags.LAYOUT_TAG] = schema
    fa[tags.LAYOUT_PERM] = ir.DictAttr.get({k: attrs.order_attr(v)
                                            for k, v in sorted(merged.items())})
    if transform_meta is not None:
        fa[tags.TRANSFORM_META] = attrs.to_attr(dict(transform_meta))
    elif tags.TRANSFORM_META not in fa:
        fa[tags.TRANSFORM_META] = ir.DictAttr.get({})
    if metrics is None:
        old = dict_attr(fa[tags.METRICS] if tags.METRICS in fa else None,
                        f"{tags.METRICS} of @{entry}")
        metrics = {k: attrs.from_attr(v) for k, v in old.items()}
    fa[tags.METRICS] = metrics_attr(metrics, merged)


def attach_layout_tags(target: mlir_io.Target, perms, transform_meta: Mapping | None = None,
                       metrics: Mapping[str, float] | None = None, *,
                       spec: ModelSpec | None = None, entry: str = "main"
                       ) -> mlir_io.Target:
    """Tag ``target`` with a layout its weights already hold (an export of permuted
    parameters). Idempotent: the same call twice gives the same module.

    Args:
      target: an ``ir.Module`` (tagged in place) or an ``Exported`` (a new one returned).
      perms: ``{"path:axis": order}``, ``{axis_name: order}`` with ``spec``, or a
        ``Layout``.
      transform_meta: the transforms' settings, e.g. ``{"S": {...}, "Q": {...},
        "K": {...}}`` (str/bool/int/float/list/dict/dataclass values; None entries are
        dropped); None keeps what is there (``{}`` at first).
      metrics: numbers such as ``{"C": cost, "Q": modularity}``; ``pi_hash`` is
        computed. None keeps what is there.
      spec: the model's ``icd_jax.permute.ModelSpec`` for named axes.
    """
    plan = layout.resolve(perms, spec)

    def change(module: ir.Module) -> None:
        with module.context:
            found = found_weights(module, plan, entry)
            tag_layout(module, found, plan, plan.orders, transform_meta, metrics, entry)

    return rewrite(target, change)


def apply_permutation(target: mlir_io.Target, perms, transform_meta: Mapping | None = None,
                      metrics: Mapping[str, float] | None = None, *,
                      spec: ModelSpec | None = None, entry: str = "main"
                      ) -> mlir_io.Target:
    """Permute the weights of ``target`` and tag the new layout.

    Embedded constants are rewritten in place (``take(value, index, axis)``); a weight
    passed as an argument keeps its type and gets the layout in its tags (the caller
    passes ``permute.apply(spec, params, perms)``). A function-preserving set of orders
    (a model's named axes, or e.g. ``{"w1:1": p, "w2:0": p}``) leaves the module
    computing the same function. Applying twice composes: tags always give the held
    layout relative to the exported weights. Arguments as ``attach_layout_tags``, except
    ``metrics``: None drops the metrics a previous tagging recorded (they describe the
    layout before this one); only the new ``pi_hash`` is written.
    """
    plan = layout.resolve(perms, spec)
    metrics = {} if metrics is None else metrics

    def change(module: ir.Module) -> None:
        with module.context:
            found = found_weights(module, plan, entry)
            composed = []
            for w, axes in found:
                held = weight_perms(w)
                check_same_keys(w, axes, plan)
                if w.op is not None:
                    value = dense_value(w.op.attributes["value"], w.describe())
                    for axis, index in axes.items():
                        value = np.take(value, index, axis=axis)
                    w.op.attributes["value"] = dense_attr(value, w.type)
                composed.append((w, then_axes(held, axes, w.describe())))
            old = function_orders(mlir_io.entry(module, entry))
            common = {k: old[k] for k, v in plan.orders.items()
                      if k in old and len(old[k]) == len(v)}
            orders = compose(common, plan.orders, f"{tags.LAYOUT_PERM} of @{entry}")
            tag_layout(module, composed, plan, orders, transform_meta, metrics, entry)

    return rewrite(target, change)


def compose(first: Mapping[str, np.ndarray], second: Mapping[str, np.ndarray],
            what: str) -> dict[str, np.ndarray]:
    """``permute.compose``: per key ``first[second]`` (``take`` by ``first``, then by
    ``second``); a ``TagError`` naming ``what`` when a held order is no permutation."""
    try:
        return permute.compose(first, second)
    except PermutationError as e:
        raise TagError(f"{what}: {e}") from e


def check_same_keys(w: tags.Weight, axes: Mapping[int, np.ndarray], plan: Layout) -> None:
    """``SpecError`` when an axis of ``w`` already holds an order under another key
    (a named axis, then ``"path:axis"``, or the reverse): the function-level orders
    could not say what the weight holds."""
    names = dict_attr(w.get().get(tags.LAYOUT_AXES), f"{tags.LAYOUT_AXES} of {w.describe()}")
    src = plan.sources[w.path]
    for axis in axes:
        old = names.get(str(axis))
        new = next(src[a] for a in src if a % w.type.rank == axis)
        if old is not None and ir.StringAttr(old).value != new:
            raise SpecError(f"{w.describe()} axis {axis} holds an order of "
                            f"{ir.StringAttr(old).value!r}; a further order must use the "
                            f"same key, got {new!r}")


def then_axes(held: Mapping[int, np.ndarray], axes: Mapping[int, np.ndarray],
              what: str) -> dict[int, np.ndarray]:
    """The gather index per axis of ``axes`` after the ``held`` one (axis -> index)."""
    got = compose({str(a): held[a] for a in axes if a in held},
                  {str(a): i for a, i in axes.items()}, f"{tags.LAYOUT_PERM} of {what}")
    return {int(a): i for a, i in got.items()}


def tag_order(index: np.ndarray, what: str, key: str) -> np.ndarray:
    """``index`` if it is a permutation of its length (``permute.check_order``); else
    a ``TagError`` naming ``what`` and ``key``."""
    try:
        return permute.check_order(key, index, index.shape[0])
    except PermutationError as e:
        raise TagError(f"{what}: {e}") from e


def expands(order: np.ndarray, index: np.ndarray) -> bool:
    """Whether ``index`` (``int32[dim]``) is ``AxisUse.index(order)`` for some ``group``
    and ``parts`` with ``dim == len(order) * group * parts``."""
    n, dim = order.shape[0], index.shape[0]
    if n == 0 or dim % n:
        return False
    for group in (g for g in range(1, dim // n + 1) if (dim // n) % g == 0):
        use = permute.AxisUse("", 0, group=group, parts=dim // (n * group))
        if np.array_equal(use.index(order), index):
            return True
    return False


def verify(target: mlir_io.Target, entry: str = "main") -> None:
    """Check ``target``: MLIR verification (``ModuleError``), and every tag well typed
    and consistent (``TagError`` naming it): each order a permutation, each weight's
    axis within its rank and its index as long as that dimension, each named axis
    known at function level and dividing the dimension, each consumer's operand the
    weight it names, ``pi_hash`` matching the function-level orders, and each weight's
    gather index the function-level order its ``icd.layout_axes`` names, expanded to
    the axis (``AxisUse.index`` for some group and parts)."""
    module = mlir_io.load(target)
    with module.context:
        try:
            module.operation.verify()
        except ir.MLIRError as e:
            raise ModuleError(f"module fails MLIR verification: {e}") from e
        main = mlir_io.entry(module, entry)
        for fn in tags.functions(module):
            for op in [fn.operation, *tags.children(fn.operation)]:
                if tags.LAYOUT_TAG in op.attributes:
                    got = tags.string(op.attributes[tags.LAYOUT_TAG],
                                      f"{tags.LAYOUT_TAG} of {op.name}")
                    if got != tags.SCHEMA:
                        raise TagError(f"{tags.LAYOUT_TAG} of {op.name} is {got!r}; this "
                                       f"bridge reads {tags.SCHEMA!r}")
        orders = function_orders(main)
        for key, order in orders.items():
            tag_order(order, f"{tags.LAYOUT_PERM} of @{entry}", key)
        fa = main.attributes
        if tags.TRANSFORM_META in fa:
            dict_attr(fa[tags.TRANSFORM_META], f"{tags.TRANSFORM_META} of @{entry}")
        if tags.METRICS in fa:
            m = dict_attr(fa[tags.METRICS], f"{tags.METRICS} of @{entry}")
            if "pi_hash" not in m:
                raise TagError(f"{tags.METRICS} of @{entry} has no pi_hash")
            got = tags.string(m["pi_hash"], f"{tags.METRICS}['pi_hash'] of @{entry}")
            if got != layout.pi_hash(orders):
                raise TagError(f"{tags.METRICS}['pi_hash'] of @{entry} ({got}) does not "
                               f"match its {tags.LAYOUT_PERM} ({layout.pi_hash(orders)})")
        ws = tags.weights(module, entry)
        for w in ws.values():
            verify_weight(w, orders)
        for fn in tags.functions(module):
            for op in tags.children(fn.operation):
                if tags.LAYOUT_PERM in op.attributes and tags.PARAM_PATH not in op.attributes:
                    raise TagError(f"{tags.LAYOUT_PERM} sits on {op.name}, which is no "
                                   f"weight (no {tags.PARAM_PATH})")
                if tags.LAYOUT_OPERANDS in op.attributes:
                    verify_consumer(op, ws)


def verify_weight(w: tags.Weight, orders: Mapping[str, np.ndarray]) -> None:
    """The tags of one weight against its type and the function-level orders."""
    a = w.get()
    perm = dict_attr(a.get(tags.LAYOUT_PERM), f"{tags.LAYOUT_PERM} of {w.describe()}")
    indexes: dict[str, np.ndarray] = {}
    for key, value in perm.items():
        what = f"{tags.LAYOUT_PERM} of {w.describe()} axis {key}"
        try:
            axis = int(key)
        except ValueError:
            raise TagError(f"{what}: the key must be an axis number") from None
        if not 0 <= axis < w.type.rank:
            raise TagError(f"{what}: axis {axis} is out of range for {w.type}")
        index = attrs.order_value(value, what)
        if not w.type.is_dynamic_dim(axis) and index.shape[0] != w.type.shape[axis]:
            raise TagError(f"{what}: {index.shape[0]} entries, but axis {axis} of {w.type} "
                           f"has {w.type.shape[axis]}")
        indexes[key] = tag_order(index, f"{tags.LAYOUT_PERM} of {w.describe()}", key)
    names = dict_attr(a.get(tags.LAYOUT_AXES), f"{tags.LAYOUT_AXES} of {w.describe()}")
    for key, value in names.items():
        what = f"{tags.LAYOUT_AXES} of {w.describe()} axis {key}"
        if key not in indexes:
            raise TagError(f"{what}: that axis has no {tags.LAYOUT_PERM}")
        name = tags.string(value, what)
        if name not in orders:
            raise TagError(f"{what} names {name!r}, which @main's {tags.LAYOUT_PERM} lacks")
        n, dim = orders[name].shape[0], w.type.shape[int(key)]
        if n == 0 or dim % n:
            raise TagError(f"{what}: order {name!r} has {n} entries, which does not divide "
                           f"the {dim} of axis {key}")
        if not expands(orders[name], indexes[key]):
            raise TagError(f"{tags.LAYOUT_PERM} of {w.describe()} axis {key} disagrees with "
                           f"@main's order {name!r} (its {tags.LAYOUT_AXES}): the weight's "
                           f"gather index is not that order expanded to the axis")


def verify_consumer(op: ir.Operation, ws: Mapping[str, tags.Weight]) -> None:
    """An op's ``icd.layout_operands``: each names an operand that is that weight."""
    d = dict_attr(op.attributes[tags.LAYOUT_OPERANDS], f"{tags.LAYOUT_OPERANDS} of {op.name}")
    operands = list(op.operands)
    for key, value in d.items():
        what = f"{tags.LAYOUT_OPERANDS}[{key!r}] of {op.name}"
        path = tags.string(value, what)
        if not key.isdigit() or int(key) >= len(operands):
            raise TagError(f"{what}: {op.name} has {len(operands)} operands")
        if path not in ws:
            raise TagError(f"{what} names {path!r}, which no weight carries")
        if operands[int(key)] != ws[path].value:
            raise TagError(f"{what} names {path!r}, but operand {key} is another value")


def strip_tags(target: mlir_io.Target) -> mlir_io.Target:
    """``target`` without any ``icd.*`` attribute (``icd.param_path`` included), for
    consumers that reject unknown attributes; keep the tags in the JSON sidecar."""

    def change(module: ir.Module) -> None:
        with module.context:
            tags.strip(module)

    return rewrite(target, change)
