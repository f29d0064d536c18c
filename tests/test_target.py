"""The public Target protocol: loading a user's factory, rejecting broken targets, the
config keys that name one, and the generic adapter's arms against a naive reference."""

from __future__ import annotations

import dataclasses
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from icd_jax import permute
from icd_jax.errors import ConfigError, TargetError
from icd_jax.runtime import config, gates, target, usertarget
from icd_jax.runtime.arms import Arm

D_IN, HIDDEN, D_OUT = 6, 16, 3


def mlp_spec(uses_w2: bool = True) -> permute.ModelSpec:
    uses = [permute.AxisUse("dense_0/kernel", 1), permute.AxisUse("dense_0/bias", 0)]
    if uses_w2:
        uses.append(permute.AxisUse("dense_1/kernel", 0))
    return permute.ModelSpec("mlp", (permute.PermAxis("hidden", HIDDEN, tuple(uses)),))


@dataclasses.dataclass
class MLP:
    """A two-layer MLP target: ``relu(x W0 + b0) W1``, per-sample score = agreement of
    the argmax with the dense model's (%)."""

    seed: int = 0
    spec: permute.ModelSpec = dataclasses.field(default_factory=mlp_spec)
    name: str = "mlp"
    quality_metric: str = "argmax_agreement"

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        self.params = {"dense_0": {"kernel": rng.normal(size=(D_IN, HIDDEN)).astype(np.float32),
                                   "bias": rng.normal(size=HIDDEN).astype(np.float32)},
                       "dense_1": {"kernel": rng.normal(size=(HIDDEN, D_OUT)).astype(
                           np.float32)}}
        self.axes = ["hidden"]
        self.data = {s: [(rng.normal(size=(8, D_IN)).astype(np.float32),) for _ in range(2)]
                     for s in target.SPLITS}

    def forward(self, params, batch):
        h = jnp.maximum(batch[0] @ params["dense_0"]["kernel"] + params["dense_0"]["bias"], 0)
        return h @ params["dense_1"]["kernel"]

    def batches(self, split):
        return self.data[split]

    def tokens(self, batch):
        return batch[0].shape[0]

    def activations(self, params, batch):
        x = batch[0] @ np.asarray(params["dense_0"]["kernel"]) + np.asarray(
            params["dense_0"]["bias"])
        return {"hidden": np.maximum(x, 0)}

    def quality(self, outputs, dense_outputs, batches):
        return np.concatenate([100.0 * (np.argmax(o, -1) == np.argmax(d, -1))
                               for o, d in zip(outputs, dense_outputs)])


def make_mlp(seed: int = 0, width: int | None = None) -> MLP:
    if width is not None:
        raise ValueError("width is not supported")
    return MLP(seed)


def test_check_accepts_a_correct_target():
    target.check(MLP())
    assert isinstance(MLP(), target.Target)


@pytest.mark.parametrize("breakage, needle", [
    (lambda t: delattr(t, "axes"), "no axes"),
    (lambda t: setattr(t, "axes", ["ffn_9"]), "not in the spec"),
    (lambda t: setattr(t, "axes", []), "axes is empty"),
    (lambda t: setattr(t, "spec", mlp_spec(uses_w2=False)), "not function-preserving"),
    (lambda t: setattr(t, "spec", "hidden"), "not a icd_jax.permute.ModelSpec"),
    (lambda t: setattr(t, "data", {**t.data, "calib": []}), "batches('calib') is empty"),
    (lambda t: setattr(t, "activations", lambda p, b: {"hidden": np.zeros((8, 3))}),
     "expected [tokens, 16]"),
    (lambda t: setattr(t, "activations", lambda p, b: {}), "no entry for axis 'hidden'"),
])
def test_check_names_what_a_broken_target_lacks(breakage, needle):
    t = MLP()
    breakage(t)
    with pytest.raises(TargetError, match=None) as e:
        target.check(t, "mlp")
    assert needle in str(e.value), str(e.value)


def test_check_rejects_a_spec_that_does_not_fit_the_params():
    t = MLP()
    t.params["dense_0"]["bias"] = np.zeros(HIDDEN + 1, np.float32)
    with pytest.raises(TargetError, match="spec does not fit params"):
        target.check(t)


@pytest.mark.parametrize("ref, needle", [
    ("no_such_module_xyz:make", "not importable"),
    ("tests.test_target", "expected 'package.module:factory'"),
    ("tests.test_target:nothing_here", "has no 'nothing_here'"),
    ("tests.test_target:D_IN", "not callable"),
    ("missing/file.py:make", "not importable"),
])
def test_resolve_names_the_problem(ref, needle):
    with pytest.raises(TargetError) as e:
        target.resolve(ref)
    assert needle in str(e.value)


def test_load_from_a_file_passes_seed_and_kwargs(tmp_path):
    f = tmp_path / "my_model.py"
    f.write_text(textwrap.dedent("""
        from tests.test_target import MLP
        def make(seed=0, scale=1):
            t = MLP(seed)
            t.name = f"mlp-{seed}-{scale}"
            return t
    """))
    t = target.load(f"{f}:make", {"scale": 3}, seed=7)
    assert t.name == "mlp-7-3"
    with pytest.raises(TargetError, match="rejected model.kwargs"):
        target.load(f"{f}:make", {"bogus": 1})
    with pytest.raises(TargetError, match="factory failed .*ValueError: width"):
        target.load("tests.test_target:make_mlp", {"width": 3})


def test_config_model_target_keys(tmp_path):
    base = {"transform": {"quant": {"act": "none", "smooth_alpha": None}}}
    cfg = config.load({**base, "model": {"target": "pkg.mod:make", "kwargs": {"a": 1}}})
    assert cfg.model.name == "custom" and cfg.model.kwargs == {"a": 1}
    with pytest.raises(ConfigError, match="model.target"):
        config.load({**base, "model": {"name": "minilm", "target": "pkg.mod:make"}})
    with pytest.raises(ConfigError, match="model.kwargs is only"):
        config.load({"model": {"kwargs": {"a": 1}}})
    with pytest.raises(ConfigError, match="weight-only"):
        config.load({"model": {"target": "pkg.mod:make"}})
    with pytest.raises(ConfigError, match="kv.enabled"):
        config.load({**base, "model": {"target": "pkg.mod:make"},
                     "transform": {**base["transform"], "kv": {"enabled": True}}})
    # a relative .py path is found next to the config file
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.py").write_text("")
    (tmp_path / "sub" / "c.json").write_text(
        '{"model": {"target": "m.py:make"}, "transform": {"quant": {"act": "none", '
        '"smooth_alpha": null}}}')
    cfg = config.load(str(tmp_path / "sub" / "c.json"))
    assert cfg.model.target == f"{tmp_path / 'sub' / 'm.py'}:make"


def test_one_definition_of_gates_and_cost():
    assert set(config.Gates.model_fields) == {g.field for g in gates.DEFINITIONS}
    assert gates.GATES == ("latency", "l2_hit", "ept", "quality")
    assert config.Cost().cost_config() == config.cost_lib.CostConfig()
    assert set(config.Cost.model_fields) == {
        f.name for f in dataclasses.fields(config.cost_lib.CostConfig)}
    with pytest.raises(ConfigError, match="cost: g and k_blocks"):
        config.load({"cost": {"k_blocks": 0}})


def custom_cfg(**transform):
    return config.load({"model": {"target": "tests.test_target:make_mlp"},
                        "graph": {"top_frac": 0.25},
                        "transform": {"quant": {"act": "none", "smooth_alpha": None},
                                      "sparsity": {"enabled": False}, **transform}})


def test_generic_adapter_arms_match_a_naive_reference():
    user = MLP()
    ut = usertarget.UserTarget(custom_cfg(), user)
    perms = permute.random_perms(user.spec, seed=3)
    arm = ut.arm("before", perms, custom_cfg().transform)
    assert isinstance(arm, Arm) and arm.meta["quant"]["ok"]
    x = user.data["time"][0]
    w0 = np.asarray(user.params["dense_0"]["kernel"])
    # naive: per-output-channel symmetric int8 of the permuted kernel, dequantised
    p = perms["hidden"]
    q0 = np.asarray(arm.params["dense_0"]["kernel"])
    ref = w0[:, p]
    scale = np.abs(ref).max(0) / 127.0
    np.testing.assert_allclose(q0, np.round(ref / scale) * scale, rtol=1e-5, atol=1e-6)
    dense = np.asarray(ut.dense_arm().runner(ut.params, x))
    np.testing.assert_allclose(np.asarray(arm.runner(arm.params, x)), dense, rtol=0.05,
                               atol=0.05)
    q = ut.quality(ut.dense_arm())
    assert q["value"] == 100.0 and q["drop_pp"] == 0.0 and len(q["samples"]) == 16
    acts = ut.activations(None)
    assert acts["hidden"].shape == (16, HIDDEN) and acts["hidden"].getnnz(1).max() == 4
    assert [m for m, k, n in ut.gemm_shapes()] == [8, 8]


def test_a_user_target_runs_the_whole_loop(tmp_path):
    from icd_jax.runtime import orchestrator

    cfg = {"model": {"target": "tests.test_target:make_mlp"},
           "pipeline": {"repeats": 2, "warmup": 1},
           "graph": {"top_frac": 0.25, "topk": 4},
           "solver": {"time_budget_s": 2.0, "refine_steps": 100},
           "transform": {"quant": {"act": "none", "smooth_alpha": None},
                         "sparsity": {"enabled": False}},
           "cache": {"enabled": False}, "report": {"stablehlo": True}}
    res = orchestrator.run(cfg, str(tmp_path / "run"))
    assert res.ok and res.state == "REPORTED", res.metrics.get("warnings")
    m = res.metrics
    assert m["run"]["model"] == "custom"
    assert m["quality"]["metric"] == "argmax_agreement"
    for arm in ("dense", "identity", "before", "after"):
        assert 0.0 <= m["quality"][arm]["value"] <= 100.0
        assert m["latency"][arm]["mean_ms"] > 0
    assert m["transforms"]["quant"]["ok"]
    assert any("weight-only" in f for f in m["fallbacks"]) is False  # act none: as asked
    assert "stablehlo" in res.files, m["warnings"]


# -- outputs on a permuted axis (a probe found the pipeline scoring them permuted) ----------
class Embedder(MLP):
    """The MLP's hidden layer as the output: ``relu(x W0 + b0)``, on the ``hidden`` axis
    (listed in ``spec.outputs``), scored by cosine fidelity to the dense output (%)."""

    def __init__(self, seed: int = 0, as_dict: bool = False, key: str = "embedding"):
        uses = (permute.AxisUse("dense_0/kernel", 1), permute.AxisUse("dense_0/bias", 0),
                permute.AxisUse("dense_1/kernel", 0))
        super().__init__(seed, permute.ModelSpec(
            "emb", (permute.PermAxis("hidden", HIDDEN, uses),), outputs={key: "hidden"}))
        self.as_dict = as_dict

    def forward(self, params, batch):
        h = jnp.maximum(batch[0] @ params["dense_0"]["kernel"] + params["dense_0"]["bias"], 0)
        return {"embedding": h, "logits": h @ params["dense_1"]["kernel"]} if (
            self.as_dict) else h

    def quality(self, outputs, dense_outputs, batches):
        pick = (lambda o: o["embedding"]) if self.as_dict else (lambda o: o)
        return np.concatenate([100.0 * np.sum(pick(o) * pick(d), -1) / np.maximum(
            np.linalg.norm(pick(o), axis=-1) * np.linalg.norm(pick(d), axis=-1), 1e-12)
            for o, d in zip(outputs, dense_outputs)])


@pytest.mark.parametrize("as_dict", [False, True])
def test_outputs_on_a_permuted_axis_are_scored_in_the_dense_order(as_dict):
    user = Embedder(as_dict=as_dict)
    target.check(user)
    cfg = custom_cfg(quant={"enabled": False})
    ut = usertarget.UserTarget(cfg, user)
    arm = ut.arm("before", permute.random_perms(user.spec, seed=5), cfg.transform)
    q = ut.quality(arm)
    assert q["value"] == pytest.approx(100.0, abs=1e-4) and abs(q["drop_pp"]) < 1e-4
    out = ut.outputs(arm)[0]
    dense = ut.outputs(ut.dense_arm())[0]
    np.testing.assert_allclose(out["embedding"] if as_dict else out,
                               dense["embedding"] if as_dict else dense, rtol=1e-5, atol=1e-5)


def test_check_permutes_output_axes_too():
    user = Embedder()
    user.params["dense_0"]["bias"] += 1.0  # a forgotten bias use must show on the output
    user.spec = permute.ModelSpec("emb", (permute.PermAxis("hidden", HIDDEN, (
        permute.AxisUse("dense_0/kernel", 1), permute.AxisUse("dense_1/kernel", 0))),),
        outputs={"embedding": "hidden"})
    with pytest.raises(TargetError, match="not function-preserving"):
        target.check(user)


def _with(obj, **attrs):
    for k, v in attrs.items():
        setattr(obj, k, v)
    return obj


@pytest.mark.parametrize("make, needle", [
    (lambda: Embedder(as_dict=True, key="emb"), "spec.outputs names ['emb'], which "
     "forward's dict does not have"),
    (lambda: _with(MLP(), forward=lambda p, b: {"y": ["not", "an", "array"]}),
     "forward must return an array or a dict of arrays"),
])
def test_check_names_outputs_it_cannot_read(make, needle):
    with pytest.raises(TargetError, match=None) as e:
        target.check(make())
    assert needle in str(e.value), str(e.value)


def test_latency_gate_needs_the_change_beyond_the_noise():
    targets = config.load(None, []).gates
    dense = dict(mean_ms=1.0, ci95_ms=[0.9, 1.1])
    for active, status, disjoint in (
            (dict(mean_ms=0.5, ci95_ms=[0.45, 0.55]), "met", True),
            (dict(mean_ms=0.5, ci95_ms=[0.0, 1.0]), "not met", False),
            (dict(mean_ms=0.5, ci95_ms=[None, None]), "not met", None),
            (dict(mean_ms=0.95, ci95_ms=[0.9, 1.0]), "not met", False)):
        g = gates.evaluate(targets, dict(latency=dict(dense=dense, after=active)), "after")
        assert g["latency"]["status"] == status and g["latency"]["ci95_disjoint"] is disjoint
        if status == "not met" and active["mean_ms"] == 0.5:
            assert "within the timing noise" in g["latency"]["reason"]


def test_a_slowdown_budget_is_met_by_the_means():
    targets = config.load({"gates": {"latency_pct": 5.0}}).gates
    lat = dict(dense=dict(mean_ms=1.0, ci95_ms=[0.5, 1.5]),
               after=dict(mean_ms=1.02, ci95_ms=[0.5, 1.5]))
    g = gates.evaluate(targets, dict(latency=lat), "after")["latency"]
    assert g["status"] == "met" and g["ci95_disjoint"] is False


# -- quant settings a weight-only target ignored (a probe found the plan and lock claiming
#    smoothing and groups on permuted axes while every kernel was grouped, unsmoothed) -----
def naive_int8(w: np.ndarray, group: int | None = None) -> np.ndarray:
    """Symmetric int8 of ``w [in, out]``, dequantised: one scale per output channel, or per
    ``group`` input rows and output channel."""
    rows = w.shape[0] if group is None else group
    amax = np.abs(w).reshape(-1, rows, w.shape[1]).max(1)
    scale = np.repeat(amax / 127.0, rows, axis=0)
    return np.round(w / scale) * scale


@pytest.mark.parametrize("groups_on", ["permuted", "all"])
def test_generic_adapter_groups_only_kernels_reading_a_codesigned_axis(groups_on):
    user = MLP()
    cfg = custom_cfg(quant={"act": "none", "smooth_alpha": None, "group_size": 2,
                            "groups_on": groups_on})
    perms = permute.random_perms(user.spec, seed=3)
    arm = usertarget.UserTarget(cfg, user).arm("before", perms, cfg.transform)
    p = perms["hidden"]
    w0 = np.asarray(user.params["dense_0"]["kernel"])[:, p]  # input: x (not ordered)
    w1 = np.asarray(user.params["dense_1"]["kernel"])[p]  # input: the "hidden" axis
    got0, got1 = (np.asarray(arm.params[k]["kernel"]) for k in ("dense_0", "dense_1"))
    np.testing.assert_allclose(got1, naive_int8(w1, 2), rtol=1e-5, atol=1e-6)
    want0 = naive_int8(w0, None if groups_on == "permuted" else 2)
    np.testing.assert_allclose(got0, want0, rtol=1e-5, atol=1e-6)
    settings = arm.meta["quant"]["settings"]
    assert settings["grouped_kernels"] == (1 if groups_on == "permuted" else 2)
    assert settings["smooth_alpha"] is None and arm.meta["quant"]["fallbacks"] == []


def test_custom_target_rejects_smooth_alpha_and_weight_only_lists_it_as_a_fallback():
    with pytest.raises(ConfigError, match="transform.quant.smooth_alpha: .*weight-only"):
        config.load({"model": {"target": "tests.test_target:make_mlp"},
                     "transform": {"quant": {"act": "none", "smooth_alpha": 0.5}}})
    from icd_jax.runtime.arms import weight_only_quant

    user = MLP()
    q = config.load({"transform": {"quant": {"act": "none", "smooth_alpha": 0.5}}}
                    ).transform.quant
    _, meta = weight_only_quant(user.params, ["dense_0/kernel", "dense_1/kernel"], q,
                                False, "mlp's layers")  # mamba's path: a loud fallback
    assert meta["settings"]["smooth_alpha"] is None
    assert meta["fallbacks"] == ["quant: smooth_alpha 0.5 not applied: mlp's layers run "
                                 "weight-only quantisation, which has no activation scales "
                                 "to smooth"]


def test_plan_of_a_weight_only_model_says_what_runs():
    from icd_jax.runtime.summary import plan_text

    custom = plan_text(custom_cfg(quant={"act": "none", "smooth_alpha": None,
                                         "group_size": 2}))
    assert "Q=int8 weight-only/g2 on permuted" in custom and "not applied" not in custom
    mamba = plan_text(config.load({"model": {"name": "mamba"},
                                   "transform": {"sparsity": {"enabled": False}}}))
    assert "Q=int8 weight-only (act dynamic, smooth 0.5: not applied, listed as fallbacks)" \
        in mamba
