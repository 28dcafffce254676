"""The job message (`ml.jobs`, key = job_uuid), which is also the `POST /infer` body."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from schemas.common import JobId, ModelName, ObjectKey, SeriesUid


class Profile(StrEnum):
    FAST_DEBUG = "fast_debug"
    PRODUCTION = "production"
    RESEARCH = "research"


class Source(StrEnum):
    KAFKA = "kafka"
    MINIO = "minio"
    HTTP = "http"


Threshold = Annotated[float, Field(gt=0.0, lt=1.0, description="Decision threshold on the lesion probability")]


class JobRequest(BaseModel):
    """What to analyse and where to put the results."""

    model_config = ConfigDict(extra="forbid", title="JobRequest")

    job_uuid: JobId
    input_object: ObjectKey
    output_object: ObjectKey | None = Field(
        default=None, description="Mask key; default results/analysis_<job_uuid>.nii.gz"
    )
    profile: Profile | None = Field(default=None, description="Default: ML_DEFAULT_PROFILE")
    threshold: Threshold | None = Field(default=None, description="Default: ML_DECISION_THRESHOLD")
    reference_object: ObjectKey | None = Field(
        default=None, description="A reference mask (NIfTI) to score the result against"
    )
    series_uid: SeriesUid | None = Field(
        default=None,
        description="DICOM input: the SeriesInstanceUID to analyse; default: chosen by the series-selection rule",
    )
    model: ModelName | None = Field(
        default=None,
        description="The model (bundle) to run; default: the route for the scan's modality (ML_MODEL_ROUTES), "
        "else the first of MODEL_NAME",
    )
    no_cache: bool = Field(
        default=False,
        description="Run the analysis even when a finished identical job's result could be reused "
        "(the result cache, ML_RESULT_CACHE)",
    )
