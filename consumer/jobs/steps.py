"""The bodies of a job's steps: fetch, read, infer, analyse, score against a reference, DICOM SEG.

Each is a short coroutine over what it needs (the bucket, the engine, the limits); everything
blocking runs in a worker thread, so the event loop keeps polling Kafka and answering HTTP.
The runner (jobs.runner) names, times and orders them.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np

from consumer.errors import InputError, InputTooLarge, JobError, ModelNotLoaded
from consumer.imaging.analysis import Analysis, analyse, reference_metrics
from consumer.imaging.dicom.seg import SegUnavailable, build_seg
from consumer.imaging.limits import ReadLimits
from consumer.imaging.scans import Scan, read_scan
from consumer.storage import ObjectStore
from models.engine import InferenceEngine, Prediction
from schemas.errors import ErrorCode
from schemas.jobs import Profile
from schemas.results import Metric, ModelInfo

log = logging.getLogger(__name__)


async def fetch(store: ObjectStore, key: str, tmp: Path, max_bytes: int) -> tuple[Path, int]:
    """The input on local disk, and its size; refused from its size before any byte is downloaded."""
    info = await store.stat(key)
    if info.size > max_bytes:
        raise InputTooLarge(f"the input is {info.size} bytes, over the limit of {max_bytes}")
    if info.size == 0:
        raise InputError("the input object is empty", code=ErrorCode.INPUT_EMPTY)
    path = tmp / "input"
    await store.download(key, path)
    return path, info.size


async def read(path: Path, tmp: Path, limits: ReadLimits, series_uid: str | None) -> Scan:
    return await asyncio.to_thread(read_scan, path, tmp, limits, series_uid)


async def infer(engine: InferenceEngine, scan: Scan, profile: Profile) -> Prediction:
    if not engine.loaded:
        raise ModelNotLoaded("the model is not loaded yet")
    try:
        return await asyncio.to_thread(engine.predict, scan.data, scan.affine, profile)
    except (RuntimeError, ValueError) as error:
        log.exception("inference failed")
        raise JobError(f"inference failed: {error}", code=ErrorCode.INFERENCE_FAILED) from error


async def find_lesions(scan: Scan, prediction: Prediction, threshold: float) -> Analysis:
    return await asyncio.to_thread(
        analyse,
        prediction.probability,
        scan.data,
        scan.affine,
        threshold,
        prediction.profile.min_lesion_volume_mm3,
    )


async def score_reference(
    store: ObjectStore, key: str, tmp: Path, limits: ReadLimits, scan: Scan, analysis: Analysis
) -> list[Metric]:
    """Agreement of the mask with the job's reference mask, which must lie on the input's grid."""
    path = tmp / "reference"
    try:
        await store.download(key, path)
    except InputError as error:
        raise InputError(f"reference mask {key!r} does not exist", code=ErrorCode.REFERENCE_NOT_FOUND) from error
    return await asyncio.to_thread(_score, path, tmp, limits, scan, analysis.mask)


def _score(path: Path, tmp: Path, limits: ReadLimits, scan: Scan, mask: np.ndarray) -> list[Metric]:
    try:
        reference = read_scan(path, tmp, limits)
    except InputError as error:
        raise InputError(f"reference mask unreadable: {error.message}", code=ErrorCode.REFERENCE_MISMATCH) from error
    if reference.data.shape != mask.shape or not np.allclose(reference.affine, scan.affine, atol=1e-3):
        raise InputError(
            f"reference mask grid {reference.data.shape} does not match the input {mask.shape}",
            code=ErrorCode.REFERENCE_MISMATCH,
        )
    return reference_metrics(mask, reference.data, float(abs(np.linalg.det(scan.affine[:3, :3]))))


async def dicom_seg(scan: Scan, analysis: Analysis, job_uuid: str, model: ModelInfo) -> tuple[bytes | None, str | None]:
    """DICOM input: the SEG bytes, or None and the warning that says why there is none."""
    if scan.dicom is None:
        return None, None
    try:
        return await asyncio.to_thread(build_seg, analysis.mask, scan.dicom, job_uuid, model.name, model.version), None
    except SegUnavailable as error:
        log.warning("job %s: no DICOM SEG: %s", job_uuid, error)
        return None, f"no DICOM SEG was written: {error}"
