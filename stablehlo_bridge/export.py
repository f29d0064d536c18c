"""``export(fn, params, *args)``: a ``jax.export.Exported`` of ``fn(params, *args)``
whose weights are findable by their parameter path.

The function is lowered once with the parameters as arguments, so each weight's
argument of ``@main`` is known exactly (no matching of constants by value, which
breaks on equal weights such as Mamba's per-layer ``D``). Then:

- ``embed_params=True``: each weight argument becomes a ``stablehlo.constant`` holding
  its value, tagged ``icd.param_path``, and is removed from the signature; the
  result is called ``exp.call(*args)`` and is a self-contained deployable artefact;
- ``embed_params=False``: the weights stay arguments, tagged ``icd.param_path``;
  the result is called ``exp.call(params, *args)``.

Capacity buckets: ``shapes`` makes dimensions symbolic (``jax.export.symbolic_shape``
specs such as ``"b, 16"``) where the model allows it: through JAX, MiniLM's packed
``(T, B, C)`` and Mamba's batch can all be symbolic (Mamba's capacity cannot: its scan's
chunk count needs it static). IREE 3.13 rejects the dynamic gathers of those modules, so
for IREE export once per bucket (``export_buckets``). See docs/bridge.md.

``build(case, perms)`` is the library entry that makes a deployable export of a
``models.Case``: export with the unpermuted weights embedded, permute and tag them
(``passes.apply_permutation``), verify.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax import export as jax_export
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import func, stablehlo

from stablehlo_bridge import mlir_io, passes, tags
from stablehlo_bridge.constants import dense_attr
from stablehlo_bridge.errors import ModuleError, SpecError
from stablehlo_bridge.models import Case

#: The per-input fields of ``jax.export.Exported`` (one entry per flat input). Dropping
#: the embedded weights from the inputs slices each of them alike.
PER_INPUT_FIELDS = ("in_avals", "in_shardings_hlo", "_in_named_shardings")


def key_name(key) -> str:
    """One step of a pytree path as a string (a dict key, attribute, or index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_paths(params) -> list[str]:
    """The ``"/"``-joined path of every leaf of ``params``, in flattening order (for a
    nested dict these are ``icd_jax.permute.flat``'s keys)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    paths = ["/".join(key_name(k) for k in path) for path, _ in leaves]
    if len(set(paths)) != len(paths):
        dup = sorted({p for p in paths if paths.count(p) > 1})[:3]
        raise SpecError(f"parameter paths are not unique: {dup}")
    return paths


def abstract_args(example_args: Sequence, shapes: Sequence[str | None] | None) -> tuple:
    """``example_args`` with the dimensions named in ``shapes`` made symbolic (one
    ``jax.export.symbolic_shape`` spec or None per argument, sharing one scope)."""
    if shapes is None:
        return tuple(example_args)
    if len(shapes) != len(example_args):
        raise SpecError(f"shapes has {len(shapes)} entries for {len(example_args)} "
                        f"example arguments")
    scope = jax_export.SymbolicScope()
    out = []
    for i, (arg, spec) in enumerate(zip(example_args, shapes)):
        if spec is None:
            out.append(arg)
            continue
        if not hasattr(arg, "shape") or not hasattr(arg, "dtype"):
            raise SpecError(f"shapes[{i}] = {spec!r} but argument {i} is not an array")
        shape = jax_export.symbolic_shape(spec, scope=scope)
        if len(shape) != len(arg.shape):
            raise SpecError(f"shapes[{i}] = {spec!r} has rank {len(shape)}; argument {i} "
                            f"has shape {tuple(arg.shape)}")
        out.append(jax.ShapeDtypeStruct(shape, arg.dtype))
    return tuple(out)


def inline_params(main: func.FuncOp, values: dict[int, tuple[str, np.ndarray]]) -> None:
    """Replace arguments of ``main`` by constants, in place: ``values`` maps argument
    number -> ``(param path, value)``; each constant is tagged ``icd.param_path``."""
    block = main.entry_block
    types, results = list(main.type.inputs), list(main.type.results)
    kept_attrs = [tags.arg_attrs(main, j) for j in range(len(types))]
    with main.context:
        first = ir.InsertionPoint(block.operations[0])
        for a in sorted(values):
            path, value = values[a]
            arg = block.arguments[a]
            with ir.Location.name(path):
                const = stablehlo.ConstantOp(dense_attr(value, arg.type), ip=first)
            const.operation.attributes[tags.PARAM_PATH] = ir.StringAttr.get(path)
            arg.replace_all_uses_with(const.result)
        for a in sorted(values, reverse=True):
            block.erase_argument(a)
        keep = [j for j in range(len(types)) if j not in values]
        main.attributes["function_type"] = ir.TypeAttr.get(
            ir.FunctionType.get([types[j] for j in keep], results))
        main.attributes["arg_attrs"] = ir.ArrayAttr.get(
            [ir.DictAttr.get(kept_attrs[j]) for j in keep])


def drop_inputs(exp: jax_export.Exported, n: int, in_tree,
                module_bytes: bytes) -> jax_export.Exported:
    """``exp`` without its first ``n`` flat inputs (now embedded), running
    ``module_bytes``, called with the pytree structure ``in_tree``. Its VJP is dropped
    (it would differentiate with respect to the embedded weights too)."""
    names = {f.name for f in dataclasses.fields(exp)}
    changes = {k: tuple(getattr(exp, k))[n:] for k in PER_INPUT_FIELDS if k in names}
    if "_get_vjp" in names:
        changes["_get_vjp"] = None
    kept = tuple(i - n for i in exp.module_kept_var_idx if i >= n)
    return dataclasses.replace(exp, in_tree=in_tree, module_kept_var_idx=kept,
                               mlir_module_serialized=module_bytes, **changes)


def export(fn: Callable, params, *example_args, embed_params: bool = True,
           shapes: Sequence[str | None] | None = None,
           platforms: Sequence[str] | None = None,
           name: str | None = None) -> jax_export.Exported:
    """Export ``fn(params, *args)`` as StableHLO.

    Args:
      fn: ``fn(params, *args)``, traceable by ``jax.jit``.
      params: a pytree of arrays (a nested dict: paths as ``permute.flat``).
      example_args: arrays (or ``jax.ShapeDtypeStruct``) fixing the input shapes.
      embed_params: bake the weights in as tagged constants (called ``exp.call(*args)``),
        or keep them as tagged arguments (``exp.call(params, *args)``).
      shapes: per example argument a ``jax.export.symbolic_shape`` spec or None.
      platforms: lowering platforms (default: JAX's default backend).
      name: the exported function's name (default ``fn.__name__``).
    Returns:
      a ``jax.export.Exported``.
    """
    paths = param_paths(params)
    n = len(paths)
    specs = abstract_args(example_args, shapes)

    def lowered(p, *args):
        return fn(p, *args)

    lowered.__name__ = name or getattr(fn, "__name__", "fn").strip("<>")
    try:
        exp = jax_export.export(jax.jit(lowered), platforms=platforms)(params, *specs)
    except ValueError as e:
        if "custom call" not in str(e) and "custom_call" not in str(e):
            raise
        raise ModuleError(
            f"export: {lowered.__name__} calls a custom call that StableHLO cannot carry "
            "(a kernel of this process, called outside vsla_jax's primitives, which export "
            "their XLA form); build the model "
            "with a portable backend, e.g. vs.attention(..., backend='xla') or "
            "minilm.load(backend='xla')") from e
    module = mlir_io.load(exp)
    main = mlir_io.entry(module)
    prefix = mlir_io.entry_prefix(exp)
    param_args = {prefix + j: i for j, i in enumerate(exp.module_kept_var_idx) if i < n}
    if not embed_params:
        with module.context:
            for a, i in param_args.items():
                tags.set_arg_attr(main, a, tags.PARAM_PATH, ir.StringAttr.get(paths[i]))
        return mlir_io.with_module(exp, module)
    leaves = jax.tree_util.tree_leaves(params)
    values = {a: (paths[i], np.asarray(jax.device_get(leaves[i]), exp.in_avals[i].dtype))
              for a, i in param_args.items()}
    inline_params(main, values)
    in_tree = jax.tree_util.tree_structure((tuple(specs), {}))
    return drop_inputs(exp, n, in_tree, mlir_io.to_portable(module, "week4"))


def export_buckets(fn: Callable, params, arg_sets: Iterable[Sequence], **kwargs
                   ) -> dict[tuple[tuple[int, ...], ...], jax_export.Exported]:
    """One ``export`` per distinct input-shape bucket: ``{arg shapes: Exported}``."""
    out = {}
    for args in arg_sets:
        key = tuple(tuple(np.shape(a)) for a in args)
        if key not in out:
            out[key] = export(fn, params, *args, **kwargs)
    return out


def build(case: Case, perms, *, embed_params: bool = True,
          transform_meta: Mapping | None = None, metrics: Mapping[str, float] | None = None
          ) -> jax_export.Exported:
    """Export ``case`` with its weights permuted by ``perms``, tagged and verified.

    Args:
      case: the model (its weights unpermuted).
      perms: named axes of ``case.spec`` (``{axis_name: int[n] order}``), parameter
        axes (``{param path: (axis, order)}`` or ``{"path:axis": order}``), or a
        ``layout.Layout`` (parameter axes are taken as such, ``case.spec`` unused).
      embed_params: weights as tagged constants (called ``exp.call(*case.args)``), or
        as tagged arguments (``exp.call(permute.apply(case.spec, case.params, perms),
        *case.args)`` for named axes).
      transform_meta: ``icd.transform_meta`` (default ``{}``).
      metrics: ``icd.metrics`` numbers (``pi_hash`` is computed); default none.
    Returns:
      the permuted, tagged, verified ``jax.export.Exported``.
    """
    exp = export(case.fn, case.params, *case.args, embed_params=embed_params,
                 name=case.name.replace("-", "_"))
    exp = passes.apply_permutation(exp, perms, dict(transform_meta or {}), metrics,
                                   spec=case.spec)
    passes.verify(exp)
    return exp
