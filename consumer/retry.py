"""One policy for retries and deadlines: what is retried, how long to wait, and until when.

Every transient failure of the service is retried here and nowhere else: object storage,
publishing an event, the backend callback, a partition's lane after a record it could not
finish. A retry waits with exponential backoff and full jitter (`compute_backoff`, pure), and
gives up by raising the last error when the next wait would end past its limit:

- the **deadline** of the work it serves: a job's deadline (ML_JOB_TIMEOUT_S) covers the whole
  job, every retry inside it included. It travels in a context variable (`budget`), so a storage
  call deep inside a step retries until the job's deadline without every signature carrying it;
- the policy's **wait**: how long one retry loop may wait from its first failure when nothing
  tighter is in scope (an `/infer` caller is not kept waiting for half an hour);
- the policy's **attempts**, where a count makes more sense than a time (the callback).

While a loop waits, the lane it runs in is marked stalled on `policy.name` (consumer.activity),
which /health and the metrics show.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

from consumer import activity

log = logging.getLogger(__name__)
T = TypeVar("T")


def compute_backoff(
    attempt: int, *, base: float = 0.5, factor: float = 2.0, cap: float = 30.0, jitter: bool = True
) -> float:
    """Seconds to wait before retry number `attempt` (1 = the first retry): full jitter below an
    exponential ceiling, so replicas that failed together do not come back together."""
    if attempt < 1:
        raise ValueError("attempt starts at 1")
    ceiling = min(cap, base * factor ** (attempt - 1))
    return random.uniform(0.0, ceiling) if jitter else ceiling


class Deadline:
    """A point on the monotonic clock; `Deadline(None)` never passes."""

    def __init__(self, at: float | None):
        self.at = at

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        return cls(None if seconds is None else time.monotonic() + seconds)

    def remaining(self) -> float:
        return math.inf if self.at is None else self.at - time.monotonic()

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0

    def earliest(self, other: Deadline) -> Deadline:
        if self.at is None:
            return other
        if other.at is None:
            return self
        return self if self.at <= other.at else other

    def __repr__(self) -> str:
        return f"Deadline(remaining={self.remaining():.1f}s)"


@dataclass(frozen=True)
class Budget:
    """What the work in scope may spend on retries: never past `deadline`, and one retry loop at
    most `max_wait_s` from its first failure (None: up to the deadline)."""

    deadline: Deadline
    max_wait_s: float | None = None


_budget: ContextVar[Budget | None] = ContextVar("retry_budget", default=None)


@contextlib.contextmanager
def budget(deadline: Deadline, max_wait_s: float | None = None) -> Iterator[Budget]:
    """Retries inside the block (in this task, and in tasks and threads it starts) keep to it."""
    scope = Budget(deadline, max_wait_s)
    token = _budget.set(scope)
    try:
        yield scope
    finally:
        _budget.reset(token)


def current_budget() -> Budget | None:
    return _budget.get()


@dataclass(frozen=True)
class RetryPolicy:
    """How one kind of call is retried. `wait_s` bounds a loop when no budget is in scope;
    `attempts` bounds it by count; `on_retry` counts retries (a metric)."""

    name: str
    base: float = 0.5
    cap: float = 10.0
    wait_s: float | None = 30.0
    attempts: int | None = None
    on_retry: Callable[[], None] | None = field(default=None, compare=False)
    jitter: bool = True

    def backoff(self, attempt: int) -> float:
        return compute_backoff(attempt, base=self.base, cap=self.cap, jitter=self.jitter)

    def limit(self) -> Deadline:
        """When a loop whose first failure is now must give up: the scope's deadline and wait when
        a scope is set (a job's), else the policy's own wait."""
        scope = current_budget()
        if scope is None:
            return Deadline.after(self.wait_s)
        return scope.deadline.earliest(Deadline.after(scope.max_wait_s))


async def retry(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    retryable: Callable[[Exception], bool],
    *,
    what: str = "",
    deadline: Deadline | None = None,
) -> T:
    """`call()` until it returns, raises what is not `retryable`, or its limit comes: then the last
    error is raised. `deadline` replaces the limit the policy and the scope would set."""
    limit: Deadline | None = deadline
    attempt = 0
    with contextlib.ExitStack() as stall:
        while True:
            attempt += 1
            try:
                return await call()
            except Exception as error:
                if not retryable(error):
                    raise
                if limit is None:
                    limit = policy.limit()  # a loop's wait counts from its first failure
                delay = policy.backoff(attempt)
                if (policy.attempts is not None and attempt >= policy.attempts) or limit.remaining() <= delay:
                    raise
                if attempt == 1:
                    stall.enter_context(activity.stalled(policy.name))
                log.info("%s %s failed (%s); retry %d in %.1f s", policy.name, what, error, attempt, delay)
                if policy.on_retry is not None:
                    policy.on_retry()
            await asyncio.sleep(delay)


# The policies of the service, by what they retry. The service adds its metric counters.
STORAGE = RetryPolicy("storage", base=0.25, cap=5.0, wait_s=30.0)
PUBLISH = RetryPolicy("publish", base=0.2, cap=5.0, wait_s=30.0)
CALLBACK = RetryPolicy("callback", base=0.5, cap=30.0, wait_s=None, attempts=5)
LANE = RetryPolicy("lane", base=1.0, cap=60.0, wait_s=None)
