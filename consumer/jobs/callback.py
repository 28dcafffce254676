"""The backend's completion callback: POST {BACKEND_URL}/internal/jobs/{job_uuid}/completion.

Sent in the background with retries, so a slow or absent backend never holds a partition or
fails a job: the `ml.job-events` event is the durable record, the callback a convenience.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from consumer.auth import issue_token
from consumer.backoff import compute_backoff
from schemas.events import JobEvent, JobStatus

log = logging.getLogger(__name__)

# 4xx answers other than these mean the backend refuses this payload: retrying cannot help.
_RETRYABLE_4XX = {408, 425, 429}


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
    ):
        self.on_give_up = on_give_up
        self.backend_url = backend_url.rstrip("/")
        self.secret = secret
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_attempts = max_attempts
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
        task = asyncio.create_task(self._deliver(event), name=f"callback-{event.job_uuid}")
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
        payload = completion_payload(event)
        for attempt in range(1, self.max_attempts + 1):
            try:
                async with self._session.post(
                    self.url(event.job_uuid), json=payload, headers=self._headers(event.job_uuid)
                ) as response:
                    if response.status < 300:
                        self.sent += 1
                        return True
                    retryable = response.status >= 500 or response.status in _RETRYABLE_4XX
                    reason = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as error:
                retryable, reason = True, f"{type(error).__name__}: {error}"
            if not retryable or attempt == self.max_attempts:
                break
            log.info("callback for job %s failed (%s); retry %d", event.job_uuid, reason, attempt)
            await asyncio.sleep(compute_backoff(attempt))
        self.failed += 1
        if self.on_give_up is not None:
            self.on_give_up()
        log.warning("callback for job %s gave up after %d attempt(s): %s", event.job_uuid, attempt, reason)
        return False

    async def drain(self, timeout: float) -> None:
        """Give pending callbacks up to `timeout` seconds, then cancel the rest."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None
