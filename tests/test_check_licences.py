"""Unit tests for tools/check_licences.py on synthetic inputs (no subprocess, no pip)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

_PATH = Path(__file__).resolve().parents[1] / "tools" / "check_licences.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_licences", _PATH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


cl = _load()

ALLOWED = cl.parse_allow_list("MIT\nApache-2.0\nBSD-3-Clause  # inline comment\nPSF-2.0\nBSD\n")


def pkg(name: str, licence: str, version: str = "1.0") -> dict[str, str]:
    return {"Name": name, "Version": version, "License": licence}


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("MIT", "MIT"),
        ("MIT License", "MIT"),
        ("mit license", "MIT"),
        ("Apache Software License", "Apache-2.0"),
        ("Apache License, Version 2.0", "Apache-2.0"),
        ("Apache License 2.0", "Apache-2.0"),
        ("BSD License", "BSD"),
        ("3-Clause BSD License", "BSD-3-Clause"),
        ("Python Software Foundation License", "PSF-2.0"),
        ("ISC License (ISCL)", "ISC"),
        ("Mozilla Public License 2.0 (MPL 2.0)", "MPL-2.0"),
        ("The Unlicense (Unlicense)", "Unlicense"),
        ("Historical Permission Notice and Disclaimer (HPND)", "HPND"),
        ("GNU General Public License (GPL)", "GPL"),
        ("GNU Lesser General Public License v3 (LGPLv3)", "GNU Lesser General Public v3"),
        ("License :: OSI Approved :: MIT License", "MIT"),
        ("BSD-2-Clause", "BSD-2-Clause"),
        ("", "UNKNOWN"),
        ("UNKNOWN", "UNKNOWN"),
        ("License", "UNKNOWN"),
    ],
)
def test_normalise(raw: str, want: str) -> None:
    assert cl.normalise(raw) == want


def test_key_is_case_insensitive() -> None:
    assert cl.key("apache-2.0") == cl.key("Apache Software License") == "apache-2.0"


def test_parse_single_and_classifier_with_and_in_name() -> None:
    assert cl.parse_licence("MIT") == cl.Term("MIT")
    # Lower-case "and" inside a classifier name is not an operator.
    hpnd = "Historical Permission Notice and Disclaimer (HPND)"
    assert cl.parse_licence(hpnd) == cl.Term(hpnd)


def test_parse_expressions() -> None:
    t = cl.Term
    assert cl.parse_licence("MIT OR Apache-2.0") == cl.AnyOf((t("MIT"), t("Apache-2.0")))
    assert cl.parse_licence("BSD-3-Clause AND MIT") == cl.AllOf((t("BSD-3-Clause"), t("MIT")))
    # AND binds tighter than OR.
    assert cl.parse_licence("A OR B AND C") == cl.AnyOf((t("A"), cl.AllOf((t("B"), t("C")))))
    assert cl.parse_licence("(A OR B) AND C") == cl.AllOf((cl.AnyOf((t("A"), t("B"))), t("C")))
    assert cl.parse_licence("Apache-2.0 WITH LLVM-exception") == t("Apache-2.0")
    # Multi-word names and glued parentheses inside an expression.
    assert cl.parse_licence("ISC License (ISCL) AND MIT License") == cl.AllOf(
        (t("ISC License (ISCL)"), t("MIT License"))
    )


def test_parse_semicolon_list_is_any_of() -> None:
    node = cl.parse_licence("Apache Software License; MIT License")
    assert node == cl.AnyOf((cl.Term("Apache Software License"), cl.Term("MIT License")))
    assert cl.parse_licence(" ; ") == cl.Term("UNKNOWN")


@pytest.mark.parametrize(
    "bad", ["MIT AND", "(MIT", "MIT)", "OR MIT", "MIT WITH", "MIT WITH (", "MIT (GPL OR BSD)"]
)
def test_parse_rejects_malformed(bad: str) -> None:
    with pytest.raises(cl.InputError):
        cl.parse_licence(bad)


@pytest.mark.parametrize(
    ("licence", "ok"),
    [
        ("MIT", True),
        ("MIT License", True),
        ("GPL-3.0-only", False),
        ("MIT AND GPL-3.0-only", False),
        ("MIT OR GPL-3.0-only", True),
        ("GPL-3.0-only OR MIT", True),
        ("GNU General Public License (GPL); MIT License", True),
        ("GNU General Public License (GPL)", False),
        ("(MIT OR GPL-2.0) AND BSD-3-Clause", True),
        ("(MIT OR GPL-2.0) AND LGPL-2.1", False),
        ("Apache-2.0 WITH LLVM-exception", True),
        ("UNKNOWN", False),
        ("", False),
    ],
)
def test_is_allowed(licence: str, ok: bool) -> None:
    assert cl.is_allowed(cl.parse_licence(licence), ALLOWED) is ok


def test_offending_terms() -> None:
    node = cl.parse_licence("MIT AND (GPL-2.0 OR LGPL-2.1) AND Zlib")
    assert cl.offending_terms(node, ALLOWED) == ["GPL-2.0", "LGPL-2.1", "Zlib"]
    assert cl.offending_terms(cl.parse_licence("MIT OR GPL-2.0"), ALLOWED) == []


def test_allow_list_refuses_unknown() -> None:
    with pytest.raises(cl.InputError, match="override"):
        cl.parse_allow_list("MIT\nUNKNOWN\n")


def test_parse_overrides() -> None:
    text = "# header\n\nFoo_Bar==MIT  # LICENSE in site-packages/foo_bar-1.0.dist-info\n"
    assert cl.parse_overrides(text) == {
        "foo-bar": cl.Override("MIT", "LICENSE in site-packages/foo_bar-1.0.dist-info")
    }


@pytest.mark.parametrize(
    "bad",
    ["foo MIT  # x", "foo==  # x", "==MIT  # x", "foo==MIT", "foo==MIT  # a\nFoo==MIT  # b"],
)
def test_parse_overrides_rejects(bad: str) -> None:
    with pytest.raises(cl.InputError):
        cl.parse_overrides(bad)


def test_decide() -> None:
    report = [
        pkg("ok", "MIT License"),
        pkg("gpl", "GNU General Public License (GPL)"),
        pkg("mystery", "UNKNOWN"),
        pkg("Dup_Pkg", "Apache-2.0"),
        pkg("dup-pkg", "Apache-2.0"),  # the same distribution found twice on sys.path
    ]
    overrides = cl.parse_overrides("mystery==MIT  # checked LICENSE file\n")
    verdicts = {v.name: v for v in cl.decide(report, ALLOWED, overrides)}
    assert sorted(verdicts) == ["Dup_Pkg", "gpl", "mystery", "ok"]
    assert verdicts["ok"].allowed and verdicts["ok"].override is None
    assert not verdicts["gpl"].allowed and verdicts["gpl"].offending == ("GPL",)
    assert verdicts["mystery"].allowed and verdicts["mystery"].override is not None


def test_decide_rejects_incomplete_entry() -> None:
    with pytest.raises(cl.InputError, match="License"):
        cl.decide([{"Name": "x", "Version": "1"}], ALLOWED, {})


def test_summary() -> None:
    good = cl.decide(
        [pkg("a", "MIT"), pkg("b", "UNKNOWN")],
        ALLOWED,
        cl.parse_overrides("b==MIT  # x\nc==MIT  # y\n"),
    )
    lines = cl.summary(good, {"b": cl.Override("MIT", "x"), "c": cl.Override("MIT", "y")})
    assert lines[0].startswith("licence check OK: 2 packages allowed (1 by override)")
    assert any("override b" in line for line in lines)
    assert any("'c', which is not installed" in line for line in lines)
    bad = cl.decide([pkg("a", "MIT"), pkg("g", "GPL-3.0-only")], ALLOWED, {})
    lines = cl.summary(bad, {})
    assert lines[0].startswith("licence check FAILED: 1 of 2")
    assert "g==1.0: 'GPL-3.0-only'" in lines[1]


def test_main_with_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    allow = tmp_path / "allow.txt"
    allow.write_text("MIT\n")
    report = tmp_path / "report.json"
    report.write_text(json.dumps([pkg("a", "MIT License")]))
    out = tmp_path / "out"
    argv = ["--allow", str(allow), "--report", str(report), "--out", str(out)]
    assert cl.main(argv) == 0
    assert json.loads((out / "licences.json").read_text()) == [pkg("a", "MIT License")]
    assert "licence check OK" in capsys.readouterr().out
    report.write_text(json.dumps([pkg("a", "MIT License"), pkg("g", "GPL-3.0-only")]))
    assert cl.main(["--allow", str(allow), "--report", str(report)]) == 1
    assert "g==1.0" in capsys.readouterr().err
    report.write_text("{}")
    assert cl.main(["--allow", str(allow), "--report", str(report)]) == 2
