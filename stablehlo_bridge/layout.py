"""Permutation specs resolved to parameter axes.

Two forms of one layout decision:

- parameter axes, ``{"path/to/kernel": (axis, order)}`` (or a list of such pairs for a
  parameter with several permuted axes); each reorders one axis of one parameter,
  ``take(param, order, axis)`` (the order spans the whole axis). The function-level tag
  keys each one ``"path:axis"``, and ``{"path:axis": order}`` is accepted as the same
  thing;
- named axes, ``{axis_name: order}`` with a ``ModelSpec`` (``spec=``): the permutable
  axes of a model, expanded to every parameter axis they touch through
  ``AxisUse.index`` (blocks of ``group`` entries, ``parts`` segments alike).

Orders are validated by ``icd_jax.permute`` (the project's one validator) and follow its
convention: position -> original index.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping

import numpy as np

from icd_jax import permute
from icd_jax.errors import PermutationError
from stablehlo_bridge.errors import OrderError, SpecError

SEP = ":"


@dataclasses.dataclass(frozen=True)
class Layout:
    """A layout decision, resolved to parameter axes.

    Attributes:
      orders: key -> order ``int32[n]``: the named axes (``"residual"``) or
        ``"path:axis"`` keys; this is what the function-level tag records.
      params: parameter path -> {axis: gather index ``int32[dim]``}, the permuted
        parameter being ``take(param, index, axis)``.
      sources: parameter path -> {axis: the key of ``orders`` it comes from}.
      named: whether it came from a ``ModelSpec`` (then parameters a module does not
        use are skipped; explicit parameter axes must all be found).
    """

    orders: Mapping[str, np.ndarray]
    params: Mapping[str, Mapping[int, np.ndarray]]
    sources: Mapping[str, Mapping[int, str]]
    named: bool = False


def split_key(key: str) -> tuple[str, int]:
    """``"layer_0/ffn/kernel:1"`` -> ``("layer_0/ffn/kernel", 1)``."""
    if not isinstance(key, str) or SEP not in key:
        raise SpecError(f"perms key {key!r} is not 'path:axis' and its value is not an "
                        f"(axis, order) pair (pass spec= to use the named axes of a "
                        f"ModelSpec)")
    path, axis = key.rsplit(SEP, 1)
    try:
        index = int(axis)
    except ValueError:
        raise SpecError(f"perms key {key!r}: axis {axis!r} is not an integer") from None
    if index < 0:  # one name per axis: -1 and 1 would tag the same axis twice
        raise SpecError(f"perms key {key!r}: axis {index} is negative; name the axis by its "
                        f"index from 0")
    return path, index


def is_pair(value) -> bool:
    """Whether ``value`` is an ``(axis, order)`` pair: an int and a 1-D sequence."""
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and isinstance(value[0], (int, np.integer)) and not isinstance(value[0], bool)
            and np.ndim(value[1]) == 1)


def pairs(value) -> list[tuple[int, object]] | None:
    """The ``(axis, order)`` pairs of one parameter entry (a pair or a non-empty list
    of pairs), or None when ``value`` is an order."""
    if is_pair(value):
        return [(int(value[0]), value[1])]
    if isinstance(value, (tuple, list)) and value and all(is_pair(v) for v in value):
        return [(int(a), o) for a, o in value]
    return None


def is_param_axes(perms: Mapping) -> bool:
    """Whether every entry of ``perms`` names parameter axes (an ``(axis, order)``
    value, or a ``"path:axis"`` key) rather than a named axis of a ``ModelSpec``."""
    return bool(perms) and all(pairs(v) is not None or (isinstance(k, str) and SEP in k)
                               for k, v in perms.items())


def keyed(perms: Mapping) -> dict[str, object]:
    """Parameter-axis perms as ``{"path:axis": order}``: ``{"w1": (1, p)}`` ->
    ``{"w1:1": p}``; ``"path:axis"`` keys pass through."""
    out: dict[str, object] = {}
    for key, value in perms.items():
        found = pairs(value)
        if found is None:
            split_key(key)
            items = [(key, value)]
        elif not isinstance(key, str) or not key:
            raise SpecError(f"perms key {key!r} must be a parameter path (a non-empty str)")
        else:
            items = [(f"{key}{SEP}{axis}", order) for axis, order in found]
        for k, order in items:
            if k in out:
                raise SpecError(f"perms name {k!r} twice")
            out[k] = order
    return out


def checked(key: str, order) -> np.ndarray:
    """``order`` as ``int32[n]`` (``permute.check_order``); ``OrderError`` naming ``key``
    unless it is a permutation of ``range(n)``."""
    try:
        return permute.check_order(key, order, int(np.size(order)))
    except PermutationError as e:
        raise OrderError(str(e)) from e


def resolve(perms, spec: permute.ModelSpec | None = None) -> Layout:
    """A ``Layout`` from parameter axes (``{path: (axis, order)}`` or
    ``{"path:axis": order}``; ``spec`` is then unused) or from named axes
    (``{axis_name: order}`` with ``spec``); a ``Layout`` passes through. ``SpecError``
    for a malformed spec, ``OrderError`` for an order that is not a permutation."""
    if isinstance(perms, Layout):
        return perms
    if not isinstance(perms, Mapping):
        raise SpecError(f"perms must be a dict or a Layout, got {type(perms).__name__}")
    if spec is None or is_param_axes(perms):
        return resolve_param_axes(perms)
    mixed = [k for k, v in perms.items() if pairs(v) is not None]
    if mixed:
        raise SpecError(f"perms mix named axes and (axis, order) parameter entries "
                        f"({mixed[:3]}); pass one form")
    try:
        orders = permute.check_perms(spec, perms)
    except PermutationError as e:
        raise OrderError(str(e)) from e
    params: dict[str, dict[int, np.ndarray]] = {}
    sources: dict[str, dict[int, str]] = {}
    for name, order in orders.items():
        for use in spec.axis(name).uses:
            params.setdefault(use.path, {})[use.axis] = use.index(order)
            sources.setdefault(use.path, {})[use.axis] = name
    return Layout(orders, params, sources, named=True)


def resolve_param_axes(perms: Mapping) -> Layout:
    """A ``Layout`` of explicit parameter axes (see ``resolve``)."""
    orders = {k: checked(k, v) for k, v in keyed(perms).items()}
    params: dict[str, dict[int, np.ndarray]] = {}
    sources: dict[str, dict[int, str]] = {}
    for key, order in orders.items():
        path, axis = split_key(key)
        if axis in params.get(path, {}):
            raise SpecError(f"perms name {path} axis {axis} twice")
        params.setdefault(path, {})[axis] = order
        sources.setdefault(path, {})[axis] = key
    return Layout(orders, params, sources, named=False)


def pi_hash(orders: Mapping[str, np.ndarray]) -> str:
    """``"sha256:<hex>"`` of the orders (keys sorted, int32 little-endian)."""
    h = hashlib.sha256()
    for key in sorted(orders):
        h.update(key.encode() + b"\0")
        h.update(np.asarray(orders[key], "<i4").tobytes() + b"\0")
    return "sha256:" + h.hexdigest()
