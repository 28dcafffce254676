"""The Kafka loop: poll, hand records to one lane per partition, commit what is done.

- Records of a partition are handled one after another, in offset order (its lane).
- A partition with work in its lane is paused, so the loop keeps calling getmany (heartbeats
  and max_poll_interval stay satisfied) without fetching more for it; it resumes when idle.
- A record that starts a job is committed right after the job's final event, the pair shielded
  from cancellation (`Finish`): a stop or a revoke never cuts between the event and the commit.
- Records that start no job (dead letters, skipped notifications) are committed in runs: their
  dead letters are handed to the producer without waiting one by one, and the run is committed
  once all are acknowledged: before a job starts, every SETTLE_EVERY records, and when the lane
  runs dry. A flood of bad messages costs no round trip per message.
- A record that fails (an event or a dead letter that could not be published) is not committed:
  the lane rewinds to its first uncommitted record and retries after a backoff (consumer.retry's
  LANE policy). Meanwhile the partition shows as stalled (/health, ml_partition_stalled_seconds).
- Revoke and stop: no new record starts; a lane that only waits (for a job slot, or in a retry
  backoff) is handed back at once, uncommitted; a running job gets the grace, then is cancelled
  and left uncommitted (the next owner runs it again, or finds its finished result in the result
  cache); a final write already under way completes first, within a small margin.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from consumer import activity
from consumer.activity import Activity, Finals, Phase
from consumer.errors import EventPublishError
from consumer.retry import LANE, RetryPolicy

log = logging.getLogger(__name__)

# Records that start no job are committed at least this often (and whenever the lane runs dry).
SETTLE_EVERY = 200
# After the grace: how long cancelled lanes and final writes under way get to wind down.
FINAL_MARGIN_S = 5.0

# Runs a job's final write, then commits the record, shielded from cancellation together.
Finish = Callable[[Callable[[], Awaitable[None]]], Awaitable[None]]


@dataclass(frozen=True)
class Handled:
    """A record that starts no job: commit it once `delivery` (its dead letter's) is done."""

    delivery: Awaitable[object] | None = None


@dataclass(frozen=True)
class Work:
    """A record that starts work: `run(finish)` does it, and hands its final write to `finish`."""

    run: Callable[[Finish], Awaitable[None]]


Handler = Callable[[ConsumerRecord[bytes, bytes]], Awaitable[Handled | Work]]


@dataclass
class Stall:
    topic: str
    partition: int
    seconds: float
    reason: str


@dataclass
class Lane:
    tp: TopicPartition
    records: deque[ConsumerRecord[bytes, bytes]] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    activity: Activity = field(default_factory=Activity)
    finals: Finals = field(default_factory=Finals)
    closing: bool = False  # revoked or stopping: no new record starts
    revoked: bool = False  # the partition is gone: nothing more is committed
    failures: int = 0
    backing_off: bool = False
    # Records handled that started no job, not committed yet: their deliveries, and their offsets.
    pending: list[Awaitable[object]] = field(default_factory=list)
    pending_from: int | None = None
    pending_to: int | None = None

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    @property
    def only_waiting(self) -> bool:
        """Nothing of its own under way: waiting for a job slot, or sleeping in a retry backoff."""
        return self.backing_off or self.activity.phase is Phase.WAITING

    def hold(self, offset: int, delivery: Awaitable[object] | None) -> None:
        if delivery is not None:
            self.pending.append(delivery)
        if self.pending_from is None:
            self.pending_from = offset
        self.pending_to = offset + 1

    def rewind_point(self) -> int | None:
        if self.pending_from is not None:
            return self.pending_from
        return self.records[0].offset if self.records else None


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: KafkaWorker):
        self.worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.worker.release(revoked, self.worker.revoke_grace_s)
        log.info("released partitions: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.worker.assignments += 1
        self.worker.released -= assigned
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
        policy: RetryPolicy = LANE,
        on_abandon: Callable[[], None] | None = None,
    ):
        self.consumer = consumer
        self.topics = topics
        self.handler = handler
        self.revoke_grace_s = revoke_grace_s
        self.poll_timeout_ms = poll_timeout_ms
        self.on_assign = on_assign
        self.policy = policy
        self.on_abandon = on_abandon
        self.lanes: dict[TopicPartition, Lane] = {}
        # Partitions being handed back: records of theirs that a poll still returns are dropped.
        self.released: set[TopicPartition] = set()
        self.assignments = 0
        self.committed = 0
        self._stopping = asyncio.Event()
        self.joined = asyncio.Event()

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Join the group at once; poll, from when `ready` is set, until stop() is called."""
        self.consumer.subscribe(list(self.topics), listener=_Listener(self))
        if ready is not None:
            await _first_of(ready.wait(), self._stopping.wait())
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
        if self._stopping.is_set() or tp in self.released:
            return  # uncommitted: whoever owns the partition next reads them again
        lane = self.lanes.get(tp)
        if lane is None or lane.revoked:
            lane = self.lanes[tp] = Lane(tp)
        lane.records.extend(records)
        self.consumer.pause(tp)
        if not lane.busy:
            lane.task = asyncio.create_task(self._drain(lane), name=f"lane-{tp.topic}-{tp.partition}")

    async def _drain(self, lane: Lane) -> None:
        with activity.bound(lane.activity):
            try:
                while lane.records and not lane.closing:
                    await self._handle(lane, lane.records[0])
                    lane.records.popleft()
                await self._settle(lane)
            except Exception as error:
                where = f"{lane.tp.topic}[{lane.tp.partition}]@{lane.rewind_point()}"
                if lane.closing:
                    log.info("%s handed back uncommitted: %s", where, error)
                    return
                log.error("%s not processed: %s", where, error, exc_info=not isinstance(error, EventPublishError))
                await self._rewind(lane, error)
        if not lane.closing and lane.tp in self.consumer.assignment():
            self.consumer.resume(lane.tp)

    async def _handle(self, lane: Lane, record: ConsumerRecord[bytes, bytes]) -> None:
        handling = await self.handler(record)
        if isinstance(handling, Handled):
            lane.hold(record.offset, handling.delivery)
            if len(lane.pending) >= SETTLE_EVERY:
                await self._settle(lane)
            return
        # A job is long: what came before it is committed first.
        await self._settle(lane)
        await handling.run(functools.partial(self._finish, lane, record.offset + 1))

    async def _settle(self, lane: Lane) -> None:
        """Commit the run of records that started no job, once their dead letters are delivered."""
        if lane.pending_to is None:
            return
        try:
            await asyncio.gather(*lane.pending)
        except KafkaError as error:
            raise EventPublishError(f"a dead letter was not delivered: {error}") from error
        await self._commit(lane, lane.pending_to)
        lane.pending, lane.pending_from, lane.pending_to = [], None, None

    async def _finish(self, lane: Lane, offset: int, final: Callable[[], Awaitable[None]]) -> None:
        async def final_then_commit() -> None:
            await final()
            await self._commit(lane, offset)

        await lane.finals.run(final_then_commit)

    async def _rewind(self, lane: Lane, error: Exception) -> None:
        offset = lane.rewind_point()
        lane.failures += 1
        delay = self.policy.backoff(lane.failures)
        log.info("%s[%d]: rewound to %s, retrying in %.1f s", lane.tp.topic, lane.tp.partition, offset, delay)
        lane.activity.stall(f"record {offset} failed: {error}")
        if self.policy.on_retry is not None:
            self.policy.on_retry()
        lane.records.clear()
        lane.pending, lane.pending_from, lane.pending_to = [], None, None
        if offset is not None:
            with contextlib.suppress(IllegalStateError, KafkaError):
                self.consumer.seek(lane.tp, offset)
        lane.backing_off = True
        try:
            await asyncio.sleep(delay)
        finally:
            lane.backing_off = False

    async def _commit(self, lane: Lane, offset: int) -> None:
        if lane.revoked:
            # The partition moved on; its new owner reads the record again (the result cache
            # makes a finished job cheap there).
            log.warning("not committing %s[%d]@%d: partition was revoked", lane.tp.topic, lane.tp.partition, offset)
            return
        try:
            await self.consumer.commit({lane.tp: OffsetAndMetadata(offset, "")})
        except (CommitFailedError, IllegalStateError, KafkaError) as error:
            log.warning("commit of %s[%d]@%d failed: %s", lane.tp.topic, lane.tp.partition, offset, error)
            return
        self.committed += 1
        lane.failures = 0
        lane.activity.clear()

    async def release(self, partitions: set[TopicPartition], grace_s: float) -> None:
        """Hand these partitions back: nothing new starts, waiting lanes go at once, running jobs
        get `grace_s`, then are cancelled uncommitted; final writes under way complete."""
        self.released |= partitions
        lanes = [lane for tp, lane in self.lanes.items() if tp in partitions]
        for lane in lanes:
            lane.closing = True
            if lane.busy and lane.only_waiting:
                assert lane.task is not None
                lane.task.cancel()
        running = {lane.task for lane in lanes if lane.task is not None and not lane.task.done()}
        if running:
            log.info("waiting up to %.0f s for %d running job(s) before releasing partitions", grace_s, len(running))
            _, late = await asyncio.wait(running, timeout=grace_s)
            if late:
                log.warning("%d job(s) still running after %.0f s: cancelled, left uncommitted", len(late), grace_s)
            for task in late:
                task.cancel()
                if self.on_abandon is not None:
                    self.on_abandon()
        await self._wind_down(lanes, time.monotonic() + FINAL_MARGIN_S)
        for lane in lanes:
            lane.revoked = True
            self.lanes.pop(lane.tp, None)

    async def _wind_down(self, lanes: list[Lane], until: float) -> None:
        """Cancelled lanes unwind, and final writes they left under way complete (bounded)."""
        tasks = {lane.task for lane in lanes if lane.task is not None and not lane.task.done()}
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, until - time.monotonic()))
        for lane in lanes:
            await lane.finals.wait(until - time.monotonic())

    def halt_intake(self) -> None:
        """From now on no record starts: polling ends, lanes finish what they hold and stop."""
        self._stopping.set()
        for lane in self.lanes.values():
            lane.closing = True

    async def stop(self, grace_s: float) -> None:
        """Stop polling and starting records, let running jobs finish (bounded by the grace)."""
        self.halt_intake()
        await self.release(set(self.lanes), grace_s)

    @property
    def busy_partitions(self) -> int:
        return sum(1 for lane in self.lanes.values() if lane.busy)

    def stalls(self) -> list[Stall]:
        """Partitions whose lane waits on something (a dependency, a retry), and for how long."""
        now = time.monotonic()
        return [
            Stall(tp.topic, tp.partition, round(lane.activity.stalled_for(now), 1), lane.activity.stall_reason or "")
            for tp, lane in sorted(self.lanes.items())
            if lane.activity.stalled_since is not None
        ]


async def _first_of(*waits: Coroutine[Any, Any, Any]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
