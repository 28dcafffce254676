"""Prometheus metrics, on a registry of the service's own (so tests can build several services)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter("ml_jobs_total", "Jobs finished", ["status", "source", "profile"], registry=self.registry)
        self.job_errors = Counter("ml_job_errors_total", "Failed jobs by error code", ["code"], registry=self.registry)
        self.step_seconds = Histogram(
            "ml_job_step_seconds", "Time per job step", ["step"], buckets=STEP_BUCKETS, registry=self.registry
        )
        self.job_seconds = Histogram(
            "ml_job_duration_seconds", "Whole job time", ["profile"], buckets=STEP_BUCKETS, registry=self.registry
        )
        self.in_flight = Gauge("ml_jobs_in_flight", "Jobs running now", registry=self.registry)
        self.dead_letters = Counter(
            "ml_dead_letters_total", "Messages sent to the DLQ", ["topic", "code"], registry=self.registry
        )
        self.skipped_events = Counter(
            "ml_minio_events_skipped_total", "MinIO records that started no job", ["reason"], registry=self.registry
        )
        self.callbacks_failed = Counter(
            "ml_callbacks_failed_total", "Backend callbacks given up", registry=self.registry
        )
        self.result_cache = Counter(
            "ml_result_cache_total",
            "Result cache lookups: hit (a finished identical job's outputs reused) or miss",
            ["result"],
            registry=self.registry,
        )
        self.retries = Counter(
            "ml_retries_total",
            "Retries of transient failures, by what was retried (storage, publish, callback, lane)",
            ["what"],
            registry=self.registry,
        )
        self.jobs_abandoned = Counter(
            "ml_jobs_abandoned_total",
            "Jobs cancelled uncommitted at the end of a revoke's or a stop's grace",
            registry=self.registry,
        )
        self.model_loaded = Gauge("ml_model_loaded", "1 when the model is loaded", registry=self.registry)
        self.rebalances = Counter(
            "ml_consumer_rebalances_total", "Partition assignments received", registry=self.registry
        )
        self.consumer_lag = Gauge(
            "ml_consumer_lag",
            "Messages behind the end offset, per partition this replica holds (refreshed periodically)",
            ["topic", "partition"],
            registry=self.registry,
        )
        # process_resident_memory_bytes, process_cpu_seconds_total, open fds, python_info.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._gpu_memory()

    def _gpu_memory(self) -> None:
        # Imported here: the operator CLI imports this module (through consumer.transport.lag) and must
        # start without loading torch.
        import torch

        if not torch.cuda.is_available():
            return
        allocated = Gauge(
            "ml_gpu_memory_allocated_bytes", "GPU memory held by tensors", ["device"], registry=self.registry
        )
        reserved = Gauge(
            "ml_gpu_memory_reserved_bytes",
            "GPU memory reserved by the caching allocator",
            ["device"],
            registry=self.registry,
        )
        for index in range(torch.cuda.device_count()):
            allocated.labels(str(index)).set_function(functools.partial(torch.cuda.memory_allocated, index))
            reserved.labels(str(index)).set_function(functools.partial(torch.cuda.memory_reserved, index))

    def watch_partitions(self, stalls: Callable[[], Iterable[tuple[str, int, float]]]) -> None:
        """ml_partition_stalled_seconds{topic,partition}: how long each partition's lane has been
        waiting on a dependency or retrying a record (read when scraped)."""
        self.registry.register(_StalledPartitions(stalls))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StalledPartitions(Collector):
    def __init__(self, stalls: Callable[[], Iterable[tuple[str, int, float]]]):
        self.stalls = stalls

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "ml_partition_stalled_seconds",
            "Seconds a partition's lane has waited on a dependency or retried a record (absent when it is not)",
            labels=["topic", "partition"],
        )
        for topic, partition, seconds in self.stalls():
            family.add_metric([topic, str(partition)], seconds)
        yield family
