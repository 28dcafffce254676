"""What a unit of work (a partition's lane) is doing now, told from deep inside it.

A lane binds an `Activity` to its task; code far below it (the job slots, a retry loop, the disk
check) marks what it does through the context variable, without being handed the lane:

- `phase`: waiting for a job slot, running a job, or finishing it (publish + commit). A stop or a
  revoke hands back a lane that only waits at once, and gives a running one its grace.
- `stall`: since when, and on what, the work waits for a dependency (storage down, no disk
  space, an event that cannot be published). /health and the metrics show a long stall.

Outside a lane (an HTTP job) nothing is bound and every mark is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum


class Phase(StrEnum):
    IDLE = "idle"
    WAITING = "waiting"  # for a job slot: nothing started yet
    RUNNING = "running"
    FINISHING = "finishing"


@dataclass
class Activity:
    phase: Phase = Phase.IDLE
    stall_reason: str | None = None
    stalled_since: float | None = None  # time.monotonic()
    stalls: int = 0  # waits under way (parallel uploads may all be retrying)

    def stall(self, reason: str) -> None:
        """Mark a wait on a dependency; the first mark's time stays until the last wait ends."""
        if self.stalled_since is None:
            self.stalled_since = time.monotonic()
        self.stall_reason = reason
        self.stalls += 1

    def unstall(self) -> None:
        self.stalls = max(0, self.stalls - 1)
        if self.stalls == 0:
            self.clear()

    def clear(self) -> None:
        """Progress: whatever was waited on is over."""
        self.stall_reason, self.stalled_since, self.stalls = None, None, 0

    def stalled_for(self, now: float | None = None) -> float:
        if self.stalled_since is None:
            return 0.0
        return (time.monotonic() if now is None else now) - self.stalled_since


_current: ContextVar[Activity | None] = ContextVar("activity", default=None)


def current() -> Activity:
    """The bound activity, or a throwaway one (marks on it go nowhere)."""
    return _current.get() or Activity()


@contextlib.contextmanager
def bound(activity: Activity) -> Iterator[Activity]:
    token = _current.set(activity)
    try:
        yield activity
    finally:
        _current.reset(token)


@contextlib.contextmanager
def phase(value: Phase) -> Iterator[None]:
    activity = current()
    before = activity.phase
    activity.phase = value
    try:
        yield
    finally:
        activity.phase = before


@contextlib.contextmanager
def stalled(reason: str) -> Iterator[None]:
    """Marks a wait on a dependency for as long as the block runs."""
    activity = current()
    activity.stall(reason)
    try:
        yield
    finally:
        activity.unstall()


class Finals:
    """Final writes in flight (a job's final event and the commit that follows it), each shielded
    from cancellation: a cancel reaches the caller, never the write, and a stop awaits them."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self, write: Callable[[], Awaitable[None]]) -> None:
        async def finishing() -> None:
            with phase(Phase.FINISHING):
                await write()

        task = asyncio.ensure_future(finishing())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        await asyncio.shield(task)

    async def wait(self, timeout: float) -> None:
        """Give the writes under way up to `timeout` seconds; those still running are cancelled."""
        if not self.tasks:
            return
        _, late = await asyncio.wait(set(self.tasks), timeout=max(0.0, timeout))
        for task in late:
            task.cancel()
