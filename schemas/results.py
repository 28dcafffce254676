"""The result JSON written beside the mask (the seed's structure plus job and model metadata)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from schemas.jobs import Profile


class Summary(BaseModel):
    total_volume: float = Field(description="Total lesion volume in mm3")
    lesions_count: int
    confidence: float = Field(
        ge=0.0,
        le=1.0,
        description="Volume-weighted mean lesion probability over the findings; with no findings, "
        "1 - the highest lesion probability anywhere in the scan",
    )
    processing_time: float = Field(description="Seconds from job start to results written")


class Point(BaseModel):
    x: float
    y: float
    z: float


class BoundingBox(BaseModel):
    min_x: int
    max_x: int
    min_y: int
    max_y: int
    min_z: int
    max_z: int


class Finding(BaseModel):
    id: str
    type: str = Field(description="'lesion'")
    volume: float = Field(description="mm3")
    confidence: float = Field(ge=0.0, le=1.0, description="Mean lesion probability inside the finding")
    max_probability: float = Field(ge=0.0, le=1.0)
    voxel_count: int
    location: Point = Field(description="Centroid in voxel indices of the input array (i, j, k)")
    location_mm: Point = Field(description="Centroid in scanner (RAS) millimetres, through the input's affine")
    bounding_box: BoundingBox = Field(description="Inclusive voxel index bounds in the input array")
    diameter_mm: float = Field(description="Diameter of the sphere of the same volume")
    mean_intensity: float = Field(description="Mean input intensity inside the finding (HU for CT)")


class Metric(BaseModel):
    name: str
    value: float
    description: str


class Segmentation(BaseModel):
    file_path: str
    format: str = "nifti"
    dimensions: list[int]
    spacing: list[float]
    affine: list[list[float]]
    orientation: str = Field(description="Axis codes of the input array, e.g. 'LPS'")
    threshold: float


class ModelInfo(BaseModel):
    name: str
    version: str
    device: str
    precision: str


class InputInfo(BaseModel):
    object: str
    format: str
    size_bytes: int


class AnalysisResult(BaseModel):
    model_config = ConfigDict(title="AnalysisResult")

    job_uuid: str
    status: str = "completed"
    profile: Profile
    threshold: float
    input: InputInfo
    model: ModelInfo
    summary: Summary
    findings: list[Finding]
    metrics: list[Metric]
    segmentation: Segmentation
    outputs: dict[str, str] = Field(description="Keys of every object written for this job")
    timings: dict[str, float] = Field(description="Seconds spent in each step")
    created_at: str
