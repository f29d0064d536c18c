"""Bring your own model: the public ``Target`` protocol and the loader of user targets.

A *target* is what ``icd run`` co-designs the layout of. The two built-in models
(``model.name: minilm | mamba``) are targets; any other model takes part by providing
the few things below and naming a factory in the config::

    model:
      target: "my_package.my_module:make_target"   # importable as package.module:factory
      kwargs: {layers: 2, hidden: 64}              # passed to the factory as keywords

The factory is called as ``factory(**kwargs)`` (or ``factory(seed=..., **kwargs)`` when
it takes a ``seed`` argument) and returns an object with these members:

==================  ========================================================================
``name``            ``str``: the model's name in reports and cache keys.
``params``          the dense float parameters (a pytree of arrays).
``spec``            ``icd_jax.permute.ModelSpec``: every permutable axis and the parameter
                    axes it touches, such that ``permute.apply(spec, params, perms)``
                    computes the same function for any orders.
``axes``            ``Sequence[str]``: the spec axes the run co-designs (one co-access
                    graph W and one order pi each), all of one size.
``quality_metric``  ``str``: the name of what ``quality`` scores (higher is better, in %).
``forward``         ``forward(params, batch) -> outputs``: the model over one batch (a
                    tuple of arrays); pure and jit-able. The outputs are one array or a
                    dict of arrays; an output on a permuted axis is listed in
                    ``spec.outputs`` (by its dict key, or under any one name for a
                    single array) and handed to ``quality`` back in the dense order.
``batches``         ``batches(split) -> Sequence[batch]`` for ``split`` in ``"graph"``
                    (activations for W), ``"calib"`` (quantisation calibration),
                    ``"quality"`` and ``"time"`` (the timed set).
``tokens``          ``tokens(batch) -> int``: the real (unpadded) tokens in a batch.
``activations``     ``activations(params, batch) -> {axis: float[tokens, size]}``: each
                    co-designed axis's channel activations for the real tokens.
``quality``         ``quality(outputs, dense_outputs, batches) -> float[n]``: per-sample
                    scores in % (higher is better) of the ``"quality"`` split's outputs
                    under a transformed layout against the dense model's.
==================  ========================================================================

``load`` imports and builds a target and ``check`` rejects one that breaks the protocol,
naming the missing piece (``TargetError``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from icd_jax import permute
from icd_jax.errors import TargetError

SPLITS = ("graph", "calib", "quality", "time")
#: What a target must have (attributes, then methods), in the order ``check`` reports.
MEMBERS = ("name", "params", "spec", "axes", "quality_metric")
METHODS = ("forward", "batches", "tokens", "activations", "quality")


@runtime_checkable
class Target(Protocol):
    """A model ``icd run`` can co-design the layout of (see the module docstring)."""

    name: str
    params: Any
    spec: permute.ModelSpec
    axes: Sequence[str]
    quality_metric: str

    def forward(self, params, batch: tuple) -> Any: ...

    def batches(self, split: str) -> Sequence[tuple]: ...

    def tokens(self, batch: tuple) -> int: ...

    def activations(self, params, batch: tuple) -> Mapping[str, Any]: ...

    def quality(self, outputs: Sequence, dense_outputs: Sequence,
                batches: Sequence[tuple]) -> np.ndarray: ...


def resolve(ref: str):
    """The callable ``"package.module:factory"`` names; ``TargetError`` if it is not
    importable or not callable."""
    if not isinstance(ref, str) or ":" not in ref or not all(ref.rsplit(":", 1)):
        raise TargetError(f"model.target {ref!r}: expected 'package.module:factory'")
    mod_name, attr = ref.rsplit(":", 1)
    try:
        mod = import_file(mod_name) if mod_name.endswith(".py") else \
            importlib.import_module(mod_name)
    except (ImportError, OSError) as e:
        raise TargetError(f"model.target {ref!r}: module {mod_name!r} is not importable "
                          f"({type(e).__name__}: {e})") from e
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TargetError(f"model.target {ref!r}: {mod_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TargetError(f"model.target {ref!r}: {attr!r} is not callable")
    return obj


def import_file(path: str):
    """The module in the file ``path`` (imported under its stem, once per path)."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ImportError(f"no such file {path}")
    name = "icd_target_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


def load(ref: str, kwargs: Mapping[str, Any] | None = None, seed: int | None = None) -> Target:
    """Build the target ``ref`` names with ``kwargs`` (and ``seed`` when the factory
    takes one), then ``check`` it."""
    factory = resolve(ref)
    kw = dict(kwargs or {})
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if seed is not None and "seed" in params and "seed" not in kw:
        kw["seed"] = seed
    unknown = [k for k in kw if params and k not in params and not any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())]
    if unknown:
        raise TargetError(f"model.target {ref!r}: the factory rejected model.kwargs "
                          f"{unknown} (it takes {sorted(params)})")
    try:
        target = factory(**kw)
    except Exception as e:  # noqa: BLE001 - whatever the user's factory raises
        raise TargetError(f"model.target {ref!r}: the factory failed with model.kwargs "
                          f"{sorted(kw)} ({type(e).__name__}: {e})") from e
    check(target, ref)
    return target


def restore_outputs(spec: permute.ModelSpec, outputs, perms: Mapping[str, object]):
    """``forward``'s outputs under ``perms`` back in the dense order: each dict entry
    named in ``spec.outputs`` (or a single array, when the spec lists one output) has its
    last axis un-permuted (``permute.restore_output``); the rest is returned as is."""
    if isinstance(outputs, Mapping):
        return {k: permute.restore_output(spec, k, v, perms) for k, v in outputs.items()}
    if len(spec.outputs) == 1:
        return permute.restore_output(spec, next(iter(spec.outputs)), outputs, perms)
    return outputs


def output_arrays(spec: permute.ModelSpec, outputs, ref: str = "target"
                  ) -> dict[str, np.ndarray]:
    """``forward``'s outputs as ``{name: float64 array}`` (a single array is ``{"": y}``),
    or ``TargetError`` when they are neither an array nor a dict of arrays, or when
    ``spec.outputs`` names outputs that ``forward`` does not return."""
    if isinstance(outputs, Mapping):
        named = dict(outputs)
        missing = sorted(set(spec.outputs) - set(named))
        if missing:
            raise TargetError(f"{ref}: spec.outputs names {missing}, which forward's dict "
                              f"does not have (its keys: {sorted(named)})")
    else:
        if len(spec.outputs) > 1:
            raise TargetError(f"{ref}: spec.outputs names {len(spec.outputs)} outputs but "
                              "forward returns one array; return a dict keyed by those names")
        named = {"": outputs}
    out = {}
    for k, v in named.items():
        try:
            out[k] = np.asarray(v, np.float64)
        except (TypeError, ValueError) as e:
            what = f"output {k!r}" if k else "the output"
            raise TargetError(f"{ref}: forward must return an array or a dict of arrays; "
                              f"{what} is a {type(v).__name__} ({e})") from None
    return out


def check(target, ref: str = "target", atol: float = 1e-4) -> None:
    """Reject a target that breaks the protocol (``TargetError`` naming what): a missing
    member, an axis the spec lacks or of another size, a split with no batches, or a
    forward whose output changes under a random function-preserving order."""
    missing = [m for m in MEMBERS if not hasattr(target, m)]
    missing += [m for m in METHODS if not callable(getattr(target, m, None))]
    if missing:
        raise TargetError(f"{ref}: the target has no {', '.join(missing)} (the Target "
                          "protocol needs " + ", ".join(MEMBERS + METHODS) + ")")
    spec = target.spec
    if not isinstance(spec, permute.ModelSpec):
        raise TargetError(f"{ref}: spec is a {type(spec).__name__}, not a "
                          "icd_jax.permute.ModelSpec")
    axes = list(target.axes)
    if not axes:
        raise TargetError(f"{ref}: axes is empty; name at least one spec axis to co-design")
    unknown = [a for a in axes if a not in spec.names]
    if unknown:
        raise TargetError(f"{ref}: axes {unknown} are not in the spec (it has "
                          f"{list(spec.names)})")
    sizes = {spec.axis(a).size for a in axes}
    if len(sizes) != 1:
        raise TargetError(f"{ref}: the co-designed axes differ in size ({sorted(sizes)}); "
                          "run axes of one size per target")
    try:
        permute.check_spec(spec, target.params)
    except Exception as e:  # noqa: BLE001 - any mismatch is the target's fault
        raise TargetError(f"{ref}: spec does not fit params ({e})") from e
    for split in SPLITS:
        if not list(target.batches(split)):
            raise TargetError(f"{ref}: batches({split!r}) is empty")
    batch = list(target.batches("time"))[0]
    acts = target.activations(target.params, batch)
    for a in axes:
        if a not in acts:
            raise TargetError(f"{ref}: activations() has no entry for axis {a!r}")
        shape = np.shape(acts[a])
        if len(shape) != 2 or shape[1] != spec.axis(a).size:
            raise TargetError(f"{ref}: activations()[{a!r}] has shape {shape}; expected "
                              f"[tokens, {spec.axis(a).size}]")
    dense = output_arrays(spec, target.forward(target.params, batch), ref)
    # every axis permuted; outputs on a permuted axis are compared in the dense order
    perms = permute.random_perms(spec, seed=0)
    got = output_arrays(spec, restore_outputs(
        spec, target.forward(permute.apply(spec, target.params, perms), batch), perms), ref)
    shapes = {k: v.shape for k, v in dense.items()}
    if {k: v.shape for k, v in got.items()} != shapes:
        raise TargetError(f"{ref}: forward's output shape changed under a permutation "
                          f"({shapes} -> { {k: v.shape for k, v in got.items()} })")
    err = max((float(np.max(np.abs(got[k] - v))) for k, v in dense.items() if v.size),
              default=0.0)
    scale = max((float(np.max(np.abs(v))) for v in dense.values() if v.size), default=1.0)
    if not np.isfinite(err) or err > atol * max(1.0, scale):
        raise TargetError(f"{ref}: forward is not function-preserving under the spec: a "
                          f"random permutation of every spec axis changed the output by "
                          f"{err:.3g} (max |y| {scale:.3g}); the spec misses or mis-states "
                          "a parameter axis")
