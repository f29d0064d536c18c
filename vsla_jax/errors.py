"""Typed errors raised by vsla_jax. Every message names the offending input."""

from __future__ import annotations


class VSLAError(Exception):
    """Base class of every error raised by vsla_jax."""


class ShapeError(VSLAError, ValueError):
    """Ranks, batch shapes or feature shapes that do not fit together (the base of every
    shape error: ``icd_jax.errors.ShapeError`` subclasses it)."""


class LengthError(VSLAError, ValueError):
    """Logical lengths that are negative, over capacity or of the wrong shape."""


class ModelMismatchError(VSLAError, ValueError):
    """Operands from different semirings (Model A and Model B) were combined."""


class PolicyError(VSLAError, ValueError):
    """A ``CapacityPolicy`` whose settings cannot make a ladder (or keep its ratio)."""


class VSLATypeError(VSLAError, TypeError):
    """Non-numeric data, or a dtype the operation does not support."""


class KernelFallbackWarning(UserWarning):
    """The C++ CPU kernels could not be used (missing or stale build); the XLA path ran."""
