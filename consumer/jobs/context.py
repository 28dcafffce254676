"""What one job carries from step to step, and what it ends with."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from consumer.errors import JobError
from consumer.jobs.outputs import OutputKeys
from schemas.events import JobStatus
from schemas.jobs import JobRequest, Profile, Source
from schemas.results import AnalysisResult, ModelInfo


@dataclass
class JobContext:
    request: JobRequest
    source: Source
    profile: Profile
    threshold: float
    keys: OutputKeys
    model: ModelInfo
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per finished step

    @property
    def job_uuid(self) -> str:
        return self.request.job_uuid

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@dataclass(frozen=True)
class Written:
    """What the write step left in the bucket."""

    result: AnalysisResult
    mask_bytes: int
    seg_key: str | None = None
    cached: bool = False  # a finished identical job's outputs, reused (consumer.jobs.cache)


@dataclass(frozen=True)
class JobOutcome:
    job_uuid: str
    status: JobStatus
    keys: OutputKeys
    duration_seconds: float
    file_size: int | None = None
    result: AnalysisResult | None = None
    error: JobError | None = None
