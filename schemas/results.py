"""The result JSON written beside the mask (the seed's structure plus job and model metadata)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from schemas.jobs import Profile


class LabelVolume(BaseModel):
    """One label of the model: how much of it there is."""

    label: int
    name: str
    volume: float = Field(description="mm3")
    volume_ml: float = Field(description="millilitres (cm3)")
    count: int = Field(description="Findings (connected components) of this label")


class Summary(BaseModel):
    total_volume: float = Field(description="Total volume of all findings in mm3")
    lesions_count: int = Field(description="Findings of every label")
    confidence: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Volume-weighted mean of the findings' confidences; with no findings, 1 - the highest "
        "foreground probability anywhere in the scan; null when the model gives labels without probabilities",
    )
    processing_time: float = Field(description="Seconds from job start to results written")
    volumes: list[LabelVolume] = Field(default_factory=list, description="Per label of the model, background excluded")


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
    type: str = Field(description="The label's name (e.g. 'lesion', 'brain')")
    label: int = Field(default=1, description="The label value in the mask")
    volume: float = Field(description="mm3")
    confidence: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Mean probability of its label inside the finding; null when the model gives no probabilities",
    )
    max_probability: float | None = Field(default=None, ge=0.0, le=1.0)
    uncertainty: float | None = Field(
        default=None, ge=0.0, description="research: mean variance across test-time flips inside the finding"
    )
    voxel_count: int
    location: Point = Field(description="Centroid in voxel indices of the input array (i, j, k)")
    location_mm: Point = Field(description="Centroid in scanner (RAS) millimetres, through the input's affine")
    bounding_box: BoundingBox = Field(description="Inclusive voxel index bounds in the input array")
    diameter_mm: float = Field(description="Diameter of the sphere of the same volume")
    mean_intensity: float = Field(description="Mean input intensity inside the finding (HU for CT)")


class Metric(BaseModel):
    name: str
    value: float | None = Field(description="null when undefined (e.g. a surface distance to an empty mask)")
    description: str


class Segmentation(BaseModel):
    file_path: str
    format: str = "nifti"
    dimensions: list[int]
    spacing: list[float]
    affine: list[list[float]]
    orientation: str = Field(description="Axis codes of the input array, e.g. 'LPS'")
    threshold: float
    labels: dict[str, str] = Field(
        default_factory=dict, description="Label value -> name of every value the mask may hold"
    )
    dtype: str = Field(default="uint8", description="uint8, or uint16 when the model has more than 255 labels")
    dicom_seg: str | None = Field(default=None, description="DICOM input: key of the DICOM SEG object")


class ModelInfo(BaseModel):
    name: str
    version: str
    device: str
    precision: str
    runtime: str = Field(default="torch", description="torch, openvino or onnxruntime")
    weights_sha256: str | None = None
    task: str | None = None


class SeriesSummary(BaseModel):
    series_instance_uid: str
    modality: str | None = None
    description: str | None = None
    series_number: int | None = None
    image_type: str | None = Field(default=None, description="ImageType values joined by backslashes")
    plane: str | None = Field(default=None, description="axial, coronal, sagittal or oblique")
    instances: int
    frames: int
    eligible: bool = Field(description="Whether the series is a grayscale CT/MR image series we can analyse")
    note: str | None = Field(default=None, description="Why a series is not eligible")


class SeriesSelection(BaseModel):
    """DICOM input: the series analysed, why it was chosen, and every series that was present."""

    chosen: SeriesSummary
    study_instance_uid: str | None = None
    frame_of_reference_uid: str | None = None
    reason: str
    others: list[SeriesSummary]
    slices: int = Field(description="Slices in the analysed volume, after duplicates were dropped")
    slice_step_mm: float = Field(description="Step between slices along the slice normal (from positions)")
    gantry_tilt_deg: float = Field(description="Angle between the stacking direction and the slice normal")


class InputInfo(BaseModel):
    object: str
    format: str
    size_bytes: int
    series: SeriesSelection | None = Field(default=None, description="DICOM input only")
    warnings: list[str] = Field(default_factory=list, description="What the reader corrected or chose to ignore")


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
