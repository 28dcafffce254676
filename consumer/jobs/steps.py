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

from consumer.errors import InferenceError, InputError, InputTooLarge, ModelNotFound
from consumer.imaging.analysis import Analysis, LabelMap, analyse
from consumer.imaging.dicom.seg import SegUnavailable, build_seg
from consumer.imaging.limits import ReadLimits
from consumer.imaging.reference import reference_metrics
from consumer.imaging.scans import Scan, read_scan
from consumer.jobs.preview import render_preview
from consumer.storage import ObjectInfo, ObjectStore
from models.engine import InferenceFailed, Prediction
from models.passes import ProgressFn
from models.registry import ModelCard, ModelRegistry
from models.registry import ModelNotFound as UnknownModel
from schemas.errors import ErrorCode
from schemas.jobs import Profile
from schemas.results import Metric, ModelInfo

log = logging.getLogger(__name__)


async def check_input(store: ObjectStore, key: str, max_bytes: int) -> ObjectInfo:
    """The input's size and identity; refused from its size before any byte is downloaded."""
    info = await store.stat(key)
    if info.size > max_bytes:
        raise InputTooLarge(f"the input is {info.size} bytes, over the limit of {max_bytes}")
    if info.size == 0:
        raise InputError("the input object is empty", code=ErrorCode.INPUT_EMPTY)
    return info


async def fetch(store: ObjectStore, key: str, tmp: Path) -> Path:
    """The input on local disk: streamed, never held whole in memory."""
    path = tmp / "input"
    await store.download(key, path)
    return path


async def reference_info(store: ObjectStore, key: str | None) -> ObjectInfo | None:
    """The reference mask's identity (for the result cache's key); None when there is none yet."""
    if key is None:
        return None
    try:
        return await store.stat(key)
    except InputError:
        return None  # the reference step says so, with its own code


async def read(path: Path, tmp: Path, limits: ReadLimits, series_uid: str | None) -> Scan:
    return await asyncio.to_thread(read_scan, path, tmp, limits, series_uid)


async def resolve_model(models: ModelRegistry, requested: str | None, scan: Scan | None) -> ModelCard:
    """The model a job runs: the one it names, else the route for the scan's modality, else the default."""
    try:
        return models.card(models.resolve(requested, scan.modality if scan else None))
    except UnknownModel as error:
        raise ModelNotFound(str(error)) from error


async def choose_setup(models: ModelRegistry, name: str, scan: Scan, profile: Profile) -> str:
    """The setup of the profile this scan runs in (its setup for small patients, where it has one
    and the patient is small): known before inference, so that every event names the weights."""
    try:
        engine = await asyncio.to_thread(models.engine, name)  # loads it again if it was unloaded
        return await asyncio.to_thread(engine.setup_for, profile, scan.data, scan.affine)
    except (RuntimeError, ValueError) as error:  # a model that failed to load again, a scan it cannot measure
        log.exception("choosing the setup failed")
        raise InferenceError(f"model {name}: {error}") from error


async def infer(
    models: ModelRegistry,
    name: str,
    scan: Scan,
    profile: Profile,
    threshold: float,
    progress: ProgressFn,
    setup: str | None = None,
) -> Prediction:
    try:
        engine = await asyncio.to_thread(models.engine, name)  # loads it again if it was unloaded
        prediction = await asyncio.to_thread(
            engine.predict, scan.data, scan.affine, profile, threshold, scan.header, progress, setup
        )
    except InferenceFailed as error:
        raise InferenceError(str(error)) from error
    except (RuntimeError, ValueError) as error:
        log.exception("inference failed")
        raise InferenceError(f"model {name}: inference failed: {error}") from error
    # The engine's own split of the step (pre-processing, network, post-processing), for
    # operators and the benchmark; the result JSON keeps the job's steps only.
    runtime, precision = prediction.ran.runtime, prediction.ran.precision
    log.info(
        "inference on %s (%s, %s): %s",
        runtime,
        precision,
        setup or profile.value,
        ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in prediction.timings.items()),
        extra={"engine_timings": prediction.timings, "runtime": runtime, "precision": precision},
    )
    return prediction


async def find_lesions(scan: Scan, prediction: Prediction) -> Analysis:
    label_map = LabelMap(
        labels=prediction.labels,
        names=prediction.label_names,
        probability=prediction.probability,
        uncertainty=prediction.uncertainty,
        min_volume_mm3=prediction.min_volume_mm3,
    )
    return await asyncio.to_thread(analyse, label_map, scan.data, scan.affine)


async def preview(scan: Scan, analysis: Analysis, model_modality: str | None) -> bytes:
    ct = (scan.modality or model_modality or "").upper() == "CT"
    return await asyncio.to_thread(render_preview, scan.data, analysis.mask, scan.affine, analysis.findings, ct)


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
    return reference_metrics(mask, reference.data, scan.spacing)


async def dicom_seg(
    scan: Scan, analysis: Analysis, job_uuid: str, model: ModelInfo, names: dict[int, str]
) -> tuple[bytes | None, str | None]:
    """DICOM input: the SEG bytes, or None and the warning that says why there is none."""
    if scan.dicom is None:
        return None, None
    try:
        seg = await asyncio.to_thread(build_seg, analysis.mask, scan.dicom, job_uuid, model.name, model.version, names)
        return seg, None
    except SegUnavailable as error:
        log.warning("job %s: no DICOM SEG: %s", job_uuid, error)
        return None, f"no DICOM SEG was written: {error}"
