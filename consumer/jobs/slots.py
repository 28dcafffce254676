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
        self._slots = asyncio.Semaphore(limit)
        self.closed = False

    async def run(self, request: JobRequest, source: Source, finish: Finish | None = None) -> JobOutcome:
        self._refuse_if_closed()
        with activity.phase(Phase.WAITING):
            await self._slots.acquire()
        try:
            self._refuse_if_closed()
            with activity.phase(Phase.RUNNING):
                return await self.runner.run(request, source, finish)
        finally:
            self._slots.release()

    def _refuse_if_closed(self) -> None:
        if self.closed:
            raise ShuttingDown("the service is shutting down")

    def close(self) -> None:
        self.closed = True

    @property
    def in_flight(self) -> int:
        return self.runner.in_flight
