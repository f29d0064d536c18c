"""stablehlo_bridge: export, layout tags, permutation pass, verification, round trip and
artefacts, on a toy MLP and on MiniLM-L6 (real weights) and a tiny Mamba.

Every numerical check compares with the JAX model on the *unpermuted* parameters
(outputs on a permuted axis un-permuted with ``permute.permute_output``), at
``rel_err <= 1e-5`` (max abs difference over max abs value).
"""

import ast
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from jaxlib.mlir import ir

from icd_jax import errors as icd_errors
from icd_jax import permute
from icd_jax.runtime import artifacts as run_artifacts
from icd_jax.runtime import export as run_export
from icd_jax.runtime import gates as run_gates
from icd_jax.runtime import runfiles
from stablehlo_bridge import (
    ArtifactError,
    Case,
    ModuleError,
    OrderError,
    SpecError,
    TagError,
    apply_permutation,
    artifact,
    attach_layout_tags,
    build,
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
    # a second order without metrics drops the first one's (they described that layout)
    again = mlir_io.load(apply_permutation(export(mlp, params, x), perms, META, METRICS))
    assert set(tags.read(again)["@main"][tags.METRICS]) > {"pi_hash"}
    again = mlir_io.load(apply_permutation(again, second))
    assert set(tags.read(again)["@main"][tags.METRICS]) == {"pi_hash"}


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


def hidden_spec(group: int = 1) -> permute.ModelSpec:
    """The toy MLP's hidden axis as a ``ModelSpec`` (``4 // group`` entries)."""
    uses = (permute.AxisUse("w1", 1, group), permute.AxisUse("b1", 0, group),
            permute.AxisUse("w2", 0, group))
    return permute.ModelSpec("toy", (permute.PermAxis("hidden", 4 // group, uses),))


def test_param_axis_pairs_are_the_path_axis_form(toy):
    params, x, perms, want = toy
    p = perms["w1:1"]
    pairs = {"w1": (1, p), "b1": (0, p), "w2": (0, p)}
    got = layout.resolve(pairs)
    assert set(got.orders) == {"w1:1", "b1:0", "w2:0"} and not got.named
    np.testing.assert_array_equal(got.params["w1"][1], p)
    exp = apply_permutation(export(mlp, params, x), pairs, spec=hidden_spec())  # spec unused
    verify(exp)
    ref = apply_permutation(export(mlp, params, x), perms)
    assert tags.read(mlir_io.load(exp)) == tags.read(mlir_io.load(ref))
    assert rel_err(exp.call(x), want) <= TOL


def test_a_list_of_pairs_permutes_several_axes_of_one_param():
    p0, p1 = np.array([2, 0, 1]), np.array([1, 0])
    got = layout.resolve({"w": [(0, p0), (1, p1)]})
    assert sorted(got.params["w"]) == [0, 1] and set(got.orders) == {"w:0", "w:1"}
    with pytest.raises(SpecError, match="twice"):
        layout.resolve({"w": (0, p0), "w:0": p0})


def test_named_and_param_axis_entries_do_not_mix():
    with pytest.raises(SpecError, match="mix named axes"):
        layout.resolve({"hidden": np.arange(4), "w1": (1, np.arange(4))}, hidden_spec())


@pytest.mark.parametrize("perms, spec", [
    ({"w1": (1, [0, 0, 1, 2])}, None),
    ({"w1:1": [3, 1, 2, 0, 9]}, None),
    ({"hidden": [0, 0, 1, 2]}, "toy"),
    ({"nope": [0, 1, 2, 3]}, "toy"),
])
def test_a_bad_order_is_a_permutation_error(perms, spec):
    with pytest.raises(OrderError) as info:
        layout.resolve(perms, hidden_spec() if spec else None)
    assert isinstance(info.value, icd_errors.PermutationError)
    assert isinstance(info.value, SpecError)


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
    with pytest.raises(TagError, match=r"icd.layout_perm of stablehlo.constant 'w1': order "
                                       r"for axis '1' is not a permutation.*: \[1\] repeated"):
        verify(tagged)


def test_verify_rejects_a_duplicate_in_the_function_pi(tagged):
    main = mlir_io.entry(tagged)
    with tagged.context:
        orders = {na.name: na.attr for na in ir.DictAttr(main.attributes[tags.LAYOUT_PERM])}
        orders["w2:0"] = ir.DenseIntElementsAttr.get(np.array([3, 3, 0, 1], np.int32))
        main.attributes[tags.LAYOUT_PERM] = ir.DictAttr.get(orders)
    with pytest.raises(TagError, match=r"icd.layout_perm of @main: order for axis 'w2:0' is "
                                       r"not a permutation"):
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


def set_weight_perm_only(module, path, axis, index):
    """Replace one axis of a weight's ``icd.layout_perm``, keeping its ``icd.layout_axes``."""
    w = tags.weights(module)[path]
    with module.context:
        perm = {na.name: na.attr for na in ir.DictAttr(w.get()[tags.LAYOUT_PERM])}
        perm[str(axis)] = ir.DenseIntElementsAttr.get(np.asarray(index, np.int32))
        w.set(tags.LAYOUT_PERM, ir.DictAttr.get(perm))


def test_verify_rejects_a_weight_order_that_disagrees_with_main(tagged):
    verify(tagged)
    set_weight_perm_only(tagged, "w2", 0, [0, 1, 2, 3])  # valid, but @main says [2, 0, 3, 1]
    with pytest.raises(TagError, match=r"icd.layout_perm of stablehlo.constant 'w2' axis 0 "
                                       r"disagrees with @main's order 'w2:0'"):
        verify(tagged)


def test_verify_rejects_a_disagreeing_order_on_a_grouped_named_axis(toy):
    params, x, _, want = toy
    module = apply_permutation(mlir_io.load(export(mlp, params, x)),
                               {"hidden": np.array([1, 0])}, spec=hidden_spec(group=2))
    verify(module)  # index [2, 3, 0, 1]: the order expanded by blocks of 2
    assert tags.read(module)["@main"][tags.LAYOUT_PERM] == {"hidden": [1, 0]}
    set_weight_perm_only(module, "w1", 1, [3, 2, 0, 1])
    with pytest.raises(TagError, match=r"'w1' axis 1 disagrees with @main's order 'hidden'"):
        verify(module)


def test_verify_rejects_an_edited_attribute_in_the_mlir_text(tagged):
    """The weight tag edited in the module's text, parsed back, re-verified."""
    text = mlir_io.text(tagged)
    old = 'icd.layout_perm = {"1" = dense<[2, 0, 3, 1]> : tensor<4xi32>}'
    assert old in text
    edited = text.replace(old, old.replace("[2, 0, 3, 1]", "[1, 3, 0, 2]"), 1)
    module = ir.Module.parse(edited, mlir_io.context())
    with pytest.raises(TagError, match=r"axis 1 disagrees with @main's order 'w1:1'"):
        verify(module)


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
    args = strip_tags(apply_permutation(export(mlp, params, x, embed_params=False), perms))
    assert tags.read(mlir_io.load(args)) == {}


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


def test_a_failed_artefact_write_leaves_the_previous_artefact_whole(toy, tmp_path,
                                                                   monkeypatch):
    params, x, perms, want = toy
    first = apply_permutation(export(mlp, params, x), perms, META, METRICS)
    paths = export_artifacts(first, tmp_path / "model.stablehlo")
    before = {k: open(p, "rb").read() for k, p in paths.items()}
    second = export(mlp, params, x)  # another module: every file would change
    real_fsync, calls = os.fsync, []

    def failing_fsync(fd):  # the third staged file hits a full disk
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        export_artifacts(second, tmp_path / "model.stablehlo")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert sorted(os.listdir(tmp_path)) == ["model.jax", "model.json", "model.mlir",
                                            "model.stablehlo"]  # no temps left behind
    assert {k: open(p, "rb").read() for k, p in paths.items()} == before
    assert tags.read(load_module(paths["stablehlo"])) == tags.read(mlir_io.load(first))
    assert rel_err(load_exported(paths["sidecar"]).call(x), want) <= TOL
    export_artifacts(second, tmp_path / "model.stablehlo")  # and a retry succeeds
    assert tags.read(load_module(paths["stablehlo"])) == tags.read(mlir_io.load(second))
    assert tags.read(mlir_io.load(second)) != tags.read(mlir_io.load(first))
    assert rel_err(load_exported(paths["sidecar"]).call(x), mlp(params, x)) <= TOL


def test_loading_a_file_that_is_no_artefact_names_it(toy, tmp_path):
    params, x, perms, want = toy
    paths = export_artifacts(apply_permutation(export(mlp, params, x), perms),
                             tmp_path / "model.stablehlo")
    for any_file in paths.values():  # any file of the artefact finds the others
        assert rel_err(load_exported(any_file).call(x), want) <= TOL
        assert tags.read(load_module(any_file)) == tags.read(load_module(paths["stablehlo"]))
    binary = tmp_path / "weights.json"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ArtifactError, match=r"weights.json is not a sidecar: its bytes are "
                                            r"not UTF-8 text \(expected the UTF-8 JSON"):
        load_exported(binary)
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(ArtifactError, match=r"other.json is not a icd.bridge.artifact.v1"):
        load_exported(tmp_path / "other.json")
    with pytest.raises(ArtifactError, match=r"cannot read the sidecar .*nothing.bin.json of "
                                            r".*nothing.bin: No such file.*expected"):
        load_exported(tmp_path / "nothing.bin")
    with pytest.raises(ArtifactError, match=r"weights.json: .*expected a portable artefact"):
        load_module(binary, checksum=False)


@pytest.mark.parametrize("name", ["model", "m.bin"])
def test_an_artefact_written_without_a_suffix_loads_from_any_of_its_files(toy, tmp_path,
                                                                         name):
    # a probe: export_artifacts(exp, "dir/model") wrote model, model.jax, model.json and
    # model.mlir, but loading then read dir/model.stablehlo
    params, x, perms, want = toy
    paths = export_artifacts(apply_permutation(export(mlp, params, x), perms),
                             tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == sorted(
        [name, f"{name}.jax", f"{name}.json", f"{name}.mlir"])
    for any_file in paths.values():
        assert rel_err(load_exported(any_file).call(x), want) <= TOL
        assert tags.read(load_module(any_file)) == tags.read(mlir_io.load(load_exported(
            paths["jax"])))
    # the sidecar copied as another artefact's still loads only its own files
    shutil.copy(paths["sidecar"], tmp_path / "other.json")
    with pytest.raises(ArtifactError, match=r"cannot read .*other.stablehlo"):
        load_module(tmp_path / "other.json")


def test_bridge_artifact_errors_are_icd_artifact_errors(tmp_path):
    with pytest.raises(icd_errors.ArtifactError):
        load_exported(tmp_path / "missing.stablehlo")
    assert issubclass(ArtifactError, icd_errors.ICDError)


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
    return {"mamba": run_export.mamba_case(), "minilm": run_export.minilm_case()}


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


# -- the library entry, the runtime's export and the layering -----------------------------
def toy_case(seed: int = 0, batch_size: int | None = None) -> Case:
    """The toy MLP as a ``Case`` (a ``--model tests.test_bridge:toy_case`` factory)."""
    rng = np.random.default_rng(seed)
    params = {"w1": rng.standard_normal((3, 4)).astype(np.float32),
              "b1": rng.standard_normal(4).astype(np.float32),
              "w2": rng.standard_normal((4, 2)).astype(np.float32)}
    x = rng.standard_normal((batch_size or 6, 3)).astype(np.float32)
    return Case("toy-mlp", mlp, params, (x,), hidden_spec())


@pytest.mark.parametrize("form", ["named", "pairs"])
def test_build_exports_permutes_and_verifies(form):
    case = toy_case()
    p = np.array([3, 1, 0, 2], np.int32)
    perms = {"hidden": p} if form == "named" else {"w1": (1, p), "b1": (0, p), "w2": (0, p)}
    exp = build(case, perms, transform_meta={"S": {"n": 2}}, metrics={"C": 2.0})
    found = tags.read(mlir_io.load(exp))["@main"]
    assert found[tags.TRANSFORM_META] == {"S": {"n": 2}} and found[tags.METRICS]["C"] == 2.0
    assert exp.fun_name == "toy_mlp"
    assert rel_err(exp.call(*case.args), mlp(case.params, *case.args)) <= TOL
    args = build(case, {"hidden": p}, embed_params=False)
    got = args.call(permute.apply(case.spec, case.params, {"hidden": p}), *case.args)
    assert rel_err(got, mlp(case.params, *case.args)) <= TOL


def test_model_factories_resolve_by_name_or_reference():
    assert models.factory_ref("minilm") == "icd_jax.runtime.export:minilm_case"
    assert models.factory("mamba-tiny") is run_export.mamba_case
    case = models.case("tests.test_bridge:toy_case", seed=1, batch_size=2)
    assert case.args[0].shape == (2, 3)
    for bad, match in [("banana", "neither one of"), ("no_such_pkg.x:f", "cannot import"),
                       ("tests.test_bridge:nope", "has no 'nope'"),
                       ("tests.test_bridge:TOL", "not callable"),
                       ("tests.test_bridge:hidden_spec", "returned a ModelSpec")]:
        with pytest.raises(SpecError, match=match):
            models.case(bad)


class FakeTarget:
    """What ``icd_jax.runtime.export`` needs of a target: ``spec`` and ``export_fn``."""

    def __init__(self):
        self.case = toy_case()
        self.spec = self.case.spec
        self.calls = 0

    def export_fn(self):
        self.calls += 1
        c = self.case
        return c.name, c.fn, c.params, c.args, None


def test_export_run_builds_from_the_targets_export_fn(tmp_path):
    target = FakeTarget()
    perm_path = tmp_path / "perm_active.json"
    order = np.array([1, 3, 0, 2], np.int32)
    run_artifacts.save_perms(perm_path, {"hidden": order}, {"arm": "after"})
    metrics = {"active": "after", "latency": {"after": {"mean_ms": 1.5}},
               "transforms": {"S": {}, "Q": {}}, "tiles_per_token": {"after": 3}}
    paths = run_export.export_run(target, str(perm_path), str(tmp_path / "m.stablehlo"),
                                  metrics)
    assert target.calls == 1
    found = tags.read(load_module(paths["stablehlo"]))["@main"]
    assert found[tags.LAYOUT_PERM] == {"hidden": order.tolist()}
    assert found[tags.TRANSFORM_META] == {"arm": "after", "transforms": ["Q", "S"]}
    assert found[tags.METRICS]["latency_ms"] == 1.5
    assert found[tags.METRICS]["tiles_per_token"] == 3.0
    c = target.case
    assert rel_err(load_exported(paths["sidecar"]).call(*c.args), mlp(c.params, *c.args)) <= TOL
    assert run_gates.headline(metrics) == {"latency_ms": 1.5, "tiles_per_token": 3.0}


def test_the_bridge_imports_only_permute_and_errors_from_icd_jax():
    root = pathlib.Path(__file__).parents[1] / "stablehlo_bridge"
    allowed = {"icd_jax.permute", "icd_jax.errors"}
    bad = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" if node.module == "icd_jax" else node.module
                         for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            bad += [f"{path.name}: {n}" for n in names
                    if n.split(".")[0] == "icd_jax" and n not in allowed]
    assert not bad, bad


def test_export_saved_rebuilds_the_target_of_a_run_folder(tmp_path):
    files = runfiles.FILES
    order = np.array([2, 3, 1, 0], np.int32)
    run_artifacts.prepare_run_dir(tmp_path)  # the run marker: an icd run folder
    run_artifacts.write_json(tmp_path / files["lock"], {"config": {}})
    run_artifacts.save_perms(tmp_path / files["perm_active"], {"hidden": order})
    made = []

    def make_target(cfg):
        made.append(cfg)
        return FakeTarget()

    paths = run_export.export_saved(str(tmp_path), make_target=make_target)
    assert len(made) == 1 and paths["stablehlo"] == str(tmp_path / files["stablehlo"])
    found = tags.read(load_module(paths["stablehlo"]))["@main"]
    assert found[tags.LAYOUT_PERM] == {"hidden": order.tolist()}
    to = tmp_path / "elsewhere" / "x.stablehlo"
    assert run_export.export_saved(str(tmp_path), str(to), make_target)["sidecar"] == str(
        to.with_suffix(".json"))


def test_export_of_the_cpu_kernels_is_portable_and_a_raw_custom_call_is_refused():
    """A model on the C++ attention kernels exports their XLA form (no custom call in the
    module) with the kernels' results; a raw custom call of this process (the FFI target
    called directly) is a ModuleError that says which backend to build the model with."""
    import jax.numpy as jnp

    import vsla_jax as vs
    from vsla_jax import kernels
    from vsla_jax.attention import cpu

    if kernels.target("vsla_attention_fwd") is None:
        pytest.skip("vsla_jax.cpu_kernels not built")
    lens = jnp.asarray([[3], [5]], jnp.int32)
    params = {"w": np.linspace(0.5, 1.5, 4).astype(np.float32)}

    def fn(params, x):
        q = vs.VarTensor(x * params["w"], lens)
        return vs.attention(q, q, q, backend="cpu").data

    x = np.random.default_rng(0).standard_normal((2, 5, 2, 4)).astype(np.float32)
    exp = export(fn, params, x)
    assert "stablehlo.custom_call" not in exp.mlir_module()
    np.testing.assert_allclose(np.asarray(exp.call(x)), np.asarray(fn(params, x)),
                               rtol=1e-5, atol=1e-6)

    def raw(params, x):
        d = x * params["w"]
        return cpu.forward_call(d, d, d, lens, lens, causal=False, scale=0.5,
                                sizes=cpu.own_sizes(d, d, d))[0]

    with pytest.raises(ModuleError, match="backend=.xla."):
        export(raw, params, x)
