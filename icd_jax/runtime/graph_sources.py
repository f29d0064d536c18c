"""The co-access graphs a run takes from somewhere other than the model's activations: a
trace file, or a planted mock (``graph.source: trace`` / ``mock``)."""

from __future__ import annotations

from collections.abc import Sequence

from icd_jax import graph as graph_lib
from icd_jax.errors import TraceError


def from_trace(path: str | None, size: int,
               axes: Sequence[str]) -> dict[str, graph_lib.CoAccessGraph]:
    """The trace's W (``size`` x ``size``) for every axis in ``axes``; ``TraceError`` when
    there is no path or the trace holds no edges."""
    if not path:
        raise TraceError("graph.source is 'trace' but graph.trace_path is not set")
    w = graph_lib.build_w("trace", path=path, D=size)
    if w.csr.nnz == 0:
        raise TraceError(f"trace {path} holds no edges")
    return {ax: w for ax in axes}


def planted(size: int, axes: Sequence[str], seed: int) -> dict[str, graph_lib.CoAccessGraph]:
    """A planted mock W (``size`` x ``size``, ``size // 64`` blocks, at least 2) per axis,
    seeded ``seed + i`` for the i-th axis."""
    return {ax: graph_lib.build_w("mock", D=size, blocks=max(2, size // 64), seed=seed + i)
            for i, ax in enumerate(axes)}
