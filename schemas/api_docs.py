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
    auth_errors = {
        "401": _error(
            "Missing, malformed, expired or wrongly signed token (unauthorized, token_expired, token_invalid)"
        )
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": VERSION,
            "description": "Synchronous analysis and operational endpoints of the ML service. Jobs normally "
            "arrive through Kafka (see asyncapi.json); POST /infer runs one job and answers with its outputs.",
        },
        "paths": {
            "/infer": {
                "post": {
                    "operationId": "infer",
                    "summary": "Analyse one object synchronously",
                    "security": [{"bearerJWT": []}],
                    "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(JobRequest)}}},
                    "responses": {
                        "200": _json(InferResponse, "The job completed; the outputs are in the bucket"),
                        "400": _error("The body is not JSON or not a valid job (invalid_json, invalid_request)"),
                        **auth_errors,
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
                    },
                }
            },
            "/health": {
                "get": {
                    "operationId": "health",
                    "summary": "Service status with a check per dependency",
                    "responses": {
                        "200": _json(HealthResponse, "healthy or degraded"),
                        "503": _json(HealthResponse, "unhealthy"),
                    },
                }
            },
            "/health/live": {
                "get": {
                    "operationId": "live",
                    "summary": "Liveness: the process answers",
                    "responses": {"200": _json(ProbeResponse, "alive")},
                }
            },
            "/health/ready": {
                "get": {
                    "operationId": "ready",
                    "summary": "Readiness: the model is loaded and the consumer has joined its group",
                    "responses": {
                        "200": _json(ProbeResponse, "ready"),
                        "503": _json(ProbeResponse, "not ready, with the reasons"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearerJWT": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "HS256 with ML_SERVICE_TOKEN (or ML_SERVICE_TOKEN_PREVIOUS); exp required; "
                    "aud must be 'ml-service'",
                }
            },
        },
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
