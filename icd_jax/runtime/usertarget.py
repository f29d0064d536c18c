"""The generic adapter: runs the pipeline on any ``target.Target`` (your own model).

``UserTarget(cfg, user)`` gives the pipeline what the built-in targets give it, from the
protocol's few members: W from ``activations`` (each token's top ``graph.top_frac``
channels), arms by ``permute.apply``, weight-only quantisation and N:M / unstructured
pruning of the 2-D ``kernel`` leaves, latency of ``forward`` (jitted) over the
``"time"`` batches and quality from ``quality`` against the dense model. It applies no
KV cache or activation-sparse FFN transform (the config rejects them at load).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
import scipy.sparse as sp

from icd_jax import capture, permute
from icd_jax.adapters import tree
from icd_jax.runtime.arms import (
    Arm,
    grouped_paths,
    params_hash,
    weight_only_quant,
    weight_sparsity,
)
from icd_jax.runtime.config import Config, Transform
from icd_jax.runtime.target import Target, restore_outputs


class Sown:
    """``capture.Capturable`` view of a target: its ``activations`` as top-k names."""

    def __init__(self, user: Target, axes: Iterable[str]):
        self.user, self.axes = user, list(axes)

    def capture_batch(self, batch, params) -> dict[str, tuple[Any, np.ndarray]]:
        acts = self.user.activations(params, batch)
        out = {}
        for a in self.axes:
            x = np.asarray(acts[a], np.float32)
            out[f"{a}/ffn"] = (x, np.ones(x.shape[0], bool))
        return out


class UserTarget:
    """The pipeline's view of a user ``Target`` (see the module docstring)."""

    kind = "custom"

    def __init__(self, cfg: Config, user: Target):
        self.cfg, self.user = cfg, user
        self.spec = user.spec
        self.axes = list(user.axes)
        self.size = self.spec.axis(self.axes[0]).size
        self.quality_metric = str(user.quality_metric)
        self.params = jax.tree.map(np.asarray, user.params)
        self.paths = tree.kernel_paths(self.params)
        self.split = {s: list(user.batches(s)) for s in ("graph", "calib", "quality", "time")}
        self.tokens = int(sum(int(user.tokens(b)) for b in self.split["time"]))
        self.fwd = jax.jit(user.forward)
        self.dense_quality: np.ndarray | None = None
        self.dense_outputs: list | None = None

    def model_id(self) -> dict:
        return dict(name=str(self.user.name), target=self.cfg.model.target,
                    kwargs=self.cfg.model.kwargs, params=params_hash(self.params))

    def identity(self) -> dict[str, np.ndarray]:
        return tree.identity_perms(self.spec)

    def activations(self, arm: Arm | None, show_progress: bool = False
                    ) -> dict[str, sp.csr_matrix]:
        """Each co-designed axis's top-``graph.top_frac`` activations per token."""
        params = self.params if arm is None else arm.params
        cap = capture.capture(Sown(self.user, self.axes), params, self.split["graph"],
                              what=("ffn",), top_frac=self.cfg.graph.top_frac,
                              show_progress=show_progress)
        return {a: cap.acts(a) for a in self.axes}

    def arm(self, name: str, perms: Mapping[str, np.ndarray], t: Transform,
            strict: bool = False) -> Arm:
        """The model under ``perms`` with the weight transforms of ``t``."""
        params = permute.apply(self.spec, self.params, perms)
        meta: dict[str, dict] = {}
        if t.sparsity.enabled:
            params, meta["sparsity"] = weight_sparsity(params, self.paths, t.sparsity,
                                                       strict, {})
        if t.quant.enabled:
            params, meta["quant"] = weight_only_quant(
                params, self.paths, t.quant, strict, f"{self.user.name}'s layers",
                grouped_paths(self.spec, self.paths, self.axes, t.quant.groups_on))
        return Arm(name, dict(perms), jax.tree.map(np.asarray, params), self.fwd, meta)

    def dense_arm(self) -> Arm:
        return Arm("dense", self.identity(), self.params, self.fwd, {})

    def call(self, arm: Arm) -> Callable[[], Any]:
        """A no-argument call running the timed batches (results to block on)."""
        fwd, params, batches = arm.runner, jax.device_put(arm.params), self.split["time"]
        return lambda: [fwd(params, b) for b in batches]

    def call_tokens(self) -> list[int]:
        return [int(self.user.tokens(b)) for b in self.split["time"]]

    def outputs(self, arm: Arm) -> list:
        """The ``"quality"`` split's outputs under ``arm``, in the dense order (outputs on
        a permuted axis are un-permuted, ``target.restore_outputs``)."""
        return [jax.tree.map(np.asarray, restore_outputs(
            self.spec, arm.runner(arm.params, b), arm.perms)) for b in self.split["quality"]]

    def quality(self, arm: Arm) -> dict:
        """The target's per-sample quality (%) and its drop against dense, in pp."""
        if self.dense_outputs is None:
            self.dense_outputs = self.outputs(self.dense_arm())
            self.dense_quality = self.score(self.dense_outputs)
        got = self.dense_quality if arm.name == "dense" else self.score(self.outputs(arm))
        value, dense = float(np.mean(got)), float(np.mean(self.dense_quality))
        return dict(value=value, drop_pp=dense - value, samples=got.tolist())

    def score(self, outputs: list) -> np.ndarray:
        got = np.asarray(self.user.quality(outputs, self.dense_outputs, self.split["quality"]),
                         np.float64).reshape(-1)
        if got.size == 0 or not np.all(np.isfinite(got)):
            raise ValueError(f"{self.user.name}: quality() returned {got.size} scores, "
                             "not a non-empty finite array")
        return got

    def gemm_shapes(self) -> list[tuple[int, int, int]]:
        """``(m, k, n)`` of each 2-D kernel on the first timed batch's real tokens."""
        m = int(self.user.tokens(self.split["time"][0]))
        flat = permute.flat(self.params)
        return [(m, *np.shape(flat[p])) for p in self.paths]

    def export_fn(self) -> tuple:
        """``(name, fn, params, args, output)`` of the dense model on one timed batch."""
        forward = self.user.forward
        batch = tuple(np.asarray(x) for x in self.split["time"][0])

        def user_forward(params, *arrays):
            return forward(params, tuple(arrays))

        return (str(self.user.name), user_forward, self.params, batch, None)
