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
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir


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
        fn = portable if export else impl
        return mlir.lower_fun(lambda *a: tuple(fn(*a, **params)),
                              multiple_results=True)(ctx, *args)

    mlir.register_lowering(prim, lower)
    batching.primitive_batchers[prim] = functools.partial(_batch, prim, merge_batch)
    return prim


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
