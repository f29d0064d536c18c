"""Typed errors raised by stablehlo_bridge; each message names the offending input.

``BridgeError`` is the common base. Where a bridge error is one of ``icd_jax``'s concepts
it is also that ``icd_jax.errors`` class, so one ``except`` catches both packages':
``OrderError`` is an ``icd_jax.errors.PermutationError`` (an order that is not a
permutation, or names no axis of the spec) and ``ArtifactError`` an
``icd_jax.errors.ArtifactError``.
"""

from __future__ import annotations

from icd_jax import errors as icd_errors


class BridgeError(Exception):
    """Base class of every stablehlo_bridge error."""


class SpecError(BridgeError, ValueError):
    """A permutation spec or export input that does not fit the model: an unknown
    parameter path, an axis out of range, an order of the wrong length, an export
    case or factory that cannot be built."""


class OrderError(SpecError, icd_errors.PermutationError):
    """An order of a permutation spec that is not a permutation of ``range(n)``, or an
    axis name the ``ModelSpec`` does not have (``icd_jax.permute.check_perms``)."""


class TagError(BridgeError, ValueError):
    """An ``icd.*`` tag that is malformed or inconsistent with what it annotates (the
    message names the tag and where it sits)."""


class ModuleError(BridgeError, ValueError):
    """A module that fails MLIR verification, has no public entry function, or holds
    something a pass cannot rewrite (a constant of an unsupported dtype)."""


class ArtifactError(BridgeError, icd_errors.ArtifactError):
    """An artefact that cannot be trusted: a checksum mismatch (tampered or truncated
    file), bytes that do not deserialise, a file that is no artefact, or tags lost on
    the way. Also an ``icd_jax.errors.ArtifactError``."""


class BackendError(BridgeError, RuntimeError):
    """A downstream compiler or runtime (IREE) that is missing or failed."""
