"""Every error code the service reports, in one place (events, DLQ records, HTTP bodies)."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    # The message itself (dead-lettered; never becomes a job).
    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    # The request (HTTP 400/401/413).
    INVALID_REQUEST = "invalid_request"
    UNAUTHORIZED = "unauthorized"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_INVALID = "token_invalid"
    REQUEST_TOO_LARGE = "request_too_large"
    REQUEST_TIMEOUT = "request_timeout"
    # The input object.
    INPUT_NOT_FOUND = "input_not_found"
    INPUT_TOO_LARGE = "input_too_large"
    INPUT_EMPTY = "input_empty"
    UNSUPPORTED_FORMAT = "unsupported_format"
    INVALID_DICOM = "invalid_dicom"
    DICOM_NO_PIXEL_DATA = "dicom_no_pixel_data"
    DICOM_COLOR_NOT_SUPPORTED = "dicom_color_not_supported"
    DICOM_UNSUPPORTED_MODALITY = "dicom_unsupported_modality"
    DICOM_DECODE_FAILED = "dicom_decode_failed"
    DICOM_MISSING_GEOMETRY = "dicom_missing_geometry"
    DICOM_MISSING_SLICES = "dicom_missing_slices"
    DICOM_INCONSISTENT_SERIES = "dicom_inconsistent_series"
    SERIES_NOT_FOUND = "series_not_found"
    NO_IMAGE_SERIES = "no_image_series"
    INVALID_ARCHIVE = "invalid_archive"
    ARCHIVE_TOO_LARGE = "archive_too_large"
    ARCHIVE_RATIO_EXCEEDED = "archive_ratio_exceeded"
    ARCHIVE_TOO_MANY_MEMBERS = "archive_too_many_members"
    INVALID_NIFTI = "invalid_nifti"
    INVALID_GZIP = "invalid_gzip"
    IMAGE_TOO_LARGE = "image_too_large"
    INVALID_IMAGE_DIMENSIONS = "invalid_image_dimensions"
    # The reference mask named by a job.
    REFERENCE_NOT_FOUND = "reference_not_found"
    REFERENCE_MISMATCH = "reference_mismatch"
    # The service and its dependencies.
    STORAGE_UNAVAILABLE = "storage_unavailable"
    MODEL_NOT_LOADED = "model_not_loaded"
    MODEL_NOT_FOUND = "model_not_found"
    INFERENCE_FAILED = "inference_failed"
    OUTPUT_WRITE_FAILED = "output_write_failed"
    OUTPUT_NOT_ALLOWED = "output_not_allowed"
    JOB_TIMEOUT = "job_timeout"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL_ERROR = "internal_error"
