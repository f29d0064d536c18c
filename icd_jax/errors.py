"""Typed errors and warnings raised by icd_jax; each message names the offending input."""

from __future__ import annotations

from vsla_jax import errors as vsla_errors


class ICDError(Exception):
    """Base class of every icd_jax error."""


class ConfigError(ICDError, ValueError):
    """Unknown or invalid configuration keys and values."""


class GraphError(ICDError, ValueError):
    """A co-access matrix that is not symmetric, non-negative and finite."""


class WeightError(ICDError, ValueError):
    """A weight matrix (for example the input of an N:M search) with NaN or inf entries."""


class TraceError(ICDError, ValueError):
    """A corrupt trace file; ``problems`` lists ``(line_number, message)`` pairs."""

    def __init__(self, message: str, problems: list[tuple[int, str]] | None = None):
        super().__init__(message)
        self.problems = problems or []


class PermutationError(ICDError, ValueError):
    """An array that is not a permutation of ``range(D)``."""


class ModelError(ICDError, ValueError):
    """Model weights or inputs that do not fit the model: a missing weights package, an
    absent or mis-shaped parameter, token ids out of the vocabulary."""


class TargetError(ConfigError):
    """A user target (``model.target``) that is not importable or breaks the ``Target``
    protocol (the message names the missing or inconsistent piece)."""


class ShapeError(ICDError, vsla_errors.ShapeError):
    """An adapter input of the wrong rank, shape or dtype (the message names it).

    A subclass of ``vsla_jax.ShapeError`` (one hierarchy per concept): ``except
    vsla_jax.ShapeError`` catches the shape errors of both packages."""


class ArtifactError(ICDError, ValueError):
    """A run artefact that is missing, corrupt or of the wrong format (the message names
    the file)."""


class StageError(ICDError, RuntimeError):
    """A pipeline stage that failed; ``stage`` names it."""

    def __init__(self, message: str, stage: str = ""):
        super().__init__(message)
        self.stage = stage


class RunLockedError(ICDError, RuntimeError):
    """Another run holds the lock of the same run directory or cache entry."""


class ICDWarning(UserWarning):
    """Base class of every icd_jax warning."""


class TraceWarning(ICDWarning):
    """Bad trace lines skipped in lenient mode (the message names their line numbers)."""


class DegenerateGraphWarning(ICDWarning):
    """A co-access graph that carries no layout information (empty or near-uniform)."""


class AdapterWarning(ICDWarning):
    """A transform that failed and returned its input unchanged (``meta["ok"] = False``)."""


class MeasureWarning(ICDWarning):
    """A measurement that degraded (for example to wall-clock only); the reason is given."""
