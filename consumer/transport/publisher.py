"""Publishing job events and dead letters: the one place that writes to those two topics."""

from __future__ import annotations

import logging

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from pydantic import BaseModel

from consumer.errors import EventPublishError, InvalidMessage
from schemas.events import DeadLetter, DeadLetterOrigin, JobEvent

log = logging.getLogger(__name__)


def encode(model: BaseModel) -> bytes:
    return orjson.dumps(model.model_dump(mode="json", exclude_none=True))


def dead_letter_of(record: ConsumerRecord[bytes, bytes], error: InvalidMessage) -> DeadLetter:
    """The record as it came (payload and origin) with the reason it can never become a job."""
    return DeadLetter(
        error=error.info(),
        origin=DeadLetterOrigin(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key.decode("utf-8", "replace") if record.key else None,
            timestamp_ms=record.timestamp,
        ),
        payload=(record.value or b"").decode("utf-8", "replace"),
        details=error.details,
    )


class EventPublisher:
    """Every send waits for the broker's acknowledgement: the caller commits only after it returns.
    A broker that does not take the message raises EventPublishError."""

    def __init__(self, producer: AIOKafkaProducer, events_topic: str, dlq_topic: str):
        self.producer = producer
        self.events_topic = events_topic
        self.dlq_topic = dlq_topic

    async def publish(self, event: JobEvent) -> None:
        await self._send(
            self.events_topic, encode(event), event.job_uuid.encode(), f"{event.status} event of job {event.job_uuid}"
        )
        log.debug("event %s for job %s", event.status, event.job_uuid)

    async def dead_letter(self, record: ConsumerRecord[bytes, bytes], error: InvalidMessage) -> None:
        letter = dead_letter_of(record, error)
        key = letter.origin.key.encode() if letter.origin.key else None
        await self._send(self.dlq_topic, encode(letter), key, f"dead letter of {record.topic}@{record.offset}")

    async def _send(self, topic: str, value: bytes, key: bytes | None, what: str) -> None:
        try:
            await self.producer.send_and_wait(topic, value, key=key)
        except KafkaError as error:
            raise EventPublishError(f"could not publish the {what}: {error}") from error
