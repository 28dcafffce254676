"""Reading NIfTI-1 and NIfTI-2 files, plain or gzip-compressed, checked against the limits first.

A gzip-compressed file is inflated to disk only as far as its header says the image needs (isal
is ~2x faster than zlib), so a gzip bomb stops at what it claims.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from isal import igzip
from isal.igzip_lib import IsalError  # type: ignore[attr-defined]

from consumer.errors import InputError, UnsupportedInput
from consumer.imaging.limits import check_voxels
from schemas.errors import ErrorCode

HEADER_BYTES = 540  # enough for a NIfTI-2 header (NIfTI-1 needs 348)
_CHUNK = 4 * 1024 * 1024
# What a broken gzip stream raises: zlib and isal differ.
_GZIP_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, IsalError, zlib.error)  # type: ignore[assignment]


@dataclass(frozen=True)
class NiftiVolume:
    data: np.ndarray  # float32, 3-D, the file's own axis order
    affine: np.ndarray  # voxel index -> RAS mm
    header: nib.Nifti1Header


def is_nifti_header(head: bytes) -> bool:
    if len(head) >= 348:
        for endian in "<>":
            (size,) = struct.unpack(endian + "i", head[:4])
            if size == 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
                return True
            if size == 540 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
                return True
    return False


def gunzip_head(path: Path) -> bytes:
    try:
        with igzip.open(path, "rb") as f:
            return f.read(HEADER_BYTES)
    except _GZIP_ERRORS as error:
        raise InputError(f"the gzip stream is corrupt: {error}", code=ErrorCode.INVALID_GZIP) from error


def gunzip_to(path: Path, target: Path, limit: int) -> Path:
    """Stream-decompress at most `limit` bytes to disk.

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


def read_gzipped_nifti(path: Path, target: Path, max_voxels: int) -> NiftiVolume:
    """Blocking: inflate what the header claims to `target` (a `.nii` name), then read it."""
    needed = _bytes_needed(gunzip_head(path), max_voxels)
    return read_nifti(gunzip_to(path, target, limit=needed), max_voxels)


def _bytes_needed(head: bytes, max_voxels: int) -> int:
    """Refuse from the header alone; returns the bytes the file needs (header + data)."""
    klass = nib.Nifti2Header if struct.unpack("<i", head[:4])[0] in (540, 469893120) else nib.Nifti1Header
    try:
        header = klass.from_fileobj(io.BytesIO(head))
    except Exception as error:  # nibabel raises several types for a broken header
        raise InputError(f"not a readable NIfTI header: {error}", code=ErrorCode.INVALID_NIFTI) from error
    voxels = check_voxels(volume_shape(header.get_data_shape()), max_voxels)
    return int(header.get_data_offset()) + voxels * header.get_data_dtype().itemsize


def read_nifti(path: Path, max_voxels: int) -> NiftiVolume:
    """Blocking: a `.nii` file (nibabel picks its reader by name) as one float32 volume."""
    try:
        image = nib.load(path, mmap=True)
    except Exception as error:  # nibabel raises several types for a broken header
        raise InputError(f"not a readable NIfTI file: {error}", code=ErrorCode.INVALID_NIFTI) from error
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError("not a NIfTI-1 or NIfTI-2 image", code=ErrorCode.INVALID_NIFTI)
    shape = volume_shape(image.shape)
    voxels = check_voxels(shape, max_voxels)
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
    return NiftiVolume(data, affine, header)


def volume_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
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
