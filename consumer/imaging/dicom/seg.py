"""The mask as a DICOM Segmentation (highdicom), referencing the series it was made from.

The SEG's frames lie on the source slices themselves: a gantry-tilted series, which the reader
resampled, gets its mask shifted back onto each source slice (nearest neighbour), so a viewer
overlays it on the original images. Only non-empty frames are stored. UIDs derive from the job
id, so a redelivered job writes the same object.
"""

from __future__ import annotations

import copy
import io

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from scipy import ndimage

from consumer.imaging.dicom.series import DicomSource

MANUFACTURER = "ml-service"
_ABNORMAL_WORDS = ("lesion", "nodule", "tumor", "tumour", "cancer", "metasta", "neoplasm", "mass")


# Type 2 attributes of the patient and study modules: present, possibly empty, in a valid
# object; anonymised exports often drop them, and highdicom copies them from the source.
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def _complete(header: pydicom.Dataset) -> pydicom.Dataset:
    missing = [keyword for keyword in _TYPE2_COPIED if keyword not in header]
    if not missing:
        return header
    header = copy.copy(header)
    for keyword in missing:
        setattr(header, keyword, "")
    return header


class SegUnavailable(Exception):
    """The series' layout cannot be referenced by one SEG; the job completes without it."""


def _source_frames(mask: np.ndarray, source: DicomSource) -> np.ndarray:
    """(slices, rows, columns) mask on the source slices, undoing the tilt resampling."""
    slices = np.ascontiguousarray(mask.transpose(2, 1, 0))
    shifts = source.geometry.shifts
    if shifts is not None:
        for k, (shift_cols, shift_rows) in enumerate(shifts):
            slices[k] = ndimage.shift(slices[k], (-shift_rows, -shift_cols), order=0, mode="constant", cval=0)
    return slices


def _description(number: int, name: str, algorithm: str, version: str) -> hd.seg.SegmentDescription:
    """A segment per label: abnormal findings coded as lesions, anything else as a structure."""
    abnormal = any(word in name.lower() for word in _ABNORMAL_WORDS)
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=name[:64],
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure
        if abnormal
        else codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Lesion if abnormal else codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm, family=codes.cid7162.ArtificialIntelligence, version=version
        ),
    )


def build_seg(
    mask: np.ndarray, source: DicomSource, job_uuid: str, algorithm: str, version: str, names: dict[int, str]
) -> bytes:
    """Blocking: the DICOM SEG bytes of a (columns, rows, slices) label map on the series' grid.

    Segments are numbered 1..K over the label values present (a SEG needs consecutive numbers;
    label values need not be), each labelled with its name.
    """
    present = [int(v) for v in np.unique(mask) if v != 0]
    if not present:
        present = sorted(v for v in names if v != 0)[:1] or [1]
    numbering = np.zeros(int(max(present)) + 1, dtype=np.uint8 if len(present) < 256 else np.uint16)
    numbering[present] = np.arange(1, len(present) + 1)
    on_slices = _source_frames(numbering[np.clip(mask, 0, len(numbering) - 1)], source)
    slice_of_plane = source.geometry.slice_of_plane
    multi_frame = [f for f in source.files if f.frames > 1 or "PerFrameFunctionalGroupsSequence" in f.header]
    if multi_frame and len(source.files) > 1:
        raise SegUnavailable("the series mixes several multi-frame objects")
    # One SEG frame per source frame, in the frames' own order; a dropped duplicate gets the
    # mask of the slice at its position.
    pixel_array = on_slices[np.asarray(slice_of_plane, dtype=np.intp)]
    source_images = [_complete(f.header) for f in source.files]
    descriptions = [
        _description(number, names.get(value, f"label {value}"), algorithm, version)
        for number, value in enumerate(present, start=1)
    ]
    try:
        seg = hd.seg.Segmentation(
            source_images=source_images,
            pixel_array=pixel_array,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=generate_uid(entropy_srcs=[job_uuid, "seg-series"]),
            series_number=9000,
            sop_instance_uid=generate_uid(entropy_srcs=[job_uuid, "seg-instance"]),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=algorithm,
            software_versions=version,
            device_serial_number="0",
            series_description=f"{algorithm} segmentation",
            content_label="SEGMENTATION",
            omit_empty_frames=True,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as error:
        raise SegUnavailable(f"highdicom refused the source series: {error}") from error
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, seg, enforce_file_format=True)
    return buffer.getvalue()
