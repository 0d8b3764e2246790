import random

import pytest

from supervisor.core.backoff import Backoff, gives_up


def test_exponential_and_capped() -> None:
    b = Backoff(initial=2, factor=2, cap=30, jitter=0)
    assert [b.delay(n) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]
    assert b.delay(10_000) == 30  # no overflow for long streaks


def test_zero_initial_means_immediate() -> None:
    assert Backoff(0, 2, 10, 0.5).delay(5) == 0


def test_jitter_stays_within_bounds_and_spreads() -> None:
    b = Backoff(initial=10, factor=1, cap=10, jitter=0.2)
    rng = random.Random(1)
    delays = [b.delay(1, rng) for _ in range(500)]
    assert all(8 <= d <= 12 for d in delays)
    assert max(delays) - min(delays) > 3  # not in lockstep


@pytest.mark.parametrize(
    "failures,max_retries,expected",
    [
        (1, 3, False),
        (3, 3, False),
        (4, 3, True),
        (1000, 0, False),
        (1, 1, False),
        (2, 1, True),
    ],
)
def test_gives_up(failures, max_retries, expected) -> None:
    assert gives_up(failures, max_retries) is expected
