import pytest
from hypothesis import given
from hypothesis import strategies as st

import vsla_jax as vs


@given(st.integers(8, 200_000))
def test_default_ladder_ratio_at_most_1_5(n):
    p = vs.CapacityPolicy()
    c = p.bucket(n)
    assert c >= n
    assert c / n <= 1.5
    assert c % p.alignment == 0


@given(st.integers(0, 7))
def test_below_minimum_uses_minimum(n):
    assert vs.CapacityPolicy().bucket(n) == 8


@given(st.integers(1, 100_000))
def test_pow2_ladder(n):
    p = vs.CapacityPolicy.pow2(minimum=8)
    c = p.bucket(n)
    assert c >= n and (c & (c - 1)) == 0 and c >= 8
    assert c == 8 or c < 2 * n


def test_bucket_is_smallest_rung():
    p = vs.CapacityPolicy()
    ladder = p.ladder(5000)
    assert ladder == sorted(set(ladder))
    for lo, hi in zip(ladder, ladder[1:]):
        assert p.bucket(lo + 1) == hi and p.bucket(hi) == hi


def test_count_ladder():
    assert vs.COUNT_POLICY.ladder(40)[:7] == [1, 3, 6, 10, 16, 25, 39]


def test_bad_policies():
    with pytest.raises(ValueError, match="minimum"):
        vs.CapacityPolicy(minimum=0)
    with pytest.raises(ValueError, match="multiple of"):
        vs.CapacityPolicy(minimum=12, alignment=8)
    with pytest.raises(ValueError, match="cannot keep"):
        vs.CapacityPolicy(minimum=8, alignment=8)
    with pytest.raises(vs.LengthError, match="non-negative"):
        vs.CapacityPolicy().bucket(-1)
