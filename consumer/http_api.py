"""The HTTP API: POST /infer (synchronous job), GET /health, GET /metrics."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import orjson
import psutil
from aiohttp import web
from pydantic import BaseModel, ValidationError

from consumer.errors import ShuttingDown
from consumer.runner import EventPublishError
from schemas.errors import ErrorCode
from schemas.events import JobStatus
from schemas.http import ErrorBody, ErrorResponse, HealthResponse, InferResponse
from schemas.jobs import JobRequest, Source

if TYPE_CHECKING:
    from consumer.service import Service

SERVICE: web.AppKey[Service] = web.AppKey("service")
MAX_BODY = web.AppKey("max_body", int)
VERSION = "1.0.0"


def json_response(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(model.model_dump(mode="json", exclude_none=True)),
        status=status,
        content_type="application/json",
    )


def error_response(status: int, code: ErrorCode, message: str) -> web.Response:
    return json_response(ErrorResponse(error=ErrorBody(code=code, message=message)), status)


async def infer(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, ErrorCode.REQUEST_TOO_LARGE, f"the body is over {request.app[MAX_BODY]} bytes")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        return error_response(400, ErrorCode.INVALID_JSON, f"the body is not JSON: {error}")
    try:
        job = JobRequest.model_validate(data)
    except ValidationError as error:
        details = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
            for e in error.errors(include_url=False, include_input=False)
        )
        return error_response(400, ErrorCode.INVALID_REQUEST, details)
    if service.stopping:
        refusal = ShuttingDown("the service is shutting down")
        return error_response(refusal.http_status, refusal.code, refusal.message)
    try:
        outcome = await service.run_job(job, Source.HTTP)
    except EventPublishError as error:
        return error_response(503, ErrorCode.INTERNAL_ERROR, str(error))
    if outcome.status is not JobStatus.COMPLETED:
        assert outcome.error is not None
        return error_response(outcome.error.http_status, outcome.error.code, outcome.error.message)
    return json_response(
        InferResponse(
            job_uuid=outcome.job_uuid,
            output_object=outcome.keys.mask,
            file_size=outcome.file_size or 0,
            duration_seconds=outcome.duration_seconds,
            status=outcome.status.value,
            results_object=outcome.keys.results,
            report_object=outcome.keys.report,
            seg_object=outcome.result.segmentation.dicom_seg if outcome.result else None,
        )
    )


def memory_usage() -> dict[str, float]:
    process = psutil.Process()
    info = process.memory_info()
    return {
        "rss_mb": round(info.rss / 2**20, 1),
        "vms_mb": round(info.vms / 2**20, 1),
        "percent": round(process.memory_percent(), 2),
        "system_available_mb": round(psutil.virtual_memory().available / 2**20, 1),
    }


async def health(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    engine = service.engine
    loaded = engine.loaded
    if not loaded or service.stopping:
        status = "unhealthy"
    elif not service.consumer_joined:
        status = "degraded"
    else:
        status = "healthy"
    body = HealthResponse(
        status=status,
        model_loaded=loaded,
        version=VERSION,
        uptime=round(time.monotonic() - service.started_monotonic, 3),
        memory_usage=memory_usage(),
        model_name=engine.bundle.name if engine.bundle else service.settings.model_name,
        model_version=engine.bundle.version if engine.bundle else None,
        device=str(engine.device),
        jobs_in_flight=service.runner.in_flight,
    )
    return json_response(body, 200 if status != "unhealthy" else 503)


async def metrics(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return web.Response(body=service.metrics.render(), content_type="text/plain", charset="utf-8")


@web.middleware
async def json_errors(request: web.Request, handler):  # type: ignore[no-untyped-def]
    """aiohttp's own errors (404, 405, 413) as JSON bodies with a code, like ours."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, ErrorCode.REQUEST_TOO_LARGE, "the request body is too large")
    except web.HTTPException as error:
        if error.status < 400:
            raise
        code = ErrorCode.INVALID_REQUEST if error.status < 500 else ErrorCode.INTERNAL_ERROR
        return error_response(error.status, code, error.reason)


def build_app(service: Service) -> web.Application:
    max_body = service.settings.http_max_body_bytes
    app = web.Application(client_max_size=max_body, middlewares=[json_errors])
    app[SERVICE] = service
    app[MAX_BODY] = max_body
    app.router.add_post("/infer", infer)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app
