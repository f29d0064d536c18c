"""The solver as a run calls it: ``fit_permutation`` with the config's settings, and the
cost summaries a run reports."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from icd_jax import cost as cost_lib
from icd_jax import solver
from icd_jax.runtime import config as config_lib


def fit(csr: sp.csr_matrix, cfg: config_lib.Config, pi_prev=None) -> tuple[np.ndarray, dict]:
    """``fit_permutation`` with the run's settings; ``timed_out`` flags a search the time
    budget cut short (the best order so far is returned)."""
    cost_cfg, s = cfg.cost.cost_config(), cfg.solver
    pi, st = solver.fit_permutation(csr, time_budget_s=s.time_budget_s,
                                    refine_steps=s.refine_steps, k_blocks=s.k_blocks,
                                    seed=cfg.pipeline.seed, cfg=cost_cfg, pi_prev=pi_prev)
    ident = cost_lib.objective(csr, np.arange(csr.shape[0]), cost_cfg)
    st = dict(st, timed_out=bool(st["iters"] < s.refine_steps or st.get("budget_cut")),
              C_identity=ident["C"],
              Q_identity=ident["Q"], J_identity=ident["J"])
    return pi, st


def mean_cost(stats: dict) -> dict:
    """Mean C and Q over axes, for the pi and for the identity order."""
    if not stats:
        return {}
    keys = ("C", "Q", "C_identity", "Q_identity")
    return {k: float(np.mean([s[k] for s in stats.values()])) for k in keys}
