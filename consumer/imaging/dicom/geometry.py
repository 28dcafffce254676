"""From DICOM slice planes to one regular 3-D grid with a RAS affine.

Pure geometry, no file access. The rules (README "DICOM input"):
- slices are ordered by ImagePositionPatient projected on the slice normal (the cross product of
  the two ImageOrientationPatient vectors), never by file name or InstanceNumber;
- the slice step comes from those positions (the median), never from SliceThickness;
- a gap above `GAP_FACTOR` x the median step means missing slices: refused, naming the gap;
- slices at the same position are duplicates: the one with the lowest InstanceNumber (then the
  lowest SOPInstanceUID) is kept, and the result carries a warning; when every position holds
  the same number of images, the series is several volumes (echoes, phases) and is refused;
- a stack whose positions drift in-plane (gantry tilt, or a sheared reconstruction) is
  resampled onto the regular grid along the slice normal, as dcm2niix does: each slice is
  shifted in-plane by its own offset, so the mask lies where the anatomy is;
- slices of different size, orientation or pixel spacing in one series are refused.

Array layout: volume[i, j, k] is column i, row j of slice k, so the affine's first column is
the row direction (IOP[:3]) times the column spacing (PixelSpacing[1]).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from consumer.errors import InputError
from schemas.errors import ErrorCode

GAP_FACTOR = 1.5
# Below these, differences are rounding in the writer, not geometry.
_ORIENTATION_TOL = 1e-3
_SPACING_TOL = 1e-3
_DUPLICATE_TOL_MM = 1e-2
_TILT_MIN_DEG = 0.01
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class SlicePlane:
    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient, 6 values
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]  # (between rows, between columns) as DICOM lists them
    priority: tuple[int, str, int] = (0, "", 0)  # (InstanceNumber, SOPInstanceUID, frame): the lower is kept


@dataclass(frozen=True)
class StackGeometry:
    order: list[int]  # indices of the kept planes, in stack order
    shape: tuple[int, int, int]  # (columns, rows, slices)
    affine: np.ndarray  # RAS affine of the regular grid
    step_mm: float
    tilt_deg: float
    # Per kept slice, the in-plane offset (columns, rows) in pixels of its position from the
    # regular grid; None when the stack is regular already.
    shifts: np.ndarray | None
    # For every input plane, the slice of the grid it lies on (a dropped duplicate: its twin's).
    slice_of_plane: list[int] = field(default_factory=list)
    dropped_duplicates: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm < 1e-6:
        raise InputError("ImageOrientationPatient has a zero-length vector", code=ErrorCode.DICOM_MISSING_GEOMETRY)
    return v / norm


def _check_consistent(planes: list[SlicePlane]) -> None:
    first = planes[0]
    for index, plane in enumerate(planes[1:], start=1):
        if (plane.rows, plane.columns) != (first.rows, first.columns):
            raise InputError(
                f"slices differ in size within the series: {first.rows}x{first.columns} and "
                f"{plane.rows}x{plane.columns} (slice {index})",
                code=ErrorCode.DICOM_INCONSISTENT_SERIES,
            )
        if not np.allclose(plane.orientation, first.orientation, atol=_ORIENTATION_TOL):
            raise InputError(
                "slices differ in orientation (ImageOrientationPatient) within the series",
                code=ErrorCode.DICOM_INCONSISTENT_SERIES,
            )
        if not np.allclose(plane.pixel_spacing, first.pixel_spacing, atol=_SPACING_TOL):
            raise InputError(
                f"slices differ in pixel spacing within the series: {first.pixel_spacing} and {plane.pixel_spacing}",
                code=ErrorCode.DICOM_INCONSISTENT_SERIES,
            )


def stack_geometry(planes: list[SlicePlane], single_slice_step: float = 1.0) -> StackGeometry:
    """The regular grid of a series. `single_slice_step` is the thickness a lone slice gets."""
    if not planes:
        raise InputError("the series has no image slices", code=ErrorCode.NO_IMAGE_SERIES)
    _check_consistent(planes)
    axes = _Axes.of(planes[0])
    positions = np.array([p.position for p in planes], dtype=np.float64)
    if not np.all(np.isfinite(positions)):
        raise InputError("ImagePositionPatient is not finite", code=ErrorCode.DICOM_MISSING_GEOMETRY)
    depth = positions @ axes.normal
    stack = _deduplicate(planes, depth)
    depths = depth[stack.kept]
    step, spacing_warning = _slice_step(depths, single_slice_step)
    shifts, tilt_deg = _tilt(positions[stack.kept], depths, axes)
    warnings = [
        warning
        for warning in (stack.warning, spacing_warning, _tilt_warning(tilt_deg) if shifts is not None else None)
        if warning
    ]
    first = planes[0]
    return StackGeometry(
        order=stack.kept,
        shape=(first.columns, first.rows, len(stack.kept)),
        affine=axes.affine(step, positions[stack.kept[0]]),
        step_mm=step,
        tilt_deg=tilt_deg if shifts is not None else 0.0,
        shifts=shifts,
        slice_of_plane=stack.slice_of_plane,
        dropped_duplicates=stack.dropped,
        warnings=warnings,
    )


@dataclass(frozen=True)
class _Axes:
    """The series' in-plane directions (unit vectors, LPS), their normal, and the pixel spacing."""

    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray
    row_spacing: float  # between rows (along col_dir)
    col_spacing: float  # between columns (along row_dir)

    @classmethod
    def of(cls, plane: SlicePlane) -> _Axes:
        row_dir = _unit(np.asarray(plane.orientation[:3], dtype=np.float64))
        col_dir = _unit(np.asarray(plane.orientation[3:], dtype=np.float64))
        if abs(float(row_dir @ col_dir)) > 1e-2:
            raise InputError(
                "ImageOrientationPatient row and column vectors are not orthogonal",
                code=ErrorCode.DICOM_MISSING_GEOMETRY,
            )
        row_spacing, col_spacing = (float(v) for v in plane.pixel_spacing)
        if not (row_spacing > 0 and col_spacing > 0):
            raise InputError(
                f"PixelSpacing {plane.pixel_spacing} is not positive", code=ErrorCode.DICOM_MISSING_GEOMETRY
            )
        return cls(row_dir, col_dir, np.cross(row_dir, col_dir), row_spacing, col_spacing)

    def affine(self, step: float, origin: np.ndarray) -> np.ndarray:
        """RAS affine of the grid: voxel (i, j, k) is column i, row j of slice k."""
        lps = np.eye(4)
        lps[:3, 0] = self.row_dir * self.col_spacing
        lps[:3, 1] = self.col_dir * self.row_spacing
        lps[:3, 2] = self.normal * step
        lps[:3, 3] = origin
        return _LPS_TO_RAS @ lps


@dataclass(frozen=True)
class _Deduplicated:
    kept: list[int]  # plane indices, in stack order
    dropped: list[int]
    slice_of_plane: list[int]
    warning: str | None


def _deduplicate(planes: list[SlicePlane], depth: np.ndarray) -> _Deduplicated:
    """One plane per position (the lowest keep-priority); several volumes in one series are refused."""
    # Sort by depth, then by the keep-priority so the first of each duplicate group is kept.
    order = sorted(range(len(planes)), key=lambda i: (round(float(depth[i]) / _DUPLICATE_TOL_MM), planes[i].priority))
    kept: list[int] = []
    dropped: list[int] = []
    slice_of_plane = [0] * len(planes)
    for index in order:
        if kept and abs(depth[index] - depth[kept[-1]]) < _DUPLICATE_TOL_MM:
            dropped.append(index)
        else:
            kept.append(index)
        slice_of_plane[index] = len(kept) - 1
    if not dropped:
        return _Deduplicated(kept, dropped, slice_of_plane, None)
    per_position = np.bincount(slice_of_plane)
    if len(kept) > 1 and per_position.min() == per_position.max():
        # Every position holds the same number of images: several volumes (echoes, phases,
        # time points) in one series, not stray duplicates. Picking one per position would mix them.
        raise InputError(
            f"the series holds {per_position[0]} images at each of its {len(kept)} positions (a multi-echo, "
            "dynamic or cardiac series): one 3-D volume is needed; export one volume as its own series",
            code=ErrorCode.INVALID_IMAGE_DIMENSIONS,
        )
    warning = (
        f"{len(dropped)} slice(s) duplicate the position of another; at each position the instance with the "
        "lowest InstanceNumber (then SOPInstanceUID) was kept"
    )
    return _Deduplicated(kept, dropped, slice_of_plane, warning)


def _slice_step(depths: np.ndarray, single_slice_step: float) -> tuple[float, str | None]:
    """The median step between slice positions; a gap (missing slices) is refused, uneven steps noted."""
    if len(depths) == 1:
        return (float(single_slice_step) if single_slice_step > 0 else 1.0), None
    steps = np.diff(depths)
    step = float(np.median(steps))
    gaps = np.flatnonzero(steps > GAP_FACTOR * step)
    if gaps.size:
        at = int(gaps[0])
        missing = round(float(steps[at]) / step) - 1
        raise InputError(
            f"{gaps.size} gap(s) in the slice positions: the first between slices {at} and {at + 1} "
            f"(at {depths[at]:.2f} and {depths[at + 1]:.2f} mm along the slice normal): {steps[at]:.2f} mm "
            f"against a median step of {step:.2f} mm, about {missing} slice(s) missing",
            code=ErrorCode.DICOM_MISSING_SLICES,
        )
    if float(np.max(np.abs(steps - step))) > 0.05 * step:
        return (
            step,
            f"slice spacing varies from {steps.min():.3f} to {steps.max():.3f} mm; the median {step:.3f} mm is used",
        )
    return step, None


def _tilt(positions: np.ndarray, depths: np.ndarray, axes: _Axes) -> tuple[np.ndarray | None, float]:
    """Per slice, its in-plane offset (columns, rows) in pixels from a stack along the normal, or
    None when there is none worth resampling; and the angle of the stack to its normal."""
    offsets = positions - positions[0] - np.outer(depths - depths[0], axes.normal)
    shift_cols = offsets @ axes.row_dir / axes.col_spacing
    shift_rows = offsets @ axes.col_dir / axes.row_spacing
    drift_mm = float(np.max(np.linalg.norm(offsets, axis=1)))
    extent = float(depths[-1] - depths[0])
    tilt_deg = float(np.degrees(np.arctan2(drift_mm, extent))) if extent > 0 else 0.0
    if tilt_deg > _TILT_MIN_DEG and max(np.abs(shift_cols).max(), np.abs(shift_rows).max()) > 0.01:
        return np.stack([shift_cols, shift_rows], axis=1), tilt_deg
    return None, tilt_deg


def _tilt_warning(tilt_deg: float) -> str:
    return (
        f"the slices are stacked at {tilt_deg:.2f} degrees to their normal (gantry tilt); the volume was "
        "resampled onto a grid along the slice normal"
    )


def plane_of(orientation: np.ndarray) -> str:
    """axial, coronal, sagittal or oblique: the patient axis the slice normal follows."""
    row_dir = np.asarray(orientation[:3], dtype=np.float64)
    col_dir = np.asarray(orientation[3:], dtype=np.float64)
    normal = np.cross(row_dir, col_dir)
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        return "oblique"
    normal = np.abs(normal / norm)
    axis = int(np.argmax(normal))
    if normal[axis] < 0.8:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]
