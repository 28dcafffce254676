"""Object storage (MinIO / any S3 server). The minio client is blocking: every call runs in a thread.

Transient failures (connection refused or reset, timeouts, 5xx, SlowDown) are retried by the
service's one retry policy (consumer.retry): within a job until the job's deadline, so a storage
outage shorter than that costs time, not jobs. urllib3 under the client does not retry on its
own, so there is one loop, not two nested.
"""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import urllib3
from minio import Minio
from minio.commonconfig import CopySource
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

from consumer.errors import InputNotFound, StorageUnavailable
from consumer.retry import STORAGE, RetryPolicy, retry
from consumer.settings import Settings

log = logging.getLogger(__name__)

_MISSING = {"NoSuchKey", "NoSuchObject", "NoSuchBucket", "NotFound"}
# S3 error codes that say "not now" rather than "never".
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "ServiceFailure"}
_ERRORS = (S3Error, MinioException, urllib3.exceptions.HTTPError, OSError)


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str | None
    content_type: str | None


def _client(settings: Settings) -> Minio:
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=5.0, read=120.0),
        # No retries of its own: consumer.retry is the one loop (see the module docstring).
        retries=False,
        maxsize=16,
    )
    return Minio(
        settings.minio_endpoint,
        access_key=settings.minio_access_key,
        secret_key=settings.minio_secret_key.get_secret_value(),
        secure=settings.minio_secure,
        region=settings.minio_region,
        http_client=http,
    )


def transient(error: Exception) -> bool:
    """Whether the same call may succeed later: the server was unreachable, slow or overloaded."""
    if isinstance(error, S3Error):
        return error.code in _TRANSIENT_CODES or getattr(error.response, "status", 0) >= 500
    if isinstance(error, ServerError):
        return error.status_code >= 500 or error.status_code == 429
    if isinstance(error, InvalidResponseError):
        # A non-XML answer: a proxy or load balancer in front of the store (502, 503, 504).
        return getattr(error, "_code", 0) >= 500
    return isinstance(error, (urllib3.exceptions.HTTPError, OSError))


def _translate(error: Exception, key: str) -> Exception:
    if isinstance(error, S3Error) and error.code in _MISSING:
        return InputNotFound(f"object {key!r} does not exist")
    return StorageUnavailable(f"object storage failed on {key!r}: {error}")


class ObjectStore:
    """Async facade over one bucket."""

    def __init__(self, client: Minio, bucket: str, policy: RetryPolicy = STORAGE):
        self.client = client
        self.bucket = bucket
        self.policy = policy

    @classmethod
    def from_settings(cls, settings: Settings, policy: RetryPolicy = STORAGE) -> ObjectStore:
        """The one way the service, the dev stack, the tools and the tests reach the bucket."""
        return cls(_client(settings), settings.minio_bucket, policy)

    async def _call(self, key: str, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        """`fn` in a thread, retried while it fails transiently; its error in our terms at the end."""
        try:
            return await retry(
                lambda: asyncio.to_thread(fn, *args, **kwargs), self.policy, transient, what=f"on {key!r}"
            )
        except _ERRORS as error:
            raise _translate(error, key) from error

    async def _once(self, key: str, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        """`fn` in a thread, tried once (a health probe must answer now)."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except _ERRORS as error:
            raise _translate(error, key) from error

    async def stat(self, key: str) -> ObjectInfo:
        stat = await self._call(key, self.client.stat_object, self.bucket, key)
        return ObjectInfo(key, int(stat.size or 0), stat.etag, stat.content_type)

    async def download(self, key: str, path: Path) -> None:
        """Stream to a file: the object is never held whole in memory."""
        await self._call(key, self.client.fget_object, self.bucket, key, str(path))

    async def put_bytes(self, key: str, data: bytes, content_type: str) -> int:
        def put() -> None:
            # A fresh stream for every attempt: a retry must not find the last one read to its end.
            self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)

        await self._call(key, put)
        return len(data)

    async def put_file(self, key: str, path: Path, content_type: str) -> int:
        size = (await asyncio.to_thread(path.stat)).st_size
        await self._call(key, self.client.fput_object, self.bucket, key, str(path), content_type=content_type)
        return size

    async def copy(self, source: str, key: str) -> None:
        """A server-side copy inside the bucket: the bytes never travel through this process."""
        await self._call(source, self.client.copy_object, self.bucket, key, CopySource(self.bucket, source))

    async def get_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            response = self.client.get_object(self.bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        data: bytes = await self._call(key, read)
        return data

    async def ensure_bucket(self) -> None:
        if not await self._call(self.bucket, self.client.bucket_exists, self.bucket):
            try:
                await self._call(self.bucket, self.client.make_bucket, self.bucket)
            except StorageUnavailable as error:
                # Another replica may have created it first.
                if not await self._call(self.bucket, self.client.bucket_exists, self.bucket):
                    raise error from None
            log.info("created bucket %s", self.bucket)

    async def reachable(self) -> bool:
        try:
            await self._once(self.bucket, self.client.bucket_exists, self.bucket)
        except StorageUnavailable:
            return False
        return True
