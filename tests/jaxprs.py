"""What a traced function executes, read from its jaxpr (nested jaxprs included)."""

from __future__ import annotations

import jax
import jax.extend


def dot_dtypes(fn, *args) -> list[tuple[str, ...]]:
    """Operand dtypes of every ``dot_general`` in ``fn(*args)``'s jaxpr."""
    out = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                out.append(tuple(str(v.aval.dtype) for v in eqn.invars))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return out
