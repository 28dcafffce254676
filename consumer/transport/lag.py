"""Consumer-group lag: committed offset vs end offset per partition, and the group's members.

Lag is read with a consumer's committed() and end_offsets(), not the admin offset-fetch call,
so it works on Apache Kafka and on the embedded broker alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.errors import KafkaError

from consumer.observability.metrics import ServiceMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int | None  # None: the group never committed here
    start: int  # the log start (where a group without a commit begins, with earliest reset)
    end: int

    @property
    def lag(self) -> int:
        return max(0, self.end - (self.committed if self.committed is not None else self.start))


async def partition_lags(consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> list[PartitionLag]:
    if not partitions:
        return []
    ends = await consumer.end_offsets(partitions)
    starts = await consumer.beginning_offsets(partitions)
    rows = []
    for tp in sorted(partitions):
        committed = await consumer.committed(tp)
        rows.append(PartitionLag(tp.topic, tp.partition, committed, starts[tp], ends[tp]))
    return rows


@dataclass(frozen=True)
class GroupMember:
    member_id: str
    client_id: str
    host: str
    partitions: list[str]  # "topic[partition]"


async def group_members(admin: AIOKafkaAdminClient, group: str) -> list[GroupMember] | None:
    """The group's members and their partitions; None when the broker cannot tell."""
    try:
        responses = await admin.describe_consumer_groups([group])
    except (KafkaError, NotImplementedError, AttributeError, ValueError) as error:
        log.debug("describe group %s: %s", group, error)
        return None
    members: list[GroupMember] = []
    for response in responses:
        for entry in getattr(response, "groups", []):
            # (error_code, group_id, state, protocol_type, protocol, members[, authorized_operations])
            if entry[0] != 0:
                return None
            for member in entry[5]:
                member_id, client_id, host, _metadata, assignment = member[:5]
                partitions: list[str] = []
                if assignment:
                    with contextlib.suppress(Exception):  # a member of another protocol
                        decoded: Any = ConsumerProtocolMemberAssignment.decode(assignment)
                        for topic, numbers in decoded.assignment:
                            partitions.extend(f"{topic}[{n}]" for n in sorted(numbers))
                members.append(GroupMember(member_id, client_id, host, partitions))
    return members


class LagMonitor:
    """Refreshes the ml_consumer_lag gauge for the partitions this replica holds."""

    def __init__(self, consumer: AIOKafkaConsumer, metrics: ServiceMetrics, interval_s: float):
        self.consumer = consumer
        self.metrics = metrics
        self.interval_s = interval_s
        self._shown: set[tuple[str, str]] = set()

    async def refresh(self) -> None:
        assigned = sorted(self.consumer.assignment())
        rows = await partition_lags(self.consumer, assigned)
        now = set()
        for row in rows:
            labels = (row.topic, str(row.partition))
            self.metrics.consumer_lag.labels(*labels).set(row.lag)
            now.add(labels)
        for labels in self._shown - now:  # partitions that moved to another replica
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(*labels)
        self._shown = now

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except KafkaError as error:
                log.debug("lag refresh failed: %s", error)
            await asyncio.sleep(self.interval_s)
