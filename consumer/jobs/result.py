"""The result JSON of a job, built from what its steps found: a pure function of its inputs."""

from __future__ import annotations

import dataclasses
from datetime import datetime

from consumer.imaging.analysis import Analysis
from consumer.imaging.scans import Scan
from consumer.jobs.context import JobContext
from models.registry import ModelCard
from schemas.results import AnalysisResult, InputInfo, Metric, ModelInfo, Segmentation, Summary


def model_info(card: ModelCard, setup: str) -> ModelInfo:
    """The model as this setup (a profile, or its setup for small patients) runs it: one with a
    network of its own (fast_debug trained for its grid) names those weights and their runtime."""
    return ModelInfo(
        name=card.name,
        version=card.version,
        device=card.device,
        task=card.task or None,
        **dataclasses.asdict(card.ran_by(setup)),
    )


def unknown_model(name: str) -> ModelInfo:
    """What a job that names a model this service does not host reports about it."""
    return ModelInfo(name=name, version="unknown", device="", precision="")


def build_result(
    ctx: JobContext,
    scan: Scan,
    input_size: int,
    analysis: Analysis,
    metrics: list[Metric],
    *,
    warnings: list[str],
    with_seg: bool,
    with_uncertainty: bool,
    labels: dict[int, str],
    processing_time: float,
    created_at: datetime,
) -> AnalysisResult:
    """`with_seg`/`with_uncertainty`: those outputs are written too; `warnings`: the reader's and the writer's."""
    keys = ctx.keys
    outputs = {"mask": keys.mask, "results": keys.results, "report": keys.report, "preview": keys.preview}
    if with_seg:
        outputs["dicom_seg"] = keys.seg
    if with_uncertainty:
        outputs["uncertainty"] = keys.uncertainty
    return AnalysisResult(
        job_uuid=ctx.job_uuid,
        profile=ctx.profile,
        threshold=ctx.threshold,
        input=InputInfo(
            object=ctx.request.input_object,
            format=scan.format.value,
            size_bytes=input_size,
            series=scan.dicom.selection if scan.dicom else None,
            warnings=warnings,
        ),
        model=ctx.model,
        summary=Summary(
            total_volume=analysis.total_volume_mm3,
            lesions_count=len(analysis.findings),
            confidence=analysis.confidence,
            processing_time=round(processing_time, 3),
            volumes=analysis.volumes,
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
            dicom_seg=keys.seg if with_seg else None,
            labels={str(value): name for value, name in sorted(labels.items())},
            dtype="uint16" if max(labels, default=0) > 255 else "uint8",
        ),
        outputs=outputs,
        timings=dict(ctx.timings),
        created_at=created_at.isoformat(),
    )
