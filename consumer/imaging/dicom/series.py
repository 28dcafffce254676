"""DICOM files -> series -> one chosen series -> a float32 volume in patient space.

Series selection rule (README "DICOM input"), unless the job names `series_uid`:
1. only grayscale CT or MR image series with pixel data are eligible;
2. ORIGINAL before DERIVED (ImageType's first value);
3. axial before coronal, sagittal and oblique;
4. more slices first;
5. then the lowest SeriesNumber, then the lowest SeriesInstanceUID (so the choice is stable).

Pixel data is decoded through pydicom's handlers (pylibjpeg, gdcm and pyjpegls as installed
plugins), in parallel threads, straight into one preallocated array; the modality LUT
(RescaleSlope/Intercept, HU for CT) is applied per frame.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from scipy import ndimage

from consumer.errors import InputError
from consumer.imaging.dicom.geometry import SlicePlane, StackGeometry, plane_of, stack_geometry
from schemas.errors import ErrorCode
from schemas.results import SeriesSelection, SeriesSummary

log = logging.getLogger(__name__)

MODALITIES = ("CT", "MR")
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
# pydicom reads a file without the 128-byte preamble only with force=True; do that only when
# the file starts like a dataset (group 0x0002 or 0x0008, either byte order), not for any junk.
BARE_DATASET_STARTS = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")


@dataclass(frozen=True)
class DicomFile:
    path: Path
    header: Dataset  # without pixel data

    @property
    def frames(self) -> int:
        try:
            return max(1, int(self.header.get("NumberOfFrames") or 1))
        except (TypeError, ValueError):
            return 1


@dataclass(frozen=True)
class FrameRef:
    file: int  # index into the series' files
    frame: int  # frame index inside that file (0 for single-frame files)
    slope: float
    intercept: float


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


def read_header(path: Path) -> Dataset:
    """The file's header without pixel data. Raises what pydicom raises when it is not DICOM."""
    with open(path, "rb") as f:
        bare = f.read(2) in BARE_DATASET_STARTS
    header = pydicom.dcmread(path, stop_before_pixels=True, force=bare)
    if bare and "SOPClassUID" not in header and "Modality" not in header:
        raise InvalidDicomError("forced read found no SOPClassUID or Modality")
    return header


def _header_or_none(path: Path) -> Dataset | None:
    try:
        return read_header(path)
    except Exception as error:  # pydicom raises many kinds for a damaged or foreign file
        log.debug("%s is not a readable DICOM file: %s", path.name, error)
        return None


def read_headers(paths: Iterable[Path], workers: int) -> list[DicomFile]:
    """Headers of the DICOM files among `paths` (others and DICOMDIR skipped), in input order."""
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        headers = list(pool.map(_header_or_none, paths))
    files = []
    for path, header in zip(paths, headers, strict=True):
        if header is None:
            continue
        meta = getattr(header, "file_meta", None)
        sop_class = str(header.get("SOPClassUID", "") or getattr(meta, "MediaStorageSOPClassUID", ""))
        if sop_class == _DICOMDIR_CLASS or "DirectoryRecordSequence" in header:
            continue
        files.append(DicomFile(path, header))
    return files


def read_single_header(path: Path) -> DicomFile:
    try:
        header = read_header(path)
    except Exception as error:
        raise InputError(f"not a readable DICOM file: {error}", code=ErrorCode.INVALID_DICOM) from error
    return DicomFile(path, header)


# --- series and their eligibility -------------------------------------------------------------


@dataclass
class Series:
    uid: str
    files: list[DicomFile]

    @property
    def first(self) -> Dataset:
        return self.files[0].header

    @property
    def frames(self) -> int:
        return sum(f.frames for f in self.files)

    def refusal(self) -> tuple[ErrorCode, str] | None:
        """Why this series cannot be analysed, or None."""
        ds = self.first
        modality = str(ds.get("Modality", "") or "")
        if "Rows" not in ds or "Columns" not in ds or "BitsAllocated" not in ds:
            what = getattr(ds.get("SOPClassUID"), "name", None) or "this object"
            return ErrorCode.DICOM_NO_PIXEL_DATA, f"{what} ({modality or 'no modality'}) holds no image pixel data"
        if modality == "SEG" or "SegmentSequence" in ds:
            return ErrorCode.DICOM_UNSUPPORTED_MODALITY, "a segmentation (SEG), not an image to analyse"
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", "") or "")
        if samples != 1 or photometric not in _GRAYSCALE:
            return (
                ErrorCode.DICOM_COLOR_NOT_SUPPORTED,
                f"a colour image ({photometric or '?'}, {samples} samples per pixel); CT/MR are grayscale",
            )
        if modality not in MODALITIES:
            return (
                ErrorCode.DICOM_UNSUPPORTED_MODALITY,
                f"modality {modality or 'unknown'}; the model reads {' and '.join(MODALITIES)}",
            )
        return None

    def plane(self) -> str | None:
        iop = _orientation(self.first)
        return plane_of(iop) if iop is not None else None

    def summary(self) -> SeriesSummary:
        ds = self.first
        refusal = self.refusal()
        image_type = ds.get("ImageType")
        number = ds.get("SeriesNumber")
        return SeriesSummary(
            series_instance_uid=self.uid,
            modality=str(ds.get("Modality")) if ds.get("Modality") else None,
            description=str(ds.get("SeriesDescription")) if ds.get("SeriesDescription") else None,
            series_number=int(number) if number not in (None, "") else None,
            image_type="\\".join(str(v) for v in image_type) if image_type else None,
            plane=self.plane(),
            instances=len(self.files),
            frames=self.frames,
            eligible=refusal is None,
            note=refusal[1] if refusal else None,
        )

    def rank(self) -> tuple[Any, ...]:
        ds = self.first
        image_type = ds.get("ImageType") or []
        original = bool(image_type) and str(image_type[0]).upper() == "ORIGINAL"
        number = ds.get("SeriesNumber")
        return (not original, self.plane() != "axial", -self.frames, int(number) if number else 1 << 30, self.uid)


def group_series(files: list[DicomFile]) -> list[Series]:
    groups: dict[str, list[DicomFile]] = defaultdict(list)
    for file in files:
        uid = str(file.header.get("SeriesInstanceUID", "") or "")
        groups[uid or f"(no SeriesInstanceUID: {file.path.name})"].append(file)
    return [Series(uid, members) for uid, members in groups.items()]


def choose_series(series: list[Series], wanted: str | None) -> tuple[Series, str]:
    """The series to analyse and why (see the module docstring for the rule)."""
    if not series:
        raise InputError("the input holds no DICOM files", code=ErrorCode.NO_IMAGE_SERIES)
    if wanted is not None:
        for candidate in series:
            if candidate.uid == wanted:
                refusal = candidate.refusal()
                if refusal:
                    raise InputError(f"series {wanted} cannot be analysed: {refusal[1]}", code=refusal[0])
                return candidate, "named by the job (series_uid)"
        present = ", ".join(s.uid for s in series)
        raise InputError(f"series {wanted} is not in the input; present: {present}", code=ErrorCode.SERIES_NOT_FOUND)
    eligible = [s for s in series if s.refusal() is None]
    if not eligible:
        refusals = [s.refusal() for s in series]
        codes = {r[0] for r in refusals if r}
        if len(codes) == 1:
            code = codes.pop()
            notes = "; ".join(sorted({r[1] for r in refusals if r}))
            raise InputError(f"no series can be analysed: {notes}", code=code)
        listing = "; ".join(f"{s.uid}: {r[1]}" for s, r in zip(series, refusals, strict=True) if r)
        raise InputError(f"no grayscale CT/MR image series in the input ({listing})", code=ErrorCode.NO_IMAGE_SERIES)
    eligible.sort(key=Series.rank)
    chosen = eligible[0]
    if len(eligible) == 1:
        reason = "the only grayscale CT/MR image series" + (
            f" ({len(series) - 1} other series not eligible)" if len(series) > 1 else ""
        )
    else:
        s = chosen.summary()
        reason = (
            f"ranked first of {len(eligible)} eligible series ({s.modality}, {s.image_type or 'no ImageType'}, "
            f"{s.plane or 'unknown plane'}, {chosen.frames} slices) by the rule: ORIGINAL before DERIVED, axial "
            "first, most slices, lowest SeriesNumber"
        )
    return chosen, reason


# --- geometry of every frame -------------------------------------------------------------------


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def _orientation(ds: Dataset) -> np.ndarray | None:
    if "ImageOrientationPatient" in ds:
        return _floats(ds.ImageOrientationPatient, 6)
    shared = _functional(ds, None, "PlaneOrientationSequence")
    return _floats(shared.ImageOrientationPatient, 6) if shared and "ImageOrientationPatient" in shared else None


def _functional(ds: Dataset, frame: int | None, sequence: str) -> Dataset | None:
    """A functional-group item for a frame of an enhanced object: per-frame first, then shared."""
    if frame is not None and "PerFrameFunctionalGroupsSequence" in ds:
        groups = ds.PerFrameFunctionalGroupsSequence
        if frame < len(groups):
            items = groups[frame].get(sequence)
            if items:
                return items[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        items = shared[0].get(sequence)
        if items:
            return items[0]
    return None


def _missing(what: str, file: DicomFile) -> InputError:
    return InputError(
        f"{what} is missing or invalid in {file.header.get('SOPInstanceUID', file.path.name)}: the slice cannot be "
        "placed in patient space",
        code=ErrorCode.DICOM_MISSING_GEOMETRY,
    )


def _frame_planes(index: int, file: DicomFile) -> list[tuple[FrameRef, SlicePlane]]:
    ds = file.header
    rows, columns = int(ds.Rows), int(ds.Columns)
    number = ds.get("InstanceNumber")
    priority_base = (int(number) if number not in (None, "") else 0, str(ds.get("SOPInstanceUID", "")))
    out = []
    if "PerFrameFunctionalGroupsSequence" in ds:
        for frame in range(file.frames):
            position = _functional(ds, frame, "PlanePositionSequence")
            orientation = _functional(ds, frame, "PlaneOrientationSequence")
            measures = _functional(ds, frame, "PixelMeasuresSequence")
            transform = _functional(ds, frame, "PixelValueTransformationSequence")
            ipp = _floats(position.get("ImagePositionPatient"), 3) if position else None
            iop = _floats(orientation.get("ImageOrientationPatient"), 6) if orientation else None
            spacing = _floats(measures.get("PixelSpacing"), 2) if measures else None
            if ipp is None or iop is None or spacing is None:
                raise _missing(f"frame {frame + 1}'s plane position, orientation or pixel spacing", file)
            slope, intercept = _rescale(transform or ds)
            plane = SlicePlane(ipp, iop, rows, columns, (spacing[0], spacing[1]), (*priority_base, frame))
            out.append((FrameRef(index, frame, slope, intercept), plane))
        return out
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    spacing = _floats(ds.get("PixelSpacing"), 2)
    if ipp is None:
        raise _missing("ImagePositionPatient", file)
    if iop is None:
        raise _missing("ImageOrientationPatient", file)
    if spacing is None:
        raise _missing("PixelSpacing", file)
    slope, intercept = _rescale(ds)
    normal = np.cross(iop[:3], iop[3:])
    step = 0.0
    if file.frames > 1:
        # A legacy multi-frame image: frames are stacked by SpacingBetweenSlices along the normal.
        sbs = _floats([ds.get("SpacingBetweenSlices")], 1)
        if sbs is None or sbs[0] == 0:
            raise _missing("SpacingBetweenSlices (needed to stack a multi-frame image)", file)
        step = float(sbs[0])
    for frame in range(file.frames):
        plane = SlicePlane(
            ipp + frame * step * normal, iop, rows, columns, (spacing[0], spacing[1]), (*priority_base, frame)
        )
        out.append((FrameRef(index, frame, slope, intercept), plane))
    return out


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


def _single_slice_step(ds: Dataset) -> float:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _floats([ds.get(keyword)], 1)
        if value is not None and value[0] > 0:
            return float(value[0])
    measures = _functional(ds, 0, "PixelMeasuresSequence")
    if measures is not None:
        value = _floats([measures.get("SliceThickness")], 1)
        if value is not None and value[0] > 0:
            return float(value[0])
    return 1.0


# --- pixels ----------------------------------------------------------------------------------


def _decode(file: DicomFile) -> np.ndarray:
    """All frames of one file as (frames, rows, columns) stored values (no rescale yet)."""
    try:
        ds = pydicom.dcmread(file.path)
        pixels = ds.pixel_array
        if "ModalityLUTSequence" in ds:
            pixels = apply_modality_lut(pixels, ds)
        return np.asarray(pixels).reshape(file.frames, int(ds.Rows), int(ds.Columns))
    except Exception as error:  # decoders raise many kinds for corrupt or truncated data
        meta = getattr(file.header, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        raise InputError(
            f"pixel data of {file.header.get('SOPInstanceUID', file.path.name)} could not be decoded "
            f"(transfer syntax {syntax or 'unknown'}): {type(error).__name__}: {error}",
            code=ErrorCode.DICOM_DECODE_FAILED,
        ) from error


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
    frames: list[FrameRef] = []
    planes: list[SlicePlane] = []
    for index, file in enumerate(series.files):
        for ref, plane in _frame_planes(index, file):
            frames.append(ref)
            planes.append(plane)
    geometry = stack_geometry(planes, _single_slice_step(series.first))
    columns, rows, slices = geometry.shape
    voxels = rows * columns * slices
    if voxels > max_voxels:
        raise InputError(
            f"the series has {voxels} voxels ({columns}x{rows}x{slices}), more than the limit of {max_voxels}",
            code=ErrorCode.IMAGE_TOO_LARGE,
        )
    stack = np.empty((slices, rows, columns), dtype=np.float32)
    needed: dict[int, list[tuple[int, FrameRef]]] = defaultdict(list)
    for k, plane_index in enumerate(geometry.order):
        ref = frames[plane_index]
        needed[ref.file].append((k, ref))

    def fill(file_index: int) -> None:
        pixels = _decode(series.files[file_index])
        for k, ref in needed[file_index]:
            frame = pixels[ref.frame].astype(np.float32)
            if ref.slope != 1.0 or ref.intercept != 0.0:
                frame *= ref.slope
                frame += ref.intercept
            if geometry.shifts is not None:
                shift_cols, shift_rows = geometry.shifts[k]
                frame = ndimage.shift(
                    frame, (shift_rows, shift_cols), order=1, mode="constant", cval=float(frame.min())
                )
            stack[k] = frame

    # Threads: uncompressed data is mostly I/O, and the JPEG 2000 decoder runs threads of its own
    # (measured: decoder processes gave no gain on 2 cores).
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(fill, needed))
    if not np.all(np.isfinite(stack)):
        raise InputError("the decoded pixel values are not finite", code=ErrorCode.DICOM_DECODE_FAILED)

    ds = series.first
    warnings = [*input_warnings, *geometry.warnings]
    selection = SeriesSelection(
        chosen=series.summary(),
        study_instance_uid=str(ds.get("StudyInstanceUID")) if ds.get("StudyInstanceUID") else None,
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID")) if ds.get("FrameOfReferenceUID") else None,
        reason=reason,
        others=[s.summary() for s in others],
        slices=slices,
        slice_step_mm=round(geometry.step_mm, 6),
        gantry_tilt_deg=round(geometry.tilt_deg, 4),
    )
    source = DicomSource(selection, series.files, geometry, warnings)
    # (slices, rows, columns) -> (columns, rows, slices): a view, Fortran-ordered like NIfTI.
    return DicomVolume(stack.transpose(2, 1, 0), geometry.affine, source)


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
