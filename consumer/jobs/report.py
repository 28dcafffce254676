"""The Excel report: a Summary sheet and a Findings sheet with readable headers and units."""

from __future__ import annotations

import io

from openpyxl import Workbook
from openpyxl.styles import Font

from schemas.results import AnalysisResult

FINDING_COLUMNS: list[tuple[str, str]] = [
    ("ID", "id"),
    ("Type", "type"),
    ("Volume (mm³)", "volume"),
    ("Diameter (mm)", "diameter_mm"),
    ("Confidence (0-1)", "confidence"),
    ("Max probability (0-1)", "max_probability"),
    ("Mean intensity (HU)", "mean_intensity"),
    ("Voxels", "voxel_count"),
    ("Centre x (voxel)", "location.x"),
    ("Centre y (voxel)", "location.y"),
    ("Centre z (voxel)", "location.z"),
    ("Centre x (mm, RAS)", "location_mm.x"),
    ("Centre y (mm, RAS)", "location_mm.y"),
    ("Centre z (mm, RAS)", "location_mm.z"),
    ("Box min x", "bounding_box.min_x"),
    ("Box max x", "bounding_box.max_x"),
    ("Box min y", "bounding_box.min_y"),
    ("Box max y", "bounding_box.max_y"),
    ("Box min z", "bounding_box.min_z"),
    ("Box max z", "bounding_box.max_z"),
]


def _field(obj: object, path: str) -> object:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def summary_rows(result: AnalysisResult) -> list[tuple[str, object]]:
    s = result.summary
    seg = result.segmentation
    series = result.input.series
    dicom: list[tuple[str, object]] = []
    if series is not None:
        dicom = [
            ("Series analysed", series.chosen.series_instance_uid),
            ("Series description", series.chosen.description or ""),
            ("Series choice", series.reason),
            ("Other series in the input", len(series.others)),
            ("Slice step (mm)", series.slice_step_mm),
            ("Gantry tilt (degrees)", series.gantry_tilt_deg),
        ]
    if seg.dicom_seg:
        dicom.append(("DICOM SEG object", seg.dicom_seg))
    dicom.extend(("Reader warning", warning) for warning in result.input.warnings)
    return [
        ("Job", result.job_uuid),
        ("Input object", result.input.object),
        ("Input format", result.input.format),
        ("Profile", result.profile.value),
        ("Decision threshold (0-1)", result.threshold),
        ("Model", f"{result.model.name} {result.model.version}"),
        ("Device", f"{result.model.device} ({result.model.precision})"),
        ("Lesions (count)", s.lesions_count),
        ("Total lesion volume (mm³)", s.total_volume),
        ("Confidence (0-1)", s.confidence),
        ("Processing time (s)", s.processing_time),
        ("Image dimensions (voxels)", " x ".join(str(d) for d in seg.dimensions)),
        ("Voxel spacing (mm)", " x ".join(f"{v:.3f}" for v in seg.spacing)),
        ("Orientation", seg.orientation),
        ("Mask object", seg.file_path),
        *dicom,
        ("Created (UTC)", result.created_at),
    ]


def build_report(result: AnalysisResult) -> bytes:
    """Blocking: the XLSX file as bytes."""
    book = Workbook()
    summary = book.active
    summary.title = "Summary"
    summary.append(["Field", "Value"])
    for row in summary_rows(result):
        summary.append(list(row))
    for metric in result.metrics:
        summary.append([f"{metric.description} ({metric.name})", metric.value])
    findings = book.create_sheet("Findings")
    findings.append([header for header, _ in FINDING_COLUMNS])
    for finding in result.findings:
        findings.append([_field(finding, path) for _, path in FINDING_COLUMNS])
    for sheet in (summary, findings):
        for cell in sheet[1]:
            cell.font = Font(bold=True)
        sheet.freeze_panes = "A2"
        for column in sheet.columns:
            width = max(len(str(c.value)) if c.value is not None else 0 for c in column)
            sheet.column_dimensions[column[0].column_letter].width = min(max(10, width + 2), 60)
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()
