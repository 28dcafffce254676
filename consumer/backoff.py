"""Retry delays: exponential with full jitter (a pure function, so it is easy to test)."""

from __future__ import annotations

import random


def compute_backoff(
    attempt: int, *, base: float = 0.5, factor: float = 2.0, cap: float = 30.0, jitter: bool = True
) -> float:
    """Seconds to wait before retry number `attempt` (1 = the first retry)."""
    if attempt < 1:
        raise ValueError("attempt starts at 1")
    ceiling = min(cap, base * factor ** (attempt - 1))
    return random.uniform(0.0, ceiling) if jitter else ceiling
