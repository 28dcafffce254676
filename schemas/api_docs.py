"""The OpenAPI document of the HTTP API and the AsyncAPI document of the Kafka topics.

Both are built from the same pydantic models the service validates with, so they cannot drift
from the code; `python -m schemas export` writes them to schemas/json/ and the service serves
the OpenAPI one at /openapi.json.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from schemas.events import DeadLetter, JobEvent
from schemas.http import ErrorResponse, HealthResponse, InferResponse, ProbeResponse
from schemas.jobs import JobRequest
from schemas.minio_event import MinioEvent

VERSION = "1.0.0"  # of the service and its API documents
TITLE = "ml-service"


def _components(models: list[type[BaseModel]], ref_template: str) -> dict[str, Any]:
    _, schema = models_json_schema(
        [(model, "validation") for model in models], ref_template=ref_template, by_alias=True
    )
    return dict(schema.get("$defs", {}))


def _ref(model: type[BaseModel]) -> dict[str, str]:
    title = model.model_config.get("title") or model.__name__
    return {"$ref": f"#/components/schemas/{title}"}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _error(description: str) -> dict[str, Any]:
    return _json(ErrorResponse, description)


def openapi() -> dict[str, Any]:
    schemas = _components(
        [JobRequest, InferResponse, ErrorResponse, HealthResponse, ProbeResponse], "#/components/schemas/{model}"
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": VERSION,
            "description": "Synchronous analysis and operational endpoints of the ML service. Jobs normally "
            "arrive through Kafka (see asyncapi.json); POST /infer runs one job and answers with its outputs.",
        },
        "paths": {"/infer": {"post": _infer_operation()}, **_health_paths(), **_document_paths()},
        "components": {"schemas": schemas, "securitySchemes": {"bearerJWT": _bearer_scheme()}},
    }


def _infer_operation() -> dict[str, Any]:
    return {
        "operationId": "infer",
        "summary": "Analyse one object synchronously",
        "security": [{"bearerJWT": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(JobRequest)}}},
        "responses": _infer_responses(),
    }


def _infer_responses() -> dict[str, Any]:
    return {
        "200": _json(InferResponse, "The job completed; the outputs are in the bucket"),
        "400": _error("The body is not JSON or not a valid job (invalid_json, invalid_request)"),
        "401": _error(
            "Missing, malformed, expired or wrongly signed token (unauthorized, token_expired, token_invalid)"
        ),
        "404": _error("The input object does not exist (input_not_found)"),
        "408": _error("The body did not arrive within HTTP_BODY_TIMEOUT_S (request_timeout)"),
        "413": _error("The body or the input object is over its limit"),
        "422": _error(
            "The input is not an image the service reads, or the outputs would lie outside "
            "ML_OUTPUT_PREFIX or over the input (output_not_allowed); error.code says which"
        ),
        "500": _error("An internal error (internal_error, inference_failed, ...)"),
        "503": {
            **_error(
                "A dependency stayed down through ML_INFER_RETRY_WAIT_S of retries "
                "(storage_unavailable), the model is not loaded, or the service is stopping"
            ),
            "headers": {
                "Retry-After": {
                    "description": "Seconds after which the same request may succeed",
                    "schema": {"type": "integer"},
                }
            },
        },
        "504": _error("The job ran past ML_JOB_TIMEOUT_S (job_timeout)"),
    }


def _get(operation_id: str, summary: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"operationId": operation_id, "summary": summary, "responses": responses}}


def _health_paths() -> dict[str, Any]:
    return {
        "/health": _get(
            "health",
            "Service status with a check per dependency",
            {"200": _json(HealthResponse, "healthy or degraded"), "503": _json(HealthResponse, "unhealthy")},
        ),
        "/health/live": _get("live", "Liveness: the process answers", {"200": _json(ProbeResponse, "alive")}),
        "/health/ready": _get(
            "ready",
            "Readiness: the model is loaded and the consumer has joined its group",
            {"200": _json(ProbeResponse, "ready"), "503": _json(ProbeResponse, "not ready, with the reasons")},
        ),
    }


def _document_paths() -> dict[str, Any]:
    def body(description: str, media: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"200": {"description": description, "content": {media: {"schema": schema}}}}

    return {
        "/metrics": _get(
            "metrics", "Prometheus metrics", body("Prometheus text format", "text/plain", {"type": "string"})
        ),
        "/openapi.json": _get("openapi", "This document", body("OpenAPI 3.1", "application/json", {"type": "object"})),
    }


def _bearer_scheme() -> dict[str, Any]:
    return {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "HS256 with ML_SERVICE_TOKEN (or ML_SERVICE_TOKEN_PREVIOUS); exp required; "
        "aud must be 'ml-service'",
    }


# (setting name, default topic, message model, what the service does, description)
TOPICS: list[tuple[str, str, type[BaseModel], str, str]] = [
    (
        "KAFKA_JOBS_TOPIC",
        "ml.jobs",
        JobRequest,
        "receive",
        "Job messages from the backend; key = job_uuid. The service consumes.",
    ),
    (
        "KAFKA_MINIO_EVENTS_TOPIC",
        "minio.events",
        MinioEvent,
        "receive",
        "MinIO bucket notifications; an ObjectCreated event under uploads/ starts a job. The service consumes.",
    ),
    (
        "KAFKA_JOB_EVENTS_TOPIC",
        "ml.job-events",
        JobEvent,
        "send",
        "accepted, running, progress, completed and failed events of every job; key = job_uuid. The service publishes.",
    ),
    (
        "KAFKA_DLQ_TOPIC",
        "ml.jobs.dlq",
        DeadLetter,
        "send",
        "Messages that are not a valid job or MinIO event, with the reason and their origin. The service publishes.",
    ),
]


def asyncapi() -> dict[str, Any]:
    models = [model for _, _, model, _, _ in TOPICS]
    schemas = _components(models, "#/components/schemas/{model}")
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for setting, topic, model, action, description in TOPICS:
        name = model.model_config.get("title") or model.__name__
        channel = topic.replace(".", "_").replace("-", "_")
        messages[name] = {
            "name": name,
            "contentType": "application/json",
            "payload": _ref(model),
        }
        channels[channel] = {
            "address": topic,
            "description": f"{description} Topic name from {setting}.",
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            "bindings": {"kafka": {"topic": topic, "bindingVersion": "0.5.0"}},
        }
        operations[f"{action}_{channel}"] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": f"#/channels/{channel}/messages/{name}"}],
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": TITLE,
            "version": VERSION,
            "description": "The Kafka topics of the ML service, seen from the service. Messages are JSON.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }
