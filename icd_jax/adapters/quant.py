"""Q: post-training quantisation of ``[in, out]`` kernels, and the matmul that runs them.

``quantize(w, dtype, group_size=None)`` returns a ``Quantized`` pytree, built once at
transform time (no call ever re-quantises or dequantises an int8 weight):

- ``"int8"`` / ``"int4"``: symmetric absmax scales, per output channel (``group_size``
  None: ``scale [1, out]``) or per group of ``group_size`` contiguous input channels and
  output channel (``scale [in / g, out]``). int4 values are stored packed, two per byte.
- ``"fp8"``: ``float8_e4m3fn`` values with a per-output-channel scale mapping the
  channel's absmax to 448 (e4m3's largest finite value); compute stays float32.

``matmul(x, kernel)`` runs ``x [..., in] @ kernel``; ``compute(kernel)`` names what it
executes:

- ``"int8"``: per-channel int8/int4 weights with ``act="dynamic"`` (per-token scales) or
  ``act="static"`` (a calibrated per-tensor scale): one ``int8 x int8 -> int32``
  ``dot_general``, rescaled after. Per-input-channel divisors ``d [in]`` (SmoothQuant
  factors, times a static per-tensor scale) are folded into the weights
  (``W' = diag(d) W``, stored in ``q`` with ``smooth = d``), so they run at per-channel
  speed: the call only multiplies the input by ``1 / d`` before rounding.
- ``"int8-grouped"``: group-wise weights (int8 or int4) with per-token-per-group
  (``act="dynamic"``) or static per-group activation scales: a real grouped int8
  ``dot_general`` (batch over the ``in / g`` groups, ``int32`` partial sums), each group
  rescaled and summed.
- ``"float32-weight-only"``: ``act=None`` or fp8: the stored values are widened to
  float32 inside the call (weight-only quantisation; not int8 arithmetic).

Why layout matters: a scale is shared by a group of contiguous channels, so channels of
similar range placed together (RPTQ-style ``range_order`` or a co-access order) waste
fewer levels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from icd_jax.adapters import meta as meta_lib
from icd_jax.errors import ConfigError, ShapeError

DTYPES = ("int8", "int4", "fp8")
METHODS = ("ptq-minmax",)
ACTS = (None, "dynamic", "static")
QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}


@struct.dataclass
class Quantized:
    """A quantised ``[in, out]`` kernel.

    Attributes:
      q: ``int8 [in, out]``, ``uint8 [in / 2, out]`` (int4, packed) or
        ``float8_e4m3fn [in, out]``.
      scale: ``float32 [in / g, out]`` (``g = in`` for per-channel scales).
      act_scale: ``None``; a ``float32`` scalar (static per-tensor int8 activations,
        after ``smooth``); or ``float32 [in / g]`` (static per-group activations of
        group-wise weights).
      smooth: ``None`` or ``float32 [in]``: per-input-channel divisors folded into the
        weights: the stored values stand for ``smooth[:, None] * kernel`` and inputs are
        divided by ``smooth`` before they are quantised (the product is unchanged).
        SmoothQuant factors, or static activation scales (``tree.static_divisors``).
      dtype, group_size, act: static settings (``act``: None, "dynamic" or "static").
    """

    q: jax.Array
    scale: jax.Array
    act_scale: jax.Array | None = None
    smooth: jax.Array | None = None
    dtype: str = struct.field(pytree_node=False, default="int8")
    group_size: int | None = struct.field(pytree_node=False, default=None)
    act: str | None = struct.field(pytree_node=False, default=None)

    @property
    def shape(self) -> tuple[int, int]:
        rows = self.q.shape[0] * (2 if self.dtype == "int4" else 1)
        return rows, self.q.shape[1]

    @property
    def nbytes(self) -> int:
        """Stored bytes: values, scales and activation scales."""
        leaves = [self.q, self.scale, self.act_scale, self.smooth]
        return int(sum(np.asarray(x).nbytes for x in leaves if x is not None))

    def dequantize(self) -> jax.Array:
        """The float32 ``[in, out]`` kernel these values stand for."""
        vals = unpack_int4(self.q) if self.dtype == "int4" else self.q
        vals = vals.astype(jnp.float32)
        rows = vals.shape[0]
        g = rows if self.group_size is None else self.group_size
        s = jnp.repeat(self.scale, g, axis=0, total_repeat_length=rows)
        return vals * s if self.smooth is None else vals * s / self.smooth[:, None]


def check_kernel(w, name: str = "kernel") -> np.ndarray:
    """``w`` as a finite float ``[in, out]`` array, else ``ShapeError``."""
    a = np.asarray(w)
    if a.ndim != 2:
        raise ShapeError(f"{name} must be a 2-D [in, out] kernel, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating) and a.dtype != jnp.bfloat16:
        raise ShapeError(f"{name} must be floating point, got dtype {a.dtype}")
    if not np.isfinite(np.asarray(a, np.float32)).all():
        raise ShapeError(f"{name} has NaN or inf entries")
    return a


def check_settings(dtype: str, group_size, rows: int, act=None) -> int | None:
    """Validate ``dtype``/``group_size``/``act``; returns ``group_size`` as an int or None."""
    if dtype not in DTYPES:
        raise ConfigError(f"quantisation dtype must be one of {DTYPES}, got {dtype!r}")
    if act not in ACTS:
        raise ConfigError(f"act must be one of {ACTS}, got {act!r}")
    if group_size is None:
        return None
    if isinstance(group_size, bool) or int(group_size) != group_size or group_size < 1:
        raise ConfigError(f"group_size must be a positive integer, got {group_size!r}")
    g = int(group_size)
    if rows % g:
        raise ConfigError(f"{rows} input channels do not split into groups of {g}")
    if dtype == "int4" and g % 2 and g != rows:
        raise ConfigError(f"int4 packs two values per byte: group_size must be even, got {g}")
    return g


def pack_int4(v: jax.Array) -> jax.Array:
    """``int8 [2n, out]`` values in [-8, 7] as ``uint8 [n, out]`` (low nibble: even rows)."""
    u = (v.astype(jnp.int32) & 0xF).astype(jnp.uint8)
    return u[0::2] | (u[1::2] << 4)


def unpack_int4(p: jax.Array) -> jax.Array:
    """Inverse of ``pack_int4``: ``uint8 [n, out]`` -> ``int8 [2n, out]``."""
    lo = (p & 0xF).astype(jnp.int32)
    hi = (p >> 4).astype(jnp.int32)
    v = jnp.stack([lo, hi], axis=1).reshape(-1, p.shape[1])
    return jnp.where(v > 7, v - 16, v).astype(jnp.int8)


def group_absmax(w: jax.Array, group_size: int | None) -> jax.Array:
    """``max |w|`` over each group of input channels: ``[in / g, out]``."""
    rows, cols = w.shape
    g = rows if group_size is None else group_size
    return jnp.abs(w.astype(jnp.float32)).reshape(rows // g, g, cols).max(axis=1)


def smooth_factors(act_absmax, w_absmax, alpha: float = 0.5) -> np.ndarray:
    """SmoothQuant's per-input-channel factors ``absmax_x^a / absmax_w^(1-a)`` (1 where
    either is 0): dividing inputs by them moves activation outliers into the weights."""
    ax = np.asarray(act_absmax, np.float64)
    aw = np.asarray(w_absmax, np.float64)
    s = np.where((ax > 0) & (aw > 0), ax ** alpha / np.maximum(aw, 1e-30) ** (1 - alpha), 1.0)
    return s.astype(np.float32)


def quantize(w, dtype: str = "int8", group_size: int | None = None, *, act: str | None = None,
             act_scale=None, smooth=None) -> Quantized:
    """Quantise a float ``[in, out]`` kernel (see the module docstring); ``smooth``
    (``[in]``, see ``smooth_factors``) quantises ``smooth[:, None] * w`` instead."""
    w = jnp.asarray(check_kernel(w), jnp.float32)
    if smooth is not None:
        smooth = jnp.asarray(smooth, jnp.float32)
        if smooth.shape != (w.shape[0],):
            raise ShapeError(f"smooth must be [{w.shape[0]}], got shape {smooth.shape}")
        w = w * smooth[:, None]
    g = check_settings(dtype, group_size, w.shape[0], act)
    qmax = QMAX[dtype]
    amax = group_absmax(w, g)
    scale = jnp.where(amax > 0, amax / qmax, 1.0).astype(jnp.float32)
    rows = w.shape[0]
    s = jnp.repeat(scale, rows if g is None else g, axis=0, total_repeat_length=rows)
    if dtype == "fp8":
        q = (w / s).astype(jnp.float8_e4m3fn)
    else:
        q = jnp.clip(jnp.round(w / s), -qmax, qmax).astype(jnp.int8)
        if dtype == "int4":
            if rows % 2:
                raise ConfigError(f"int4 packs two rows per byte: {rows} input channels is odd")
            q = pack_int4(q)
    if act == "static" and act_scale is None:
        raise ConfigError("act='static' needs act_scale (calibrated activation absmax / 127)")
    if act_scale is not None:
        act_scale = jnp.asarray(act_scale, jnp.float32)
    return Quantized(q, scale, act_scale, smooth, dtype, g, act)


def quantize_rows(x: jax.Array, qmax: float = 127.0) -> tuple[jax.Array, jax.Array]:
    """Dynamic per-row (per-token) symmetric int8: ``x [..., in]`` -> (int8, scale [..., 1])."""
    amax = jnp.abs(x).max(axis=-1, keepdims=True).astype(jnp.float32)
    s = jnp.where(amax > 0, amax / qmax, 1.0)
    return jnp.clip(jnp.round(x / s), -qmax, qmax).astype(jnp.int8), s


def fake_quant_groups(x: jax.Array, scale: jax.Array, qmax: float = 127.0) -> jax.Array:
    """Quantise-dequantise ``x [..., in]`` with a static scale per channel group ``[in / g]``
    (a float reference for error measurements; ``matmul`` never runs it)."""
    s = jnp.repeat(scale, x.shape[-1] // scale.shape[0], total_repeat_length=x.shape[-1])
    return jnp.clip(jnp.round(x / s), -qmax, qmax) * s


def int8_dot(xq: jax.Array, wq: jax.Array) -> jax.Array:
    """``int8 [..., in] @ int8 [in, out]`` accumulated in ``int32`` (a real int8 matmul)."""
    return lax.dot_general(xq, wq, (((xq.ndim - 1,), (0,)), ((), ())),
                           preferred_element_type=jnp.int32)


def grouped_int8_dot(xq: jax.Array, wq: jax.Array, sx: jax.Array, sw: jax.Array
                     ) -> jax.Array:
    """Group-wise W8A8: ``sum_G sx[:, G] * sw[G] * (xq[:, G] @ wq[G])`` with each group's
    product a real ``int8 x int8 -> int32`` ``dot_general``.

    ``xq``: ``int8 [N, G, g]``; ``wq``: ``int8 [G * g, out]``; ``sx``: ``float32 [N, G]``
    (per token and group) or ``[1, G]``; ``sw``: ``float32 [G, out]``. Returns
    ``float32 [N, out]``. One dot per group (``G`` static): XLA:CPU runs these far faster
    than a single ``dot_general`` batched over the groups.
    """
    g = xq.shape[2]
    y = None
    for i in range(xq.shape[1]):
        acc = int8_dot(xq[:, i], wq[i * g:(i + 1) * g]).astype(jnp.float32)
        part = acc * sx[:, i:i + 1] * sw[i]
        y = part if y is None else y + part
    return y


def compute(kernel) -> str:
    """What ``matmul`` executes for ``kernel``: ``"float32"`` (a plain array), ``"int8"``,
    ``"int8-grouped"`` or ``"float32-weight-only"`` (see the module docstring)."""
    if not isinstance(kernel, Quantized):
        return "float32"
    if kernel.dtype == "fp8" or kernel.act is None:
        return "float32-weight-only"
    return "int8" if kernel.group_size is None else "int8-grouped"


def int_values(kernel: Quantized) -> jax.Array:
    """The stored integer values as ``int8 [in, out]`` (int4 unpacked; no float)."""
    return unpack_int4(kernel.q) if kernel.dtype == "int4" else kernel.q


def round_int8(x: jax.Array, scale, qmax: float = 127.0) -> jax.Array:
    """``clip(round(x / scale))`` as int8."""
    return jnp.clip(jnp.round(x / scale), -qmax, qmax).astype(jnp.int8)


def matmul(x: jax.Array, kernel) -> jax.Array:
    """``x [..., in] @ kernel [in, out]`` for a plain array or a ``Quantized`` kernel
    (``compute(kernel)`` says which arithmetic runs)."""
    if not isinstance(kernel, Quantized):
        return x @ kernel
    dtype = x.dtype
    if kernel.smooth is not None:  # folded divisors: x / d, the weights hold diag(d) W
        x = x.astype(jnp.float32) * (1.0 / kernel.smooth)
    kind = compute(kernel)
    if kind == "float32-weight-only":
        vals = int_values(kernel) if kernel.dtype != "fp8" else kernel.q
        g = kernel.shape[0] if kernel.group_size is None else kernel.group_size
        s = jnp.repeat(kernel.scale, g, axis=0, total_repeat_length=kernel.shape[0])
        return (x @ (vals.astype(jnp.float32) * s).astype(x.dtype)).astype(dtype)
    vals = int_values(kernel)
    if kind == "int8":
        if kernel.act == "dynamic":
            xq, sx = quantize_rows(x)
        else:
            sx = kernel.act_scale
            xq = round_int8(x, sx)
        acc = int8_dot(xq, vals).astype(jnp.float32)
        return (acc * (sx * kernel.scale[0])).astype(dtype)
    lead, d_in = x.shape[:-1], x.shape[-1]
    g = kernel.group_size
    xg = x.reshape(-1, d_in // g, g).astype(jnp.float32)
    if kernel.act == "dynamic":
        amax = jnp.abs(xg).max(axis=-1)
        sx = jnp.where(amax > 0, amax / 127.0, 1.0)  # [N, G]
    else:
        sx = jnp.broadcast_to(kernel.act_scale, (d_in // g,))[None, :]
    y = grouped_int8_dot(round_int8(xg, sx[..., None]), vals, sx, kernel.scale)
    return y.reshape(*lead, -1).astype(dtype)


def take_rows(kernel, rows: jax.Array):
    """The kernel restricted to input channels ``rows`` (int ``[k]``): an array's rows, or
    a per-channel ``Quantized`` with those rows of ``q`` and ``smooth`` (still int8)."""
    if not isinstance(kernel, Quantized):
        return jnp.take(kernel, rows, axis=0)
    if kernel.group_size is not None or kernel.dtype == "int4":
        raise ConfigError("take_rows needs a per-channel int8/fp8 kernel (group_size None)")
    smooth = None if kernel.smooth is None else jnp.take(kernel.smooth, rows)
    return dataclasses.replace(kernel, q=jnp.take(kernel.q, rows, axis=0), smooth=smooth)


def concat_out(kernels) -> jax.Array | Quantized:
    """Kernels ``[in, out_i]`` side by side: ``[in, sum out_i]`` (fused Q/K/V); quantised
    kernels must share their settings and activation scale."""
    if not any(isinstance(k, Quantized) for k in kernels):
        return jnp.concatenate(kernels, axis=1)
    first = kernels[0]
    same = all(isinstance(k, Quantized) and (k.dtype, k.group_size, k.act)
               == (first.dtype, first.group_size, first.act)
               and (k.smooth is None) == (first.smooth is None) for k in kernels)
    if not same:
        raise ConfigError("fused kernels must all be quantised with the same settings")
    # (kernels sharing one input share their smoothing factors: tree.quantize ensures it)
    act_scale = first.act_scale
    if act_scale is not None:  # one input: the fused kernel takes the widest range
        act_scale = jnp.max(jnp.stack([k.act_scale for k in kernels]), axis=0)
    return dataclasses.replace(first, q=jnp.concatenate([k.q for k in kernels], 1),
                               scale=jnp.concatenate([k.scale for k in kernels], 1),
                               act_scale=act_scale)


def range_order(absmax, group_size: int | None = None) -> np.ndarray:
    """RPTQ-style channel order: channels sorted by their range (``absmax [in]``, or a
    ``[in, out]`` kernel's per-row max ``|w|``), so contiguous groups hold channels of
    similar range. Returns an order (position -> original channel)."""
    a = np.abs(np.asarray(absmax, np.float64))
    if a.ndim == 2:
        a = a.max(axis=1)
    if a.ndim != 1:
        raise ShapeError(f"absmax must be [in] or [in, out], got shape {a.shape}")
    return np.argsort(-a, kind="stable").astype(np.int32)


def act_group_error(x, group_size: int, qmax: float = 127.0, order=None) -> float:
    """Relative error of quantising activations ``x [N, in]`` with one static absmax
    scale per group of ``group_size`` channels (after reordering channels by ``order``)."""
    x = np.asarray(x, np.float64)
    if order is not None:
        x = x[:, np.asarray(order)]
    n, d = x.shape
    amax = np.abs(x).reshape(n, d // group_size, group_size).max(axis=(0, 2))
    s = np.where(amax > 0, amax / qmax, 1.0)
    xq = fake_quant_groups(jnp.asarray(x, jnp.float32), jnp.asarray(s, jnp.float32), qmax)
    return meta_lib.rel_error(x, np.asarray(xq))


def apply_quant(x, dtype: str = "int8", method: str = "ptq-minmax",
                group_size: int | None = None, *, act: str | None = None, act_scale=None,
                smooth=None, strict: bool = False) -> tuple[Quantized | np.ndarray, dict]:
    """Quantise one ``[in, out]`` kernel: ``(Quantized, meta)``.

    ``meta["error"]``: ``rel_fro`` (relative Frobenius error of the dequantised kernel)
    and ``max_abs``; ``meta["bytes"]`` / ``meta["bytes_f32"]``: storage. On failure the
    float kernel comes back unchanged with ``meta["ok"] = False``.
    """
    w = check_kernel(x)
    if method not in METHODS:
        raise ConfigError(f"quantisation method must be one of {METHODS}, got {method!r}")
    g = check_settings(dtype, group_size, w.shape[0], act)
    settings = dict(dtype=dtype, method=method, group_size=g, act=act,
                    smooth=smooth is not None)

    def body():
        qk = quantize(w, dtype, g, act=act, act_scale=act_scale, smooth=smooth)
        deq = np.asarray(qk.dequantize())
        err = dict(rel_fro=meta_lib.rel_error(w, deq),
                   max_abs=float(np.abs(deq - np.asarray(w, np.float64)).max()))
        shared = "per output channel" if g is None else f"per {g} contiguous input channels"
        return qk, meta_lib.make(
            "quant", settings, repermute=g is not None,
            reason=(f"scales are shared {shared}: an order that groups channels of similar "
                    "range lowers the error" if g is not None else
                    "per-channel scales do not depend on the channel order"),
            error=err, bytes=qk.nbytes, bytes_f32=int(w.size * 4),
            expected_quality=(f"{dtype} weights: error ~{err['rel_fro']:.2%} of the kernel; "
                              "typically < 0.5 pp retrieval drop for int8/fp8, more for int4"))

    return meta_lib.guarded("quant", settings, w, body, strict)

