"""DICOM files -> series -> one chosen series -> a float32 volume in patient space.

The steps live beside this module: `headers` (reading), `selection` (which series), `frames`
(where each frame lies), `geometry` (the regular grid), `pixels` (decoding into the grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from consumer.errors import InputError
from consumer.imaging.dicom.frames import frame_planes, single_slice_step
from consumer.imaging.dicom.geometry import StackGeometry, stack_geometry
from consumer.imaging.dicom.headers import DicomFile, read_headers
from consumer.imaging.dicom.pixels import decode_stack
from consumer.imaging.dicom.selection import Series, choose_series, group_series
from consumer.imaging.limits import check_voxels
from schemas.errors import ErrorCode
from schemas.results import SeriesSelection


@dataclass(frozen=True)
class DicomSource:
    """What the SEG writer and the result JSON need to know about the series that was read."""

    selection: SeriesSelection
    files: list[DicomFile]
    geometry: StackGeometry  # its planes: every frame of `files`, in file order
    warnings: list[str]


@dataclass(frozen=True)
class DicomVolume:
    data: np.ndarray  # float32 (columns, rows, slices)
    affine: np.ndarray
    source: DicomSource


def read_series(
    paths: list[Path], series_uid: str | None, max_voxels: int, workers: int, warnings: tuple[str, ...] = ()
) -> DicomVolume:
    """Blocking: the chosen series among the DICOM files at `paths`."""
    files = read_headers(paths, workers)
    if not files:
        raise InputError(
            f"none of the {len(paths)} file(s) in the input is a DICOM object", code=ErrorCode.NO_IMAGE_SERIES
        )
    series = group_series(files)
    chosen, reason = choose_series(series, series_uid)
    skipped = len(paths) - len(files)
    if skipped and len(paths) > 1:
        warnings = (*warnings, f"{skipped} file(s) that are not DICOM (or are a DICOMDIR) were ignored")
    others = [s for s in series if s is not chosen]
    return build_volume(chosen, reason, others, max_voxels, workers, warnings)


def build_volume(
    series: Series,
    reason: str,
    others: list[Series],
    max_voxels: int,
    workers: int,
    input_warnings: tuple[str, ...] = (),
) -> DicomVolume:
    """Blocking: decode the series into a regular float32 volume with its RAS affine.
    `input_warnings`: what was noticed before the series (the archive, skipped files)."""
    placed = [frame for index, file in enumerate(series.files) for frame in frame_planes(index, file)]
    geometry = stack_geometry([plane for _, plane in placed], single_slice_step(series.first))
    check_voxels(geometry.shape, max_voxels, "series")
    stack = decode_stack(series.files, [ref for ref, _ in placed], geometry, workers)
    source = DicomSource(
        _selection(series, reason, others, geometry), series.files, geometry, [*input_warnings, *geometry.warnings]
    )
    # (slices, rows, columns) -> (columns, rows, slices): a view, Fortran-ordered like NIfTI.
    return DicomVolume(stack.transpose(2, 1, 0), geometry.affine, source)


def _selection(series: Series, reason: str, others: list[Series], geometry: StackGeometry) -> SeriesSelection:
    ds = series.first
    return SeriesSelection(
        chosen=series.summary(),
        study_instance_uid=str(ds.get("StudyInstanceUID")) if ds.get("StudyInstanceUID") else None,
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID")) if ds.get("FrameOfReferenceUID") else None,
        reason=reason,
        others=[s.summary() for s in others],
        slices=geometry.shape[2],
        slice_step_mm=round(geometry.step_mm, 6),
        gantry_tilt_deg=round(geometry.tilt_deg, 4),
    )
