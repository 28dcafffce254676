"""The service: wires the parts together, runs the Kafka loop and the HTTP server, stops cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from aiohttp import web
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from consumer.errors import InvalidMessage
from consumer.http.app import build_app
from consumer.http.health import HealthChecks
from consumer.jobs.callback import BackendNotifier
from consumer.jobs.runner import JobOutcome, JobRunner
from consumer.observability.logs import log_context
from consumer.observability.metrics import ServiceMetrics
from consumer.settings import Settings
from consumer.storage import ObjectStore, make_client
from consumer.transport.clients import make_consumer, make_producer
from consumer.transport.lag import LagMonitor
from consumer.transport.messages import decode_job_message, decode_minio_event
from consumer.transport.publisher import EventPublisher
from consumer.transport.worker import KafkaWorker
from models.engine import InferenceEngine
from schemas.jobs import JobRequest, Source

log = logging.getLogger(__name__)


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.engine = InferenceEngine(
            settings.model_dir, settings.ml_device, settings.ml_precision, settings.ml_torch_threads
        )
        self.store = ObjectStore(make_client(settings), settings.minio_bucket)
        self.producer = make_producer(settings)
        self.publisher = EventPublisher(self.producer, settings.kafka_job_events_topic, settings.kafka_dlq_topic)
        self.notifier = BackendNotifier(
            settings.backend_url,
            settings.ml_service_token.get_secret_value(),
            settings.callback_timeout_s,
            settings.callback_max_attempts,
            on_give_up=self.metrics.callbacks_failed.inc,
        )
        self.runner = JobRunner(settings, self.store, self.engine, self.publisher, self.notifier, self.metrics)
        self.consumer = make_consumer(settings)
        self.worker = KafkaWorker(
            self.consumer,
            settings.consumed_topics,
            self.handle_record,
            revoke_grace_s=min(settings.ml_shutdown_grace_s, settings.kafka_session_timeout_ms / 1000),
            on_assign=self._assigned,
        )
        self._job_slots = asyncio.Semaphore(settings.ml_max_concurrent_jobs)
        self._worker_task: asyncio.Task[None] | None = None
        self.lag_monitor = LagMonitor(self.consumer, self.metrics, settings.ml_lag_refresh_s)
        self._lag_task: asyncio.Task[None] | None = None
        self._http: web.AppRunner | None = None
        self.started_monotonic = time.monotonic()
        self.health = HealthChecks(self)
        self.stopping = False

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self.engine.load)
        self.metrics.model_loaded.set(1)
        await self.producer.start()
        await self.consumer.start()
        self._worker_task = asyncio.create_task(self.worker.run(), name="kafka-worker")
        self._lag_task = asyncio.create_task(self.lag_monitor.run(), name="lag-monitor")
        self._http = web.AppRunner(
            build_app(self), handle_signals=False, shutdown_timeout=self.settings.ml_shutdown_grace_s
        )
        await self._http.setup()
        site = web.TCPSite(self._http, self.settings.http_host, self.settings.http_port)
        await site.start()
        log.info(
            "serving: HTTP on %s:%d, consuming %s as group %s from %s, bucket %s",
            self.settings.http_host,
            self.settings.http_port,
            ", ".join(self.settings.consumed_topics),
            self.settings.kafka_group_id,
            self.settings.kafka_bootstrap_servers,
            self.settings.minio_bucket,
        )

    async def stop(self) -> None:
        """Stop intake, let running jobs finish within the grace period, commit, leave the group."""
        if self.stopping:
            return
        self.stopping = True
        grace = self.settings.ml_shutdown_grace_s
        log.info("stopping: finishing running jobs (grace %.0f s)", grace)
        if self._lag_task is not None:
            self._lag_task.cancel()
            await asyncio.gather(self._lag_task, return_exceptions=True)
        await self.worker.stop(grace)
        if self._worker_task is not None:
            await asyncio.gather(self._worker_task, return_exceptions=True)
        if self._http is not None:
            await self._http.cleanup()
        await self.consumer.stop()
        await self.notifier.drain(timeout=min(grace, 10.0))
        await self.producer.stop()
        log.info("stopped")

    async def run_until_signal(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
            await stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()

    # -- work -----------------------------------------------------------------------------------
    @property
    def consumer_joined(self) -> bool:
        return bool(self.consumer.assignment())

    def _assigned(self, partitions: set[TopicPartition]) -> None:
        self.metrics.rebalances.inc()

    async def run_job(self, request: JobRequest, source: Source) -> JobOutcome:
        async with self._job_slots:
            return await self.runner.run(request, source)

    async def handle_record(self, record: ConsumerRecord[bytes, bytes]) -> None:
        with log_context(topic=record.topic, partition=record.partition, offset=record.offset):
            await self._handle_record(record)

    async def _handle_record(self, record: ConsumerRecord[bytes, bytes]) -> None:
        settings = self.settings
        try:
            if record.topic == settings.kafka_minio_events_topic:
                decision = decode_minio_event(
                    record.value, settings.minio_bucket, settings.ml_default_profile, settings.ml_decision_threshold
                )
                for reason in decision.skipped:
                    self.metrics.skipped_events.labels(reason).inc()
                    log.info("minio event %s[%d]@%d skipped: %s", record.topic, record.partition, record.offset, reason)
                jobs, source = decision.jobs, Source.MINIO
            else:
                jobs, source = [decode_job_message(record.value)], Source.KAFKA
        except InvalidMessage as error:
            await self._dead_letter(record, error)
            return
        for job in jobs:
            await self.run_job(job, source)

    async def _dead_letter(self, record: ConsumerRecord[bytes, bytes], error: InvalidMessage) -> None:
        await self.publisher.dead_letter(record, error)
        self.metrics.dead_letters.labels(record.topic, error.code.value).inc()
        log.warning(
            "dead-lettered %s[%d]@%d [%s]: %s", record.topic, record.partition, record.offset, error.code, error.message
        )
