"""One compilation per op per capacity bucket: lengths are traced, never specialised on.

Counted with jax.monitoring backend-compile events and the jit cache size, not timing.
"""

import jax
import numpy as np
import pytest

import vsla_jax as vs
from tests.events import count_compiles

N_BATCHES = 200
# A capacity unlikely to be used by other tests in this process.
POLICY = vs.CapacityPolicy(minimum=40, alignment=8, growth=1.5)


def _random_batch(rng, model="A"):
    lengths = rng.integers(17, 41, size=8)  # all inside the (40,) bucket
    items = [rng.standard_normal(n).astype(np.float32) for n in lengths]
    return vs.stack(items, policy=POLICY, model=model)


OPS = {
    "add": lambda a, b: vs.add(a, b),
    "sub": lambda a, b: vs.sub(a, b),
    "hadamard": lambda a, b: vs.hadamard(a, b),
    "conv": lambda a, b: vs.conv(a, b),
    "kron": lambda a, b: vs.kron(a, b),
    "scale": lambda a, b: vs.scale(a, 0.5),
    "neg": lambda a, b: vs.neg(a),
    "sum": lambda a, b: vs.sum(a),
    "norm": lambda a, b: vs.norm(a),
    "mean": lambda a, b: vs.mean(a),
    "shrink": lambda a, b: vs.shrink(a),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_one_compile_per_bucket(name):
    rng = np.random.default_rng(0)
    model = "B" if name == "kron" else "A"
    # vs.conv is the engine's Python front door (it plans on the host, then runs a
    # jitted plan): its compilations are counted by the backend events alone
    jitted = {"add": vs.add, "sub": vs.sub, "hadamard": vs.hadamard, "conv": None,
              "kron": vs.kron, "scale": vs.scale, "neg": vs.neg, "sum": vs.sum,
              "norm": vs.norm, "mean": vs.mean, "shrink": vs.shrink}[name]
    cache_size = (lambda: 0) if jitted is None else jitted._cache_size
    batches = [(_random_batch(rng, model), _random_batch(rng, model)) for _ in range(N_BATCHES)]
    distinct = {tuple(np.asarray(a.lengths)[:, 0]) for a, _ in batches}
    assert len(distinct) > 100  # the lengths really vary
    jax.block_until_ready(OPS[name](*batches[0]))  # compile (or reuse) the bucket's program
    size_after_first = cache_size()
    with count_compiles() as events:
        for a, b in batches[1:]:
            jax.block_until_ready(OPS[name](a, b))
    assert cache_size() == size_after_first
    assert events == [], f"{name} recompiled {len(events)} times inside one bucket"


def test_new_bucket_compiles_once():
    rng = np.random.default_rng(1)
    policy = vs.CapacityPolicy(minimum=48, alignment=8)
    with count_compiles() as events:
        for _ in range(20):
            lengths = rng.integers(30, 49, size=5)
            x = vs.stack([np.ones(n, np.float32) for n in lengths], policy=policy)
            jax.block_until_ready(vs.norm(x))
    # the first call compiles norm for the (5, 48) bucket (plus tiny helper programs
    # for device_put/conversions at most once); later calls compile nothing
    assert 1 <= len(events) <= 3
