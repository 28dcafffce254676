"""Reading an input object into a volume. Content decides the format, never the file name.

NIfTI (`.nii`, `.nii.gz`) is read here; a DICOM file or a ZIP of DICOM files goes through
`consumer.imaging.archives` and `consumer.imaging.dicom.series`. Anything else is refused with a code that says
what the content is.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import nibabel as nib
import numpy as np
from isal import igzip
from isal.igzip_lib import IsalError  # type: ignore[attr-defined]

from consumer.errors import InputError, UnsupportedInput
from consumer.imaging.archives import ArchiveLimits, extract_members
from consumer.imaging.dicom.series import (
    BARE_DATASET_STARTS,
    DicomSource,
    DicomVolume,
    read_header,
    read_series,
    read_single_header,
)
from consumer.settings import Settings
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
_CHUNK = 4 * 1024 * 1024
# What a broken gzip stream raises: zlib and isal differ.
_GZIP_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, IsalError, zlib.error)  # type: ignore[assignment]


class ScanFormat(StrEnum):
    NIFTI = "nifti"
    NIFTI_GZ = "nifti-gz"
    DICOM = "dicom"
    ZIP = "zip"


@dataclass(frozen=True)
class ReadLimits:
    max_voxels: int = 1024**3 // 2
    archive: ArchiveLimits = field(default_factory=ArchiveLimits)
    threads: int = 2

    @classmethod
    def from_settings(cls, settings: Settings) -> ReadLimits:
        return cls(
            max_voxels=settings.ml_max_voxels,
            archive=ArchiveLimits(
                max_total_bytes=settings.ml_max_archive_bytes,
                max_members=settings.ml_max_archive_members,
                max_ratio=settings.ml_max_archive_ratio,
            ),
            threads=settings.ml_reader_threads or os.cpu_count() or 1,
        )


@dataclass(frozen=True)
class Scan:
    data: np.ndarray  # float32, 3-D, the file's own axis order
    affine: np.ndarray  # voxel index -> RAS mm
    format: ScanFormat
    header: nib.Nifti1Header
    dicom: DicomSource | None = None

    @property
    def warnings(self) -> list[str]:
        return list(self.dicom.warnings) if self.dicom else []

    @property
    def spacing(self) -> tuple[float, float, float]:
        return voxel_spacing(self.affine)

    @property
    def orientation(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))


def _is_nifti_header(head: bytes) -> bool:
    if len(head) >= 348:
        for endian in "<>":
            (size,) = struct.unpack(endian + "i", head[:4])
            if size == 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
                return True
            if size == 540 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
                return True
    return False


def sniff(path: Path) -> ScanFormat:
    """What the bytes are. Raises an InputError naming what they are when it is no scan we read."""
    with open(path, "rb") as f:
        head = f.read(540)
    if not head:
        raise InputError("the input object is empty", code=ErrorCode.INPUT_EMPTY)
    if head.startswith(_GZIP_MAGIC):
        inner = _gunzip_head(path)
        if _is_nifti_header(inner):
            return ScanFormat.NIFTI_GZ
        raise UnsupportedInput("gzip-compressed data that is not a NIfTI image")
    if _is_nifti_header(head):
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
    except Exception:
        return False
    return True


def _gunzip_head(path: Path) -> bytes:
    try:
        with igzip.open(path, "rb") as f:
            return f.read(540)
    except _GZIP_ERRORS as error:
        raise InputError(f"the gzip stream is corrupt: {error}", code=ErrorCode.INVALID_GZIP) from error


def gunzip_to(path: Path, target: Path, limit: int) -> Path:
    """Stream-decompress at most `limit` bytes to disk (isal is ~2x faster than zlib).

    A stream that ends early is an error; bytes past the limit are never inflated.
    """
    written = 0
    try:
        with igzip.open(path, "rb") as src, open(target, "wb") as dst:
            while written < limit:
                chunk = src.read(min(_CHUNK, limit - written))
                if not chunk:
                    break
                dst.write(chunk)
                written += len(chunk)
    except _GZIP_ERRORS as error:
        raise InputError(f"the gzip stream is truncated or corrupt: {error}", code=ErrorCode.INVALID_GZIP) from error
    if written < limit:
        raise InputError(
            f"the NIfTI file is truncated: {written} bytes, the header needs {limit}", code=ErrorCode.INVALID_NIFTI
        )
    return target


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
    max_voxels = limits.max_voxels
    nifti_path = Path(tempfile.mkdtemp(prefix="nifti-", dir=workdir)) / "scan.nii"
    if fmt is ScanFormat.NIFTI_GZ:
        # The header decides how much may be inflated: a gzip bomb stops at what it claims.
        needed = _check_header(_gunzip_head(path), max_voxels)
        gunzip_to(path, nifti_path, limit=needed)
    else:
        # nibabel picks its reader by file name; ours was picked by content, so name it so.
        nifti_path.unlink(missing_ok=True)
        nifti_path.symlink_to(path.resolve())
    return _read_nifti(nifti_path, fmt, max_voxels)


def _from_dicom(volume: DicomVolume, fmt: ScanFormat) -> Scan:
    header = nib.Nifti1Header()
    header.set_sform(volume.affine, code=1)  # scanner-based anatomical coordinates
    header.set_qform(volume.affine, code=1)
    header.set_xyzt_units("mm", "sec")
    return Scan(data=volume.data, affine=volume.affine, format=fmt, header=header, dicom=volume.source)


def _check_header(head: bytes, max_voxels: int) -> int:
    """Refuse from the header alone; returns the bytes the file needs (header + data)."""
    klass = nib.Nifti2Header if struct.unpack("<i", head[:4])[0] in (540, 469893120) else nib.Nifti1Header
    try:
        header = klass.from_fileobj(io.BytesIO(head))
    except Exception as error:
        raise InputError(f"not a readable NIfTI header: {error}", code=ErrorCode.INVALID_NIFTI) from error
    shape = _volume_shape(header.get_data_shape())
    voxels = int(np.prod(shape, dtype=np.int64))
    if voxels > max_voxels:
        raise InputError(
            f"the image has {voxels} voxels {shape}, more than the limit of {max_voxels}",
            code=ErrorCode.IMAGE_TOO_LARGE,
        )
    return int(header.get_data_offset()) + voxels * header.get_data_dtype().itemsize


def _read_nifti(path: Path, fmt: ScanFormat, max_voxels: int) -> Scan:
    try:
        image = nib.load(path, mmap=True)
    except Exception as error:  # nibabel raises several types for a broken header
        raise InputError(f"not a readable NIfTI file: {error}", code=ErrorCode.INVALID_NIFTI) from error
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError("not a NIfTI-1 or NIfTI-2 image", code=ErrorCode.INVALID_NIFTI)
    shape = _volume_shape(image.shape)
    voxels = int(np.prod(shape, dtype=np.int64))
    if voxels > max_voxels:
        raise InputError(
            f"the image has {voxels} voxels {shape}, more than the limit of {max_voxels}",
            code=ErrorCode.IMAGE_TOO_LARGE,
        )
    header = image.header
    dtype = header.get_data_dtype()
    if dtype.fields is not None or dtype.kind == "c":
        raise UnsupportedInput(f"NIfTI data type {dtype} is not a scalar intensity (RGB or complex)")
    expected = int(header.get_data_offset()) + voxels * dtype.itemsize
    if path.stat().st_size < expected:
        raise InputError(
            f"the NIfTI file is truncated: {path.stat().st_size} bytes, the header needs {expected}",
            code=ErrorCode.INVALID_NIFTI,
        )
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError("the NIfTI affine is singular or not finite", code=ErrorCode.INVALID_NIFTI)
    # get_fdata applies scl_slope / scl_inter.
    data = np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape)
    if not np.all(np.isfinite(data)):
        data = np.nan_to_num(
            data, nan=float(np.nanmin(data)) if np.isfinite(data).any() else 0.0, posinf=0.0, neginf=0.0
        )
    return Scan(data=data, affine=affine, format=fmt, header=header)


def _volume_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    dims = list(shape)
    # Trailing singleton dimensions (a 4-D file holding one volume) are squeezed.
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) == 2:
        dims.append(1)
    if len(dims) != 3 or min(dims) < 1:
        raise InputError(
            f"the image has shape {shape}; one 3-D volume is needed (a 4-D series with several volumes is refused)",
            code=ErrorCode.INVALID_IMAGE_DIMENSIONS,
        )
    return dims[0], dims[1], dims[2]
