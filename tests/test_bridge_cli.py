"""``python -m stablehlo_bridge``: absl flags, ``--help``, one-line exit-2 messages for
bad flags, and an export through a ``package.module:function`` model factory (the toy
MLP of ``tests.test_bridge``)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from stablehlo_bridge import cli, load_exported, load_module, mlir_io, tags, verify
from tests.bridge_cases import TOL, mlp, rel_err
from tests.test_bridge import toy_case

TOY = "tests.test_bridge:toy_case"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_lists_the_command_and_the_flags(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "commands:" in out and "export" in out
    for flag in ("--out", "--model", "--perm", "--seed", "--params", "--batch-size", "--meta",
                 "--metrics", "--target-version", "--elide", "--[no]strip-tags"):
        assert flag in out, flag


@pytest.mark.parametrize("args, match", [
    (["--batch-size", "-2"], r"--batch-size=-2: -2 is not a positive integer"),
    (["--batch-size=0"], r"--batch-size=0"),
    (["--meta", "{bad"], r"--meta=\{bad: not valid JSON"),
    (["--metrics", "{bad"], r"--metrics=\{bad: not valid JSON"),
    (["--meta", "[1]"], r"--meta=\[1\]: must be a JSON object, got a JSON list"),
    (["--metrics", '{"C": "x"}'], r"--metrics=.*values must be finite numbers; \['C'\]"),
    (["--target-version", "banana"], r"--target-version=banana: target_version must be"),
    (["--target-version", "0.0.1"], r"--target-version=0.0.1: .* outside the range"),
    (["--seed", "-5"], r"--seed=-5: -5 is not a non-negative integer"),
    (["--seed", "x"], r"--seed=x"),
    (["--elide", "-1"], r"--elide=-1"),
    (["--perm", "sorted"], r"--perm=sorted: value should be one of"),
    (["--params", "both"], r"--params=both"),
    (["--no-such-flag"], r"Unknown command line flag 'no-such-flag'"),
    (["--model", "banana"], r"--model=banana: model 'banana' is neither one of"),
    (["--model", "no_such_pkg.mod:f"], r"--model=no_such_pkg.mod:f: .*cannot import"),
    (["--model", "tests.test_bridge:hidden_spec"], r"--model=.*does not take \['seed'\]"),
])
def test_a_bad_flag_exits_2_with_one_line_naming_it(tmp_path, capsys, args, match):
    argv = ["export", "--out", str(tmp_path / "m.stablehlo"), *args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("python -m stablehlo_bridge: ")
    assert re.search(match, err), err
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("argv, match", [
    ([], "no command"),
    (["import"], "unknown command 'import'"),
    (["export", "extra"], "unknown command 'export extra'"),
    (["export"], "flag --out is required"),
    (["export", "--out", " "], "flag --out is required"),
])
def test_bad_usage_exits_2(capsys, argv, match):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_a_failed_export_exits_1_with_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "m.stablehlo"  # a folder that is a file
    assert cli.main(["export", "--out", str(out), "--model", TOY]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m stablehlo_bridge: export failed: ")
    assert err.count("\n") == 1


def test_export_through_a_factory_reference(tmp_path, capsys):
    out = tmp_path / "run" / "toy.stablehlo"
    assert cli.main(["export", "--out", str(out), "--model", TOY, "--batch-size", "3",
                     "--seed", "2", "--meta", '{"Q": {"bits": 8}}', "--metrics",
                     '{"C": 0.5}', "--target-version", "week4", "--elide", "4"]) == 0
    paths = json.loads(capsys.readouterr().out)
    module = load_module(paths["stablehlo"])
    verify(module)
    found = tags.read(module)["@main"]
    assert found[tags.TRANSFORM_META] == {"Q": {"bits": 8}}
    assert found[tags.METRICS]["C"] == 0.5 and "hidden" in found[tags.LAYOUT_PERM]
    case = toy_case(seed=2, batch_size=3)
    assert case.args[0].shape == (3, 3)
    exp = load_exported(paths["stablehlo"])
    assert rel_err(exp.call(*case.args), mlp(case.params, *case.args)) <= TOL


def test_strip_tags_and_weights_as_arguments(tmp_path, capsys):
    out = tmp_path / "toy.stablehlo"
    assert cli.main(["export", f"--out={out}", f"--model={TOY}", "--perm=identity",
                     "--params=args", "--strip-tags"]) == 0
    paths = json.loads(capsys.readouterr().out)
    assert tags.read(load_module(paths["stablehlo"])) == {}
    sidecar = json.loads(open(paths["sidecar"]).read())
    assert sidecar["tags"]["@main"][tags.LAYOUT_PERM]["hidden"] == [0, 1, 2, 3]
    assert not sidecar["tags_in_module"]
    exp = load_exported(paths["sidecar"])
    case = toy_case()
    assert rel_err(exp.call(case.params, *case.args), mlp(case.params, *case.args)) <= TOL
    assert tags.read(mlir_io.load(exp)) == {}
    np.testing.assert_array_equal(case.args[0].shape, (6, 3))


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stablehlo_bridge", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_python_dash_m_help_and_a_bad_flag():
    got = run_module("--help")
    assert got.returncode == 0 and "export" in got.stdout, got.stderr
    got = run_module("export", "--out", "x.stablehlo", "--batch-size", "-2")
    assert got.returncode == 2 and "Traceback" not in got.stderr
    assert got.stderr.strip().endswith("--batch-size=-2: -2 is not a positive integer")
