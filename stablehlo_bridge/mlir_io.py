"""Moving a StableHLO module between ``jax.export.Exported``, portable-artefact bytes
and the in-memory MLIR (``jaxlib.mlir.ir.Module``).

A portable artefact is VHLO bytecode (``stablehlo.serialize_portable_artifact``) at a
target StableHLO version; ``Exported.mlir_module_serialized`` is one. Serialising
converts a module to VHLO *in place*, so ``to_portable`` serialises a copy.
"""

from __future__ import annotations

import dataclasses

from jax import export as jax_export
from jax.interpreters import mlir as jax_mlir
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import func, stablehlo

from stablehlo_bridge.errors import ArtifactError, ModuleError

#: Named target versions (anything else must be an explicit ``"x.y.z"``). ``"week4"`` is
#: what ``jax.export`` itself writes (a version at least four weeks old).
VERSIONS = ("current", "minimum", "week4", "week12")

Target = jax_export.Exported | ir.Module


def context() -> ir.Context:
    """A fresh MLIR context with the dialects JAX modules use (stablehlo, chlo, sdy, ...)."""
    return jax_mlir.make_ir_context()


def version(target_version: str = "current") -> str:
    """A StableHLO version string for ``target_version`` (one of ``VERSIONS`` or
    ``"x.y.z"``), checked against what this jaxlib can write."""
    req = stablehlo.StablehloCompatibilityRequirement
    named = {"current": stablehlo.get_current_version,
             "minimum": stablehlo.get_minimum_version,
             "week4": lambda: stablehlo.get_version_from_compatibility_requirement(
                 req.WEEK_4),
             "week12": lambda: stablehlo.get_version_from_compatibility_requirement(
                 req.WEEK_12)}
    if target_version in named:
        return named[target_version]()
    parts = target_version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ArtifactError(f"target_version must be one of {VERSIONS} or 'x.y.z', got "
                            f"{target_version!r}")
    lo, hi = stablehlo.get_minimum_version(), stablehlo.get_current_version()
    if (stablehlo.get_smaller_version(target_version, lo) != lo
            or stablehlo.get_smaller_version(target_version, hi) != target_version):
        raise ArtifactError(f"target_version {target_version} is outside the range this "
                            f"jaxlib writes, [{lo}, {hi}]")
    return target_version


def from_portable(data: bytes, ctx: ir.Context | None = None) -> ir.Module:
    """Deserialise a portable artefact (or MLIR bytecode/text) into a StableHLO module;
    ``ArtifactError`` when the bytes do not deserialise."""
    ctx = context() if ctx is None else ctx
    try:
        return stablehlo.deserialize_portable_artifact(ctx, bytes(data))
    except Exception as e:  # the bindings raise ValueError or MLIRError
        first = e
    try:
        with ctx:
            return ir.Module.parse(bytes(data))
    except Exception:
        raise ArtifactError(f"bytes ({len(data)}) are neither a StableHLO portable artefact "
                            f"nor an MLIR module: {first}") from first


def load(target: Target | bytes, ctx: ir.Context | None = None) -> ir.Module:
    """The module of an ``Exported`` (a fresh copy), of portable-artefact bytes, or
    ``target`` itself when it is already an ``ir.Module``."""
    if isinstance(target, ir.Module):
        return target
    if isinstance(target, jax_export.Exported):
        return from_portable(target.mlir_module_serialized, ctx)
    if isinstance(target, (bytes, bytearray, memoryview)):
        return from_portable(bytes(target), ctx)
    raise ModuleError(f"expected a jax.export.Exported, an ir.Module or bytes, got "
                      f"{type(target).__name__}")


def bytecode(module: ir.Module) -> bytes:
    """The module as MLIR bytecode (this jaxlib's MLIR version, not portable)."""
    return jax_mlir.module_to_bytecode(module)


def clone(module: ir.Module) -> ir.Module:
    """A deep copy of ``module`` in the same context."""
    with module.context:
        return ir.Module.parse(bytecode(module))


def to_portable(module: ir.Module, target_version: str = "current") -> bytes:
    """A portable artefact (VHLO bytecode) of ``module`` at ``target_version``; the
    module itself is left untouched. ``ModuleError`` when VHLO cannot express it."""
    v = version(target_version)
    copy = clone(module)
    try:
        return stablehlo.serialize_portable_artifact(copy, v)
    except ValueError as e:
        raise ModuleError(f"module cannot be serialised as a StableHLO {v} portable "
                          f"artefact (an attribute or op VHLO does not know?): {e}") from e


def text(module: ir.Module, large_elements_limit: int | None = None) -> str:
    """The module's MLIR text without locations; ``large_elements_limit`` elides
    constants with more elements (the text then no longer parses back)."""
    return module.operation.get_asm(large_elements_limit=large_elements_limit,
                                    enable_debug_info=False)


def entry(module: ir.Module, name: str = "main") -> func.FuncOp:
    """The public entry function (``func.func public @main``)."""
    for op in module.body.operations:
        if isinstance(op, func.FuncOp) and op.sym_name.value == name:
            return op
    raise ModuleError(f"module has no function @{name}")


def entry_prefix(exported: jax_export.Exported) -> int:
    """How many leading arguments of ``@main`` are not array inputs: the platform index
    (multi-platform exports) and one token per ordered effect."""
    return int(len(exported.platforms) > 1) + len(exported.ordered_effects)


def with_module(exported: jax_export.Exported, module: ir.Module,
                target_version: str = "week4") -> jax_export.Exported:
    """``exported`` running ``module`` instead (same calling convention): the module
    must keep ``@main``'s signature. Serialised at ``target_version`` (default: the
    version ``jax.export`` writes)."""
    main = entry(module)
    want = entry_prefix(exported) + len(exported.module_kept_var_idx)
    got = len(main.type.inputs)
    if got != want:
        raise ModuleError(f"@main takes {got} arguments but {exported.fun_name} passes "
                          f"{want}; a pass changed the signature")
    if len(main.type.results) != len(exported.out_avals) + len(exported.ordered_effects):
        raise ModuleError(f"@main returns {len(main.type.results)} results, "
                          f"{exported.fun_name} expects "
                          f"{len(exported.out_avals) + len(exported.ordered_effects)}")
    return dataclasses.replace(exported,
                               mlir_module_serialized=to_portable(module, target_version))
