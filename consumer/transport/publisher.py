"""Publishing job events and dead letters."""

from __future__ import annotations

import logging

import orjson
from aiokafka import AIOKafkaProducer
from pydantic import BaseModel

from schemas.events import DeadLetter, JobEvent

log = logging.getLogger(__name__)


def encode(model: BaseModel) -> bytes:
    return orjson.dumps(model.model_dump(mode="json", exclude_none=True))


class EventPublisher:
    def __init__(self, producer: AIOKafkaProducer, events_topic: str, dlq_topic: str):
        self.producer = producer
        self.events_topic = events_topic
        self.dlq_topic = dlq_topic

    async def publish(self, event: JobEvent) -> None:
        """Waits for the broker's acknowledgement: the caller commits only after this returns."""
        await self.producer.send_and_wait(self.events_topic, encode(event), key=event.job_uuid.encode())
        log.debug("event %s for job %s", event.status, event.job_uuid)

    async def dead_letter(self, letter: DeadLetter) -> None:
        key = letter.origin.key.encode() if letter.origin.key else None
        await self.producer.send_and_wait(self.dlq_topic, encode(letter), key=key)
