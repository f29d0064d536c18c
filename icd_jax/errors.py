"""Typed errors raised by icd_jax; each message names the offending input."""

from __future__ import annotations


class ICDError(Exception):
    """Base class of every icd_jax error."""


class ConfigError(ICDError, ValueError):
    """Unknown or invalid configuration keys and values."""


class GraphError(ICDError, ValueError):
    """A co-access matrix that is not symmetric, non-negative and finite."""


class TraceError(ICDError, ValueError):
    """A corrupt trace file; ``problems`` lists ``(line_number, message)`` pairs."""

    def __init__(self, message: str, problems: list[tuple[int, str]] | None = None):
        super().__init__(message)
        self.problems = problems or []


class PermutationError(ICDError, ValueError):
    """An array that is not a permutation of ``range(D)``."""
