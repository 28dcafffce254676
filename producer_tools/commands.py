"""What the tools do: upload, submit a job, wait for its final event, follow events, read lag."""

from __future__ import annotations

import mimetypes
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from consumer.settings import Settings
from consumer.storage import ObjectStore
from consumer.transport.clients import make_admin, make_consumer, make_producer
from consumer.transport.lag import GroupMember, PartitionLag, group_members, partition_lags
from producer_tools.minio_events import minio_event

FINAL_STATUSES = {"completed", "failed"}


def content_type(path: Path) -> str:
    if path.name.endswith(".nii.gz"):
        return "application/gzip"
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


@dataclass(frozen=True)
class Uploaded:
    key: str
    size: int
    etag: str


async def upload(settings: Settings, path: Path, key: str) -> Uploaded:
    store = ObjectStore.from_settings(settings)
    await store.ensure_bucket()
    size = await store.put_file(key, path, content_type(path))
    info = await store.stat(key)
    return Uploaded(key, size, (info.etag or "").strip('"'))


async def publish(settings: Settings, topic: str, key: str, value: dict[str, Any]) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(topic, orjson.dumps(value), key=key.encode())
    finally:
        await producer.stop()


async def emit_minio_event(settings: Settings, uploaded: Uploaded, path: Path) -> dict[str, Any]:
    event = minio_event(
        settings.minio_bucket,
        uploaded.key,
        size=uploaded.size,
        etag=uploaded.etag,
        content_type=content_type(path),
        endpoint=f"{'https' if settings.minio_secure else 'http'}://{settings.minio_endpoint}",
    )
    await publish(settings, settings.kafka_minio_events_topic, event["Key"], event)
    return event


class EventFollower:
    """Reads ml.job-events from the end (or the start) without joining a consumer group."""

    def __init__(self, settings: Settings, from_beginning: bool = False):
        self.settings = settings
        self.from_beginning = from_beginning
        self.consumer = make_consumer(settings, None)

    async def __aenter__(self) -> EventFollower:
        await self.consumer.start()
        topic = self.settings.kafka_job_events_topic
        partitions = self.consumer.partitions_for_topic(topic)
        if not partitions:
            await self.consumer.stop()
            raise SystemExit(f"error: topic {topic} does not exist (is the service's stack running?)")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        self.consumer.assign(tps)
        if self.from_beginning:
            await self.consumer.seek_to_beginning(*tps)
        else:
            # Positions are fixed now, before anything is submitted: no event can be missed.
            for tp, offset in (await self.consumer.end_offsets(tps)).items():
                self.consumer.seek(tp, offset)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def events(self, deadline: float | None = None) -> AsyncIterator[dict[str, Any]]:
        while deadline is None or time.monotonic() < deadline:
            batches = await self.consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    try:
                        yield orjson.loads(record.value)
                    except orjson.JSONDecodeError:
                        continue

    async def wait_final(self, job_uuid: str, timeout: float) -> dict[str, Any] | None:
        async for event in self.events(time.monotonic() + timeout):
            if event.get("job_uuid") == job_uuid and event.get("status") in FINAL_STATUSES:
                return event
        return None


def new_job_id() -> str:
    return str(uuid.uuid4())


async def submit(
    settings: Settings,
    path: Path,
    *,
    prefix: str,
    profile: str | None,
    threshold: float | None,
    wait: bool,
    timeout: float,
    job_uuid: str | None = None,
    series_uid: str | None = None,
    model: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Upload, publish the job message; with wait, return the final event too (None on timeout)."""
    job = job_uuid or new_job_id()
    key = f"{prefix.rstrip('/')}/{job}/{path.name}" if prefix else f"{job}/{path.name}"
    await upload(settings, path, key)
    message: dict[str, Any] = {"job_uuid": job, "input_object": key}
    if profile:
        message["profile"] = profile
    if threshold is not None:
        message["threshold"] = threshold
    if series_uid:
        message["series_uid"] = series_uid
    if model:
        message["model"] = model
    if not wait:
        await publish(settings, settings.kafka_jobs_topic, job, message)
        return message, None
    async with EventFollower(settings) as follower:
        await publish(settings, settings.kafka_jobs_topic, job, message)
        final = await follower.wait_final(job, timeout)
    return message, final


async def consumer_lag(
    settings: Settings, group: str, topics: list[str]
) -> tuple[list[PartitionLag], list[GroupMember] | None]:
    """Per partition of `topics`, the group's committed offset against the end offset, and the
    group's members when the broker can describe the group.

    The consumer never joins the group or commits, so reading lag changes nothing.
    """
    consumer = make_consumer(settings, group)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for topic in topics for p in sorted(consumer.partitions_for_topic(topic) or [])]
        rows = await partition_lags(consumer, tps)
    finally:
        await consumer.stop()
    admin = make_admin(settings)
    try:
        await admin.start()
        members = await group_members(admin, group)
    except KafkaError:
        members = None
    finally:
        await admin.close()
    return rows, members
