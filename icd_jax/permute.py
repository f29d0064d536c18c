"""Function-preserving permutations of model parameters.

A ``ModelSpec`` names every permutable axis of a model (``"residual"``, ``"ffn_3"``,
``"heads_0"``, ...) with the parameter axes each one touches. ``apply(spec, params,
perms)`` reorders those axes and returns new parameters computing the same function;
the only visible change is on the outputs the spec lists in ``spec.outputs`` (for
example BERT's embedding, which lives on the residual axis).

An order ``p`` (``int[n]``) follows the solver's convention, *position -> original
index*: the permuted parameter is ``take(param, p, axis)``. ``invert(perms)`` gives
the orders that undo it, bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from icd_jax.errors import ConfigError, PermutationError

SEP = "/"


@dataclasses.dataclass(frozen=True)
class AxisUse:
    """One parameter axis that a permutable axis of size ``n`` reorders.

    Attributes:
      path: the parameter's path, keys joined by ``"/"`` (``"layer_0/ffn/wi/kernel"``).
      axis: which axis of that parameter.
      group: each order entry moves a contiguous block of ``group`` indices (a head of
        ``head_dim`` channels for a head order).
      parts: the axis holds ``parts`` consecutive segments of ``n * group`` indices that
        are all reordered alike (Mamba's ``in_proj`` holds x and z halves).
    The parameter's axis has exactly ``n * group * parts`` entries.
    """

    path: str
    axis: int
    group: int = 1
    parts: int = 1

    def index(self, order: np.ndarray) -> np.ndarray:
        """The gather index (``int32[n * group * parts]``) that applies ``order``."""
        n = order.shape[0]
        block = (order[:, None] * self.group + np.arange(self.group)).reshape(-1)
        return np.concatenate([block + k * n * self.group
                               for k in range(self.parts)]).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class PermAxis:
    """A permutable axis: its name, its size and the parameter axes it touches."""

    name: str
    size: int
    uses: tuple[AxisUse, ...]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Every permutable axis of a model.

    Attributes:
      model: the model family (``"bert"``, ``"mamba"``).
      axes: the permutable axes, in a fixed order.
      outputs: model output name -> the permutable axis its last dimension lies on
        (outputs not listed are unchanged by any permutation).
    """

    model: str
    axes: tuple[PermAxis, ...]
    outputs: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        names = [a.name for a in self.axes]
        if len(set(names)) != len(names):
            raise ConfigError(f"ModelSpec({self.model!r}) repeats axis names")
        seen: dict[tuple[str, int], str] = {}
        for a in self.axes:
            for u in a.uses:
                key = (u.path, u.axis)
                if key in seen:
                    raise ConfigError(f"ModelSpec({self.model!r}): {u.path} axis {u.axis} is "
                                      f"touched by both {seen[key]!r} and {a.name!r}")
                seen[key] = a.name
        for out, ax in self.outputs.items():
            if ax not in names:
                raise ConfigError(f"ModelSpec output {out!r} names unknown axis {ax!r}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.axes)

    def axis(self, name: str) -> PermAxis:
        for a in self.axes:
            if a.name == name:
                return a
        raise PermutationError(f"unknown permutable axis {name!r}; {self.model} has "
                               f"{_describe(self.names)}")

    def sizes(self) -> dict[str, int]:
        return {a.name: a.size for a in self.axes}


def _describe(names: tuple[str, ...]) -> str:
    return ", ".join(names) if len(names) <= 12 else ", ".join(names[:12]) + ", ..."


def validate_order(order, size: int | None = None, what: str = "order") -> np.ndarray:
    """``order`` as ``int64[size]`` if it is a permutation of ``range(size)`` (``size``
    defaults to its length); else a ``PermutationError`` whose message starts with
    ``what``. This is the one permutation validator of icd_jax."""
    a = np.asarray(order)
    size = a.size if size is None else int(size)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
        raise PermutationError(f"{what} must be an integer array, got dtype {a.dtype}")
    if a.shape != (size,):
        raise PermutationError(f"{what} must have shape ({size},), got {a.shape}")
    if size and (a.min() < 0 or a.max() >= size):
        raise PermutationError(f"{what} has entries outside [0, {size})")
    counts = np.bincount(a, minlength=size)
    if np.any(counts != 1):
        dup = np.flatnonzero(counts > 1)[:5].tolist()
        raise PermutationError(f"{what} is not a permutation of range({size}): "
                               f"{dup} repeated")
    return a.astype(np.int64)


def check_order(name: str, order, size: int) -> np.ndarray:
    """``order`` as ``int32[size]``, or a ``PermutationError`` naming axis ``name``."""
    return validate_order(order, size, f"order for axis {name!r}").astype(np.int32)


def invert_order(order) -> np.ndarray:
    """The positions of an order (same integer dtype, ``[n]``): ``invert_order(p)[c]`` is
    the position of channel ``c``, so ``p[invert_order(p)] == arange(n)``. ``order`` is
    validated (``PermutationError``)."""
    a = np.asarray(order)
    validate_order(a)
    pos = np.empty_like(a)
    pos[a] = np.arange(a.size, dtype=a.dtype)
    return pos


def compose_orders(first, then) -> np.ndarray:
    """One order doing ``first`` then ``then`` (``first[then]``, ``first``'s dtype):
    ``take(take(x, first), then) == take(x, compose_orders(first, then))``. Both are
    validated and must have the same length (``PermutationError``)."""
    a = np.asarray(first)
    validate_order(a, what="first order")
    return a[validate_order(then, a.size, "second order")]


def check_perms(spec: ModelSpec, perms: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Validated orders (``int32``) for the axes named in ``perms``."""
    if not isinstance(perms, Mapping):
        raise PermutationError(f"perms must be a dict axis name -> order, got "
                               f"{type(perms).__name__}")
    sizes = spec.sizes()
    out = {}
    for name, order in perms.items():
        if name not in sizes:
            raise PermutationError(f"unknown permutable axis {name!r}; {spec.model} has "
                                   f"{_describe(spec.names)}")
        out[name] = check_order(name, order, sizes[name])
    return out


def flat(params) -> dict[str, object]:
    """Parameters as a flat dict ``path -> array`` (keys joined by ``"/"``)."""
    return traverse_util.flatten_dict(params, sep=SEP)


def nested(flat_params: Mapping[str, object]) -> dict:
    """The inverse of ``flat``."""
    return traverse_util.unflatten_dict(dict(flat_params), sep=SEP)


def check_spec(spec: ModelSpec, params) -> None:
    """Every path of ``spec`` exists in ``params`` with the size the spec expects."""
    p = flat(params)
    for a in spec.axes:
        for u in a.uses:
            if u.path not in p:
                raise ConfigError(f"spec axis {a.name!r} names parameter {u.path!r}, which "
                                  f"is not in the parameters")
            shape = np.shape(p[u.path])
            want = a.size * u.group * u.parts
            if not -len(shape) <= u.axis < len(shape) or shape[u.axis] != want:
                raise ConfigError(f"spec axis {a.name!r}: {u.path} has shape {shape}; axis "
                                  f"{u.axis} should have {want} entries")


def _take(x, index: np.ndarray, axis: int):
    if isinstance(x, np.ndarray):
        return np.take(x, index, axis=axis)
    return jnp.take(jnp.asarray(x), jnp.asarray(index), axis=axis)


def apply(spec: ModelSpec, params, perms: Mapping[str, object]):
    """Parameters with the axes in ``perms`` reordered (axes not named stay as they are).

    Args:
      spec: the model's ``ModelSpec``.
      params: a nested dict of arrays (NumPy or JAX); it is not modified.
      perms: axis name -> order ``int[size]`` (position -> original index).
    Returns:
      a new nested dict of the same structure, dtypes and shapes.
    """
    orders = check_perms(spec, perms)
    check_spec(spec, params)
    p = dict(flat(params))
    for name, order in orders.items():
        for u in spec.axis(name).uses:
            p[u.path] = _take(p[u.path], u.index(order), u.axis)
    return nested(p)


def invert(perms: Mapping[str, object]) -> dict[str, np.ndarray]:
    """The orders that undo ``perms``: ``apply(spec, apply(spec, p, perms), invert(perms))``
    returns ``p`` bit for bit. Each order must be a permutation."""
    return {name: invert_order(check_order(name, order, int(np.size(order))))
            for name, order in perms.items()}


def compose(first: Mapping[str, object], then: Mapping[str, object]) -> dict[str, np.ndarray]:
    """One set of orders doing ``first`` then ``then``: ``apply(spec, apply(spec, p, first),
    then) == apply(spec, p, compose(first, then))`` (per axis ``first[then]``; an axis in
    only one of them keeps that one's order)."""
    out = {}
    for name in {**first, **then}:
        if name in first and name in then:
            a = check_order(name, first[name], int(np.size(first[name])))
            out[name] = compose_orders(a, check_order(name, then[name], a.shape[0]))
        else:
            order = first[name] if name in first else then[name]
            out[name] = check_order(name, order, int(np.size(order)))
    return out


def permute_output(spec: ModelSpec, output: str, y, perms: Mapping[str, object]):
    """Apply to ``y`` (last axis on ``spec.outputs[output]``) what ``perms`` does to that
    output, so ``permute_output(spec, "embedding", f(params), perms)`` equals
    ``f(apply(spec, params, perms))``. Outputs the spec does not list are unchanged."""
    ax = spec.outputs.get(output)
    if ax is None or ax not in perms:
        return y
    order = check_order(ax, perms[ax], spec.axis(ax).size)
    return _take(y, order, -1)


def restore_output(spec: ModelSpec, output: str, y, perms: Mapping[str, object]):
    """Undo ``permute_output``: ``y``, output ``output`` of the model under ``perms``,
    back in the dense order of its last axis (unlisted outputs are returned as they are)."""
    ax = spec.outputs.get(output)
    if ax is None or ax not in perms:
        return y
    order = check_order(ax, perms[ax], spec.axis(ax).size)
    return _take(y, np.argsort(order), -1)


def random_perms(spec: ModelSpec, seed: int = 0,
                 names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """A random order for every axis (or for ``names``), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    names = spec.names if names is None else tuple(names)
    return {n: rng.permutation(spec.axis(n).size).astype(np.int32) for n in names}


def identity(spec: ModelSpec) -> dict[str, np.ndarray]:
    """The identity order of every axis."""
    return {a.name: np.arange(a.size, dtype=np.int32) for a in spec.axes}


def tree_equal(a, b) -> bool:
    """Whether two parameter trees have the same structure and bitwise-equal leaves."""
    fa, fb = flat(a), flat(b)
    if fa.keys() != fb.keys():
        return False
    return all(np.asarray(jax.device_get(fa[k])).dtype == np.asarray(jax.device_get(fb[k])).dtype
               and np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)
