"""Export cases: the bridge's input (``Case``: a model's forward, its parameters,
example inputs and its ``ModelSpec``) and the factories that build them.

The bridge builds no model itself. A case comes from a factory named by a
``"package.module:function"`` string, imported when it is resolved (``factory``,
``case``), so the bridge never imports the packages that define models. The factory is
called ``factory(seed=..., batch_size=...)`` (``batch_size`` None: the factory's
default) and returns a ``Case``. Short names for the built-in cases:

- ``"minilm"``: ``icd_jax.runtime.export:minilm_case``, the real all-MiniLM-L6-v2 on
  one packed batch; ``fn(params, ids, positions, segment, gather, scatter, lengths) ->
  float32[B, 384]`` (the pooled embedding lies on the ``residual`` axis);
- ``"mamba-tiny"``: ``icd_jax.runtime.export:mamba_case``, a test-sized Mamba-1 with
  seeded weights; ``fn(params, ids [B, C], lengths [B]) -> float32[B, C, vocab]``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import numpy as np

from icd_jax.permute import ModelSpec
from stablehlo_bridge.errors import SpecError

#: Short model names -> ``"package.module:function"`` factories.
BUILTIN = {"minilm": "icd_jax.runtime.export:minilm_case",
           "mamba-tiny": "icd_jax.runtime.export:mamba_case"}


@dataclasses.dataclass(frozen=True)
class Case:
    """One model to export.

    Attributes:
      name: the model's name (the exported function is named after it).
      fn: ``fn(params, *args)``, traceable by ``jax.jit``.
      params: nested dict of host arrays, the unpermuted weights.
      args: example inputs (host arrays) fixing the exported shapes.
      spec: the model's permutable axes.
      output: the ``spec.outputs`` name of the result (None: no permuted output axis).
    """

    name: str
    fn: Callable
    params: dict
    args: tuple[np.ndarray, ...]
    spec: ModelSpec
    output: str | None = None


def factory_ref(model: str) -> str:
    """The ``"package.module:function"`` of ``model`` (a short name or such a string)."""
    ref = BUILTIN.get(model, model)
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr.isidentifier():
        raise SpecError(f"model {model!r} is neither one of {sorted(BUILTIN)} nor a "
                        f"'package.module:function' factory")
    return ref


def factory(model: str) -> Callable[..., Case]:
    """The case factory of ``model`` (a short name of ``BUILTIN`` or
    ``"package.module:function"``), imported now; ``SpecError`` if it cannot be."""
    module, _, attr = factory_ref(model).partition(":")
    try:
        found = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise SpecError(f"model {model!r}: cannot import {module!r}: {e}") from e
    except AttributeError:
        raise SpecError(f"model {model!r}: module {module!r} has no {attr!r}") from None
    if not callable(found):
        raise SpecError(f"model {model!r}: {module}:{attr} is not callable")
    return found


def case(model: str, **kwargs) -> Case:
    """The ``Case`` the factory of ``model`` builds from ``kwargs`` (``seed``,
    ``batch_size``, ...); ``SpecError`` when it returns anything else or raises."""
    make = factory(model)
    try:
        got = make(**kwargs)
    except Exception as e:  # noqa: BLE001 - the user's factory: any error is its own
        raise SpecError(f"model {model!r}: the factory raised {type(e).__name__}: "
                        f"{e}") from e
    if not isinstance(got, Case):
        raise SpecError(f"model {model!r}: the factory returned a {type(got).__name__}, "
                        f"not a stablehlo_bridge.models.Case")
    return got
