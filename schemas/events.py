"""Job events on `ml.job-events` (key = job_uuid) and dead letters on `ml.jobs.dlq`."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from schemas.errors import ErrorCode
from schemas.jobs import Profile, Source
from schemas.results import Summary


class JobStatus(StrEnum):
    ACCEPTED = "accepted"
    RUNNING = "running"
    PROGRESS = "progress"
    COMPLETED = "completed"
    FAILED = "failed"


def utc_now() -> datetime:
    return datetime.now(UTC)


class ErrorInfo(BaseModel):
    code: ErrorCode
    message: str
    retryable: bool = False


class JobEvent(BaseModel):
    model_config = ConfigDict(title="JobEvent")

    job_uuid: str
    status: JobStatus
    source: Source
    timestamp: datetime = Field(default_factory=utc_now)
    input_object: str | None = None
    profile: Profile | None = None
    threshold: float | None = None
    model_name: str | None = None
    model_version: str | None = None
    model_sha256: str | None = Field(default=None, description="sha256 of the model's weights")
    step: str | None = Field(default=None, description="running/progress: the step now under way")
    progress: float | None = Field(default=None, ge=0.0, le=1.0)
    # completed
    output_object: str | None = None
    results_object: str | None = None
    report_object: str | None = None
    seg_object: str | None = Field(default=None, description="DICOM input: key of the DICOM SEG object")
    preview_object: str | None = Field(default=None, description="PNG montage of slices through the findings")
    uncertainty_object: str | None = Field(
        default=None, description="research: voxel-wise variance across test-time flips (NIfTI)"
    )
    cached: bool | None = Field(default=None, description="completed: a finished identical job's result was reused")
    file_size: int | None = Field(default=None, description="Size of the mask object in bytes")
    file_name: str | None = None
    duration_seconds: float | None = None
    summary: Summary | None = None
    # failed
    error: ErrorInfo | None = None


class DeadLetterOrigin(BaseModel):
    topic: str
    partition: int
    offset: int
    key: str | None = None
    timestamp_ms: int | None = None


class DeadLetter(BaseModel):
    """A message that could not become a job: the reason, where it came from, and its bytes."""

    model_config = ConfigDict(title="DeadLetter")

    error: ErrorInfo
    origin: DeadLetterOrigin
    payload: str = Field(description="The original value, decoded as UTF-8 with replacement")
    details: list[dict[str, Any]] = Field(default_factory=list, description="Validation errors, if any")
    timestamp: datetime = Field(default_factory=utc_now)
