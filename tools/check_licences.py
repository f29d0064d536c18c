#!/usr/bin/env python3
"""Check the licences of every installed distribution against an allow-list.

Runs ``pip-licenses --format=json`` with this interpreter, splits each package's licence
string (SPDX expressions with AND/OR/WITH and parentheses, or ``;``-separated classifier
lists), normalises each part and decides:

* ``A AND B``: every part must be allowed;
* ``A OR B`` and ``A; B`` (a package listing several licence classifiers): any part suffices;
* ``A WITH exception``: decided by ``A`` (an exception only adds permissions).

A package is also allowed if the overrides file names it (``package==licence  # how
verified``); overrides are per package, so ``UNKNOWN`` is never allowed globally.

Usage::

    python tools/check_licences.py --allow .ci/licences.txt \
        --overrides .ci/licence-overrides.txt --out build/sbom

Exit status: 0 all allowed, 1 some package not allowed, 2 bad arguments or input files.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

UNKNOWN = "UNKNOWN"
OPERATORS = ("AND", "OR", "WITH")

# Cleaned, case-folded spellings (see ``_clean``) -> canonical (mostly SPDX) identifiers.
ALIASES: dict[str, str] = {
    "mit": "MIT",
    "expat": "MIT",
    "apache": "Apache-2.0",
    "apache software": "Apache-2.0",
    "apache 2": "Apache-2.0",
    "apache 2.0": "Apache-2.0",
    "apache v2": "Apache-2.0",
    "apache2": "Apache-2.0",
    "apache-2": "Apache-2.0",
    "asl 2.0": "Apache-2.0",
    "bsd": "BSD",
    "new bsd": "BSD-3-Clause",
    "modified bsd": "BSD-3-Clause",
    "revised bsd": "BSD-3-Clause",
    "3-clause bsd": "BSD-3-Clause",
    "bsd 3-clause": "BSD-3-Clause",
    "bsd-3": "BSD-3-Clause",
    "simplified bsd": "BSD-2-Clause",
    "2-clause bsd": "BSD-2-Clause",
    "bsd 2-clause": "BSD-2-Clause",
    "bsd-2": "BSD-2-Clause",
    "freebsd": "BSD-2-Clause",
    "zero-clause bsd": "0BSD",
    "bsd zero clause": "0BSD",
    "python software foundation": "PSF-2.0",
    "psf": "PSF-2.0",
    "psfl": "PSF-2.0",
    "iscl": "ISC",
    "mozilla public 2.0": "MPL-2.0",
    "mpl 2.0": "MPL-2.0",
    "the unlicense": "Unlicense",
    "historical permission notice and disclaimer": "HPND",
    "zlib/libpng": "Zlib",
    "cc0 1.0 universal": "CC0-1.0",
    "cc0": "CC0-1.0",
    "gnu general public": "GPL",
    "gnu lesser general public": "LGPL",
    "gnu library or lesser general public": "LGPL",
    "gnu affero general public": "AGPL",
}


@dataclass(frozen=True)
class Term:
    """One licence name, as written in the report."""

    name: str


@dataclass(frozen=True)
class AllOf:
    """``A AND B``: every part applies."""

    parts: tuple[Node, ...]


@dataclass(frozen=True)
class AnyOf:
    """``A OR B`` or a ``;``-separated classifier list: the licensee may pick one."""

    parts: tuple[Node, ...]


Node = Term | AllOf | AnyOf


@dataclass(frozen=True)
class Override:
    licence: str
    note: str


@dataclass(frozen=True)
class Verdict:
    name: str
    version: str
    licence: str
    allowed: bool
    override: Override | None
    offending: tuple[str, ...]


class InputError(ValueError):
    """A malformed allow-list, overrides file or report."""


# --- normalisation -----------------------------------------------------------------------


def _clean(name: str) -> str:
    s = name.strip()
    if "::" in s:  # a full classifier: "License :: OSI Approved :: MIT License"
        s = s.rsplit("::", 1)[-1].strip()
    s = re.sub(r"\s*\([^()]*\)\s*$", "", s)  # trailing abbreviation: "ISC License (ISCL)"
    s = s.replace(",", " ")
    s = re.sub(r"\b(?:licen[cs]ed?|version)\b", " ", s, flags=re.IGNORECASE)
    return " ".join(s.split())


def normalise(name: str) -> str:
    """Canonical spelling of one licence name (no operators)."""
    cleaned = _clean(name)
    if not cleaned or cleaned.casefold() == UNKNOWN.casefold():
        return UNKNOWN
    return ALIASES.get(cleaned.casefold(), cleaned)


def key(name: str) -> str:
    """Comparison key: case-insensitive canonical spelling."""
    return normalise(name).casefold()


def canonical_package(name: str) -> str:
    """PEP 503 name: ``Foo_Bar.baz`` -> ``foo-bar-baz``."""
    return re.sub(r"[-_.]+", "-", name).lower()


# --- parsing -----------------------------------------------------------------------------


def _tokens(text: str) -> list[str]:
    """Split into "(", ")", operators and licence names (runs of other words, kept verbatim)."""
    out: list[str] = []
    name: tuple[int, int] | None = None  # span of the licence name being collected
    depth = 0  # inside a parenthesis glued to a name, "ISC License (ISCL)"
    for m in re.finditer(r"\(|\)|[^()\s]+", text):
        tok = m.group()
        if depth or (tok == "(" and name is not None):
            if tok in OPERATORS:  # "MIT (GPL OR BSD)": an operator is missing; don't guess
                raise InputError(f"operator inside a licence name in {text!r}")
            depth += {"(": 1, ")": -1}.get(tok, 0)
        elif tok in ("(", ")") or tok in OPERATORS:
            if name is not None:
                out.append(text[name[0] : name[1]])
                name = None
            out.append(tok)
            continue
        name = (m.start() if name is None else name[0], m.end())
    if name is not None:
        out.append(text[name[0] : name[1]])
    return out


class _Parser:
    """Precedence (loosest first): OR, AND, WITH, as in SPDX."""

    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.pos = 0
        self.text = text

    def _peek(self) -> str | None:
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def _take(self) -> str:
        tok = self._peek()
        if tok is None:
            raise InputError(f"unexpected end of licence expression {self.text!r}")
        self.pos += 1
        return tok

    def parse(self) -> Node:
        node = self._or()
        if self._peek() is not None:
            raise InputError(f"unexpected {self._peek()!r} in licence expression {self.text!r}")
        return node

    def _or(self) -> Node:
        parts = [self._and()]
        while self._peek() == "OR":
            self._take()
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else AnyOf(tuple(parts))

    def _and(self) -> Node:
        parts = [self._with()]
        while self._peek() == "AND":
            self._take()
            parts.append(self._with())
        return parts[0] if len(parts) == 1 else AllOf(tuple(parts))

    def _with(self) -> Node:
        node = self._atom()
        if self._peek() == "WITH":
            self._take()
            exception = self._take()
            if exception in ("(", ")") or exception in OPERATORS:
                raise InputError(f"bad exception after WITH in {self.text!r}")
        return node

    def _atom(self) -> Node:
        tok = self._take()
        if tok == "(":
            node = self._or()
            if self._take() != ")":
                raise InputError(f"unbalanced parentheses in {self.text!r}")
            return node
        if tok == ")" or tok in OPERATORS:
            raise InputError(f"unexpected {tok!r} in licence expression {self.text!r}")
        return Term(tok)


def parse_licence(text: str) -> Node:
    """Parse a pip-licenses ``License`` field into a tree of terms."""
    parts = [p.strip() for p in text.split(";") if p.strip()]
    if not parts:
        return Term(UNKNOWN)
    nodes = tuple(_Parser(p).parse() for p in parts)
    return nodes[0] if len(nodes) == 1 else AnyOf(nodes)


# --- decision ----------------------------------------------------------------------------


def is_allowed(node: Node, allowed: frozenset[str]) -> bool:
    """``allowed`` holds comparison keys (see ``key``)."""
    if isinstance(node, Term):
        k = key(node.name)
        return k != UNKNOWN.casefold() and k in allowed
    if isinstance(node, AllOf):
        return all(is_allowed(p, allowed) for p in node.parts)
    return any(is_allowed(p, allowed) for p in node.parts)


def terms(node: Node) -> list[str]:
    """Normalised names of every term, in order."""
    if isinstance(node, Term):
        return [normalise(node.name)]
    return [t for p in node.parts for t in terms(p)]


def offending_terms(node: Node, allowed: frozenset[str]) -> list[str]:
    """The normalised terms that keep ``node`` from being allowed (empty if allowed)."""
    if is_allowed(node, allowed):
        return []
    if isinstance(node, AllOf):
        return [t for p in node.parts for t in offending_terms(p, allowed)]
    return terms(node)


def decide(
    packages: Iterable[dict[str, str]],
    allowed: frozenset[str],
    overrides: dict[str, Override],
) -> list[Verdict]:
    """One verdict per distinct (name, version), sorted by name."""
    seen: dict[tuple[str, str], Verdict] = {}
    for pkg in packages:
        try:
            name, version, licence = pkg["Name"], pkg["Version"], pkg["License"]
        except KeyError as e:
            raise InputError(f"report entry without {e.args[0]!r}: {pkg!r}") from None
        ident = (canonical_package(name), version)
        if ident in seen:
            continue
        override = overrides.get(ident[0])
        bad = tuple(offending_terms(parse_licence(licence), allowed))
        ok = override is not None or not bad
        seen[ident] = Verdict(name, version, licence, ok, override, () if ok else bad)
    return sorted(seen.values(), key=lambda v: canonical_package(v.name))


# --- input files -------------------------------------------------------------------------


def _lines(text: str) -> Iterable[tuple[int, str, str]]:
    """(line number, content, comment) for each non-blank, non-comment-only line."""
    for no, raw in enumerate(text.splitlines(), 1):
        content, _, comment = raw.partition("#")
        if content.strip():
            yield no, content.strip(), comment.strip()


def parse_allow_list(text: str) -> frozenset[str]:
    keys: set[str] = set()
    for no, content, _ in _lines(text):
        k = key(content)
        if k == UNKNOWN.casefold():
            raise InputError(
                f"allow-list line {no}: {content!r} may not be allowed globally; "
                "add a per-package override instead"
            )
        keys.add(k)
    return frozenset(keys)


def parse_overrides(text: str) -> dict[str, Override]:
    out: dict[str, Override] = {}
    for no, content, note in _lines(text):
        name, sep, licence = content.partition("==")
        name, licence = name.strip(), licence.strip()
        if not sep or not name or not licence:
            raise InputError(f"overrides line {no}: expected 'package==licence  # how verified'")
        if not note:
            raise InputError(f"overrides line {no}: say how {name}'s licence was verified")
        pkg = canonical_package(name)
        if pkg in out:
            raise InputError(f"overrides line {no}: {name} listed twice")
        out[pkg] = Override(licence, note)
    return out


def parse_report(text: str) -> list[dict[str, str]]:
    data = json.loads(text)
    if not isinstance(data, list) or not all(isinstance(p, dict) for p in data):
        raise InputError("pip-licenses report is not a JSON list of objects")
    return data


def run_pip_licenses() -> str:
    cmd = [sys.executable, "-m", "piplicenses", "--format=json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise InputError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


# --- reporting ---------------------------------------------------------------------------


def summary(verdicts: Sequence[Verdict], overrides: dict[str, Override]) -> list[str]:
    bad = [v for v in verdicts if not v.allowed]
    if bad:
        lines = [f"licence check FAILED: {len(bad)} of {len(verdicts)} packages not allowed"]
        lines += [
            f"  {v.name}=={v.version}: {v.licence!r} (not allowed: {', '.join(v.offending)})"
            for v in bad
        ]
        return lines
    used = [v for v in verdicts if v.override is not None]
    counts = Counter(t for v in verdicts for t in dict.fromkeys(terms(parse_licence(v.licence))))
    lines = [
        f"licence check OK: {len(verdicts)} packages allowed ({len(used)} by override)",
        "  packages naming each licence: "
        + ", ".join(f"{lic} {n}" for lic, n in counts.most_common()),
    ]
    lines += [
        f"  override {v.name}: reported {v.licence!r}, taken as {v.override.licence!r}"
        for v in used
        if v.override is not None
    ]
    installed = {canonical_package(v.name) for v in verdicts}
    stale = [p for p in overrides if p not in installed]
    lines += [f"  warning: override for {p!r}, which is not installed" for p in stale]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Check installed licences against an allow-list.")
    ap.add_argument("--allow", type=Path, required=True, help="allow-list, one licence a line")
    ap.add_argument("--overrides", type=Path, help="'package==licence  # how verified' lines")
    ap.add_argument("--out", type=Path, help="directory to write the raw report licences.json")
    ap.add_argument("--report", type=Path, help="read this pip-licenses JSON instead of running it")
    args = ap.parse_args(argv)
    try:
        allowed = parse_allow_list(args.allow.read_text())
        overrides = parse_overrides(args.overrides.read_text()) if args.overrides else {}
        raw = args.report.read_text() if args.report else run_pip_licenses()
        verdicts = decide(parse_report(raw), allowed, overrides)
    except (OSError, InputError, json.JSONDecodeError) as e:
        print(f"check_licences: {e}", file=sys.stderr)
        return 2
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "licences.json").write_text(raw)
    ok = all(v.allowed for v in verdicts)
    print("\n".join(summary(verdicts, overrides)), file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
