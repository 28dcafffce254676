"""MinIO's bucket-notification message, as MinIO publishes it to Kafka.

MinIO sends one JSON object per event: `EventName` (e.g. "s3:ObjectCreated:Put"), `Key`
("<bucket>/<object key>") and `Records`, each record in the S3 event structure with
`eventName`, `s3.bucket.name` and `s3.object.key` URL-encoded (form encoding: a space is '+').
Only the fields the service reads are declared; everything else MinIO adds is kept and ignored.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class S3Bucket(_Open):
    name: str
    arn: str | None = None


class S3Object(_Open):
    key: str = Field(description="URL-encoded object key")
    size: int | None = None
    e_tag: str | None = Field(default=None, alias="eTag")
    content_type: str | None = Field(default=None, alias="contentType")
    sequencer: str | None = None
    version_id: str | None = Field(default=None, alias="versionId")


class S3Entity(_Open):
    s3_schema_version: str | None = Field(default=None, alias="s3SchemaVersion")
    configuration_id: str | None = Field(default=None, alias="configurationId")
    bucket: S3Bucket
    object: S3Object


class EventRecord(_Open):
    event_version: str | None = Field(default=None, alias="eventVersion")
    event_source: str | None = Field(default=None, alias="eventSource")
    aws_region: str | None = Field(default=None, alias="awsRegion")
    event_time: str | None = Field(default=None, alias="eventTime")
    event_name: str = Field(alias="eventName")
    s3: S3Entity


class MinioEvent(_Open):
    model_config = ConfigDict(extra="allow", populate_by_name=True, title="MinioEvent")

    event_name: str | None = Field(default=None, alias="EventName")
    key: str | None = Field(default=None, alias="Key", description="<bucket>/<object key>, not encoded")
    records: list[EventRecord] = Field(default_factory=list, alias="Records")
