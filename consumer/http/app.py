"""The HTTP API: POST /infer (synchronous job, JWT), /health, /health/live, /health/ready,
/metrics, /openapi.json.

Handlers find what they use under typed app keys (the job slots, the token check, the health
checks, the metrics), set once by `build_app`. Slow clients are bounded (`runner_options`): a
connection must bring a whole request's headers within the keep-alive time, and the body within
HTTP_BODY_TIMEOUT_S. A dependency that is down costs an /infer caller ML_INFER_RETRY_WAIT_S of
retries at most, then 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ValidationError

from consumer.auth import BearerAuth
from consumer.errors import InvalidMessage, ServiceError, ShuttingDown, TransientError, validation_summary
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
BODY_TIMEOUT = web.AppKey("body_timeout", float)
RETRY_AFTER_S = web.AppKey("retry_after", int)
OPENAPI = orjson.dumps(openapi())


def json_response(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(model.model_dump(mode="json", exclude_none=True)),
        status=status,
        content_type="application/json",
    )


def error_response(status: int, code: ErrorCode, message: str) -> web.Response:
    return json_response(ErrorResponse(error=ErrorBody(code=code, message=message)), status)


def refusal(error: ServiceError, retry_after_s: int = 30) -> web.Response:
    response = error_response(error.http_status, error.code, error.message)
    if isinstance(error, TransientError) or error.http_status == 503:
        # The same request may succeed later: say when it is worth trying again.
        response.headers["Retry-After"] = str(retry_after_s)
    return response


def decode_body(body: bytes) -> JobRequest:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise InvalidMessage(f"the body is not JSON: {error}", code=ErrorCode.INVALID_JSON) from error
    try:
        return JobRequest.model_validate(data)
    except ValidationError as error:
        raise InvalidMessage(validation_summary(error, "body"), code=ErrorCode.INVALID_REQUEST) from error


def infer_response(outcome: JobOutcome, retry_after_s: int) -> web.Response:
    if outcome.status is not JobStatus.COMPLETED:
        assert outcome.error is not None
        return refusal(outcome.error, retry_after_s)
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


async def read_body(request: web.Request) -> bytes | web.Response:
    """The body, or the answer to a client that sends too much or too slowly."""
    app = request.app
    try:
        async with asyncio.timeout(app[BODY_TIMEOUT]):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, ErrorCode.REQUEST_TOO_LARGE, f"the body is over {app[MAX_BODY]} bytes")
    except TimeoutError:
        response = error_response(
            408, ErrorCode.REQUEST_TIMEOUT, f"the body did not arrive within {app[BODY_TIMEOUT]} s"
        )
        response.force_close()
        return response


async def infer(request: web.Request) -> web.Response:
    jobs = request.app[JOBS]
    retry_after = request.app[RETRY_AFTER_S]
    try:
        # Before the body is read: an unauthenticated request costs nothing and starts nothing.
        request.app[AUTH].check(request.headers.get("Authorization"))
        body = await read_body(request)
        if isinstance(body, web.Response):
            return body
        job = decode_body(body)
        if jobs.closed:
            raise ShuttingDown("the service is shutting down")
        # Raises only when the job's events could not be published.
        outcome = await jobs.run(job, Source.HTTP)
    except ServiceError as error:
        return refusal(error, retry_after)
    return infer_response(outcome, retry_after)


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
    jobs: JobSlots,
    auth: BearerAuth,
    health_checks: HealthChecks,
    service_metrics: ServiceMetrics,
    max_body: int,
    *,
    body_timeout_s: float = 15.0,
    retry_after_s: int = 30,
) -> web.Application:
    app = web.Application(client_max_size=max_body, middlewares=[json_errors])
    app[JOBS] = jobs
    app[AUTH] = auth
    app[HEALTH] = health_checks
    app[METRICS] = service_metrics
    app[MAX_BODY] = max_body
    app[BODY_TIMEOUT] = body_timeout_s
    app[RETRY_AFTER_S] = retry_after_s
    app.router.add_post("/infer", infer)
    app.router.add_get("/health", health)
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_document)
    return app


def runner_options(keepalive_s: float, shutdown_timeout_s: float) -> dict[str, Any]:
    """The server's limits on a connection. aiohttp closes a connection that has not brought a
    whole request (its headers) within the keep-alive time, counted from its start or from the
    last response, so the keep-alive time is also the header read timeout: a client trickling
    a header a byte at a time is cut off then, not held for aiohttp's default hour."""
    return {"keepalive_timeout": keepalive_s, "shutdown_timeout": shutdown_timeout_s, "handle_signals": False}
