"""Write a volume as a DICOM CT series, the way a scanner would (for tests, benchmarks, demos).

The series can be made messy on purpose: tilted like a gantry-tilt acquisition, compressed in
a given transfer syntax, or written with random file names. Positions and orientation come
from the volume's RAS affine (flipped to DICOM's LPS), so a reader that gets the geometry right
gets the volume back.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    generate_uid,
)
from scipy import ndimage

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class SeriesOptions:
    series_uid: str | None = None
    study_uid: str | None = None
    frame_of_reference_uid: str | None = None
    series_number: int = 1
    description: str = "phantom CT"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    modality: str = "CT"
    tilt_deg: float = 0.0  # gantry tilt: slices shift along the column direction
    transfer_syntax: str = ExplicitVRLittleEndian
    random_names: bool = False
    seed: int = 0


def series_datasets(image: np.ndarray, affine: np.ndarray, options: SeriesOptions) -> list[Dataset]:
    """One CT Image Storage dataset per slice k of `image` (x, y, z in HU)."""
    lps = _LPS @ np.asarray(affine, dtype=np.float64)
    row_vec, col_vec, slice_vec = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    col_spacing, row_spacing = float(np.linalg.norm(row_vec)), float(np.linalg.norm(col_vec))
    row_dir, col_dir = row_vec / col_spacing, col_vec / row_spacing
    step = float(np.linalg.norm(slice_vec))
    shift_per_slice_mm = step * float(np.tan(np.radians(options.tilt_deg)))
    study = options.study_uid or generate_uid()
    series = options.series_uid or generate_uid()
    frame_of_reference = options.frame_of_reference_uid or generate_uid()
    eight_bit = options.transfer_syntax == JPEGBaseline8Bit
    out = []
    for k in range(image.shape[2]):
        plane = image[:, :, k].T  # (rows, columns)
        offset_mm = k * shift_per_slice_mm
        if offset_mm:
            # The slice is acquired `offset_mm` further along the column direction: its pixels
            # show the anatomy that far away.
            plane = ndimage.shift(plane, (-offset_mm / row_spacing, 0.0), order=1, mode="nearest")
        ds = _slice_dataset(plane, eight_bit)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame_of_reference
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Modality = options.modality
        ds.SeriesNumber = options.series_number
        ds.SeriesDescription = options.description
        ds.ImageType = list(options.image_type)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in lps[:3, 3] + k * slice_vec + offset_mm * col_dir]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [row_spacing, col_spacing]
        ds.SliceThickness = step
        ds.GantryDetectorTilt = options.tilt_deg
        out.append(_encode(ds, plane, options.transfer_syntax, eight_bit))
    return out


def _slice_dataset(plane: np.ndarray, eight_bit: bool) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.PatientName = "Phantom^Synthetic"
    ds.PatientID = "PHANTOM"
    ds.StudyDate = "20260101"
    ds.Rows, ds.Columns = plane.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if eight_bit:
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.RescaleSlope, ds.RescaleIntercept = 8, -1024
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.RescaleType = "HU"
    return ds


def _encode(ds: Dataset, plane: np.ndarray, transfer_syntax: str, eight_bit: bool) -> Dataset:
    if eight_bit:
        # JPEG baseline holds 8 bits: HU = 8 * stored - 1024, through Pillow (a highdicom dependency).
        from PIL import Image

        stored = np.clip(np.round((plane + 1024.0) / 8.0), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(stored).save(buffer, format="JPEG", quality=95)
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
        return ds
    stored16 = np.clip(np.round(plane + 1024.0), -32768, 32767).astype(np.int16)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = stored16.tobytes()
    if transfer_syntax in _GDCM_SYNTAXES:
        return _gdcm_transcode(ds, transfer_syntax)
    if transfer_syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds.compress(transfer_syntax, stored16)
    else:
        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    return ds


# pydicom has no encoder for lossless JPEG (process 14); gdcm has.
_GDCM_SYNTAXES: dict[str, str] = {JPEGLosslessSV1: "JPEGLosslessProcess14_1", JPEGLossless: "JPEGLosslessProcess14"}


def _gdcm_transcode(ds: Dataset, transfer_syntax: str) -> Dataset:
    import gdcm

    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        ds.save_as(source, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(source))
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, _GDCM_SYNTAXES[transfer_syntax])))
        writer = gdcm.ImageWriter()
        if not reader.Read():
            raise RuntimeError("gdcm could not read the slice")
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise RuntimeError(f"gdcm could not encode {transfer_syntax}")
        writer.SetFileName(str(target))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise RuntimeError("gdcm could not write the slice")
        return pydicom.dcmread(target)


def write_series(datasets: Sequence[Dataset], directory: Path, random_names: bool = False, seed: int = 0) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for k, ds in enumerate(datasets):
        name = f"{rng.integers(1 << 62):x}" if random_names else f"IM{k + 1:05d}.dcm"
        path = directory / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def zip_series(
    datasets: Sequence[Dataset], target: Path, folder: str = "", seed: int = 0, shuffle: bool = True
) -> Path:
    """A ZIP like a PACS export: members in shuffled order under `folder`, deflated."""
    order = np.random.default_rng(seed).permutation(len(datasets)) if shuffle else np.arange(len(datasets))
    with zipfile.ZipFile(
        target, "a" if target.exists() else "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1
    ) as zf:
        for k in order:
            buffer = io.BytesIO()
            datasets[int(k)].save_as(buffer, enforce_file_format=True)
            zf.writestr(f"{folder}{datasets[int(k)].SOPInstanceUID}.dcm", buffer.getvalue())
    return target


def main() -> None:
    from models.phantom import generate_phantom

    parser = argparse.ArgumentParser(description="Write a synthetic CT phantom as a ZIP of DICOM files.")
    parser.add_argument("out", type=Path, help="e.g. phantom.zip")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), default=(256, 256, 96))
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), default=(0.8, 0.8, 2.5))
    parser.add_argument("--tilt", type=float, default=0.0, help="gantry tilt in degrees")
    args = parser.parse_args()
    phantom = generate_phantom(args.seed, tuple(args.shape), tuple(args.spacing))
    datasets = series_datasets(phantom.image, phantom.affine, SeriesOptions(tilt_deg=args.tilt))
    args.out.unlink(missing_ok=True)
    zip_series(datasets, args.out, folder="DICOM/")
    print(f"{args.out}: {len(datasets)} slices, {phantom.lesion_count} lesion(s)")


if __name__ == "__main__":
    main()
