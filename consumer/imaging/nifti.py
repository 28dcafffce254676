"""Reading NIfTI-1 and NIfTI-2 files, plain or gzip-compressed, checked against the limits first.

A gzip-compressed file is inflated into memory only as far as its header says the image needs
(isal is ~2x faster than zlib), so a gzip bomb stops at what it claims. The volume comes out in
C order, cast and copied once on every torch thread: the engine hands the scan to the bundle in
C order, and NIfTI stores it in Fortran order, so reading it as stored meant a second copy of
the whole scan there (0.7 s at 512 x 512 x 300 on 2 cores) beside nibabel's own scaled copy.
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
from nibabel.arrayproxy import ArrayProxy

from consumer.errors import InputError, UnsupportedInput
from consumer.imaging.limits import check_voxels
from models.layout import c_order_copy
from schemas.errors import ErrorCode

HEADER_BYTES = 540  # enough for a NIfTI-2 header (NIfTI-1 needs 348)
_CHUNK = 4 * 1024 * 1024
_MAX_DEFLATE_RATIO = 1032  # the most one compressed byte can inflate to (zlib's limit)
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


def gunzip_into(path: Path, size: int) -> np.ndarray:
    """Inflate exactly `size` bytes into memory; a stream that ends early is an error, and bytes
    past `size` are never inflated.

    A file too small to inflate to `size` (deflate expands at most ~1032:1) is refused before
    anything is allocated, and the buffer's pages are taken as they are written (np.empty, not a
    zero-filled bytearray): a header's claim costs no memory that the stream does not fill."""
    if size > _MAX_DEFLATE_RATIO * path.stat().st_size:
        raise InputError(
            f"the NIfTI file is truncated: its header needs {size} bytes, more than "
            f"{path.stat().st_size} compressed bytes can hold",
            code=ErrorCode.INVALID_NIFTI,
        )
    buffer = np.empty(size, dtype=np.uint8)
    written = 0
    try:
        with igzip.open(path, "rb") as src:
            while written < size:
                count = src.readinto(buffer[written : min(size, written + _CHUNK)])
                if not count:
                    break
                written += count
    except _GZIP_ERRORS as error:
        raise InputError(f"the gzip stream is truncated or corrupt: {error}", code=ErrorCode.INVALID_GZIP) from error
    if written < size:
        raise InputError(
            f"the NIfTI file is truncated: {written} bytes, the header needs {size}", code=ErrorCode.INVALID_NIFTI
        )
    return buffer


def read_gzipped_nifti(path: Path, max_voxels: int) -> NiftiVolume:
    """Blocking: inflate what the header claims (refused from the header alone when too large),
    then read the volume from memory."""
    header = _header(gunzip_head(path))
    shape = volume_shape(header.get_data_shape())
    voxels = check_voxels(shape, max_voxels)
    dtype = _scalar_dtype(header)
    offset = int(header.get_data_offset())
    buffer = gunzip_into(path, offset + voxels * dtype.itemsize)
    stored = buffer[offset:].view(dtype).reshape(shape, order="F")
    try:
        slope, inter = header.get_slope_inter()  # (None, None): no scaling
    except Exception as error:  # nibabel's HeaderDataError: a valid slope with a NaN intercept
        raise InputError(f"the NIfTI scaling is invalid: {error}", code=ErrorCode.INVALID_NIFTI) from error
    scaling = (1.0, 0.0) if slope is None or inter is None else (float(slope), float(inter))
    return _volume(stored, scaling, _affine(header.get_best_affine()), header)


def _header(head: bytes) -> nib.Nifti1Header:
    """The fixed header alone: extensions (AFNI writes kilobytes of them) are not needed to read
    the data, which starts at vox_offset whatever they hold."""
    klass = nib.Nifti2Header if struct.unpack("<i", head[:4])[0] in (540, 469893120) else nib.Nifti1Header
    try:
        return klass.from_fileobj(io.BytesIO(head[: klass.sizeof_hdr]))
    except Exception as error:  # nibabel raises several types for a broken header
        raise InputError(f"not a readable NIfTI header: {error}", code=ErrorCode.INVALID_NIFTI) from error


def read_nifti(path: Path, max_voxels: int) -> NiftiVolume:
    """Blocking: a `.nii` file (nibabel picks its reader by name), memory-mapped, as one volume."""
    try:
        image = nib.load(path, mmap=True)
    except Exception as error:  # nibabel raises several types for a broken header
        raise InputError(f"not a readable NIfTI file: {error}", code=ErrorCode.INVALID_NIFTI) from error
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError("not a NIfTI-1 or NIfTI-2 image", code=ErrorCode.INVALID_NIFTI)
    shape = volume_shape(image.shape)
    voxels = check_voxels(shape, max_voxels)
    header = image.header
    dtype = _scalar_dtype(header)
    expected = int(header.get_data_offset()) + voxels * dtype.itemsize
    if path.stat().st_size < expected:
        raise InputError(
            f"the NIfTI file is truncated: {path.stat().st_size} bytes, the header needs {expected}",
            code=ErrorCode.INVALID_NIFTI,
        )
    # A loaded image keeps its scaling in the data proxy; its header's is reset.
    proxy = image.dataobj
    if not isinstance(proxy, ArrayProxy):  # nib.load gives one; anything else is not a file we read
        raise InputError("the NIfTI data is not readable from the file", code=ErrorCode.INVALID_NIFTI)
    stored = np.asarray(proxy.get_unscaled()).reshape(shape, order="F")
    return _volume(stored, (float(proxy.slope), float(proxy.inter)), _affine(image.affine), header)


def _scalar_dtype(header: nib.Nifti1Header) -> np.dtype:
    dtype = header.get_data_dtype()
    if dtype.fields is not None or dtype.kind == "c":
        raise UnsupportedInput(f"NIfTI data type {dtype} is not a scalar intensity (RGB or complex)")
    return dtype


def _affine(affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError("the NIfTI affine is singular or not finite", code=ErrorCode.INVALID_NIFTI)
    return affine


def _volume(
    stored: np.ndarray, scaling: tuple[float, float], affine: np.ndarray, header: nib.Nifti1Header
) -> NiftiVolume:
    """The stored values as float32 in C order, scaled (scl_slope, scl_inter) as nibabel's
    get_fdata scales them; non-finite values (a float file's, or a scaling's overflow) replaced."""
    slope, inter = scaling
    data = as_float32_c(stored)
    scaled = slope != 1.0 or inter != 0.0
    if scaled:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is replaced just below
            data *= np.float32(slope)
            data += np.float32(inter)
    if (scaled or stored.dtype.kind == "f") and not np.all(np.isfinite(data)):
        data = np.nan_to_num(
            data, nan=float(np.nanmin(data)) if np.isfinite(data).any() else 0.0, posinf=0.0, neginf=0.0
        )
    return NiftiVolume(data, affine, header)


def as_float32_c(stored: np.ndarray) -> np.ndarray:
    """A float32 copy in C order, cast and transposed in one pass (models.layout)."""
    return c_order_copy(stored, np.float32)


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
