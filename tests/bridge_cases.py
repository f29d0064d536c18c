"""Shared by the bridge tests: the relative-error measure and the toy MLP."""

import jax.numpy as jnp
import numpy as np

TOL = 1e-5


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def mlp(p, x):
    """``tanh(x @ w1 + b1) @ w2``: the hidden axis (w1's 1, b1's 0, w2's 0) is permutable."""
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
