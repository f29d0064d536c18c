"""Kernel primitives: a JAX primitive around an XLA FFI custom call.

A ``jax.custom_vjp`` around the kernels differentiates in reverse mode only, and JAX
refuses forward mode through it where it cannot be seen while tracing (``jax.jvp`` or
``jax.jacfwd`` of a function that was already jitted). A primitive whose JVP rule emits
primitives that are linear in the tangents, each with a transpose rule, goes through
every transformation: JAX differentiates in reverse mode by linearizing the JVP and
transposing it, so the transpose rules are where the backward kernels run.

``kernel_primitive`` builds the primitive from an ``impl`` (the FFI call, as JAX code)
with its abstract evaluation, lowering and batching; the differentiation rules are the
caller's (``jax.interpreters.ad``).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.sharding import NamedSharding, PartitionSpec
from jaxlib.mlir import ir


def kernel_primitive(name: str, impl: Callable[..., Sequence[jax.Array]],
                     merge_batch: bool,
                     portable: Callable[..., Sequence[jax.Array]] | None = None) -> Primitive:
    """A multiple-result primitive that runs ``impl(*arrays, **params)``.

    ``portable`` (same signature and results, in plain JAX ops) is what ``jax.export``
    lowers instead: the kernels are custom calls of this process that an exported,
    serialised program could not carry (JAX refuses them), so an export gets XLA's form.

    Under ``vmap`` the mapped axis goes to the front of every operand (unmapped operands
    are broadcast). ``merge_batch=False``: it stays a leading batch axis (kernels that
    take any batch shape ``[*batch, ...]``); ``True``: it is merged into each operand's
    leading axis (kernels over ``[B, ...]``; every operand and result has that axis).
    """
    prim = Primitive(name)
    prim.multiple_results = True
    prim.def_impl(lambda *args, **params: tuple(impl(*args, **params)))

    def abstract(*avals, **params):
        shapes = jax.eval_shape(functools.partial(impl, **params),
                                *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals))
        return [jax.core.ShapedArray(s.shape, s.dtype) for s in shapes]

    prim.def_abstract_eval(abstract)

    def lower(ctx, *args, **params):
        export = portable is not None and ctx.module_context.lowering_parameters.for_export
        fn = functools.partial(portable if export else impl, **params)
        if not export and several_devices(ctx.module_context.axis_context):
            fn = batch_partitioned(fn)
        return mlir.lower_fun(lambda *a: tuple(fn(*a)), multiple_results=True)(ctx, *args)

    mlir.register_lowering(prim, lower)
    require_devices(prim)
    batching.primitive_batchers[prim] = functools.partial(_batch, prim, merge_batch)
    return prim


def require_devices(prim: Primitive) -> bool:
    """Ask JAX to lower programs holding ``prim`` with their devices known, which the
    partitioning rule of ``batch_partitioned`` needs (JAX lowers device-agnostically
    otherwise, and only knows of ``custom_partitioning`` calls in the traced program, not
    of one bound while lowering a primitive). This is JAX's own registry for such
    primitives, which is private: where it is missing, nothing is registered (False)
    and the kernels run unpartitioned, as before."""
    try:
        from jax._src import dispatch
        dispatch.prim_requires_devices_during_lowering.add(prim)
    except (ImportError, AttributeError):
        return False
    return True


def several_devices(axis_context) -> bool:
    """Whether a lowering's axis context is a sharded program over known devices, more
    than one (then a kernel call gets ``batch_partitioned``'s rule)."""
    devices = getattr(axis_context, "device_assignment", None)
    return devices is not None and len(devices) > 1


def batch_partitioned(fn: Callable[..., Sequence[jax.Array]]) -> Callable:
    """``fn`` (arrays that all lead with one batch axis -> a tuple of such arrays, each
    item on its own: a kernel call) with a rule for XLA's SPMD partitioner: the batch
    axis may be split, every other axis is replicated, and each device runs ``fn`` on
    its shard. Without it a custom call over a batch sharded across devices was
    all-gathered and ran whole, on every device, into a replicated result. A batch that
    does not split evenly over its devices runs replicated. ``kernel_primitive`` uses it
    only for programs over several devices (``several_devices``).
    """
    run = lambda *arrays: tuple(fn(*arrays))  # traced once, and per device when split
    call = custom_partitioning(run)

    def shardings(mesh, arg_shapes, result_shapes):
        batch = _batch_spec(mesh, arg_shapes)
        split = lambda x: NamedSharding(mesh, PartitionSpec(
            *((batch,) + (None,) * (x.ndim - 1) if x.ndim else ())))
        return (tuple(split(x) for x in arg_shapes),
                tuple(split(x) for x in result_shapes))

    def partition(mesh, arg_shapes, result_shapes):
        args, results = shardings(mesh, arg_shapes, result_shapes)
        return mesh, run, results, args

    def infer(mesh, arg_shapes, result_shapes):
        return shardings(mesh, arg_shapes, result_shapes)[1]

    def rule(mesh, operand_types, result_types):
        del mesh
        names = (f"f{i}" for i in itertools.count())  # one factor per other axis
        ranks = [ir.RankedTensorType(t).rank for t in (*operand_types, *result_types)]
        dims = [(["b"] if r else []) + [next(names) for _ in range(r - 1)] for r in ranks]
        n = len(operand_types)
        text = (", ".join(" ".join(d) for d in dims[:n]) + " -> "
                + ", ".join(" ".join(d) for d in dims[n:]))
        others = tuple(f for d in dims for f in d[1:])
        return text, dict(need_replication_factors=others)

    call.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule)
    return call


def _batch_spec(mesh, arg_shapes):
    """The mesh axes that split the first operand's batch axis, or None (replicated)
    where it is not split, not split evenly, or its sharding is not a NamedSharding."""
    first = arg_shapes[0]
    sharding = first.sharding
    if not isinstance(sharding, NamedSharding) or not sharding.spec:
        return None
    axes = sharding.spec[0]
    if axes is None:
        return None
    names = axes if isinstance(axes, tuple) else (axes,)
    parts = math.prod(mesh.shape[a] for a in names)
    return axes if parts > 1 and first.shape[0] % parts == 0 else None


def _batch(prim: Primitive, merge: bool, args, dims, **params):
    n = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    front = [jnp.moveaxis(a, d, 0) if d is not None else jnp.broadcast_to(a, (n, *a.shape))
             for a, d in zip(args, dims)]
    if not merge:
        outs = prim.bind(*front, **params)
        return outs, [0] * len(outs)
    outs = prim.bind(*(a.reshape((n * a.shape[1], *a.shape[2:])) for a in front), **params)
    return [o.reshape((n, o.shape[0] // n, *o.shape[1:])) for o in outs], [0] * len(outs)


def bilinear_jvp(prim: Primitive) -> Callable:
    """The JVP rule of a primitive ``prim(x, y, *rest)`` whose first result is bilinear
    in ``(x, y)`` and whose other results do not depend on them (lengths):
    ``prim(tx, y) + prim(x, ty)``, skipping symbolic zero tangents."""
    def rule(primals, tangents, **params):
        x, y, *rest = primals
        tx, ty = tangents[:2]
        outs = prim.bind(*primals, **params)
        terms = [tx if is_zero(tx) else prim.bind(tx, y, *rest, **params)[0],
                 ty if is_zero(ty) else prim.bind(x, ty, *rest, **params)[0]]
        return outs, (tangent_sum(terms, outs[0]), *map(zero_like, outs[1:]))
    return rule


def zero_like(x) -> ad.Zero:
    """The symbolic zero tangent of primal ``x`` (float0 for integer ``x``)."""
    return ad.Zero(jax.typeof(x).to_tangent_aval())


def is_zero(t) -> bool:
    """Whether tangent or cotangent ``t`` is a symbolic zero."""
    return type(t) is ad.Zero


def tangent_sum(terms: Sequence, like) -> object:
    """The sum of the non-zero ``terms``, or the symbolic zero tangent of ``like``."""
    live = [t for t in terms if not is_zero(t)]
    return functools.reduce(jnp.add, live) if live else zero_like(like)
