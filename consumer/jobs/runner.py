"""The job runner: fetch -> read -> infer -> analyse -> write -> publish -> notify.

Every blocking step (decoding, inference, analysis, compression, Excel) runs in a worker
thread, so the event loop keeps polling Kafka and answering HTTP while a job runs. Output keys
come from the job id alone, so running a job twice overwrites the same objects.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import numpy as np

from consumer.backoff import compute_backoff
from consumer.errors import (
    EventPublishError,
    InputError,
    InputTooLarge,
    JobError,
    JobTimeout,
    ModelNotLoaded,
    TransientError,
)
from consumer.imaging.analysis import Analysis, analyse, reference_metrics
from consumer.imaging.dicom.seg import SegUnavailable, build_seg
from consumer.imaging.scans import ReadLimits, Scan, read_scan
from consumer.jobs.callback import BackendNotifier
from consumer.jobs.outputs import OutputKeys, encode_mask, encode_result
from consumer.jobs.report import build_report
from consumer.observability.logs import log_context
from consumer.observability.metrics import ServiceMetrics
from consumer.settings import Settings
from consumer.storage import ObjectStore
from consumer.transport.publisher import EventPublisher
from models.engine import InferenceEngine, Prediction
from schemas.errors import ErrorCode
from schemas.events import JobEvent, JobStatus
from schemas.jobs import JobRequest, Profile, Source
from schemas.results import AnalysisResult, InputInfo, Metric, ModelInfo, Segmentation, Summary

log = logging.getLogger(__name__)
T = TypeVar("T")

CONTENT_TYPES = {
    "nifti": "application/gzip",
    "json": "application/json",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "dicom": "application/dicom",
}


@dataclass
class JobContext:
    request: JobRequest
    source: Source
    profile: Profile
    threshold: float
    keys: OutputKeys
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def job_uuid(self) -> str:
        return self.request.job_uuid

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@dataclass(frozen=True)
class JobOutcome:
    job_uuid: str
    status: JobStatus
    keys: OutputKeys
    duration_seconds: float
    file_size: int | None = None
    result: AnalysisResult | None = None
    error: JobError | None = None


@dataclass(frozen=True)
class _Written:
    result: AnalysisResult
    mask_bytes: int
    seg_key: str | None = None


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        store: ObjectStore,
        engine: InferenceEngine,
        publisher: EventPublisher,
        notifier: BackendNotifier,
        metrics: ServiceMetrics,
    ):
        self.settings = settings
        self.store = store
        self.engine = engine
        self.publisher = publisher
        self.notifier = notifier
        self.metrics = metrics
        self.in_flight = 0
        self.read_limits = ReadLimits.from_settings(settings)

    async def run(self, request: JobRequest, source: Source) -> JobOutcome:
        """Run one job to its final event. Job failures end in a `failed` event, not an exception;
        only a failure to publish an event raises (EventPublishError)."""
        model = self._model_info()
        with log_context(
            job_uuid=request.job_uuid, source=source.value, model_name=model.name, model_version=model.version
        ):
            return await self._run(request, source)

    async def _run(self, request: JobRequest, source: Source) -> JobOutcome:
        ctx = JobContext(
            request=request,
            source=source,
            profile=request.profile or self.settings.ml_default_profile,
            threshold=request.threshold or self.settings.ml_decision_threshold,
            keys=OutputKeys.for_job(request),
        )
        log.info("job %s accepted from %s: %s (%s)", ctx.job_uuid, source, request.input_object, ctx.profile)
        await self._event(ctx, JobStatus.ACCEPTED)
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            written = await self._attempts(ctx)
        except JobError as error:
            return await self._fail(ctx, error)
        except (EventPublishError, asyncio.CancelledError):
            raise
        except Exception as error:
            log.exception("job %s failed unexpectedly", ctx.job_uuid)
            return await self._fail(ctx, JobError(f"internal error: {type(error).__name__}: {error}"))
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
        return await self._complete(ctx, written)

    async def _attempts(self, ctx: JobContext) -> _Written:
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

    async def _steps(self, ctx: JobContext) -> _Written:
        workdir = self.settings.ml_workdir
        with tempfile.TemporaryDirectory(prefix=f"job-{ctx.job_uuid}-", dir=workdir) as tmp:
            input_path, size = await self._step(ctx, "fetch", self._fetch(ctx, Path(tmp)))
            scan = await self._step(
                ctx,
                "read",
                asyncio.to_thread(read_scan, input_path, Path(tmp), self.read_limits, ctx.request.series_uid),
            )
            await self._event(ctx, JobStatus.RUNNING, step="infer", progress=0.2)
            prediction = await self._step(ctx, "infer", self._infer(ctx, scan))
            await self._event(ctx, JobStatus.PROGRESS, step="analyse", progress=0.8)
            result_analysis = await self._step(ctx, "analyse", self._analyse(ctx, scan, prediction))
            metrics: list[Metric] = []
            if ctx.request.reference_object is not None:
                metrics = await self._step(
                    ctx, "reference", self._reference_metrics(ctx, scan, result_analysis, Path(tmp))
                )
            return await self._step(ctx, "write", self._write(ctx, scan, size, result_analysis, metrics))

    async def _step(self, ctx: JobContext, name: str, work: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            with log_context(step=name):
                return await work
        finally:
            elapsed = time.perf_counter() - started
            ctx.timings[name] = round(elapsed, 4)
            self.metrics.step_seconds.labels(name).observe(elapsed)

    async def _fetch(self, ctx: JobContext, tmp: Path) -> tuple[Path, int]:
        info = await self.store.stat(ctx.request.input_object)
        if info.size > self.settings.ml_max_input_bytes:
            raise InputTooLarge(f"the input is {info.size} bytes, over the limit of {self.settings.ml_max_input_bytes}")
        if info.size == 0:
            raise InputError("the input object is empty", code=ErrorCode.INPUT_EMPTY)
        path = tmp / "input"
        await self.store.download(ctx.request.input_object, path)
        return path, info.size

    async def _infer(self, ctx: JobContext, scan: Scan) -> Prediction:
        if not self.engine.loaded:
            raise ModelNotLoaded("the model is not loaded yet")
        try:
            return await asyncio.to_thread(self.engine.predict, scan.data, scan.affine, ctx.profile)
        except (RuntimeError, ValueError) as error:
            log.exception("job %s: inference failed", ctx.job_uuid)
            raise JobError(f"inference failed: {error}", code=ErrorCode.INFERENCE_FAILED) from error

    async def _analyse(self, ctx: JobContext, scan: Scan, prediction: Prediction) -> Analysis:
        return await asyncio.to_thread(
            analyse,
            prediction.probability,
            scan.data,
            scan.affine,
            ctx.threshold,
            prediction.profile.min_lesion_volume_mm3,
        )

    async def _reference_metrics(self, ctx: JobContext, scan: Scan, analysis: Analysis, tmp: Path) -> list[Metric]:
        key = ctx.request.reference_object
        assert key is not None
        path = tmp / "reference"
        try:
            await self.store.download(key, path)
        except InputError as error:
            raise InputError(f"reference mask {key!r} does not exist", code=ErrorCode.REFERENCE_NOT_FOUND) from error

        def score() -> list[Metric]:
            try:
                reference = read_scan(path, tmp, self.read_limits)
            except InputError as error:
                raise InputError(
                    f"reference mask unreadable: {error.message}", code=ErrorCode.REFERENCE_MISMATCH
                ) from error
            if reference.data.shape != analysis.mask.shape or not np.allclose(reference.affine, scan.affine, atol=1e-3):
                raise InputError(
                    f"reference mask grid {reference.data.shape} does not match the input {analysis.mask.shape}",
                    code=ErrorCode.REFERENCE_MISMATCH,
                )
            return reference_metrics(analysis.mask, reference.data, float(abs(np.linalg.det(scan.affine[:3, :3]))))

        return await asyncio.to_thread(score)

    async def _write(
        self, ctx: JobContext, scan: Scan, size: int, analysis: Analysis, metrics: list[Metric]
    ) -> _Written:
        keys = ctx.keys
        warnings = scan.warnings
        seg_bytes: bytes | None = None
        if scan.dicom is not None:
            model = self._model_info()
            try:
                seg_bytes = await asyncio.to_thread(
                    build_seg, analysis.mask, scan.dicom, ctx.job_uuid, model.name, model.version
                )
            except SegUnavailable as error:
                log.warning("job %s: no DICOM SEG: %s", ctx.job_uuid, error)
                warnings.append(f"no DICOM SEG was written: {error}")
        outputs = {"mask": keys.mask, "results": keys.results, "report": keys.report}
        if seg_bytes is not None:
            outputs["dicom_seg"] = keys.seg
        result = AnalysisResult(
            job_uuid=ctx.job_uuid,
            profile=ctx.profile,
            threshold=ctx.threshold,
            input=InputInfo(
                object=ctx.request.input_object,
                format=scan.format.value,
                size_bytes=size,
                series=scan.dicom.selection if scan.dicom else None,
                warnings=warnings,
            ),
            model=self._model_info(),
            summary=Summary(
                total_volume=analysis.total_volume_mm3,
                lesions_count=len(analysis.findings),
                confidence=analysis.confidence,
                processing_time=round(ctx.elapsed(), 3),
            ),
            findings=analysis.findings,
            metrics=metrics,
            segmentation=Segmentation(
                file_path=keys.mask,
                format="nifti",
                dimensions=list(analysis.mask.shape),
                spacing=[round(s, 6) for s in scan.spacing],
                affine=[[round(float(v), 6) for v in row] for row in scan.affine],
                orientation=scan.orientation,
                threshold=ctx.threshold,
                dicom_seg=keys.seg if seg_bytes is not None else None,
            ),
            outputs=outputs,
            timings=dict(ctx.timings),
            created_at=datetime.now(UTC).isoformat(),
        )
        mask_bytes, report_bytes = await asyncio.gather(
            asyncio.to_thread(encode_mask, analysis.mask, scan.affine, scan.header, keys.mask.endswith(".gz")),
            asyncio.to_thread(build_report, result),
        )
        uploads = [
            self.store.put_bytes(keys.mask, mask_bytes, CONTENT_TYPES["nifti"]),
            self.store.put_bytes(keys.report, report_bytes, CONTENT_TYPES["xlsx"]),
        ]
        if seg_bytes is not None:
            uploads.append(self.store.put_bytes(keys.seg, seg_bytes, CONTENT_TYPES["dicom"]))
        try:
            await asyncio.gather(*uploads)
            # The JSON goes last: when it exists, everything it lists exists.
            await self.store.put_bytes(keys.results, encode_result(result), CONTENT_TYPES["json"])
        except InputError as error:
            raise JobError(f"could not write outputs: {error.message}", code=ErrorCode.OUTPUT_WRITE_FAILED) from error
        return _Written(result, len(mask_bytes), keys.seg if seg_bytes is not None else None)

    def _model_info(self) -> ModelInfo:
        bundle = self.engine.bundle
        return ModelInfo(
            name=bundle.name if bundle else self.settings.model_name,
            version=bundle.version if bundle else "unknown",
            device=str(self.engine.device),
            precision=self.engine.precision,
        )

    async def _complete(self, ctx: JobContext, written: _Written) -> JobOutcome:
        duration = round(ctx.elapsed(), 3)
        event = self._base_event(ctx, JobStatus.COMPLETED).model_copy(
            update={
                "output_object": ctx.keys.mask,
                "results_object": ctx.keys.results,
                "report_object": ctx.keys.report,
                "seg_object": written.seg_key,
                "file_size": written.mask_bytes,
                "file_name": ctx.keys.mask.rsplit("/", 1)[-1],
                "duration_seconds": duration,
                "summary": written.result.summary,
            }
        )
        await self._publish_final(event)
        self.notifier.notify(event)
        self.metrics.jobs.labels("completed", ctx.source.value, ctx.profile.value).inc()
        self.metrics.job_seconds.labels(ctx.profile.value).observe(duration)
        log.info(
            "job %s completed in %.2f s: %d lesion(s), %.1f mm3; steps %s",
            ctx.job_uuid,
            duration,
            written.result.summary.lesions_count,
            written.result.summary.total_volume,
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
        event = self._base_event(ctx, JobStatus.FAILED).model_copy(
            update={"error": error.info(), "duration_seconds": duration}
        )
        await self._publish_final(event)
        self.notifier.notify(event)
        self.metrics.jobs.labels("failed", ctx.source.value, ctx.profile.value).inc()
        self.metrics.job_errors.labels(error.code.value).inc()
        return JobOutcome(ctx.job_uuid, JobStatus.FAILED, ctx.keys, duration, error=error)

    def _base_event(self, ctx: JobContext, status: JobStatus, **extra: object) -> JobEvent:
        model = self._model_info()
        return JobEvent(
            job_uuid=ctx.job_uuid,
            status=status,
            source=ctx.source,
            input_object=ctx.request.input_object,
            profile=ctx.profile,
            threshold=ctx.threshold,
            model_name=model.name,
            model_version=model.version,
            **extra,  # type: ignore[arg-type]
        )

    async def _event(self, ctx: JobContext, status: JobStatus, **extra: object) -> None:
        await self.publisher.publish(self._base_event(ctx, status, **extra))

    async def _publish_final(self, event: JobEvent) -> None:
        started = time.perf_counter()
        await self.publisher.publish(event)
        self.metrics.step_seconds.labels("publish").observe(time.perf_counter() - started)
