"""Kafka clients built from the settings, with the security options passed through to aiokafka.

The one place a producer, a consumer or an admin client is made: the service, the operator
tools, the benchmarks and the tests all take theirs from here.
"""

from __future__ import annotations

import contextlib
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context

from consumer.settings import Settings

# Partitions of each topic when the service creates them (dev stack, producer_tools topics).
TOPIC_PARTITIONS = {"jobs": 4, "minio_events": 4, "job_events": 4, "dlq": 1}


def _options(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "client_id": settings.kafka_client_id,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=settings.kafka_ssl_cafile, certfile=settings.kafka_ssl_certfile, keyfile=settings.kafka_ssl_keyfile
        )
    if settings.kafka_security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            options["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return options


def make_producer(settings: Settings) -> AIOKafkaProducer:
    # acks=all: an event is durable before the job's offset is committed. No idempotence:
    # the embedded broker cannot serve InitProducerId, and events are keyed and deduplicable.
    return AIOKafkaProducer(**_options(settings), acks="all", linger_ms=5, request_timeout_ms=30_000)


def make_consumer(settings: Settings, group_id: str | None) -> AIOKafkaConsumer:
    """A consumer that never commits by itself. With `group_id` it can join that group (the
    service subscribes) or read the group's committed offsets (lag); without one it reads
    partitions it assigns itself (following events)."""
    return AIOKafkaConsumer(
        **_options(settings),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset=settings.kafka_auto_offset_reset,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
        max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
        # A partition is paused while its lane works and fetched again when it is resumed; the
        # broker's long poll (500 ms by default) would delay that next fetch, and with it a run of
        # records that start no job (a flood of bad messages) to a few dozen a second.
        fetch_max_wait_ms=100,
        # Records fetched but not started are handed back at a revoke; a partition's fetch is at
        # most max_partition_fetch_bytes (1 MiB) anyway.
        max_poll_records=200,
    )


def topic_specs(settings: Settings) -> dict[str, int]:
    return {
        settings.kafka_jobs_topic: TOPIC_PARTITIONS["jobs"],
        settings.kafka_minio_events_topic: TOPIC_PARTITIONS["minio_events"],
        settings.kafka_job_events_topic: TOPIC_PARTITIONS["job_events"],
        settings.kafka_dlq_topic: TOPIC_PARTITIONS["dlq"],
    }


def make_admin(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**_options(settings))


async def ensure_topics(settings: Settings, replication: int = 1) -> list[str]:
    """Create the service's topics that do not exist yet; returns the ones created."""
    admin = make_admin(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name, partitions, replication)
            for name, partitions in topic_specs(settings).items()
            if name not in existing
        ]
        if missing:
            # Another replica or tool may create them at the same moment.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
        return [topic.name for topic in missing]
    finally:
        await admin.close()
