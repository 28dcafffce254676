"""The door every job comes through, from Kafka and from HTTP alike."""

from __future__ import annotations

import asyncio

from consumer import activity
from consumer.activity import Phase
from consumer.errors import ShuttingDown
from consumer.jobs.context import JobOutcome
from consumer.jobs.runner import Finish, JobRunner
from schemas.jobs import JobRequest, Source


class JobSlots:
    """At most `limit` jobs run at once; the others wait for a slot (their lane is marked
    waiting, so a revoke or a stop hands them back at once). Once closed (the service is
    stopping) no job starts any more: a caller still waiting, or coming late, gets ShuttingDown
    (HTTP 503; a Kafka record goes back uncommitted)."""

    def __init__(self, runner: JobRunner, limit: int):
        self.runner = runner
        self.free = limit
        self.waiting = 0
        self.closed = False
        # Set whenever a slot frees or the door closes: waiters look again (a semaphore would
        # keep them waiting for a slot through a close).
        self._changed = asyncio.Event()

    async def run(self, request: JobRequest, source: Source, finish: Finish | None = None) -> JobOutcome:
        with activity.phase(Phase.WAITING):
            await self._take()
        try:
            with activity.phase(Phase.RUNNING):
                return await self.runner.run(request, source, finish)
        finally:
            self.free += 1
            self._changed.set()

    async def _take(self) -> None:
        self.waiting += 1
        try:
            while not self.closed and self.free == 0:
                self._changed.clear()
                await self._changed.wait()
        finally:
            self.waiting -= 1
        if self.closed:
            raise ShuttingDown("the service is shutting down")
        self.free -= 1

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    @property
    def in_flight(self) -> int:
        return self.runner.in_flight
