"""Reading an input object into a volume. Content decides the format, never the file name.

NIfTI (`.nii`, `.nii.gz`) is read by `imaging.nifti`; a DICOM file or a ZIP of DICOM files by
`imaging.archives` and `imaging.dicom.series`. Anything else is refused with a code that says
what the content is.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import nibabel as nib
import numpy as np

from consumer.errors import InputError, UnsupportedInput
from consumer.imaging.archives import extract_members
from consumer.imaging.dicom.headers import BARE_DATASET_STARTS, read_header, read_single_header
from consumer.imaging.dicom.series import DicomSource, DicomVolume, read_series
from consumer.imaging.limits import ReadLimits
from consumer.imaging.nifti import (
    HEADER_BYTES,
    NiftiVolume,
    gunzip_head,
    is_nifti_header,
    read_gzipped_nifti,
    read_nifti,
)
from models.geometry import voxel_spacing
from schemas.errors import ErrorCode

_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_OTHER_FORMATS = {
    b"\x89PNG\r\n\x1a\n": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"%PDF": "a PDF document",
    b"GIF8": "a GIF image",
    b"II*\x00": "a TIFF image",
    b"MM\x00*": "a TIFF image",
}


class ScanFormat(StrEnum):
    NIFTI = "nifti"
    NIFTI_GZ = "nifti-gz"
    DICOM = "dicom"
    ZIP = "zip"


@dataclass(frozen=True)
class Scan:
    data: np.ndarray  # float32, 3-D, the file's own axis order
    affine: np.ndarray  # voxel index -> RAS mm
    format: ScanFormat
    header: nib.Nifti1Header
    dicom: DicomSource | None = None

    @property
    def modality(self) -> str | None:
        """DICOM Modality of the series read (CT, MR); None for NIfTI, which does not say."""
        return self.dicom.selection.chosen.modality if self.dicom else None

    @property
    def warnings(self) -> list[str]:
        return list(self.dicom.warnings) if self.dicom else []

    @property
    def spacing(self) -> tuple[float, float, float]:
        return voxel_spacing(self.affine)

    @property
    def orientation(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))


def sniff(path: Path) -> ScanFormat:
    """What the bytes are. Raises an InputError naming what they are when it is no scan we read."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if not head:
        raise InputError("the input object is empty", code=ErrorCode.INPUT_EMPTY)
    if head.startswith(_GZIP_MAGIC):
        if is_nifti_header(gunzip_head(path)):
            return ScanFormat.NIFTI_GZ
        raise UnsupportedInput("gzip-compressed data that is not a NIfTI image")
    if is_nifti_header(head):
        return ScanFormat.NIFTI
    if len(head) >= 132 and head[128:132] == b"DICM":
        return ScanFormat.DICOM
    if head.startswith(_ZIP_MAGICS):
        return ScanFormat.ZIP
    if _is_bare_dicom(path, head):
        return ScanFormat.DICOM
    for magic, what in _OTHER_FORMATS.items():
        if head.startswith(magic):
            raise UnsupportedInput(f"the input is {what}, not a CT/MR volume (DICOM, ZIP of DICOM or NIfTI)")
    raise UnsupportedInput("the input is not a recognised medical image (DICOM, ZIP of DICOM or NIfTI)")


def _is_bare_dicom(path: Path, head: bytes) -> bool:
    """A DICOM dataset written without the preamble and 'DICM' (older PACS exports do this)."""
    if not head.startswith(BARE_DATASET_STARTS):
        return False
    try:
        read_header(path)
    except Exception:  # noqa: BLE001 - whatever pydicom raises, the bytes are not a DICOM dataset
        return False
    return True


def read_scan(path: Path, workdir: Path, limits: ReadLimits, series_uid: str | None = None) -> Scan:
    """Blocking: read the object at `path` into a float32 volume (`series_uid`: DICOM only)."""
    fmt = sniff(path)
    if fmt is ScanFormat.DICOM:
        read_single_header(path)  # a damaged header is `invalid_dicom`, not "no series"
        return _from_dicom(read_series([path], series_uid, limits.max_voxels, limits.threads), fmt)
    if fmt is ScanFormat.ZIP:
        members = Path(tempfile.mkdtemp(prefix="members-", dir=workdir))
        extracted = extract_members(path, members, limits.archive, limits.threads)
        volume = read_series(extracted.files, series_uid, limits.max_voxels, limits.threads, tuple(extracted.warnings))
        return _from_dicom(volume, fmt)
    if fmt is ScanFormat.NIFTI_GZ:
        return _from_nifti(read_gzipped_nifti(path, limits.max_voxels), fmt)
    nifti_path = Path(tempfile.mkdtemp(prefix="nifti-", dir=workdir)) / "scan.nii"
    # nibabel picks its reader by file name; ours was picked by content, so name it so.
    nifti_path.symlink_to(path.resolve())
    return _from_nifti(read_nifti(nifti_path, limits.max_voxels), fmt)


def _from_nifti(volume: NiftiVolume, fmt: ScanFormat) -> Scan:
    return Scan(data=volume.data, affine=volume.affine, format=fmt, header=volume.header)


def _from_dicom(volume: DicomVolume, fmt: ScanFormat) -> Scan:
    header = nib.Nifti1Header()
    header.set_sform(volume.affine, code=1)  # scanner-based anatomical coordinates
    header.set_qform(volume.affine, code=1)
    header.set_xyzt_units("mm", "sec")
    return Scan(data=volume.data, affine=volume.affine, format=fmt, header=header, dicom=volume.source)
