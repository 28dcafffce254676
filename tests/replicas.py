"""Replicas of the service as real processes (`python -m consumer serve`), for the chaos suite.

A `Replica` starts, is killed (SIGKILL), is stopped (SIGTERM, timed) and is started again under
the same name; a sampler keeps each name's peak RSS. `Scoreboard` counts what the job events
topic says about the jobs a scenario sent: completed, failed, lost, duplicate final events.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from consumer.dev.localstack import LocalStack, free_port
from consumer.settings import Settings
from tests.conftest import FINAL, SECRET, EventLog


def replica_env(settings: Settings, stack: LocalStack, workdir: Path, **extra: str) -> dict[str, str]:
    """What a replica reads from its environment: the test stack, its topics and group, a light model."""
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap,
        "MINIO_ENDPOINT": stack.s3_endpoint,
        "KAFKA_GROUP_ID": settings.kafka_group_id,
        "KAFKA_JOBS_TOPIC": settings.kafka_jobs_topic,
        "KAFKA_MINIO_EVENTS_TOPIC": settings.kafka_minio_events_topic,
        "KAFKA_JOB_EVENTS_TOPIC": settings.kafka_job_events_topic,
        "KAFKA_DLQ_TOPIC": settings.kafka_dlq_topic,
        "KAFKA_SESSION_TIMEOUT_MS": "6000",
        "KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
        "ML_SERVICE_TOKEN": SECRET,
        "MODEL_NAME": "medical_segmentation_v1",
        "ML_RUNTIME": "torch",
        "ML_TORCH_THREADS": "1",
        "ML_READER_THREADS": "1",
        "ML_WORKDIR": str(workdir),
        "ML_SHUTDOWN_GRACE_S": "20",
        "ML_LAG_REFRESH_S": "2",
        "HTTP_HOST": "127.0.0.1",
        "LOG_FORMAT": "text",
        "LOG_LEVEL": "INFO",
        "BACKEND_URL": "",
    }
    env.update(extra)
    return env


@dataclass
class Replica:
    name: str
    env: dict[str, str]
    log_dir: Path
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    peak_rss: int = 0
    starts: int = 0

    def start(self) -> None:
        self.port = free_port()
        self.starts += 1
        log = self.log_dir / f"{self.name}.{self.starts}.log"
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "consumer", "serve"],
                env={**self.env, "HTTP_PORT": str(self.port)},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def ready(self, timeout: float = 120.0) -> None:
        """Once it has loaded its model and joined its group (or: there are more replicas than
        partitions with work, and it is at least serving)."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if not self.alive:
                    raise AssertionError(f"replica {self.name} exited with {self.process and self.process.returncode}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(f"{self.url}/health/ready", timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.2)
        raise AssertionError(f"replica {self.name} not ready within {timeout} s")

    async def metric(self, name: str) -> float | None:
        """One unlabelled sample of its /metrics, or None when it does not answer."""
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{self.url}/metrics", timeout=aiohttp.ClientTimeout(total=2)) as r,
            ):
                for line in (await r.text()).splitlines():
                    if line.startswith(name + " "):
                        return float(line.split()[1])
        return None

    async def health(self) -> dict[str, Any] | None:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=5)) as r,
            ):
                body: dict[str, Any] = await r.json()
                return body
        return None

    def kill(self) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    async def terminate(self, timeout: float = 120.0) -> float:
        """SIGTERM; seconds until it exited."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        while self.process.poll() is None:
            if time.monotonic() - started > timeout:
                self.kill()
                raise AssertionError(f"replica {self.name} did not exit within {timeout} s of SIGTERM")
            await asyncio.sleep(0.1)
        return time.monotonic() - started

    def sample(self) -> None:
        if not self.alive:
            return
        assert self.process is not None
        with contextlib.suppress(psutil.Error):
            self.peak_rss = max(self.peak_rss, psutil.Process(self.process.pid).memory_info().rss)

    def rss(self) -> int:
        assert self.process is not None
        return int(psutil.Process(self.process.pid).memory_info().rss)


@dataclass
class Fleet:
    """The replicas of one scenario, with an RSS sampler running while they do."""

    replicas: list[Replica]
    _sampler: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Fleet:
        for replica in self.replicas:
            replica.start()
        await asyncio.gather(*(replica.ready() for replica in self.replicas))
        self._sampler = asyncio.create_task(self._sample())
        return self

    async def _sample(self) -> None:
        while True:
            for replica in self.replicas:
                replica.sample()
            await asyncio.sleep(0.25)

    async def __aexit__(self, *exc: object) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        for replica in self.replicas:
            if replica.alive:
                replica.kill()

    def __getitem__(self, index: int) -> Replica:
        return self.replicas[index]


@dataclass
class Row:
    scenario: str
    sent: int
    completed: int
    failed: int
    lost: int
    duplicates: int
    drain_s: float
    peak_rss_mb: list[float]
    note: str = ""

    def cells(self) -> list[str]:
        rss = " / ".join(f"{mb:.0f}" for mb in self.peak_rss_mb)
        return [
            self.scenario,
            str(self.sent),
            str(self.completed),
            str(self.failed),
            str(self.lost),
            str(self.duplicates),
            f"{self.drain_s:.1f}",
            rss,
            self.note,
        ]


HEADER = [
    "scenario",
    "sent",
    "completed",
    "failed",
    "lost",
    "duplicate final events",
    "drain (s)",
    "peak RSS per replica (MB)",
    "notes",
]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Scoreboard:
    """What the job events say about the jobs a scenario sent."""

    events: EventLog
    jobs: list[str] = field(default_factory=list)

    def finals(self, job: str) -> list[dict[str, Any]]:
        return [e for e in self.events.by_job.get(job, []) if e.get("status") in FINAL]

    def counts(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for job in self.jobs:
            finals = self.finals(job)
            if not finals:
                counts["lost"] += 1
                continue
            # A job that completed once is completed (a redelivered duplicate may say so again).
            counts["completed" if any(e["status"] == "completed" for e in finals) else "failed"] += 1
            counts["duplicates"] += len(finals) - 1
        return counts

    def done(self) -> bool:
        return all(self.finals(job) for job in self.jobs)

    async def drained(self, since: float, timeout: float) -> float:
        """Seconds from `since` (time.monotonic()) until every job sent has a final event."""
        await self.events.until(self.done, timeout, "every job's final event")
        return time.monotonic() - since

    def row(self, scenario: str, drain_s: float, fleet: Fleet, note: str = "") -> Row:
        counts = self.counts()
        return Row(
            scenario,
            len(self.jobs),
            counts["completed"],
            counts["failed"],
            counts["lost"],
            counts["duplicates"],
            drain_s,
            [replica.peak_rss / 2**20 for replica in fleet.replicas],
            note,
        )
