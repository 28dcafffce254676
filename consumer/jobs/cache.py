"""The result cache, which is also crash idempotency.

A finished job leaves an entry, `<ML_OUTPUT_PREFIX>.cache/<key>.json`, that names its result
JSON. The key is a sha256 over everything its outputs depend on: the input's identity (ETag and
size: the same bytes under any key), profile, threshold, series, the reference mask's identity,
the mask format, the service version and the model. The model of a job that names none is
chosen after the read, by the scan's modality, so such a job is keyed on every hosted model
(name, version, weights sha256, and those of the profile's own network) and the routes: a new
bundle or new weights is a miss.

A job whose key has an entry copies those outputs inside the bucket (server-side copies) to its
own keys, rewrites the result JSON and the report (they name the job and its input), and
completes with `cached: true`, without fetching the input or running the model. A job
redelivered after a crash finds its own entry with its outputs already in place and costs a few
requests. The entry is written after the result JSON, the last output, so an entry always points
at complete outputs; an entry whose outputs are gone is a miss. A job with `"no_cache": true`
reuses nothing but its own finished outputs (idempotency is not caching).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import UTC, datetime

import orjson
from pydantic import BaseModel, ValidationError

from consumer.errors import InputNotFound, StorageUnavailable
from consumer.jobs.context import JobContext, Written
from consumer.jobs.outputs import CACHE_DIR, CONTENT_TYPES, encode_result
from consumer.jobs.report import build_report
from consumer.storage import ObjectInfo, ObjectStore
from models.bundle import profile_of
from models.engine import Ran
from models.registry import ModelRegistry
from schemas.api_docs import VERSION
from schemas.jobs import Profile
from schemas.results import AnalysisResult

log = logging.getLogger(__name__)

ENTRY_VERSION = 1
# Outputs copied as they are; the result JSON and the report are written for the new job.
COPIED = ("mask", "preview", "dicom_seg", "uncertainty")


class CacheEntry(BaseModel):
    version: int = ENTRY_VERSION
    job_uuid: str
    results: str  # the result JSON's key; it lists every other output
    mask_bytes: int


def model_identity(models: ModelRegistry, requested: str | None, profile: Profile) -> str:
    """The model a job will run, as far as it is known before the read: with the weights of the
    profile's own network where it has one, so retraining fast_debug leaves production's entries."""
    cards = [models.card(models.resolve(requested))] if requested else models.cards()
    hosted = ";".join(f"{c.name}@{c.version}#{c.weights_sha256}{_own(c.profile_networks, profile)}" for c in cards)
    if requested:
        return hosted
    routes = ",".join(f"{modality}:{name}" for modality, name in sorted(models.routes.items()))
    return f"route[{routes}|default={models.default}]{hosted}"


def _own(networks: dict[str, Ran], profile: Profile) -> str:
    """The weights of the profile's own networks (its setup for small patients may have one too):
    new ones answer anew, whatever the bundle's version says."""
    own = sorted((name, ran.weights_sha256) for name, ran in networks.items() if profile_of(name) == profile.value)
    return "".join(f"+{name}#{sha256}" for name, sha256 in own)


def cache_key(ctx: JobContext, source: ObjectInfo, reference: ObjectInfo | None, model: str) -> str | None:
    """None when the input has no identity to key on (no ETag)."""
    if not source.etag:
        return None
    request = ctx.request
    parts = {
        "service": VERSION,
        "input": [source.etag.strip('"'), source.size],
        "reference": [reference.etag, reference.size] if reference else None,
        "profile": ctx.profile.value,
        "threshold": ctx.threshold,
        "series": request.series_uid,
        "model": model,
        "gzip": ctx.keys.mask.endswith(".gz"),
    }
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()


def for_job(result: AnalysisResult, ctx: JobContext) -> AnalysisResult:
    """A finished job's result, told as this job's: its id, input key and output keys."""
    keys = ctx.keys.by_name()
    outputs = {name: keys[name] for name in result.outputs}
    return result.model_copy(
        update={
            "job_uuid": ctx.job_uuid,
            "input": result.input.model_copy(update={"object": ctx.request.input_object}),
            "outputs": outputs,
            "segmentation": result.segmentation.model_copy(
                update={"file_path": keys["mask"], "dicom_seg": outputs.get("dicom_seg")}
            ),
            "created_at": datetime.now(UTC).isoformat(),
        }
    )


class ResultCache:
    def __init__(self, store: ObjectStore, prefix: str, enabled: bool):
        self.store = store
        self.folder = prefix + CACHE_DIR
        self.enabled = enabled

    def entry_key(self, key: str) -> str:
        return f"{self.folder}{key}.json"

    async def find(self, key: str, ctx: JobContext) -> Written | None:
        """This job's outputs, in place, when a finished job with the same key left them."""
        entry = await self._entry(key)
        if entry is None or (ctx.request.no_cache and entry.job_uuid != ctx.job_uuid):
            return None
        try:
            result = AnalysisResult.model_validate_json(await self.store.get_bytes(entry.results))
        except (InputNotFound, ValidationError):
            return None  # its outputs were removed or overwritten since
        try:
            return await self._reuse(entry, result, ctx)
        except InputNotFound:
            return None

    async def _entry(self, key: str) -> CacheEntry | None:
        try:
            return CacheEntry.model_validate_json(await self.store.get_bytes(self.entry_key(key)))
        except InputNotFound:
            return None
        except ValidationError:
            log.warning("result cache entry %s is unreadable; running the job", key)
            return None

    async def _reuse(self, entry: CacheEntry, result: AnalysisResult, ctx: JobContext) -> Written:
        target = ctx.keys.by_name()
        seg = target["dicom_seg"] if "dicom_seg" in result.outputs else None
        if result.job_uuid == ctx.job_uuid and result.outputs.get("results") == target["results"]:
            return Written(result, entry.mask_bytes, seg, cached=True)  # its own, already in place
        copies = [
            self.store.copy(result.outputs[name], target[name])
            for name in COPIED
            if name in result.outputs and result.outputs[name] != target[name]
        ]
        await asyncio.gather(*copies)
        mine = for_job(result, ctx)
        preview = await self.store.get_bytes(target["preview"]) if "preview" in result.outputs else None
        report = await asyncio.to_thread(build_report, mine, preview)
        await self.store.put_bytes(target["report"], report, CONTENT_TYPES["xlsx"])
        # The JSON last, as on a first run: when it exists, everything it lists exists.
        await self.store.put_bytes(target["results"], encode_result(mine), CONTENT_TYPES["json"])
        return Written(mine, entry.mask_bytes, seg, cached=True)

    async def remember(self, key: str, ctx: JobContext, written: Written) -> None:
        """After the outputs: a cache entry that is not written costs a later job its reuse, not this job."""
        entry = CacheEntry(job_uuid=ctx.job_uuid, results=ctx.keys.results, mask_bytes=written.mask_bytes)
        try:
            await self.store.put_bytes(self.entry_key(key), entry.model_dump_json().encode(), CONTENT_TYPES["json"])
        except StorageUnavailable as error:
            log.warning("job %s: result cache entry not written: %s", ctx.job_uuid, error)
