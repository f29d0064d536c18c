"""The runtime's StableHLO export: the one place ``icd_jax.runtime`` calls
``stablehlo_bridge`` (imported on use, so the pipeline loads without it).

- ``export_run(target, perm_path, out_path, metrics)``: a run's model under its saved
  orders, permuted, tagged and verified by the bridge, written as artefacts;
- ``export_saved(run_dir, to)``: ``icd export``, the same for a finished run folder;
- ``minilm_case`` / ``mamba_case``: the bridge's built-in cases (``python -m
  stablehlo_bridge export --model minilm|mamba-tiny`` resolves to them by name).

A target provides ``target.spec`` (its ``permute.ModelSpec``) and
``target.export_fn() -> (name, fn, params, args, output_axis)``: ``fn(params,
*args)`` the dense forward, ``params`` the *unpermuted* weights (a pytree of NumPy
arrays; the bridge applies ``perms``), ``args`` a tuple of NumPy example inputs, and
``output_axis`` the ``spec.outputs`` name of the result (``"embedding"``) or None.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import numpy as np

from icd_jax.errors import ArtifactError
from icd_jax.runtime import artifacts, gates
from icd_jax.runtime.rundir import RunDir

#: Example sentences of ``minilm_case`` (a batch up to their number takes the first ones).
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "StableHLO keeps the layout decision visible to downstream compilers.",
    "Permuting hidden units leaves the function unchanged.",
    "Hello world",
)


def minilm_case(seed: int = 0, batch_size: int | None = None,
                sentences: Sequence[str] | None = None):
    """A ``stablehlo_bridge.models.Case`` of all-MiniLM-L6-v2 (real weights) on one
    packed batch: ``fn(params, ids, positions, segment, gather, scatter, lengths) ->
    float32[B, 384]`` embeddings (on the ``residual`` axis).

    Args:
      seed: unused (the weights and sentences are fixed); part of the factory protocol.
      batch_size: sentences in the batch (default: all of ``sentences``); more than
        ``SENTENCES`` holds come from ``icd_jax.corpus``.
      sentences: the texts (default ``SENTENCES``, or the corpus for a large batch).
    """
    del seed
    from icd_jax import corpus
    from icd_jax.models import minilm as model
    from stablehlo_bridge.models import Case

    texts = list(sentences if sentences is not None else (
        SENTENCES if batch_size is None or batch_size <= len(SENTENCES)
        else corpus.sentences(batch_size)))
    n = len(texts) if batch_size is None else min(batch_size, len(texts))
    enc = model.load(backend="xla")  # StableHLO cannot carry the C++ kernels' custom calls
    batch = next(iter(enc.packed_batches(texts[:n], n)))
    return Case("minilm", enc.apply, jax.tree.map(np.asarray, enc.params),
                batch.arrays(), model.permute_spec(enc.config), "embedding")


def mamba_case(seed: int = 0, batch_size: int | None = None, length: int = 8,
               vocab_size: int = 64, d_model: int = 16, n_layers: int = 2):
    """A ``stablehlo_bridge.models.Case`` of a tiny Mamba-1 (``MambaConfig.tiny``,
    weights from ``seed``) on ``batch_size`` (default 2) random sequences padded to
    ``length`` (the last one half as long): ``fn(params, ids int32[B, length], lengths
    int32[B]) -> float32[B, length, vocab_size]`` logits."""
    from icd_jax.models import mamba as model
    from stablehlo_bridge.models import Case

    batch = 2 if batch_size is None else batch_size
    config = model.MambaConfig.tiny(vocab_size=vocab_size, d_model=d_model,
                                    n_layers=n_layers)
    params = jax.tree.map(np.asarray, model.init(config, seed))
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, (batch, length)).astype(np.int32)
    lengths = np.full(batch, length, np.int32)
    lengths[-1] = max(1, length // 2)
    return Case("mamba-tiny", functools.partial(model.logits_padded, config), params,
                (ids, lengths), model.permute_spec(config), None)


def target_case(target):
    """The bridge ``Case`` of ``target``'s dense (unpermuted) model, from
    ``target.export_fn()`` and ``target.spec``; the bridge applies the orders itself."""
    from stablehlo_bridge.models import Case

    name, fn, params, args, output_axis = target.export_fn()
    return Case(name, fn, params, tuple(args), target.spec, output_axis)


def export_run(target, perm_path: str, out_path: str, metrics: dict | None = None) -> dict:
    """Export ``target``'s dense model under the orders in ``perm_path`` through the
    StableHLO bridge (tagged, permuted by the pass, verified) to ``out_path``; returns
    the artefact paths ``{"stablehlo", "mlir", "jax", "sidecar"}``."""
    import stablehlo_bridge as bridge

    perms, meta = artifacts.load_perms(perm_path)
    check_orders(perms, target.spec, perm_path)
    exp = bridge.build(target_case(target), perms, transform_meta=dict(
        arm=meta.get("arm"), transforms=sorted((metrics or {}).get("transforms") or {})),
        metrics=gates.headline(metrics or {}))
    return bridge.export_artifacts(exp, out_path, large_elements_limit=16)


def check_orders(perms: dict, spec, path: str) -> None:
    """``ArtifactError`` naming ``path`` when an order names no axis of ``spec`` (a
    ``permute.ModelSpec``) or has another length than its axis."""
    sizes = {ax.name: ax.size for ax in spec.axes}
    for name, order in perms.items():
        if name not in sizes:
            raise ArtifactError(f"{path}: perms[{name!r}] names no axis of the model "
                                f"{spec.model!r} (it has {', '.join(sizes)})")
        if np.size(order) != sizes[name]:
            raise ArtifactError(f"{path}: perms[{name!r}] has {np.size(order)} entries, the "
                                f"model's axis {name!r} has {sizes[name]}")


def export_saved(run_dir: str, to: str | None = None,
                 make_target: Callable | None = None) -> dict:
    """``icd export``: rebuild the run's model from ``config.lock.json`` (with
    ``make_target(cfg)``, default ``targets.make``) and export it under
    ``perm_active.json`` (default output ``RUN/model.stablehlo``)."""
    if make_target is None:
        from icd_jax.runtime import targets

        make_target = targets.make
    run = RunDir(run_dir)
    cfg = run.config()
    metrics = run.metrics().dump() if run.exists("metrics") else None
    return export_run(make_target(cfg), run.path("perm_active"),
                      to or run.path("stablehlo"), metrics)
