"""Decoding Kafka records into jobs (job messages and MinIO notifications), and what the
dispatcher does with a record: pure logic, with a stub in place of the broker."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiokafka.structs import ConsumerRecord

from consumer.errors import InvalidMessage
from consumer.observability.metrics import ServiceMetrics
from consumer.settings import Settings
from consumer.transport.dispatch import RecordDispatcher, decode_job_message, decode_minio_event, upload_job_id
from consumer.transport.worker import Handled, Work
from producer_tools.minio_events import minio_event
from schemas.errors import ErrorCode
from schemas.jobs import JobRequest, Profile, Source

BUCKET = "californiagold"


def decode(event: dict) -> object:
    return decode_minio_event(orjson.dumps(event), BUCKET, Profile.FAST_DEBUG, 0.55)


def test_upload_becomes_a_job_with_defaults() -> None:
    decision = decode(minio_event(BUCKET, "uploads/dir/CT scan+1 ü.nii.gz", size=10, etag="abc"))
    assert decision.skipped == []
    (job,) = decision.jobs
    assert job.input_object == "uploads/dir/CT scan+1 ü.nii.gz"
    assert job.profile is Profile.FAST_DEBUG and job.threshold == 0.55
    assert job.job_uuid == upload_job_id(BUCKET, "uploads/dir/CT scan+1 ü.nii.gz", "abc")


def test_key_is_url_decoded_as_minio_encodes_it() -> None:
    event = minio_event(BUCKET, "uploads/a b+c.nii.gz", size=1, etag="e")
    assert event["Records"][0]["s3"]["object"]["key"] == "uploads%2Fa+b%2Bc.nii.gz"
    assert event["Key"] == f"{BUCKET}/uploads/a b+c.nii.gz"
    assert decode(event).jobs[0].input_object == "uploads/a b+c.nii.gz"


def test_job_id_is_deterministic_and_depends_on_etag() -> None:
    a = upload_job_id(BUCKET, "uploads/a.nii.gz", "e1")
    assert a == upload_job_id(BUCKET, "uploads/a.nii.gz", '"e1"')
    assert a != upload_job_id(BUCKET, "uploads/a.nii.gz", "e2")
    assert a != upload_job_id(BUCKET, "uploads/b.nii.gz", "e1")


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (minio_event(BUCKET, "other/a.nii.gz", size=1, etag="e"), "outside_uploads"),
        (minio_event("elsewhere", "uploads/a.nii.gz", size=1, etag="e"), "other_bucket"),
        (
            minio_event(BUCKET, "uploads/a.nii.gz", size=0, etag="", event_name="s3:ObjectRemoved:Delete"),
            "not_object_created",
        ),
        (
            minio_event(BUCKET, "uploads/a.nii.gz", size=1, etag="e", event_name="s3:ObjectAccessed:Get"),
            "not_object_created",
        ),
        (
            minio_event(BUCKET, "uploads/a.nii.gz", size=1, etag="e", event_name="s3:ObjectCreated:PutTagging"),
            "not_object_created",
        ),
        (minio_event(BUCKET, "uploads/folder/", size=0, etag="e"), "folder_marker"),
    ],
)
def test_events_that_start_no_job(event: dict, reason: str) -> None:
    decision = decode(event)
    assert decision.jobs == [] and decision.skipped == [reason]


@pytest.mark.parametrize(
    "name",
    [
        "s3:ObjectCreated:Put",
        "s3:ObjectCreated:CompleteMultipartUpload",
        "s3:ObjectCreated:Copy",
        "s3:ObjectCreated:Post",
    ],
)
def test_all_new_object_events_start_a_job(name: str) -> None:
    assert len(decode(minio_event(BUCKET, "uploads/a.nii.gz", size=1, etag="e", event_name=name)).jobs) == 1


@pytest.mark.parametrize("raw", [b"", b"nope", b"[]", b"{}", orjson.dumps({"Records": "x"})])
def test_broken_minio_events_are_invalid(raw: bytes) -> None:
    with pytest.raises(InvalidMessage):
        decode_minio_event(raw, BUCKET, Profile.FAST_DEBUG, 0.55)


def test_job_message_errors_carry_codes_and_details() -> None:
    with pytest.raises(InvalidMessage) as not_json:
        decode_job_message(b"{oops")
    assert not_json.value.code is ErrorCode.INVALID_JSON
    with pytest.raises(InvalidMessage) as bad_profile:
        decode_job_message(orjson.dumps({"job_uuid": "j", "input_object": "k", "profile": "turbo"}))
    assert bad_profile.value.code is ErrorCode.INVALID_MESSAGE
    assert bad_profile.value.details[0]["loc"] == ["profile"]
    assert "profile" in bad_profile.value.message


class StubPublisher:
    """Keeps the dead letters instead of sending them; each delivery is done at once."""

    def __init__(self) -> None:
        self.dead_letters: list[tuple[ConsumerRecord[bytes, bytes], InvalidMessage]] = []

    async def start_dead_letter(self, record: ConsumerRecord[bytes, bytes], error: InvalidMessage) -> asyncio.Future:
        self.dead_letters.append((record, error))
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def kafka_record(topic: str, value: bytes, offset: int = 0) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(topic, 0, offset, 0, 0, None, value, None, 0, len(value), ())


async def test_dispatcher_runs_jobs_skips_notifications_and_dead_letters_the_rest() -> None:
    settings = Settings()
    ran: list[tuple[str, Source, object]] = []

    async def run_job(job: JobRequest, source: Source, finish: object) -> None:
        ran.append((job.job_uuid, source, finish))

    async def finish(final: object) -> None:
        raise AssertionError("the stub job never finishes through it")

    publisher = StubPublisher()
    metrics = ServiceMetrics()
    dispatch = RecordDispatcher(settings, run_job, publisher, metrics)  # type: ignore[arg-type]
    upload = minio_event(settings.minio_bucket, "uploads/b.nii.gz", size=1, etag="e")
    elsewhere = minio_event(settings.minio_bucket, "other/c.nii.gz", size=1, etag="e")
    outcomes = [
        await dispatch(kafka_record(settings.kafka_jobs_topic, b'{"job_uuid": "a", "input_object": "uploads/a.nii"}')),
        await dispatch(kafka_record(settings.kafka_minio_events_topic, orjson.dumps(upload))),
        await dispatch(kafka_record(settings.kafka_minio_events_topic, orjson.dumps(elsewhere))),
        await dispatch(kafka_record(settings.kafka_jobs_topic, b"not json", offset=3)),
    ]
    # Records that start jobs come back as work to run; the others are handled already.
    assert [type(o) for o in outcomes] == [Work, Work, Handled, Handled]
    assert ran == []
    for work in outcomes[:2]:
        assert isinstance(work, Work)
        await work.run(finish)
    # The (only, hence last) job of each record finishes through the record's commit.
    assert ran == [
        ("a", Source.KAFKA, finish),
        (upload_job_id(settings.minio_bucket, "uploads/b.nii.gz", "e"), Source.MINIO, finish),
    ]
    assert outcomes[2] == Handled(None)
    ((record, error),) = publisher.dead_letters
    assert record.offset == 3 and error.code is ErrorCode.INVALID_JSON
    assert metrics.skipped_events.labels("outside_uploads")._value.get() == 1
    assert metrics.dead_letters.labels(settings.kafka_jobs_topic, "invalid_json")._value.get() == 1
