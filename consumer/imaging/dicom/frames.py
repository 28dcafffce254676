"""Where every frame of a series lies: its plane in patient space and its rescale.

Two kinds of object: an enhanced (multi-frame) image gives each frame its own position in
functional groups; a classic image gives one position, and a legacy multi-frame one stacks its
frames by SpacingBetweenSlices along the slice normal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from consumer.errors import InputError
from consumer.imaging.dicom.geometry import SlicePlane
from consumer.imaging.dicom.headers import DicomFile, floats, functional
from schemas.errors import ErrorCode


@dataclass(frozen=True)
class FrameRef:
    file: int  # index into the series' files
    frame: int  # frame index inside that file (0 for single-frame files)
    slope: float
    intercept: float


Frame = tuple[FrameRef, SlicePlane]


def frame_planes(index: int, file: DicomFile) -> list[Frame]:
    """Every frame of the file at `index` in the series: how to rescale it and where it lies."""
    if "PerFrameFunctionalGroupsSequence" in file.header:
        return _enhanced_frames(index, file)
    return _classic_frames(index, file)


def _priority(ds: Dataset) -> tuple[int, str]:
    """Of two frames at one position, the lower (InstanceNumber, SOPInstanceUID) is kept."""
    number = ds.get("InstanceNumber")
    return int(number) if number not in (None, "") else 0, str(ds.get("SOPInstanceUID", ""))


def _enhanced_frames(index: int, file: DicomFile) -> list[Frame]:
    ds = file.header
    rows, columns = int(ds.Rows), int(ds.Columns)
    out = []
    for frame in range(file.frames):
        position = functional(ds, frame, "PlanePositionSequence")
        orientation = functional(ds, frame, "PlaneOrientationSequence")
        measures = functional(ds, frame, "PixelMeasuresSequence")
        transform = functional(ds, frame, "PixelValueTransformationSequence")
        ipp = floats(position.get("ImagePositionPatient"), 3) if position else None
        iop = floats(orientation.get("ImageOrientationPatient"), 6) if orientation else None
        spacing = floats(measures.get("PixelSpacing"), 2) if measures else None
        if ipp is None or iop is None or spacing is None:
            raise _missing(f"frame {frame + 1}'s plane position, orientation or pixel spacing", file)
        slope, intercept = _rescale(transform or ds)
        plane = SlicePlane(ipp, iop, rows, columns, (spacing[0], spacing[1]), (*_priority(ds), frame))
        out.append((FrameRef(index, frame, slope, intercept), plane))
    return out


def _classic_frames(index: int, file: DicomFile) -> list[Frame]:
    ds = file.header
    ipp = floats(ds.get("ImagePositionPatient"), 3)
    iop = floats(ds.get("ImageOrientationPatient"), 6)
    spacing = floats(ds.get("PixelSpacing"), 2)
    if ipp is None:
        raise _missing("ImagePositionPatient", file)
    if iop is None:
        raise _missing("ImageOrientationPatient", file)
    if spacing is None:
        raise _missing("PixelSpacing", file)
    slope, intercept = _rescale(ds)
    normal = np.cross(iop[:3], iop[3:])
    step = _legacy_frame_step(file) if file.frames > 1 else 0.0
    return [
        (
            FrameRef(index, frame, slope, intercept),
            SlicePlane(
                ipp + frame * step * normal,
                iop,
                int(ds.Rows),
                int(ds.Columns),
                (spacing[0], spacing[1]),
                (*_priority(ds), frame),
            ),
        )
        for frame in range(file.frames)
    ]


def _legacy_frame_step(file: DicomFile) -> float:
    """A legacy multi-frame image: frames are stacked by SpacingBetweenSlices along the normal."""
    sbs = floats([file.header.get("SpacingBetweenSlices")], 1)
    if sbs is None or sbs[0] == 0:
        raise _missing("SpacingBetweenSlices (needed to stack a multi-frame image)", file)
    return float(sbs[0])


def _missing(what: str, file: DicomFile) -> InputError:
    return InputError(
        f"{what} is missing or invalid in {file.name}: the slice cannot be placed in patient space",
        code=ErrorCode.DICOM_MISSING_GEOMETRY,
    )


def _rescale(item: Dataset) -> tuple[float, float]:
    slope = item.get("RescaleSlope")
    intercept = item.get("RescaleIntercept")
    try:
        return (
            float(slope) if slope not in (None, "") else 1.0,
            float(intercept) if intercept not in (None, "") else 0.0,
        )
    except (TypeError, ValueError):
        return 1.0, 0.0


def single_slice_step(ds: Dataset) -> float:
    """The thickness a series of one slice gets: SpacingBetweenSlices, else SliceThickness, else 1 mm."""
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = floats([ds.get(keyword)], 1)
        if value is not None and value[0] > 0:
            return float(value[0])
    measures = functional(ds, 0, "PixelMeasuresSequence")
    if measures is not None:
        value = floats([measures.get("SliceThickness")], 1)
        if value is not None and value[0] > 0:
            return float(value[0])
    return 1.0
