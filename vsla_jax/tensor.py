"""The variable-shape tensor: a capacity-padded array plus per-item logical lengths."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vsla_jax.capacity import DEFAULT_POLICY, CapacityPolicy
from vsla_jax.errors import LengthError, ModelMismatchError, ShapeError, VSLATypeError

MODELS = ("A", "B")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VarTensor:
    """A batch of variable-shape tensors sharing one static capacity.

    Attributes:
      data: ``[*batch, *capacity, *features]``. Entries outside an item's logical
        extent (the slack) are exactly zero.
      lengths: ``[*batch, rank]`` int32, the logical extent of each variable axis.
      model: static; ``"A"`` (convolution semiring) or ``"B"`` (Kronecker semiring).

    ``rank`` and the batch shape are read from ``lengths.shape``; capacity and feature
    axes from ``data.shape``. All are static under ``jit``; only lengths are traced.
    """

    data: jax.Array
    lengths: jax.Array
    model: str = dataclasses.field(default="A", metadata=dict(static=True))

    # -- static metadata -------------------------------------------------------------
    @property
    def rank(self) -> int:
        """Number of variable axes."""
        return self.lengths.shape[-1]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.lengths.shape[:-1])

    @property
    def batch_ndim(self) -> int:
        return self.lengths.ndim - 1

    @property
    def capacity(self) -> tuple[int, ...]:
        b = self.batch_ndim
        return tuple(self.data.shape[b : b + self.rank])

    @property
    def features(self) -> tuple[int, ...]:
        return tuple(self.data.shape[self.batch_ndim + self.rank :])

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def var_axes(self) -> tuple[int, ...]:
        """Axes of ``data`` that are variable (capacity) axes."""
        b = self.batch_ndim
        return tuple(range(b, b + self.rank))

    def __repr__(self) -> str:
        return (
            f"VarTensor(model={self.model!r}, batch={self.batch_shape}, rank={self.rank}, "
            f"capacity={self.capacity}, features={self.features}, dtype={self.dtype})"
        )

    # -- conversions -----------------------------------------------------------------
    def mask(self) -> jax.Array:
        """Boolean ``[*batch, *capacity]``: True inside each item's logical extent."""
        return extent_mask(self.lengths, self.capacity)

    def to_list(self) -> Any:
        """NumPy arrays at each item's exact shape, nested like the batch axes.

        An unbatched tensor returns a single array. Items are read-only views of one
        host copy of ``data`` (no per-item copies).
        """
        data = np.asarray(self.data)
        lengths = np.asarray(self.lengths)
        return _to_nested(data, lengths, self.batch_ndim)

    def to_numpy(self) -> np.ndarray:
        """The exact-shape array of an unbatched tensor."""
        if self.batch_ndim:
            raise ShapeError(
                f"to_numpy() needs an unbatched tensor, got batch shape {self.batch_shape}; "
                "use to_list() or to_padded()"
            )
        return self.to_list()

    def to_padded(self, width: int | Sequence[int] | None = None) -> jax.Array:
        """Data zero-padded (or cropped) to ``width`` per variable axis.

        ``width=None`` pads to the largest length per axis in the batch (pad-to-max).
        Cropping below a logical length raises ``LengthError``.
        """
        lengths = np.asarray(self.lengths).reshape(-1, self.rank)
        maxlen = lengths.max(axis=0) if lengths.size else np.zeros(self.rank, np.int64)
        if width is None:
            width = tuple(int(m) for m in maxlen)
        elif isinstance(width, (int, np.integer)):
            width = (int(width),) * self.rank
        width = tuple(int(w) for w in width)
        if len(width) != self.rank:
            raise ShapeError(f"width {width} has {len(width)} axes, tensor rank is {self.rank}")
        for ax, (w, m) in enumerate(zip(width, maxlen)):
            if w < m:
                raise LengthError(f"width {w} on variable axis {ax} would crop length {m}")
        return resize_capacity(self.data, self.batch_ndim, self.capacity, width)

    def to_dlpack(self) -> tuple[jax.Array, jax.Array]:
        """``(data, lengths)``, both DLPack producers (zero-copy on CPU and GPU)."""
        return self.data, self.lengths

    def __getitem__(self, index) -> VarTensor:
        """Index the batch axes only: ``x[i]`` is item ``i`` (or a sub-batch)."""
        if self.batch_ndim == 0:
            raise ShapeError("cannot index an unbatched VarTensor; use to_numpy()")
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > self.batch_ndim or any(i is Ellipsis or i is None for i in index):
            raise ShapeError(
                f"index {index} must address at most the {self.batch_ndim} batch axes"
            )
        return VarTensor(self.data[index], self.lengths[index], self.model)

    # -- operators -------------------------------------------------------------------
    def __add__(self, other):
        from vsla_jax.ops import add

        return add(self, other)

    def __sub__(self, other):
        from vsla_jax.ops import sub

        return sub(self, other)

    def __neg__(self):
        from vsla_jax.ops import neg

        return neg(self)

    def __mul__(self, other):
        from vsla_jax.ops import multiply, scale

        if isinstance(other, VarTensor):
            return multiply(self, other)
        return scale(self, other)

    def __rmul__(self, other):
        from vsla_jax.ops import scale

        return scale(self, other)


# -- helpers shared by ops --------------------------------------------------------------
def extent_mask(lengths: jax.Array, capacity: Sequence[int]) -> jax.Array:
    """Boolean ``[*batch, *capacity]`` mask of positions below ``lengths[..., k]``."""
    rank = len(capacity)
    batch_ndim = lengths.ndim - 1
    mask = None
    for k, cap in enumerate(capacity):
        shape = [1] * rank
        shape[k] = cap
        pos = jnp.arange(cap, dtype=lengths.dtype).reshape(shape)
        lk = lengths[..., k].reshape(lengths.shape[:batch_ndim] + (1,) * rank)
        m = pos < lk
        mask = m if mask is None else mask & m
    if mask is None:  # rank 0
        return jnp.ones(lengths.shape[:batch_ndim], bool)
    return mask


def expand_mask(mask: jax.Array, n_features: int) -> jax.Array:
    return mask.reshape(mask.shape + (1,) * n_features)


@jax.jit
def zero_slack(x: VarTensor) -> VarTensor:
    """Re-impose the zero-slack invariant; also masks gradients flowing back."""
    m = expand_mask(x.mask(), len(x.features))
    return dataclasses.replace(x, data=jnp.where(m, x.data, jnp.zeros((), x.dtype)))


def resize_capacity(
    data: jax.Array, batch_ndim: int, capacity: Sequence[int], new_capacity: Sequence[int]
) -> jax.Array:
    """Zero-pad or crop the variable axes of ``data`` to ``new_capacity``."""
    pads = [(0, 0)] * data.ndim
    idx = [slice(None)] * data.ndim
    for k, (c, n) in enumerate(zip(capacity, new_capacity)):
        if n > c:
            pads[batch_ndim + k] = (0, n - c)
        elif n < c:
            idx[batch_ndim + k] = slice(0, n)
    data = data[tuple(idx)]
    if any(p != (0, 0) for p in pads):
        data = jnp.pad(data, pads)
    return data


def check_model(model: str) -> str:
    if model not in MODELS:
        raise ModelMismatchError(f"model must be 'A' or 'B', got {model!r}")
    return model


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_numeric(arr, what: str):
    dt = np.dtype(arr.dtype)
    if not (np.issubdtype(dt, np.number) or np.issubdtype(dt, np.bool_)):
        raise VSLATypeError(f"{what} must be numeric, got dtype {dt}")


def _to_nested(data: np.ndarray, lengths: np.ndarray, batch_ndim: int):
    if batch_ndim == 1 and lengths.shape[-1] == 1:  # the common ragged 1-D batch
        return [data[i, :n] for i, n in enumerate(lengths[:, 0].tolist())]
    if batch_ndim == 0:
        return data[tuple(slice(0, int(n)) for n in lengths)]
    return [_to_nested(data[i], lengths[i], batch_ndim - 1) for i in range(data.shape[0])]


def _as_array(values, what: str) -> np.ndarray | jax.Array:
    if isinstance(values, np.ndarray) and values.dtype.kind in "biuf":
        return values  # fast path: already a numeric NumPy array
    if isinstance(values, jax.Array):
        arr = values
    else:
        try:
            arr = np.asarray(values)
        except ValueError as e:  # ragged nested lists
            raise ShapeError(f"{what} is ragged: {e}") from None
        if arr.dtype == object:
            raise ShapeError(f"{what} is ragged or holds non-numeric objects")
    _check_numeric(arr, what)
    return arr


def _default_float(arr):
    dt = np.dtype(arr.dtype)
    if np.issubdtype(dt, np.floating) or np.issubdtype(dt, np.complexfloating):
        return arr
    if np.issubdtype(dt, np.integer) or dt == np.bool_:
        return arr.astype(jnp.result_type(float))
    return arr


# -- constructors -------------------------------------------------------------------
def tensor(
    values,
    model: str = "A",
    policy: CapacityPolicy | None = None,
    rank: int | None = None,
    dtype=None,
) -> VarTensor:
    """One variable-shape tensor from a (nested) list or array.

    Args:
      values: array-like; its shape is the logical shape.
      model: ``"A"`` or ``"B"``.
      policy: capacity ladder (default ``CapacityPolicy()``).
      rank: number of leading variable axes; trailing axes are dense features.
        Defaults to ``values.ndim``.
      dtype: storage dtype; integer input defaults to the default float dtype.

    Returns:
      An unbatched ``VarTensor`` (``lengths.shape == (rank,)``).
    """
    return stack([values], model=model, policy=policy, rank=rank, dtype=dtype)[0]


def stack(
    items: Sequence[Any],
    policy: CapacityPolicy | None = None,
    model: str | None = None,
    rank: int | None = None,
    dtype=None,
) -> VarTensor:
    """Ragged items (arrays, lists or unbatched VarTensors of equal rank) -> a batch.

    The result has batch shape ``(k,)``; per-item lengths are kept and the shared
    capacity is the policy bucket of the per-axis maximum length. ``stack([])`` is a
    batch of zero items (``rank`` defaults to 1).
    """
    policy = policy or DEFAULT_POLICY
    arrays, lengths, feats, models = [], [], None, set()
    item_rank = rank
    for i, it in enumerate(items):
        if isinstance(it, VarTensor):
            if it.batch_ndim:
                raise ShapeError(f"item {i} is a batch {it.batch_shape}; stack unbatched items")
            models.add(it.model)
            if item_rank is None:
                item_rank = it.rank
            if it.rank != item_rank:
                raise ShapeError(f"item {i} has rank {it.rank}, expected {item_rank}")
            arr = it.to_numpy()
            f = it.features
        else:
            arr = _as_array(it, f"item {i}")
            if item_rank is None:
                item_rank = arr.ndim
            if arr.ndim < item_rank:
                raise ShapeError(
                    f"ragged ranks: item {i} has {arr.ndim} axes, expected rank {item_rank}"
                )
            if rank is None and arr.ndim != item_rank:
                raise ShapeError(
                    f"ragged ranks: item {i} has rank {arr.ndim}, item 0 has rank {item_rank}"
                )
            f = tuple(arr.shape[item_rank:])
        if feats is None:
            feats = f
        elif f != feats:
            raise ShapeError(f"item {i} has feature shape {f}, item 0 has {feats}")
        arrays.append(arr)
        lengths.append(arr.shape[:item_rank])
    if len(models) > 1:
        raise ModelMismatchError(f"cannot stack items of different models {sorted(models)}")
    model = check_model(model or (models.pop() if models else "A"))
    item_rank = 1 if item_rank is None else item_rank
    feats = feats or ()
    k = len(arrays)
    len_arr = np.asarray(lengths, np.int32).reshape(k, item_rank)
    maxlen = len_arr.max(axis=0) if k else np.zeros(item_rank, np.int32)
    cap = policy.capacity(maxlen)
    if dtype is None:
        dtype = jnp.result_type(*[_default_float(np.asarray(a[:0])) for a in arrays]) if k else (
            jnp.result_type(float)
        )
    out = np.zeros((k, *cap, *feats), dtype=dtype)
    for i, a in enumerate(arrays):
        out[(i, *(slice(0, n) for n in a.shape[:item_rank]))] = np.asarray(a)
    return VarTensor(jax.device_put(out), jax.device_put(len_arr), model)


def from_padded(
    data,
    lengths,
    model: str = "A",
    rank: int | None = None,
    trust_zero_slack: bool = False,
) -> VarTensor:
    """Wrap a padded array ``[*batch, *capacity, *features]`` and its lengths.

    ``lengths`` is ``[*batch, rank]``; with ``rank=1`` a plain ``[*batch]`` vector is
    accepted too. The slack is zeroed unless ``trust_zero_slack`` (a zero-copy wrap for
    data that already satisfies the invariant). Concrete lengths are validated;
    traced lengths are trusted.
    """
    model = check_model(model)
    if not isinstance(data, jax.Array):
        data = _as_array(data, "data")
    else:
        _check_numeric(data, "data")
    data = _default_float(data)
    data = data if isinstance(data, jax.Array) else jax.device_put(data)
    traced = not _is_concrete(lengths)
    lengths = lengths if traced or isinstance(lengths, jax.Array) else np.asarray(lengths)
    if not np.issubdtype(np.dtype(lengths.dtype), np.integer):
        raise VSLATypeError(f"lengths must be integers, got dtype {lengths.dtype}")
    if rank is None:
        if lengths.ndim == 0:
            raise LengthError("lengths must be [*batch, rank]; got a scalar (pass rank=1)")
        rank = lengths.shape[-1]
    elif lengths.ndim == 0 or lengths.shape[-1] != rank:
        if rank != 1:
            raise LengthError(f"lengths shape {lengths.shape} does not end in rank {rank}")
        lengths = lengths[..., None]
    batch = lengths.shape[:-1]
    nb = len(batch)
    if data.ndim < nb + rank:
        raise ShapeError(
            f"data has {data.ndim} axes, fewer than batch ({nb}) + rank ({rank})"
        )
    if tuple(data.shape[:nb]) != tuple(batch):
        raise ShapeError(f"data batch shape {data.shape[:nb]} != lengths batch shape {batch}")
    cap = data.shape[nb : nb + rank]
    if not traced:
        ln = np.asarray(lengths)
        if (ln < 0).any():
            raise LengthError(f"negative lengths: min is {ln.min()}")
        over = ln > np.asarray(cap, np.int64)
        if over.any():
            ax = int(np.argwhere(over)[0][-1])
            raise LengthError(
                f"lengths exceed capacity on variable axis {ax}: max length "
                f"{ln[..., ax].max()} > capacity {cap[ax]}"
            )
        lengths = jax.device_put(ln.astype(np.int32, copy=False))
    else:
        lengths = lengths.astype(jnp.int32)
    x = VarTensor(data, lengths, model)
    return x if trust_zero_slack else zero_slack(x)


def from_dlpack(data, lengths, model: str = "A", rank: int | None = None,
                trust_zero_slack: bool = False) -> VarTensor:
    """Wrap any DLPack producer (NumPy, torch, CuPy, JAX) without copying when possible.

    With ``trust_zero_slack=True`` the buffer is aliased, not copied, when the producer
    allows it (on CPU: contiguous, writable, 64-byte aligned); other buffers are copied
    once.
    """
    try:
        arr = jax.dlpack.from_dlpack(data)
    except (BufferError, RuntimeError, TypeError):
        # read-only, strided or otherwise non-exportable buffers: one host copy
        arr = jax.device_put(np.ascontiguousarray(np.asarray(data)))
    return from_padded(arr, lengths, model=model, rank=rank, trust_zero_slack=trust_zero_slack)

