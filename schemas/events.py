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


class RecordHeader(BaseModel):
    key: str
    value_base64: str = Field(description="The header's value, base64")


class DeadLetterOrigin(BaseModel):
    topic: str
    partition: int
    offset: int
    key: str | None = Field(default=None, description="The record's key as UTF-8 (with replacement), for people")
    key_base64: str | None = Field(default=None, description="The record's key exactly, base64")
    timestamp_ms: int | None = None
    headers: list[RecordHeader] = Field(default_factory=list)


class DeadLetter(BaseModel):
    """A message that could not become a job: the reason, where it came from, and its bytes.

    The payload is kept exactly (base64). One too large for a letter is represented by its head,
    its size and its sha256, so a letter always fits the broker's message size limit."""

    model_config = ConfigDict(title="DeadLetter")

    error: ErrorInfo
    origin: DeadLetterOrigin
    payload_base64: str = Field(description="The original value, base64: all of it, or its head when truncated")
    payload_size: int = Field(description="Bytes in the original value")
    payload_sha256: str = Field(description="sha256 of the original value (hex)")
    payload_truncated: bool = Field(default=False, description="payload_base64 holds only the value's head")
    details: list[dict[str, Any]] = Field(default_factory=list, description="Validation errors (the first few)")
    timestamp: datetime = Field(default_factory=utc_now)
