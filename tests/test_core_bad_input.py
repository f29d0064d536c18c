"""The icd_jax core on hostile inputs: solver budgets on slow graphs, mis-sized clusters,
corrupt traces, permutation helpers, lone surrogates, the shared ShapeError."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

import vsla_jax
from icd_jax import cost, permute
from icd_jax.errors import (
    ConfigError,
    ICDError,
    ModelError,
    PermutationError,
    ShapeError,
    TraceError,
    TraceWarning,
)
from icd_jax.graph import build_w, read_trace
from icd_jax.models import minilm
from icd_jax.solver import (
    cluster_order,
    fit_permutation,
    spectral_order,
    spectral_order_report,
)


def chain(d: int, ring: bool) -> sp.csr_matrix:
    """A path (or ring) of ``d`` channels: the eigensolver's slowest case."""
    i = np.arange(d if ring else d - 1)
    w = sp.coo_matrix((np.ones(i.size), (i, (i + 1) % d)), shape=(d, d))
    return sp.csr_matrix(w + w.T)


# -- solver budget ----------------------------------------------------------------------
@pytest.mark.parametrize("ring", [True, False], ids=["ring", "path"])
def test_budget_bounds_every_step_on_slow_graphs(ring):
    d = 20_000
    pi, stats = fit_permutation(chain(d, ring), time_budget_s=2.0)
    assert sorted(pi.tolist()) == list(range(d))
    assert "spectral" in stats["budget_cut"]
    assert stats["spectral_method"] in ("rcm", "spectral+rcm")
    assert stats["elapsed_s"] < 60  # a sanity bound; unbounded it took minutes at D=50,000
    assert stats["J"] <= stats["start_J"]["identity"] + 1e-12


def test_spectral_order_falls_back_to_rcm_when_the_budget_is_spent():
    w = chain(500, ring=False)
    order, rep = spectral_order_report(w, time_budget_s=0.0)
    assert rep == dict(method="rcm", components=1, components_rcm=1, cut=True)
    assert sorted(order.tolist()) == list(range(500))
    assert np.abs(np.diff(order)).max() == 1  # RCM walks the path
    full, rep = spectral_order_report(w)
    assert rep["method"] == "spectral" and not rep["cut"]
    np.testing.assert_array_equal(full, spectral_order(w))


def test_unbudgeted_solver_reports_no_cut():
    g = build_w("mock", D=256, blocks=4, avg_degree=12, seed=0)
    _, stats = fit_permutation(g, time_budget_s=None, refine_steps=200)
    assert stats["budget_cut"] == [] and stats["spectral_method"] == "spectral"


@pytest.mark.parametrize("budget", [-1.0, float("nan"), "soon", True])
def test_bad_budgets_are_config_errors(budget):
    with pytest.raises(ConfigError, match="time_budget_s"):
        fit_permutation(chain(10, ring=True), time_budget_s=budget)


# -- clusters ---------------------------------------------------------------------------
@pytest.mark.parametrize("clusters, match", [
    (np.zeros(7, int), r"expected shape \(10,\), got shape \(7,\)"),
    (np.zeros((10, 1), int), r"expected shape \(10,\), got shape \(10, 1\)"),
    (np.full(10, 0.5), "integer labels"),
    (-np.ones(10, int), ">= 0"),
])
def test_bad_clusters_name_expected_and_got(clusters, match):
    w = chain(10, ring=True)
    with pytest.raises(ConfigError, match=match):
        fit_permutation(w, clusters=clusters)
    with pytest.raises(ConfigError, match=match):
        cluster_order(w, clusters)


def test_given_clusters_are_used():
    w = chain(12, ring=False)
    labels = np.repeat(np.arange(3), 4)
    pi, stats = fit_permutation(w, time_budget_s=None, refine_steps=50, clusters=labels)
    assert "clusters+spectral" in stats["start_J"]
    assert sorted(pi.tolist()) == list(range(12))


# -- traces -----------------------------------------------------------------------------
def test_huge_index_is_a_bad_line_not_an_allocation(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"src": 0, "dst": 1}\n{"src": 1, "dst": 1e12}\n{"src": 1, "dst": 2}\n')
    with pytest.raises(TraceError, match=r"line 2: index out of range.*max_D") as e:
        build_w("trace", path=p)
    assert [n for n, _ in e.value.problems] == [2]
    with pytest.warns(TraceWarning, match="line 2"):
        g = build_w("trace", path=p, strict=False, normalisation="none")
    assert g.n == 3 and g.meta["trace"]["skipped"] == 1
    with pytest.raises(TraceError, match=r"line 3.*for D=2"):
        build_w("trace", path=p, D=2)
    with pytest.raises(TraceError, match="line 2"):
        build_w("trace", path=p, max_D=100)


@pytest.mark.parametrize("kw, match", [
    (dict(D=0), "D must be an integer"), (dict(D=10**13), "D must be an integer"),
    (dict(D=2.5), "D must be an integer"), (dict(max_D=0), "max_D"),
])
def test_bad_trace_sizes_are_config_errors(tmp_path, kw, match):
    p = tmp_path / "t.csv"
    p.write_text("0,1,1\n")
    with pytest.raises(ConfigError, match=match):
        build_w("trace", path=p, **kw)


def test_directory_path_is_a_trace_error_naming_it(tmp_path):
    with pytest.raises(TraceError, match=f"directory.*{tmp_path.name}"):
        build_w("trace", path=tmp_path)


@pytest.mark.parametrize("text", ["", "# only a comment\n\n", "i,j,w\n"])
def test_empty_trace_is_a_trace_error(tmp_path, text):
    p = tmp_path / "t.csv"
    p.write_text(text)
    with pytest.raises(TraceError, match="no accesses"):
        read_trace(p)


def test_all_bad_lines_lenient_is_still_empty(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("not json\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TraceWarning)
        with pytest.raises(TraceError, match="no accesses.*1 bad lines"):
            build_w("trace", path=p, strict=False)


# -- one permutation validator ----------------------------------------------------------
def test_order_helpers_agree_with_the_dict_level_ones():
    rng = np.random.default_rng(0)
    a, b = rng.permutation(9), rng.permutation(9)
    inv = permute.invert_order(a)
    np.testing.assert_array_equal(a[inv], np.arange(9))
    np.testing.assert_array_equal(inv, cost.inverse(a))
    np.testing.assert_array_equal(permute.invert({"x": a})["x"], inv)
    x = rng.standard_normal(9)
    np.testing.assert_array_equal(x[a][b], x[permute.compose_orders(a, b)])
    np.testing.assert_array_equal(permute.compose({"x": a}, {"x": b})["x"],
                                  permute.compose_orders(a, b))
    assert permute.invert_order(a.astype(np.int32)).dtype == np.int32
    assert cost.check_permutation(a).dtype == np.int64


@pytest.mark.parametrize("bad, match", [
    (np.array([0, 0, 2]), "not a permutation"), (np.array([0, 1, 3]), "outside"),
    (np.array([0.0, 1.0, 2.0]), "integer"), (np.array([[0, 1, 2]]), "shape"),
])
def test_every_entry_point_uses_the_one_validator(bad, match):
    for call in (lambda: permute.validate_order(bad, 3), lambda: permute.invert_order(bad),
                 lambda: permute.compose_orders(np.arange(3), bad),
                 lambda: cost.check_permutation(bad, 3), lambda: cost.inverse(bad),
                 lambda: permute.check_order("a", bad, 3)):
        with pytest.raises(PermutationError, match=match):
            call()
    with pytest.raises(PermutationError, match="second order must have shape"):
        permute.compose_orders(np.arange(3), np.arange(4))


# -- models and errors ------------------------------------------------------------------
def test_lone_surrogate_names_the_sentence():
    with pytest.raises(ModelError, match="sentence 2 is not valid Unicode"):
        minilm.check_sentences(["a", "b", "bad\udc80"])
    assert minilm.check_sentences(("a", "é")) == ["a", "é"]


def test_one_shape_error_hierarchy():
    assert issubclass(ShapeError, vsla_jax.ShapeError) and issubclass(ShapeError, ICDError)
    with pytest.raises(vsla_jax.ShapeError):
        raise ShapeError("x")
    with pytest.raises(ValueError):
        raise ShapeError("x")
