"""The backend's completion callback: POST {BACKEND_URL}/internal/jobs/{job_uuid}/completion.

Sent in the background, retried by the service's one policy (consumer.retry's CALLBACK: a
number of attempts with backoff), so a slow or absent backend never holds a partition or fails a
job: the `ml.job-events` event is the durable record, the callback a convenience. A 5xx, a
timeout or a refused connection is retried; a 4xx (other than 408, 425, 429) says the backend
refuses this payload, and retrying cannot help.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from consumer.auth import issue_token
from consumer.retry import CALLBACK, Deadline, RetryPolicy, retry
from schemas.events import JobEvent, JobStatus

log = logging.getLogger(__name__)

# 4xx answers other than these mean the backend refuses this payload: retrying cannot help.
_RETRYABLE_4XX = {408, 425, 429}


class CallbackRefused(Exception):
    """The backend answered, but not with success."""

    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status = status


def retryable(error: Exception) -> bool:
    if isinstance(error, CallbackRefused):
        return error.status >= 500 or error.status in _RETRYABLE_4XX
    return isinstance(error, (aiohttp.ClientError, TimeoutError))


def completion_payload(event: JobEvent) -> dict[str, Any]:
    """The seed's payload (status, output_object, file_size, file_name) plus result keys and error."""
    payload: dict[str, Any] = {
        "job_uuid": event.job_uuid,
        "status": event.status.value,
        "output_object": event.output_object,
        "file_size": event.file_size,
        "file_name": event.file_name,
        "results_object": event.results_object,
        "report_object": event.report_object,
        "seg_object": event.seg_object,
        "duration_seconds": event.duration_seconds,
    }
    if event.error is not None:
        payload["error"] = event.error.model_dump(mode="json")
    return payload


class BackendNotifier:
    def __init__(
        self,
        backend_url: str,
        secret: str,
        timeout_s: float = 10.0,
        max_attempts: int = 5,
        on_give_up: Callable[[], None] | None = None,
        policy: RetryPolicy = CALLBACK,
    ):
        self.on_give_up = on_give_up
        self.backend_url = backend_url.rstrip("/")
        self.secret = secret
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.policy = dataclasses.replace(policy, attempts=max_attempts)
        self.attempts = 0
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[bool]] = set()
        self.failed = 0
        self.sent = 0

    @property
    def enabled(self) -> bool:
        return bool(self.backend_url)

    def url(self, job_uuid: str) -> str:
        return f"{self.backend_url}/internal/jobs/{job_uuid}/completion"

    def notify(self, event: JobEvent) -> None:
        """Schedule the callback for a final event; returns at once."""
        if not self.enabled or event.status not in (JobStatus.COMPLETED, JobStatus.FAILED):
            return
        # A context of its own: the job's retry budget and its lane's activity are not the callback's.
        task = asyncio.create_task(
            self._deliver(event), name=f"callback-{event.job_uuid}", context=contextvars.Context()
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _headers(self, job_uuid: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.secret:
            # A fresh short-lived JWT per attempt: a retry an hour later still authenticates.
            headers["Authorization"] = f"Bearer {issue_token(self.secret, ttl_s=300, job_uuid=job_uuid)}"
        return headers

    async def _deliver(self, event: JobEvent) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        session = self._session
        payload = completion_payload(event)
        url = self.url(event.job_uuid)

        async def post() -> None:
            self.attempts += 1
            async with session.post(url, json=payload, headers=self._headers(event.job_uuid)) as response:
                if response.status >= 300:
                    raise CallbackRefused(response.status)

        try:
            # Its own limit (attempts), not the job's deadline: the job is finished.
            await retry(
                post, self.policy, retryable, what=f"callback for job {event.job_uuid}", deadline=Deadline(None)
            )
        except (CallbackRefused, aiohttp.ClientError, TimeoutError) as error:
            self.failed += 1
            if self.on_give_up is not None:
                self.on_give_up()
            log.warning("callback for job %s gave up: %s", event.job_uuid, error)
            return False
        self.sent += 1
        return True

    async def drain(self, timeout: float) -> None:
        """Give pending callbacks up to `timeout` seconds, then cancel the rest."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None
