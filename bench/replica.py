"""A service replica for the benchmark: `python -m consumer serve` as its own process.

Its own process, so that what the benchmark reports is the service's: start to ready (the
process started, models loaded, runtimes checked, group joined: GET /health/ready answers 200),
its RSS sampled from outside, its logs (JSON lines) kept in a file for the engine's own split of
each job's inference step.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil

from consumer.dev.localstack import LocalStack, free_port
from consumer.settings import Settings

READY_TIMEOUT_S = 240.0
_SAMPLE_S = 0.05


@dataclass(frozen=True)
class ReplicaConfig:
    """What differs between the replicas of one benchmark run."""

    name: str  # also its jobs topic suffix and consumer group
    precision: str = "auto"
    runtime: str = "auto"
    max_concurrent_jobs: int | None = None  # None: the service's default

    def environment(self, stack: LocalStack, http_port: int, workdir: Path) -> dict[str, str]:
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap,
            "MINIO_ENDPOINT": stack.s3_endpoint,
            "HTTP_HOST": "127.0.0.1",
            "HTTP_PORT": str(http_port),
            "KAFKA_JOBS_TOPIC": f"bench.jobs.{self.name}",
            "KAFKA_GROUP_ID": f"bench-{self.name}",
            "ML_PRECISION": self.precision,
            "ML_RUNTIME": self.runtime,
            "ML_ALLOW_INSECURE": "1",
            "ML_WORKDIR": str(workdir),
            "LOG_LEVEL": "INFO",
            "LOG_FORMAT": "json",
        }
        if self.max_concurrent_jobs is not None:
            env["ML_MAX_CONCURRENT_JOBS"] = str(self.max_concurrent_jobs)
        return env

    def settings(self, stack: LocalStack) -> Settings:
        """The settings a client of this replica (producer, event follower, bucket) uses."""
        return Settings(
            kafka_bootstrap_servers=stack.bootstrap,
            minio_endpoint=stack.s3_endpoint,
            kafka_jobs_topic=f"bench.jobs.{self.name}",
            kafka_group_id=f"bench-{self.name}",
        )


class RssSampler:
    """The process's resident memory every 50 ms, in a thread; peaks between marks."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.samples.append((time.monotonic(), self.process.memory_info().rss))
            self._stop.wait(_SAMPLE_S)

    def now(self) -> int:
        return int(self.process.memory_info().rss)

    def peak(self, since: float, until: float | None = None) -> int:
        end = time.monotonic() if until is None else until
        return max((rss for at, rss in list(self.samples) if since <= at <= end), default=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)


@dataclass
class Replica:
    config: ReplicaConfig
    process: subprocess.Popen[bytes]
    http_port: int
    log_path: Path
    ready_s: float = 0.0
    idle_rss: int = 0
    rss: RssSampler | None = None
    notes: list[str] = field(default_factory=list)

    def engine_timings(self, job_uuid: str) -> dict[str, float]:
        """The engine's split of the job's inference step, from the replica's log line for it."""
        for line in self.log_path.read_bytes().splitlines():
            if b"engine_timings" not in line or job_uuid.encode() not in line:
                continue
            with contextlib.suppress(orjson.JSONDecodeError):
                entry: dict[str, Any] = orjson.loads(line)
                if entry.get("job_uuid") == job_uuid:
                    return {str(k): float(v) for k, v in entry["engine_timings"].items()}
        return {}

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/health", timeout=5) as response:
            body: dict[str, Any] = orjson.loads(response.read())
            return body


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def replica(config: ReplicaConfig, stack: LocalStack, workdir: Path) -> Iterator[Replica]:
    """A started replica, ready; stopped (SIGTERM, then SIGKILL) on the way out."""
    port = free_port()
    log_path = workdir / f"replica-{config.name}.log"
    work = workdir / f"work-{config.name}"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **config.environment(stack, port, work)}
    started = time.monotonic()
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "consumer", "serve"], env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    running = Replica(config, process, port, log_path, rss=RssSampler(process.pid))
    try:
        _wait_ready(running, started)
        time.sleep(1.0)  # settle: the first health probes and the group's first fetches
        assert running.rss is not None
        running.idle_rss = running.rss.now()
        yield running
    finally:
        if running.rss is not None:
            running.rss.stop()
        _stop(process)


def _wait_ready(running: Replica, started: float) -> None:
    while not _ready(running.http_port):
        if running.process.poll() is not None:
            tail = running.log_path.read_text(errors="replace")[-3000:]
            raise SystemExit(f"replica {running.config.name} exited with {running.process.returncode}:\n{tail}")
        if time.monotonic() - started > READY_TIMEOUT_S:
            raise SystemExit(f"replica {running.config.name} not ready after {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.05)
    running.ready_s = time.monotonic() - started


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
