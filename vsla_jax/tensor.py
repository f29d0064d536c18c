"""The variable-shape tensor: a capacity-padded array plus per-item logical lengths."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vsla_jax.errors import LengthError, ModelMismatchError, ShapeError, VSLATypeError
from vsla_jax.util import as_array, default_float, is_traced

MODELS = ("A", "B")


@dataclasses.dataclass(frozen=True, eq=False)  # == is identity (arrays have no truth)
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

    def __post_init__(self):
        """Validate a directly built tensor whenever its lengths are concrete.

        Lists and NumPy arrays become JAX arrays (lengths int32; NumPy lengths stay
        known on the host, ``host_lengths``, also inside ``jit``). Traced lengths are
        trusted. JAX's own pytree unflattening bypasses this check.
        """
        data, lengths = self.data, self.lengths
        for name, value in (("data", data), ("lengths", lengths)):
            if isinstance(value, (str, bytes)):
                raise VSLATypeError(f"VarTensor {name} must be an array, got "
                                    f"{type(value).__name__} {value!r:.40}")
        if isinstance(lengths, (list, tuple, np.ndarray, int, np.integer)):
            lengths = np.asarray(lengths)
            if lengths.size and not np.issubdtype(lengths.dtype, np.integer):
                raise VSLATypeError(f"VarTensor lengths must be integers, got dtype "
                                    f"{lengths.dtype}")
            check_int32(lengths, "VarTensor")
            lengths = host = lengths.astype(np.int32)  # a copy: kept as host_lengths
            host.setflags(write=False)
            self.__dict__["_host_lengths"] = host  # concrete even when built under jit
        elif getattr(lengths, "dtype", jnp.int32) != jnp.int32:  # int8 would wrap at 127
            if not jnp.issubdtype(lengths.dtype, jnp.integer):
                raise VSLATypeError(f"VarTensor lengths must be integers, got {lengths.dtype}")
            if not is_traced(lengths):
                check_int32(np.asarray(lengths), "VarTensor")
            lengths = lengths.astype(jnp.int32)
        if isinstance(data, (list, tuple, np.ndarray)):
            data = default_float(as_array(data, "VarTensor data"))
        if isinstance(data, np.ndarray):
            data = jax.device_put(data)
        object.__setattr__(self, "lengths", jax.device_put(lengths) if isinstance(
            lengths, np.ndarray) else lengths)
        object.__setattr__(self, "data", data)
        check_model(self.model)
        if hasattr(data, "shape") and hasattr(lengths, "shape"):
            validate_lengths(data.shape, lengths, "VarTensor")
            object.__setattr__(self, "_checked", not (
                is_traced(lengths) or isinstance(lengths, jax.ShapeDtypeStruct))
                or "_host_lengths" in self.__dict__)

    @classmethod
    def trusted(cls, data, lengths, model: str = "A", checked: bool = False,
                host_lengths: np.ndarray | None = None) -> VarTensor:
        """Build without validation (library code whose lengths are valid by construction).

        ``checked=True`` records that concrete lengths are known to lie in
        ``[0, capacity]`` (see ``lengths_checked``). ``host_lengths``: a NumPy copy of
        ``lengths`` the caller already holds (see ``host_lengths``); it must equal them.
        """
        out = object.__new__(cls)
        out.__dict__.update(data=data, lengths=lengths, model=model, _checked=checked)
        if host_lengths is not None:
            host_lengths.setflags(write=False)
            out.__dict__["_host_lengths"] = host_lengths
        return out

    # -- static metadata -------------------------------------------------------------
    @property
    def lengths_checked(self) -> bool:
        """Whether concrete lengths were checked against the capacity when this tensor was
        built (the constructor, ``stack``), so consumers may skip their own host check.
        False for traced lengths, ``trusted`` tensors and pytree-unflattened ones
        (``jax.tree.map`` may have changed the lengths)."""
        return self.__dict__.get("_checked", False)

    def derived(self, key: str, fn):
        """``fn(self)``, computed once per tensor and kept under ``key`` (a VarTensor is
        immutable): for facts its consumers derive from its shapes and host lengths on
        every call (attention's layout), so that small calls pay for them once."""
        memo = self.__dict__.setdefault("_derived", {})
        if key not in memo:
            memo[key] = fn(self)
        return memo[key]

    @property
    def host_lengths(self) -> np.ndarray | None:
        """The lengths as a read-only NumPy ``[*batch, rank]`` array (None when traced),
        read once and kept: a VarTensor is immutable (``vs.stack`` hands its copy over)."""
        host = self.__dict__.get("_host_lengths")
        if host is None and not (is_traced(self.lengths)
                                 or isinstance(self.lengths, jax.ShapeDtypeStruct)):
            host = np.array(self.lengths, copy=isinstance(self.lengths, np.ndarray) or None)
            host.setflags(write=False)
            self.__dict__["_host_lengths"] = host
        return host

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
        lengths = self.host_lengths
        if is_traced(self.data) or lengths is None:
            raise VSLATypeError("to_list()/to_numpy() give exact-shape NumPy arrays, which a "
                                "traced VarTensor (inside jit, grad or vmap) cannot have: "
                                "return the VarTensor from the transformed function, or "
                                "use to_padded(capacity) inside it")
        return _to_nested(np.asarray(self.data), lengths, self.batch_ndim)

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

        ``width=None`` pads to the largest length per axis in the batch (pad-to-max),
        which needs concrete lengths. Cropping below a concrete logical length raises
        ``LengthError``; traced lengths (under ``jit``) cannot be checked. Entries at or
        past each item's length are zero, whatever the slack held.
        """
        lengths = self.host_lengths
        if width is None and lengths is None:
            raise ShapeError(
                "to_padded() without a width pads to the largest length, which needs "
                "concrete lengths; under jit the lengths are traced, so pass a static "
                f"width (the capacity is {self.capacity})")
        width = _padded_width(width, self.rank, lengths)
        # masked always: a VarTensor built directly, or mapped by jax.tree.map, may hold
        # anything in its slack (the ops mask it the same way)
        data = _zeroed_past(self.data, self.lengths, self.batch_ndim, self.rank)
        return resize_capacity(data, self.batch_ndim, self.capacity, width)

    def to_dlpack(self) -> tuple[jax.Array, jax.Array]:
        """``(data, lengths)``, both DLPack producers (zero-copy on CPU and GPU)."""
        return self.data, self.lengths

    # NumPy on the left (``np.array([1., 2.]) * x``, ``np.float64(2) * x``) defers to
    # VarTensor's own operators instead of broadcasting over it as an object
    __array_ufunc__ = None

    def __array__(self, dtype=None, copy=None):
        raise VSLATypeError(
            f"a VarTensor (batch {self.batch_shape}, rank {self.rank}) is not an array: "
            "use .to_numpy(), .to_list() or .to_padded() (or .data for the padded buffer)")

    def __len__(self) -> int:
        """Number of items along the leading batch axis."""
        if self.batch_ndim == 0:
            raise TypeError("len() of an unbatched VarTensor (it is one item)")
        return self.lengths.shape[0]

    def __iter__(self):
        """Items (or sub-batches) along the leading batch axis."""
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, index) -> VarTensor:
        """Index the batch axes only: ``x[i]`` is item ``i`` (or a sub-batch).

        Integer indices out of range raise ``IndexError`` (Python semantics, not JAX's
        clamping), so iteration and ``list(batch)`` stop at the end of the batch.
        """
        if self.batch_ndim == 0:
            raise ShapeError("cannot index an unbatched VarTensor; use to_numpy()")
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > self.batch_ndim or any(i is Ellipsis or i is None for i in index):
            raise ShapeError(
                f"index {index} must address at most the {self.batch_ndim} batch axes"
            )
        index = tuple(_check_batch_index(i, ax, self.batch_shape[ax])
                      for ax, i in enumerate(index))
        host = self.__dict__.get("_host_lengths")
        if host is not None and not any(is_traced(i) for i in index):
            host = np.asarray(host[tuple(np.asarray(i) if isinstance(i, jax.Array) else i
                                         for i in index)])
        else:
            host = None
        return VarTensor.trusted(self.data[index], self.lengths[index], self.model,
                                 checked=self.lengths_checked,
                                 host_lengths=host)

    # ``+``, ``-``, unary ``-`` and ``*`` are attached by ``vsla_jax.ops`` (which
    # depends on this module, not the other way round).


def _flatten_with_keys(x: VarTensor):
    return ((jax.tree_util.GetAttrKey("data"), x.data),
            (jax.tree_util.GetAttrKey("lengths"), x.lengths)), x.model


def _unflatten(model, children) -> VarTensor:
    return VarTensor.trusted(children[0], children[1], model)


jax.tree_util.register_pytree_with_keys(
    VarTensor, _flatten_with_keys, _unflatten,
    flatten_func=lambda x: ((x.data, x.lengths), x.model))
# functions taking or returning VarTensors serialize with jax.export (auxdata: the model)
jax.export.register_pytree_node_serialization(
    VarTensor, serialized_name="vsla_jax.VarTensor",
    serialize_auxdata=lambda model: model.encode(),
    deserialize_auxdata=lambda raw: raw.decode())


def validate_lengths(data_shape, lengths, who: str) -> None:
    """Check concrete ``lengths`` against ``data_shape``; traced lengths are trusted.

    Raises ``LengthError`` for a wrong rank axis, negative or over-capacity lengths and
    ``ShapeError`` for batch shapes that disagree, naming the first offending item.
    """
    if lengths.ndim < 1:
        raise LengthError(f"{who}: lengths must be [*batch, rank], got a scalar")
    nb, rank = lengths.ndim - 1, lengths.shape[-1]
    if len(data_shape) < nb + rank:
        raise ShapeError(f"{who}: data has {len(data_shape)} axes, fewer than batch ({nb}) + "
                         f"rank ({rank})")
    if tuple(data_shape[:nb]) != tuple(lengths.shape[:-1]):
        raise ShapeError(f"{who}: data batch shape {tuple(data_shape[:nb])} != lengths batch "
                         f"shape {tuple(lengths.shape[:-1])}")
    if is_traced(lengths) or isinstance(lengths, jax.ShapeDtypeStruct):
        return  # trusted: traced, or abstract (jax.eval_shape / export specs)
    ln = np.asarray(lengths)
    if not np.issubdtype(ln.dtype, np.integer):
        raise VSLATypeError(f"{who}: lengths must be integers, got dtype {ln.dtype}")
    if not ln.size:
        return
    cap = np.asarray(data_shape[nb : nb + rank], np.int64)
    if (ln < 0).any():
        item = tuple(int(i) for i in np.argwhere(ln < 0)[0])
        raise LengthError(f"{who}: negative lengths: min is {ln.min()} (at {item})")
    over = ln > cap
    if over.any():
        item = tuple(int(i) for i in np.argwhere(over)[0])
        ax = item[-1]
        raise LengthError(
            f"{who}: lengths exceed capacity on variable axis {ax}: max length "
            f"{ln[..., ax].max()} > capacity {cap[ax]} (first at {item})")


INT32_MAX = np.iinfo(np.int32).max


def check_int32(lengths: np.ndarray, who: str) -> None:
    """Raise ``LengthError`` naming the first integer length that int32 cannot hold
    (casting would silently wrap it: ``2**32 + 5`` would become 5)."""
    if not lengths.size or lengths.dtype.itemsize < 4 or lengths.dtype == np.int32:
        return
    bad = (lengths > INT32_MAX) | (lengths < np.iinfo(np.int32).min)
    if bad.any():
        item = tuple(int(i) for i in np.argwhere(bad)[0])
        raise LengthError(f"{who}: length {int(lengths[item])} (at {item}) does not fit "
                          f"int32 (max {INT32_MAX})")


def _check_batch_index(i, ax: int, n: int):
    """One batch-axis index, checked like NumPy: an integer (or integer list/array) out
    of ``[-n, n)`` raises ``IndexError`` naming it and the axis size (JAX would clamp
    it). Lists become arrays; traced indices are trusted."""
    if isinstance(i, bool) or is_traced(i):
        return i
    if isinstance(i, (int, np.integer)):
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for batch axis {ax} of size {n}")
        return i
    if isinstance(i, (list, np.ndarray, jax.Array)):
        arr = np.asarray(i)
        if arr.dtype.kind in "iu" and arr.size:
            bad = (arr < -n) | (arr >= n)
            if bad.any():
                where = f" in {arr.tolist()}" if arr.ndim else ""
                raise IndexError(f"index {int(arr[bad][0])}{where} is out of range for "
                                 f"batch axis {ax} of size {n}")
        if arr.dtype.kind not in "iub" and not (isinstance(i, list) and not arr.size):
            raise VSLATypeError(f"batch index {i!r} must hold integers or booleans, got "
                                f"dtype {arr.dtype}")
        if isinstance(i, list):
            return arr if arr.size else np.zeros(0, np.intp)
        return i
    if not isinstance(i, slice):
        raise VSLATypeError(f"batch index {i!r} of type {type(i).__name__} is not an "
                            "integer, slice, or integer/boolean array")
    return i


def _padded_width(width, rank: int, lengths: np.ndarray | None) -> tuple[int, ...]:
    """``to_padded``'s width as one int per variable axis, checked against the concrete
    ``lengths`` (None when traced: nothing to check)."""
    if lengths is not None:
        lengths = lengths.reshape(-1, rank)
        maxlen = lengths.max(axis=0) if lengths.size else np.zeros(rank, np.int64)
    if width is None:
        width = tuple(int(m) for m in maxlen)
    elif isinstance(width, (int, np.integer)) and not isinstance(width, bool):
        width = (int(width),) * rank
    elif not isinstance(width, (list, tuple)) or not all(
            isinstance(w, (int, np.integer)) and not isinstance(w, bool) for w in width):
        raise VSLATypeError(f"to_padded width must be an int or a sequence of ints "
                            f"(one per variable axis), got {width!r}")
    width = tuple(int(w) for w in width)
    if any(w < 0 for w in width):
        raise LengthError(f"to_padded width must be non-negative, got {width}")
    if len(width) != rank:
        raise ShapeError(f"width {width} has {len(width)} axes, tensor rank is {rank}")
    if lengths is not None:
        for ax, (w, m) in enumerate(zip(width, maxlen)):
            if w < m:
                raise LengthError(f"width {w} on variable axis {ax} would crop length {m}")
    return width


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


def zero_slack(x: VarTensor) -> VarTensor:
    """Re-impose the zero-slack invariant; also masks gradients flowing back. The lengths
    (and their host copy) are kept."""
    data = _zeroed_past(x.data, x.lengths, x.batch_ndim, x.rank)
    return VarTensor.trusted(data, x.lengths, x.model, x.lengths_checked, x.host_lengths)


def zeroed_past(data: jax.Array, lengths: jax.Array, batch_ndim: int, rank: int):
    """``data [*batch, *capacity, *features]`` with every entry past ``lengths [*batch,
    rank]`` set to zero: NaN or inf there cannot reach a result through ``0 * x``."""
    capacity = data.shape[batch_ndim:batch_ndim + rank]
    m = expand_mask(extent_mask(lengths, capacity), data.ndim - batch_ndim - rank)
    return jnp.where(m, data, jnp.zeros((), data.dtype))


_zeroed_past = jax.jit(zeroed_past, static_argnums=(2, 3))


def rows_within(x: jax.Array, lengths: jax.Array) -> jax.Array:
    """``zeroed_past`` of rank-1 items ``x [n, C, ...]`` with lengths ``[n]`` (or
    ``[n, 1]``): rows ``>= lengths[i]`` of item ``i`` set to zero."""
    return zeroed_past(x, lengths.reshape(-1, 1), 1, 1)


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


def _to_nested(data: np.ndarray, lengths: np.ndarray, batch_ndim: int):
    if batch_ndim == 1 and lengths.shape[-1] == 1:  # the common ragged 1-D batch
        return [data[i, :n] for i, n in enumerate(lengths[:, 0].tolist())]
    if batch_ndim == 0:
        return data[tuple(slice(0, int(n)) for n in lengths)]
    return [_to_nested(data[i], lengths[i], batch_ndim - 1) for i in range(data.shape[0])]


# -- operand checks shared by the ops ---------------------------------------------------
def require(x, name: str, op: str = "") -> VarTensor:
    """``x`` if it is a VarTensor, else a ``VSLATypeError`` that says how to make one."""
    if isinstance(x, VarTensor):
        return x
    where = f"{op}: " if op else ""
    kind = "a traced JAX array" if is_traced(x) else type(x).__name__
    raise VSLATypeError(
        f"{where}{name} must be a VarTensor, got {kind}; wrap a dense array with "
        "vs.tensor(x) (one item) or vs.stack([...]) (a batch). Scalars are not VSLA "
        "operands (use vs.scale for a scalar multiple).")


def check_pair(a, b, op: str) -> tuple[VarTensor, VarTensor]:
    """Both operands VarTensors of one model, equal rank, features and broadcastable batch."""
    a, b = require(a, "a", op), require(b, "b", op)
    if a.model != b.model:
        raise ModelMismatchError(f"{op}: operands use models {a.model!r} and {b.model!r}")
    check_pair_shapes(a.lengths.shape, a.data.shape, b.lengths.shape, b.data.shape, op)
    return a, b


@functools.lru_cache(maxsize=1024)
def check_pair_shapes(lengths_a: tuple, data_a: tuple, lengths_b: tuple, data_b: tuple,
                      op: str) -> None:
    """``check_pair``'s shape rules on ``(lengths.shape, data.shape)`` of each operand
    (cached per signature: every binary op runs it, on small batches it is the hot path)."""
    (*batch_a, rank_a), (*batch_b, rank_b) = lengths_a, lengths_b
    if rank_a != rank_b:
        raise ShapeError(f"{op}: ranks differ ({rank_a} vs {rank_b})")
    try:
        jnp.broadcast_shapes(tuple(batch_a), tuple(batch_b))
    except ValueError:
        raise ShapeError(f"{op}: batch shapes {tuple(batch_a)} and {tuple(batch_b)} do not "
                         "broadcast") from None
    feats_a, feats_b = data_a[len(batch_a) + rank_a:], data_b[len(batch_b) + rank_b:]
    if feats_a != feats_b:
        raise ShapeError(f"{op}: feature shapes differ ({feats_a} vs {feats_b})")


def align_batch(x: VarTensor, nb: int) -> tuple[jax.Array, jax.Array]:
    """Data and lengths with ``nb`` batch axes (leading size-1 axes added)."""
    extra = nb - x.batch_ndim
    data = x.data.reshape((1,) * extra + x.data.shape)
    lengths = x.lengths.reshape((1,) * extra + x.lengths.shape)
    return data, lengths


def broadcast_operands(a: VarTensor, b: VarTensor):
    """``(batch, da, la, db, lb)``: zero-slack data and lengths broadcast to one batch."""
    nb = max(a.batch_ndim, b.batch_ndim)
    batch = tuple(jnp.broadcast_shapes(a.batch_shape, b.batch_shape))
    da, la = align_batch(zero_slack(a), nb)
    db, lb = align_batch(zero_slack(b), nb)
    da = jnp.broadcast_to(da, batch + da.shape[nb:])
    db = jnp.broadcast_to(db, batch + db.shape[nb:])
    la = jnp.broadcast_to(la, batch + (a.rank,))
    lb = jnp.broadcast_to(lb, batch + (b.rank,))
    return batch, da, la, db, lb


# -- constructors -------------------------------------------------------------------
def check_rank(rank, ndim: int | None, what: str) -> None:
    if rank is None:
        return
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 1:
        raise ShapeError(f"rank must be a positive integer (the number of variable axes), "
                         f"got {rank!r}")
    if ndim is not None and rank > ndim:
        raise ShapeError(f"rank={rank} exceeds the {ndim} axes of {what}")


def from_padded(
    data,
    lengths,
    model: str = "A",
    rank: int | None = None,
    trust_zero_slack: bool = False,
) -> VarTensor:
    """Wrap a padded array ``[*batch, *capacity, *features]`` and its lengths.

    ``lengths`` is ``[*batch, rank]``; with ``rank=1`` a plain ``[*batch]`` array is
    accepted too (lengths whose last axis is already 1 are read as ``[*batch, 1]``,
    as without ``rank``). A 1-D ``lengths`` whose size equals ``data.shape[0]`` of a data array
    with two or more axes is ambiguous (a batch of rank-1 items, or one item of rank
    ``len(lengths)``) and needs ``rank``. The slack is zeroed unless
    ``trust_zero_slack`` (a zero-copy wrap for data that already satisfies the
    invariant). Concrete lengths are validated; traced lengths (and data) are allowed.
    """
    model = check_model(model)
    check_rank(rank, None, "")
    data = as_array(data, "data")
    data = default_float(data)
    data = data if isinstance(data, (jax.Array, jax.core.Tracer)) else jax.device_put(data)
    traced = is_traced(lengths)
    lengths = lengths if traced or isinstance(lengths, jax.Array) else np.asarray(lengths)
    if not np.issubdtype(np.dtype(lengths.dtype), np.integer):
        raise VSLATypeError(f"lengths must be integers, got dtype {lengths.dtype}")
    if rank is None:
        if lengths.ndim == 0:
            raise LengthError("lengths must be [*batch, rank]; got a scalar (pass rank=1)")
        if lengths.ndim == 1 and data.ndim >= 2 and lengths.shape[0] == data.shape[0]:
            raise ShapeError(
                f"ambiguous lengths of shape {lengths.shape} for data of shape {data.shape}: "
                f"pass rank=1 for a batch of {lengths.shape[0]} rank-1 items, or "
                f"lengths of shape (1, {lengths.shape[0]})... with rank={lengths.shape[0]} "
                "for one item")
        rank = lengths.shape[-1]
    elif lengths.ndim == 0 or lengths.shape[-1] != rank or (
            rank == 1 and lengths.ndim == 1 and data.ndim > 1
            and lengths.shape[0] == data.shape[0]):  # [B] lengths of B rank-1 items
        if rank != 1:
            raise LengthError(f"lengths shape {lengths.shape} does not end in rank {rank}")
        lengths = lengths[..., None]
    if not traced and not isinstance(lengths, jax.Array):
        check_int32(lengths, "from_padded")
    validate_lengths(data.shape, lengths, "from_padded")
    host = None
    if not traced:  # a host copy, kept (host_lengths): concrete even under jit
        host = np.asarray(lengths).astype(np.int32)
        lengths = jax.device_put(host)
    else:
        lengths = lengths.astype(jnp.int32)
    x = VarTensor.trusted(data, lengths, model, checked=host is not None, host_lengths=host)
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
