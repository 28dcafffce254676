"""Bodies of the HTTP API."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

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


class CheckStatus(StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    FAILING = "failing"


class HealthCheck(BaseModel):
    status: CheckStatus
    detail: str


class ProfileNetwork(BaseModel):
    """A profile's own network: its weights and what runs them."""

    weights_sha256: str
    runtime: str
    precision: str


class ModelStatus(BaseModel):
    """A hosted model: /health lists every one."""

    name: str
    version: str
    task: str
    labels: dict[str, str]
    weights_sha256: str
    loaded: bool
    default: bool
    runtime: str
    precision: str
    profile_networks: dict[str, ProfileNetwork] = Field(
        default_factory=dict, description="profiles that run a network of their own (fast_debug trained for its grid)"
    )


class HealthResponse(BaseModel):
    model_config = ConfigDict(title="HealthResponse")

    status: Literal["healthy", "degraded", "unhealthy"] = Field(
        description="unhealthy: cannot run jobs (model not loaded, shutting down); degraded: a dependency is "
        "down, jobs wait for it (storage, disk space), a partition makes no progress, or the consumer has no "
        "partitions; healthy otherwise"
    )
    checks: dict[str, HealthCheck] = Field(description="One per dependency: kafka, storage, model, device, disk")
    model_loaded: bool
    version: str
    uptime: float
    memory_usage: dict[str, float]
    model_name: str
    model_version: str | None
    device: str | None
    jobs_in_flight: int
    models: list[ModelStatus] = Field(default_factory=list, description="Every hosted model; the first is the default")


class ProbeResponse(BaseModel):
    """/health/live and /health/ready: for orchestrators."""

    model_config = ConfigDict(title="ProbeResponse")

    status: Literal["alive", "ready", "not_ready"]
    reasons: list[str] = Field(default_factory=list, description="not_ready: what is missing")
