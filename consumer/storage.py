"""Object storage (MinIO / any S3 server). The minio client is blocking: every call runs in a thread."""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error

from consumer.errors import InputNotFound, StorageUnavailable
from consumer.settings import Settings

log = logging.getLogger(__name__)

_MISSING = {"NoSuchKey", "NoSuchObject", "NoSuchBucket", "NotFound"}


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str | None
    content_type: str | None


def _client(settings: Settings) -> Minio:
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=5.0, read=120.0),
        retries=urllib3.Retry(total=3, backoff_factor=0.3, status_forcelist=[500, 502, 503, 504]),
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


def _translate(error: Exception, key: str) -> Exception:
    if isinstance(error, S3Error) and error.code in _MISSING:
        return InputNotFound(f"object {key!r} does not exist")
    return StorageUnavailable(f"object storage failed on {key!r}: {error}")


class ObjectStore:
    """Async facade over one bucket."""

    def __init__(self, client: Minio, bucket: str):
        self.client = client
        self.bucket = bucket

    @classmethod
    def from_settings(cls, settings: Settings) -> ObjectStore:
        """The one way the service, the dev stack, the tools and the tests reach the bucket."""
        return cls(_client(settings), settings.minio_bucket)

    async def _call(self, key: str, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (S3Error, MinioException, urllib3.exceptions.HTTPError, OSError) as error:
            raise _translate(error, key) from error

    async def stat(self, key: str) -> ObjectInfo:
        stat = await self._call(key, self.client.stat_object, self.bucket, key)
        return ObjectInfo(key, int(stat.size or 0), stat.etag, stat.content_type)

    async def download(self, key: str, path: Path) -> None:
        """Stream to a file: the object is never held whole in memory."""
        await self._call(key, self.client.fget_object, self.bucket, key, str(path))

    async def put_bytes(self, key: str, data: bytes, content_type: str) -> int:
        await self._call(
            key, self.client.put_object, self.bucket, key, io.BytesIO(data), len(data), content_type=content_type
        )
        return len(data)

    async def put_file(self, key: str, path: Path, content_type: str) -> int:
        size = (await asyncio.to_thread(path.stat)).st_size
        await self._call(key, self.client.fput_object, self.bucket, key, str(path), content_type=content_type)
        return size

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
            await self._call(self.bucket, self.client.bucket_exists, self.bucket)
        except StorageUnavailable:
            return False
        return True
