"""Capacity ladders: which static capacity a logical length is stored in.

A capacity is a static (compile-time) size; a length is a traced value. All lengths
that fall in the same bucket share one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np

from vsla_jax.errors import LengthError, PolicyError, VSLATypeError


@dataclasses.dataclass(frozen=True)
class CapacityPolicy:
    """A geometric ladder of capacities.

    The ladder starts at ``minimum``; every rung is a multiple of ``alignment`` and
    rung ``c'`` after ``c`` is the largest aligned value ``<= growth * (c + 1)``
    (at least ``c + alignment``). Any length ``n >= minimum`` therefore lands in a
    capacity ``<= growth * n`` whenever ``minimum >= (alignment - growth) / (growth - 1)``,
    which the constructor checks. ``powers_of_two=True`` gives the plain ladder
    ``minimum, 2*minimum, 4*minimum, ...`` instead (ratio up to 2).
    ``steps_per_octave=s`` gives ``s`` evenly spaced rungs per doubling instead
    (``16, 20, 24, 28, 32, 40, ...`` for ``s=4``): every power of two at or above
    ``minimum`` is a rung, and the ratio is at most ``1 + 1/s`` from ``minimum`` up.

    Attributes:
      minimum: smallest capacity (>= 1). Lengths below it are stored at ``minimum``.
      alignment: every capacity is a multiple of this.
      growth: ratio bound between consecutive rungs (> 1).
      powers_of_two: use the doubling ladder.
      steps_per_octave: use the octave ladder with this many rungs per doubling (0: off).
    """

    minimum: int = 8
    alignment: int = 4
    growth: float = 1.5
    powers_of_two: bool = False
    steps_per_octave: int = 0

    def __post_init__(self):
        for name in ("minimum", "alignment", "steps_per_octave"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise VSLATypeError(f"CapacityPolicy {name} must be an integer, got {v!r}")
        if not isinstance(self.powers_of_two, (bool, np.bool_)):
            raise VSLATypeError(f"CapacityPolicy powers_of_two must be a bool, got "
                                f"{self.powers_of_two!r}")
        if isinstance(self.growth, bool) or not isinstance(self.growth, (int, float, np.number)) \
                or not math.isfinite(self.growth):
            raise PolicyError(f"CapacityPolicy growth must be a finite number > 1, got "
                              f"{self.growth!r}")
        if self.steps_per_octave < 0:
            raise PolicyError(f"CapacityPolicy steps_per_octave must be >= 0 (0: off), got "
                              f"{self.steps_per_octave}")
        if self.minimum < 1 or self.alignment < 1:
            raise PolicyError(
                f"CapacityPolicy needs minimum >= 1 and alignment >= 1, got "
                f"minimum={self.minimum}, alignment={self.alignment}"
            )
        if self.minimum % self.alignment:
            raise PolicyError(
                f"CapacityPolicy minimum={self.minimum} is not a multiple of "
                f"alignment={self.alignment}"
            )
        if self.steps_per_octave:
            m = self.minimum
            if self.powers_of_two or self.steps_per_octave < 1 or m & (m - 1) or (
                    m < self.steps_per_octave):
                raise PolicyError(
                    f"CapacityPolicy steps_per_octave={self.steps_per_octave} needs a "
                    f"power-of-two minimum >= steps_per_octave and powers_of_two=False, got "
                    f"minimum={m}, powers_of_two={self.powers_of_two}")
        elif not self.powers_of_two:
            if not self.growth > 1.0:
                raise PolicyError(f"CapacityPolicy growth must be > 1, got {self.growth}")
            if self.minimum * (self.growth - 1.0) < self.alignment - self.growth:
                raise PolicyError(
                    f"CapacityPolicy(minimum={self.minimum}, alignment={self.alignment}, "
                    f"growth={self.growth}) cannot keep capacity/length <= growth: raise "
                    f"minimum to at least "
                    f"{math.ceil((self.alignment - self.growth) / (self.growth - 1.0))}"
                )

    @classmethod
    def pow2(cls, minimum: int = 16) -> CapacityPolicy:
        """The doubling ladder ``minimum * 2**k``."""
        return cls(minimum=minimum, alignment=1, powers_of_two=True)

    @classmethod
    def octave(cls, steps: int = 4, minimum: int = 16) -> CapacityPolicy:
        """``steps`` rungs per doubling from ``minimum`` (a power of two): ratio <= 1 + 1/steps."""
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise PolicyError(f"CapacityPolicy.octave needs steps >= 1, got {steps!r}")
        return cls(minimum=minimum, alignment=1, steps_per_octave=steps)

    def _next(self, c: int) -> int:
        if self.powers_of_two:
            return 2 * c
        if self.steps_per_octave:  # rungs p + ceil(i p / s) of the octave [p, 2p)
            s, p = self.steps_per_octave, 1 << (c.bit_length() - 1)
            i = (c - p) * s // p + 1
            return p + -(-i * p // s)
        a = self.alignment
        return max(c + a, int(math.floor(self.growth * (c + 1) / a)) * a)

    def bucket(self, n: int) -> int:
        """The smallest capacity on the ladder that holds length ``n`` (an integer >= 0)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise LengthError(f"a length must be an integer, got {n!r}")
        return _bucket(self, int(n))

    def capacity(self, lengths: Sequence[int]) -> tuple[int, ...]:
        """Per-axis capacities for one item's lengths (or per-axis maxima)."""
        return tuple(self.bucket(n) for n in lengths)

    def bucket_array(self, lengths) -> np.ndarray:
        """Vectorised ``bucket`` over an integer array of lengths (any shape)."""
        n = np.asarray(lengths, np.int64)
        if n.size and n.min() < 0:
            raise LengthError(f"lengths must be non-negative, got {n.min()}")
        ladder = np.asarray(self.ladder(int(n.max()) if n.size else 0), np.int64)
        return ladder[np.searchsorted(ladder, n, side="left")]

    def ladder(self, upto: int) -> list[int]:
        """All rungs up to and including the bucket of ``upto``."""
        return list(_ladder(self, _bucket(self, max(int(upto), 0))))


@functools.lru_cache(maxsize=65536)
def _bucket(policy: CapacityPolicy, n: int) -> int:
    if n < 0:
        raise LengthError(f"lengths must be non-negative, got {n}")
    c = policy.minimum
    while c < n:
        c = policy._next(c)
    return c


@functools.lru_cache(maxsize=1024)
def _ladder(policy: CapacityPolicy, top: int) -> tuple[int, ...]:
    out = [policy.minimum]
    while out[-1] < top:
        out.append(policy._next(out[-1]))
    return tuple(out)


DEFAULT_POLICY = CapacityPolicy()


def check_policy(policy, who: str) -> CapacityPolicy:
    """``policy`` if it is a ``CapacityPolicy``, ``DEFAULT_POLICY`` for None, else
    ``VSLATypeError`` naming ``who`` (``vs.stack(items, "B")`` passes a model as the
    policy)."""
    if policy is None:
        return DEFAULT_POLICY
    if not isinstance(policy, CapacityPolicy):
        raise VSLATypeError(f"{who}: policy must be a vs.CapacityPolicy or None, got "
                            f"{type(policy).__name__} {policy!r:.40}")
    return policy
#: Ladder for the number of items per bucket (1, 3, 6, 10, 16, 25, ...: ratio <= 1.5).
COUNT_POLICY = CapacityPolicy(minimum=1, alignment=1, growth=1.5)
