"""The job path end to end on the real broker and S3 server: Kafka jobs, MinIO events, DLQ, callback."""

from __future__ import annotations

import base64
import gzip
import io
import itertools
import json
from pathlib import Path
from urllib.parse import unquote_plus

import jsonschema
import nibabel as nib
import numpy as np
import openpyxl
import orjson
import pytest
from aiokafka.errors import CommitFailedError

from consumer.auth import verify_token
from consumer.dev.localstack import LocalStack
from consumer.service import Service
from consumer.storage import ObjectStore
from consumer.transport.clients import ensure_topics
from consumer.transport.dispatch import upload_job_id
from models.bundle import BundleSpec
from models.evaluate import DEFAULT_BUNDLE, dice
from models.patient_size import effective_diameter_mm
from models.phantom import Phantom
from producer_tools.minio_events import minio_event
from schemas.export import schema_path
from tests.conftest import (
    SECRET,
    Backend,
    EventLog,
    committed_offset,
    event_log,
    eventually,
    fresh_scan,
    isolated_settings,
    job_id,
    send_json,
    start_service,
    upload_input,
)


def load_nifti(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)


async def test_kafka_job_completes_with_outputs(
    service: Service,
    store: ObjectStore,
    producer,
    job_events: EventLog,
    phantom: Phantom,
    phantom_file: Path,
    backend: Backend,
) -> None:
    job, key = await upload_input(store, phantom_file, "scan.nii.gz", "application/gzip")
    await send_json(producer, service.settings.kafka_jobs_topic, {"job_uuid": job, "input_object": key}, key=job)

    final = await job_events.final(job)
    assert final["status"] == "completed", final
    statuses = [e["status"] for e in job_events.by_job[job]]
    assert statuses[0] == "accepted" and "running" in statuses and statuses[-1] == "completed"
    jsonschema.validate(final, json.loads(schema_path("job_event").read_text()))
    assert final["source"] == "kafka" and final["profile"] == "fast_debug" and final["threshold"] == 0.55
    assert final["output_object"] == f"results/analysis_{job}.nii.gz"
    assert final["file_name"] == f"analysis_{job}.nii.gz"

    # The mask overlays the input: same shape, same affine, and it finds the phantom's lesions.
    mask_bytes = await store.get_bytes(final["output_object"])
    assert final["file_size"] == len(mask_bytes)
    mask = load_nifti(mask_bytes)
    source = nib.load(phantom_file)
    assert mask.shape == source.shape
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
    predicted = np.asanyarray(mask.dataobj) > 0
    assert dice(predicted, phantom.lesion_mask) >= 0.7

    result = orjson.loads(await store.get_bytes(final["results_object"]))
    jsonschema.validate(result, json.loads(schema_path("analysis_result").read_text()))
    assert result["summary"]["lesions_count"] == phantom.lesion_count == len(result["findings"])
    assert result["segmentation"]["dimensions"] == list(source.shape)
    assert final["summary"] == result["summary"]
    total = sum(f["volume"] for f in result["findings"])
    assert abs(total - result["summary"]["total_volume"]) < 0.01
    voxel_mm3 = float(np.prod(phantom.spacing))
    assert abs(total - predicted.sum() * voxel_mm3) < 0.01 * total + 1e-6

    book = openpyxl.load_workbook(io.BytesIO(await store.get_bytes(final["report_object"])), read_only=True)
    assert book.sheetnames == ["Summary", "Labels", "Findings", "Preview"]
    labels = list(book["Labels"].iter_rows(values_only=True))
    # The default bundle types its findings: one row per label, counts adding up to the findings.
    named = {row[0]: row[1] for row in labels[1:]}
    assert set(named.values()) <= {"hypodense lesion", "hyperdense lesion", "lung nodule"}
    assert sum(row[2] for row in labels[1:]) == result["summary"]["lesions_count"]
    # The model that ran is named with its version and weights, in the result, event and report.
    model = result["model"]
    assert model["name"] == final["model_name"] == "medical_segmentation_v1"
    assert len(model["weights_sha256"]) == 64 and final["model_sha256"] == model["weights_sha256"]
    # The weights fast_debug runs for this scan: the phantom is a small patient (~129 mm across), so
    # its setup for small patients, which runs the bundle's network (adults get a network of its own).
    spec = BundleSpec.load(DEFAULT_BUNDLE)
    rule = spec.size_rules["fast_debug"]
    assert 0 < effective_diameter_mm(phantom.image, phantom.affine, rule.body_above) < rule.below_mm
    assert model["weights_sha256"] == spec.weights_of("fast_debug@small").sha256 == spec.weights.sha256
    # The setup is chosen once the scan is read: `accepted` names the profile's own network, every
    # event from `running` on the weights that run.
    accepted, *later = job_events.by_job[job]
    assert accepted["model_sha256"] == spec.weights_of("fast_debug").sha256 != spec.weights.sha256
    assert {e["model_sha256"] for e in later} == {model["weights_sha256"]}
    summary_rows = dict(r[:2] for r in book["Summary"].iter_rows(values_only=True))
    assert summary_rows["Model weights (sha256)"] == model["weights_sha256"]
    # The preview is a PNG beside the outputs, listed in the result and the event.
    assert final["preview_object"] == result["outputs"]["preview"] == f"results/analysis_{job}.preview.png"
    assert (await store.get_bytes(final["preview_object"])).startswith(b"\x89PNG")
    rows = list(book["Findings"].iter_rows(values_only=True))
    assert rows[0][0] == "ID" and "Volume (mm³)" in rows[0]
    assert [r[0] for r in rows[1:]] == [f["id"] for f in result["findings"]]
    volume_col = rows[0].index("Volume (mm³)")
    assert [r[volume_col] for r in rows[1:]] == [f["volume"] for f in result["findings"]]

    # The backend heard about it, with the seed's payload.
    payload = await backend.wait_for_call(job)
    _, headers, _ = next(c for c in backend.calls if c[0] == job)
    # The callback carries a JWT signed with the shared secret, for this service's audience.
    scheme, token = headers["Authorization"].split(" ", 1)
    claims = verify_token(token, [SECRET])
    assert scheme == "Bearer" and claims["job_uuid"] == job and claims["exp"] > claims["iat"]
    assert payload["status"] == "completed"
    assert payload["output_object"] == final["output_object"]
    assert payload["file_size"] == final["file_size"] and payload["file_name"] == final["file_name"]
    assert payload["results_object"] == final["results_object"]


@pytest.mark.parametrize("cache", [True, False], ids=["result-cache", "no-cache"])
async def test_redelivered_job_finds_or_overwrites_its_own_outputs(
    stack: LocalStack, store: ObjectStore, producer, phantom: Phantom, cache: bool
) -> None:
    """A member runs a job but its commit never reaches the broker (as when the process dies
    between the final event and the commit); the group's next member gets the same record. With
    the result cache it finds the job's finished outputs and completes at once (`cached: true`);
    without, it runs the job again and overwrites the same objects."""
    settings = isolated_settings(stack, f"redeliver-{job_id()[:8]}", ml_result_cache=cache)
    await ensure_topics(settings)
    topic = settings.kafka_jobs_topic
    job, key = await fresh_scan(store, phantom)
    async with event_log(settings, settings.kafka_job_events_topic) as events:
        first = await start_service(settings)
        try:

            async def commit_lost(*args: object, **kwargs: object) -> None:
                raise CommitFailedError("the commit was lost")

            first.consumer.commit = commit_lost  # type: ignore[method-assign]
            sent = await send_json(producer, topic, {"job_uuid": job, "input_object": key}, key=job)
            first_final = await events.final(job)
        finally:
            await first.stop()
        assert await committed_offset(settings, topic, sent.partition, sent.offset + 1, timeout=0) is None
        first_result = orjson.loads(await store.get_bytes(first_final["results_object"]))

        second = await start_service(settings)
        try:
            second_final = await events.wait_for(
                lambda e: e.get("job_uuid") == job and e["status"] == "completed" and e is not first_final
            )
            committed = await committed_offset(settings, topic, sent.partition, sent.offset + 1)
        finally:
            await second.stop()

    assert committed == sent.offset + 1
    statuses = [e["status"] for e in events.by_job[job]]
    assert statuses.count("accepted") == 2 and statuses.count("completed") == 2, statuses
    outputs = ("output_object", "results_object", "report_object", "preview_object")
    assert [second_final[name] for name in outputs] == [first_final[name] for name in outputs]
    assert first_final["cached"] is False and second_final["cached"] is cache
    second_result = orjson.loads(await store.get_bytes(second_final["results_object"]))
    if cache:
        # Found in place: nothing was run or written again.
        assert second_result == first_result
        assert (second_final["file_size"], second_final["summary"]) == (
            first_final["file_size"],
            first_final["summary"],
        )
        assert "running" not in [e["status"] for e in events.by_job[job]][2:]
    else:
        # The same keys, written again: the result JSON is the second run's.
        assert second_result["created_at"] > first_result["created_at"]
    # Nothing else was added.
    written = {obj.object_name for obj in store.client.list_objects(store.bucket, prefix=f"results/analysis_{job}")}
    assert written == {first_final[name] for name in outputs}


async def test_minio_upload_event_starts_a_job(
    service: Service, store: ObjectStore, producer, job_events: EventLog, phantom: Phantom, phantom_file: Path
) -> None:
    settings = service.settings
    key = f"uploads/{job_id()}/CT scan+1.nii.gz"  # a space and a '+' exercise MinIO's key encoding
    await store.put_file(key, phantom_file, "application/gzip")
    info = await store.stat(key)
    etag = (info.etag or "").strip('"')
    event = minio_event(settings.minio_bucket, key, size=info.size, etag=etag)
    assert event["Records"][0]["s3"]["object"]["key"] != key  # it travels URL-encoded
    await send_json(producer, settings.kafka_minio_events_topic, event, key=event["Key"])

    job = upload_job_id(settings.minio_bucket, key, etag)
    final = await job_events.final(job)
    assert final["status"] == "completed", final
    assert final["source"] == "minio"
    assert final["input_object"] == key
    assert final["profile"] == settings.ml_default_profile.value
    assert final["threshold"] == settings.ml_decision_threshold
    result = orjson.loads(await store.get_bytes(final["results_object"]))
    assert result["summary"]["lesions_count"] == phantom.lesion_count


async def test_minio_events_that_are_not_uploads_start_nothing(
    service: Service, store: ObjectStore, producer, job_events: EventLog, phantom_file: Path
) -> None:
    settings = service.settings
    topic = settings.kafka_minio_events_topic
    bucket = settings.minio_bucket
    skipped_before = {
        reason: service.metrics.skipped_events.labels(reason)._value.get()
        for reason in ("outside_uploads", "other_bucket", "not_object_created")
    }
    ignored = [
        minio_event(bucket, f"other/{job_id()}.nii.gz", size=10, etag="a" * 32),
        minio_event("another-bucket", f"uploads/{job_id()}.nii.gz", size=10, etag="b" * 32),
        minio_event(bucket, f"uploads/{job_id()}.nii.gz", size=0, etag="", event_name="s3:ObjectRemoved:Delete"),
        minio_event(
            bucket, f"uploads/{job_id()}.nii.gz", size=10, etag="c" * 32, event_name="s3:ObjectCreated:PutTagging"
        ),
    ]
    for event in ignored:
        await send_json(producer, topic, event, key=event["Key"], partition=0)
    # A real upload after them on the same partition: once it is done, the others were seen.
    key = f"uploads/{job_id()}/scan.nii.gz"
    await store.put_file(key, phantom_file, "application/gzip")
    info = await store.stat(key)
    event = minio_event(bucket, key, size=info.size, etag=(info.etag or "").strip('"'))
    await send_json(producer, topic, event, key=event["Key"], partition=0)
    await job_events.final(upload_job_id(bucket, key, (info.etag or "").strip('"')))

    for skipped in ignored:
        record = skipped["Records"][0]
        skipped_key = unquote_plus(record["s3"]["object"]["key"])
        derived = upload_job_id(record["s3"]["bucket"]["name"], skipped_key, record["s3"]["object"].get("eTag"))
        assert derived not in job_events.by_job
    after = {reason: service.metrics.skipped_events.labels(reason)._value.get() for reason in skipped_before}
    assert after["outside_uploads"] - skipped_before["outside_uploads"] == 1
    assert after["other_bucket"] - skipped_before["other_bucket"] == 1
    assert after["not_object_created"] - skipped_before["not_object_created"] == 2


async def test_malformed_message_goes_to_dlq_and_partition_moves_on(
    service: Service, store: ObjectStore, producer, job_events: EventLog, dead_letters: EventLog, phantom_file: Path
) -> None:
    topic = service.settings.kafka_jobs_topic
    bad = [
        b"this is not json",
        orjson.dumps({"job_uuid": "../../etc", "input_object": "uploads/x.nii.gz"}),
        orjson.dumps({"job_uuid": job_id(), "input_object": "/abs/key.nii.gz"}),
        orjson.dumps({"job_uuid": job_id(), "input_object": "uploads/x.nii.gz", "profile": "turbo"}),
        orjson.dumps({"job_uuid": job_id()}),
    ]
    sent = [await send_json(producer, topic, value, partition=1) for value in bad]
    job, key = await upload_input(store, phantom_file, "scan.nii.gz", "application/gzip")
    good = await send_json(producer, topic, {"job_uuid": job, "input_object": key}, key=job, partition=1)

    assert (await job_events.final(job))["status"] == "completed"
    for metadata, value in zip(sent, bad, strict=True):
        letter = await dead_letters.wait_for(
            lambda d, m=metadata: (
                d["origin"]["partition"] == 1 and d["origin"]["offset"] == m.offset and d["origin"]["topic"] == topic
            )
        )
        assert base64.b64decode(letter["payload_base64"]) == value
        assert letter["payload_size"] == len(value) and not letter["payload_truncated"]
        assert letter["error"]["code"] in {"invalid_json", "invalid_message"}
        assert letter["error"]["message"]
    first = await dead_letters.wait_for(
        lambda d: d["origin"]["offset"] == sent[0].offset and d["origin"]["partition"] == 1
    )
    assert first["error"]["code"] == "invalid_json"
    profile_letter = await dead_letters.wait_for(
        lambda d: d["origin"]["offset"] == sent[3].offset and d["origin"]["partition"] == 1
    )
    assert any(detail["loc"] == ["profile"] for detail in profile_letter["details"])

    # Committed past the good message: nothing on that partition is left behind.
    assert await committed_offset(service.settings, topic, 1, good.offset + 1) == good.offset + 1


async def test_bytes_that_are_not_an_image_fail_with_a_code(
    service: Service, store: ObjectStore, producer, job_events: EventLog, http, backend: Backend
) -> None:
    cases = {
        "garbage.nii.gz": (b"\x00\x01 definitely not an image " * 100, "unsupported_format"),
        "truncated.nii.gz": (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + b"\x01" * 50, "invalid_gzip"),
        "empty.nii.gz": (b"", "input_empty"),
    }
    for name, (data, code) in cases.items():
        job = job_id()
        key = f"uploads/{job}/{name}"
        await store.put_bytes(key, data, "application/gzip")
        await send_json(producer, service.settings.kafka_jobs_topic, {"job_uuid": job, "input_object": key}, key=job)
        final = await job_events.final(job)
        assert final["status"] == "failed", final
        assert final["error"]["code"] == code, final
        assert final["error"]["retryable"] is False
        assert (await backend.wait_for_call(job))["error"]["code"] == code
    health = await http.get("/health")
    assert health.status == 200 and (await health.json())["model_loaded"] is True


async def test_missing_input_object_fails_as_not_found(service: Service, producer, job_events: EventLog) -> None:
    job = job_id()
    await send_json(
        producer, service.settings.kafka_jobs_topic, {"job_uuid": job, "input_object": "uploads/nope.nii.gz"}, key=job
    )
    final = await job_events.final(job)
    assert final["status"] == "failed" and final["error"]["code"] == "input_not_found"


async def test_backend_down_does_not_fail_the_job(
    service: Service, store: ObjectStore, producer, job_events: EventLog, phantom_file: Path, backend: Backend
) -> None:
    await backend.stop()
    try:
        job, key = await upload_input(store, phantom_file, "scan.nii.gz", "application/gzip")
        failed_before = service.notifier.failed
        await send_json(producer, service.settings.kafka_jobs_topic, {"job_uuid": job, "input_object": key}, key=job)
        final = await job_events.final(job)
        assert final["status"] == "completed"
        await eventually(lambda: service.notifier.failed > failed_before, what="the callback giving up")
        assert backend.calls_for(job) == []
    finally:
        await backend.start()


async def test_research_job_writes_uncertainty_and_stays_visibly_alive(
    service: Service, store: ObjectStore, producer, job_events: EventLog, phantom: Phantom, phantom_file: Path
) -> None:
    """Research: test-time flips give an uncertainty map and per-finding uncertainty; progress
    events come during inference, never closer together than the reporter's interval."""
    job, key = await upload_input(store, phantom_file, "scan.nii.gz", "application/gzip")
    message = {"job_uuid": job, "input_object": key, "profile": "research"}
    await send_json(producer, service.settings.kafka_jobs_topic, message, key=job)
    final = await job_events.final(job, timeout=240)
    assert final["status"] == "completed", final
    result = orjson.loads(await store.get_bytes(final["results_object"]))
    assert final["uncertainty_object"] == result["outputs"]["uncertainty"]
    uncertainty = load_nifti(await store.get_bytes(final["uncertainty_object"]))
    assert uncertainty.shape == phantom.image.shape
    np.testing.assert_allclose(uncertainty.affine, phantom.affine, atol=1e-5)
    assert float(np.asarray(uncertainty.dataobj).max()) > 0.0
    assert result["findings"] and all(f["uncertainty"] is not None for f in result["findings"])
    inference = [e for e in job_events.by_job[job] if e["status"] == "progress" and e.get("step") == "infer"]
    assert inference, "no progress event while the model ran"
    shares = [e["progress"] for e in inference]
    assert shares == sorted(shares) and all(0.2 <= share <= 0.8 for share in shares)
    times = [e["timestamp"] for e in inference]
    gaps = [
        (np.datetime64(b[:26]) - np.datetime64(a[:26])) / np.timedelta64(1, "s") for a, b in itertools.pairwise(times)
    ]
    assert all(gap >= 1.9 for gap in gaps), gaps
