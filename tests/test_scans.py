"""Reading input objects: content decides the format; every refusal has its code."""

from __future__ import annotations

import gzip
import io
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path
from pydicom.data import get_testdata_file

from consumer.errors import InputError
from consumer.imaging.limits import ReadLimits
from consumer.imaging.scans import ScanFormat, read_scan
from schemas.errors import ErrorCode

LIMITS = ReadLimits(max_voxels=512**3)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def refused(path: Path, tmp_path: Path, limits: ReadLimits = LIMITS) -> InputError:
    with pytest.raises(InputError) as info:
        read_scan(path, tmp_path, limits)
    return info.value


@pytest.mark.parametrize(
    "name", ["anatomical.nii", "standard.nii.gz", "reoriented_anat_moved.nii", "resampled_anat_moved.nii"]
)
def test_nibabel_volumes_read_as_the_file_says(name: str, tmp_path: Path) -> None:
    source = Path(data_path) / name
    reference = nib.load(source)
    # The name is hidden from the reader: only the content counts.
    scan = read_scan(write(tmp_path, "object", source.read_bytes()), tmp_path, LIMITS)
    assert scan.data.shape == reference.shape
    np.testing.assert_allclose(scan.affine, reference.affine)
    expected = reference.get_fdata()
    # Voxels outside the field of view (NaN) become the lowest intensity, not NaN.
    expected = np.where(np.isnan(expected), np.nanmin(expected), expected)
    np.testing.assert_allclose(scan.data, expected, rtol=1e-6)
    assert scan.format in (ScanFormat.NIFTI, ScanFormat.NIFTI_GZ)
    assert scan.orientation == "".join(nib.aff2axcodes(reference.affine))


@pytest.mark.parametrize("name", ["example4d.nii.gz", "example_nifti2.nii.gz", "functional.nii"])
def test_multi_volume_series_refused(name: str, tmp_path: Path) -> None:
    error = refused(write(tmp_path, "object", (Path(data_path) / name).read_bytes()), tmp_path)
    assert error.code is ErrorCode.INVALID_IMAGE_DIMENSIONS


def test_cifti_is_not_a_volume(tmp_path: Path) -> None:
    error = refused(write(tmp_path, "object", (Path(data_path) / "row_major.dconn.nii").read_bytes()), tmp_path)
    assert error.code in (ErrorCode.INVALID_NIFTI, ErrorCode.INVALID_IMAGE_DIMENSIONS)


def nifti_bytes(
    data: np.ndarray, affine: np.ndarray | None = None, slope: float | None = None, inter: float = 0.0
) -> bytes:
    image = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    if slope is not None:
        image.header.set_slope_inter(slope, inter)
    return image.to_bytes()


def test_scaling_is_applied(tmp_path: Path) -> None:
    raw = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    scan = read_scan(write(tmp_path, "x.nii", nifti_bytes(raw, slope=2.0, inter=-1024.0)), tmp_path, LIMITS)
    np.testing.assert_allclose(scan.data, raw * 2.0 - 1024.0)


def test_sform_is_honoured(tmp_path: Path) -> None:
    affine = np.array([[0, 0, -2.5, 10], [-0.7, 0, 0, 20], [0, 0.7, 0, -5], [0, 0, 0, 1]], dtype=float)
    scan = read_scan(write(tmp_path, "x.nii", nifti_bytes(np.zeros((4, 5, 6), np.int16), affine)), tmp_path, LIMITS)
    np.testing.assert_allclose(scan.affine, affine)
    assert scan.spacing == pytest.approx((0.7, 0.7, 2.5))


def test_single_volume_4d_is_squeezed_and_2d_is_one_slice(tmp_path: Path) -> None:
    scan = read_scan(write(tmp_path, "a.nii", nifti_bytes(np.ones((4, 5, 6, 1), np.int16))), tmp_path, LIMITS)
    assert scan.data.shape == (4, 5, 6)
    scan = read_scan(write(tmp_path, "b.nii", nifti_bytes(np.ones((4, 5), np.int16))), tmp_path, LIMITS)
    assert scan.data.shape == (4, 5, 1)


def test_huge_header_refused_before_reading(tmp_path: Path) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((4096, 4096, 4096))
    header.set_data_dtype(np.int16)
    path = write(tmp_path, "huge.nii", header.binaryblock + b"\x00" * 4 + b"\x00" * 100)
    assert refused(path, tmp_path).code is ErrorCode.IMAGE_TOO_LARGE


def test_truncated_nifti_refused(tmp_path: Path) -> None:
    data = nifti_bytes(np.ones((32, 32, 32), np.int16))
    assert refused(write(tmp_path, "t.nii", data[: len(data) // 2]), tmp_path).code is ErrorCode.INVALID_NIFTI


def test_truncated_gzip_refused(tmp_path: Path) -> None:
    data = gzip.compress(nifti_bytes(np.random.default_rng(0).integers(0, 1000, (32, 32, 32)).astype(np.int16)))
    assert refused(write(tmp_path, "t.nii.gz", data[: len(data) // 2]), tmp_path).code is ErrorCode.INVALID_GZIP


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"", ErrorCode.INPUT_EMPTY),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, ErrorCode.UNSUPPORTED_FORMAT),
        (np.random.default_rng(1).bytes(4096), ErrorCode.UNSUPPORTED_FORMAT),
        (gzip.compress(b"hello world" * 100), ErrorCode.UNSUPPORTED_FORMAT),
    ],
)
def test_non_images_refused_with_codes(content: bytes, code: ErrorCode, tmp_path: Path) -> None:
    assert refused(write(tmp_path, "scan.nii.gz", content), tmp_path).code is code


def test_dicom_and_zip_are_read_whatever_their_name(tmp_path: Path) -> None:
    dicom = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    assert read_scan(write(tmp_path, "scan.nii.gz", dicom), tmp_path, LIMITS).format is ScanFormat.DICOM
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("series/1.dcm", dicom)
    scan = read_scan(write(tmp_path, "scan.nii", buffer.getvalue()), tmp_path, LIMITS)
    assert scan.format is ScanFormat.ZIP and scan.data.shape == (128, 128, 1)


def test_gzipped_huge_header_refused_without_inflating(tmp_path: Path) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((4096, 4096, 4096))
    header.set_data_dtype(np.int16)
    path = write(tmp_path, "huge.nii.gz", gzip.compress(header.binaryblock + b"\x00" * 4))
    assert refused(path, tmp_path).code is ErrorCode.IMAGE_TOO_LARGE


def test_a_claim_the_compressed_file_cannot_hold_is_refused_before_allocating(tmp_path: Path) -> None:
    """85 bytes that claim 160 MB (within the voxel limit): refused from the header, nothing held."""
    header = nib.Nifti1Header()
    header.set_data_shape((400, 400, 125))
    header.set_data_dtype(np.float64)
    path = write(tmp_path, "claim.nii.gz", gzip.compress(header.binaryblock + b"\x00" * 4))
    tracemalloc.start()
    try:
        error = refused(path, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert error.code is ErrorCode.INVALID_NIFTI and "truncated" in error.message
    assert peak < 16 * 2**20


def test_gzip_bomb_inflates_only_what_the_header_claims(tmp_path: Path) -> None:
    small = nifti_bytes(np.ones((10, 10, 10), np.int16))
    compressor = zlib.compressobj(9, wbits=31)
    bomb = compressor.compress(small)
    zeros = b"\x00" * 2**20
    for _ in range(256):  # 256 MiB of trailing zeros, a few hundred KiB compressed
        bomb += compressor.compress(zeros)
    bomb += compressor.flush()
    path = write(tmp_path, "bomb.nii.gz", bomb)
    tracemalloc.start()
    try:
        scan = read_scan(path, tmp_path, LIMITS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert scan.data.shape == (10, 10, 10)
    assert peak < 16 * 2**20  # the bomb's 256 MiB were never inflated


@pytest.mark.parametrize("gzipped", [False, True])
def test_a_scaling_that_overflows_float32_leaves_no_inf(gzipped: bool, tmp_path: Path) -> None:
    content = nifti_bytes(np.arange(-3000, 3000, 100, dtype=np.int16).reshape(3, 4, 5), slope=1e36)  # to 3e39
    scan = read_scan(write(tmp_path, "scan", gzip.compress(content) if gzipped else content), tmp_path, LIMITS)
    assert np.all(np.isfinite(scan.data))


def test_a_gzipped_file_with_kilobytes_of_header_extensions_is_read(tmp_path: Path) -> None:
    raw = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    image = nib.Nifti1Image(raw, np.eye(4))
    image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"x" * 4000))
    scan = read_scan(write(tmp_path, "scan", gzip.compress(image.to_bytes())), tmp_path, LIMITS)
    np.testing.assert_array_equal(scan.data, raw)


@pytest.mark.parametrize("gzipped", [False, True])
@pytest.mark.parametrize(
    ("dtype", "slope", "inter"),
    [(">i2", 1.0, -1024.0), ("<u2", 0.5, 0.0), ("u1", None, 0.0), ("<f8", None, 0.0), (">f4", 2.0, 1.0)],
)
def test_stored_types_read_as_nibabel_scales_them_in_c_order(
    dtype: str, slope: float | None, inter: float, gzipped: bool, tmp_path: Path
) -> None:
    raw = np.random.default_rng(3).integers(0, 200, (7, 6, 5)).astype(dtype)
    if raw.dtype.kind == "f":
        raw[1, 2, 3] = np.nan  # outside the field of view: the lowest intensity
    content = nifti_bytes(raw, slope=slope, inter=inter)
    path = write(tmp_path, "scan", gzip.compress(content) if gzipped else content)
    scan = read_scan(path, tmp_path, LIMITS)
    expected = nib.Nifti1Image.from_bytes(content).get_fdata()
    expected = np.where(np.isnan(expected), np.nanmin(expected), expected)
    assert scan.data.dtype == np.float32 and scan.data.flags.c_contiguous
    np.testing.assert_allclose(scan.data, expected, rtol=1e-6)


def test_gzipped_truncated_nifti_refused(tmp_path: Path) -> None:
    data = nifti_bytes(np.ones((32, 32, 32), np.int16))
    assert refused(write(tmp_path, "t.nii.gz", gzip.compress(data[:1000])), tmp_path).code is ErrorCode.INVALID_NIFTI
