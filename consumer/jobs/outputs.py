"""Output object keys (deterministic from the job), the encoders of each output, and their upload.

Keys come from the job id alone, so running a job twice overwrites the same objects.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import orjson
from isal import igzip

from consumer.errors import InputError, JobError
from consumer.jobs.report import build_report
from consumer.storage import ObjectStore
from schemas.errors import ErrorCode
from schemas.jobs import JobRequest
from schemas.results import AnalysisResult

RESULTS_PREFIX = "results/"
_MASK_SUFFIXES = (".nii.gz", ".nii")
CONTENT_TYPES = {
    "nifti": "application/gzip",
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

    @classmethod
    def for_job(cls, request: JobRequest) -> OutputKeys:
        mask = request.output_object or f"{RESULTS_PREFIX}analysis_{request.job_uuid}.nii.gz"
        stem = mask
        for suffix in _MASK_SUFFIXES:
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        else:
            # A key without a NIfTI suffix still gets a gzip-compressed NIfTI; name it so.
            mask = f"{mask}.nii.gz"
        return cls(mask=mask, results=f"{stem}.json", report=f"{stem}.xlsx", seg=f"{stem}.seg.dcm")


def encode_mask(mask: np.ndarray, affine: np.ndarray, source: nib.Nifti1Header | None, gzip: bool = True) -> bytes:
    """Blocking: the mask as NIfTI bytes in the input's geometry (same shape, affine and codes).

    The array is Fortran-ordered already, so nibabel writes it without a layout copy; isal at
    level 1 compresses a mask (mostly zeros) fast and small.
    """
    image = nib.Nifti1Image(np.asfortranarray(mask, dtype=np.uint8), affine)
    if source is not None:
        sform_code = int(source["sform_code"]) or 1
        qform_code = int(source["qform_code"]) or 1
        image.set_sform(affine, code=sform_code)
        image.set_qform(affine, code=qform_code)
        image.header.set_xyzt_units(*source.get_xyzt_units())
    image.header["descrip"] = b"lesion mask (1 = lesion)"
    image.header["intent_name"] = b"lesion"
    raw = image.to_bytes()
    return igzip.compress(raw, compresslevel=1) if gzip else raw


def encode_result(result: AnalysisResult) -> bytes:
    return orjson.dumps(result.model_dump(mode="json"), option=orjson.OPT_INDENT_2)


async def upload_outputs(
    store: ObjectStore,
    keys: OutputKeys,
    mask: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None,
    result: AnalysisResult,
    seg: bytes | None,
) -> int:
    """Encode (in threads) and upload every output; returns the mask's size in bytes.

    The JSON goes last: when it exists, everything it lists exists.
    """
    mask_bytes, report_bytes = await asyncio.gather(
        asyncio.to_thread(encode_mask, mask, affine, header, keys.mask.endswith(".gz")),
        asyncio.to_thread(build_report, result),
    )
    uploads = [
        store.put_bytes(keys.mask, mask_bytes, CONTENT_TYPES["nifti"]),
        store.put_bytes(keys.report, report_bytes, CONTENT_TYPES["xlsx"]),
    ]
    if seg is not None:
        uploads.append(store.put_bytes(keys.seg, seg, CONTENT_TYPES["dicom"]))
    try:
        await asyncio.gather(*uploads)
        await store.put_bytes(keys.results, encode_result(result), CONTENT_TYPES["json"])
    except InputError as error:
        raise JobError(f"could not write outputs: {error.message}", code=ErrorCode.OUTPUT_WRITE_FAILED) from error
    return len(mask_bytes)
