"""The Kafka loop: poll, hand records to one lane per partition, commit after each record.

- Records of a partition are handled one after another, in offset order (its lane).
- A partition with work in its lane is paused, so the loop keeps calling getmany (heartbeats
  and max_poll_interval stay satisfied) without fetching more for it; it resumes when idle.
- A record's offset + 1 is committed only after its handler returned: its outputs are written
  and its final event is acknowledged by the broker.
- A handler that raises (an event could not be published) is not committed: the partition is
  rewound to that record and retried after a backoff.
- On revoke, records not yet started are dropped (the next owner gets them) and the running
  one is given a short grace to finish and commit; on stop, the same with the shutdown grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from consumer.backoff import compute_backoff

log = logging.getLogger(__name__)

Handler = Callable[[ConsumerRecord[bytes, bytes]], Awaitable[None]]


@dataclass
class Lane:
    tp: TopicPartition
    records: deque[ConsumerRecord[bytes, bytes]] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    revoked: bool = False
    failures: int = 0

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: KafkaWorker):
        self.worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.worker.release(revoked, self.worker.revoke_grace_s)
        log.info("released partitions: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.worker.assignments += 1
        log.info("assigned partitions: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))
        if self.worker.on_assign is not None:
            self.worker.on_assign(assigned)


class KafkaWorker:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        topics: tuple[str, ...],
        handler: Handler,
        *,
        revoke_grace_s: float = 10.0,
        poll_timeout_ms: int = 500,
        on_assign: Callable[[set[TopicPartition]], None] | None = None,
    ):
        self.consumer = consumer
        self.topics = topics
        self.handler = handler
        self.revoke_grace_s = revoke_grace_s
        self.poll_timeout_ms = poll_timeout_ms
        self.on_assign = on_assign
        self.lanes: dict[TopicPartition, Lane] = {}
        self.assignments = 0
        self.committed = 0
        self._stopping = asyncio.Event()
        self.joined = asyncio.Event()

    async def run(self) -> None:
        """Poll until stop() is called."""
        self.consumer.subscribe(list(self.topics), listener=_Listener(self))
        while not self._stopping.is_set():
            try:
                batches = await self.consumer.getmany(timeout_ms=self.poll_timeout_ms)
            except KafkaError as error:
                log.warning("poll failed: %s", error)
                await asyncio.sleep(1.0)
                continue
            if self.consumer.assignment():
                self.joined.set()
            for tp, records in batches.items():
                self._enqueue(tp, records)

    def _enqueue(self, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        lane = self.lanes.get(tp)
        if lane is None or lane.revoked:
            lane = self.lanes[tp] = Lane(tp)
        lane.records.extend(records)
        self.consumer.pause(tp)
        if not lane.busy:
            lane.task = asyncio.create_task(self._drain(lane), name=f"lane-{tp.topic}-{tp.partition}")

    async def _drain(self, lane: Lane) -> None:
        while lane.records and not lane.revoked:
            record = lane.records[0]
            try:
                await self.handler(record)
            except asyncio.CancelledError:
                raise
            except Exception:
                lane.failures += 1
                delay = compute_backoff(lane.failures, base=1.0, cap=60.0)
                log.exception(
                    "record %s[%d]@%d not processed; retrying in %.1f s",
                    record.topic,
                    record.partition,
                    record.offset,
                    delay,
                )
                lane.records.clear()
                with contextlib.suppress(IllegalStateError, KafkaError):
                    self.consumer.seek(lane.tp, record.offset)
                await asyncio.sleep(delay)
                break
            lane.failures = 0
            lane.records.popleft()
            await self._commit(lane, record.offset + 1)
        if not lane.revoked and lane.tp in self.consumer.assignment():
            self.consumer.resume(lane.tp)

    async def _commit(self, lane: Lane, offset: int) -> None:
        if lane.revoked:
            # The partition moved on; its new owner re-runs the record (outputs are idempotent).
            log.warning("not committing %s[%d]@%d: partition was revoked", lane.tp.topic, lane.tp.partition, offset)
            return
        try:
            await self.consumer.commit({lane.tp: OffsetAndMetadata(offset, "")})
            self.committed += 1
        except (CommitFailedError, IllegalStateError, KafkaError) as error:
            log.warning("commit of %s[%d]@%d failed: %s", lane.tp.topic, lane.tp.partition, offset, error)

    async def release(self, partitions: set[TopicPartition], grace_s: float) -> set[asyncio.Task[None]]:
        """Stop work on these partitions: drop what has not started, let the running record finish."""
        lanes = [self.lanes.pop(tp) for tp in partitions if tp in self.lanes]
        for lane in lanes:
            lane.records = deque(list(lane.records)[:1]) if lane.busy else deque()
        running = [lane.task for lane in lanes if lane.task is not None and not lane.task.done()]
        pending: set[asyncio.Task[None]] = set()
        if running:
            log.info("waiting up to %.0f s for %d running job(s) before releasing partitions", grace_s, len(running))
            _, pending = await asyncio.wait(running, timeout=grace_s)
            if pending:
                log.warning(
                    "%d job(s) still running after %.0f s; their partitions go uncommitted", len(pending), grace_s
                )
        for lane in lanes:
            lane.revoked = True
        return pending

    async def stop(self, grace_s: float) -> None:
        """Stop polling, let running jobs finish (bounded), then leave the group."""
        self._stopping.set()
        for task in await self.release(set(self.lanes), grace_s):
            # Uncommitted: the record is redelivered to whoever owns the partition next.
            task.cancel()

    @property
    def busy_partitions(self) -> int:
        return sum(1 for lane in self.lanes.values() if lane.busy)
