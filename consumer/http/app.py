"""The HTTP API: POST /infer (synchronous job, JWT), /health, /health/live, /health/ready,
/metrics, /openapi.json."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from consumer.auth import bearer_token, verify_token
from consumer.errors import AuthError, InvalidMessage, ServiceError, ShuttingDown, validation_summary
from schemas.api_docs import openapi
from schemas.errors import ErrorCode
from schemas.events import JobStatus
from schemas.http import ErrorBody, ErrorResponse, InferResponse, ProbeResponse
from schemas.jobs import JobRequest, Source

if TYPE_CHECKING:
    from consumer.service import Service

SERVICE: web.AppKey[Service] = web.AppKey("service")
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


def authenticate(request: web.Request) -> web.Response | None:
    """None when the caller may run a job; the 401 answer otherwise. Checked before the body
    is read, so an unauthenticated request costs nothing and starts nothing."""
    settings = request.app[SERVICE].settings
    secrets = settings.auth_secrets
    if not secrets:
        if settings.ml_allow_insecure:
            return None
        return refusal(AuthError("the service has no ML_SERVICE_TOKEN configured"))
    try:
        verify_token(bearer_token(request.headers.get("Authorization")), secrets)
    except AuthError as error:
        return refusal(error)
    return None


def decode_body(body: bytes) -> JobRequest:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise InvalidMessage(f"the body is not JSON: {error}", code=ErrorCode.INVALID_JSON) from error
    try:
        return JobRequest.model_validate(data)
    except ValidationError as error:
        raise InvalidMessage(validation_summary(error, "body"), code=ErrorCode.INVALID_REQUEST) from error


async def infer(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    unauthorized = authenticate(request)
    if unauthorized is not None:
        return unauthorized
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, ErrorCode.REQUEST_TOO_LARGE, f"the body is over {request.app[MAX_BODY]} bytes")
    try:
        job = decode_body(body)
    except InvalidMessage as error:
        return refusal(error)
    if service.stopping:
        return refusal(ShuttingDown("the service is shutting down"))
    try:
        outcome = await service.run_job(job, Source.HTTP)
    except ServiceError as error:  # the job's events could not be published
        return refusal(error)
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


async def health(request: web.Request) -> web.Response:
    body = await request.app[SERVICE].health.report()
    return json_response(body, 200 if body.status != "unhealthy" else 503)


async def live(request: web.Request) -> web.Response:
    return json_response(ProbeResponse(status="alive"))


async def ready(request: web.Request) -> web.Response:
    body = request.app[SERVICE].health.readiness()
    return json_response(body, 200 if body.status == "ready" else 503)


async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI, content_type="application/json")


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
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_document)
    return app
