"""Compile and run a (tagged, permuted) StableHLO module with IREE.

Needs the PyPI packages ``iree-base-compiler`` and ``iree-base-runtime`` (the
``iree`` extra); they are imported on first use, so the rest of the bridge works
without them (``available()`` tells).

The compiler reads the portable artefact (VHLO bytecode) directly. What IREE 3.13 does
with the ``icd.*`` tags: it accepts them (nothing needs stripping); argument
attributes (weights passed as arguments, ``embed_params=False``) survive the whole
pipeline and reach the runtime in the function's reflection
(``iree.abi.declaration``); function-level and op-level attributes (embedded
constants, consumers) are dropped when StableHLO is converted to linalg, where each
embedded constant keeps only its location, the parameter path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax import export as jax_export

from stablehlo_bridge import mlir_io, tags
from stablehlo_bridge.errors import BackendError


def available() -> bool:
    """Whether ``iree.compiler`` and ``iree.runtime`` import."""
    try:
        import iree.compiler  # noqa: F401
        import iree.runtime  # noqa: F401
    except ImportError:
        return False
    return True


def require():
    """``(iree.compiler, iree.runtime)``, or a ``BackendError`` saying how to get them."""
    try:
        import iree.compiler as compiler
        import iree.runtime as runtime
    except ImportError as e:
        raise BackendError("IREE is not installed: pip install 'vsla-jax[iree]' "
                           "(iree-base-compiler, iree-base-runtime)") from e
    return compiler, runtime


def compile_module(target: mlir_io.Target | bytes, *, backend: str = "llvm-cpu",
                   target_cpu: str = "host", strip: bool = False,
                   target_version: str = "current",
                   extra_args: Sequence[str] = ()) -> bytes:
    """An IREE VM flatbuffer (``.vmfb``) of ``target``'s module.

    Args:
      target: an ``Exported``, an ``ir.Module`` or portable-artefact bytes.
      backend: IREE target backend (``"llvm-cpu"``).
      target_cpu: ``--iree-llvmcpu-target-cpu`` (``"host"``; ``"generic"`` for a
        portable binary).
      strip: remove the ``icd.*`` tags first (IREE 3.13 accepts them; for consumers
        that do not).
      target_version: StableHLO version of the artefact handed to the compiler.
      extra_args: more ``iree-compile`` flags.
    """
    compiler, _ = require()
    if isinstance(target, (bytes, bytearray, memoryview)) and not strip:
        source = bytes(target)
    else:
        module = mlir_io.load(target)
        if strip:
            module = mlir_io.clone(module)
            tags.strip(module)
        source = mlir_io.to_portable(module, target_version)
    flags = list(extra_args)
    if not any(f.startswith("--iree-input-demote-f64-to-f32") for f in flags):
        flags.append("--iree-input-demote-f64-to-f32=false")  # f64 models stay f64
    if backend == "llvm-cpu" and target_cpu:
        flags.append(f"--iree-llvmcpu-target-cpu={target_cpu}")
    try:
        return compiler.compile_str(source, target_backends=[backend], input_type="stablehlo",
                                    extra_args=flags)
    except compiler.CompilerToolError as e:
        raise BackendError(f"iree-compile failed for {backend}: {e}") from e


@dataclasses.dataclass(frozen=True)
class Program:
    """A compiled module bound to an IREE runtime context, called like the
    ``Exported`` it came from (same pytree of arguments; outputs as NumPy arrays in
    its output pytree).

    Attributes:
      exported: the export whose calling convention it follows.
      function: the IREE function (``@main``).
      reflection: the function's IREE reflection metadata (argument tags included).
      module: the bound IREE module (keeps the runtime context alive).
    """

    exported: jax_export.Exported
    function: object
    reflection: dict
    module: object = None

    def __call__(self, *args, **kwargs):
        flat, tree = jax.tree_util.tree_flatten((args, kwargs))
        if tree != self.exported.in_tree:
            raise BackendError(f"arguments have structure {tree}; "
                               f"{self.exported.fun_name} takes {self.exported.in_tree}")
        kept = [as_input(flat[i], self.exported.in_avals[i], i)
                for i in self.exported.module_kept_var_idx]
        try:
            out = self.function(*kept)
        except (RuntimeError, ValueError) as e:
            raise BackendError(f"IREE refused the call of {self.exported.fun_name}: {e}") from e
        outs = out if isinstance(out, (tuple, list)) else (out,)
        host = [np.asarray(o.to_host() if hasattr(o, "to_host") else o) for o in outs]
        return self.exported.out_tree.unflatten(host)


def as_input(value, aval, index: int) -> np.ndarray:
    """Argument ``index`` as the NumPy array the compiled function takes: cast to the
    export's dtype (as ``Exported.call`` does for Python scalars and default-dtype
    arrays); ``BackendError`` for a shape the export does not take."""
    arr = np.asarray(value, dtype=aval.dtype)
    want = tuple(aval.shape)
    if len(arr.shape) != len(want) or any(
            isinstance(w, int) and w != g for w, g in zip(want, arr.shape)):
        raise BackendError(f"argument {index} has shape {arr.shape}; the export takes "
                           f"{want} ({aval.dtype})")
    return arr


def load(vmfb: bytes, exported: jax_export.Exported, driver: str = "local-sync"
         ) -> Program:
    """Bind a VM flatbuffer for calls like ``exported``'s. ``driver``: ``"local-sync"``
    (one thread, the default) or ``"local-task"`` (a thread pool)."""
    _, runtime = require()
    if mlir_io.entry_prefix(exported):
        raise BackendError(f"{exported.fun_name} takes a platform index or effect tokens "
                           f"before its arrays; export it for one platform, without "
                           f"ordered effects")
    try:
        module = runtime.load_vm_flatbuffer(vmfb, driver=driver)
    except (RuntimeError, ValueError) as e:
        raise BackendError(f"IREE could not load the module with driver {driver!r}: {e}") from e
    function = module["main"]
    vm_function = module.vm_module.lookup_function("main")
    return Program(exported, function, dict(vm_function.reflection), module)


def compile_exported(exported: jax_export.Exported, *, driver: str = "local-sync",
                     **kwargs) -> Program:
    """``compile_module`` then ``load``: a callable ``Program`` (``kwargs`` go to
    ``compile_module``)."""
    return load(compile_module(exported, **kwargs), exported, driver)
