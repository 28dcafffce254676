"""Every error the service reports, under one root: a code (schemas.errors.ErrorCode), a message
for people, whether the same work may succeed later, and the HTTP status it answers with.

- JobError and its kinds: a job cannot complete (its `failed` event carries code and message);
- InvalidMessage: a Kafka record or an HTTP body that can never become a job;
- AuthError: a request without a valid token;
- EventPublishError: the broker did not take an event, so the record must not be committed.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from schemas.errors import ErrorCode
from schemas.events import ErrorInfo


class ServiceError(Exception):
    """The root. Kinds set `code`, `retryable` and `http_status` on the class; a raise may name a
    more precise code."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR
    retryable: bool = False
    http_status: int = 500

    def __init__(self, message: str, *, code: ErrorCode | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def info(self) -> ErrorInfo:
        return ErrorInfo(code=self.code, message=self.message, retryable=self.retryable)


class JobError(ServiceError):
    """A job cannot complete. `retryable` says whether the same job might succeed later."""


class InputError(JobError):
    """The input (or the request) is wrong; retrying the same job cannot help."""

    http_status = 422


class InputNotFound(InputError):
    code = ErrorCode.INPUT_NOT_FOUND
    http_status = 404


class InputTooLarge(InputError):
    code = ErrorCode.INPUT_TOO_LARGE
    http_status = 413


class UnsupportedInput(InputError):
    code = ErrorCode.UNSUPPORTED_FORMAT


class OutputNotAllowed(InputError):
    """The job's outputs would lie outside ML_OUTPUT_PREFIX, or over its own input."""

    code = ErrorCode.OUTPUT_NOT_ALLOWED


class TransientError(JobError):
    """A dependency failed; the same job may succeed on a later attempt."""

    retryable = True
    http_status = 503


class StorageUnavailable(TransientError):
    code = ErrorCode.STORAGE_UNAVAILABLE


class ModelNotLoaded(TransientError):
    code = ErrorCode.MODEL_NOT_LOADED


class ModelNotFound(JobError):
    """The job names a model this service does not host."""

    code = ErrorCode.MODEL_NOT_FOUND
    http_status = 404


class InferenceError(JobError):
    """The model failed on this scan; the message names the bundle and the stage."""

    code = ErrorCode.INFERENCE_FAILED


class JobTimeout(JobError):
    code = ErrorCode.JOB_TIMEOUT
    http_status = 504


class ShuttingDown(TransientError):
    code = ErrorCode.SHUTTING_DOWN


class InvalidMessage(ServiceError):
    """A record (or an HTTP body) that can never become a job: a Kafka record goes to the
    dead-letter topic with `details`, an HTTP caller gets a 400."""

    code = ErrorCode.INVALID_MESSAGE
    http_status = 400

    def __init__(self, message: str, *, code: ErrorCode | None = None, details: list[dict[str, Any]] | None = None):
        super().__init__(message, code=code)
        self.details = details or []


class AuthError(ServiceError):
    code = ErrorCode.UNAUTHORIZED
    http_status = 401


class EventPublishError(ServiceError):
    """A job event could not be published: the record must not be committed (it is retried)."""

    retryable = True
    http_status = 503


def validation_details(error: ValidationError) -> list[dict[str, Any]]:
    """Where and what, without the input values (they may be large, or secret)."""
    return [
        {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
        for e in error.errors(include_url=False, include_input=False)
    ]


def validation_summary(error: ValidationError, whole: str = "message", *, upper: bool = False) -> str:
    """One line: `field: what is wrong; ...`. `whole` names an error of the whole object;
    `upper` writes fields as the environment variables that set them."""
    parts = []
    for detail in validation_details(error):
        where = ".".join(map(str, detail["loc"])) or whole
        parts.append(f"{where.upper() if upper else where}: {detail['msg']}")
    return "; ".join(parts)
