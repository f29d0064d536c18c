"""Artefacts on disk and the round trip they must survive.

``export_artifacts(exported, "DIR/model.stablehlo")`` writes these files as one set
(``vsla_jax.util.atomic_write_files``: all are staged as temp files in the folder first,
then renamed into place, so a failed write leaves the previous artefact whole):

- ``model.stablehlo``: the StableHLO portable artefact (VHLO bytecode), tags included;
- ``model.mlir``: its MLIR text (without locations);
- ``model.jax``: ``Exported.serialize()`` (the JAX calling convention), for
  ``load_exported``;
- ``model.json``: the sidecar, written last: format, versions, the entry signature,
  the SHA-256 and size of every file, and every ``icd.*`` tag (``tags.read``), also
  when the module itself was stripped of them (``tags_in_module: false``).

Loading checks each file against the sidecar before deserialising it (a flipped
byte in a weight constant would otherwise load silently, and ``jax.export`` does not
verify its flatbuffer), then checks the tags against the sidecar's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
from jax import export as jax_export
from jaxlib.mlir import ir

from stablehlo_bridge import mlir_io
from stablehlo_bridge import tags as icd_tags
from stablehlo_bridge.errors import ArtifactError, ModuleError
from vsla_jax.util import atomic_write_files

FORMAT = "icd.bridge.artifact.v1"
KINDS = ("stablehlo", "mlir", "jax")
#: The file kinds of an artefact and their suffixes.
SUFFIXES = {"stablehlo": ".stablehlo", "mlir": ".mlir", "jax": ".jax", "sidecar": ".json"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tag_diff(want: dict, got: dict, limit: int = 3) -> str:
    """The sites whose tags differ, for an error message."""
    sites = sorted(set(want) | set(got))
    bad = [s for s in sites if want.get(s) != got.get(s)]
    more = f" (+{len(bad) - limit} more)" if len(bad) > limit else ""
    return ", ".join(f"{s}: {sorted(want.get(s, {}))} -> {sorted(got.get(s, {}))}"
                     for s in bad[:limit]) + more


def roundtrip(exported: jax_export.Exported, target_version: str = "current"
              ) -> jax_export.Exported:
    """``exported`` through ``Exported.serialize`` / ``jax.export.deserialize`` and
    through a StableHLO portable artefact at ``target_version`` (``"current"``,
    ``"minimum"``, ``"week4"``, ``"week12"`` or ``"x.y.z"``); ``ArtifactError`` if any
    ``icd.*`` tag changed on the way. Returns the deserialised ``Exported`` running the
    module read back from the portable artefact."""
    before = icd_tags.read(mlir_io.load(exported))
    try:
        restored = jax_export.deserialize(exported.serialize())
    except Exception as e:
        raise ArtifactError(f"jax.export could not deserialise {exported.fun_name}: {e}") from e
    got = icd_tags.read(mlir_io.load(restored))
    if got != before:
        raise ArtifactError(f"tags changed through jax.export serialize/deserialize: "
                            f"{tag_diff(before, got)}")
    blob = mlir_io.to_portable(mlir_io.load(restored), target_version)
    got = icd_tags.read(mlir_io.from_portable(blob))
    if got != before:
        raise ArtifactError(f"tags changed through a StableHLO "
                            f"{mlir_io.version(target_version)} portable artefact: "
                            f"{tag_diff(before, got)}")
    return dataclasses.replace(restored, mlir_module_serialized=blob)


def paths_for(out_path: str | os.PathLike) -> dict[str, str]:
    """The files of an artefact from any one of them: ``DIR/model.stablehlo`` (or its
    ``.mlir``, ``.jax`` or ``.json``) -> ``{"stablehlo", "mlir", "jax", "sidecar"}``
    paths. Any other name is taken as the portable artefact itself."""
    out = os.fspath(out_path)
    stem, ext = os.path.splitext(out)
    if ext not in SUFFIXES.values():
        return {k: out if k == "stablehlo" else out + v for k, v in SUFFIXES.items()}
    return {k: stem + v for k, v in SUFFIXES.items()}


def describe(avals) -> list[dict[str, Any]]:
    return [{"shape": [str(d) for d in a.shape], "dtype": str(a.dtype)} for a in avals]


def export_artifacts(exported: jax_export.Exported, out_path: str | os.PathLike,
                     tags: dict | None = None, *, target_version: str = "current",
                     large_elements_limit: int | None = None) -> dict[str, str]:
    """Write the artefact files of ``exported`` (see the module docstring).

    Args:
      exported: the (tagged) export.
      out_path: the portable artefact's path, ``DIR/model.stablehlo``.
      tags: the tags for the sidecar; default: every ``icd.*`` tag of the module.
      target_version: StableHLO version of the portable artefact.
      large_elements_limit: elide constants above this many elements in the ``.mlir``
        text (it then no longer parses back); default: print them all.
    Returns:
      ``{"stablehlo", "mlir", "jax", "sidecar"}`` -> path.
    """
    paths = paths_for(out_path)
    module = mlir_io.load(exported)
    held = icd_tags.read(module)
    found = held if tags is None else tags
    if held and held != found:
        raise ArtifactError(f"tags given for the sidecar differ from the module's: "
                            f"{tag_diff(held, found)} (pass tags=None, or strip the module)")
    data = {"stablehlo": mlir_io.to_portable(module, target_version),
            "mlir": mlir_io.text(module, large_elements_limit).encode(),
            "jax": bytes(exported.serialize())}
    sidecar = {
        "format": FORMAT, "schema": icd_tags.SCHEMA,
        "stablehlo_version": mlir_io.version(target_version), "jax_version": jax.__version__,
        "fun_name": exported.fun_name, "platforms": list(exported.platforms),
        "inputs": describe(exported.in_avals), "outputs": describe(exported.out_avals),
        "files": {k: {"name": os.path.basename(paths[k]), "sha256": sha256(v),
                      "bytes": len(v)} for k, v in data.items()},
        "tags": found, "tags_in_module": bool(held),
    }
    files = {paths[kind]: blob for kind, blob in data.items()}
    files[paths["sidecar"]] = json.dumps(sidecar, sort_keys=True,
                                         separators=(",", ":")).encode()
    atomic_write_files(files)
    return paths


def read_sidecar(path: str | os.PathLike) -> dict:
    """The sidecar of an artefact (``path``: the ``.json`` or any file of the artefact);
    ``ArtifactError`` naming the file unless it is a sidecar ``export_artifacts``
    wrote."""
    side = paths_for(path)["sidecar"]
    expected = (f"expected the UTF-8 JSON sidecar ({FORMAT}) that export_artifacts writes "
                f"next to DIR/model.stablehlo")
    try:
        with open(side, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ArtifactError(f"cannot read the sidecar {side} of {os.fspath(path)}: "
                            f"{e.strerror or e} ({expected})") from e
    try:
        out = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ArtifactError(f"{side} is not a sidecar: its bytes are not UTF-8 text "
                            f"({expected})") from None
    except (ValueError, RecursionError) as e:
        raise ArtifactError(f"{side} is not a sidecar: not JSON ({type(e).__name__}: "
                            f"{str(e)[:80]}; {expected})") from None
    if not isinstance(out, dict) or out.get("format") != FORMAT:
        raise ArtifactError(f"{side} is not a {FORMAT} sidecar ({expected})")
    return out


def artifact_paths(path: str | os.PathLike, sidecar: dict) -> dict[str, str]:
    """The files of the artefact ``path`` (any one of them) belongs to, by that path
    (``paths_for``), never by a name the sidecar gives (a sidecar copied from another
    artefact must not load that one); the sidecar only tells whether the portable file
    was written without a suffix (``export_artifacts(exp, "DIR/model")`` or
    ``"DIR/m.bin"``): then it is the shared stem itself."""
    p = os.fspath(path)
    paths = paths_for(p)
    stem, ext = os.path.splitext(p)
    files = sidecar.get("files")
    entry = files.get("stablehlo") if isinstance(files, dict) else None
    name = entry.get("name") if isinstance(entry, dict) else None
    if ext in SUFFIXES.values() and name == os.path.basename(stem):
        paths["stablehlo"] = stem
    return paths


def checked_bytes(paths: dict[str, str], sidecar: dict, kind: str) -> bytes:
    """The bytes of file ``kind`` of an artefact (``paths``: ``artifact_paths``), after
    checking their size and SHA-256 against its sidecar."""
    side = paths["sidecar"]
    files = sidecar.get("files")
    entry = files.get(kind) if isinstance(files, dict) else None
    if not isinstance(entry, dict) or not {"name", "bytes", "sha256"} <= set(entry):
        raise ArtifactError(f"the sidecar {side} lists no {kind!r} file (name, "
                            f"bytes, sha256)")
    for field, types in (("name", str), ("bytes", int), ("sha256", str)):
        if not isinstance(entry[field], types) or isinstance(entry[field], bool):
            raise ArtifactError(f"the sidecar {side}: files.{kind}.{field} must be "
                                f"a {types.__name__}, got {entry[field]!r:.40}")
    path = paths[kind]
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e}") from e
    if len(data) != entry["bytes"] or sha256(data) != entry["sha256"]:
        raise ArtifactError(f"{path}: size {len(data)} / sha256 {sha256(data)[:16]}... does "
                            f"not match the sidecar ({entry['bytes']} / "
                            f"{entry['sha256'][:16]}...): tampered or truncated")
    return data


def load_module(path: str | os.PathLike, *, checksum: bool = True,
                ctx: ir.Context | None = None) -> ir.Module:
    """The module of a portable artefact. With ``checksum`` (default) the file must
    match its sidecar and the module's tags the sidecar's; without, only
    deserialisation guards it. ``ArtifactError`` otherwise."""
    p = os.fspath(path)
    if not checksum:
        try:
            with open(p, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ArtifactError(f"cannot read {p}: {e}") from e
        try:
            module = mlir_io.from_portable(data, ctx)
            mlir_io.entry(module)  # empty text parses as `module {}`: no model in it
        except (ArtifactError, ModuleError) as e:
            raise ArtifactError(f"{p}: {e} (expected a portable artefact, "
                                f"DIR/model.stablehlo)") from e
        return module
    sidecar = read_sidecar(p)
    paths = artifact_paths(p, sidecar)
    side = paths["sidecar"]
    module = mlir_io.from_portable(checked_bytes(paths, sidecar, "stablehlo"), ctx)
    want = (sidecar.get("tags") or {}) if sidecar.get("tags_in_module", True) else {}
    if not (isinstance(want, dict) and all(isinstance(v, dict) for v in want.values())):
        raise ArtifactError(f"the sidecar {side}: tags must map each site to its tags "
                            f"(a dict of dicts), got {want!r:.60}")
    got = icd_tags.read(module)
    if got != want:
        raise ArtifactError(f"{p}: tags differ from the sidecar's: {tag_diff(want, got)}")
    return module


def load_exported(path: str | os.PathLike) -> jax_export.Exported:
    """The ``jax.export.Exported`` of an artefact (``path``: any of its files, e.g. its
    ``.stablehlo`` or ``.json``), checked against the sidecar before it is
    deserialised; ``ArtifactError`` naming the file otherwise."""
    p = os.fspath(path)
    sidecar = read_sidecar(p)
    paths = artifact_paths(p, sidecar)
    data = checked_bytes(paths, sidecar, "jax")
    try:
        return jax_export.deserialize(bytearray(data))
    except Exception as e:
        raise ArtifactError(f"jax.export could not deserialise {paths['jax']} "
                            f"(the artefact of {p}): {e}") from e
