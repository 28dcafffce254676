"""Progress events while a model runs, so a long job is visibly alive.

The engine reports the share of its work done from its worker thread; a ticker on the event
loop publishes the latest share every `interval_s` (never more often), mapped into the part of
the job that inference covers. A progress event that cannot be published is logged and
skipped: only the final event decides a job's fate.

The reporter also ends a model run that nobody waits for any more: once the job left the
reporter (cancelled at the end of a revoke's or a stop's grace, or past its deadline), the next
report from the worker thread raises, so the thread stops instead of computing a discarded
result on CPUs the next job needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from consumer.errors import EventPublishError
from consumer.jobs.context import JobContext
from consumer.jobs.events import job_event
from schemas.events import JobEvent, JobStatus

log = logging.getLogger(__name__)

INTERVAL_S = 2.0


class RunAbandoned(RuntimeError):
    """Raised in a model's worker thread whose job was given up."""


class ProgressReporter:
    def __init__(
        self,
        publish: Callable[[JobEvent], Awaitable[None]],
        ctx: JobContext,
        *,
        span: tuple[float, float] = (0.2, 0.8),
        interval_s: float = INTERVAL_S,
    ):
        self.publish = publish
        self.ctx = ctx
        self.span = span
        self.interval_s = interval_s
        self.share = 0.0
        self.closed = False
        self._task: asyncio.Task[None] | None = None

    def report(self, share: float) -> None:
        """Called from the worker thread: a float assignment, which is atomic; the ticker reads it."""
        if self.closed:
            raise RunAbandoned(f"job {self.ctx.job_uuid} was given up")
        self.share = min(1.0, max(0.0, share))

    async def __aenter__(self) -> ProgressReporter:
        self._task = asyncio.create_task(self._tick(), name=f"progress-{self.ctx.job_uuid}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            low, high = self.span
            event = job_event(
                self.ctx, JobStatus.PROGRESS, step="infer", progress=round(low + (high - low) * self.share, 3)
            )
            try:
                await self.publish(event)
            except EventPublishError as error:
                log.warning("job %s: progress event not published: %s", self.ctx.job_uuid, error)
