"""Test session: a real Kafka-protocol broker and a real S3 server on free ports, one service on them.

Everything here is real: the embedded stack of `python -m consumer dev` (Tansu + SeaweedFS),
the service's own Kafka loop, HTTP server and model. Jobs are told apart by their ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nibabel as nib
import numpy as np
import orjson
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from consumer.auth import issue_token
from consumer.dev.localstack import LocalStack, S3Ports, free_port, prepare_stack
from consumer.service import Service
from consumer.settings import Settings
from consumer.storage import ObjectStore
from consumer.transport.clients import make_consumer, make_producer
from models.phantom import Phantom, job_phantom, save_phantom

FINAL = {"completed", "failed"}


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    local = LocalStack(tmp_path_factory.mktemp("stack"), free_port(), S3Ports.free())
    local.start()
    yield local
    local.stop()


@dataclass
class Backend:
    """A small aiohttp server standing in for the backend's completion endpoint."""

    port: int
    calls: list[tuple[str, dict[str, str], dict[str, Any]]] = field(default_factory=list)
    runner: web.AppRunner | None = None
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        async def completion(request: web.Request) -> web.Response:
            self.calls.append((request.match_info["job"], dict(request.headers), await request.json()))
            async with self.arrived:
                self.arrived.notify_all()
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_post("/internal/jobs/{job}/completion", completion)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def calls_for(self, job: str) -> list[dict[str, Any]]:
        return [payload for job_id, _, payload in self.calls if job_id == job]

    async def wait_for_call(self, job: str, timeout: float = 20.0) -> dict[str, Any]:
        """The first callback for `job`, once it has arrived."""
        async with asyncio.timeout(timeout), self.arrived:
            await self.arrived.wait_for(lambda: bool(self.calls_for(job)))
        return self.calls_for(job)[0]


@pytest.fixture(scope="session")
async def backend() -> AsyncIterator[Backend]:
    server = Backend(free_port())
    await server.start()
    yield server
    await server.stop()


MAX_INPUT_BYTES = 32 * 1024**2
SECRET = "test-secret-0123456789abcdef-0123456789"
PREVIOUS_SECRET = "test-previous-secret-fedcba9876543210"


def make_settings(stack: LocalStack, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": stack.bootstrap,
        "minio_endpoint": stack.s3_endpoint,
        "http_host": "127.0.0.1",
        "http_port": free_port(),
        "kafka_group_id": f"ml-service-test-{uuid.uuid4().hex[:8]}",
        "kafka_session_timeout_ms": 6000,
        "kafka_heartbeat_interval_ms": 1000,
        "ml_shutdown_grace_s": 20.0,
        "callback_max_attempts": 2,
        "callback_timeout_s": 2.0,
        "ml_torch_threads": 2,
        "log_format": "text",
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
async def settings(stack: LocalStack, backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return make_settings(
        stack,
        backend_url=backend.url,
        ml_service_token=SECRET,
        ml_service_token_previous=PREVIOUS_SECRET,
        ml_lag_refresh_s=1.0,
        # A private work directory, so tests can check that every job leaves it empty.
        ml_workdir=tmp_path_factory.mktemp("workdir"),
        ml_max_input_bytes=MAX_INPUT_BYTES,
        # Off for the shared service, so that its tests see the whole pipeline whatever ran
        # before them; the result cache's tests run services of their own (with fresh_scan).
        ml_result_cache=False,
    )


@pytest.fixture(scope="session")
async def store(settings: Settings) -> ObjectStore:
    return await prepare_stack(settings)


async def start_service(settings: Settings) -> Service:
    service = Service(settings)
    await service.start()
    await asyncio.wait_for(service.worker.joined.wait(), 60)
    return service


@pytest.fixture(scope="session")
async def service(settings: Settings, store: ObjectStore) -> AsyncIterator[Service]:
    running = await start_service(settings)
    yield running
    await running.stop()


class EventLog:
    """Collects every record of one topic in the background, so a test can wait for what it expects."""

    def __init__(self, settings: Settings, topic: str):
        self.settings = settings
        self.topic = topic
        self.records: list[dict[str, Any]] = []
        self.by_job: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._partitions: list[TopicPartition] = []
        self._read_to: dict[TopicPartition, int] = {}  # the offset after the last record read
        self._arrived = asyncio.Condition()

    async def start(self) -> None:
        self._consumer = make_consumer(self.settings, None)
        await self._consumer.start()
        partitions = await self._partitions_of_topic()
        self._partitions = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(self._partitions)
        await self._consumer.seek_to_beginning(*self._partitions)
        self._task = asyncio.create_task(self._run())

    async def _partitions_of_topic(self, within_s: float = 15.0) -> set[int]:
        """The topic's partitions once the consumer's metadata knows them: a topic created just
        before may not be in the metadata its start fetched (seen in CI: nothing assigned)."""
        assert self._consumer is not None
        deadline = time.monotonic() + within_s
        while not (partitions := self._consumer.partitions_for_topic(self.topic)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {self.topic} has no partitions after {within_s:.0f} s")
            await self._consumer.topics()  # a metadata request: the new topic's partitions with it
            await asyncio.sleep(0.1)
        return partitions

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                for record in records:
                    value = orjson.loads(record.value)
                    self.records.append(value)
                    if "job_uuid" in value:
                        self.by_job[value["job_uuid"]].append(value)
                if records:
                    self._read_to[tp] = records[-1].offset + 1
            if batches:
                async with self._arrived:
                    self._arrived.notify_all()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._consumer is not None:
            await self._consumer.stop()

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 120.0) -> dict[str, Any]:
        """The first record that matches, once it has arrived."""

        def match() -> dict[str, Any] | None:
            return next((record for record in self.records if predicate(record)), None)

        try:
            async with asyncio.timeout(timeout), self._arrived:
                found = await self._arrived.wait_for(match)
        except TimeoutError:
            raise AssertionError(f"nothing matched on {self.topic} within {timeout} s") from None
        assert found is not None
        return found

    async def until(self, condition: Callable[[], bool], timeout: float = 120.0, what: str = "the condition") -> None:
        """Returns once `condition()` holds, looked at again whenever records arrive."""
        try:
            async with asyncio.timeout(timeout), self._arrived:
                await self._arrived.wait_for(condition)
        except TimeoutError:
            raise AssertionError(f"{what} did not hold on {self.topic} within {timeout} s") from None

    async def caught_up(self, timeout: float = 30.0) -> None:
        """Returns once every record on the topic at the time of the call has been read."""
        assert self._consumer is not None
        starts = await self._consumer.beginning_offsets(self._partitions)
        ends = await self._consumer.end_offsets(self._partitions)

        def done() -> bool:
            return all(self._read_to.get(tp, starts[tp]) >= ends[tp] for tp in self._partitions)

        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(done)

    async def final(self, job_uuid: str, timeout: float = 120.0) -> dict[str, Any]:
        return await self.wait_for(lambda e: e.get("job_uuid") == job_uuid and e.get("status") in FINAL, timeout)


@contextlib.asynccontextmanager
async def event_log(settings: Settings, topic: str) -> AsyncIterator[EventLog]:
    log = EventLog(settings, topic)
    await log.start()
    try:
        yield log
    finally:
        await log.stop()


@pytest.fixture(scope="session")
async def job_events(settings: Settings, store: ObjectStore) -> AsyncIterator[EventLog]:
    async with event_log(settings, settings.kafka_job_events_topic) as log:
        yield log


@pytest.fixture(scope="session")
async def dead_letters(settings: Settings, store: ObjectStore) -> AsyncIterator[EventLog]:
    async with event_log(settings, settings.kafka_dlq_topic) as log:
        yield log


def isolated_settings(stack: LocalStack, prefix: str, **overrides: Any) -> Settings:
    """Settings of a second service with topics of its own, so it replays nothing of the session's."""
    return make_settings(
        stack,
        kafka_jobs_topic=f"{prefix}.jobs",
        kafka_minio_events_topic=f"{prefix}.minio-events",
        kafka_job_events_topic=f"{prefix}.job-events",
        kafka_dlq_topic=f"{prefix}.dlq",
        **overrides,
    )


@pytest.fixture(scope="session")
async def producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    client = make_producer(settings)
    await client.start()
    yield client
    await client.stop()


@pytest.fixture
async def http(service: Service) -> AsyncIterator[aiohttp.ClientSession]:
    headers = {"Authorization": f"Bearer {issue_token(SECRET, ttl_s=3600, subject='tests')}"}
    async with aiohttp.ClientSession(
        base_url=f"http://127.0.0.1:{service.settings.http_port}", headers=headers
    ) as session:
        yield session


@pytest.fixture(scope="session")
def phantom() -> Phantom:
    return job_phantom()


@pytest.fixture(scope="session")
def phantom_file(phantom: Phantom, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("phantom") / "phantom.nii.gz"
    save_phantom(phantom, path)
    return path


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text page, by name and labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


async def eventually(condition: Callable[[], bool], timeout: float = 30.0, what: str = "the condition") -> None:
    """Wait for a condition nothing announces (a counter of the service under test)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s")
        await asyncio.sleep(0.05)


def job_id() -> str:
    return str(uuid.uuid4())


async def upload_input(store: ObjectStore, path: Path, name: str, content_type: str) -> tuple[str, str]:
    """A new job id, and the key `uploads/<job>/<name>` its input now lies at."""
    job = job_id()
    key = f"uploads/{job}/{name}"
    await store.put_file(key, path, content_type)
    return job, key


_scans = iter(range(1, 10**9))


async def fresh_scan(store: ObjectStore, phantom: Phantom, name: str = "scan.nii") -> tuple[str, str]:
    """A new job id and a scan no job has seen (one voxel differs), so a result cache misses."""
    image = np.round(phantom.image).astype(np.int16)
    image[0, 0, 0] = next(_scans)
    job = job_id()
    key = f"uploads/{job}/{name}"
    await store.put_bytes(key, nib.Nifti1Image(image, phantom.affine).to_bytes(), "application/octet-stream")
    return job, key


async def send_json(
    producer: AIOKafkaProducer, topic: str, value: Any, key: str | None = None, partition: int | None = None
):  # type: ignore[no-untyped-def]
    raw = value if isinstance(value, bytes) else orjson.dumps(value)
    return await producer.send_and_wait(topic, raw, key=key.encode() if key else None, partition=partition)


async def committed_offset(
    settings: Settings, topic: str, partition: int, at_least: int, timeout: float = 10.0
) -> int | None:
    """The group's committed offset, polled until it reaches `at_least` (commits follow the final event)."""
    consumer = make_consumer(settings, settings.kafka_group_id)
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            committed = await consumer.committed(TopicPartition(topic, partition))
            if (committed is not None and committed >= at_least) or time.monotonic() > deadline:
                return committed
            await asyncio.sleep(0.1)
    finally:
        await consumer.stop()
