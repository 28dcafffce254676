"""Errors a job can end with: each has a code (schemas.errors.ErrorCode) and a retryable flag."""

from __future__ import annotations

from schemas.errors import ErrorCode
from schemas.events import ErrorInfo


class JobError(Exception):
    """A job cannot complete. `retryable` says whether the same job might succeed later."""

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


class TransientError(JobError):
    """A dependency failed; the same job may succeed on a later attempt."""

    retryable = True
    http_status = 503


class StorageUnavailable(TransientError):
    code = ErrorCode.STORAGE_UNAVAILABLE


class ModelNotLoaded(TransientError):
    code = ErrorCode.MODEL_NOT_LOADED


class JobTimeout(JobError):
    code = ErrorCode.JOB_TIMEOUT
    http_status = 504


class ShuttingDown(TransientError):
    code = ErrorCode.SHUTTING_DOWN
