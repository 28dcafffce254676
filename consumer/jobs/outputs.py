"""Output object keys (deterministic from the job), where they may lie, the encoders of each
output, and their upload.

Keys come from the job id (or its `output_object`) alone, so running a job twice overwrites the
same objects. Every key lies under ML_OUTPUT_PREFIX, outside the result cache's entries, and is
never the job's input or reference: a job may not overwrite another upload, its own input, or
anything else in the bucket (`output_not_allowed`, checked before anything is written).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import orjson
from isal import igzip

from consumer.errors import InputError, JobError, OutputNotAllowed
from consumer.jobs.report import build_report
from consumer.storage import ObjectStore
from schemas.errors import ErrorCode
from schemas.jobs import JobRequest
from schemas.results import AnalysisResult

RESULTS_PREFIX = "results/"  # ML_OUTPUT_PREFIX's default
# Under the output prefix: the result cache's entries (consumer.jobs.cache), never a job's output.
CACHE_DIR = ".cache/"
_MASK_SUFFIXES = (".nii.gz", ".nii")
CONTENT_TYPES = {
    "nifti": "application/gzip",
    "png": "image/png",
    "json": "application/json",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "dicom": "application/dicom",
}


@dataclass(frozen=True)
class OutputKeys:
    mask: str
    results: str
    report: str
    seg: str  # written for DICOM input only
    preview: str
    uncertainty: str  # written by research (test-time flips) only

    @classmethod
    def for_job(cls, request: JobRequest, prefix: str = RESULTS_PREFIX) -> OutputKeys:
        mask = request.output_object or f"{prefix}analysis_{request.job_uuid}.nii.gz"
        stem = mask
        for suffix in _MASK_SUFFIXES:
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        else:
            # A key without a NIfTI suffix still gets a gzip-compressed NIfTI; name it so.
            mask = f"{mask}.nii.gz"
        return cls(
            mask=mask,
            results=f"{stem}.json",
            report=f"{stem}.xlsx",
            seg=f"{stem}.seg.dcm",
            preview=f"{stem}.preview.png",
            uncertainty=f"{stem}.uncertainty.nii.gz",
        )

    def by_name(self) -> dict[str, str]:
        """Every key by the name the result JSON's `outputs` gives it."""
        return {
            "mask": self.mask,
            "results": self.results,
            "report": self.report,
            "preview": self.preview,
            "dicom_seg": self.seg,
            "uncertainty": self.uncertainty,
        }


def check_allowed(keys: OutputKeys, request: JobRequest, prefix: str) -> None:
    """Raises OutputNotAllowed unless every output key lies under `prefix`, outside the cache's
    entries, and none is the job's input or reference."""
    theirs = {request.input_object, request.reference_object} - {None}
    for key in keys.by_name().values():
        if not key.startswith(prefix):
            raise OutputNotAllowed(f"output {key!r} does not lie under the output prefix {prefix!r}")
        if key.startswith(prefix + CACHE_DIR):
            raise OutputNotAllowed(f"output {key!r} lies among the result cache's entries")
        if key in theirs:
            raise OutputNotAllowed(f"output {key!r} is the job's own input or reference")


@dataclass(frozen=True)
class OutputFiles:
    """What a job writes beside its result JSON."""

    mask: np.ndarray  # the label map
    labels: dict[int, str]
    affine: np.ndarray
    header: nib.Nifti1Header | None
    preview: bytes
    seg: bytes | None = None
    uncertainty: np.ndarray | None = None


def _nifti(array: np.ndarray, affine: np.ndarray, source: nib.Nifti1Header | None) -> nib.Nifti1Image:
    """A NIfTI image in the input's geometry: same shape, affine, codes and units."""
    image = nib.Nifti1Image(np.asfortranarray(array), affine)
    if source is not None:
        image.set_sform(affine, code=int(source["sform_code"]) or 1)
        image.set_qform(affine, code=int(source["qform_code"]) or 1)
        image.header.set_xyzt_units(*source.get_xyzt_units())
    return image


def _compressed(image: nib.Nifti1Image, gzip: bool) -> bytes:
    # isal at level 1 compresses a mask (mostly zeros) fast and small.
    raw = image.to_bytes()
    return igzip.compress(raw, compresslevel=1) if gzip else raw


def encode_mask(
    mask: np.ndarray,
    affine: np.ndarray,
    source: nib.Nifti1Header | None,
    gzip: bool = True,
    labels: dict[int, str] | None = None,
) -> bytes:
    """Blocking: the label map as NIfTI bytes (uint8, or uint16 past 255 labels).

    The array is Fortran-ordered already, so nibabel writes it without a layout copy.
    """
    dtype = np.uint16 if int(mask.max(initial=0)) > 255 else np.uint8
    image = _nifti(mask.astype(dtype, copy=False), affine, source)
    names = ", ".join(f"{v}={n}" for v, n in sorted((labels or {1: "lesion"}).items()) if v)
    image.header["descrip"] = f"labels: {names}".encode()[:79]
    image.header["intent_name"] = b"labels"
    return _compressed(image, gzip)


def encode_uncertainty(uncertainty: np.ndarray, affine: np.ndarray, source: nib.Nifti1Header | None) -> bytes:
    image = _nifti(uncertainty.astype(np.float32, copy=False), affine, source)
    image.header["descrip"] = b"variance across test-time flips"
    return _compressed(image, gzip=True)


def encode_result(result: AnalysisResult) -> bytes:
    return orjson.dumps(result.model_dump(mode="json"), option=orjson.OPT_INDENT_2)


async def upload_outputs(store: ObjectStore, keys: OutputKeys, files: OutputFiles, result: AnalysisResult) -> int:
    """Encode (in threads) and upload every output; returns the mask's size in bytes.

    The JSON goes last: when it exists, everything it lists exists.
    """
    mask_bytes, report_bytes = await asyncio.gather(
        asyncio.to_thread(encode_mask, files.mask, files.affine, files.header, keys.mask.endswith(".gz"), files.labels),
        asyncio.to_thread(build_report, result, files.preview),
    )
    uploads = [
        store.put_bytes(keys.mask, mask_bytes, CONTENT_TYPES["nifti"]),
        store.put_bytes(keys.report, report_bytes, CONTENT_TYPES["xlsx"]),
        store.put_bytes(keys.preview, files.preview, CONTENT_TYPES["png"]),
    ]
    if files.seg is not None:
        uploads.append(store.put_bytes(keys.seg, files.seg, CONTENT_TYPES["dicom"]))
    if files.uncertainty is not None:
        encoded = await asyncio.to_thread(encode_uncertainty, files.uncertainty, files.affine, files.header)
        uploads.append(store.put_bytes(keys.uncertainty, encoded, CONTENT_TYPES["nifti"]))
    try:
        await asyncio.gather(*uploads)
        await store.put_bytes(keys.results, encode_result(result), CONTENT_TYPES["json"])
    except InputError as error:
        raise JobError(f"could not write outputs: {error.message}", code=ErrorCode.OUTPUT_WRITE_FAILED) from error
    return len(mask_bytes)
