"""Bodies of the HTTP API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from schemas.errors import ErrorCode


class InferResponse(BaseModel):
    model_config = ConfigDict(title="InferResponse")

    job_uuid: str
    output_object: str
    file_size: int
    duration_seconds: float
    status: str
    results_object: str | None = None
    report_object: str | None = None
    seg_object: str | None = Field(default=None, description="DICOM input: key of the DICOM SEG object")


class ErrorBody(BaseModel):
    code: ErrorCode
    message: str


class ErrorResponse(BaseModel):
    model_config = ConfigDict(title="ErrorResponse")

    error: ErrorBody


class HealthResponse(BaseModel):
    model_config = ConfigDict(title="HealthResponse")

    status: str
    model_loaded: bool
    version: str
    uptime: float
    memory_usage: dict[str, float]
    model_name: str
    model_version: str | None
    device: str | None
    jobs_in_flight: int
