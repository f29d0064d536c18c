"""Independent NumPy references for VSLA semantics (no vsla_jax code used here)."""

from __future__ import annotations

import itertools

import numpy as np


def zero_extend(x: np.ndarray, shape, rank: int) -> np.ndarray:
    pads = [(0, s - n) for s, n in zip(shape, x.shape[:rank])] + [(0, 0)] * (x.ndim - rank)
    return np.pad(x, pads)


def ambient(a: np.ndarray, b: np.ndarray, rank: int, op) -> np.ndarray:
    shape = [max(p, q) for p, q in zip(a.shape[:rank], b.shape[:rank])]
    return op(zero_extend(a, shape, rank), zero_extend(b, shape, rank))


def hadamard_nd(a: np.ndarray, b: np.ndarray, rank: int) -> np.ndarray:
    """Product where both operands have an entry, 0 where only one has (no 0 * inf)."""
    shape = [max(p, q) for p, q in zip(a.shape[:rank], b.shape[:rank])]
    out = np.zeros(tuple(shape) + a.shape[rank:], np.result_type(a, b))
    both = tuple(slice(0, min(p, q)) for p, q in zip(a.shape[:rank], b.shape[:rank]))
    out[both] = a[both] * b[both]
    return out


def conv_nd(a: np.ndarray, b: np.ndarray, rank: int) -> np.ndarray:
    """Full N-D convolution by explicit loops over b's taps (depthwise over features)."""
    feat = a.shape[rank:]
    out_shape = tuple(
        p + q - 1 if p and q else 0 for p, q in zip(a.shape[:rank], b.shape[:rank])
    )
    if 0 in out_shape:
        return np.zeros(out_shape + feat, np.result_type(a, b))
    out = np.zeros(out_shape + feat, np.result_type(a, b, np.float64))
    for j in itertools.product(*[range(n) for n in b.shape[:rank]]):
        sl = tuple(slice(jk, jk + nk) for jk, nk in zip(j, a.shape[:rank]))
        out[sl] += a * b[j]
    return out


def kron_nd(a: np.ndarray, b: np.ndarray, rank: int) -> np.ndarray:
    """np.kron over the variable axes, elementwise over feature axes."""
    feat = a.shape[rank:]
    if not feat:
        return np.kron(a, b)
    shape = tuple(p * q for p, q in zip(a.shape[:rank], b.shape[:rank])) + feat
    out = np.zeros(shape, np.result_type(a, b))
    for f in itertools.product(*[range(n) for n in feat]):
        idx = (Ellipsis,) + f
        out[idx] = np.kron(a[idx], b[idx])
    return out


def shrink(x: np.ndarray, rank: int) -> np.ndarray:
    """Drop trailing all-zero hyperplanes, last axis first, until none is left."""
    changed = True
    while changed:
        changed = False
        for ax in reversed(range(rank)):
            while x.shape[ax] > 0:
                last = np.take(x, x.shape[ax] - 1, axis=ax)
                if np.any(last != 0):
                    break
                x = np.take(x, range(x.shape[ax] - 1), axis=ax)
                changed = True
    if x.size == 0:
        x = np.zeros((0,) * rank + x.shape[rank:], x.dtype)
    return x


def convolve_items(xs, ks) -> list[np.ndarray]:
    """``np.convolve`` of every pair in float64; empty when either operand is empty."""
    return [np.convolve(np.asarray(x, np.float64), np.asarray(k, np.float64))
            if len(x) and len(k) else np.zeros(0) for x, k in zip(xs, ks)]


def assert_items_match(got, refs, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Every item has the reference's shape and matches it (``atol`` scaled by its max)."""
    assert len(got) == len(refs)
    for i, (o, ref) in enumerate(zip(got, refs)):
        assert o.shape == ref.shape, f"item {i}: {o.shape} vs {ref.shape}"
        scale = max(np.abs(ref).max(), 1.0) if ref.size else 1.0
        np.testing.assert_allclose(o, ref, rtol=rtol, atol=atol * scale, err_msg=f"item {i}")
