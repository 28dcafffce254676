"""The benchmark's own code: the plain MONAI script gives the bundle's known answer with the
service's settings, the tables compute their ratios, the GPU check refuses a machine without CUDA.
Nothing here measures or compares a time."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bench import gpu, plain_monai
from bench.replica import ReplicaConfig
from bench.report import Burst, PlainRun, ServiceJob, comparison_table, markdown, profile_table, split_table
from models.bundle import BundleSpec
from models.engine import EngineOptions, InferenceEngine
from schemas.jobs import Profile
from tests.bundle_factory import expected_labels, flipped_affine, intensity_volume, write_intensity_bundle


def test_the_plain_script_runs_the_bundle_with_the_services_settings(tmp_path: Path) -> None:
    bundle = write_intensity_bundle(tmp_path)
    volume = intensity_volume()
    nib.save(nib.Nifti1Image(volume, flipped_affine()), tmp_path / "scan.nii.gz")
    overrides, tta = plain_monai.plain_overrides(bundle, Profile.RESEARCH, 0.5, tmp_path / "out")
    engine = InferenceEngine(BundleSpec.load(bundle), EngineOptions(device="cpu", precision="fp32"))
    assert (
        tta and overrides["inferer#overlap"] == engine.profile_run(Profile.RESEARCH, 0.5).overrides["inferer#overlap"]
    )
    run = plain_monai.setup(bundle, Profile.PRODUCTION, 0.5, tmp_path / "out")
    times = plain_monai.process(run, tmp_path / "scan.nii.gz")
    assert set(plain_monai.STAGES) <= set(times) and times["total"] > 0
    written = next((tmp_path / "out").rglob("*_seg.nii.gz"))
    mask = np.asarray(nib.load(written).dataobj).reshape(volume.shape)
    assert np.array_equal(mask.astype(np.uint8), expected_labels(volume))


def test_the_plain_script_fits_windows_and_shifts_the_scan_as_the_service_does(tmp_path: Path) -> None:
    bundle = write_intensity_bundle(tmp_path)
    fit = {"multiple": 8, "max_voxels": 40 * 40 * 24}
    profiles = {"fast_debug": {"fit_windows": fit, "shifts": [[3, 2, 1]]}}
    (bundle / "configs" / "profiles.json").write_text(json.dumps(profiles))
    volume = intensity_volume()
    nib.save(nib.Nifti1Image(volume, flipped_affine()), tmp_path / "scan.nii.gz")
    run = plain_monai.setup(bundle, Profile.FAST_DEBUG, 0.5, tmp_path / "out")
    assert run.fit is not None and run.shifts == ((0, 0, 0), (3, 2, 1))
    plain_monai.process(run, tmp_path / "scan.nii.gz")
    written = next((tmp_path / "out").rglob("*_seg.nii.gz"))
    mask = np.asarray(nib.load(written).dataobj).reshape(volume.shape)
    assert np.array_equal(mask.astype(np.uint8), expected_labels(volume))


def _job(replica: str, profile: str, wall: float, dice: float = 0.9) -> ServiceJob:
    steps = {"fetch": 0.1, "read": 0.2, "infer": wall - 1.0, "analyse": 0.3}
    engine = {"preprocess": 0.5, "network": wall - 2.0, "postprocess": 0.4}
    return ServiceJob(replica, "256x256x128", profile, wall, steps, engine, 2**30, 2**29, 1, dice, 0.9999)


def test_tables_give_the_ratio_to_the_plain_script_and_the_write_step() -> None:
    jobs = [_job("fp32", "production", 4.0), _job("auto", "production", 2.0)]
    plains = [PlainRun("256x256x128", "production", {"read": 1.0, "network": 7.0, "total": 8.0})]
    table = comparison_table(jobs, plains, ["fp32", "auto"])
    assert "| 256x256x128 | production |" in table and "0.50" in table and "0.25" in table
    assert jobs[0].write == pytest.approx(0.4)  # the wall time the result JSON's steps leave over
    assert "plain MONAI" in split_table(jobs, plains, ["fp32", "auto"])


def test_the_profile_table_gives_fast_debugs_speed_up_over_production() -> None:
    jobs = [
        _job("auto", "production", 8.0, 0.9),
        _job("auto", "fast_debug", 2.0, 0.85),
        _job("fp32", "production", 9.0),
    ]
    table = profile_table(jobs, ["fp32", "auto"])
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()[2:]]
    assert rows == [["auto", "256x256x128", "8.00", "2.00", "4.00", "0.90", "0.85"]]  # no fp32 fast_debug: no row


def test_a_burst_is_measured_against_the_inference_time_of_one_job() -> None:
    burst = Burst(
        "auto", "fast_debug", jobs=20, partitions=4, slots=2, elapsed=100.0, infer_alone=4.5, engine_in_burst=[4.6] * 20
    )
    assert burst.per_minute == pytest.approx(12.0)
    assert burst.ratio == pytest.approx(12.0 / (60.0 / 4.5))
    assert burst.engine_busy == pytest.approx(0.92)
    assert markdown(["a", "b"], [[1.234, None]]).splitlines()[-1] == "| 1.23 | - |"


def test_replicas_get_their_own_topic_group_and_precision(tmp_path: Path) -> None:
    class Stack:
        bootstrap, s3_endpoint = "127.0.0.1:1", "127.0.0.1:2"

    env = ReplicaConfig("fp32", precision="fp32", max_concurrent_jobs=3).environment(Stack(), 8081, tmp_path)  # type: ignore[arg-type]
    assert env["KAFKA_JOBS_TOPIC"] == "bench.jobs.fp32" and env["KAFKA_GROUP_ID"] == "bench-fp32"
    assert env["ML_PRECISION"] == "fp32" and env["ML_MAX_CONCURRENT_JOBS"] == "3" and env["HTTP_PORT"] == "8081"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_gpu_check_refuses_a_machine_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu.main(["--device", "cuda"]) == gpu.NO_CUDA_EXIT
    assert "no CUDA device" in capsys.readouterr().out


def test_the_gpu_check_runs_on_the_cpu_as_a_dry_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_intensity_bundle(tmp_path / "bundles")
    monkeypatch.setenv("MODEL_PATH", str(tmp_path / "bundles"))
    monkeypatch.setenv("MODEL_NAME", "intensity_labels")
    monkeypatch.setenv("ML_MODEL_ROUTES", "")
    monkeypatch.setenv("ML_EXPORT_CACHE", str(tmp_path / "exports"))
    assert gpu.main(["--device", "cpu", "--quick", "--json", str(tmp_path / "gpu.json")]) == 0
    record = json.loads((tmp_path / "gpu.json").read_text())
    assert [run["bundle"] for run in record["runs"]] == ["intensity_labels"]
    assert record["runs"][0]["peak_memory_mb"] is None  # no GPU memory on the CPU
