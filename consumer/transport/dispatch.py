"""What a Kafka record becomes: one or more jobs, skipped MinIO notifications, or a dead letter
with the reason it can never become a job. The one place that decides it.

A job message (`ml.jobs`) is one job; a MinIO notification (`minio.events`) starts a job per
new object under `uploads/` in the bucket and skips (and counts) anything else. A record that is
neither is dead-lettered and its offset moves on. Running a job is the caller's: the dispatcher
gets it as a function.

What it answers the Kafka loop: `Work` for a record that starts jobs (the last job's final write
commits the record), `Handled` for one that starts none (with its dead letter's delivery, which
the loop awaits with others before it commits them together).
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

import orjson
from aiokafka.structs import ConsumerRecord
from pydantic import ValidationError

from consumer.errors import InvalidMessage, validation_details, validation_summary
from consumer.observability.logs import log_context
from consumer.observability.metrics import ServiceMetrics
from consumer.settings import Settings
from consumer.transport.publisher import EventPublisher
from consumer.transport.worker import Finish, Handled, Work
from schemas.errors import ErrorCode
from schemas.jobs import JobRequest, Profile, Source
from schemas.minio_event import EventRecord, MinioEvent

log = logging.getLogger(__name__)

# Runs one job to its final event (the job runner, behind its concurrency slots); its final
# write goes through `finish` when one is given (the last job of a record: the commit follows).
RunJob = Callable[[JobRequest, Source, Finish | None], Awaitable[object]]

UPLOADS_PREFIX = "uploads/"
# MinIO's ObjectCreated events that mean new object content exists. PutRetention, PutLegalHold,
# PutTagging and DeleteTagging are ObjectCreated events too, but change only metadata.
NEW_OBJECT_EVENTS = frozenset(
    {"ObjectCreated:Put", "ObjectCreated:Post", "ObjectCreated:Copy", "ObjectCreated:CompleteMultipartUpload"}
)
# Namespace of upload job ids: uuid5(namespace, "s3://bucket/key#etag").
UPLOAD_JOB_NAMESPACE = uuid.UUID("6f1b7c1e-3b0a-5b8e-9f57-1d2c6a4e8a10")


@dataclass
class MinioDecision:
    jobs: list[JobRequest] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one reason per record that starts no job


def _load_json(value: bytes | None) -> Any:
    if not value:
        raise InvalidMessage("the message has no value", code=ErrorCode.INVALID_JSON)
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as error:
        raise InvalidMessage(f"the message is not JSON: {error}", code=ErrorCode.INVALID_JSON) from error


def decode_job_message(value: bytes | None) -> JobRequest:
    data = _load_json(value)
    if not isinstance(data, dict):
        raise InvalidMessage("a job message must be a JSON object")
    try:
        return JobRequest.model_validate(data)
    except ValidationError as error:
        raise InvalidMessage(
            f"invalid job message: {validation_summary(error)}", details=validation_details(error)
        ) from error


def upload_job_id(bucket: str, key: str, etag: str | None) -> str:
    """The same upload (bucket, key, eTag) always gives the same job: a redelivered event is one job."""
    return str(uuid.uuid5(UPLOAD_JOB_NAMESPACE, f"s3://{bucket}/{key}#{(etag or '').strip(chr(34))}"))


def decode_minio_event(value: bytes | None, bucket: str, profile: Profile, threshold: float) -> MinioDecision:
    data = _load_json(value)
    try:
        event = MinioEvent.model_validate(data)
    except ValidationError as error:
        raise InvalidMessage("not a MinIO notification", details=validation_details(error)) from error
    if not event.records:
        raise InvalidMessage("a MinIO notification without Records")
    decision = MinioDecision()
    for record in event.records:
        reason = _skip_reason(record, bucket)
        if reason:
            decision.skipped.append(reason)
            continue
        key = unquote_plus(record.s3.object.key)
        try:
            decision.jobs.append(
                JobRequest(
                    job_uuid=upload_job_id(record.s3.bucket.name, key, record.s3.object.e_tag),
                    input_object=key,
                    profile=profile,
                    threshold=threshold,
                )
            )
        except ValidationError:
            decision.skipped.append("unsafe_key")
    return decision


def _skip_reason(record: EventRecord, bucket: str) -> str | None:
    if record.event_name.removeprefix("s3:") not in NEW_OBJECT_EVENTS:
        return "not_object_created"
    if record.s3.bucket.name != bucket:
        return "other_bucket"
    key = unquote_plus(record.s3.object.key)
    if not key.startswith(UPLOADS_PREFIX):
        return "outside_uploads"
    if key.endswith("/"):
        return "folder_marker"
    return None


class RecordDispatcher:
    """The Kafka loop's handler: decide what a record is; start its dead letter, or hand back the
    work of running its jobs one after another."""

    def __init__(self, settings: Settings, run_job: RunJob, publisher: EventPublisher, metrics: ServiceMetrics):
        self.settings = settings
        self.run_job = run_job
        self.publisher = publisher
        self.metrics = metrics

    async def __call__(self, record: ConsumerRecord[bytes, bytes]) -> Handled | Work:
        with log_context(topic=record.topic, partition=record.partition, offset=record.offset):
            try:
                jobs, source = self.decide(record)
            except InvalidMessage as error:
                return Handled(await self.dead_letter(record, error))
        if not jobs:
            return Handled()
        return Work(functools.partial(self._run, record, jobs, source))

    async def _run(
        self, record: ConsumerRecord[bytes, bytes], jobs: list[JobRequest], source: Source, finish: Finish
    ) -> None:
        with log_context(topic=record.topic, partition=record.partition, offset=record.offset):
            for index, job in enumerate(jobs):
                await self.run_job(job, source, finish if index == len(jobs) - 1 else None)

    def decide(self, record: ConsumerRecord[bytes, bytes]) -> tuple[list[JobRequest], Source]:
        """The jobs a record starts, and where they come from; InvalidMessage when it can start none."""
        settings = self.settings
        if record.topic != settings.kafka_minio_events_topic:
            return [decode_job_message(record.value)], Source.KAFKA
        decision = decode_minio_event(
            record.value, settings.minio_bucket, settings.ml_default_profile, settings.ml_decision_threshold
        )
        for reason in decision.skipped:
            self.metrics.skipped_events.labels(reason).inc()
            log.info("minio event %s[%d]@%d skipped: %s", record.topic, record.partition, record.offset, reason)
        return decision.jobs, Source.MINIO

    async def dead_letter(self, record: ConsumerRecord[bytes, bytes], error: InvalidMessage) -> Awaitable[object]:
        delivery = await self.publisher.start_dead_letter(record, error)
        self.metrics.dead_letters.labels(record.topic, error.code.value).inc()
        log.warning(
            "dead-lettered %s[%d]@%d [%s]: %s",
            record.topic,
            record.partition,
            record.offset,
            error.code,
            error.message[:300],
        )
        return delivery
