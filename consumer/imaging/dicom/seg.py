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

SEGMENT_LABEL = "lesion"
MANUFACTURER = "ml-service"


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
    slices = np.ascontiguousarray(mask.transpose(2, 1, 0), dtype=np.uint8)
    shifts = source.geometry.shifts
    if shifts is not None:
        for k, (shift_cols, shift_rows) in enumerate(shifts):
            slices[k] = ndimage.shift(slices[k], (-shift_rows, -shift_cols), order=0, mode="constant", cval=0)
    return slices


def build_seg(mask: np.ndarray, source: DicomSource, job_uuid: str, algorithm: str, version: str) -> bytes:
    """Blocking: the DICOM SEG bytes of a (columns, rows, slices) mask on the series' grid."""
    on_slices = _source_frames(mask, source)
    slice_of_plane = source.geometry.slice_of_plane
    multi_frame = [f for f in source.files if f.frames > 1 or "PerFrameFunctionalGroupsSequence" in f.header]
    if multi_frame and len(source.files) > 1:
        raise SegUnavailable("the series mixes several multi-frame objects")
    # One SEG frame per source frame, in the frames' own order; a dropped duplicate gets the
    # mask of the slice at its position.
    pixel_array = on_slices[np.asarray(slice_of_plane, dtype=np.intp)]
    source_images = [_complete(f.header) for f in source.files]
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm, family=codes.cid7162.ArtificialIntelligence, version=version
        ),
    )
    try:
        seg = hd.seg.Segmentation(
            source_images=source_images,
            pixel_array=pixel_array,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description],
            series_instance_uid=generate_uid(entropy_srcs=[job_uuid, "seg-series"]),
            series_number=9000,
            sop_instance_uid=generate_uid(entropy_srcs=[job_uuid, "seg-instance"]),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=algorithm,
            software_versions=version,
            device_serial_number="0",
            series_description=f"{algorithm} {SEGMENT_LABEL} segmentation",
            content_label="LESIONS",
            omit_empty_frames=True,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as error:
        raise SegUnavailable(f"highdicom refused the source series: {error}") from error
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, seg, enforce_file_format=True)
    return buffer.getvalue()
