"""The typed run records (icd_jax.runtime.records): ``Metrics`` reads ``metrics.json``
exactly as a run writes it and dumps it back unchanged."""

from __future__ import annotations

import copy
import json
import os

import pytest

from icd_jax.adapters.meta import jsonable
from icd_jax.errors import ArtifactError
from icd_jax.runtime import artifacts
from icd_jax.runtime.records import ArmLatency, ArmQuality, Gate, Metrics
from tests.run_fixture import make_run_dir

#: A real run's metrics.json (tiny BERT, iterative, skip-mode FFN sparsity, no GPU),
#: its sample lists cut to three entries.
REAL = {'active': 'after',
 'arms': ['dense', 'identity', 'before', 'after'],
 'cost': {'permuted': {'C': 0.2834,
                       'C_identity': 0.4897,
                       'Q': 0.2024,
                       'Q_identity': 0.0037},
          'repermuted': {'C': 0.2985,
                         'C_identity': 0.3517,
                         'Q': 0.2121,
                         'Q_identity': 0.1331}},
 'effects': {'layout': {'after': {'drop_pp': -4.1667,
                                  'latency_ms': 3.0596,
                                  'p_vs_identity': 1.0,
                                  'quality': 14.5833,
                                  'tiles_per_token': 31.75},
                        'before': {'drop_pp': -4.1667,
                                   'latency_ms': 3.1786,
                                   'p_vs_identity': 1.0,
                                   'quality': 14.5833,
                                   'tiles_per_token': 32.875},
                        'identity': {'drop_pp': -4.1667,
                                     'latency_ms': 3.8387,
                                     'quality': 14.5833,
                                     'tiles_per_token': 33.75}},
             'layout_verdict': 'pi0: equal (paired p=1)',
             'transform': {'arm': 'after',
                           'latency_pct': 19.9327,
                           'quality_drop_pp': -4.1667}},
 'ept_j_per_tok': None,
 'ept_reason': 'pynvml is not installed (the gpu extra); no NVIDIA power readings',
 'events': {'count': 7, 'overhead_pct': 0.0156, 'overhead_s': 0.0111},
 'fallbacks': ['sparsity: 1 of 8 calls ran masked'],
 'gates': {'ept': {'reason': 'pynvml is not installed (the gpu extra); no NVIDIA power '
                             'readings',
                   'status': 'not measured',
                   'target': -15.0,
                   'unit': '% vs dense fp32',
                   'value': None},
           'l2_hit': {'reason': 'ncu is not on PATH',
                      'simulated_value': -1.4931,
                      'status': 'not measured',
                      'target': 10.0,
                      'unit': 'pp vs identity',
                      'value': None},
           'latency': {'measured_status': 'not met',
                       'reason': 'transform fell back: sparsity: 1 of 8 calls ran masked',
                       'status': 'not met',
                       'target': -20.0,
                       'unit': '% vs dense fp32',
                       'value': 19.9327},
           'quality': {'measured_status': 'met',
                       'p_vs_dense': 0.625,
                       'reason': 'transform fell back: sparsity: 1 of 8 calls ran masked',
                       'significant_loss': False,
                       'status': 'not met',
                       'target': 0.1,
                       'unit': 'pp drop vs dense fp32',
                       'value': -4.1667}},
 'host_probe': {'backend': 'cpu',
                'f32_gops': 11.0681,
                'fast_int8': False,
                'flags': {'amx_int8': True,
                          'amx_tile': True,
                          'avx2': True,
                          'avx512_vnni': True,
                          'avx512f': True,
                          'avx_vnni': True},
                'int8_gops': 10.9426,
                'int8_speedup': 0.9887,
                'method': 'median of 10 jitted calls per shape',
                'shapes': [{'f32_gops': 10.7628,
                            'int8_gops': 11.0948,
                            'k': 32,
                            'm': 80,
                            'n': 96,
                            'w8a8_gops': 10.178},
                           {'f32_gops': 3.7318,
                            'int8_gops': 3.492,
                            'k': 32,
                            'm': 80,
                            'n': 32,
                            'w8a8_gops': 3.4005},
                           {'f32_gops': 14.8748,
                            'int8_gops': 14.6132,
                            'k': 32,
                            'm': 80,
                            'n': 128,
                            'w8a8_gops': 11.4143}],
                'w8a8_gops': 9.3139,
                'w8a8_speedup': 0.8415},
 'l2_hit_pct': None,
 'l2_hit_pct_reason': 'ncu is not on PATH',
 'l2_hit_pct_sim': {'after': 74.8031,
                    'before': 75.6654,
                    'cache': {'level': 2,
                              'line_bytes': 64,
                              'sets': 2048,
                              'size_bytes': 2097152,
                              'source': '/sys/devices/system/cpu/cpu0/cache/index2',
                              'type': 'Unified',
                              'ways': 16},
                    'identity': 76.2963,
                    'what': 'simulated: LRU 16-way L2'},
 'latency': {'after': {'ci95_ms': [-0.3767, 6.4959],
                       'mean_ms': 3.0596,
                       'n': 2,
                       'p50_ms': 3.0596,
                       'p95_ms': 3.303,
                       'samples_ms': [2.7892, 3.33],
                       'tokens': 204,
                       'tokens_per_s': 66675.5567},
             'before': {'ci95_ms': [0.2258, 6.1314],
                        'mean_ms': 3.1786,
                        'n': 2,
                        'p50_ms': 3.1786,
                        'p95_ms': 3.3877,
                        'samples_ms': [2.9462, 3.411],
                        'tokens': 204,
                        'tokens_per_s': 64179.2388},
             'degraded': None,
             'dense': {'ci95_ms': [1.1638, 3.9384],
                       'mean_ms': 2.5511,
                       'n': 2,
                       'p50_ms': 2.5511,
                       'p95_ms': 2.6494,
                       'samples_ms': [2.6603, 2.4419],
                       'tokens': 204,
                       'tokens_per_s': 79965.8029},
             'identity': {'ci95_ms': [-3.4506, 11.128],
                          'mean_ms': 3.8387,
                          'n': 2,
                          'p50_ms': 3.8387,
                          'p95_ms': 4.355,
                          'samples_ms': [4.4124, 3.265],
                          'tokens': 204,
                          'tokens_per_s': 53142.7073},
             'method': 'wall-clock per call of the timed set (204 tokens), '
                       'block_until_ready, 1 warmup calls excluded, arms interleaved over '
                       '2 rounds'},
 'lines_per_token': {'after': 63.5, 'before': 65.75, 'identity': 67.5, 'line_bytes': 64},
 'quality': {'after': {'cos_mean': 0.8019,
                       'drop_pp': -4.1667,
                       'nn_agreement': 0.375,
                       'value': 14.5833},
             'before': {'cos_mean': 0.8019,
                        'drop_pp': -4.1667,
                        'nn_agreement': 0.375,
                        'value': 14.5833},
             'dense': {'cos_mean': 1.0,
                       'drop_pp': 0.0,
                       'nn_agreement': 1.0,
                       'value': 10.4167},
             'higher_is_better': True,
             'identity': {'cos_mean': 0.8017,
                          'drop_pp': -4.1667,
                          'nn_agreement': 0.375,
                          'value': 14.5833},
             'metric': 'topic_accuracy',
             'unit': '%'},
 'quality_samples': {'after': [0.0, 0.0, 0.0],
                     'before': [0.0, 0.0, 0.0],
                     'dense': [0.0, 100.0, 0.0],
                     'identity': [0.0, 0.0, 0.0]},
 'rollback': {'happened': False, 'reason': None, 'to': None},
 'run': {'config_hash': 'f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0',
         'elapsed_s': 71.0685,
         'env_hash': '4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a',
         'error': None,
         'failed_stage': None,
         'mode': 'iterative',
         'model': 'minilm',
         'seed': 0,
         'size': 'tiny',
         'target': None,
         'tokens': 204},
 'tiles_per_token': {'after': 31.75,
                     'before': 32.875,
                     'calls': 8,
                     'identity': 33.75,
                     'of': 64,
                     'tile': 4,
                     'unit': "tiles the skip kernel read per call (union of the call's "
                             'rows), summed over layers'},
 'tiles_per_token_samples': {'after': [64, 37, 38],
                             'before': [64, 42, 38],
                             'identity': [64, 45, 36]},
 'transforms': {'quant': {'bytes': 29184,
                          'bytes_f32': 98304,
                          'compute': {'int8': 12},
                          'delta_layout': {'reason': 'per-channel scales are '
                                                     'order-independent',
                                           'repermute': False},
                          'error': {'rel_fro': 0.0054},
                          'expected_quality': '',
                          'fallbacks': [],
                          'int8_kernels': ['layer_0/attention/key/kernel'],
                          'ok': True,
                          'per_channel_fallback': [],
                          'settings': {'act': 'dynamic',
                                       'dtype': 'int8',
                                       'group_size': None,
                                       'grouped_kernels': 0,
                                       'kernels': 12,
                                       'smooth_alpha': 0.5},
                          'transform': 'quant',
                          'warning': None},
                'sparsity': {'delta_layout': {'reason': 'co-active neurons in few tiles',
                                              'repermute': True},
                             'fallbacks': ['sparsity: 1 of 8 calls ran masked'],
                             'mode': 'skip',
                             'ok': True,
                             'settings': {'kind': 'ffn',
                                          'max_rows': 64,
                                          'mode': 'skip',
                                          'tile': 4,
                                          'top_frac': 0.02},
                             'skipping_calls': '7 of 8',
                             'skips_tiles': True,
                             'transform': 'sparsity'}},
 'verdict': {'met': [],
             'not_measured': ['l2_hit', 'ept'],
             'not_met': ['latency', 'quality'],
             'summary': '0 of 4 gates met; not met: latency, quality; not measured: '
                        'l2_hit, ept'},
 'warnings': ['TRANSFORMED: fallback: sparsity: 1 of 8 calls ran masked']}


def as_written(blob: dict) -> str:
    """``blob`` as ``artifacts.write_json`` writes it."""
    return json.dumps(jsonable(blob), indent=1, sort_keys=True, allow_nan=False)


def test_a_real_runs_metrics_validate_and_dump_back_equal():
    m = Metrics.parse(copy.deepcopy(REAL))
    assert m.dump() == REAL
    assert as_written(m.dump()) == as_written(REAL)  # byte-compatible, ints stay ints


@pytest.mark.parametrize("kind", [{}, {"mode": "linear"}, {"rollback": True},
                                  {"missing_latency": True}])
def test_fixture_runs_round_trip(tmp_path, kind):
    path = os.path.join(make_run_dir(tmp_path / "run", **kind), "metrics.json")
    raw = artifacts.read_json(path)
    m = Metrics.load(path)
    assert m.dump() == raw
    with open(path) as f:
        assert as_written(m.dump()) + "\n" == f.read()


def test_per_arm_sections_are_typed_and_keep_fixed_keys_apart():
    m = Metrics.parse(REAL)
    lat = m.latency.arms()
    assert list(lat) == ["after", "before", "dense", "identity"]
    assert all(isinstance(a, ArmLatency) for a in lat.values())
    assert lat["dense"].mean_ms == REAL["latency"]["dense"]["mean_ms"]
    assert m.latency.method.startswith("wall-clock") and m.latency.degraded is None
    q = m.quality.arms()
    assert set(q) == set(m.arms) and all(isinstance(a, ArmQuality) for a in q.values())
    assert m.quality.metric == "topic_accuracy" and m.quality.unit == "%"
    assert q["after"].model_extra["cos_mean"] == REAL["quality"]["after"]["cos_mean"]
    assert m.tiles_per_token.arms() == {"after": 31.75, "before": 32.875, "identity": 33.75}
    assert (m.tiles_per_token.tile, m.tiles_per_token.of, m.tiles_per_token.calls) == (4, 64, 8)
    assert set(m.l2_hit_pct_sim.arms()) == {"after", "before", "identity"}
    assert m.l2_hit_pct_sim.cache["ways"] == 16
    assert set(m.lines_per_token.arms()) == {"after", "before", "identity"}


def test_gates_and_rollback_are_typed():
    m = Metrics.parse(REAL)
    assert all(isinstance(g, Gate) for g in m.gates.values())
    lat, q, l2 = m.gates["latency"], m.gates["quality"], m.gates["l2_hit"]
    assert (lat.status, lat.measured_status, lat.target) == ("not met", "not met", -20.0)
    assert q.p_vs_dense == 0.625 and q.significant_loss is False
    assert l2.value is None and l2.simulated_value == REAL["gates"]["l2_hit"]["simulated_value"]
    assert m.rollback.happened is False and m.rollback.from_ is None
    rb = dict(REAL, rollback={"happened": True, "reason": "x", "to": "before", "from": "after"})
    m2 = Metrics.parse(rb)
    assert m2.rollback.from_ == "after" and m2.dump()["rollback"]["from"] == "after"


def test_diagnostic_blobs_stay_loose():
    blob = copy.deepcopy(REAL)
    blob["transforms"]["quant"]["new_diagnostic"] = {"anything": [1, "two"]}
    blob["run"]["new_field"] = "kept"
    blob["host_probe"]["new_rate"] = 1.5
    blob["events"]["new_count"] = 3
    assert Metrics.parse(blob).dump() == blob


def test_a_run_that_stopped_early_validates():
    early = {"arms": [], "active": "identity", "latency": None, "quality": None,
             "tiles_per_token": None, "lines_per_token": None, "l2_hit_pct_sim": None,
             "l2_hit_pct": None, "ept_j_per_tok": None,
             "l2_hit_pct_reason": "not measured: the run stopped before MEASURED",
             "ept_reason": "not measured: the run stopped before MEASURED",
             "transforms": {}, "fallbacks": [], "effects": {}, "gates": {},
             "cost": {"permuted": {}, "repermuted": None}, "warnings": []}
    assert Metrics.parse(early).dump() == early


@pytest.mark.parametrize("change, where", [
    (lambda m: m.update(surprise=1), "surprise: unknown key"),
    (lambda m: m.update(arms=["dense", 3]), "arms.1"),
    (lambda m: m["latency"]["after"].update(ci95_ms="wide"), "latency.after.ci95_ms"),
    (lambda m: m["quality"]["dense"].update(drop_pp=True), "quality.dense.drop_pp"),
    (lambda m: m["tiles_per_token"].update(after="many"), "tiles_per_token.after"),
    (lambda m: m["gates"]["ept"].pop("status"), "gates.ept.status"),
    (lambda m: m["verdict"].update(met="latency"), "verdict.met"),
    (lambda m: m["cost"]["permuted"].update(J=1.0), "cost.permuted.J: unknown key"),
    (lambda m: m.update(quality_samples={"dense": "x"}), "quality_samples.dense"),
])
def test_bad_values_are_artifact_errors_naming_file_and_key(change, where):
    blob = copy.deepcopy(REAL)
    change(blob)
    with pytest.raises(ArtifactError) as e:
        Metrics.parse(blob, "run/metrics.json")
    assert str(e.value).startswith("run/metrics.json: ") and where in str(e.value)


def test_not_an_object_is_an_artifact_error():
    with pytest.raises(ArtifactError, match="metrics.json: expected a JSON object"):
        Metrics.parse(["dense"], "metrics.json")


@pytest.mark.slow
def test_a_fresh_real_run_round_trips(tmp_path):
    from icd_jax.runtime import orchestrator
    from icd_jax.runtime.rundir import RunDir
    from tests.test_pipeline import SKIP, tiny

    cfg = tiny(tmp_path, report={"stablehlo": False}, model=SKIP["model"])
    cfg["transform"] = {**cfg["transform"], **SKIP["transform"]}
    res = orchestrator.run(cfg, str(tmp_path / "out"))
    rd = RunDir(res.out_dir)
    assert rd.metrics().dump() == artifacts.read_json(rd.path("metrics"))
    assert rd.exists("html") and rd.stats("permuted") and rd.events()
