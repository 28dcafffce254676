"""Build a bucket notification exactly as MinIO publishes it to a Kafka target.

The embedded S3 server has no notifications of its own, so the tools publish MinIO's message
themselves: `EventName`, `Key` ("<bucket>/<key>", not encoded) and one record in the S3 event
structure, whose object key is query-escaped the way MinIO does it (Go's url.QueryEscape:
'/' -> %2F, ' ' -> '+').
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote_plus


def minio_event(
    bucket: str,
    key: str,
    *,
    size: int,
    etag: str,
    event_name: str = "s3:ObjectCreated:Put",
    content_type: str = "application/octet-stream",
    endpoint: str = "http://127.0.0.1:9000",
    principal: str = "minioadmin",
) -> dict[str, Any]:
    now = datetime.now(UTC)
    request_id = uuid.uuid4().hex[:16].upper()
    record: dict[str, Any] = {
        "eventVersion": "2.0",
        "eventSource": "minio:s3",
        "awsRegion": "",
        "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z",
        "eventName": event_name,
        "userIdentity": {"principalId": principal},
        "requestParameters": {"principalId": principal, "region": "", "sourceIPAddress": "127.0.0.1"},
        "responseElements": {
            "x-amz-id-2": uuid.uuid4().hex,
            "x-amz-request-id": request_id,
            "x-minio-deployment-id": str(uuid.uuid4()),
            "x-minio-origin-endpoint": endpoint,
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "Config",
            "bucket": {"name": bucket, "ownerIdentity": {"principalId": principal}, "arn": f"arn:aws:s3:::{bucket}"},
            "object": {
                "key": quote_plus(key, safe=""),
                "sequencer": f"{time.time_ns():X}",
            },
        },
        "source": {"host": "127.0.0.1", "port": "", "userAgent": "MinIO (linux; amd64) minio-py"},
    }
    if not event_name.startswith("s3:ObjectRemoved"):
        record["s3"]["object"].update(
            {"size": size, "eTag": etag, "contentType": content_type, "userMetadata": {"content-type": content_type}}
        )
    return {"EventName": event_name, "Key": f"{bucket}/{key}", "Records": [record]}
