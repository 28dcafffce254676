"""The door every job comes through, from Kafka and from HTTP alike."""

from __future__ import annotations

import asyncio

from consumer.jobs.context import JobOutcome
from consumer.jobs.runner import JobRunner
from schemas.jobs import JobRequest, Source


class JobSlots:
    """At most `limit` jobs run at once; the others wait for a slot. Once closed (the service is
    stopping) the HTTP side turns new callers away, while Kafka records already handed to a lane
    still run: the loop itself stops taking new ones."""

    def __init__(self, runner: JobRunner, limit: int):
        self.runner = runner
        self._slots = asyncio.Semaphore(limit)
        self.closed = False

    async def run(self, request: JobRequest, source: Source) -> JobOutcome:
        async with self._slots:
            return await self.runner.run(request, source)

    def close(self) -> None:
        self.closed = True

    @property
    def in_flight(self) -> int:
        return self.runner.in_flight
