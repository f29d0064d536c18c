"""icd_jax.permute on a small hand-written spec, against naive loops."""

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given

from icd_jax import permute
from icd_jax.errors import ConfigError, PermutationError
from icd_jax.permute import AxisUse, ModelSpec, PermAxis


def naive_index(order, group, parts):
    n = len(order)
    out = []
    for k in range(parts):
        for o in order:
            out.extend(k * n * group + o * group + j for j in range(group))
    return np.array(out)


@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_index_matches_a_loop(n, group, parts, seed):
    order = np.random.default_rng(seed).permutation(n)
    np.testing.assert_array_equal(AxisUse("w", 0, group, parts).index(order),
                                  naive_index(order, group, parts))


SPEC = ModelSpec("toy", (
    PermAxis("a", 4, (AxisUse("x/w", 0), AxisUse("x/b", 0), AxisUse("y/w", 1, parts=2))),
    PermAxis("h", 2, (AxisUse("x/w", 1, group=3),)),
), outputs={"out": "a"})


def toy_params(rng):
    return {"x": {"w": rng.standard_normal((4, 6)).astype(np.float32),
                  "b": rng.standard_normal(4).astype(np.float32)},
            "y": {"w": rng.standard_normal((5, 8)).astype(np.float32)},
            "z": np.arange(3.0)}


def test_apply_moves_exactly_the_named_axes(rng):
    p = toy_params(rng)
    a, h = np.array([2, 0, 3, 1]), np.array([1, 0])
    q = permute.apply(SPEC, p, {"a": a, "h": h})
    np.testing.assert_array_equal(q["x"]["b"], p["x"]["b"][a])
    want_xw = p["x"]["w"][a][:, [3, 4, 5, 0, 1, 2]]
    np.testing.assert_array_equal(q["x"]["w"], want_xw)
    np.testing.assert_array_equal(q["y"]["w"], p["y"]["w"][:, np.concatenate([a, a + 4])])
    np.testing.assert_array_equal(q["z"], p["z"])
    assert p["x"]["b"] is not q["x"]["b"]  # input untouched
    only_h = permute.apply(SPEC, p, {"h": h})
    np.testing.assert_array_equal(only_h["x"]["b"], p["x"]["b"])


@given(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1))
def test_invert_and_compose(seed_a, seed_b):
    rng = np.random.default_rng(seed_a)
    p = toy_params(rng)
    first = permute.random_perms(SPEC, seed_a)
    then = permute.random_perms(SPEC, seed_b)
    assert permute.tree_equal(permute.apply(SPEC, permute.apply(SPEC, p, first),
                                            permute.invert(first)), p)
    twice = permute.apply(SPEC, permute.apply(SPEC, p, first), then)
    assert permute.tree_equal(twice, permute.apply(SPEC, p, permute.compose(first, then)))


def test_permute_output(rng):
    y = rng.standard_normal((3, 4))
    a = np.array([3, 1, 0, 2])
    np.testing.assert_array_equal(permute.permute_output(SPEC, "out", y, {"a": a}), y[:, a])
    np.testing.assert_array_equal(permute.permute_output(SPEC, "other", y, {"a": a}), y)


@pytest.mark.parametrize("order, match", [
    (np.array([0, 0, 1, 2]), "'a' is not a permutation"),
    (np.array([0, 1, 2]), "'a' must have shape"),
    (np.array([0.0, 1, 2, 3]), "'a' must be an integer"),
    (np.array([True, False, True, False]), "'a' must be an integer"),
    (np.array([0, 1, 2, 4]), "'a' has entries outside"),
    (np.array([-1, 1, 2, 0]), "'a' has entries outside"),
])
def test_bad_orders_name_the_axis(rng, order, match):
    with pytest.raises(PermutationError, match=match):
        permute.apply(SPEC, toy_params(rng), {"a": order})


def test_bad_specs_and_names(rng):
    with pytest.raises(PermutationError, match="unknown permutable axis 'b'"):
        permute.apply(SPEC, toy_params(rng), {"b": np.arange(4)})
    with pytest.raises(PermutationError, match="dict"):
        permute.apply(SPEC, toy_params(rng), [np.arange(4)])
    with pytest.raises(ConfigError, match="touched by both"):
        ModelSpec("bad", (PermAxis("a", 2, (AxisUse("w", 0),)),
                          PermAxis("b", 2, (AxisUse("w", 0),))))
    bad_size = ModelSpec("bad", (PermAxis("a", 5, (AxisUse("x/b", 0),)),))
    with pytest.raises(ConfigError, match="x/b has shape"):
        permute.apply(bad_size, toy_params(rng), {"a": np.arange(5)})
    missing = ModelSpec("bad", (PermAxis("a", 4, (AxisUse("q/b", 0),)),))
    with pytest.raises(ConfigError, match="'q/b'"):
        permute.check_spec(missing, toy_params(rng))
