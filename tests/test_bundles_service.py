"""Model Zoo bundles through the real job path: Kafka, S3, /infer, several bundles at once.

A service of its own hosts bundles written by the tests, whose right answers are known exactly;
the session's service hosts the two default bundles (CT lesions and MR brain extraction).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import nibabel as nib
import numpy as np
import orjson
import pytest

from consumer.auth import issue_token
from consumer.dev.localstack import LocalStack
from consumer.service import Service
from consumer.settings import Settings
from consumer.storage import ObjectStore
from consumer.transport.clients import ensure_topics
from models.mr_reference import dice, load_template, reference_brain, voxel_volume_ml
from tests.bundle_factory import expected_labels, flipped_affine, intensity_volume, write_intensity_bundle
from tests.conftest import (
    SECRET,
    EventLog,
    event_log,
    isolated_settings,
    job_id,
    send_json,
    start_service,
    upload_input,
)

# The second test bundle answers the opposite way: its network negates the logits.
NEGATED = "intensity_negated"


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundles")
    write_intensity_bundle(root, "intensity_labels", modality="CT")
    path = write_intensity_bundle(root, NEGATED, modality="MR")
    code = path / "scripts" / "network.py"
    code.write_text(code.read_text().replace("return self.conv(x)", "return -self.conv(x)"))
    return root


@pytest.fixture(scope="module")
def volume_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("volume") / "blocks.nii.gz"
    nib.save(nib.Nifti1Image(intensity_volume(), flipped_affine()), path)
    return path


@pytest.fixture(scope="module")
async def bundle_service(stack: LocalStack, store: ObjectStore, bundle_root: Path) -> AsyncIterator[Service]:
    settings = isolated_settings(
        stack,
        f"bundles-{job_id()[:8]}",
        model_path=bundle_root,
        model_name=f"intensity_labels,{NEGATED}",
        ml_model_routes=f"MR:{NEGATED}",
        ml_max_loaded_models=1,
        ml_allow_insecure=True,
        ml_runtime="torch",
    )
    await ensure_topics(settings)
    service = await start_service(settings)
    yield service
    await service.stop()


@pytest.fixture(scope="module")
async def bundle_events(bundle_service: Service) -> AsyncIterator[EventLog]:
    async with event_log(bundle_service.settings, bundle_service.settings.kafka_job_events_topic) as log:
        yield log


async def _mask(store: ObjectStore, key: str) -> np.ndarray:
    image = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(await store.get_bytes(key)))
    return np.asarray(image.dataobj)


async def test_a_model_zoo_bundle_gives_its_known_answer_through_kafka(
    bundle_service: Service, bundle_events: EventLog, store: ObjectStore, producer, volume_file: Path
) -> None:
    settings = bundle_service.settings
    job, key = await upload_input(store, volume_file, "blocks.nii.gz", "application/gzip")
    await send_json(producer, settings.kafka_jobs_topic, {"job_uuid": job, "input_object": key}, key=job)
    final = await bundle_events.final(job)
    assert final["status"] == "completed", final
    assert final["model_name"] == "intensity_labels" and final["model_version"] == "0.1.0"
    mask = await _mask(store, final["output_object"])
    assert np.array_equal(mask, expected_labels(intensity_volume()))
    result = orjson.loads(await store.get_bytes(final["results_object"]))
    assert result["segmentation"]["labels"] == {"0": "background", "1": "soft", "2": "dense"}
    assert {f["type"] for f in result["findings"]} == {"soft", "dense"}
    volumes = {v["name"]: v for v in result["summary"]["volumes"]}
    voxel_mm3 = 8.0
    assert volumes["dense"]["volume"] == pytest.approx(float((mask == 2).sum()) * voxel_mm3)


async def test_unknown_model_fails_with_model_not_found(
    bundle_service: Service, bundle_events: EventLog, store: ObjectStore, producer, volume_file: Path
) -> None:
    settings = bundle_service.settings
    job, key = await upload_input(store, volume_file, "blocks.nii.gz", "application/gzip")
    message = {"job_uuid": job, "input_object": key, "model": "no_such_model"}
    await send_json(producer, settings.kafka_jobs_topic, message, key=job)
    final = await bundle_events.final(job)
    assert final["status"] == "failed" and final["error"]["code"] == "model_not_found"
    assert "intensity_labels" in final["error"]["message"]
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{settings.http_port}") as http:
        response = await http.post("/infer", json={"job_uuid": job_id(), "input_object": key, "model": "nope"})
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "model_not_found"


async def test_one_loaded_model_serves_jobs_alternating_between_two(
    bundle_service: Service, bundle_events: EventLog, store: ObjectStore, producer, volume_file: Path
) -> None:
    """ML_MAX_LOADED_MODELS=1: each job for the other model unloads one and loads the other."""
    settings = bundle_service.settings
    expected = expected_labels(intensity_volume())
    jobs = []
    for model in ["intensity_labels", NEGATED, "intensity_labels", NEGATED]:
        job, key = await upload_input(store, volume_file, "blocks.nii.gz", "application/gzip")
        # One partition key for all: they run in this order, so the models really alternate.
        await send_json(
            producer, settings.kafka_jobs_topic, {"job_uuid": job, "input_object": key, "model": model}, key="alternate"
        )
        jobs.append((job, model))
    for job, model in jobs:
        final = await bundle_events.final(job)
        assert final["status"] == "completed" and final["model_name"] == model, final
        mask = await _mask(store, final["output_object"])
        assert np.array_equal(mask, expected) == (model == "intensity_labels")
    loaded = [card.name for card in bundle_service.models.cards() if card.loaded]
    assert loaded == [NEGATED]


async def test_health_lists_every_hosted_model(bundle_service: Service) -> None:
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{bundle_service.settings.http_port}") as http:
        body = await (await http.get("/health")).json()
    models = {m["name"]: m for m in body["models"]}
    assert list(models) == ["intensity_labels", NEGATED]
    assert models["intensity_labels"]["default"] and not models[NEGATED]["default"]
    assert models["intensity_labels"]["labels"] == {"0": "background", "1": "soft", "2": "dense"}
    assert all(len(m["weights_sha256"]) == 64 for m in models.values())


async def test_both_default_bundles_through_kafka_and_infer_interleaved(
    service: Service, job_events: EventLog, store: ObjectStore, producer, phantom_file: Path, tmp_path: Path
) -> None:
    """A CT job on Kafka and an MR brain job on /infer at once; the brain is measured on MNI152."""
    template = load_template()
    template_file = tmp_path / "mni152.nii.gz"
    nib.save(template, template_file)
    ct_job, ct_key = await upload_input(store, phantom_file, "ct.nii.gz", "application/gzip")
    mr_job, mr_key = await upload_input(store, template_file, "t1.nii.gz", "application/gzip")
    headers = {"Authorization": f"Bearer {issue_token(SECRET, ttl_s=3600)}"}
    async with aiohttp.ClientSession(
        base_url=f"http://127.0.0.1:{service.settings.http_port}", headers=headers
    ) as http:
        await send_json(
            producer, service.settings.kafka_jobs_topic, {"job_uuid": ct_job, "input_object": ct_key}, key=ct_job
        )
        body = {"job_uuid": mr_job, "input_object": mr_key, "model": "mr_brain_extraction", "profile": "production"}
        response, ct_final = await asyncio.gather(http.post("/infer", json=body), job_events.final(ct_job, timeout=240))
        assert response.status == 200, await response.text()
        answer = await response.json()
    assert ct_final["status"] == "completed" and ct_final["model_name"] == "medical_segmentation_v1"
    result = orjson.loads(await store.get_bytes(answer["results_object"]))
    assert result["model"]["name"] == "mr_brain_extraction"
    brain = (await _mask(store, answer["output_object"])) == 1
    reference = reference_brain(template)
    reference_ml = float(reference.sum()) * voxel_volume_ml(template)
    volume_ml = {v["name"]: v["volume_ml"] for v in result["summary"]["volumes"]}["brain"]
    assert dice(brain, reference) >= 0.95
    assert abs(volume_ml - reference_ml) <= 0.05 * reference_ml


def test_a_broken_bundle_stops_the_service_with_one_line(tmp_path: Path, settings: Settings) -> None:
    path = write_intensity_bundle(tmp_path, "broken")
    (path / "configs" / "inference.json").write_text('{"network_def": ')
    env = {
        **os.environ,
        "MODEL_PATH": str(tmp_path),
        "MODEL_NAME": "broken",
        "ML_ALLOW_INSECURE": "1",
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "MINIO_ENDPOINT": settings.minio_endpoint,
        "HTTP_PORT": "0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "consumer", "serve"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[-1]] and "bundle broken: configs/inference.json does not parse" in errors[-1]
