"""Which series of the input to analyse.

The rule (README "DICOM input"), unless the job names `series_uid`:
1. only grayscale CT or MR image series with pixel data are eligible;
2. ORIGINAL before DERIVED (ImageType's first value);
3. axial before coronal, sagittal and oblique;
4. more slices first;
5. then the lowest SeriesNumber, then the lowest SeriesInstanceUID (so the choice is stable).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from consumer.errors import InputError
from consumer.imaging.dicom.geometry import plane_of
from consumer.imaging.dicom.headers import DicomFile, orientation
from schemas.errors import ErrorCode
from schemas.results import SeriesSummary

MODALITIES = ("CT", "MR")
_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


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
        iop = orientation(self.first)
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
        return _named(series, wanted), "named by the job (series_uid)"
    eligible = [s for s in series if s.refusal() is None]
    if not eligible:
        raise _none_eligible(series)
    eligible.sort(key=Series.rank)
    chosen = eligible[0]
    if len(eligible) == 1:
        others = f" ({len(series) - 1} other series not eligible)" if len(series) > 1 else ""
        return chosen, f"the only grayscale CT/MR image series{others}"
    s = chosen.summary()
    return chosen, (
        f"ranked first of {len(eligible)} eligible series ({s.modality}, {s.image_type or 'no ImageType'}, "
        f"{s.plane or 'unknown plane'}, {chosen.frames} slices) by the rule: ORIGINAL before DERIVED, axial "
        "first, most slices, lowest SeriesNumber"
    )


def _named(series: list[Series], wanted: str) -> Series:
    for candidate in series:
        if candidate.uid == wanted:
            refusal = candidate.refusal()
            if refusal:
                raise InputError(f"series {wanted} cannot be analysed: {refusal[1]}", code=refusal[0])
            return candidate
    present = ", ".join(s.uid for s in series)
    raise InputError(f"series {wanted} is not in the input; present: {present}", code=ErrorCode.SERIES_NOT_FOUND)


def _none_eligible(series: list[Series]) -> InputError:
    """One reason shared by every series is the job's error; several reasons, `no_image_series`."""
    refusals = [s.refusal() for s in series]
    codes = {r[0] for r in refusals if r}
    if len(codes) == 1:
        notes = "; ".join(sorted({r[1] for r in refusals if r}))
        return InputError(f"no series can be analysed: {notes}", code=codes.pop())
    listing = "; ".join(f"{s.uid}: {r[1]}" for s, r in zip(series, refusals, strict=True) if r)
    return InputError(f"no grayscale CT/MR image series in the input ({listing})", code=ErrorCode.NO_IMAGE_SERIES)
