"""Ragged convolution: kernels, the cost model and its calibration, plans, Pallas kernel.

``vsla_jax.conv`` (the function, re-exported as ``vs.conv``) is the front door; the
modules here are its parts:

- ``kernels``: the shift-and-add and FFT kernels on padded arrays;
- ``cost``: the one ``CostModel`` and ``calibrate``;
- ``padded``, ``bucketed``, ``blocked``: the three plans;
- ``engine``: ``conv``, ``ConvPolicy`` and ``heterogeneity_profile``;
- ``pallas``: the GPU kernel for rank-1 direct convolution.
"""

from vsla_jax.conv.blocked import FlatRagged, conv_packed
from vsla_jax.conv.cost import CostModel, calibrate
from vsla_jax.conv.engine import (
    ConvPolicy,
    HeterogeneityProfile,
    LayoutBudget,
    conv,
    heterogeneity_profile,
)

__all__ = ["ConvPolicy", "CostModel", "FlatRagged", "HeterogeneityProfile", "LayoutBudget",
           "calibrate", "conv", "conv_packed", "heterogeneity_profile"]
