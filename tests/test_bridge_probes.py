"""What a probe of the StableHLO bridge found: each case was a bug (a wrong model loaded,
metadata silently corrupted, f64 demoted, tags its own ``verify`` rejects, raw errors)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from icd_jax import permute
from stablehlo_bridge import (
    ArtifactError,
    SpecError,
    TagError,
    apply_permutation,
    attach_layout_tags,
    export,
    export_artifacts,
    load_exported,
    load_module,
    mlir_io,
    tags,
    verify,
)
from tests.bridge_cases import mlp


def _params(scale: float = 1.0):
    rng = np.random.default_rng(0)
    return {"w1": (scale * rng.standard_normal((3, 4))).astype(np.float32),
            "b1": np.zeros(4, np.float32),
            "w2": rng.standard_normal((4, 2)).astype(np.float32)}


X = np.ones((2, 3), np.float32)


def test_a_sidecar_copied_from_another_artefact_does_not_load_that_one(tmp_path):
    a = export_artifacts(export(mlp, _params(1.0), X), str(tmp_path / "a.stablehlo"))
    b = export_artifacts(export(mlp, _params(2.0), X), str(tmp_path / "b.stablehlo"))
    shutil.copy(a["sidecar"], b["sidecar"])
    with pytest.raises(ArtifactError, match="does not match the sidecar"):
        load_exported(b["stablehlo"])
    with pytest.raises(ArtifactError, match="does not match the sidecar"):
        load_module(b["stablehlo"])
    # a whole artefact renamed consistently still loads: the files are read by their path
    for path in a.values():
        os.replace(path, str(tmp_path / ("c" + os.path.splitext(path)[1])))
    got = load_exported(str(tmp_path / "c.stablehlo")).call(X)
    np.testing.assert_allclose(got, mlp(_params(1.0), X), rtol=1e-6)


def test_integer_metadata_keeps_its_values_and_shape_or_is_refused():
    meta = {"steps": np.array([2**40 + 7, 5_000_000_000]), "mat": np.array([[1, 2], [3, 4]]),
            "order": np.array([2, 0, 1])}
    exp = attach_layout_tags(export(mlp, _params(), X), {}, transform_meta=meta)
    got = tags.read(mlir_io.load(exp))["@main"][tags.TRANSFORM_META]
    assert got == {k: v.tolist() for k, v in meta.items()}
    for bad in ({"big": 2**64}, {"neg": -2**63 - 1}, {"u": np.array([2**64 - 1], np.uint64)}):
        with pytest.raises(TagError, match="does not fit a 64-bit tag|do not fit a 64-bit"):
            attach_layout_tags(export(mlp, _params(), X), {}, transform_meta=bad)


def test_metrics_must_be_finite():
    with pytest.raises(TagError, match="must be a finite number"):
        attach_layout_tags(export(mlp, _params(), X), {}, metrics={"C": float("nan")})


def test_a_named_order_then_a_path_order_on_one_weight_is_refused_up_front():
    spec = permute.ModelSpec("toy", (permute.PermAxis("hid", 4, (
        permute.AxisUse("w1", 1), permute.AxisUse("b1", 0), permute.AxisUse("w2", 0))),))
    exp = apply_permutation(export(mlp, _params(), X), {"hid": np.array([1, 0, 2, 3])},
                            spec=spec)
    verify(exp)
    r = np.array([0, 1, 3, 2])
    with pytest.raises(SpecError, match="holds an order of 'hid'; a further order must use "
                                        "the same key, got 'w1:1'"):
        apply_permutation(exp, {"w1:1": r, "b1:0": r, "w2:0": r})
    again = apply_permutation(exp, {"hid": r}, spec=spec)  # the same key composes
    verify(again)
    np.testing.assert_allclose(again.call(X), mlp(_params(), X), rtol=1e-5, atol=1e-6)


def test_loading_without_checksum_refuses_a_file_with_no_model(tmp_path):
    for name, data in (("empty.stablehlo", b""), ("bare.stablehlo", b"module {}")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ArtifactError, match="no function @main"):
            load_module(str(path), checksum=False)


def test_a_deeply_nested_sidecar_is_an_artifact_error(tmp_path):
    paths = export_artifacts(export(mlp, _params(), X), str(tmp_path / "m.stablehlo"))
    with open(paths["sidecar"], "w") as f:
        f.write("[" * 100_000)
    with pytest.raises(ArtifactError, match="not a sidecar: not JSON"):
        load_module(paths["stablehlo"])


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "stablehlo_bridge", *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def test_cli_names_an_unknown_flag_as_typed_and_refuses_non_finite_metrics(tmp_path):
    res = _cli("export", "--no-such-flag")
    assert res.returncode == 2 and "'no-such-flag'" in res.stderr
    res = _cli("export", "--out", str(tmp_path / "m.stablehlo"), "--metrics",
               json.dumps({"C": 1.0}).replace("1.0", "NaN"))
    assert res.returncode == 2 and "finite numbers" in res.stderr


def test_cli_turns_a_raising_factory_into_one_line(tmp_path):
    (tmp_path / "badfactory.py").write_text("def make(**kw):\n    raise RuntimeError('boom')\n")
    res = subprocess.run([sys.executable, "-m", "stablehlo_bridge", "export", "--out",
                          str(tmp_path / "m.stablehlo"), "--model", "badfactory:make"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "the factory raised RuntimeError: boom" in res.stderr
