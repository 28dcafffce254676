"""Export the JSON Schema of each message model as a file under schemas/json/."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from schemas.api_docs import asyncapi, openapi
from schemas.events import DeadLetter, JobEvent
from schemas.http import ErrorResponse, HealthResponse, InferResponse, ProbeResponse
from schemas.jobs import JobRequest
from schemas.minio_event import MinioEvent
from schemas.results import AnalysisResult

SCHEMA_DIR = Path(__file__).parent / "json"

MODELS: dict[str, type[BaseModel]] = {
    "job_request": JobRequest,
    "minio_event": MinioEvent,
    "job_event": JobEvent,
    "dead_letter": DeadLetter,
    "analysis_result": AnalysisResult,
    "infer_response": InferResponse,
    "error_response": ErrorResponse,
    "health_response": HealthResponse,
    "probe_response": ProbeResponse,
}


DOCUMENTS = {"openapi": openapi, "asyncapi": asyncapi}


def render_document(name: str) -> str:
    return json.dumps(DOCUMENTS[name](), indent=2, sort_keys=True) + "\n"


def document_path(name: str) -> Path:
    return SCHEMA_DIR / f"{name}.json"


def render(model: type[BaseModel]) -> str:
    # by_alias: MinIO's event uses its own capitalised field names on the wire.
    schema = model.model_json_schema(by_alias=True)
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def schema_path(name: str) -> Path:
    return SCHEMA_DIR / f"{name}.schema.json"


def export() -> list[Path]:
    SCHEMA_DIR.mkdir(exist_ok=True)
    written = []
    for name, model in MODELS.items():
        path = schema_path(name)
        path.write_text(render(model))
        written.append(path)
    for name in DOCUMENTS:
        path = document_path(name)
        path.write_text(render_document(name))
        written.append(path)
    return written


def drifted() -> list[str]:
    """Names whose file differs from what the model renders now."""
    models = [
        name
        for name, model in MODELS.items()
        if not schema_path(name).exists() or schema_path(name).read_text() != render(model)
    ]
    documents = [
        name
        for name in DOCUMENTS
        if not document_path(name).exists() or document_path(name).read_text() != render_document(name)
    ]
    return models + documents
