"""stablehlo_bridge: export, layout tags, permutation pass, verification, round trip and
artefacts, on a toy MLP and on MiniLM-L6 (real weights) and a tiny Mamba.

Every numerical check compares with the JAX model on the *unpermuted* parameters
(outputs on a permuted axis un-permuted with ``permute.permute_output``), at
``rel_err <= 1e-5`` (max abs difference over max abs value).
"""

import json
import os

import jax
import numpy as np
import pytest
from jaxlib.mlir import ir

from icd_jax import permute
from stablehlo_bridge import (
    ArtifactError,
    ModuleError,
    SpecError,
    TagError,
    apply_permutation,
    artifact,
    attach_layout_tags,
    cli,
    export,
    export_artifacts,
    export_buckets,
    layout,
    load_exported,
    load_module,
    mlir_io,
    models,
    roundtrip,
    strip_tags,
    tags,
    verify,
    with_module,
)
from tests.bridge_cases import TOL, mlp, rel_err


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    params = {"w1": rng.standard_normal((3, 4)).astype(np.float32),
              "b1": rng.standard_normal(4).astype(np.float32),
              "w2": rng.standard_normal((4, 2)).astype(np.float32),
              "unused": np.ones(5, np.float32)}
    x = rng.standard_normal((6, 3)).astype(np.float32)
    order = np.array([2, 0, 3, 1], np.int32)
    perms = {"w1:1": order, "b1:0": order, "w2:0": order}
    return params, x, perms, np.asarray(mlp(params, x))


META = {"S": {"pattern": "2:4"}, "Q": {"bits": 8, "per_channel": True}, "K": {"drop": 0.25}}
METRICS = {"C": 1.25, "Q": 0.5}


def constant_named(module, path):
    return tags.weights(module)[path]


def test_export_embeds_weights_as_tagged_constants(toy):
    params, x, _, want = toy
    exp = export(mlp, params, x)
    module = mlir_io.load(exp)
    main = mlir_io.entry(module)
    assert len(main.type.inputs) == 1  # only x: the weights are constants now
    ws = tags.weights(module)
    assert sorted(ws) == ["b1", "w1", "w2"]  # "unused" is not in the module
    assert all(w.kind == "constant" for w in ws.values())
    np.testing.assert_array_equal(
        np.array(ir.DenseElementsAttr(ws["w1"].op.attributes["value"])), params["w1"])
    assert rel_err(exp.call(x), want) <= TOL


def test_export_params_as_arguments_named_by_path(toy):
    params, x, _, want = toy
    exp = export(mlp, params, x, embed_params=False)
    ws = tags.weights(mlir_io.load(exp))
    assert sorted(ws) == ["b1", "w1", "w2"]
    assert all(w.kind == "argument" for w in ws.values())
    assert rel_err(exp.call(params, x), want) <= TOL


def test_attach_tags_present_and_well_typed(toy):
    params, x, perms, _ = toy
    module = attach_layout_tags(mlir_io.load(export(mlp, params, x)), perms, META, METRICS)
    main = mlir_io.entry(module)
    fa = main.attributes
    assert ir.StringAttr(fa[tags.LAYOUT_TAG]).value == tags.SCHEMA
    orders = ir.DictAttr(fa[tags.LAYOUT_PERM])
    for key, order in perms.items():
        dense = ir.DenseIntElementsAttr(orders[key])
        assert str(ir.RankedTensorType(dense.type)) == "tensor<4xi32>"
        np.testing.assert_array_equal(np.array(dense), order)
    meta = ir.DictAttr(fa[tags.TRANSFORM_META])
    assert ir.IntegerAttr(ir.DictAttr(meta["Q"])["bits"]).value == 8
    metrics = ir.DictAttr(fa[tags.METRICS])
    assert ir.FloatAttr(metrics["C"]).value == 1.25
    assert ir.StringAttr(metrics["pi_hash"]).value == layout.pi_hash(perms)
    w1 = constant_named(module, "w1")
    got = w1.get()
    assert ir.StringAttr(got[tags.LAYOUT_TAG]).value == tags.SCHEMA
    np.testing.assert_array_equal(np.array(ir.DictAttr(got[tags.LAYOUT_PERM])["1"]),
                                  perms["w1:1"])
    assert ir.StringAttr(ir.DictAttr(got[tags.LAYOUT_AXES])["1"]).value == "w1:1"
    consumers = [u.owner.operation for u in w1.value.uses]
    assert consumers and all(tags.LAYOUT_OPERANDS in op.attributes for op in consumers)
    verify(module)


def test_attach_is_idempotent(toy):
    params, x, perms, _ = toy
    once = attach_layout_tags(mlir_io.load(export(mlp, params, x)), perms, META, METRICS)
    text = mlir_io.text(once)
    twice = attach_layout_tags(once, perms, META, METRICS)
    assert mlir_io.text(twice) == text
    assert mlir_io.text(attach_layout_tags(twice, perms)) == text  # None keeps meta/metrics


def test_apply_permutation_rewrites_constants_and_preserves_function(toy):
    params, x, perms, want = toy
    exp = apply_permutation(export(mlp, params, x), perms, META, METRICS)
    verify(exp)
    module = mlir_io.load(exp)
    w1 = constant_named(module, "w1")
    np.testing.assert_array_equal(np.array(ir.DenseElementsAttr(w1.op.attributes["value"])),
                                  params["w1"][:, perms["w1:1"]])
    assert rel_err(exp.call(x), want) <= TOL


def test_apply_twice_composes_the_tags(toy):
    params, x, perms, want = toy
    second = {k: np.array([1, 0, 3, 2], np.int32) for k in perms}
    exp = apply_permutation(apply_permutation(export(mlp, params, x), perms), second)
    verify(exp)
    composed = perms["w1:1"][second["w1:1"]]
    module = mlir_io.load(exp)
    w1 = constant_named(module, "w1")
    np.testing.assert_array_equal(np.array(ir.DenseElementsAttr(w1.op.attributes["value"])),
                                  params["w1"][:, composed])
    np.testing.assert_array_equal(tags.read(module)["@main"][tags.LAYOUT_PERM]["w1:1"], composed)
    assert rel_err(exp.call(x), want) <= TOL


def test_apply_on_arguments_records_the_layout_callers_pass(toy):
    params, x, perms, want = toy
    exp = apply_permutation(export(mlp, params, x, embed_params=False), perms)
    verify(exp)
    w1 = tags.weights(mlir_io.load(exp))["w1"]
    assert w1.kind == "argument"
    np.testing.assert_array_equal(np.array(ir.DictAttr(w1.get()[tags.LAYOUT_PERM])["1"]),
                                  perms["w1:1"])
    p = perms["w1:1"]
    permuted = {**params, "w1": params["w1"][:, p], "b1": params["b1"][p],
                "w2": params["w2"][p]}
    assert rel_err(exp.call(permuted, x), want) <= TOL


@pytest.mark.parametrize("perms, match", [
    ({"w1:1": [0, 1, 2]}, "3 entries, not 4"),
    ({"w1:7": [0, 1, 2, 3]}, "out of range"),
    ({"nope:0": [0, 1]}, "no weight of the module carries"),
    ({"w1:1": [0, 0, 1, 2]}, "not a permutation"),
    ({"residual": [0, 1]}, "is not 'path:axis'"),
])
def test_bad_specs_raise_spec_error(toy, perms, match):
    params, x, _, _ = toy
    with pytest.raises(SpecError, match=match):
        apply_permutation(mlir_io.load(export(mlp, params, x)), perms)


def test_named_axes_need_a_known_axis():
    spec = permute.ModelSpec("toy", (permute.PermAxis("hidden", 4, (
        permute.AxisUse("w1", 1),)),))
    with pytest.raises(SpecError, match="unknown permutable axis"):
        layout.resolve({"other": np.arange(4)}, spec)
    got = layout.resolve({"hidden": np.array([1, 0, 3, 2])}, spec)
    np.testing.assert_array_equal(got.params["w1"][1], [1, 0, 3, 2])


def test_a_named_spec_must_match_some_weight(toy):
    params, x, _, _ = toy
    spec = permute.ModelSpec("toy", (permute.PermAxis("hidden", 4, (
        permute.AxisUse("elsewhere/kernel", 1),)),))
    with pytest.raises(SpecError, match="none of the 1 parameters"):
        apply_permutation(export(mlp, params, x), {"hidden": np.arange(4)}, spec=spec)


def test_axis_use_group_and_parts_expand_like_permute():
    use = permute.AxisUse("w", 0, group=2, parts=2)
    spec = permute.ModelSpec("toy", (permute.PermAxis("h", 3, (use,)),))
    order = np.array([2, 0, 1])
    got = layout.resolve({"h": order}, spec).params["w"][0]
    w = np.arange(12)
    np.testing.assert_array_equal(w[got], permute.apply(spec, {"w": w}, {"h": order})["w"])


# -- verify: each broken tag is named ---------------------------------------------------
@pytest.fixture
def tagged(toy):
    params, x, perms, _ = toy
    return apply_permutation(mlir_io.load(export(mlp, params, x)), perms, META, METRICS)


def set_weight_perm(module, path, axis, index):
    w = tags.weights(module)[path]
    with module.context:
        w.set(tags.LAYOUT_PERM, ir.DictAttr.get({str(axis): ir.DenseIntElementsAttr.get(
            np.asarray(index, np.int32))}))
        w.set(tags.LAYOUT_AXES, None)


def test_verify_rejects_a_duplicate_in_pi(tagged):
    set_weight_perm(tagged, "w1", 1, [0, 1, 1, 3])
    with pytest.raises(TagError, match=r"icd.layout_perm of stablehlo.constant 'w1' axis 1 "
                                       r"is not a permutation: \[1\] repeated"):
        verify(tagged)


def test_verify_rejects_a_duplicate_in_the_function_pi(tagged):
    main = mlir_io.entry(tagged)
    with tagged.context:
        orders = {na.name: na.attr for na in ir.DictAttr(main.attributes[tags.LAYOUT_PERM])}
        orders["w2:0"] = ir.DenseIntElementsAttr.get(np.array([3, 3, 0, 1], np.int32))
        main.attributes[tags.LAYOUT_PERM] = ir.DictAttr.get(orders)
    with pytest.raises(TagError, match=r"icd.layout_perm\['w2:0'\] of @main is not a "
                                       r"permutation"):
        verify(tagged)


def test_verify_rejects_a_wrong_length_pi(tagged):
    set_weight_perm(tagged, "w1", 1, [2, 0, 1])
    with pytest.raises(TagError, match=r"'w1' axis 1: 3 entries, but axis 1 of "
                                       r"tensor<3x4xf32> has 4"):
        verify(tagged)


def test_verify_rejects_an_axis_beyond_the_rank(tagged):
    set_weight_perm(tagged, "b1", 3, [0, 1, 2, 3])
    with pytest.raises(TagError, match=r"'b1' axis 3: axis 3 is out of range for "
                                       r"tensor<4xf32>"):
        verify(tagged)


def test_verify_rejects_a_named_axis_that_does_not_fit(tagged):
    w = tags.weights(tagged)["w1"]
    main = mlir_io.entry(tagged)
    with tagged.context:
        orders = {na.name: na.attr for na in ir.DictAttr(main.attributes[tags.LAYOUT_PERM])}
        orders["w1:1"] = ir.DenseIntElementsAttr.get(np.array([2, 0, 1], np.int32))
        main.attributes[tags.LAYOUT_PERM] = ir.DictAttr.get(orders)
        main.attributes.__delitem__(tags.METRICS)
    assert w.get()[tags.LAYOUT_AXES]
    with pytest.raises(TagError, match=r"icd.layout_axes of stablehlo.constant 'w1' axis 1: "
                                       r"order 'w1:1' has 3 entries, which does not divide"):
        verify(tagged)


def test_verify_rejects_a_stale_pi_hash(tagged):
    main = mlir_io.entry(tagged)
    with tagged.context:
        main.attributes[tags.METRICS] = ir.DictAttr.get(
            {"pi_hash": ir.StringAttr.get("sha256:0")})
    with pytest.raises(TagError, match=r"icd.metrics\['pi_hash'\] of @main .* does not match"):
        verify(tagged)


def test_verify_rejects_a_consumer_tag_on_the_wrong_operand(tagged):
    w1 = tags.weights(tagged)["w1"]
    op = next(iter(w1.value.uses)).owner.operation
    with tagged.context:
        op.attributes[tags.LAYOUT_OPERANDS] = ir.DictAttr.get({"0": ir.StringAttr.get("w1")})
    with pytest.raises(TagError, match=r"icd.layout_operands\['0'\] of stablehlo.dot_general "
                                       r"names 'w1', but operand 0 is another value"):
        verify(tagged)


def test_verify_rejects_an_unknown_schema(tagged):
    main = mlir_io.entry(tagged)
    with tagged.context:
        main.attributes[tags.LAYOUT_TAG] = ir.StringAttr.get("icd.layout.v0")
    with pytest.raises(TagError, match="icd.layout_tag of func.func is 'icd.layout.v0'"):
        verify(tagged)


def test_verify_rejects_a_module_mlir_rejects(tagged):
    w = tags.weights(tagged)["b1"]
    with tagged.context:
        w.op.attributes["value"] = ir.DenseElementsAttr.get(np.zeros(3, np.float32))
    with pytest.raises(ModuleError, match="fails MLIR verification"):
        verify(tagged)


def test_strip_tags_removes_every_icd_attribute(toy):
    params, x, perms, want = toy
    exp = apply_permutation(export(mlp, params, x), perms, META, METRICS)
    stripped = strip_tags(exp)
    module = mlir_io.load(stripped)
    assert tags.read(mlir_io.load(exp)) and tags.read(module) == {}
    assert "icd." not in mlir_io.text(module)
    verify(stripped)
    assert rel_err(stripped.call(x), want) <= TOL


def test_with_module_keeps_the_calling_convention(toy):
    params, x, perms, want = toy
    exp = export(mlp, params, x)
    module = apply_permutation(mlir_io.load(exp), perms)
    assert rel_err(with_module(exp, module).call(x), want) <= TOL
    other = mlir_io.load(export(mlp, params, x, embed_params=False))
    with pytest.raises(ModuleError, match="@main takes 4 arguments"):
        with_module(exp, other)


def test_symbolic_batch_exports_once_for_every_batch_size(toy):
    params, _, perms, _ = toy
    x = np.ones((2, 3), np.float32)
    exp = apply_permutation(export(mlp, params, x, shapes=["b, 3"]), perms)
    verify(exp)
    rng = np.random.default_rng(1)
    for b in (1, 5):
        xb = rng.standard_normal((b, 3)).astype(np.float32)
        assert rel_err(exp.call(xb), mlp(params, xb)) <= TOL


# -- round trip and artefacts -----------------------------------------------------------
@pytest.mark.parametrize("target_version", ["current", "week4", "minimum"])
def test_roundtrip_preserves_every_tag(toy, target_version):
    params, x, perms, want = toy
    exp = apply_permutation(export(mlp, params, x), perms, META, METRICS)
    back = roundtrip(exp, target_version)
    assert tags.read(mlir_io.load(back)) == tags.read(mlir_io.load(exp))
    verify(back)
    assert rel_err(back.call(x), want) <= TOL


def test_artifacts_write_load_and_detect_tampering(toy, tmp_path):
    params, x, perms, want = toy
    exp = apply_permutation(export(mlp, params, x), perms, META, METRICS)
    paths = export_artifacts(exp, tmp_path / "model.stablehlo")
    assert sorted(os.listdir(tmp_path)) == ["model.jax", "model.json", "model.mlir",
                                            "model.stablehlo"]
    sidecar = json.loads(open(paths["sidecar"]).read())
    assert sidecar["tags"] == tags.read(mlir_io.load(exp))
    assert sidecar["files"]["stablehlo"]["sha256"] == artifact.sha256(
        open(paths["stablehlo"], "rb").read())
    assert tags.read(load_module(paths["stablehlo"])) == sidecar["tags"]
    assert rel_err(load_exported(paths["stablehlo"]).call(x), want) <= TOL
    parsed = ir.Module.parse(open(paths["mlir"]).read(), mlir_io.context())
    assert tags.read(parsed) == sidecar["tags"]

    good = open(paths["stablehlo"], "rb").read()
    for i in (5, len(good) // 2):  # a flipped byte in the header or in a weight
        bad = bytearray(good)
        bad[i] ^= 0xFF
        open(paths["stablehlo"], "wb").write(bytes(bad))
        with pytest.raises(ArtifactError, match="tampered or truncated"):
            load_module(paths["stablehlo"])
    open(paths["stablehlo"], "wb").write(good[: len(good) // 3])
    with pytest.raises(ArtifactError, match="tampered or truncated"):
        load_module(paths["stablehlo"])
    with pytest.raises(ArtifactError, match="neither a StableHLO portable artefact"):
        load_module(paths["stablehlo"], checksum=False)
    jax_blob = bytearray(open(paths["jax"], "rb").read())
    jax_blob[len(jax_blob) // 2] ^= 0xFF
    open(paths["jax"], "wb").write(bytes(jax_blob))
    with pytest.raises(ArtifactError, match="tampered or truncated"):
        load_exported(paths["sidecar"])


def test_stripped_artifact_keeps_tags_in_the_sidecar(toy, tmp_path):
    params, x, perms, _ = toy
    exp = apply_permutation(export(mlp, params, x), perms)
    found = tags.read(mlir_io.load(exp))
    paths = export_artifacts(strip_tags(exp), tmp_path / "m.stablehlo", found)
    assert json.loads(open(paths["sidecar"]).read())["tags"] == found
    assert tags.read(load_module(paths["stablehlo"])) == {}
    with pytest.raises(ArtifactError, match="differ from the module's"):
        export_artifacts(exp, tmp_path / "n.stablehlo", {"@main": {}})


# -- real models ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cases():
    return {"mamba": models.mamba_tiny(), "minilm": models.minilm()}


@pytest.fixture(scope="module")
def reference(cases):
    """Per model: the JAX output on the unpermuted weights, the named-axis orders, and
    that output as the permuted model returns it."""
    out = {}
    for name, case in cases.items():
        ref = np.asarray(jax.jit(case.fn)(case.params, *case.args))
        perms = permute.random_perms(case.spec, seed=3)
        want = (permute.permute_output(case.spec, case.output, ref, perms)
                if case.output else ref)
        out[name] = (ref, perms, want)
    return out


@pytest.fixture(scope="module")
def applied(cases, reference):
    """Per model: an export of the unpermuted weights with the orders applied by the pass."""
    out = {}
    for name, case in cases.items():
        _, perms, _ = reference[name]
        exp = export(case.fn, case.params, *case.args)
        out[name] = apply_permutation(exp, perms, META, METRICS, spec=case.spec)
    return out


MODELS = ["mamba", "minilm"]


@pytest.mark.parametrize("name", MODELS)
def test_export_of_permuted_params_matches(cases, reference, name):
    case = cases[name]
    _, perms, want = reference[name]
    exp = export(case.fn, permute.apply(case.spec, case.params, perms), *case.args)
    exp = attach_layout_tags(exp, perms, META, METRICS, spec=case.spec)
    verify(exp)
    assert rel_err(exp.call(*case.args), want) <= TOL


@pytest.mark.parametrize("name", MODELS)
def test_apply_permutation_pass_matches(cases, reference, applied, name):
    case = cases[name]
    ref, perms, want = reference[name]
    exp = applied[name]
    verify(exp)
    found = tags.read(mlir_io.load(exp))
    assert set(found["@main"][tags.LAYOUT_PERM]) == set(perms)
    held = tags.weights(mlir_io.load(exp))
    used = {u.path for a in case.spec.axes for u in a.uses} & set(held)
    assert used and all(tags.LAYOUT_PERM in held[p].get() for p in used)
    assert rel_err(exp.call(*case.args), want) <= TOL
    if case.output:  # the embedding lies on the residual axis: un-permute it
        back = np.take(np.asarray(exp.call(*case.args)),
                       np.argsort(perms[case.spec.outputs[case.output]]), axis=-1)
        assert rel_err(back, ref) <= TOL


@pytest.mark.parametrize("name", MODELS)
def test_roundtrip_of_the_applied_model_matches(cases, reference, applied, name):
    case = cases[name]
    _, _, want = reference[name]
    back = roundtrip(applied[name])
    assert tags.read(mlir_io.load(back)) == tags.read(mlir_io.load(applied[name]))
    assert rel_err(back.call(*case.args), want) <= TOL


def test_mamba_weights_as_arguments(cases, reference):
    case = cases["mamba"]
    _, perms, want = reference["mamba"]
    exp = apply_permutation(export(case.fn, case.params, *case.args, embed_params=False),
                            perms, spec=case.spec)
    verify(exp)
    got = exp.call(permute.apply(case.spec, case.params, perms), *case.args)
    assert rel_err(got, want) <= TOL


def test_mamba_symbolic_batch(cases, reference):
    """One export for every batch size (the capacity C stays static: the scan's chunk
    count depends on it)."""
    case = cases["mamba"]
    _, perms, _ = reference["mamba"]
    exp = apply_permutation(export(case.fn, case.params, *case.args, shapes=["b, 8", "b"]),
                            perms, spec=case.spec)
    verify(exp)
    rng = np.random.default_rng(2)
    for b in (1, 3):
        ids = rng.integers(0, 64, (b, 8)).astype(np.int32)
        lengths = rng.integers(1, 9, b).astype(np.int32)
        assert rel_err(exp.call(ids, lengths), case.fn(case.params, ids, lengths)) <= TOL


def test_export_buckets_exports_each_shape_once(toy):
    params, x, _, _ = toy
    got = export_buckets(mlp, params, [(x,), (x[:2],), (x + 1,)])
    assert sorted(got) == [((2, 3),), ((6, 3),)]
    assert rel_err(got[((2, 3),)].call(x[:2]), mlp(params, x[:2])) <= TOL


def test_cli_writes_the_artifacts(cases, tmp_path, capsys):
    out = tmp_path / "run" / "model.stablehlo"
    assert cli.main(["export", "--out", str(out), "--model", "mamba-tiny", "--perm",
                     "random", "--meta", '{"S": {"n": 2}}', "--metrics",
                     '{"C": 1.0, "Q": 0.1}']) == 0
    paths = json.loads(capsys.readouterr().out)
    module = load_module(paths["stablehlo"])
    verify(module)
    main_tags = tags.read(module)["@main"]
    assert main_tags[tags.TRANSFORM_META] == {"S": {"n": 2}}
    assert main_tags[tags.METRICS]["C"] == 1.0
    case = cases["mamba"]
    perms = permute.random_perms(case.spec, seed=0)
    assert main_tags[tags.LAYOUT_PERM]["residual"] == perms["residual"].tolist()
    exp = load_exported(paths["sidecar"])
    ref = np.asarray(jax.jit(case.fn)(case.params, *case.args))
    assert rel_err(exp.call(*case.args), ref) <= TOL
