"""The HTTP API: POST /infer (synchronous job, JWT), /health, /health/live, /health/ready,
/metrics, /openapi.json.

Handlers find what they use under typed app keys (the job slots, the token check, the health
checks, the metrics), set once by `build_app`.
"""

from __future__ import annotations

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ValidationError

from consumer.auth import BearerAuth
from consumer.errors import InvalidMessage, ServiceError, ShuttingDown, validation_summary
from consumer.http.health import HealthChecks
from consumer.jobs.context import JobOutcome
from consumer.jobs.slots import JobSlots
from consumer.observability.metrics import ServiceMetrics
from schemas.api_docs import openapi
from schemas.errors import ErrorCode
from schemas.events import JobStatus
from schemas.http import ErrorBody, ErrorResponse, InferResponse, ProbeResponse
from schemas.jobs import JobRequest, Source

JOBS = web.AppKey("jobs", JobSlots)
AUTH = web.AppKey("auth", BearerAuth)
HEALTH = web.AppKey("health", HealthChecks)
METRICS = web.AppKey("metrics", ServiceMetrics)
MAX_BODY = web.AppKey("max_body", int)
OPENAPI = orjson.dumps(openapi())


def json_response(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(model.model_dump(mode="json", exclude_none=True)),
        status=status,
        content_type="application/json",
    )


def error_response(status: int, code: ErrorCode, message: str) -> web.Response:
    return json_response(ErrorResponse(error=ErrorBody(code=code, message=message)), status)


def refusal(error: ServiceError) -> web.Response:
    return error_response(error.http_status, error.code, error.message)


def decode_body(body: bytes) -> JobRequest:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise InvalidMessage(f"the body is not JSON: {error}", code=ErrorCode.INVALID_JSON) from error
    try:
        return JobRequest.model_validate(data)
    except ValidationError as error:
        raise InvalidMessage(validation_summary(error, "body"), code=ErrorCode.INVALID_REQUEST) from error


def infer_response(outcome: JobOutcome) -> web.Response:
    if outcome.status is not JobStatus.COMPLETED:
        assert outcome.error is not None
        return refusal(outcome.error)
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


async def infer(request: web.Request) -> web.Response:
    jobs = request.app[JOBS]
    try:
        # Before the body is read: an unauthenticated request costs nothing and starts nothing.
        request.app[AUTH].check(request.headers.get("Authorization"))
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, ErrorCode.REQUEST_TOO_LARGE, f"the body is over {request.app[MAX_BODY]} bytes")
        job = decode_body(body)
        if jobs.closed:
            raise ShuttingDown("the service is shutting down")
        # Raises only when the job's events could not be published.
        outcome = await jobs.run(job, Source.HTTP)
    except ServiceError as error:
        return refusal(error)
    return infer_response(outcome)


async def health(request: web.Request) -> web.Response:
    body = await request.app[HEALTH].report()
    return json_response(body, 200 if body.status != "unhealthy" else 503)


async def live(request: web.Request) -> web.Response:
    return json_response(ProbeResponse(status="alive"))


async def ready(request: web.Request) -> web.Response:
    body = request.app[HEALTH].readiness()
    return json_response(body, 200 if body.status == "ready" else 503)


async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI, content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
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


def build_app(
    jobs: JobSlots, auth: BearerAuth, health_checks: HealthChecks, service_metrics: ServiceMetrics, max_body: int
) -> web.Application:
    app = web.Application(client_max_size=max_body, middlewares=[json_errors])
    app[JOBS] = jobs
    app[AUTH] = auth
    app[HEALTH] = health_checks
    app[METRICS] = service_metrics
    app[MAX_BODY] = max_body
    app.router.add_post("/infer", infer)
    app.router.add_get("/health", health)
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_document)
    return app
