"""A job's events (accepted, running, progress, completed, failed), built from its context.

Pure: publishing them is transport.publisher's.
"""

from __future__ import annotations

from consumer.errors import JobError
from consumer.jobs.context import JobContext, Written
from schemas.events import JobEvent, JobStatus


def job_event(
    ctx: JobContext, status: JobStatus, *, step: str | None = None, progress: float | None = None
) -> JobEvent:
    return JobEvent(
        job_uuid=ctx.job_uuid,
        status=status,
        source=ctx.source,
        input_object=ctx.request.input_object,
        profile=ctx.profile,
        threshold=ctx.threshold,
        model_name=ctx.model.name,
        model_version=ctx.model.version,
        model_sha256=ctx.model.weights_sha256,
        step=step,
        progress=progress,
    )


def completed_event(ctx: JobContext, written: Written, duration: float) -> JobEvent:
    return job_event(ctx, JobStatus.COMPLETED).model_copy(
        update={
            "output_object": ctx.keys.mask,
            "results_object": ctx.keys.results,
            "report_object": ctx.keys.report,
            "seg_object": written.seg_key,
            "preview_object": written.result.outputs.get("preview"),
            "uncertainty_object": written.result.outputs.get("uncertainty"),
            "file_size": written.mask_bytes,
            "file_name": ctx.keys.mask.rsplit("/", 1)[-1],
            "duration_seconds": duration,
            "summary": written.result.summary,
            "cached": written.cached,
        }
    )


def failed_event(ctx: JobContext, error: JobError, duration: float) -> JobEvent:
    return job_event(ctx, JobStatus.FAILED).model_copy(update={"error": error.info(), "duration_seconds": duration})
