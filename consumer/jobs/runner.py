"""The job runner: fetch -> read -> infer -> analyse -> write -> publish -> notify.

A job is a sequence of named steps (bodies in jobs.steps), each timed and logged under its
name, inside a deadline, with transient failures retried with backoff. Every blocking step runs
in a worker thread, so the event loop keeps polling Kafka and answering HTTP while a job runs.
Job failures end in a `failed` event, not an exception.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from consumer.backoff import compute_backoff
from consumer.errors import EventPublishError, JobError, JobTimeout, TransientError
from consumer.imaging.analysis import Analysis
from consumer.imaging.limits import ReadLimits
from consumer.imaging.scans import Scan
from consumer.jobs import steps
from consumer.jobs.callback import BackendNotifier
from consumer.jobs.context import JobContext, JobOutcome, Written
from consumer.jobs.events import completed_event, failed_event, job_event
from consumer.jobs.outputs import OutputFiles, OutputKeys, upload_outputs
from consumer.jobs.progress import ProgressReporter
from consumer.jobs.result import build_result, model_info, unknown_model
from consumer.observability.logs import log_context
from consumer.observability.metrics import ServiceMetrics
from consumer.settings import Settings
from consumer.storage import ObjectStore
from consumer.transport.publisher import EventPublisher
from models.engine import Prediction
from models.registry import ModelNotFound as UnknownModel
from models.registry import ModelRegistry
from schemas.events import JobEvent, JobStatus
from schemas.jobs import JobRequest, Source
from schemas.results import Metric, ModelInfo

log = logging.getLogger(__name__)
T = TypeVar("T")


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        store: ObjectStore,
        models: ModelRegistry,
        publisher: EventPublisher,
        notifier: BackendNotifier,
        metrics: ServiceMetrics,
    ):
        self.settings = settings
        self.store = store
        self.models = models
        self.publisher = publisher
        self.notifier = notifier
        self.metrics = metrics
        self.in_flight = 0
        self.read_limits = ReadLimits.from_settings(settings)

    async def run(self, request: JobRequest, source: Source) -> JobOutcome:
        """Run one job to its final event; raises only when an event could not be published."""
        ctx = self._context(request, source)
        with log_context(
            job_uuid=request.job_uuid, source=source.value, model_name=ctx.model.name, model_version=ctx.model.version
        ):
            log.info("job %s accepted from %s: %s (%s)", ctx.job_uuid, source, request.input_object, ctx.profile)
            await self.publisher.publish(job_event(ctx, JobStatus.ACCEPTED))
            try:
                written = await self._counted(ctx)
            except JobError as error:
                return await self._fail(ctx, error)
            return await self._complete(ctx, written)

    def _context(self, request: JobRequest, source: Source) -> JobContext:
        return JobContext(
            request=request,
            source=source,
            profile=request.profile or self.settings.ml_default_profile,
            threshold=request.threshold or self.settings.ml_decision_threshold,
            keys=OutputKeys.for_job(request),
            model=self._model_info(request.model),
        )

    def _model_info(self, requested: str | None) -> ModelInfo:
        """The model the job names (or the default); the scan's modality may still route it elsewhere."""
        try:
            return model_info(self.models.card(self.models.resolve(requested)))
        except UnknownModel:
            return unknown_model(requested or "")

    async def _counted(self, ctx: JobContext) -> Written:
        """The job's work, counted in flight; an unexpected exception becomes an internal error."""
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            return await self._attempts(ctx)
        except (JobError, EventPublishError, asyncio.CancelledError):
            raise
        except Exception as error:
            log.exception("job %s failed unexpectedly", ctx.job_uuid)
            raise JobError(f"internal error: {type(error).__name__}: {error}") from error
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()

    async def _attempts(self, ctx: JobContext) -> Written:
        """Retry transient failures (storage down, ...) with backoff; everything else fails at once."""
        attempts = self.settings.ml_max_job_attempts
        for attempt in range(1, attempts + 1):
            try:
                async with asyncio.timeout(self.settings.ml_job_timeout_s) as deadline:
                    return await self._steps(ctx)
            except TimeoutError as error:
                if deadline.expired():
                    raise JobTimeout(f"the job ran longer than {self.settings.ml_job_timeout_s:.0f} s") from error
                raise
            except TransientError as error:
                if attempt == attempts:
                    raise
                delay = compute_backoff(attempt)
                log.warning(
                    "job %s: %s (attempt %d/%d, retry in %.1f s)", ctx.job_uuid, error, attempt, attempts, delay
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _steps(self, ctx: JobContext) -> Written:
        request, limits = ctx.request, self.read_limits
        with tempfile.TemporaryDirectory(prefix=f"job-{ctx.job_uuid}-", dir=self.settings.ml_workdir) as work:
            tmp = Path(work)
            await steps.resolve_model(self.models, request.model, None)  # an unknown model fails before any I/O
            path, size = await self._step(
                ctx, "fetch", steps.fetch(self.store, request.input_object, tmp, self.settings.ml_max_input_bytes)
            )
            scan = await self._step(ctx, "read", steps.read(path, tmp, limits, request.series_uid))
            ctx.model = model_info(await steps.resolve_model(self.models, request.model, scan))
            await self.publisher.publish(job_event(ctx, JobStatus.RUNNING, step="infer", progress=0.2))
            async with ProgressReporter(self.publisher.publish, ctx) as progress:
                prediction = await self._step(
                    ctx,
                    "infer",
                    steps.infer(self.models, ctx.model.name, scan, ctx.profile, ctx.threshold, progress.report),
                )
            await self.publisher.publish(job_event(ctx, JobStatus.PROGRESS, step="analyse", progress=0.8))
            analysis = await self._step(ctx, "analyse", steps.find_lesions(scan, prediction))
            metrics: list[Metric] = []
            if request.reference_object is not None:
                metrics = await self._step(
                    ctx,
                    "reference",
                    steps.score_reference(self.store, request.reference_object, tmp, limits, scan, analysis),
                )
            return await self._step(ctx, "write", self._write(ctx, scan, size, prediction, analysis, metrics))

    async def _step(self, ctx: JobContext, name: str, work: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            with log_context(step=name):
                return await work
        finally:
            elapsed = time.perf_counter() - started
            ctx.timings[name] = round(elapsed, 4)
            self.metrics.step_seconds.labels(name).observe(elapsed)

    async def _write(
        self, ctx: JobContext, scan: Scan, size: int, prediction: Prediction, analysis: Analysis, metrics: list[Metric]
    ) -> Written:
        labels = prediction.label_names
        (seg, seg_warning), preview = await asyncio.gather(
            steps.dicom_seg(scan, analysis, ctx.job_uuid, ctx.model, labels),
            steps.preview(scan, analysis, self.models.card(ctx.model.name).modality),
        )
        result = build_result(
            ctx,
            scan,
            size,
            analysis,
            metrics,
            warnings=[*scan.warnings, *([seg_warning] if seg_warning else [])],
            with_seg=seg is not None,
            with_uncertainty=prediction.uncertainty is not None,
            labels=labels,
            processing_time=ctx.elapsed(),
            created_at=datetime.now(UTC),
        )
        files = OutputFiles(
            mask=analysis.mask,
            labels=labels,
            affine=scan.affine,
            header=scan.header,
            preview=preview,
            seg=seg,
            uncertainty=prediction.uncertainty,
        )
        mask_bytes = await upload_outputs(self.store, ctx.keys, files, result)
        return Written(result, mask_bytes, ctx.keys.seg if seg is not None else None)

    async def _complete(self, ctx: JobContext, written: Written) -> JobOutcome:
        duration = round(ctx.elapsed(), 3)
        await self._finish(completed_event(ctx, written, duration))
        self.metrics.jobs.labels("completed", ctx.source.value, ctx.profile.value).inc()
        self.metrics.job_seconds.labels(ctx.profile.value).observe(duration)
        summary = written.result.summary
        log.info(
            "job %s completed in %.2f s: %d lesion(s), %.1f mm3; steps %s",
            ctx.job_uuid,
            duration,
            summary.lesions_count,
            summary.total_volume,
            ctx.timings,
            extra={"duration": duration, "profile": ctx.profile.value, "status": "completed"},
        )
        return JobOutcome(ctx.job_uuid, JobStatus.COMPLETED, ctx.keys, duration, written.mask_bytes, written.result)

    async def _fail(self, ctx: JobContext, error: JobError) -> JobOutcome:
        duration = round(ctx.elapsed(), 3)
        log.warning(
            "job %s failed [%s]: %s",
            ctx.job_uuid,
            error.code,
            error.message,
            extra={"duration": duration, "error_code": error.code.value, "status": "failed"},
        )
        await self._finish(failed_event(ctx, error, duration))
        self.metrics.jobs.labels("failed", ctx.source.value, ctx.profile.value).inc()
        self.metrics.job_errors.labels(error.code.value).inc()
        return JobOutcome(ctx.job_uuid, JobStatus.FAILED, ctx.keys, duration, error=error)

    async def _finish(self, event: JobEvent) -> None:
        """The final event (timed as the `publish` step), then the backend's callback."""
        started = time.perf_counter()
        await self.publisher.publish(event)
        self.metrics.step_seconds.labels("publish").observe(time.perf_counter() - started)
        self.notifier.notify(event)
