"""DICOM headers: reading them without pixel data, and the attribute readers the others share.

Enhanced (multi-frame) objects keep plane position, orientation, spacing and rescale in
functional groups, per frame or shared; `functional` finds the item for a frame.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from consumer.errors import InputError
from schemas.errors import ErrorCode

log = logging.getLogger(__name__)

_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
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

    @property
    def name(self) -> str:
        """How messages name the file: its SOPInstanceUID, else its file name."""
        return str(self.header.get("SOPInstanceUID", self.path.name))


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
    except Exception as error:  # noqa: BLE001 - pydicom raises many kinds for a damaged or foreign file: skip it
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
    except Exception as error:  # pydicom raises many kinds for a damaged file
        raise InputError(f"not a readable DICOM file: {error}", code=ErrorCode.INVALID_DICOM) from error
    return DicomFile(path, header)


def floats(value: Any, n: int) -> np.ndarray | None:
    """`n` finite numbers from a multi-valued attribute, or None when it has other than that."""
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def functional(ds: Dataset, frame: int | None, sequence: str) -> Dataset | None:
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


def orientation(ds: Dataset) -> np.ndarray | None:
    """ImageOrientationPatient of a classic image, or the shared one of an enhanced object."""
    if "ImageOrientationPatient" in ds:
        return floats(ds.ImageOrientationPatient, 6)
    shared = functional(ds, None, "PlaneOrientationSequence")
    return floats(shared.ImageOrientationPatient, 6) if shared and "ImageOrientationPatient" in shared else None
