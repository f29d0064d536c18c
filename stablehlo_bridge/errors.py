"""Typed errors raised by stablehlo_bridge; each message names the offending input."""

from __future__ import annotations


class BridgeError(Exception):
    """Base class of every stablehlo_bridge error."""


class SpecError(BridgeError, ValueError):
    """A permutation spec or export input that does not fit the model: an unknown
    parameter path, an axis out of range, an order that is not a permutation."""


class TagError(BridgeError, ValueError):
    """An ``icd.*`` tag that is malformed or inconsistent with what it annotates (the
    message names the tag and where it sits)."""


class ModuleError(BridgeError, ValueError):
    """A module that fails MLIR verification, has no public entry function, or holds
    something a pass cannot rewrite (a constant of an unsupported dtype)."""


class ArtifactError(BridgeError, ValueError):
    """An artefact that cannot be trusted: a checksum mismatch (tampered or truncated
    file), bytes that do not deserialise, or tags lost on the way."""


class BackendError(BridgeError, RuntimeError):
    """A downstream compiler or runtime (IREE) that is missing or failed."""
