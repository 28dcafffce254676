"""The HTTP API against the running service."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import nibabel as nib
import numpy as np
import orjson

from consumer.service import Service
from consumer.storage import ObjectStore
from models.phantom import Phantom, save_phantom
from schemas.export import schema_path
from tests.conftest import EventLog, job_id, samples, send_json, upload_input, value


def schema(name: str) -> dict:
    return json.loads(schema_path(name).read_text())


async def test_infer_runs_the_job_synchronously(
    service: Service, store: ObjectStore, http, job_events: EventLog, phantom: Phantom, phantom_file: Path
) -> None:
    job, key = await upload_input(store, phantom_file, "scan.nii.gz", "application/gzip")
    response = await http.post(
        "/infer", json={"job_uuid": job, "input_object": key, "profile": "fast_debug", "threshold": 0.5}
    )
    assert response.status == 200, await response.text()
    body = await response.json()
    jsonschema.validate(body, schema("infer_response"))
    assert body["job_uuid"] == job
    assert body["status"] == "completed"
    assert body["output_object"] == f"results/analysis_{job}.nii.gz"
    assert body["file_size"] == len(await store.get_bytes(body["output_object"]))
    assert body["duration_seconds"] > 0
    result = orjson.loads(await store.get_bytes(body["results_object"]))
    assert result["threshold"] == 0.5
    assert result["summary"]["lesions_count"] == phantom.lesion_count
    # The same events as any other job, marked as coming from HTTP.
    final = await job_events.final(job)
    assert final["source"] == "http" and final["status"] == "completed"


async def test_infer_custom_output_object_names_all_outputs(
    service: Service, store: ObjectStore, http, phantom_file: Path
) -> None:
    job, key = await upload_input(store, phantom_file, "scan.nii.gz", "application/gzip")
    response = await http.post(
        "/infer", json={"job_uuid": job, "input_object": key, "output_object": f"results/custom/{job}/mask.nii.gz"}
    )
    body = await response.json()
    assert response.status == 200, body
    assert body["output_object"] == f"results/custom/{job}/mask.nii.gz"
    assert body["results_object"] == f"results/custom/{job}/mask.json"
    assert body["report_object"] == f"results/custom/{job}/mask.xlsx"
    for key in (body["output_object"], body["results_object"], body["report_object"]):
        assert (await store.stat(key)).size > 0


def listed(store: ObjectStore, prefix: str) -> dict[str, str | None]:
    return {o.object_name: o.etag for o in store.client.list_objects(store.bucket, prefix=prefix, recursive=True)}


async def test_outputs_outside_the_prefix_or_over_the_input_are_refused(
    service: Service, store: ObjectStore, http, job_events: EventLog, phantom_file: Path
) -> None:
    job = job_id()
    # An input (and a reference) that lie under the output prefix themselves: a job may still not overwrite them.
    scan, reference = f"results/{job}/scan.nii.gz", f"results/{job}/truth.nii.gz"
    await store.put_file(scan, phantom_file, "application/gzip")
    await store.put_file(reference, phantom_file, "application/gzip")
    await store.put_file(f"uploads/{job}/other-patient.nii.gz", phantom_file, "application/gzip")
    before = {**listed(store, f"results/{job}/"), **listed(store, f"uploads/{job}/")}
    cases = [
        {"output_object": f"uploads/{job}/other-patient.nii.gz"},  # another upload: outside the prefix
        {"output_object": f"custom/{job}/mask.nii.gz"},
        {"output_object": scan},  # its own input
        {"output_object": f"results/{job}/scan"},  # its mask key would be results/<job>/scan.nii.gz: the input
        {"output_object": f"results/{job}/truth.nii.gz", "reference_object": reference},
        {"output_object": f"results/.cache/{job}.nii.gz"},  # among the result cache's entries
    ]
    for case in cases:
        response = await http.post("/infer", json={"job_uuid": job_id(), "input_object": scan, **case})
        body = await response.json()
        assert response.status == 422, (case, body)
        assert body["error"]["code"] == "output_not_allowed", (case, body)
    # Nothing was written: the objects there are the same ones, and nothing new appeared.
    assert {**listed(store, f"results/{job}/"), **listed(store, f"uploads/{job}/")} == before
    assert listed(store, f"custom/{job}/") == {} and listed(store, f"results/.cache/{job}") == {}
    # A Kafka job is refused the same way, with a failed event.
    refused = job_id()
    await send_json(
        service.producer,
        service.settings.kafka_jobs_topic,
        {"job_uuid": refused, "input_object": scan, "output_object": f"uploads/{job}/other-patient.nii.gz"},
        key=refused,
    )
    final = await job_events.final(refused)
    assert final["status"] == "failed" and final["error"]["code"] == "output_not_allowed"
    assert listed(store, f"uploads/{job}/") == {k: v for k, v in before.items() if k.startswith("uploads/")}


async def test_infer_missing_input_is_404(service: Service, http) -> None:
    response = await http.post("/infer", json={"job_uuid": job_id(), "input_object": "uploads/does-not-exist.nii.gz"})
    assert response.status == 404
    body = await response.json()
    jsonschema.validate(body, schema("error_response"))
    assert body["error"]["code"] == "input_not_found"


async def test_infer_malformed_bodies_are_400(service: Service, http) -> None:
    cases = [
        (b"{not json", "invalid_json"),
        (b"[]", "invalid_request"),
        (orjson.dumps({"input_object": "uploads/a.nii.gz"}), "invalid_request"),
        (orjson.dumps({"job_uuid": "a b", "input_object": "uploads/a.nii.gz"}), "invalid_request"),
        (orjson.dumps({"job_uuid": job_id(), "input_object": "../secrets"}), "invalid_request"),
        (orjson.dumps({"job_uuid": job_id(), "input_object": "uploads/a.nii.gz", "threshold": 1.5}), "invalid_request"),
        (orjson.dumps({"job_uuid": job_id(), "input_object": "uploads/a.nii.gz", "treshold": 0.5}), "invalid_request"),
    ]
    for raw, code in cases:
        response = await http.post("/infer", data=raw, headers={"Content-Type": "application/json"})
        assert response.status == 400, raw
        assert (await response.json())["error"]["code"] == code, raw


async def test_infer_body_over_the_limit_is_413(service: Service, http) -> None:
    big = b'{"job_uuid": "' + b"a" * (service.settings.http_max_body_bytes + 10) + b'"}'
    response = await http.post("/infer", data=big, headers={"Content-Type": "application/json"})
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "request_too_large"


async def test_infer_unreadable_input_is_422(service: Service, store: ObjectStore, http) -> None:
    job = job_id()
    key = f"uploads/{job}/photo.nii.gz"
    await store.put_bytes(key, b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "image/png")
    response = await http.post("/infer", json={"job_uuid": job, "input_object": key})
    assert response.status == 422
    body = await response.json()
    assert body["error"]["code"] == "unsupported_format"
    assert "PNG" in body["error"]["message"]


async def test_health_reports_real_values(service: Service, http) -> None:
    response = await http.get("/health")
    assert response.status == 200
    body = await response.json()
    jsonschema.validate(body, schema("health_response"))
    assert body["status"] == "healthy"
    assert body["model_loaded"] is True
    assert body["version"] == "1.0.0"
    assert body["uptime"] > 0
    assert body["memory_usage"]["rss_mb"] > 10
    assert body["model_name"] == "medical_segmentation_v1"


async def test_metrics_count_jobs(service: Service, store: ObjectStore, http, phantom_file: Path) -> None:
    def completed(text: str) -> float:
        return value(samples(text), "ml_jobs_total", status="completed", source="http", profile="fast_debug")

    before = completed(await (await http.get("/metrics")).text())
    job, key = await upload_input(store, phantom_file, "scan.nii.gz", "application/gzip")
    assert (await http.post("/infer", json={"job_uuid": job, "input_object": key})).status == 200
    response = await http.get("/metrics")
    assert response.status == 200
    text = await response.text()
    assert completed(text) == before + 1
    assert value(samples(text), "ml_model_loaded") == 1


async def test_infer_scores_against_a_reference_mask(
    service: Service, store: ObjectStore, http, phantom: Phantom, phantom_file: Path, tmp_path: Path
) -> None:
    truth = tmp_path / "truth.nii.gz"
    save_phantom(phantom, tmp_path / "image.nii.gz", truth)
    job, key = await upload_input(store, phantom_file, "scan.nii.gz", "application/gzip")
    reference = f"uploads/{job}/truth.nii.gz"
    await store.put_file(reference, truth, "application/gzip")
    response = await http.post("/infer", json={"job_uuid": job, "input_object": key, "reference_object": reference})
    assert response.status == 200, await response.text()
    result = orjson.loads(await store.get_bytes((await response.json())["results_object"]))
    metrics = {m["name"]: m["value"] for m in result["metrics"]}
    assert set(metrics) == {
        "dice_score",
        "sensitivity",
        "specificity",
        "volume_difference",
        "hausdorff_distance",
        "hausdorff_distance_95",
        "average_surface_distance",
        "lesions_true_positive",
        "lesions_false_positive",
        "lesions_false_negative",
    }
    assert metrics["dice_score"] >= 0.7 and "reference" in result["timings"]
    # A good mask lies within a few voxels of the reference's surface everywhere.
    assert metrics["hausdorff_distance_95"] is not None and metrics["hausdorff_distance_95"] < 10.0
    assert metrics["lesions_true_positive"] >= 1

    # A reference on another grid is refused with its own code.
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), dtype=np.uint8), np.eye(4)), small)
    other = f"uploads/{job}/other.nii.gz"
    await store.put_file(other, small, "application/gzip")
    response = await http.post("/infer", json={"job_uuid": job_id(), "input_object": key, "reference_object": other})
    assert response.status == 422
    assert (await response.json())["error"]["code"] == "reference_mismatch"


async def test_unknown_route_is_json_404(service: Service, http) -> None:
    response = await http.get("/nope")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "invalid_request"
