"""Message models and their exported JSON Schema files."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from schemas.export import MODELS, render, schema_path
from schemas.jobs import JobRequest


@pytest.mark.parametrize("name", sorted(MODELS))
def test_schema_file_matches_model(name: str) -> None:
    path = schema_path(name)
    assert path.exists(), f"{path} missing: run `python -m schemas export`"
    assert json.loads(path.read_text()) == json.loads(render(MODELS[name])), (
        f"{path} drifted: run `python -m schemas export`"
    )


@pytest.mark.parametrize(
    "job_uuid",
    ["550e8400-e29b-41d4-a716-446655440000", "scan_2024.01-a", "A" * 128],
)
def test_job_ids_accepted(job_uuid: str) -> None:
    assert JobRequest(job_uuid=job_uuid, input_object="uploads/a.nii.gz").job_uuid == job_uuid


@pytest.mark.parametrize("job_uuid", ["", "a/b", "..", "a b", "A" * 129, "x\n", "ü"])
def test_job_ids_refused(job_uuid: str) -> None:
    with pytest.raises(ValidationError):
        JobRequest(job_uuid=job_uuid, input_object="uploads/a.nii.gz")


@pytest.mark.parametrize("key", ["/etc/passwd", "uploads/../x", "..", "a\x00b", "a\nb", ""])
def test_unsafe_object_keys_refused(key: str) -> None:
    with pytest.raises(ValidationError):
        JobRequest(job_uuid="job1", input_object=key)
    with pytest.raises(ValidationError):
        JobRequest(job_uuid="job1", input_object="uploads/a.nii.gz", output_object=key)


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.1, 2])
def test_threshold_is_open_interval(threshold: float) -> None:
    with pytest.raises(ValidationError):
        JobRequest(job_uuid="job1", input_object="uploads/a.nii.gz", threshold=threshold)


def test_unknown_fields_refused() -> None:
    # A typo such as "treshold" must not silently run with the default threshold.
    with pytest.raises(ValidationError):
        JobRequest.model_validate({"job_uuid": "j", "input_object": "uploads/a.nii.gz", "treshold": 0.3})


def test_uuid_is_normalised() -> None:
    job = JobRequest(job_uuid="550E8400-E29B-41D4-A716-446655440000", input_object="k")
    assert job.job_uuid == "550e8400-e29b-41d4-a716-446655440000"


def test_every_error_code_is_documented_in_the_readme() -> None:
    from pathlib import Path

    from schemas.errors import ErrorCode

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert [code.value for code in ErrorCode if f"`{code.value}`" not in readme] == []
