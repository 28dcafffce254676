from __future__ import annotations

import pytest

from consumer.retry import compute_backoff


def test_backoff_grows_and_is_capped() -> None:
    delays = [compute_backoff(n, base=0.5, cap=4.0, jitter=False) for n in range(1, 7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_jitter_stays_below_the_ceiling() -> None:
    for attempt in range(1, 10):
        assert 0.0 <= compute_backoff(attempt, base=1.0, cap=8.0) <= min(8.0, 2 ** (attempt - 1))


def test_attempts_start_at_one() -> None:
    with pytest.raises(ValueError):
        compute_backoff(0)
