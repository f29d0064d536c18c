"""Permutation specs resolved to parameter axes.

Two spellings of one layout decision:

- ``{"path/to/kernel:axis": order}``: each entry reorders one axis of one parameter,
  ``take(param, order, axis)`` (the order spans the whole axis);
- ``{axis_name: order}`` with a ``ModelSpec`` (``spec=``): the named permutable axes of
  a model, expanded to every parameter axis they touch through ``AxisUse.index``
  (blocks of ``group`` entries, ``parts`` segments alike).

The order convention is ``icd_jax.permute``'s: position -> original index.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping

import numpy as np

from icd_jax import permute
from icd_jax.errors import ICDError
from stablehlo_bridge.errors import SpecError

SEP = ":"


@dataclasses.dataclass(frozen=True)
class Layout:
    """A layout decision, resolved to parameter axes.

    Attributes:
      orders: key -> order ``int32[n]``: the named axes (``"residual"``) or the
        ``"path:axis"`` keys as given; this is what the function-level tag records.
      params: parameter path -> {axis: gather index ``int32[dim]``}, the permuted
        parameter being ``take(param, index, axis)``.
      sources: parameter path -> {axis: the key of ``orders`` it comes from}.
      named: whether it came from a ``ModelSpec`` (then parameters a module does not
        use are skipped; explicit ``"path:axis"`` keys must all be found).
    """

    orders: Mapping[str, np.ndarray]
    params: Mapping[str, Mapping[int, np.ndarray]]
    sources: Mapping[str, Mapping[int, str]]
    named: bool = False


def split_key(key: str) -> tuple[str, int]:
    """``"layer_0/ffn/kernel:1"`` -> ``("layer_0/ffn/kernel", 1)``."""
    if not isinstance(key, str) or SEP not in key:
        raise SpecError(f"perms key {key!r} is not 'path:axis' (pass spec= to use the "
                        f"named axes of a ModelSpec)")
    path, axis = key.rsplit(SEP, 1)
    try:
        return path, int(axis)
    except ValueError:
        raise SpecError(f"perms key {key!r}: axis {axis!r} is not an integer") from None


def check_order(key: str, order) -> np.ndarray:
    """``order`` as ``int32[n]`` if it is a permutation of ``range(n)``; else a
    ``SpecError`` naming ``key``."""
    try:
        return permute.check_order(key, order, int(np.size(order)))
    except ICDError as e:
        raise SpecError(str(e)) from e


def resolve(perms, spec: permute.ModelSpec | None = None) -> Layout:
    """A ``Layout`` from ``{"path:axis": order}``, or from ``{axis_name: order}`` with
    ``spec``; a ``Layout`` passes through. ``SpecError`` for a malformed spec."""
    if isinstance(perms, Layout):
        return perms
    if not isinstance(perms, Mapping):
        raise SpecError(f"perms must be a dict or a Layout, got {type(perms).__name__}")
    params: dict[str, dict[int, np.ndarray]] = {}
    sources: dict[str, dict[int, str]] = {}
    if spec is None:
        orders = {k: check_order(k, v) for k, v in perms.items()}
        for key, order in orders.items():
            path, axis = split_key(key)
            if axis in params.get(path, {}):
                raise SpecError(f"perms name {path} axis {axis} twice")
            params.setdefault(path, {})[axis] = order
            sources.setdefault(path, {})[axis] = key
        return Layout(orders, params, sources, named=False)
    try:
        orders = permute.check_perms(spec, perms)
    except ICDError as e:
        raise SpecError(str(e)) from e
    for name, order in orders.items():
        for use in spec.axis(name).uses:
            params.setdefault(use.path, {})[use.axis] = use.index(order)
            sources.setdefault(use.path, {})[use.axis] = name
    return Layout(orders, params, sources, named=True)


def pi_hash(orders: Mapping[str, np.ndarray]) -> str:
    """``"sha256:<hex>"`` of the orders (keys sorted, int32 little-endian)."""
    h = hashlib.sha256()
    for key in sorted(orders):
        h.update(key.encode() + b"\0")
        h.update(np.asarray(orders[key], "<i4").tobytes() + b"\0")
    return "sha256:" + h.hexdigest()


def then(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The index doing ``first`` then ``second``: ``take(take(x, first), second) ==
    take(x, first[second])``."""
    return np.asarray(first, np.int32)[np.asarray(second)]
