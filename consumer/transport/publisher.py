"""Publishing job events and dead letters: the one place that writes to those two topics.

Job events wait for the broker's acknowledgement, retried (consumer.retry) while the broker is
unreachable. Dead letters are only started here: the caller collects their deliveries and
commits a run of them at once, so a flood of bad messages costs no round trip per message.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError
from aiokafka.structs import ConsumerRecord
from pydantic import BaseModel

from consumer.errors import EventPublishError, InvalidMessage
from consumer.retry import PUBLISH, RetryPolicy, retry
from schemas.events import DeadLetter, DeadLetterOrigin, ErrorInfo, JobEvent, RecordHeader

log = logging.getLogger(__name__)

# The producer's own limit is 1 MiB a request: a payload up to this size goes whole into its
# letter (base64 adds a third); a larger one is represented by its head, size and sha256.
LETTER_PAYLOAD_MAX = 512 * 1024
LETTER_HEAD = 64 * 1024
LETTER_DETAILS_MAX = 20
LETTER_MESSAGE_MAX = 2000


def encode(model: BaseModel) -> bytes:
    return orjson.dumps(model.model_dump(mode="json", exclude_none=True))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _origin(record: ConsumerRecord[bytes, bytes]) -> DeadLetterOrigin:
    key = record.key
    return DeadLetterOrigin(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=key.decode("utf-8", "replace") if key is not None else None,
        key_base64=_b64(key) if key is not None else None,
        timestamp_ms=record.timestamp,
        headers=[RecordHeader(key=name, value_base64=_b64(value or b"")) for name, value in (record.headers or ())],
    )


def dead_letter_of(record: ConsumerRecord[bytes, bytes], error: InvalidMessage) -> DeadLetter:
    """The record as it came (its bytes exactly, or their head when too large) and the reason."""
    payload = record.value or b""
    truncated = len(payload) > LETTER_PAYLOAD_MAX
    message = error.message if len(error.message) <= LETTER_MESSAGE_MAX else error.message[:LETTER_MESSAGE_MAX] + "…"
    return DeadLetter(
        error=ErrorInfo(code=error.code, message=message, retryable=error.retryable),
        origin=_origin(record),
        payload_base64=_b64(payload[:LETTER_HEAD] if truncated else payload),
        payload_size=len(payload),
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        payload_truncated=truncated,
        details=error.details[:LETTER_DETAILS_MAX],
    )


def transient(error: Exception) -> bool:
    """The broker may take the same message later (unreachable, no leader yet, timed out)."""
    return isinstance(error, KafkaTimeoutError) or (isinstance(error, KafkaError) and bool(error.retriable))


class EventPublisher:
    """`publish` returns once the broker acknowledged the event (the caller commits only after it);
    a broker that does not take it within the retry policy's limit raises EventPublishError."""

    def __init__(self, producer: AIOKafkaProducer, events_topic: str, dlq_topic: str, policy: RetryPolicy = PUBLISH):
        self.producer = producer
        self.events_topic = events_topic
        self.dlq_topic = dlq_topic
        self.policy = policy

    async def publish(self, event: JobEvent) -> None:
        value, key = encode(event), event.job_uuid.encode()
        what = f"{event.status} event of job {event.job_uuid}"
        try:
            await retry(
                lambda: self.producer.send_and_wait(self.events_topic, value, key=key),
                self.policy,
                transient,
                what=what,
            )
        except KafkaError as error:
            raise EventPublishError(f"could not publish the {what}: {error}") from error
        log.debug("event %s for job %s", event.status, event.job_uuid)

    async def start_dead_letter(
        self, record: ConsumerRecord[bytes, bytes], error: InvalidMessage
    ) -> asyncio.Future[object]:
        """Hand the letter to the producer; returns its delivery, which the caller awaits before it
        commits the record (a failed delivery raises EventPublishError there)."""
        letter = encode(dead_letter_of(record, error))
        try:
            sent: asyncio.Future[object] = await self.producer.send(self.dlq_topic, letter, key=record.key)
        except KafkaError as error:
            raise EventPublishError(
                f"could not publish the dead letter of {record.topic}@{record.offset}: {error}"
            ) from error
        return sent
