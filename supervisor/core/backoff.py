"""Exponential backoff as pure math: delays are data, the sleeping is done elsewhere."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float
    factor: float
    cap: float
    jitter: float  # fraction: 0.1 spreads each delay uniformly over +-10 %

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before the start that follows the `failures`-th consecutive failure.

        Jitter keeps many instances that crashed together (a driver reset, an OOM on a shared
        GPU) from restarting in lockstep and fighting over the same memory again.
        """
        if failures < 1 or self.initial <= 0:
            return 0.0
        # min() before the power would overflow for long streaks: clamp the exponent instead.
        base = self.initial
        for _ in range(failures - 1):
            base *= self.factor
            if base >= self.cap:
                base = self.cap
                break
        base = min(base, self.cap)
        if self.jitter:
            base *= 1.0 + (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, base)


def gives_up(failures: int, max_retries: int) -> bool:
    """True once a streak of `failures` consecutive failed starts exhausts `max_retries`.

    `max_retries` counts restarts after the first failure, as supervisord's `startretries`
    does: with 3, an instance is tried four times before FATAL. 0 means never give up.
    """
    return max_retries > 0 and failures > max_retries
