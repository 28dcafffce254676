"""The service: builds the parts and wires them together, runs the Kafka loop and the HTTP server, stops cleanly.

The one place that knows every part. Each part gets what it uses and nothing else: the Kafka
loop a record handler, the dispatcher a way to run a job, the HTTP app the job slots, the token
check, the health checks and the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web
from aiokafka import TopicPartition

from consumer.auth import BearerAuth
from consumer.http.app import build_app
from consumer.http.health import HealthChecks
from consumer.jobs.callback import BackendNotifier
from consumer.jobs.runner import JobRunner
from consumer.jobs.slots import JobSlots
from consumer.observability.metrics import ServiceMetrics
from consumer.settings import Settings
from consumer.storage import ObjectStore
from consumer.transport.clients import make_consumer, make_producer
from consumer.transport.dispatch import RecordDispatcher
from consumer.transport.lag import LagMonitor
from consumer.transport.publisher import EventPublisher
from consumer.transport.worker import KafkaWorker
from models.engine import EngineOptions, InferenceEngine
from models.registry import ModelRegistry

log = logging.getLogger(__name__)


def build_registry(settings: Settings) -> ModelRegistry:
    options = EngineOptions(
        device=settings.ml_device,
        precision=settings.ml_precision,
        threads=settings.ml_torch_threads,
        runtime=settings.ml_runtime,
        export_cache=settings.ml_export_cache,
    )
    return ModelRegistry(
        settings.model_path,
        settings.model_names,
        lambda spec: InferenceEngine(spec, options),
        max_loaded=settings.ml_max_loaded_models,
        routes=settings.hosted_routes,
    )


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.models = build_registry(settings)
        self.store = ObjectStore.from_settings(settings)
        self.producer = make_producer(settings)
        self.publisher = EventPublisher(self.producer, settings.kafka_job_events_topic, settings.kafka_dlq_topic)
        self.notifier = BackendNotifier(
            settings.backend_url,
            settings.ml_service_token.get_secret_value(),
            settings.callback_timeout_s,
            settings.callback_max_attempts,
            on_give_up=self.metrics.callbacks_failed.inc,
        )
        runner = JobRunner(settings, self.store, self.models, self.publisher, self.notifier, self.metrics)
        self.jobs = JobSlots(runner, settings.ml_max_concurrent_jobs)
        self.consumer = make_consumer(settings, settings.kafka_group_id)
        self.worker = KafkaWorker(
            self.consumer,
            settings.consumed_topics,
            RecordDispatcher(settings, self.jobs.run, self.publisher, self.metrics),
            revoke_grace_s=min(settings.ml_shutdown_grace_s, settings.kafka_session_timeout_ms / 1000),
            on_assign=self._assigned,
        )
        self.lag_monitor = LagMonitor(self.consumer, self.metrics, settings.ml_lag_refresh_s)
        self.health = HealthChecks(
            store=self.store,
            group=self.consumer,
            group_id=settings.kafka_group_id,
            models=self.models,
            jobs=self.jobs,
        )
        self._worker_task: asyncio.Task[None] | None = None
        self._lag_task: asyncio.Task[None] | None = None
        self._http: web.AppRunner | None = None

    def _assigned(self, partitions: set[TopicPartition]) -> None:
        self.metrics.rebalances.inc()

    async def start(self) -> None:
        await asyncio.to_thread(self.models.load_all)
        self.metrics.model_loaded.set(1)
        await self.producer.start()
        await self.consumer.start()
        self._worker_task = asyncio.create_task(self.worker.run(), name="kafka-worker")
        self._lag_task = asyncio.create_task(self.lag_monitor.run(), name="lag-monitor")
        await self._start_http()
        settings = self.settings
        log.info(
            "serving: HTTP on %s:%d, consuming %s as group %s from %s, bucket %s",
            settings.http_host,
            settings.http_port,
            ", ".join(settings.consumed_topics),
            settings.kafka_group_id,
            settings.kafka_bootstrap_servers,
            settings.minio_bucket,
        )

    async def _start_http(self) -> None:
        settings = self.settings
        app = build_app(
            self.jobs,
            BearerAuth(tuple(settings.auth_secrets), settings.ml_allow_insecure),
            self.health,
            self.metrics,
            settings.http_max_body_bytes,
        )
        self._http = web.AppRunner(app, handle_signals=False, shutdown_timeout=settings.ml_shutdown_grace_s)
        await self._http.setup()
        await web.TCPSite(self._http, settings.http_host, settings.http_port).start()

    async def stop(self) -> None:
        """Stop intake, let running jobs finish within the grace period, commit, leave the group."""
        if self.jobs.closed:
            return
        self.jobs.close()
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
