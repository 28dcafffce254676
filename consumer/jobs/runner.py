"""The job runner: check -> (cache) -> fetch -> read -> infer -> analyse -> write -> publish -> notify.

A job is a sequence of named steps (bodies in jobs.steps), each timed and logged under its
name. Its deadline (ML_JOB_TIMEOUT_S) covers the whole job: transient failures inside it
(storage, events) are retried by consumer.retry up to that deadline, call by call, so a failed
upload is retried without running the model again. Every blocking step runs in a worker thread,
so the event loop keeps polling Kafka and answering HTTP while a job runs. Job failures end in a
`failed` event, not an exception; the final event goes out shielded from cancellation, followed
by the Kafka commit when the caller gives one (`finish`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from consumer import retry
from consumer.activity import Finals
from consumer.errors import EventPublishError, JobError, JobTimeout
from consumer.imaging.analysis import Analysis
from consumer.imaging.limits import ReadLimits
from consumer.imaging.scans import Scan
from consumer.jobs import steps
from consumer.jobs.cache import ResultCache, cache_key, model_identity
from consumer.jobs.callback import BackendNotifier
from consumer.jobs.context import JobContext, JobOutcome, Written
from consumer.jobs.events import completed_event, failed_event, job_event
from consumer.jobs.outputs import OutputFiles, OutputKeys, check_allowed, upload_outputs
from consumer.jobs.progress import ProgressReporter
from consumer.jobs.result import build_result, model_info, unknown_model
from consumer.jobs.workspace import Workspace
from consumer.observability import memory
from consumer.observability.logs import log_context
from consumer.observability.metrics import ServiceMetrics
from consumer.settings import Settings
from consumer.storage import ObjectInfo, ObjectStore
from consumer.transport.publisher import EventPublisher
from models.engine import Prediction
from models.registry import ModelNotFound as UnknownModel
from models.registry import ModelRegistry
from schemas.events import JobEvent, JobStatus
from schemas.jobs import JobRequest, Profile, Source
from schemas.results import Metric, ModelInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

# Runs a job's final write (then, for a Kafka record, its commit), shielded from cancellation.
Finish = Callable[[Callable[[], Awaitable[None]]], Awaitable[None]]


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        store: ObjectStore,
        models: ModelRegistry,
        publisher: EventPublisher,
        notifier: BackendNotifier,
        metrics: ServiceMetrics,
        workspace: Workspace,
    ):
        self.settings = settings
        self.store = store
        self.models = models
        self.publisher = publisher
        self.notifier = notifier
        self.metrics = metrics
        self.workspace = workspace
        self.cache = ResultCache(store, settings.ml_output_prefix, settings.ml_result_cache)
        self.in_flight = 0
        self.read_limits = ReadLimits.from_settings(settings)
        # Final events of jobs without a Kafka commit (HTTP): a stop awaits them.
        self.finals = Finals()
        self._background: set[asyncio.Future[bool]] = set()

    async def run(self, request: JobRequest, source: Source, finish: Finish | None = None) -> JobOutcome:
        """Run one job to its final event; raises only when an event could not be published (or
        when cancelled: then no final event, and no commit)."""
        ctx = self._context(request, source)
        with log_context(
            job_uuid=request.job_uuid, source=source.value, model_name=ctx.model.name, model_version=ctx.model.version
        ):
            log.info("job %s accepted from %s: %s (%s)", ctx.job_uuid, source, request.input_object, ctx.profile)
            await self.publisher.publish(job_event(ctx, JobStatus.ACCEPTED))
            try:
                written = await self._counted(ctx)
            except JobError as error:
                return await self._fail(ctx, error, finish)
            return await self._complete(ctx, written, finish)

    def _context(self, request: JobRequest, source: Source) -> JobContext:
        profile = request.profile or self.settings.ml_default_profile
        return JobContext(
            request=request,
            source=source,
            profile=profile,
            threshold=request.threshold or self.settings.ml_decision_threshold,
            keys=OutputKeys.for_job(request, self.settings.ml_output_prefix),
            model=self._model_info(request.model, profile),
        )

    def _model_info(self, requested: str | None, profile: Profile) -> ModelInfo:
        """The model the job names (or the default); the scan's modality may still route it elsewhere."""
        try:
            return model_info(self.models.card(self.models.resolve(requested)), profile.value)
        except UnknownModel:
            return unknown_model(requested or "")

    async def _counted(self, ctx: JobContext) -> Written:
        """The job's work, counted in flight; an unexpected exception becomes an internal error."""
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            return await self._within_deadline(ctx)
        except (JobError, EventPublishError, asyncio.CancelledError):
            raise
        except Exception as error:
            log.exception("job %s failed unexpectedly", ctx.job_uuid)
            raise JobError(f"internal error: {type(error).__name__}: {error}") from error
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
            if self.in_flight == 0 and self.settings.ml_malloc_trim:
                self._trim()

    def _trim(self) -> None:
        """Between jobs: freed memory back to the system (see observability.memory), in a thread."""
        task = asyncio.ensure_future(asyncio.to_thread(memory.trim))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _within_deadline(self, ctx: JobContext) -> Written:
        """The work under the job's one deadline, which every retry inside keeps to. An HTTP caller
        is not kept waiting through a long outage: its retries wait ML_INFER_RETRY_WAIT_S at most."""
        timeout = self.settings.ml_job_timeout_s
        wait = self.settings.ml_infer_retry_wait_s if ctx.source is Source.HTTP else None
        try:
            async with asyncio.timeout(timeout) as scope:
                with retry.budget(retry.Deadline.after(timeout), wait):
                    return await self._steps(ctx)
        except TimeoutError as error:
            if scope.expired():
                raise JobTimeout(f"the job ran longer than {timeout:.0f} s") from error
            raise

    async def _steps(self, ctx: JobContext) -> Written:
        request = ctx.request
        # Refused before any I/O: outputs out of place, a model this service does not host.
        check_allowed(ctx.keys, request, self.settings.ml_output_prefix)
        await steps.resolve_model(self.models, request.model, None)
        info = await steps.check_input(self.store, request.input_object, self.settings.ml_max_input_bytes)
        key = await self._cache_key(ctx, info)
        if key is not None and (cached := await self._from_cache(ctx, key)) is not None:
            return cached
        with self.workspace.job_dir(ctx.job_uuid) as tmp:
            async with self.workspace.room(info.size):
                path = await self._step(ctx, "fetch", steps.fetch(self.store, request.input_object, tmp))
                written = await self._analyse(ctx, path, info.size, tmp)
        if key is not None:
            await self.cache.remember(key, ctx, written)
        return written

    async def _cache_key(self, ctx: JobContext, info: ObjectInfo) -> str | None:
        if not self.cache.enabled:
            return None
        reference = await steps.reference_info(self.store, ctx.request.reference_object)
        if ctx.request.reference_object is not None and reference is None:
            return None
        return cache_key(ctx, info, reference, model_identity(self.models, ctx.request.model, ctx.profile))

    async def _from_cache(self, ctx: JobContext, key: str) -> Written | None:
        written = await self._step(ctx, "cache", self.cache.find(key, ctx))
        self.metrics.result_cache.labels("hit" if written else "miss").inc()
        if written is not None:
            ctx.model = written.result.model
            log.info("job %s: a finished identical job's outputs reused (result cache)", ctx.job_uuid)
        return written

    async def _analyse(self, ctx: JobContext, path: Path, size: int, tmp: Path) -> Written:
        request, limits = ctx.request, self.read_limits
        scan = await self._step(ctx, "read", steps.read(path, tmp, limits, request.series_uid))
        card = await steps.resolve_model(self.models, request.model, scan)
        ctx.model = model_info(card, ctx.profile.value)  # what a failure from here on names
        setup = await self._step(ctx, "setup", steps.choose_setup(self.models, card.name, scan, ctx.profile))
        ctx.model = model_info(card, setup)
        await self.publisher.publish(job_event(ctx, JobStatus.RUNNING, step="infer", progress=0.2))
        async with ProgressReporter(self.publisher.publish, ctx) as progress:
            prediction = await self._step(
                ctx,
                "infer",
                steps.infer(self.models, card.name, scan, ctx.profile, ctx.threshold, progress.report, setup),
            )
        # The engine's own word on what ran (the card said what would), for the result.
        ctx.model = ctx.model.model_copy(update=dataclasses.asdict(prediction.ran))
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

    async def _complete(self, ctx: JobContext, written: Written, finish: Finish | None) -> JobOutcome:
        duration = round(ctx.elapsed(), 3)
        await self._finish(completed_event(ctx, written, duration), finish)
        self.metrics.jobs.labels("completed", ctx.source.value, ctx.profile.value).inc()
        self.metrics.job_seconds.labels(ctx.profile.value).observe(duration)
        summary = written.result.summary
        log.info(
            "job %s completed in %.2f s%s: %d lesion(s), %.1f mm3; steps %s",
            ctx.job_uuid,
            duration,
            " (cached)" if written.cached else "",
            summary.lesions_count,
            summary.total_volume,
            ctx.timings,
            extra={"duration": duration, "profile": ctx.profile.value, "status": "completed"},
        )
        return JobOutcome(ctx.job_uuid, JobStatus.COMPLETED, ctx.keys, duration, written.mask_bytes, written.result)

    async def _fail(self, ctx: JobContext, error: JobError, finish: Finish | None) -> JobOutcome:
        duration = round(ctx.elapsed(), 3)
        log.warning(
            "job %s failed [%s]: %s",
            ctx.job_uuid,
            error.code,
            error.message,
            extra={"duration": duration, "error_code": error.code.value, "status": "failed"},
        )
        await self._finish(failed_event(ctx, error, duration), finish)
        self.metrics.jobs.labels("failed", ctx.source.value, ctx.profile.value).inc()
        self.metrics.job_errors.labels(error.code.value).inc()
        return JobOutcome(ctx.job_uuid, JobStatus.FAILED, ctx.keys, duration, error=error)

    async def _finish(self, event: JobEvent, finish: Finish | None) -> None:
        """The final event (timed as the `publish` step) and the backend's callback, shielded from
        cancellation; `finish` adds the Kafka commit after them under the same shield."""

        async def final() -> None:
            started = time.perf_counter()
            await self.publisher.publish(event)
            self.metrics.step_seconds.labels("publish").observe(time.perf_counter() - started)
            self.notifier.notify(event)

        await (finish or self.finals.run)(final)
