"""Helpers shared by the benchmark scripts: timing, atomic JSON output and the peers
that several scripts time (padding, pad-to-max FFT, PyTorch SDPA per sequence)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from icd_jax.runtime.measure import once
from vsla_jax.util import atomic_write_bytes


class SelfTimed:
    """A callable that times one part of its own work and returns those seconds: for a
    backward whose forward must run first but stays outside the measurement. The
    timing helpers below take its answer instead of timing the whole call."""

    def __init__(self, fn: Callable[[], float]):
        self.fn = fn

    def __call__(self) -> float:
        return self.fn()


def measure(fn: Callable[[], object], min_seconds: float = 0.0) -> float:
    """Seconds of one call: ``once(fn)``, or what a ``SelfTimed`` reports. With
    ``min_seconds``, the mean over back-to-back calls (each blocked on) until their
    seconds add up to at least ``min_seconds``: for calls of microseconds, where one
    timed call measures the caches and branch predictors that the previous row left."""
    one = (lambda: fn()) if isinstance(fn, SelfTimed) else (lambda: once(fn))
    total, calls = one(), 1
    while total < min_seconds:
        total, calls = total + one(), calls + 1
    return total / calls


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """``(first-call seconds, median steady-state seconds)``; results are blocked on."""
    first = measure(fn)
    return first, float(np.median([measure(fn) for _ in range(repeats)]))


def write_json_atomic(path: str, payload: dict) -> None:
    """Write JSON atomically (``vsla_jax.util.atomic_write_bytes``); NumPy scalars as
    floats."""
    atomic_write_bytes(path, json.dumps(payload, indent=1, sort_keys=True,
                                        default=float).encode())


def timed_interleaved(fns: dict[str, Callable[[], object]], repeats: int,
                      min_sample_seconds: float = 0.0) -> dict[str, tuple[float, float]]:
    """``timed`` for several functions, measured in interleaved rounds.

    Every function is called once (first call, compile included), then ``repeats``
    rounds each call every function twice and time the second call, so slow drifts of
    a shared machine hit all of them alike while each timed call still finds its own
    library warm (thread pools awake, caches filled: switching between PyTorch and XLA
    costs the first call after a switch several times its steady time). With
    ``min_sample_seconds`` each sample is the mean of back-to-back calls lasting that
    long (``measure``). Returns ``{label: (first-call seconds, median seconds)}``.
    """
    first = {label: measure(fn) for label, fn in fns.items()}
    samples = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            measure(fn)  # warm: this library's threads and caches, after the previous row
            samples[label].append(measure(fn, min_sample_seconds))
    return {label: (first[label], float(np.median(samples[label]))) for label in fns}


# -- foreign CPU load -------------------------------------------------------------------
def _busy_jiffies() -> int | None:
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    return sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)  # minus idle, iowait


class ForeignLoad:
    """CPU share that other processes took while the block ran (Linux; else None)."""

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), _busy_jiffies(), os.times()
        return self

    def __exit__(self, *exc):
        busy1, own1 = _busy_jiffies(), os.times()
        wall = time.perf_counter() - self.t0
        if self.busy0 is None or busy1 is None or wall <= 0:
            self.share = None
            return
        hz = os.sysconf("SC_CLK_TCK")
        own = (own1.user + own1.system) - (self.own0.user + self.own0.system)
        foreign = (busy1 - self.busy0) / hz - own
        self.share = max(0.0, foreign) / (wall * (os.cpu_count() or 1))


def timed_clean(fns: dict[str, Callable[[], object]], repeats: int, max_foreign: float = 0.1,
                max_rounds: int = 0) -> tuple[dict, float | None, int]:
    """``timed_interleaved`` one round at a time, discarding rounds in which other
    processes took more than ``max_foreign`` of the CPUs (a shared machine's other
    jobs slow the rows unevenly: PyTorch's OpenMP loop far more than XLA), up to
    ``max_rounds`` rounds (0: ``4 * repeats``). Returns ``({label: (first s, median
    s)}, mean foreign share of the kept rounds, discarded round count)``."""
    budget = max_rounds or 4 * repeats
    first, kept, loads, all_rounds = None, [], [], []
    while len(kept) < repeats and len(all_rounds) < budget:
        with ForeignLoad() as load:
            t = timed_interleaved(fns, 1)
        first = first or {label: v[0] for label, v in t.items()}
        sample = {label: v[1] for label, v in t.items()}
        all_rounds.append((sample, load.share))
        if load.share is None or load.share <= max_foreign:
            kept.append(sample)
            loads.append(load.share or 0.0)
    rounds = kept if len(kept) >= max(1, repeats // 2) else [r for r, _ in all_rounds]
    if rounds is not kept:
        loads = [x or 0.0 for _, x in all_rounds]
    med = {label: (first[label], float(np.median([r[label] for r in rounds]))) for label in fns}
    return med, float(np.mean(loads)) if loads else None, len(all_rounds) - len(kept)


def sentence_transformers_model(threads: int):
    """ST's all-MiniLM-L6-v2 from the package folder, or None when not installed."""
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from icd_jax.models import minilm

    torch.set_num_threads(threads)
    return SentenceTransformer(minilm.package_dir(), device="cpu")


# -- peers on the real MiniLM ---------------------------------------------------------
def cpu_flags(names: tuple[str, ...] = ("avx2", "avx512f", "avx512_vnni", "avx_vnni",
                                        "amx_int8")) -> dict[str, bool]:
    """Which of the int8-relevant CPU flags ``/proc/cpuinfo`` lists
    (``icd_jax.runtime.hostprobe.cpu_flags``; all False off Linux)."""
    from icd_jax.runtime.hostprobe import cpu_flags as read_flags

    return read_flags(names)


def thp_mode() -> str:
    """The bracketed mode of /sys/kernel/mm/transparent_hugepage/enabled, or 'absent'
    (the kernels' huge-page hints take effect under 'madvise' and 'always')."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "absent"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


def unseen_sentences(n: int = 0, calibration: int = 128) -> list[str]:
    """Distinct corpus sentences outside the labelled quality set and the first
    ``calibration`` corpus sentences (``minilm.quantized``'s default calibration set),
    in corpus order: the first ``n`` (0: all). Distinct, so no nearest neighbour is a copy."""
    from icd_jax import corpus

    seen = set(corpus.labelled_sentences()[0]) | set(corpus.sentences(calibration))
    held = list(dict.fromkeys(s for s in corpus.sentences() if s not in seen))
    return held[:n] if n else held


# -- peers shared by the conv and attention scripts -------------------------------------
def pad(items: list[np.ndarray], width: int) -> np.ndarray:
    """``[len(items), width]`` float32, item ``i`` in row ``i`` and zeros after it."""
    out = np.zeros((len(items), width), np.float32)
    for i, a in enumerate(items):
        out[i, : len(a)] = a
    return out


@jax.jit
def pad_to_max_fft(xp: jax.Array, kp: jax.Array) -> jax.Array:
    """The archived conv design: one FFT length next_pow2(2*d_max - 1) for the batch.
    ``xp [B, m]``, ``kp [B, n]`` padded rows; returns ``[B, m + n - 1]``."""
    d_max = max(xp.shape[1], kp.shape[1])
    n = 1 << (2 * d_max - 2).bit_length()
    y = jnp.fft.irfft(jnp.fft.rfft(xp, n) * jnp.fft.rfft(kp, n), n)
    return y[:, : xp.shape[1] + kp.shape[1] - 1]


def torch_sequences(x: np.ndarray, lengths: np.ndarray, grad: bool = False) -> list:
    """Item ``i`` of a padded ``[B, C, H, D]`` host array as a contiguous torch tensor
    ``[H, lengths[i], D]`` (requiring grad when ``grad``)."""
    import torch

    return [torch.from_numpy(np.array(x[i, :n])).transpose(0, 1).contiguous()
            .requires_grad_(grad) for i, n in enumerate(lengths)]


def attention_on(q, k, v, **kwargs) -> Callable[..., jax.Array]:
    """``(qd, kd, vd) -> vs.attention(...).data`` with q/k/v's lengths (VarTensors) and
    ``kwargs``: the function of the data that ``jax.grad`` and ``jax_backward`` take."""
    import vsla_jax as vs

    return lambda qd, kd, vd: vs.attention(vs.VarTensor(qd, q.lengths), vs.VarTensor(
        kd, k.lengths), vs.VarTensor(vd, v.lengths), **kwargs).data


def torch_sdpa_per_sequence(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                            lengths: np.ndarray, causal: bool = False):
    """PyTorch SDPA on each sequence, with every core: ``(forward, forward+backward)``
    callables. ``q, k, v`` are padded ``[B, C, H, D]`` host arrays and item ``i`` has
    ``lengths[i]`` rows; the backward is ``loss.backward()`` of ``sum(o ** 2)``.

    Raises ImportError when torch is not installed.
    """
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count() or 1)
    tq, tk, tv = (torch_sequences(x, lengths) for x in (q, k, v))

    def forward():
        with torch.no_grad():
            return [F.scaled_dot_product_attention(a, b, c, is_causal=causal)
                    for a, b, c in zip(tq, tk, tv)]

    grad_copies = lambda xs: [x.detach().clone().requires_grad_(True) for x in xs]
    gq, gk, gv = grad_copies(tq), grad_copies(tk), grad_copies(tv)

    def forward_backward():
        loss = sum((F.scaled_dot_product_attention(a, b, c, is_causal=causal) ** 2).sum()
                   for a, b, c in zip(gq, gk, gv))
        loss.backward()
        return loss.detach()

    return forward, forward_backward


def jax_backward(forward: Callable[..., jax.Array], *args) -> Callable[[], object]:
    """JAX's backward alone of ``sum(forward(*args) ** 2)``: the forward runs once, here,
    and the callable applies its jitted ``vjp`` to the loss's cotangent ``2 o``."""
    o, vjp = jax.vjp(forward, *args)
    apply, ct = jax.jit(lambda f, c: f(c)), 2.0 * o
    return lambda: apply(vjp, ct)


def torch_sdpa_backward(q: np.ndarray, k: np.ndarray, v: np.ndarray, lengths: np.ndarray,
                        causal: bool = False) -> SelfTimed:
    """PyTorch's backward alone, timed directly: each call runs the forward with grad
    (untimed) and returns the seconds of ``loss.backward()`` of ``sum(o ** 2)`` over
    every sequence. (``forward+backward`` minus the no-grad ``forward`` is no measure of
    it: with grad disabled PyTorch may run another SDPA kernel, 10x slower for a causal
    sequence of 1,000 tokens, which made that difference near zero.)

    Raises ImportError when torch is not installed.
    """
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count() or 1)
    gq, gk, gv = (torch_sequences(x, lengths, grad=True) for x in (q, k, v))

    def backward_seconds() -> float:
        loss = sum((F.scaled_dot_product_attention(a, b, c, is_causal=causal) ** 2).sum()
                   for a, b, c in zip(gq, gk, gv))
        t0 = time.perf_counter()
        loss.backward()
        return time.perf_counter() - t0

    return SelfTimed(backward_seconds)
