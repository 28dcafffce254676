"""Reliability on the real broker and S3 server: outages cost time, not jobs; the final event and
the commit go together; stop and revoke do no double work; the result cache; dead letters at
speed; slow clients; disk back-pressure."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import io
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openpyxl
import orjson
import pytest
import urllib3
from aiohttp import web
from aiokafka.errors import KafkaError

from consumer.auth import BearerAuth, issue_token
from consumer.dev.localstack import LocalStack
from consumer.http.app import build_app, runner_options
from consumer.jobs.callback import BackendNotifier
from consumer.jobs.report import build_report
from consumer.retry import RetryPolicy
from consumer.service import STOP_MARGIN_S, Service
from consumer.settings import Settings
from consumer.storage import ObjectStore
from consumer.transport.clients import ensure_topics
from models.phantom import Phantom, save_phantom
from schemas.events import JobEvent, JobStatus
from schemas.jobs import Source
from schemas.results import AnalysisResult
from tests.conftest import (
    SECRET,
    EventLog,
    committed_offset,
    eventually,
    fresh_scan,
    isolated_settings,
    job_id,
    samples,
    send_json,
    start_service,
    upload_input,
    value,
)
from tests.proxy import TcpProxy

LIGHT = {"model_name": "medical_segmentation_v1", "ml_service_token": SECRET}


def bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(SECRET, ttl_s=600, subject='tests')}"}


async def metrics_of(service: Service) -> dict:
    return samples(service.metrics.render().decode())


def step_count(metrics: dict, step: str) -> float:
    return value(metrics, "ml_job_step_seconds_count", step=step)


@dataclasses.dataclass
class Isolated:
    settings: Settings
    service: Service
    events: EventLog


@pytest.fixture
async def isolated(stack: LocalStack, store: ObjectStore, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """A service of its own (own topics and group), with settings the test chooses."""
    started: list[Isolated] = []

    async def make(prefix: str, **overrides: Any) -> Isolated:
        settings = isolated_settings(stack, f"{prefix}-{job_id()[:8]}", **{**LIGHT, **overrides})
        await ensure_topics(settings)
        events = EventLog(settings, settings.kafka_job_events_topic)
        await events.start()
        service = await start_service(settings)
        started.append(Isolated(settings, service, events))
        return started[-1]

    yield make
    for one in started:
        await one.service.stop()
        await one.events.stop()


# --- 1. a storage outage costs time, not jobs ---------------------------------------------------


async def test_a_storage_outage_costs_time_not_jobs(
    isolated, stack: LocalStack, store: ObjectStore, phantom: Phantom
) -> None:
    proxy = TcpProxy(int(stack.s3_endpoint.rsplit(":", 1)[1]))
    await proxy.up()
    one: Isolated = await isolated(
        "outage",
        minio_endpoint=proxy.endpoint,
        ml_infer_retry_wait_s=1.5,
        ml_stall_limit_s=0.5,
        ml_max_concurrent_jobs=2,  # the /infer request below must not wait for the Kafka job's slot
    )
    service, settings = one.service, one.settings
    job, key = await fresh_scan(store, phantom)
    http_job, http_key = await fresh_scan(store, phantom)
    await proxy.down()
    try:
        sent = await send_json(
            service.producer, settings.kafka_jobs_topic, {"job_uuid": job, "input_object": key}, key=job
        )
        # The lane waits with its record uncommitted; /health and the metrics say so.
        await eventually(lambda: any(s.seconds >= 0.5 for s in service.worker.stalls()), what="a stalled partition")
        report = await service.health.report()
        assert report.status == "degraded", report
        assert report.checks["storage"].status != "ok" and report.checks["kafka"].status == "degraded"
        assert "storage" in report.checks["kafka"].detail
        stalled = {
            labels: v
            for (name, labels), v in (await metrics_of(service)).items()
            if name == "ml_partition_stalled_seconds"
        }
        assert stalled and max(stalled.values()) >= 0.5
        # /infer waits its own while (ML_INFER_RETRY_WAIT_S), then 503 with Retry-After.
        async with aiohttp.ClientSession(headers=bearer()) as http:
            started = time.monotonic()
            response = await http.post(
                f"http://127.0.0.1:{settings.http_port}/infer", json={"job_uuid": http_job, "input_object": http_key}
            )
            waited = time.monotonic() - started
            body = await response.json()
        assert response.status == 503 and body["error"]["code"] == "storage_unavailable", body
        # It retried (the storage retries below) and gave up within its wait, not the outage's: the
        # wait is an upper bound (a retry that would not fit is not started), so no lower one here.
        assert int(response.headers["Retry-After"]) >= 1 and waited < 10.0
        assert await committed_offset(settings, sent.topic, sent.partition, sent.offset + 1, timeout=0) is None
    finally:
        await proxy.up()
    # Storage is back: the job goes on and completes.
    final = await one.events.final(job, timeout=60)
    assert final["status"] == "completed", final
    assert await committed_offset(settings, sent.topic, sent.partition, sent.offset + 1) == sent.offset + 1
    assert value(await metrics_of(service), "ml_retries_total", what="storage") > 0
    assert service.worker.stalls() == []

    # An outage longer than the job's deadline: the job fails storage_unavailable, at its deadline.
    service.runner.settings = settings.model_copy(update={"ml_job_timeout_s": 12.0})
    late, late_key = await fresh_scan(store, phantom)
    await proxy.down()
    try:
        await send_json(
            service.producer, settings.kafka_jobs_topic, {"job_uuid": late, "input_object": late_key}, key=late
        )
        failed = await one.events.final(late, timeout=60)
    finally:
        await proxy.up()
    assert failed["status"] == "failed" and failed["error"]["code"] == "storage_unavailable", failed
    assert failed["error"]["retryable"] is True and 6.0 <= failed["duration_seconds"] <= 12.5


# --- 2. a blip in the middle of a job: the call is retried, not the job ----------------------------


async def test_a_storage_blip_mid_job_retries_the_upload_not_the_inference(
    service: Service, store: ObjectStore, producer, job_events: EventLog, phantom: Phantom, monkeypatch
) -> None:
    real_put = service.store.client.put_object
    blips: list[str] = []

    def put_object(bucket: str, key: str, data: io.BytesIO, length: int, **kwargs: Any) -> Any:
        if key.endswith(".nii.gz") and key.startswith("results/") and len(blips) < 2:
            data.read()  # the connection died mid-upload: the body was sent, no answer came
            blips.append(key)
            raise urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))
        return real_put(bucket, key, data, length, **kwargs)

    monkeypatch.setattr(service.store.client, "put_object", put_object)
    before = await metrics_of(service)
    job, key = await fresh_scan(store, phantom)
    await send_json(
        producer, service.settings.kafka_jobs_topic, {"job_uuid": job, "input_object": key, "no_cache": True}, key=job
    )
    final = await job_events.final(job)
    after = await metrics_of(service)
    assert final["status"] == "completed", final
    assert len(blips) == 2 and len(await store.get_bytes(final["output_object"])) == final["file_size"]
    assert step_count(after, "infer") - step_count(before, "infer") == 1  # inference ran once
    assert value(after, "ml_retries_total", what="storage") - value(before, "ml_retries_total", what="storage") >= 2


# --- 3. the job's deadline ----------------------------------------------------------------------


async def test_a_job_past_its_deadline_fails_job_timeout_and_infer_answers_504(
    isolated, store: ObjectStore, phantom: Phantom
) -> None:
    one: Isolated = await isolated("timeout", ml_job_timeout_s=0.4)
    service, settings = one.service, one.settings
    job, key = await fresh_scan(store, phantom)
    async with aiohttp.ClientSession(headers=bearer()) as http:
        response = await http.post(
            f"http://127.0.0.1:{settings.http_port}/infer",
            json={"job_uuid": job, "input_object": key, "profile": "production"},
        )
        body = await response.json()
    assert response.status == 504 and body["error"]["code"] == "job_timeout", body
    kafka_job = job_id()
    await send_json(
        service.producer,
        settings.kafka_jobs_topic,
        {"job_uuid": kafka_job, "input_object": key, "profile": "production"},
        key=kafka_job,
    )
    final = await one.events.final(kafka_job)
    assert final["status"] == "failed" and final["error"]["code"] == "job_timeout"
    await eventually(lambda: service.workspace.job_dirs() == [], what="the jobs' directories removed")


# --- 4. stop: nothing new starts, the grace is kept, nothing is done twice ---------------------


async def test_stop_hands_back_waiting_jobs_cancels_late_ones_and_keeps_its_grace(
    isolated, stack: LocalStack, store: ObjectStore, phantom: Phantom
) -> None:
    one: Isolated = await isolated("stop", ml_max_concurrent_jobs=1, ml_shutdown_grace_s=0.5)
    service, settings = one.service, one.settings
    topic = settings.kafka_jobs_topic
    running, waiting, http_job = job_id(), job_id(), job_id()
    _, key = await fresh_scan(store, phantom)
    long = {"input_object": key, "profile": "production"}  # seconds of inference: past the grace
    first = await send_json(service.producer, topic, {"job_uuid": running, **long}, key=running, partition=0)
    await one.events.wait_for(lambda e: e.get("job_uuid") == running and e["status"] == "running")
    second = await send_json(
        service.producer, topic, {"job_uuid": waiting, "input_object": key}, key=waiting, partition=1
    )
    await eventually(lambda: service.jobs.waiting == 1, what="the second job waiting for the slot")
    async with aiohttp.ClientSession(headers=bearer()) as http:
        # An /infer caller waiting for the slot as well.
        infer = asyncio.create_task(
            http.post(f"http://127.0.0.1:{settings.http_port}/infer", json={"job_uuid": http_job, "input_object": key})
        )
        await eventually(lambda: service.jobs.waiting == 2, what="the request waiting for the slot")
        started = time.monotonic()
        await service.stop()
        took = time.monotonic() - started
        response = await infer
        body = await response.json()
    assert response.status == 503 and body["error"]["code"] == "shutting_down" and "Retry-After" in response.headers
    assert took <= settings.ml_shutdown_grace_s + STOP_MARGIN_S
    assert value(await metrics_of(service), "ml_jobs_abandoned_total") == 1
    statuses = {job: [e["status"] for e in one.events.by_job.get(job, [])] for job in (running, waiting)}
    assert statuses[waiting] == [] and "completed" not in statuses[running] and "failed" not in statuses[running]
    for sent in (first, second):
        assert await committed_offset(settings, topic, sent.partition, sent.offset + 1, timeout=0) is None
    # The next owner runs both, once each.
    after = await start_service(settings)
    try:
        for job in (running, waiting):
            final = await one.events.final(job, timeout=240)
            assert final["status"] == "completed"
    finally:
        await after.stop()
    assert [e["status"] for e in one.events.by_job[running]].count("completed") == 1


# --- 5. a failed publish rewinds the partition; a lane in backoff is not a running job --------------


async def test_a_failed_final_event_rewinds_the_partition_and_stop_skips_its_backoff(
    isolated, store: ObjectStore, phantom: Phantom, monkeypatch
) -> None:
    one: Isolated = await isolated("rewind", ml_stall_limit_s=0.5)
    service, settings = one.service, one.settings
    producer = service.publisher.producer
    real_send = producer.send_and_wait
    refused: list[str] = []
    refuse = {"count": 1}

    async def send_and_wait(topic: str, value: bytes, **kwargs: Any) -> Any:
        if (
            topic == settings.kafka_job_events_topic
            and b'"status":"completed"' in value
            and len(refused) < refuse["count"]
        ):
            refused.append(topic)
            raise KafkaError("the broker refused it")  # not retriable: the lane rewinds
        return await real_send(topic, value, **kwargs)

    monkeypatch.setattr(producer, "send_and_wait", send_and_wait)
    service.worker.policy = dataclasses.replace(service.worker.policy, base=1.0, cap=1.0, jitter=False)
    job, key = await fresh_scan(store, phantom)
    sent = await send_json(producer, settings.kafka_jobs_topic, {"job_uuid": job, "input_object": key}, key=job)
    # The record is not committed; the partition shows as stalled while the lane backs off...
    await eventually(
        lambda: any(s.reason.startswith(f"record {sent.offset}") for s in service.worker.stalls()), what="the stall"
    )
    assert await committed_offset(settings, sent.topic, sent.partition, sent.offset + 1, timeout=0) is None
    # ...then the record runs again, finds its outputs (result cache), and is committed.
    final = await one.events.final(job)
    assert final["status"] == "completed" and final["cached"] is True
    assert await committed_offset(settings, sent.topic, sent.partition, sent.offset + 1) == sent.offset + 1
    assert value(await metrics_of(service), "ml_retries_total", what="lane") >= 1
    assert [e["status"] for e in one.events.by_job[job]].count("accepted") == 2

    # A lane sleeping in a long backoff: stop does not wait for it.
    refuse["count"] = 2
    service.worker.policy = dataclasses.replace(service.worker.policy, base=120.0, cap=120.0, jitter=False)
    other, other_key = await fresh_scan(store, phantom)
    late = await send_json(
        producer, settings.kafka_jobs_topic, {"job_uuid": other, "input_object": other_key}, key=other
    )
    await eventually(
        lambda: any(lane.backing_off for lane in service.worker.lanes.values()), timeout=120, what="a lane in backoff"
    )
    started = time.monotonic()
    await service.stop()
    assert time.monotonic() - started < 5.0
    assert await committed_offset(settings, late.topic, late.partition, late.offset + 1, timeout=0) in (
        None,
        late.offset,
    )


# --- 6. the result cache ------------------------------------------------------------------------


async def test_an_identical_job_reuses_the_outputs_by_server_side_copy(
    isolated, store: ObjectStore, phantom: Phantom
) -> None:
    one: Isolated = await isolated("cache")
    service, settings = one.service, one.settings
    first, key = await fresh_scan(store, phantom)
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{settings.http_port}", headers=bearer()) as http:
        body = await (await http.post("/infer", json={"job_uuid": first, "input_object": key})).json()
        before = await metrics_of(service)
        # The same bytes, uploaded again elsewhere, under another job and another output key.
        second = job_id()
        again = f"uploads/{second}/again.nii"
        await store.put_bytes(again, await store.get_bytes(key), "application/octet-stream")
        output = f"results/{second}/mask.nii.gz"
        response = await http.post("/infer", json={"job_uuid": second, "input_object": again, "output_object": output})
        reused = await response.json()
        after = await metrics_of(service)
        assert response.status == 200, reused
        assert step_count(after, "infer") == step_count(before, "infer")  # no inference
        assert (
            value(after, "ml_result_cache_total", result="hit") - value(before, "ml_result_cache_total", result="hit")
            == 1
        )
        assert value(after, "ml_result_cache_total", result="miss") >= 1
        assert reused["output_object"] == output and reused["file_size"] == body["file_size"]
        assert await store.get_bytes(output) == await store.get_bytes(body["output_object"])
        result = orjson.loads(await store.get_bytes(reused["results_object"]))
        original = orjson.loads(await store.get_bytes(body["results_object"]))
        assert result["job_uuid"] == second and result["input"]["object"] == again
        assert result["outputs"]["mask"] == output and result["segmentation"]["file_path"] == output
        assert result["summary"] == original["summary"] and result["findings"] == original["findings"]
        book = openpyxl.load_workbook(io.BytesIO(await store.get_bytes(reused["report_object"])), read_only=True)
        rows = dict(r[:2] for r in book["Summary"].iter_rows(values_only=True))
        assert rows["Job"] == second and rows["Input object"] == again and rows["Mask object"] == output
        # no_cache runs the model; another threshold is another result.
        for extra in ({"no_cache": True}, {"threshold": 0.4}):
            before = await metrics_of(service)
            fresh = await http.post("/infer", json={"job_uuid": job_id(), "input_object": again, **extra})
            assert fresh.status == 200
            assert step_count(await metrics_of(service), "infer") - step_count(before, "infer") == 1, extra

    # A Kafka job says so in its completed event, and skips the running events.
    third = job_id()
    await send_json(service.producer, settings.kafka_jobs_topic, {"job_uuid": third, "input_object": key}, key=third)
    final = await one.events.final(third)
    assert final["status"] == "completed" and final["cached"] is True
    assert final["output_object"] == f"results/analysis_{third}.nii.gz"
    # (the latest identical job's result: the no_cache run above wrote the entry again)
    assert final["summary"]["lesions_count"] == original["summary"]["lesions_count"]
    assert [e["status"] for e in one.events.by_job[third]] == ["accepted", "completed"]
    assert (await one.events.final(first))["cached"] is False


# --- 7. dead letters at speed, of any size -----------------------------------------------------


async def test_a_flood_of_bad_messages_is_dead_lettered_fast_and_exactly(
    service: Service, store: ObjectStore, producer, job_events: EventLog, dead_letters: EventLog, phantom: Phantom
) -> None:
    topic = service.settings.kafka_jobs_topic
    partition = 3
    bad = [b"not json", b"\xff\xfe\x80", b"[]", orjson.dumps({"job_uuid": "../x", "input_object": "a"})] * 75
    bad[-2] = os.urandom(900 * 1024)
    bad[-1] = b'{"job_uuid": "' + b"\\u0000\\n\\\\" * (900 * 1024 // 10) + b'"}'
    job, key = await fresh_scan(store, phantom)
    started = time.monotonic()
    sends = [
        await producer.send(
            topic, value, partition=partition, key=f"bad-{n}".encode(), headers=[("n", str(n).encode())]
        )
        for n, value in enumerate(bad)
    ]
    offsets = [(await sent).offset for sent in sends]
    good = await send_json(producer, topic, {"job_uuid": job, "input_object": key}, key=job, partition=partition)
    wanted = set(offsets)

    def all_lettered() -> bool:
        return wanted <= {
            d["origin"]["offset"]
            for d in dead_letters.records
            if d["origin"]["partition"] == partition and d["origin"]["topic"] == topic
        }

    await dead_letters.until(all_lettered, 120, "every dead letter")
    rate = len(bad) / (time.monotonic() - started)
    assert (await job_events.final(job))["status"] == "completed"
    assert rate >= 50, f"{rate:.0f} messages a second"
    assert await committed_offset(service.settings, topic, partition, good.offset + 1) == good.offset + 1
    letters = {
        d["origin"]["offset"]: d
        for d in dead_letters.records
        if d["origin"]["partition"] == partition and d["origin"]["topic"] == topic
    }
    for n, (offset, original) in enumerate(zip(offsets, bad, strict=True)):
        letter = letters[offset]
        payload = base64.b64decode(letter["payload_base64"])
        assert letter["payload_sha256"] == hashlib.sha256(original).hexdigest() and letter["payload_size"] == len(
            original
        )
        assert payload == (original[: len(payload)] if letter["payload_truncated"] else original)
        assert base64.b64decode(letter["origin"]["key_base64"]) == f"bad-{n}".encode()
        assert letter["origin"]["headers"] == [{"key": "n", "value_base64": base64.b64encode(str(n).encode()).decode()}]
    assert letters[offsets[-2]]["payload_truncated"] and letters[offsets[-1]]["payload_truncated"]


# --- 8. slow HTTP clients ----------------------------------------------------------------------


@pytest.fixture
async def slow_app() -> AsyncIterator[int]:
    """The HTTP app alone, with short limits (the job slots are never reached)."""
    app = build_app(
        None,  # type: ignore[arg-type]
        BearerAuth((), allow_insecure=True),
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        65536,
        body_timeout_s=0.5,
    )
    runner = web.AppRunner(app, **runner_options(keepalive_s=0.5, shutdown_timeout_s=1.0))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield port
    await runner.cleanup()


async def test_a_client_trickling_its_headers_is_cut_off(slow_app: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", slow_app)
    writer.write(b"POST /infer HTTP/1.1\r\nHost: x\r\n")
    await writer.drain()
    started = time.monotonic()

    async def trickle() -> None:
        # A header byte now and then, never the blank line that ends the headers.
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(b"X")
                await writer.drain()
                await asyncio.sleep(0.1)

    feeder = asyncio.create_task(trickle())
    try:
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, without an answer
    finally:
        feeder.cancel()
        writer.close()
    assert time.monotonic() - started < 3.0


async def test_a_body_that_does_not_arrive_is_408(slow_app: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", slow_app)
    writer.write(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    await writer.drain()
    head = await asyncio.wait_for(reader.read(4096), 10)
    assert head.startswith(b"HTTP/1.1 408") and b"request_timeout" in head
    writer.close()


# --- 9. disk back-pressure ---------------------------------------------------------------------


async def test_a_job_waits_for_disk_space_and_health_says_so(
    service: Service, store: ObjectStore, producer, job_events: EventLog, phantom: Phantom, monkeypatch
) -> None:
    short = {"of_space": True}
    real = service.workspace.free_bytes
    monkeypatch.setattr(service.workspace, "free_bytes", lambda: 0 if short["of_space"] else real())
    monkeypatch.setattr(service.workspace, "poll_s", 0.05)
    job, key = await fresh_scan(store, phantom)
    await send_json(
        producer, service.settings.kafka_jobs_topic, {"job_uuid": job, "input_object": key, "no_cache": True}, key=job
    )
    await eventually(lambda: service.workspace.waiting == 1, what="the job waiting for disk space")
    report = await service.health.report()
    assert report.status == "degraded" and report.checks["disk"].status == "degraded", report.checks
    assert any(s.reason == "disk space" for s in service.worker.stalls())
    assert not job_events.by_job[job] or job_events.by_job[job][-1]["status"] == "accepted"
    short["of_space"] = False
    final = await job_events.final(job)
    assert final["status"] == "completed"
    assert (await service.health.report()).checks["disk"].status == "ok"


# --- 10. the callback ---------------------------------------------------------------------------


async def test_callback_4xx_is_not_retried_but_5xx_is() -> None:
    answers: list[int] = []
    calls: list[str] = []

    async def completion(request: web.Request) -> web.Response:
        calls.append(request.match_info["job"])
        return web.json_response({}, status=answers.pop(0) if answers else 200)

    app = web.Application()
    app.router.add_post("/internal/jobs/{job}/completion", completion)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fast = RetryPolicy("callback", base=0.001, cap=0.002, wait_s=None)
    notifier = BackendNotifier(f"http://127.0.0.1:{port}", SECRET, max_attempts=4, policy=fast)

    def final(job: str) -> JobEvent:
        return JobEvent(job_uuid=job, status=JobStatus.COMPLETED, source=Source.KAFKA)

    try:
        answers[:] = [400]
        assert await notifier._deliver(final("refused")) is False
        assert calls.count("refused") == 1  # a 4xx: the backend refuses this payload
        answers[:] = [503, 502]
        assert await notifier._deliver(final("flaky")) is True
        assert calls.count("flaky") == 3  # two 5xx, then success
        answers[:] = [500] * 10
        assert await notifier._deliver(final("down")) is False
        assert calls.count("down") == 4  # max_attempts, then given up
        answers[:] = [429]
        assert await notifier._deliver(final("busy")) is True and calls.count("busy") == 2
        assert notifier.failed == 2 and notifier.sent == 2
    finally:
        await notifier.drain(1.0)
        await runner.cleanup()


# --- 11. reference masks and text from data, end to end -----------------------------------------


async def test_a_kafka_job_with_a_reference_mask_reports_its_metrics(
    service: Service, store: ObjectStore, producer, job_events: EventLog, phantom: Phantom, tmp_path: Path, backend
) -> None:
    image, truth = tmp_path / "image.nii.gz", tmp_path / "truth.nii.gz"
    save_phantom(phantom, image, truth)
    job, key = await upload_input(store, image, "scan.nii.gz", "application/gzip")
    reference = f"uploads/{job}/truth.nii.gz"
    await store.put_file(reference, truth, "application/gzip")
    message = {"job_uuid": job, "input_object": key, "reference_object": reference}
    await send_json(producer, service.settings.kafka_jobs_topic, message, key=job)
    final = await job_events.final(job)
    assert final["status"] == "completed", final
    result = orjson.loads(await store.get_bytes(final["results_object"]))
    metrics = {m["name"]: m["value"] for m in result["metrics"]}
    assert metrics["dice_score"] >= 0.7 and metrics["lesions_true_positive"] >= 1
    book = openpyxl.load_workbook(io.BytesIO(await store.get_bytes(final["report_object"])), read_only=True)
    rows = {r[0]: r[1] for r in book["Summary"].iter_rows(values_only=True)}
    assert any(name.endswith("(dice_score)") and value == metrics["dice_score"] for name, value in rows.items())
    assert (await backend.wait_for_call(job))["status"] == "completed"
    # A missing reference is its own failure, and the cache does not hide it.
    missing = job_id()
    await send_json(
        producer,
        service.settings.kafka_jobs_topic,
        {"job_uuid": missing, "input_object": key, "reference_object": f"uploads/{job}/nope.nii.gz"},
        key=missing,
    )
    failed = await job_events.final(missing)
    assert failed["status"] == "failed" and failed["error"]["code"] == "reference_not_found"


async def test_text_from_the_input_is_text_in_the_report_and_exact_in_the_json(
    service: Service, store: ObjectStore, http, phantom: Phantom
) -> None:
    job = job_id()
    key = f'=HYPERLINK("http://x","{job}").nii'  # an object key that a spreadsheet would run
    _, scan = await fresh_scan(store, phantom)
    await store.copy(scan, key)
    response = await http.post("/infer", json={"job_uuid": job, "input_object": key})
    body = await response.json()
    assert response.status == 200, body
    result = orjson.loads(await store.get_bytes(body["results_object"]))
    assert result["input"]["object"] == key
    book = openpyxl.load_workbook(io.BytesIO(await store.get_bytes(body["report_object"])))
    cell = next(row[1] for row in book["Summary"].iter_rows() if row[0].value == "Input object")
    assert cell.data_type == "s" and cell.value == "'" + key
    # A DICOM series description and reader warnings that start like formulas, in the same report.
    hostile = ["=1+2", "+SUM(A1:A2)", "-2+3", "@cmd", "\tTAB", "\rCR", "plain"]
    result["input"]["warnings"] = hostile
    result["input"]["series"] = {
        "chosen": {
            "series_instance_uid": "1.2.3",
            "description": "=HYPERLINK(1)",
            "instances": 3,
            "frames": 3,
            "eligible": True,
        },
        "reason": "=reason",
        "others": [],
        "slices": 3,
        "slice_step_mm": 1.0,
        "gantry_tilt_deg": 0.0,
    }
    report = openpyxl.load_workbook(io.BytesIO(build_report(AnalysisResult.model_validate(result))))
    rows = [(r[0].value, r[1]) for r in report["Summary"].iter_rows()]
    warnings = [cell for name, cell in rows if name == "Reader warning"]
    # (XML turns a stored CR into LF when it is read back; the leading quote is what matters.)
    assert [cell.value for cell in warnings] == [("'" + w if w != "plain" else w).replace("\r", "\n") for w in hostile]
    assert all(cell.data_type == "s" for cell in warnings)
    description = next(cell for name, cell in rows if name == "Series description")
    assert description.value == "'=HYPERLINK(1)" and description.data_type == "s"


async def test_the_group_is_joined_while_the_models_load(stack: LocalStack, producer) -> None:
    """Cold start: partitions are assigned during the models' load (the rebalance no longer comes
    after it), yet no record is fetched before the models are loaded."""
    settings = isolated_settings(stack, f"startup-{job_id()[:8]}", **LIGHT)
    await ensure_topics(settings)
    await producer.send_and_wait(settings.kafka_jobs_topic, b"not json: waits for the models")
    service = Service(settings)
    load, seen = service.models.load_all, {}

    def slow_load() -> None:
        deadline = time.monotonic() + 30.0
        while not service.consumer.assignment() and time.monotonic() < deadline:
            time.sleep(0.05)
        seen["assigned"] = bool(service.consumer.assignment())
        time.sleep(1.0)  # a poll would have fetched the record by now
        seen["fetched"] = bool(service.worker.lanes)
        load()

    service.models.load_all = slow_load  # type: ignore[method-assign]
    await service.start()
    try:
        assert seen == {"assigned": True, "fetched": False}
        # Then the record is handled (a dead letter: it is not JSON) and committed.
        await eventually(lambda: service.worker.committed >= 1, what="the record committed")
    finally:
        await service.stop()
