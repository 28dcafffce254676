"""Field types shared by the message models."""

from __future__ import annotations

import re
from typing import Annotated
from uuid import UUID

from pydantic import AfterValidator, Field

SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _job_id(value: str) -> str:
    try:
        return str(UUID(value))
    except ValueError:
        pass
    if not SAFE_ID.fullmatch(value) or value in {".", ".."}:
        raise ValueError("job_uuid must be a UUID or 1-128 characters of [A-Za-z0-9._-]")
    return value


def _object_key(value: str) -> str:
    if not value:
        raise ValueError("object key must not be empty")
    if len(value.encode()) > 1024:
        raise ValueError("object key is longer than 1024 bytes")
    if value.startswith("/"):
        raise ValueError("object key must not start with '/'")
    if _CONTROL.search(value):
        raise ValueError("object key must not contain control characters")
    if ".." in value.split("/"):
        raise ValueError("object key must not contain '..' segments")
    return value


JobId = Annotated[
    str,
    Field(
        description="UUID, or a safe id of [A-Za-z0-9._-] (at most 128); it names the output objects",
        pattern=r"^[A-Za-z0-9._-]{1,128}$",
    ),
    AfterValidator(_job_id),
]
ObjectKey = Annotated[
    str,
    Field(description="Object key inside the bucket: no leading '/', no '..' segment, no control characters"),
    AfterValidator(_object_key),
]
SeriesUid = Annotated[
    str,
    Field(
        description="A DICOM UID: digits in dot-separated components, at most 64 characters",
        pattern=r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$",
        max_length=64,
    ),
]
ModelName = Annotated[
    str,
    Field(
        description="A hosted model (bundle) name: 1-64 characters of [A-Za-z0-9._-]",
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
    ),
]
