"""The DICOM reader: real files shipped with pydicom, synthetic series with known geometry, SEG out."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from consumer.errors import InputError
from consumer.imaging.dicom.seg import build_seg
from consumer.imaging.limits import ReadLimits
from consumer.imaging.scans import Scan, ScanFormat, read_scan
from models.dicom_export import SeriesOptions, series_datasets, zip_series
from models.phantom import Phantom, generate_phantom
from schemas.errors import ErrorCode

LESION = {0: "background", 1: "lesion"}

LIMITS = ReadLimits(max_voxels=512**3)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def small() -> Phantom:
    return generate_phantom(6, (96, 80, 24), (2.0, 2.0, 2.5), lesion_count=(1, 2), lesion_diameter_mm=(14, 20))


def read(path: Path, tmp_path: Path, series_uid: str | None = None, limits: ReadLimits = LIMITS) -> Scan:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return read_scan(path, work, limits, series_uid)


def refused(path: Path, tmp_path: Path, series_uid: str | None = None, limits: ReadLimits = LIMITS) -> InputError:
    with pytest.raises(InputError) as info:
        read(path, tmp_path, series_uid, limits)
    return info.value


def zipped(tmp_path: Path, datasets: list[Dataset], name: str = "series.zip", **kwargs) -> Path:  # type: ignore[no-untyped-def]
    return zip_series(datasets, tmp_path / name, **kwargs)


# --- real files that ship with pydicom --------------------------------------------------------

READABLE = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_implicit.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_padded.dcm",
    "693_J2KI.dcm",
    "J2K_pixelrep_mismatch.dcm",
    "examples_overlay.dcm",
]
REFUSED = {
    "MR_truncated.dcm": ErrorCode.DICOM_DECODE_FAILED,
    "rtdose.dcm": ErrorCode.DICOM_UNSUPPORTED_MODALITY,
    "liver_1frame.dcm": ErrorCode.DICOM_UNSUPPORTED_MODALITY,
    "JPEG-lossy.dcm": ErrorCode.DICOM_UNSUPPORTED_MODALITY,
    "image_dfl.dcm": ErrorCode.DICOM_UNSUPPORTED_MODALITY,
    "reportsi.dcm": ErrorCode.DICOM_NO_PIXEL_DATA,
    "test-SR.dcm": ErrorCode.DICOM_NO_PIXEL_DATA,
    "rtplan.dcm": ErrorCode.DICOM_NO_PIXEL_DATA,
    "waveform_ecg.dcm": ErrorCode.DICOM_NO_PIXEL_DATA,
    "ExplVR_LitEndNoMeta.dcm": ErrorCode.DICOM_NO_PIXEL_DATA,
    "examples_rgb_color.dcm": ErrorCode.DICOM_COLOR_NOT_SUPPORTED,
    "examples_ybr_color.dcm": ErrorCode.DICOM_COLOR_NOT_SUPPORTED,
    "examples_palette.dcm": ErrorCode.DICOM_COLOR_NOT_SUPPORTED,
    "SC_rgb_jpeg_gdcm.dcm": ErrorCode.DICOM_COLOR_NOT_SUPPORTED,
    "ExplVR_BigEnd.dcm": ErrorCode.DICOM_COLOR_NOT_SUPPORTED,
    "no_meta.dcm": ErrorCode.UNSUPPORTED_FORMAT,
}


@pytest.mark.parametrize("name", READABLE)
def test_pydicom_images_read_as_the_file_says(name: str, tmp_path: Path) -> None:
    source = Path(get_testdata_file(name))
    ds = pydicom.dcmread(source)
    target = tmp_path / "object"  # no extension: the content decides
    target.write_bytes(source.read_bytes())
    scan = read(target, tmp_path)
    assert scan.format is ScanFormat.DICOM
    assert scan.data.shape == (ds.Columns, ds.Rows, 1)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    np.testing.assert_allclose(scan.spacing[:2], (col_spacing, row_spacing), rtol=1e-6)
    # The affine maps voxel (0, 0, 0) to ImagePositionPatient and follows ImageOrientationPatient.
    lps = LPS_TO_RAS @ scan.affine
    np.testing.assert_allclose(lps[:3, 3], [float(v) for v in ds.ImagePositionPatient], atol=1e-4)
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    np.testing.assert_allclose(lps[:3, 0] / col_spacing, iop[:3], atol=1e-4)
    np.testing.assert_allclose(lps[:3, 1] / row_spacing, iop[3:], atol=1e-4)
    # Pixel values are modality values: stored values through RescaleSlope/Intercept.
    expected = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds).astype(np.float32).T
    np.testing.assert_allclose(scan.data[:, :, 0], expected)
    assert scan.dicom is not None and scan.dicom.selection.chosen.modality in ("CT", "MR")


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_other_pydicom_files_are_refused_with_their_code(name: str, tmp_path: Path) -> None:
    target = tmp_path / "object.dcm"
    target.write_bytes(Path(get_testdata_file(name)).read_bytes())
    assert refused(target, tmp_path).code is REFUSED[name]


def test_ct_values_are_hounsfield_units(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    scan = read(Path(get_testdata_file("CT_small.dcm")), tmp_path)
    stored = ds.pixel_array.astype(np.float32).T
    np.testing.assert_allclose(scan.data[:, :, 0], stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept))


# --- synthetic series with known geometry -----------------------------------------------------


def assert_same_volume(scan: Scan, phantom: Phantom, atol: float = 1.0) -> None:
    assert scan.data.shape == phantom.image.shape
    np.testing.assert_allclose(scan.affine, phantom.affine, atol=1e-4)
    np.testing.assert_allclose(scan.data, np.round(phantom.image), atol=atol)


def test_shuffled_zip_with_random_names_reads_the_volume(small: Phantom, tmp_path: Path) -> None:
    datasets = series_datasets(small.image, small.affine, SeriesOptions())
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        order = np.random.default_rng(5).permutation(len(datasets))
        for n, k in enumerate(order):
            buffer = io.BytesIO()
            datasets[int(k)].save_as(buffer, enforce_file_format=True)
            # InstanceNumber is scrambled too: only positions may order the slices.
            zf.writestr(f"PACS/{n:x}/IMG{(n * 7919) % 1000:04d}", buffer.getvalue())
        zf.writestr("DICOMDIR", b"not read")
        zf.writestr("README.TXT", b"exported by a PACS")
        zf.writestr("PACS/", b"")
    scan = read(archive, tmp_path)
    assert scan.format is ScanFormat.ZIP
    assert_same_volume(scan, small)
    assert scan.dicom is not None
    selection = scan.dicom.selection
    assert selection.chosen.series_instance_uid == datasets[0].SeriesInstanceUID
    assert selection.slices == 24 and selection.slice_step_mm == pytest.approx(2.5)
    assert any("not DICOM" in w for w in scan.warnings)


def test_separate_files_in_a_zip_match_nibabel_orientation(small: Phantom, tmp_path: Path) -> None:
    scan = read(zipped(tmp_path, series_datasets(small.image, small.affine, SeriesOptions())), tmp_path)
    assert scan.orientation == "".join(nib.aff2axcodes(small.affine))


@pytest.mark.parametrize(
    ("syntax", "atol"),
    [
        (RLELossless, 1.0),
        (JPEGLSLossless, 1.0),
        (JPEG2000Lossless, 1.0),
        (JPEGLosslessSV1, 1.0),
        (JPEGBaseline8Bit, 160.0),
    ],
    ids=["rle", "jpeg-ls", "jpeg2000", "jpeg-lossless", "jpeg-baseline"],
)
def test_compressed_series_decode(small: Phantom, syntax: str, atol: float, tmp_path: Path) -> None:
    datasets = series_datasets(small.image, small.affine, SeriesOptions(transfer_syntax=syntax))
    assert datasets[0].file_meta.TransferSyntaxUID == syntax
    scan = read(zipped(tmp_path, datasets), tmp_path)
    assert_same_volume(scan, small, atol=atol)
    if syntax == JPEGBaseline8Bit:
        # 8 bits hold HU in steps of 8; lossy JPEG adds a little more.
        assert float(np.abs(scan.data - small.image).mean()) < 10.0


def test_missing_slice_is_refused_naming_the_gap(small: Phantom, tmp_path: Path) -> None:
    datasets = series_datasets(small.image, small.affine, SeriesOptions())
    del datasets[7]
    error = refused(zipped(tmp_path, datasets), tmp_path)
    assert error.code is ErrorCode.DICOM_MISSING_SLICES
    assert "between slices 6 and 7" in error.message and "5.00 mm" in error.message and "about 1 slice" in error.message


def test_duplicate_slice_is_dropped_with_a_warning(small: Phantom, tmp_path: Path) -> None:
    datasets = series_datasets(small.image, small.affine, SeriesOptions())
    twin = pydicom.dcmread(io.BytesIO(_bytes(datasets[4])))
    twin.SOPInstanceUID = generate_uid()
    twin.InstanceNumber = 99
    twin.PixelData = np.zeros((80, 96), np.int16).tobytes()  # the kept one (lower InstanceNumber) wins
    scan = read(zipped(tmp_path, [*datasets, twin]), tmp_path)
    assert_same_volume(scan, small)
    assert any("duplicate" in w for w in scan.warnings)


def test_several_volumes_in_one_series_are_refused(small: Phantom, tmp_path: Path) -> None:
    first = series_datasets(small.image, small.affine, SeriesOptions())
    echo = series_datasets(
        small.image * 0.5, small.affine, SeriesOptions(series_uid=first[0].SeriesInstanceUID)
    )  # a second echo: same positions, same series
    error = refused(zipped(tmp_path, [*first, *echo]), tmp_path)
    assert error.code is ErrorCode.INVALID_IMAGE_DIMENSIONS and "2 images at each of its 24 positions" in error.message


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_gantry_tilt_is_resampled_onto_the_normal_grid(small: Phantom, tmp_path: Path) -> None:
    datasets = series_datasets(small.image, small.affine, SeriesOptions(tilt_deg=12.0))
    scan = read(zipped(tmp_path, datasets), tmp_path)
    assert scan.dicom is not None
    assert scan.dicom.selection.gantry_tilt_deg == pytest.approx(12.0, abs=0.01)
    assert any("gantry tilt" in w for w in scan.warnings)
    np.testing.assert_allclose(scan.affine, small.affine, atol=1e-4)
    # Away from the rows that the tilt pushed out of the field of view, the anatomy is back where it was.
    shift_px = int(np.ceil(23 * 2.5 * np.tan(np.radians(12.0)) / 2.0)) + 2
    inner = (slice(None), slice(shift_px, -shift_px), slice(None))
    error = np.abs(scan.data[inner] - small.image[inner])
    assert float(np.median(error)) < 15.0
    # The lesion sits where it was: its voxels are brighter or darker than the organ as before.
    lesion = small.lesion_mask.astype(bool)
    assert float(np.abs(scan.data[lesion] - small.image[lesion]).mean()) < 40.0


def test_two_series_choose_by_the_rule_or_by_series_uid(small: Phantom, tmp_path: Path) -> None:
    main = series_datasets(small.image, small.affine, SeriesOptions(series_number=2))
    # A derived reformat with the same slices, listed first: the ORIGINAL series wins anyway.
    derived = series_datasets(
        small.image, small.affine, SeriesOptions(series_number=1, image_type=("DERIVED", "SECONDARY", "MPR"))
    )
    scout = series_datasets(small.image[:, :, :3], small.affine, SeriesOptions(series_number=3))
    archive = zipped(tmp_path, derived, folder="a/")
    zip_series(main, archive, folder="b/")
    zip_series(scout, archive, folder="c/")
    scan = read(archive, tmp_path)
    assert scan.dicom is not None
    selection = scan.dicom.selection
    assert selection.chosen.series_instance_uid == main[0].SeriesInstanceUID
    assert "ORIGINAL before DERIVED" in selection.reason
    assert {s.series_instance_uid for s in selection.others} == {
        derived[0].SeriesInstanceUID,
        scout[0].SeriesInstanceUID,
    }
    named = read(archive, tmp_path, series_uid=scout[0].SeriesInstanceUID)
    assert named.data.shape == (96, 80, 3)
    assert named.dicom is not None and named.dicom.selection.reason == "named by the job (series_uid)"
    assert refused(archive, tmp_path, series_uid="1.2.3.4").code is ErrorCode.SERIES_NOT_FOUND


def test_slices_of_different_size_or_orientation_are_refused(small: Phantom, tmp_path: Path) -> None:
    datasets = series_datasets(small.image, small.affine, SeriesOptions())
    other = series_datasets(small.image[:48], small.affine, SeriesOptions(series_uid=datasets[0].SeriesInstanceUID))
    mixed = [*datasets[:10], *other[10:]]
    assert refused(zipped(tmp_path, mixed), tmp_path).code is ErrorCode.DICOM_INCONSISTENT_SERIES
    turned = series_datasets(small.image, small.affine, SeriesOptions())
    turned[3].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    error = refused(zipped(tmp_path, turned, name="turned.zip"), tmp_path)
    assert error.code is ErrorCode.DICOM_INCONSISTENT_SERIES and "orientation" in error.message


def test_slice_without_position_is_refused(small: Phantom, tmp_path: Path) -> None:
    datasets = series_datasets(small.image, small.affine, SeriesOptions())
    del datasets[2].ImagePositionPatient
    error = refused(zipped(tmp_path, datasets), tmp_path)
    assert error.code is ErrorCode.DICOM_MISSING_GEOMETRY and "ImagePositionPatient" in error.message


def enhanced_ct(datasets: list[Dataset], frame_order: list[int]) -> Dataset:
    """One Enhanced CT object holding the slices in `frame_order`, positions per frame."""
    first = datasets[0]
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PatientID", "PatientName"):
        setattr(ds, keyword, getattr(first, keyword))
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.Rows, ds.Columns = first.Rows, first.Columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.NumberOfFrames = len(frame_order)
    shared = Dataset()
    orientation, measures, transform = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    measures.PixelSpacing = first.PixelSpacing
    measures.SliceThickness = first.SliceThickness
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, -1024, "HU"
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelMeasuresSequence = [measures]
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in frame_order:
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = datasets[k].ImagePositionPatient
        item.PlanePositionSequence = [position]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = b"".join(datasets[k].PixelData for k in frame_order)
    return ds


def test_enhanced_multiframe_ct_reads_from_per_frame_positions(small: Phantom, tmp_path: Path) -> None:
    datasets = series_datasets(small.image, small.affine, SeriesOptions())
    order = [int(k) for k in np.random.default_rng(1).permutation(len(datasets))]
    path = tmp_path / "enhanced"
    enhanced_ct(datasets, order).save_as(path, enforce_file_format=True)
    scan = read(path, tmp_path)
    assert_same_volume(scan, small)
    # And the SEG references the one multi-frame source with a frame per non-empty slice.
    assert scan.dicom is not None
    seg = hd.seg.Segmentation.from_dataset(
        pydicom.dcmread(io.BytesIO(build_seg(small.lesion_mask, scan.dicom, "job-mf", "model", "1.0", LESION)))
    )
    assert seg.NumberOfFrames == int(np.count_nonzero(small.lesion_mask.any(axis=(0, 1))))


def test_single_slice_is_a_one_slice_volume(tmp_path: Path) -> None:
    scan = read(Path(get_testdata_file("CT_small.dcm")), tmp_path)
    assert scan.data.shape == (128, 128, 1)
    assert scan.spacing[2] == pytest.approx(5.0)  # SliceThickness gives a lone slice its depth


# --- DICOM SEG --------------------------------------------------------------------------------


@pytest.mark.parametrize("tilt", [0.0, 10.0], ids=["straight", "tilted"])
def test_seg_references_the_source_and_lies_on_its_slices(small: Phantom, tilt: float, tmp_path: Path) -> None:
    datasets = series_datasets(small.image, small.affine, SeriesOptions(tilt_deg=tilt))
    scan = read(zipped(tmp_path, datasets), tmp_path)
    assert scan.dicom is not None
    mask = small.lesion_mask
    raw = build_seg(mask, scan.dicom, "job-seg", "medical_segmentation_v1", "1.2.3", LESION)
    assert raw[128:132] == b"DICM"
    seg = hd.seg.segread(io.BytesIO(raw))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == datasets[0].StudyInstanceUID
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == datasets[0].SeriesInstanceUID
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} <= set(by_uid)
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "lesion"
    assert segment.SegmentAlgorithmName == "medical_segmentation_v1"
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "1.2.3"
    # Only non-empty frames, each on the plane of a source slice (the tilted slices included).
    non_empty = int(np.count_nonzero(mask.any(axis=(0, 1))))
    assert seg.NumberOfFrames == non_empty
    source_positions = {tuple(round(float(v), 3) for v in ds.ImagePositionPatient) for ds in datasets}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        position = tuple(round(float(v), 3) for v in frame.PlanePositionSequence[0].ImagePositionPatient)
        assert position in source_positions
    # Read back onto the source images, the SEG is the mask (undoing the tilt only moves voxels
    # that fell out of the field of view).
    uids = [ds.SOPInstanceUID for ds in sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))]
    volume = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    frames = np.asarray(volume).reshape(len(uids), 80, 96)
    back = frames.transpose(2, 1, 0)
    if tilt == 0.0:
        np.testing.assert_array_equal(back, mask)
    else:
        assert back.sum() == pytest.approx(mask.sum(), rel=0.05)
    # The same job writes the same object (same UIDs), so a redelivered job replaces it.
    again = pydicom.dcmread(
        io.BytesIO(build_seg(mask, scan.dicom, "job-seg", "medical_segmentation_v1", "1.2.3", LESION))
    )
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (seg.SOPInstanceUID, seg.SeriesInstanceUID)
