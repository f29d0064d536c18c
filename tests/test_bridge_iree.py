"""stablehlo_bridge.iree: the tagged, permuted StableHLO compiled by IREE (llvm-cpu) and
run by its runtime matches JAX on the unpermuted model (rel_err <= 1e-5)."""

import jax
import numpy as np
import pytest

pytest.importorskip("iree.compiler")
pytest.importorskip("iree.runtime")

from icd_jax import permute  # noqa: E402
from stablehlo_bridge import (  # noqa: E402
    BackendError,
    apply_permutation,
    export,
    export_artifacts,
    iree,
    load_exported,
    mlir_io,
    models,
    tags,
    verify,
)
from tests.bridge_cases import TOL, mlp, rel_err  # noqa: E402


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    params = {"w1": rng.standard_normal((3, 4)).astype(np.float32),
              "b1": rng.standard_normal(4).astype(np.float32),
              "w2": rng.standard_normal((4, 2)).astype(np.float32)}
    x = rng.standard_normal((6, 3)).astype(np.float32)
    order = np.array([2, 0, 3, 1], np.int32)
    return params, x, {"w1:1": order, "b1:0": order, "w2:0": order}


def test_iree_accepts_the_tags_and_matches(toy):
    params, x, perms = toy
    exp = apply_permutation(export(mlp, params, x), perms, {"S": {"n": 2}}, {"C": 1.0})
    assert tags.read(mlir_io.load(exp))
    for strip in (False, True):
        program = iree.compile_exported(exp, strip=strip)
        assert rel_err(program(x), mlp(params, x)) <= TOL


def test_argument_tags_reach_the_iree_runtime(toy):
    params, x, perms = toy
    exp = apply_permutation(export(mlp, params, x, embed_params=False), perms)
    program = iree.compile_exported(exp)
    declaration = program.reflection["iree.abi.declaration"]
    assert 'icd.param_path = "w1"' in declaration and "icd.layout_perm" in declaration
    p = perms["w1:1"]
    permuted = {"w1": params["w1"][:, p], "b1": params["b1"][p], "w2": params["w2"][p]}
    assert rel_err(program(permuted, x), mlp(params, x)) <= TOL
    with pytest.raises(BackendError, match="arguments have structure"):
        program(x)


def test_a_symbolic_batch_runs_for_every_batch_size(toy):
    params, x, perms = toy
    exp = apply_permutation(export(mlp, params, x, shapes=["b, 3"]), perms)
    program = iree.compile_exported(exp)
    rng = np.random.default_rng(1)
    for b in (1, 7):
        xb = rng.standard_normal((b, 3)).astype(np.float32)
        assert rel_err(program(xb), mlp(params, xb)) <= TOL


@pytest.mark.parametrize("name", ["mamba-tiny", "minilm"])
def test_iree_runs_the_permuted_artifact(name, tmp_path):
    """The artefact written to disk (tags included) compiled by IREE, against JAX on the
    unpermuted weights; one static (T, B, C) bucket for MiniLM."""
    case = models.case(name)
    ref = np.asarray(jax.jit(case.fn)(case.params, *case.args))
    perms = permute.random_perms(case.spec, seed=3)
    want = permute.permute_output(case.spec, case.output, ref, perms) if case.output else ref
    exp = apply_permutation(export(case.fn, case.params, *case.args), perms,
                            {"S": {}, "Q": {}, "K": {}}, {"C": 0.0, "Q": 0.0}, spec=case.spec)
    verify(exp)
    paths = export_artifacts(exp, tmp_path / "model.stablehlo", large_elements_limit=16)
    with open(paths["stablehlo"], "rb") as f:
        vmfb = iree.compile_module(f.read())
    got = iree.load(vmfb, load_exported(paths["sidecar"]))(*case.args)
    assert rel_err(got, want) <= TOL
    assert rel_err(got, exp.call(*case.args)) <= TOL


def test_iree_keeps_float64_models_in_float64():
    # IREE demotes f64 to f32 by default: the program then refused the export's own f64
    # input, and a 1e-12 term vanished in f32
    with jax.enable_x64(True):
        params = {"w": np.eye(3), "b": np.full(3, 1e-12)}
        x = np.ones((2, 3))
        exp = export(lambda p, x: x @ p["w"] + p["b"], params, x)
        got = iree.compile_exported(exp)(x)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got - 1.0, 1e-12, rtol=1e-3)  # f32 would give 0


def test_iree_program_is_called_like_the_export(toy):
    params, x, _ = toy
    exp = export(mlp, params, x)
    program = iree.compile_exported(exp)
    want = np.asarray(exp.call(x))
    assert rel_err(program(x.astype(np.float64)), want) <= TOL  # cast like Exported.call
    with pytest.raises(BackendError, match=r"argument 0 has shape \(6, 2\); the export "
                                           r"takes \(6, 3\)"):
        program(x[:, :2])
