"""The service: builds the parts and wires them together, runs the Kafka loop and the HTTP server, stops cleanly.

The one place that knows every part. Each part gets what it uses and nothing else: the Kafka
loop a record handler, the dispatcher a way to run a job, the HTTP app the job slots, the token
check, the health checks and the metrics. The retry policies (consumer.retry) get their metric
counters here.

Stop (SIGTERM): no job starts any more, from Kafka or HTTP; running jobs and /infer requests get
ML_SHUTDOWN_GRACE_S together, then are cancelled (Kafka records stay uncommitted); final writes
under way complete; the clients close. The whole stop stays within the grace plus STOP_MARGIN_S.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from collections.abc import Awaitable

from aiohttp import web
from aiokafka import TopicPartition

from consumer import retry
from consumer.auth import BearerAuth
from consumer.http.app import build_app, runner_options
from consumer.http.health import HealthChecks
from consumer.jobs.callback import BackendNotifier
from consumer.jobs.runner import JobRunner
from consumer.jobs.slots import JobSlots
from consumer.jobs.workspace import Workspace
from consumer.observability import memory
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

# After the grace: for final writes under way, leaving the group and closing the clients.
STOP_MARGIN_S = 10.0


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
        self.store = ObjectStore.from_settings(settings, self._counted(retry.STORAGE))
        self.producer = make_producer(settings)
        self.publisher = EventPublisher(
            self.producer, settings.kafka_job_events_topic, settings.kafka_dlq_topic, self._counted(retry.PUBLISH)
        )
        self.notifier = BackendNotifier(
            settings.backend_url,
            settings.ml_service_token.get_secret_value(),
            settings.callback_timeout_s,
            settings.callback_max_attempts,
            on_give_up=self.metrics.callbacks_failed.inc,
            policy=self._counted(retry.CALLBACK),
        )
        self.workspace = Workspace(settings.ml_workdir, settings.ml_disk_space_factor)
        self.runner = JobRunner(
            settings, self.store, self.models, self.publisher, self.notifier, self.metrics, self.workspace
        )
        self.jobs = JobSlots(self.runner, settings.ml_max_concurrent_jobs)
        self.consumer = make_consumer(settings, settings.kafka_group_id)
        self.worker = KafkaWorker(
            self.consumer,
            settings.consumed_topics,
            RecordDispatcher(settings, self.jobs.run, self.publisher, self.metrics),
            revoke_grace_s=min(settings.ml_shutdown_grace_s, settings.kafka_session_timeout_ms / 1000),
            on_assign=self._assigned,
            policy=self._counted(retry.LANE),
            on_abandon=self.metrics.jobs_abandoned.inc,
        )
        self.metrics.watch_partitions(lambda: [(s.topic, s.partition, s.seconds) for s in self.worker.stalls()])
        self.lag_monitor = LagMonitor(self.consumer, self.metrics, settings.ml_lag_refresh_s)
        self.health = HealthChecks(
            store=self.store,
            group=self.consumer,
            group_id=settings.kafka_group_id,
            models=self.models,
            jobs=self.jobs,
            workspace=self.workspace,
            stalls=self.worker.stalls,
            stall_limit_s=settings.ml_stall_limit_s,
        )
        self._worker_task: asyncio.Task[None] | None = None
        self._lag_task: asyncio.Task[None] | None = None
        self._http: web.AppRunner | None = None

    def _counted(self, policy: retry.RetryPolicy) -> retry.RetryPolicy:
        return dataclasses.replace(policy, on_retry=self.metrics.retries.labels(policy.name).inc)

    def _assigned(self, partitions: set[TopicPartition]) -> None:
        self.metrics.rebalances.inc()

    async def start(self) -> None:
        # What a killed process of ours left in the work directory goes first.
        await asyncio.to_thread(self.workspace.open)
        # The group join (seconds of the broker's rebalance) overlaps the models' load; no record
        # is fetched before they are loaded.
        loading = asyncio.create_task(asyncio.to_thread(self.models.load_all), name="load-models")
        try:
            await self.producer.start()
            await self.consumer.start()
            models_loaded = asyncio.Event()
            self._worker_task = asyncio.create_task(self.worker.run(models_loaded), name="kafka-worker")
            await loading
        finally:
            if not loading.done():  # the clients failed: let the load end before stop() runs
                await asyncio.gather(loading, return_exceptions=True)
        await asyncio.to_thread(memory.settle)
        models_loaded.set()
        self.metrics.model_loaded.set(1)
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
            body_timeout_s=settings.http_body_timeout_s,
            retry_after_s=max(1, round(settings.ml_infer_retry_wait_s)),
        )
        self._http = web.AppRunner(app, **runner_options(settings.http_keepalive_s, settings.ml_shutdown_grace_s))
        await self._http.setup()
        await web.TCPSite(self._http, settings.http_host, settings.http_port).start()

    async def stop(self) -> None:
        """Stop intake, give running jobs the grace, then close; never past grace + STOP_MARGIN_S."""
        if self.jobs.closed:
            return
        grace = self.settings.ml_shutdown_grace_s
        end = time.monotonic() + grace + STOP_MARGIN_S
        # Both before any await: from here on no record and no request starts a job.
        self.worker.halt_intake()
        self.jobs.close()
        log.info("stopping: finishing running jobs (grace %.0f s)", grace)
        if self._lag_task is not None:
            self._lag_task.cancel()
            await asyncio.gather(self._lag_task, return_exceptions=True)
        await asyncio.gather(self.worker.stop(grace), self._stop_http())
        await self.runner.finals.wait(end - time.monotonic())
        if self._worker_task is not None:
            await self._bounded(self._worker_task, end)
        await self._bounded(self.consumer.stop(), end)
        await self.notifier.drain(timeout=max(0.0, min(10.0, end - time.monotonic() - 2.0)))
        await self._bounded(self.producer.stop(), end)
        self.workspace.close()
        log.info("stopped")

    async def _stop_http(self) -> None:
        # In-flight /infer requests get the grace (the runner's shutdown_timeout), then are cancelled.
        if self._http is not None:
            await self._http.cleanup()

    @staticmethod
    async def _bounded(work: Awaitable[object], end: float) -> None:
        task = asyncio.ensure_future(work)
        done, _ = await asyncio.wait({task}, timeout=max(0.5, end - time.monotonic()))
        if not done:
            task.cancel()
            log.warning("stop: %s ran past the margin and was cut", task.get_coro())
        elif not task.cancelled() and task.exception() is not None:
            log.warning("stop: %s failed: %s", task.get_coro(), task.exception())

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
