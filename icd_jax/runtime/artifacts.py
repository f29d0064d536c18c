"""Artefact IO: atomic writes, graphs (npz), permutations and events (JSON).

Every writer goes through ``write_bytes``: a temp file in the target folder, flushed and
fsynced, then ``os.replace``d into place, so a killed process leaves either the old file
or the new one, never half of one. Readers never unpickle (``allow_pickle=False``) and
raise ``ArtifactError`` naming the file on anything malformed.
"""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
import zlib
from collections.abc import Mapping

import numpy as np
import scipy.sparse as sp

from icd_jax.adapters.meta import jsonable
from icd_jax.errors import ArtifactError, ConfigError, PermutationError
from icd_jax.permute import validate_order
from icd_jax.runtime.runfiles import FILES, RUN_OUTPUTS, file_path
from vsla_jax.util import atomic_write_bytes

#: Atomic write (temp file, fsync, rename) of bytes: the project's one writer.
write_bytes = atomic_write_bytes


def write_json(path: str | os.PathLike, payload) -> None:
    """Atomically write ``payload`` as indented JSON (NaN/inf become ``null``)."""
    text = json.dumps(jsonable(payload), indent=1, sort_keys=True, allow_nan=False)
    write_bytes(path, (text + "\n").encode())


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``; ``ArtifactError`` if missing, unparsable or not an
    object."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            out = json.load(f)
    except FileNotFoundError as e:
        raise ArtifactError(f"{path}: no such artefact") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: corrupt JSON ({e})") from e
    if not isinstance(out, dict):
        raise ArtifactError(f"{path}: expected a JSON object, got {type(out).__name__}")
    return out


# -- the run folder ------------------------------------------------------------------------
def run_dir_state(path: str | os.PathLike) -> str:
    """``absent``, ``empty`` (nothing but a run lock), ``run`` (carries the run marker: an
    icd run created or claimed it) or ``foreign`` (anything else: files no run wrote);
    ``ArtifactError`` if ``path`` exists and is not a folder."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        return "absent"
    if not os.path.isdir(path):
        raise ArtifactError(f"--out {path}: exists and is not a folder")
    try:
        names = set(os.listdir(path))
    except OSError as e:
        raise ArtifactError(f"--out {path}: cannot list the folder ({e.strerror or e})") from None
    if FILES["marker"] in names:
        return "run"
    return "foreign" if names - {FILES["run_lock"]} else "empty"


def prepare_run_dir(path: str | os.PathLike, force: bool = False) -> str:
    """Make ``path`` a run folder and return its state before (``run_dir_state``).

    A folder that is not empty and lacks the run marker holds files no run wrote: it is
    refused (``ArtifactError``) unless ``force``; the marker then lists those files with
    their ``file_signature`` (``foreign_files``: no later run removes one until a run has
    written it). An empty path is a ``ConfigError``; a path that is a file or cannot be
    written is an ``ArtifactError``.
    """
    raw = os.fspath(path)
    if not raw.strip():
        raise ConfigError("--out must name a folder, got an empty string")
    state = run_dir_state(raw)
    if state == "foreign" and not force:
        raise ArtifactError(
            f"--out {raw}: the folder is not empty and holds no {FILES['marker']}, so no icd "
            f"run created it; choose a new or empty folder, or pass --force to write into it "
            f"(files of the run's names would be overwritten)")
    try:
        os.makedirs(raw, exist_ok=True)
        if state != "run":
            names = sorted(os.listdir(raw)) if state == "foreign" else []
            write_json(os.path.join(raw, FILES["marker"]), dict(
                tool="icd_jax", created=time.time(), foreign=names, foreign_stat={
                    n: file_signature(os.path.join(raw, n)) for n in names}))
    except OSError as e:
        raise ArtifactError(f"--out {raw}: cannot write the run folder "
                            f"({e.strerror or e})") from None
    return state


def file_signature(path: str | os.PathLike) -> list[int] | None:
    """``[inode, size, mtime_ns]`` of ``path`` (not following a link), None if absent: a
    file written since (atomically: a new inode; or appended to) has another one."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def foreign_files(path: str | os.PathLike) -> frozenset[str] | None:
    """Names the run marker of folder ``path`` lists as there before a run claimed it
    (``--force``) and that are still those files: once a run writes a file of that name
    (its ``file_signature`` changed) or it is gone, it is no longer foreign. A marker
    without signatures (older runs) keeps every name it lists. None without a readable
    marker (then nothing in it is the run's)."""
    try:
        marker = read_json(os.path.join(os.fspath(path), FILES["marker"]))
    except ArtifactError:
        return None
    names = marker.get("foreign", [])
    if not isinstance(names, list):
        return None
    names = [str(n) for n in names]
    sigs = marker.get("foreign_stat")
    if not isinstance(sigs, dict):
        return frozenset(names)
    return frozenset(n for n in names if n not in sigs or sigs[n] == file_signature(
        os.path.join(os.fspath(path), n)))


def archive_unfinished(path: str | os.PathLike, say=print) -> None:
    """Before a run starts in ``path``: the previous run's ``events.jsonl`` is archived as
    ``.prev`` and every file it wrote as it went (``RUN_OUTPUTS``: W, the orders, stats,
    metrics, report, StableHLO) is removed, so that a report shows only what the new run
    ran; only known run files, only in a folder carrying the run marker, never one its
    marker lists as there before a run claimed the folder (``--force``) unless a run has
    written it since (``foreign_files``). ``say`` reports a previous run that did not
    finish."""
    foreign = foreign_files(path)
    if foreign is None:
        return
    folder = os.fspath(path)
    ours = lambda p: os.path.basename(p) not in foreign  # noqa: E731
    st, ev = file_path(folder, "state"), file_path(folder, "events")
    if os.path.exists(st) and ours(st):
        try:
            prev = read_json(st).get("state")
        except ArtifactError:
            prev = "corrupt"
        if prev != "REPORTED":
            say(f"previous run in {folder} stopped at {prev}; restarting")
        prev_ev = file_path(folder, "events_prev")
        if os.path.exists(ev) and ours(ev) and ours(prev_ev):
            os.replace(ev, prev_ev)
    for key in RUN_OUTPUTS:
        stale = file_path(folder, key)
        if os.path.exists(stale) and ours(stale):
            os.unlink(stale)


# -- graphs -------------------------------------------------------------------------------
def save_graphs(path: str | os.PathLike, graphs: Mapping[str, sp.spmatrix]) -> None:
    """Write ``{name: sparse [D, D]}`` to one ``.npz``: ``names`` plus ``{name}.data``,
    ``.indices``, ``.indptr`` and ``.shape`` per graph (CSR, float32 values)."""
    arrays = {"names": np.array(list(graphs), dtype=np.str_)}
    for name, w in graphs.items():
        if "." in name:
            raise ArtifactError(f"graph name {name!r} must not contain '.'")
        w = sp.csr_matrix(w)
        arrays[f"{name}.data"] = w.data.astype(np.float32)
        arrays[f"{name}.indices"] = w.indices.astype(np.int32)
        arrays[f"{name}.indptr"] = w.indptr.astype(np.int64)
        arrays[f"{name}.shape"] = np.array(w.shape, np.int64)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_bytes(path, buf.getvalue())


def load_graphs(path: str | os.PathLike) -> dict[str, sp.csr_matrix]:
    """``save_graphs``' inverse; ``ArtifactError`` on a missing or malformed file."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            names = [str(n) for n in z["names"]]
            out = {}
            for n in names:
                shape = tuple(int(s) for s in z[f"{n}.shape"])
                out[n] = sp.csr_matrix((z[f"{n}.data"], z[f"{n}.indices"], z[f"{n}.indptr"]),
                                       shape=shape)
    except FileNotFoundError as e:
        raise ArtifactError(f"{path}: no such artefact") from e
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ArtifactError(f"{path}: corrupt graph file ({e})") from e
    return out


# -- permutations -------------------------------------------------------------------------
def save_perms(path: str | os.PathLike, perms: Mapping[str, np.ndarray], meta: dict | None = None
               ) -> None:
    """Write ``{"perms": {axis: [int, ...]}, "meta": meta}``."""
    write_json(path, {"perms": {k: np.asarray(v, np.int64).tolist() for k, v in perms.items()},
                      "meta": meta or {}})


def not_integers(v) -> str | None:
    """What keeps ``v`` from being a JSON list of integers (a float, even ``2.0``, or a
    bool is not one: truncating it would pass a wrong order as valid), or None."""
    if not isinstance(v, list):
        return f"got {type(v).__name__}"
    for i, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, int):
            return f"entry {i} is {x!r:.30}"
        if not -2**63 <= x < 2**63:
            return f"entry {i} is out of range"
    return None


def load_perms(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """``(perms, meta)`` from ``save_perms``' file; each order is checked to be a list of
    integers (``not_integers``: a bool or float entry is not one) that is a permutation
    (``permute.validate_order``); ``ArtifactError`` naming the file and axis otherwise."""
    blob = read_json(path)
    perms = blob.get("perms")
    if not isinstance(perms, dict):
        raise ArtifactError(f"{os.fspath(path)}: no 'perms' object")
    out = {}
    for k, v in perms.items():
        bad = not_integers(v)
        if bad:
            raise ArtifactError(f"{os.fspath(path)}: perms[{k!r}] is not a list of "
                                f"integers ({bad})")
        try:
            a = validate_order(np.asarray(v, np.int64), what=f"perms[{k!r}]")
        except PermutationError as e:
            raise ArtifactError(f"{os.fspath(path)}: {e}") from None
        out[k] = a.astype(np.int32)
    return out, blob.get("meta", {})


# -- events -------------------------------------------------------------------------------
def append_event(path: str | os.PathLike, event: Mapping) -> None:
    """Append one JSON line; flushed and fsynced so a crash loses at most this line."""
    line = json.dumps(jsonable(event), sort_keys=True, allow_nan=False) + "\n"
    with open(os.fspath(path), "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_events(path: str | os.PathLike) -> list[dict]:
    """The events of ``events.jsonl``; a torn last line (a killed writer) is skipped, a
    corrupt line elsewhere raises ``ArtifactError``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable event log ({e})") from e
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i >= len(lines) - 2:  # the last, unterminated line
                break
            raise ArtifactError(f"{path}: line {i + 1} is not JSON ({e})") from e
    return out
