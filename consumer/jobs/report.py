"""The Excel report: Summary, Labels (volume per label), Findings and Preview sheets.

Text that comes from a message or an input (object keys, DICOM descriptions, warnings, label
names) is written as text, never as a formula: a leading =, +, -, @, tab or carriage return is
neutralised with a quote, as OWASP advises against spreadsheet injection. The JSON keeps the
exact values.
"""

from __future__ import annotations

import io

from openpyxl import Workbook
from openpyxl.drawing.image import Image as SheetImage
from openpyxl.styles import Font
from openpyxl.worksheet.worksheet import Worksheet

from schemas.results import AnalysisResult

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
FINDING_COLUMNS: list[tuple[str, str]] = [
    ("ID", "id"),
    ("Type", "type"),
    ("Label", "label"),
    ("Volume (mm³)", "volume"),
    ("Diameter (mm)", "diameter_mm"),
    ("Confidence (0-1)", "confidence"),
    ("Max probability (0-1)", "max_probability"),
    ("Uncertainty (variance)", "uncertainty"),
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
        ("Model task", result.model.task or ""),
        ("Model weights (sha256)", result.model.weights_sha256 or ""),
        ("Device", f"{result.model.device} ({result.model.runtime}, {result.model.precision})"),
        ("Findings (count)", s.lesions_count),
        ("Total volume of findings (mm³)", s.total_volume),
        ("Confidence (0-1)", s.confidence),
        ("Processing time (s)", s.processing_time),
        ("Image dimensions (voxels)", " x ".join(str(d) for d in seg.dimensions)),
        ("Voxel spacing (mm)", " x ".join(f"{v:.3f}" for v in seg.spacing)),
        ("Orientation", seg.orientation),
        ("Mask object", seg.file_path),
        *dicom,
        ("Created (UTC)", result.created_at),
    ]


def as_text(value: object) -> object:
    """A string that a spreadsheet would read as a formula gets a leading quote; others pass."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def _append(sheet: Worksheet, row: list[object]) -> None:
    sheet.append([as_text(value) for value in row])


def build_report(result: AnalysisResult, preview: bytes | None = None) -> bytes:
    """Blocking: the XLSX file as bytes."""
    book = Workbook()
    summary = book.active
    summary.title = "Summary"
    _append(summary, ["Field", "Value"])
    for row in summary_rows(result):
        _append(summary, list(row))
    for metric in result.metrics:
        _append(summary, [f"{metric.description} ({metric.name})", metric.value])
    labels = book.create_sheet("Labels")
    _append(labels, ["Label", "Name", "Findings", "Volume (mm³)", "Volume (ml)"])
    for volume in result.summary.volumes:
        _append(labels, [volume.label, volume.name, volume.count, volume.volume, volume.volume_ml])
    findings = book.create_sheet("Findings")
    _append(findings, [header for header, _ in FINDING_COLUMNS])
    for finding in result.findings:
        _append(findings, [_field(finding, path) for _, path in FINDING_COLUMNS])
    for sheet in (summary, labels, findings):
        _style(sheet)
    if preview:
        sheet = book.create_sheet("Preview")
        sheet.add_image(SheetImage(io.BytesIO(preview)), "A1")
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


def _style(sheet: Worksheet) -> None:
    for cell in sheet[1]:
        cell.font = Font(bold=True)
    sheet.freeze_panes = "A2"
    for column in sheet.columns:
        width = max(len(str(c.value)) if c.value is not None else 0 for c in column)
        sheet.column_dimensions[column[0].column_letter].width = min(max(10, width + 2), 60)
