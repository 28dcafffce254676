"""The chaos suite: real replicas (`python -m consumer serve` subprocesses) on the embedded broker
and S3 server, while things break. `make chaos` runs it (marker `chaos`; `make test` leaves it
out) and prints a table: sent, completed, failed, lost, duplicate final events, drain time and
peak RSS per replica. The README carries the table of a run.

Inputs are distinct 128x128x64 CT phantoms (one voxel differs), so the result cache never
stands in for work; replicas host the light default bundle on the torch runtime, one thread.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from consumer.dev.localstack import LocalStack, S3Ports, free_port, prepare_stack
from consumer.settings import Settings
from consumer.storage import ObjectStore
from consumer.transport.clients import ensure_topics, make_producer
from models.phantom import generate_phantom
from tests.conftest import EventLog, event_log, isolated_settings, job_id, make_settings
from tests.replicas import Fleet, Replica, Row, Scoreboard, replica_env, table

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]

GRACE_S = 20.0  # ML_SHUTDOWN_GRACE_S of the replicas (replica_env)
STOP_MARGIN_S = 10.0  # consumer.service.STOP_MARGIN_S
OUTAGE_S = 20.0


@dataclass
class Chaos:
    stack: LocalStack
    store: ObjectStore
    producer: AIOKafkaProducer
    base: Settings
    workdir: Path
    logs: Path
    image: np.ndarray
    affine: np.ndarray
    rows: list[Row] = field(default_factory=list)
    uploads: int = 0
    _big: tuple[np.ndarray, np.ndarray] | None = None

    async def scenario(self, name: str, jobs: int, big: bool = False) -> tuple[Settings, list[tuple[str, str]]]:
        """Topics of its own, and `jobs` scans uploaded for it."""
        settings = isolated_settings(self.stack, f"chaos-{name}-{job_id()[:6]}")
        await ensure_topics(settings)
        return settings, await self.upload(jobs, big)

    def replicas(self, settings: Settings, count: int, **env: str) -> list[Replica]:
        logs = self.logs / settings.kafka_jobs_topic.removesuffix(".jobs")
        logs.mkdir(exist_ok=True)
        return [
            Replica(name, replica_env(settings, self.stack, self.workdir, **env), logs)
            for name in ("a", "b", "c")[:count]
        ]

    async def upload(self, count: int, big: bool = False) -> list[tuple[str, str]]:
        """`count` distinct scans (one corner voxel differs), as uncompressed NIfTI; `big`: a
        192x192x96 scan, for jobs that must run well past a grace."""
        source, affine = self.big() if big else (self.image, self.affine)
        jobs = []
        for _ in range(count):
            self.uploads += 1
            image = source.copy()
            image[0, 0, 0] = self.uploads
            job = job_id()
            key = f"uploads/{job}/scan.nii"
            await self.store.put_bytes(key, nib.Nifti1Image(image, affine).to_bytes(), "application/octet-stream")
            jobs.append((job, key))
        return jobs

    def big(self) -> tuple[np.ndarray, np.ndarray]:
        if self._big is None:
            phantom = generate_phantom(
                12, (192, 192, 96), (1.0, 1.0, 2.0), lesion_count=(1, 2), lesion_diameter_mm=(16, 30)
            )
            self._big = (np.round(phantom.image).astype(np.int16), phantom.affine)
        return self._big

    async def send(self, settings: Settings, jobs: list[tuple[str, str]], **extra: Any) -> None:
        for job, key in jobs:
            message = {"job_uuid": job, "input_object": key, **extra}
            await self.producer.send_and_wait(settings.kafka_jobs_topic, orjson.dumps(message), key=job.encode())

    async def readable(self, board: Scoreboard) -> int:
        """How many completed jobs' mask and result JSON can be read back and parsed."""
        readable = 0
        for job in board.jobs:
            final = next((e for e in board.finals(job) if e["status"] == "completed"), None)
            if final is None:
                continue
            mask = await self.store.get_bytes(final["output_object"])
            image = nib.Nifti1Image.from_bytes(gzip.decompress(mask) if mask[:2] == b"\x1f\x8b" else mask)
            result = orjson.loads(await self.store.get_bytes(final["results_object"]))
            readable += int(image.shape == self.image.shape and result["job_uuid"] == job)
        return readable


@pytest.fixture(scope="module")
def chaos_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    local = LocalStack(tmp_path_factory.mktemp("chaos-stack"), free_port(), S3Ports.free())
    local.start()
    yield local
    local.stop()


@pytest.fixture(scope="module")
async def chaos(chaos_stack: LocalStack, tmp_path_factory: pytest.TempPathFactory, request) -> AsyncIterator[Chaos]:
    base = make_settings(chaos_stack)
    store = await prepare_stack(base)
    producer = make_producer(base)
    await producer.start()
    phantom = generate_phantom(11, (128, 128, 64), (1.2, 1.2, 2.5), lesion_count=(1, 2), lesion_diameter_mm=(16, 30))
    suite = Chaos(
        chaos_stack,
        store,
        producer,
        base,
        tmp_path_factory.mktemp("chaos-work"),
        tmp_path_factory.mktemp("chaos-logs"),
        np.round(phantom.image).astype(np.int16),
        phantom.affine,
    )
    try:
        yield suite
    finally:
        await producer.stop()
        report = table(suite.rows)
        out = Path(os.environ.get("CHAOS_TABLE", suite.logs / "chaos-table.md"))
        await asyncio.to_thread(out.write_text, report + "\n")
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"\nchaos suite (replica logs in {suite.logs}; table in {out}):\n{report}\n")


async def in_flight(replica: Replica, timeout: float) -> bool:
    """Whether the replica is running a job, waiting up to `timeout` for it to start one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await replica.metric("ml_jobs_in_flight") or 0) >= 1:
            return True
        await asyncio.sleep(0.2)
    return False


async def busy_replica(fleet: Fleet, timeout: float) -> Replica:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for replica in fleet.replicas:
            if replica.alive and (await replica.metric("ml_jobs_in_flight") or 0) >= 1:
                return replica
        await asyncio.sleep(0.2)
    raise AssertionError(f"no replica started a job within {timeout} s")


@contextlib.asynccontextmanager
async def scenario(chaos: Chaos, settings: Settings, replicas: list[Replica]) -> AsyncIterator[tuple[Fleet, EventLog]]:
    async with event_log(settings, settings.kafka_job_events_topic) as events, Fleet(replicas) as fleet:
        yield fleet, events


async def test_kill9_of_a_replica_three_times_during_24_jobs(chaos: Chaos) -> None:
    settings, jobs = await chaos.scenario("kill9", 24)
    async with scenario(chaos, settings, chaos.replicas(settings, 2)) as (fleet, events):
        board = Scoreboard(events, [job for job, _ in jobs])
        started = time.monotonic()
        await chaos.send(settings, jobs)
        victim = fleet[0]
        for _ in range(3):
            await in_flight(victim, timeout=60)  # mid-job when there is one; else at once
            victim.kill()
            victim.start()
            await victim.ready()
        drain = await board.drained(started, timeout=600)
        row = board.row("kill -9 of one replica, 3 times, during 24 jobs", drain, fleet)
    readable = await chaos.readable(board)
    row.note = f"{readable}/{row.completed} outputs readable"
    chaos.rows.append(row)
    assert (row.completed, row.failed, row.lost) == (24, 0, 0), row
    assert readable == 24


async def test_storage_down_for_20_s_during_8_jobs_fails_none(chaos: Chaos) -> None:
    settings, jobs = await chaos.scenario("s3", 8)
    async with scenario(chaos, settings, chaos.replicas(settings, 2)) as (fleet, events):
        board = Scoreboard(events, [job for job, _ in jobs])
        started = time.monotonic()
        await chaos.send(settings, jobs)
        await events.until(lambda: board.counts()["completed"] >= 1, 120, "a first completed job")
        chaos.stack.stop_s3()
        down = time.monotonic()
        degraded = await degraded_while_down(fleet, OUTAGE_S - 2)
        # The outage itself: the S3 server stays dead this long, whatever the replicas do.
        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down)))
        chaos.stack.start_s3()
        drain = await board.drained(started, timeout=600)
        row = board.row(f"S3 server killed for {OUTAGE_S:.0f} s during 8 jobs", drain, fleet)
    readable = await chaos.readable(board)
    row.note = f"/health degraded during the outage: {degraded}; {readable}/{row.completed} outputs readable"
    chaos.rows.append(row)
    assert (row.completed, row.failed, row.lost) == (8, 0, 0), row
    assert degraded == "yes"


async def degraded_while_down(fleet: Fleet, within: float) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for replica in fleet.replicas:
            body = await replica.health()
            if body is not None and body["status"] == "degraded" and body["checks"]["storage"]["status"] != "ok":
                return "yes"
        await asyncio.sleep(0.5)
    return "no"


async def test_sigterm_with_a_job_running_loses_nothing(chaos: Chaos) -> None:
    settings, long_job = await chaos.scenario("sigterm", 1)
    others = await chaos.upload(3)
    async with scenario(chaos, settings, chaos.replicas(settings, 2)) as (fleet, events):
        board = Scoreboard(events, [job for job, _ in long_job + others])
        started = time.monotonic()
        # Research runs test-time flips: longer than the grace on these CPUs.
        await chaos.send(settings, long_job, profile="research")
        busy = await busy_replica(fleet, timeout=60)
        await chaos.send(settings, others)
        exit_s = await busy.terminate()
        drain = await board.drained(started, timeout=600)
        row = board.row("SIGTERM of a replica with a job running", drain, fleet)
    row.note = f"exited {exit_s:.1f} s after SIGTERM (grace {GRACE_S:.0f} s)"
    chaos.rows.append(row)
    assert (row.completed, row.failed, row.lost) == (4, 0, 0), row
    assert exit_s <= GRACE_S + STOP_MARGIN_S


def bad_messages(count: int) -> list[tuple[bytes, bytes | None, list[tuple[str, bytes]]]]:
    """(value, key, headers) of messages that can never become jobs, of every kind and size."""
    kinds: list[bytes] = [
        b"not json",
        b"",
        b"\xff\xfe\x00 not UTF-8 \x80\x81",
        b"[1, 2, 3]",
        orjson.dumps({"job_uuid": "../../etc/passwd", "input_object": "uploads/x.nii.gz"}),
        orjson.dumps({"job_uuid": "ok-id", "input_object": "/abs/key"}),
        orjson.dumps({"job_uuid": "ok-id", "input_object": "uploads/x", "profile": "turbo"}),
        orjson.dumps({"job_uuid": "ok-id", "input_object": "uploads/x", **{f"extra{i}": i for i in range(50)}}),
        os.urandom(64),
    ]
    messages = []
    for n in range(count - 2):
        headers = [("trace", os.urandom(8)), ("source", b"chaos")] if n % 3 == 0 else []
        messages.append((kinds[n % len(kinds)], os.urandom(6) if n % 5 == 0 else f"bad-{n}".encode(), headers))
    messages.append((os.urandom(900 * 1024), b"big-random", [("kind", b"random")]))
    escapes = b'{"job_uuid": "' + b'\\u0000\\n\\t\\\\\\"' * (900 * 1024 // 14) + b'", "input_object": "x"}'
    messages.append((escapes, b"big-escapes", [("kind", b"escapes")]))
    return messages


async def test_300_bad_messages_are_dead_lettered_within_60_s(chaos: Chaos) -> None:
    settings, jobs = await chaos.scenario("bad", 5)
    bad = bad_messages(300)
    async with (
        scenario(chaos, settings, chaos.replicas(settings, 2)) as (fleet, events),
        event_log(settings, settings.kafka_dlq_topic) as letters,
    ):
        board = Scoreboard(events, [job for job, _ in jobs])
        topic = settings.kafka_jobs_topic
        started = time.monotonic()
        # Sent as fast as the producer takes them: the replicas' pace is what is measured. The
        # two big ones go to partition 0, the rest spread out; the valid jobs come behind them,
        # one of them on partition 0, right after the big ones.
        deliveries = []
        for n, (value, key, headers) in enumerate(bad):
            partition = 0 if n >= len(bad) - 2 else n % 4
            deliveries.append(
                (await chaos.producer.send(topic, value, key=key, partition=partition, headers=headers), n)
            )
        for index, (job, input_key) in enumerate(jobs):
            message = orjson.dumps({"job_uuid": job, "input_object": input_key})
            await chaos.producer.send(topic, message, key=job.encode(), partition=index % 4)
        sent: dict[tuple[int, int], tuple[bytes, bytes | None, list[tuple[str, bytes]]]] = {}
        for delivery, n in deliveries:
            meta = await delivery
            sent[(meta.partition, meta.offset)] = bad[n]

        def lettered() -> bool:
            return len({(d["origin"]["partition"], d["origin"]["offset"]) for d in letters.records}) >= len(sent)

        await letters.until(lettered, 120, "every bad message's dead letter")
        letters_s = time.monotonic() - started
        drain = await board.drained(started, timeout=300)
        row = board.row("300 bad messages (2 of 900 KB), 5 jobs behind them", drain, fleet)
    row.sent += len(bad)
    row.note = f"all {len(bad)} dead-lettered {letters_s:.1f} s after the first was sent ({len(bad) / letters_s:.0f}/s)"
    chaos.rows.append(row)
    check_letters(letters.records, sent, topic)
    assert (row.completed, row.failed, row.lost) == (5, 0, 0), row
    assert letters_s <= 60.0


def check_letters(records: list[dict[str, Any]], sent: dict[tuple[int, int], Any], topic: str) -> None:
    """Every letter keeps its message exactly: bytes (or head, size and sha256), key and headers."""
    by_origin = {(d["origin"]["partition"], d["origin"]["offset"]): d for d in records if d["origin"]["topic"] == topic}
    for where, (value, key, headers) in sent.items():
        letter = by_origin[where]
        assert letter["payload_size"] == len(value) and letter["payload_sha256"] == hashlib.sha256(value).hexdigest()
        payload = base64.b64decode(letter["payload_base64"])
        assert payload == (value[: len(payload)] if letter["payload_truncated"] else value)
        assert letter["payload_truncated"] == (len(value) > 512 * 1024)
        origin = letter["origin"]
        assert (base64.b64decode(origin["key_base64"]) if origin.get("key_base64") else None) == key
        assert [(h["key"], base64.b64decode(h["value_base64"])) for h in origin["headers"]] == headers


async def test_revoke_during_a_long_job_gives_one_result(chaos: Chaos) -> None:
    settings, jobs = await chaos.scenario("revoke", 1, big=True)
    first, second = chaos.replicas(settings, 2)
    async with scenario(chaos, settings, [first]) as (fleet, events):
        board = Scoreboard(events, [job for job, _ in jobs])
        started = time.monotonic()
        await chaos.send(settings, jobs, profile="research")
        assert await in_flight(first, timeout=60)
        # A second replica joins: the group rebalances while the job runs.
        second.start()
        fleet.replicas.append(second)
        await second.ready()
        drain = await board.drained(started, timeout=600)
        row = board.row("a revoke (a replica joins) during a long job", drain, fleet)
        abandoned = await first.metric("ml_jobs_abandoned_total")
    (job,) = board.jobs
    completed = [e for e in events.by_job[job] if e["status"] == "completed"]
    row.note = f"{len(completed)} completed event(s); the first run abandoned at the revoke: {bool(abandoned)}"
    chaos.rows.append(row)
    assert len(completed) == 1 and row.failed == 0 and row.duplicates == 0, row


@pytest.mark.parametrize("trim", [False, True], ids=["no-trim", "malloc-trim"])
async def test_memory_between_jobs(chaos: Chaos, trim: bool) -> None:
    settings, jobs = await chaos.scenario(f"memory-{int(trim)}", 12)
    (replica,) = chaos.replicas(settings, 1, ML_MALLOC_TRIM=str(trim).lower())
    async with scenario(chaos, settings, [replica]) as (fleet, events):
        board = Scoreboard(events, [])
        idle = [replica.rss()]
        started = time.monotonic()
        for job in jobs:
            board.jobs.append(job[0])
            await chaos.send(settings, [job])
            await events.until(board.done, 300, "the job's final event")
            idle.append(replica.rss())  # between jobs: the final event is out, nothing runs
        row = board.row(
            f"memory: 12 jobs one after another, malloc_trim {'on' if trim else 'off'}",
            time.monotonic() - started,
            fleet,
        )
    mb = [value / 2**20 for value in idle]
    row.note = f"idle RSS (MB) at start {mb[0]:.0f}, after job 1 {mb[1]:.0f}, 6 {mb[6]:.0f}, 12 {mb[12]:.0f}"
    chaos.rows.append(row)
    assert row.completed == 12
