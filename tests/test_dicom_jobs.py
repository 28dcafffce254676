"""DICOM input through the real job path: a ZIP series to mask + SEG, and hostile input refused."""

from __future__ import annotations

import asyncio
import io
import json
import os
import zipfile
from pathlib import Path

import highdicom as hd
import jsonschema
import numpy as np
import openpyxl
import psutil
import pydicom
import pytest
from pydicom.data import get_testdata_file

from consumer.service import Service
from consumer.storage import ObjectStore
from models.dicom_export import SeriesOptions, series_datasets, zip_series
from models.evaluate import dice
from models.phantom import Phantom
from schemas.export import schema_path
from tests.conftest import MAX_INPUT_BYTES, EventLog, job_id, send_json, upload_input
from tests.test_archives import zip_bomb
from tests.test_job_flow import load_nifti


@pytest.fixture(scope="module")
def phantom_zip(phantom: Phantom, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[pydicom.Dataset]]:
    datasets = series_datasets(phantom.image, phantom.affine, SeriesOptions(description="abdomen"))
    path = tmp_path_factory.mktemp("dicom") / "export.zip"
    return zip_series(datasets, path, folder="STUDY/SERIES/", seed=3), datasets


async def test_zip_series_job_writes_mask_and_seg(
    service: Service,
    store: ObjectStore,
    producer,
    job_events: EventLog,
    phantom: Phantom,
    phantom_zip: tuple[Path, list[pydicom.Dataset]],
) -> None:
    path, datasets = phantom_zip
    job, key = await upload_input(store, path, "export.zip", "application/zip")
    await send_json(producer, service.settings.kafka_jobs_topic, {"job_uuid": job, "input_object": key}, key=job)
    final = await job_events.final(job)
    assert final["status"] == "completed", final
    jsonschema.validate(final, json.loads(schema_path("job_event").read_text()))
    assert final["seg_object"] == f"results/analysis_{job}.seg.dcm"

    result = json.loads(await store.get_bytes(final["results_object"]))
    jsonschema.validate(result, json.loads(schema_path("analysis_result").read_text()))
    assert result["input"]["format"] == "zip"
    series = result["input"]["series"]
    assert series["chosen"]["series_instance_uid"] == datasets[0].SeriesInstanceUID
    assert series["chosen"]["description"] == "abdomen" and series["slices"] == phantom.image.shape[2]
    assert result["outputs"]["dicom_seg"] == final["seg_object"] == result["segmentation"]["dicom_seg"]

    # The mask lies in the series' patient space: it overlays the phantom's own NIfTI.
    mask = load_nifti(await store.get_bytes(final["output_object"]))
    np.testing.assert_allclose(mask.affine, phantom.affine, atol=1e-4)
    assert dice(np.asarray(mask.dataobj) > 0, phantom.lesion_mask) >= 0.7

    report = openpyxl.load_workbook(io.BytesIO(await store.get_bytes(final["report_object"])))
    fields = {row[0]: row[1] for row in report["Summary"].iter_rows(values_only=True)}
    assert fields["Series analysed"] == datasets[0].SeriesInstanceUID
    assert fields["DICOM SEG object"] == final["seg_object"]

    seg = hd.seg.segread(io.BytesIO(await store.get_bytes(final["seg_object"])))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == datasets[0].SeriesInstanceUID
    assert seg.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    assert 0 < seg.NumberOfFrames <= len(datasets)


def pydicom_file(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def _missing_slice_zip(datasets: list[pydicom.Dataset], target: Path) -> bytes:
    zip_series([ds for k, ds in enumerate(datasets) if k != 20], target)
    return target.read_bytes()


async def test_hostile_inputs_fail_with_their_codes_and_leave_nothing(
    service: Service,
    store: ObjectStore,
    producer,
    job_events: EventLog,
    http,
    phantom_zip: tuple[Path, list[pydicom.Dataset]],
    tmp_path: Path,
) -> None:
    _, datasets = phantom_zip
    clean = io.BytesIO()
    with zipfile.ZipFile(clean, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", pydicom_file("CT_small.dcm"))
    cases: dict[str, tuple[bytes, str, dict[str, str]]] = {
        "bomb.zip": (zip_bomb(tmp_path / "bomb.zip", 512).read_bytes(), "archive_ratio_exceeded", {}),
        "truncated.zip": (clean.getvalue()[:-40], "invalid_archive", {}),
        "gap.zip": (_missing_slice_zip(datasets, tmp_path / "gap.zip"), "dicom_missing_slices", {}),
        "report.dcm": (pydicom_file("reportsi.dcm"), "dicom_no_pixel_data", {}),
        "colour.dcm": (pydicom_file("examples_rgb_color.dcm"), "dicom_color_not_supported", {}),
        "picture.dcm": (b"\x89PNG\r\n\x1a\n" + os.urandom(500), "unsupported_format", {}),
        "noise.bin": (os.urandom(4096), "unsupported_format", {}),
        "empty.dcm": (b"", "input_empty", {}),
        "cut.nii.gz": (b"\x1f\x8b\x08\x00" + os.urandom(64), "invalid_gzip", {}),
        "other.zip": (clean.getvalue(), "series_not_found", {"series_uid": "1.2.3.4.5"}),
        "huge.bin": (b"\x00" * (MAX_INPUT_BYTES + 1), "input_too_large", {}),
    }
    rss_before = psutil.Process().memory_info().rss
    jobs: dict[str, str] = {}
    for name, (content, _, extra) in cases.items():
        job = job_id()
        key = f"uploads/{job}/{name}"
        await store.put_bytes(key, content, "application/octet-stream")
        await send_json(
            producer, service.settings.kafka_jobs_topic, {"job_uuid": job, "input_object": key, **extra}, key=job
        )
        jobs[name] = job
    finals = await asyncio.gather(*(job_events.final(job) for job in jobs.values()))
    for (name, (_, code, _)), final in zip(cases.items(), finals, strict=True):
        assert final["status"] == "failed", (name, final)
        assert final["error"]["code"] == code, (name, final["error"])
    # The service is unharmed, its work directory is empty, and the bomb never sat in memory.
    response = await http.get("/health")
    assert (await response.json())["status"] == "healthy"
    workdir = service.settings.ml_workdir
    assert workdir is not None and [p.parent for p in workdir.iterdir()] == [workdir]
    assert service.workspace.job_dirs() == [] and list(service.workspace.dir.iterdir()) == [
        service.workspace.dir / ".lock"
    ]
    assert psutil.Process().memory_info().rss - rss_before < 300 * 2**20


async def test_infer_accepts_series_uid(
    service: Service, store: ObjectStore, http, phantom_zip: tuple[Path, list[pydicom.Dataset]]
) -> None:
    path, datasets = phantom_zip
    job, key = await upload_input(store, path, "export.zip", "application/zip")
    body = {"job_uuid": job, "input_object": key, "series_uid": datasets[0].SeriesInstanceUID}
    response = await http.post("/infer", json=body)
    assert response.status == 200, await response.text()
    answer = await response.json()
    assert answer["seg_object"] == f"results/analysis_{job}.seg.dcm"
    result = json.loads(await store.get_bytes(answer["results_object"]))
    assert result["input"]["series"]["reason"] == "named by the job (series_uid)"
    bad = await http.post("/infer", json={**body, "job_uuid": job_id(), "series_uid": "not-a-uid"})
    assert bad.status == 400
